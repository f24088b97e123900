"""A statically slimmed start (fewer channels than timm's architecture): loaded, gated, exported, rebuilt."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from helpers import TINY_PRUNE, prune_tiny, run_manidp
from safetensors.torch import load_file, save_file

from manidp_cli.api.cascade import start_of
from manidp_cli.api.evaluate import evaluate_export
from manidp_cli.api.jobs import prepare, run
from manidp_cli.core.features import stage_names
from manidp_cli.core.flops import count_flops
from manidp_cli.core.gating import gates_of
from manidp_cli.errors import RecipeError, WeightsError
from manidp_cli.io import NARROWED, _build, load_pruned, read_metadata
from manidp_cli.models.factory import create_model
from manidp_cli.models.narrowing import narrowed_groups
from manidp_cli.models.start import StartFile
from manidp_cli.runtime.static_l1 import static_l1

SHAPE = (1, 32, 32)
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _save(model: torch.nn.Module, path) -> None:
    save_file({key: value.detach().contiguous() for key, value in model.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def slimmed(dense_weights, tmp_path_factory):
    """test_resnet from the tiny dense start, cut by Torch-Pruning's L1 to half its FLOPs, saved."""
    dense = create_model("test_resnet", num_classes=10, in_chans=1, weights=dense_weights).eval()
    baseline = static_l1(dense, 0.5, SHAPE)
    path = tmp_path_factory.mktemp("slimmed") / "model.safetensors"
    _save(baseline.model, path)
    return baseline, path


def test_a_slimmed_start_narrows_the_architecture_and_computes_what_the_pruner_left(slimmed):
    baseline, path = slimmed
    loaded = create_model("test_resnet", num_classes=10, in_chans=1, weights=path).eval()
    images = torch.randn(4, *SHAPE)
    torch.testing.assert_close(loaded(images), baseline.model.eval()(images), rtol=0, atol=0)
    assert all(parameter.requires_grad for parameter in loaded.parameters())  # a start to train
    full = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    measured = count_flops(loaded, SHAPE).dense_flops / count_flops(full, SHAPE).dense_flops
    assert measured == pytest.approx(baseline.flops_ratio, rel=0.02)


def test_widths_that_do_not_chain_are_refused_before_training(slimmed, tmp_path):
    _, path = slimmed
    full = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    state = full.state_dict()
    conv = next(key for key, value in state.items() if value.dim() == 4 and value.shape[0] > 1)
    state[conv] = state[conv][:1]  # one layer narrowed, nothing after it
    broken = tmp_path / "broken.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, str(broken))
    with pytest.raises(WeightsError, match="does not run"):
        create_model("test_resnet", num_classes=10, in_chans=1, weights=broken)
    state[conv] = full.state_dict()[conv][:, :, :1, :1]  # a smaller kernel: no pruner removes that
    save_file({key: value.contiguous() for key, value in state.items()}, str(broken))
    with pytest.raises(WeightsError, match=f"removing channels does not explain '{conv}'"):
        create_model("test_resnet", num_classes=10, in_chans=1, weights=broken)


def test_a_gated_slimmed_start_exports_what_rebuilds_it_with_flops_of_the_architecture(slimmed, tiny_fashion, tmp_path):
    baseline, path = slimmed
    result = prune_tiny(tmp_path / "run", tiny_fashion, weights=path)
    model, export = load_pruned(tmp_path / "run")
    widths = export.metadata[NARROWED]
    assert widths and all(tuple(model.state_dict()[key].shape) == tuple(shape) for key, shape in widths.items())
    # metadata cannot widen a layer (a crafted header must not allocate what it likes)
    widened = {**export.metadata, NARROWED: {key: [size * 1000 for size in shape] for key, shape in widths.items()}}
    with pytest.raises(WeightsError, match="cannot narrow"):
        _build(widened, tmp_path / "crafted")
    flops = export.metadata["flops"]
    # mean_ratio is of the slimmed start; of the architecture it is that times the start's own share
    assert flops["mean_ratio_of_architecture"] == pytest.approx(flops["mean_ratio"] * baseline.flops_ratio, rel=0.02)
    assert flops["mean_ratio"] == pytest.approx(result.after.flops.mean_ratio)
    evaluated = evaluate_export(tmp_path / "run")  # `manidp eval`: the same share of the architecture
    assert evaluated.mean_ratio_of_architecture == pytest.approx(flops["mean_ratio_of_architecture"], rel=1e-6)
    assert evaluated.to_dict()["mean_ratio_of_architecture"] == evaluated.mean_ratio_of_architecture
    images = torch.randn(4, *SHAPE)
    with torch.no_grad():
        rebuilt = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True).eval()
        torch.testing.assert_close(rebuilt(images), model(images))


def test_a_slimmed_start_distils_from_its_dense_original(slimmed, tiny_fashion, dense_weights, tmp_path):
    _, path = slimmed

    def prepared(**loss):
        overrides = {**TINY_PRUNE, "data": tiny_fashion, "loss": {**TINY_PRUNE["loss"], **loss}}
        return prepare("prune", "test_resnet", overrides=overrides, weights=path, out_dir=tmp_path / "run")

    job = prepared(distill_weight=1.0, teacher_weights=str(dense_weights))
    dense = create_model("test_resnet", num_classes=10, in_chans=1, weights=dense_weights).eval()
    images = torch.randn(4, *SHAPE)
    torch.testing.assert_close(job.teacher(images), dense(images), rtol=0, atol=0)
    assert job.slimmed_start is not None  # the student is the slimmed network, the teacher full width
    # the teacher is built aside from the seed: the student's gates start as they would without it
    without = prepared(distill_weight=1.0)
    assert all(torch.equal(v, without.model.state_dict()[k]) for k, v in job.model.state_dict().items())
    with pytest.raises(RecipeError, match="feature_distill_weight"):
        prepared(feature_distill_weight=1.0, teacher_weights=str(dense_weights))
    with pytest.raises(WeightsError, match="loss.teacher_weights: weights file .* not found"):
        prepared(distill_weight=1.0, teacher_weights=str(tmp_path / "missing.safetensors"))


def test_a_run_from_a_slimmed_start_resumes_to_identical_weights(slimmed, tiny_fashion, tmp_path):
    _, path = slimmed
    straight = prune_tiny(tmp_path / "straight", tiny_fashion, weights=path)
    interrupted = prune_tiny(
        tmp_path / "resumed", tiny_fashion, weights=path, on_step=lambda info: info.epoch == 1 and info.step == 2
    )
    assert interrupted.interrupted
    resumed = prune_tiny(tmp_path / "resumed", tiny_fashion, resume=True)  # without the start's file
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert resumed.history == straight.history
    # both record the start they were pruned from, which a cascade escalates to at its slimmed widths
    recorded = [read_metadata(tmp_path / run)["start_file"] for run in ("straight", "resumed")]
    assert recorded == [StartFile.of(path).to_dict()] * 2
    start, info = start_of(load_pruned(tmp_path / "resumed")[1])
    assert info.metadata[NARROWED] and info.metadata["kind"] == "dense"
    images = torch.randn(4, *SHAPE)
    slimmed_start = create_model("test_resnet", num_classes=10, in_chans=1, weights=path).eval()
    with torch.no_grad():
        assert torch.equal(start(images), slimmed_start(images))


def test_static_share_slims_the_start_and_the_gates_cut_the_rest(dense_weights, slimmed, tiny_fashion, tmp_path):
    overrides = {**TINY_PRUNE, "data": tiny_fashion, "target_flops": 0.3, "static_share": 0.5}
    job = prepare("prune", "test_resnet", overrides=overrides, weights=dense_weights, out_dir=tmp_path / "run")
    full = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    architecture = count_flops(full, SHAPE).dense_flops
    assert job.static_flops_ratio == pytest.approx(job.table.dense_flops / architecture)
    assert job.static_flops_ratio == pytest.approx(0.3**0.5, abs=0.05)  # the bisection's nearest
    assert job.gate_target == pytest.approx(0.3 / job.static_flops_ratio)
    dense = create_model("test_resnet", num_classes=10, in_chans=1, weights=dense_weights).eval()
    images = torch.randn(4, *SHAPE)
    torch.testing.assert_close(job.teacher(images), dense(images), rtol=0, atol=0)  # distils from the start
    result = run(job)
    flops = load_pruned(tmp_path / "run")[1].metadata["flops"]
    assert flops["static_ratio"] == pytest.approx(job.static_flops_ratio)
    assert flops["mean_ratio_of_architecture"] == pytest.approx(flops["mean_ratio"] * job.static_flops_ratio)
    assert result.flops_ratio_of_architecture == pytest.approx(flops["mean_ratio_of_architecture"])
    assert result.to_dict()["after"]["flops_ratio_of_architecture"] == result.flops_ratio_of_architecture
    _, path = slimmed
    with pytest.raises(RecipeError, match="static_share 0.5 slims a full-width start"):
        prepare("prune", "test_resnet", overrides=overrides, weights=path, out_dir=tmp_path / "again")


@pytest.mark.parametrize("criterion", ["l1", "taylor"])
def test_static_share_distils_each_slimmed_stage_on_the_teacher_channels_it_kept(
    criterion, dense_weights, tiny_fashion, tmp_path
):
    """Stage-output distillation after a static stage compares each slimmed stage output with the
    teacher channels the pruner kept (it had failed on the first step: 27 channels against 32), with
    either ranking; taylor's run (gates started from Taylor importance too) exports a loadable model."""
    loss = {**TINY_PRUNE["loss"], "feature_distill_weight": 1.0}
    overrides = {**TINY_PRUNE, "data": tiny_fashion, "target_flops": 0.3, "static_share": 0.5, "loss": loss}
    overrides["static_criterion"] = criterion
    if criterion == "taylor":
        overrides["gates"] = {"init": "taylor"}
    job = prepare("prune", "test_resnet", overrides=overrides, weights=dense_weights, out_dir=tmp_path / "run")
    names = stage_names(job.teacher)
    assert job.kept_stage_channels is not None and len(job.kept_stage_channels) == len(names)
    narrowed = 0
    for name, kept in zip(names, job.kept_stage_channels, strict=True):
        student_norms = [m for m in job.model.get_submodule(name).modules() if isinstance(m, torch.nn.BatchNorm2d)]
        teacher_norms = [m for m in job.teacher.get_submodule(name).modules() if isinstance(m, torch.nn.BatchNorm2d)]
        if not student_norms:  # a stage without a normalisation of its own (the stem's activation)
            continue
        # the stage's last normalisation: the student's holds the teacher's statistics of the kept channels
        # (its affine the gates' first cut rescales)
        assert torch.equal(student_norms[-1].running_mean, teacher_norms[-1].running_mean[kept])
        narrowed += len(kept) < teacher_norms[-1].num_features
    assert narrowed  # the static stage narrowed some stage output
    result = run(job)
    assert all(0 < epoch["train_feature_distill"] < float("inf") for epoch in result.history)
    model, export = load_pruned(tmp_path / "run")
    assert export.metadata["gate_policy"]["init"] == ("taylor" if criterion == "taylor" else "l1_norm")
    assert model(torch.randn(2, *SHAPE)).shape == (2, 10)


def test_static_share_without_torch_pruning_is_one_line_before_anything_is_written(dense_weights, tmp_path):
    out = tmp_path / "run"
    args = ["prune", "test_resnet", "--recipe", RECIPES / "hybrid.yaml", "--weights", dense_weights, "--out", out]
    done = run_manidp(args, preamble="sys.modules['torch_pruning'] = None  # not installed")
    assert done.returncode == 2, done.stderr
    assert "recipe static_share) needs Torch-Pruning: pip install 'manidp[bench]'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "regnetx_002"])  # depthwise; grouped (8 per group)
def test_a_slimmed_depthwise_or_grouped_start_loads_and_computes_what_the_pruner_left(name, tmp_path):
    torch.manual_seed(0)
    dense = timm.create_model(name, num_classes=10, in_chans=1).eval()
    baseline = static_l1(dense, 0.5, SHAPE)
    full = dict(dense.named_modules())
    narrowed = [
        module
        for key, module in baseline.model.named_modules()
        if isinstance(module, torch.nn.Conv2d) and module.groups > 1 and module.out_channels < full[key].out_channels
    ]
    assert narrowed  # the pruner did narrow grouped convolutions, so the test reaches them
    _save(baseline.model, tmp_path / "model.safetensors")
    loaded = create_model(name, num_classes=10, in_chans=1, weights=tmp_path / "model.safetensors").eval()
    images = torch.randn(4, *SHAPE)
    torch.testing.assert_close(loaded(images), baseline.model.eval()(images), rtol=0, atol=0)


def test_groups_follow_a_depthwise_width_and_stay_for_other_grouped_convolutions():
    size = torch.Size
    assert narrowed_groups(1, size([8, 4, 3, 3]), size([6, 3, 3, 3])) == 1
    assert narrowed_groups(8, size([8, 1, 3, 3]), size([5, 1, 3, 3])) == 5  # depthwise: one channel per group
    assert narrowed_groups(8, size([8, 1, 3, 3]), size([5, 2, 3, 3])) is None
    assert narrowed_groups(4, size([16, 2, 3, 3]), size([12, 2, 3, 3])) == 4  # grouped: each group alike
    assert narrowed_groups(4, size([16, 2, 3, 3]), size([10, 2, 3, 3])) is None  # 10 channels in 4 groups
    assert narrowed_groups(4, size([16, 2, 3, 3]), size([12, 2, 1, 1])) is None  # another kernel


def _mobilenet_prune(tiny_fashion, tmp_path, **overrides):
    """A prune job of a random mobilenetv3_small_050 start (depthwise) on the tiny data."""
    torch.manual_seed(0)
    start = timm.create_model("mobilenetv3_small_050", num_classes=10, in_chans=1)
    _save(start, tmp_path / "start.safetensors")
    settings = {**TINY_PRUNE, "data": tiny_fashion, **overrides}
    job = prepare(
        "prune",
        "mobilenetv3_small_050",
        overrides=settings,
        weights=tmp_path / "start.safetensors",
        out_dir=tmp_path / "run",
    )
    return start, job


def test_static_share_slims_a_depthwise_network(tiny_fashion, tmp_path):
    start, job = _mobilenet_prune(tiny_fashion, tmp_path, target_flops=0.9, static_share=0.5)
    assert job.static_flops_ratio == pytest.approx(0.9**0.5, abs=0.05)
    depthwise = job.model.get_submodule("blocks.1.0.conv_dw")
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels < start.blocks[1][0].conv_dw.out_channels


def test_an_export_with_cost_capped_gates_loads_as_trained(tiny_fashion, tmp_path):
    """The default recipe's gates.max_cost narrows mobilenetv3_small_050's costliest gates at 32 px;
    the export's gate policy and input size rebuild exactly those widths."""
    _, job = _mobilenet_prune(tiny_fashion, tmp_path, epochs=1, target_flops=0.8)
    widths = {key: gate.fc1.out_features for key, gate in job.gates.items()}
    narrowed = [gate.name for gate in job.gates.values() if gate.fc1.out_features < gate.fc2.out_features // 8]
    assert narrowed and job.gates_narrowed_by_cost == narrowed
    assert not run(job).interrupted
    loaded, _ = load_pruned(tmp_path / "run")
    assert {key: gate.fc1.out_features for key, gate in gates_of(loaded).items()} == widths
    images = torch.randn(4, *SHAPE)
    torch.testing.assert_close(loaded(images), job.model.eval()(images))
