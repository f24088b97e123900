"""The engine, through the pipeline: a tiny prune run, its export, and exact resume."""

import copy

import pytest
import timm
import torch
from helpers import prune_tiny
from safetensors.torch import load_file, save_file
from torch import nn

from manidp_cli.api.jobs import prepare, run
from manidp_cli.config import OptimizerConfig
from manidp_cli.io import load_pruned, read_metadata
from manidp_cli.training.engine import cosine_lr, peak_lr, scheduled_lr


def test_cosine_lr():
    assert cosine_lr(0, 100, 0.1) == 0.1
    assert cosine_lr(50, 100, 0.1) == pytest.approx(0.05)
    assert cosine_lr(100, 100, 0.1, min_lr=0.01) == pytest.approx(0.01)


def test_prune_writes_the_export_and_meets_the_target(pruned):
    out = pruned.out_dir
    for name in ("model.safetensors", "report.json", "recipe.yaml", "metrics.jsonl", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    meta = read_metadata(out)
    assert meta["kind"] == "pruned" and meta["model"] == "test_resnet"
    assert meta["recipe"]["target_flops"] == 0.5 and meta["model_kwargs"] == {"num_classes": 10, "in_chans": 1}
    measured = pruned.after.flops.mean_ratio
    assert meta["flops"]["mean_ratio"] == measured
    # calibrated on 64 training images, measured on the 64 evaluation images
    assert abs(measured - 0.5) / 0.5 < 0.05
    assert pruned.before["flops_ratio"] > 0.9
    thresholds = [v for k, v in load_file(str(out / "model.safetensors")).items() if k.endswith(".threshold")]
    assert thresholds and all(float(t) > float("-inf") for t in thresholds)


def test_export_round_trip_rebuilds_the_same_model(pruned, tiny_fashion):
    from manidp_cli.data import load_data

    model, info = load_pruned(pruned.out_dir)
    assert info.gated and info.input_shape == (1, 32, 32)
    images, _ = next(load_data(tiny_fashion).eval.batches(16))
    again, _ = load_pruned(pruned.out_dir / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(model(images), again(images))
    state = load_file(str(pruned.out_dir / "model.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "overrides",
    [
        None,
        {"loss": {"feature_distill_weight": 1.0, "distill_decay": "linear"}},
        {"narrow_training": True},
        {"static_share": 0.5},
        {"optimizer": {"gate_optimizer": "adam", "gate_lr_scale": 0.02}},
        {"static_share": 0.5, "loss": {"feature_distill_weight": 1.0}},
    ],
    ids=["default", "stage_distillation_decayed", "narrow", "static_stage", "gate_adam", "static_stage_distilled"],
)
def test_interrupted_run_resumes_to_identical_weights(tiny_fashion, dense_weights, tmp_path, overrides):
    """Also with stage-output distillation, whose hooks a resumed run must set up again, a
    distillation weight that depends on the step, narrow training (module classes swapped
    for each epoch and restored), and a static stage (a slimmed network distilled from its
    full-width start, both rebuilt from the checkpoint's widths), and the gates' own Adam (its moments
    checkpointed beside the network's SGD momentum), and a static stage with stage-output distillation
    (the teacher channels each slimmed stage keeps, read back from the checkpoint)."""
    straight = prune_tiny(tmp_path / "straight", tiny_fashion, weights=dense_weights, overrides=overrides)
    stops = {"n": 0}

    def stop_mid_second_epoch(info):
        stops["n"] += 1
        return info.epoch == 1 and info.step == 2

    interrupted = prune_tiny(
        tmp_path / "resumed", tiny_fashion, weights=dense_weights, on_step=stop_mid_second_epoch, overrides=overrides
    )
    assert interrupted.interrupted and not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = prune_tiny(tmp_path / "resumed", tiny_fashion, resume=True, overrides=overrides)
    assert not resumed.interrupted
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert straight.history == resumed.history
    assert resumed.before == straight.before


def test_existing_run_is_not_overwritten(pruned, tiny_fashion):
    from manidp_cli.errors import ManidpError

    with pytest.raises(ManidpError, match="already holds a run: pass --resume"):
        prepare("prune", "test_resnet", overrides={"data": tiny_fashion}, out_dir=pruned.out_dir)


def test_default_recipe_meets_its_target_on_the_embedded_data(tmp_path):
    """The default recipe (feedback thresholds, final calibration) lands within 2% of --target-flops
    on the 1,000 embedded test images, counted honestly (resnet18 from a random start: the count,
    not the accuracy, is under test)."""
    torch.manual_seed(0)
    start = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    save_file(start.state_dict(), str(tmp_path / "start.safetensors"))
    job = prepare(
        "prune",
        "resnet18",
        out_dir=tmp_path / "run",
        weights=tmp_path / "start.safetensors",
        overrides={"epochs": 2, "train_images": 640, "target_flops": 0.45, "schedule": {"search_steps": 16}},
    )
    assert job.recipe.schedule.mode == "feedback" and job.recipe.gates.init == "l1_norm"
    result = run(job)
    measured = result.after.flops.mean_ratio
    assert result.after.images == 1000
    assert abs(measured - 0.45) <= 0.02 * 0.45, measured


def test_input_gated_prune_exports_loads_and_runs_dynamically(tiny_fashion, dense_weights, tmp_path):
    """gates.inputs through the whole pipeline: trained, exported, rebuilt from the export with the
    same outputs, evaluated by the dynamic executor with the masked model's accuracy."""
    from manidp_cli.api.evaluate import evaluate_export
    from manidp_cli.data import load_data

    result = prune_tiny(tmp_path / "run", tiny_fashion, weights=dense_weights, overrides={"gates": {"inputs": True}})
    assert abs(result.after.flops.mean_ratio - 0.5) / 0.5 < 0.05
    meta = read_metadata(result.out_dir)
    inputs = [name for name in meta["gated_layers"] if name.endswith(":in")]
    assert inputs and meta["recipe"]["gates"]["inputs"] is True
    layers = {layer.name: layer for layer in result.after.flops.layers}
    assert any(layers[name.removesuffix(":in")].keep_ratio_in < 1.0 for name in inputs)
    model, _ = load_pruned(result.out_dir)
    images, _ = next(load_data(tiny_fashion).eval.batches(16))
    with torch.no_grad():
        assert torch.equal(model(images), load_pruned(result.out_dir)[0](images))
    evaluated = evaluate_export(result.out_dir, dynamic=True)
    assert evaluated.flops.mean / evaluated.flops.dense == pytest.approx(result.after.flops.mean_ratio)
    assert evaluated.dynamic_execution.prediction_agreement >= 0.95


def test_warmup_rises_linearly_then_follows_the_cosine():
    lrs = [scheduled_lr(step, 10, 0.4, warmup=4) for step in range(11)]
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert lrs[4] == pytest.approx(0.4) and lrs[7] == pytest.approx(0.2) and lrs[10] == pytest.approx(0.0)
    assert scheduled_lr(3, 10, 0.4) == cosine_lr(3, 10, 0.4)


@pytest.mark.parametrize(
    ("lr_batch", "batch", "processes", "expected"),
    [(None, 128, 1, 0.1), (None, 128, 8, 0.1), (256, 128, 1, 0.05), (256, 128, 4, 0.2), (256, 256, 8, 0.8)],
)
def test_peak_lr_scales_with_the_global_batch(lr_batch, batch, processes, expected):
    assert peak_lr(OptimizerConfig(lr=0.1, lr_batch=lr_batch), batch, processes) == pytest.approx(expected)


def _tiny_fit(tiny_fashion, config: OptimizerConfig, **kwargs):
    from manidp_cli.data import load_data
    from manidp_cli.training.engine import fit
    from manidp_cli.training.objectives import CrossEntropyObjective

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, stride=4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(10)
    )
    data = load_data(tiny_fashion)
    lrs = []
    model(next(data.train.batches(2))[0])  # materialise the lazy layer
    result = fit(
        model,
        data,
        CrossEntropyObjective(),
        epochs=2,
        batch_size=16,
        optimizer_config=config,
        on_step=lambda info: lrs.append(info.lr),
        **kwargs,
    )
    return model, result, lrs


def test_fit_warms_up_over_the_first_epoch(tiny_fashion):
    _, _, lrs = _tiny_fit(tiny_fashion, OptimizerConfig(lr=0.1, warmup_epochs=1.0))
    half = len(lrs) // 2
    assert lrs[:half] == sorted(lrs[:half]) and lrs[0] < 0.1 / half + 1e-9
    assert lrs[half - 1] == pytest.approx(0.1) and lrs[half:] == sorted(lrs[half:], reverse=True)


def test_fp16_autocast_trains_with_loss_scaling(tiny_fashion, tmp_path, monkeypatch):
    """Where a GPU has no bf16, autocast runs in fp16 and the engine scales the loss (the scaler's
    state is checkpointed, so a resumed run keeps its scale)."""
    from manidp_cli.training import engine
    from manidp_cli.training.checkpoint import load_checkpoint

    monkeypatch.setattr(engine, "autocast_dtype", lambda device: torch.float16)
    checkpoint = tmp_path / "checkpoint.pt"
    model, result, _ = _tiny_fit(
        tiny_fashion, OptimizerConfig(lr=0.05), amp=True, checkpoint_path=checkpoint, extra_state=_RUN
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.history[-1]["train_ce"] < result.history[0]["train_ce"] * 1.5
    assert load_checkpoint(checkpoint)["scaler"]["scale"] > 0


_RUN = {"kind": "train", "recipe": "", "model": "tiny", "weights": ""}


def test_cost_weighted_allocation_keeps_fewer_of_the_dearer_channels(tiny_fashion, dense_weights, tmp_path):
    """schedule.allocation > 0: the layer whose gate decides the most FLOPs keeps a smaller share of
    its channels, relative to the one that decides the least, than with one rate for all; the
    target is met either way."""
    from manidp_cli.core.flops import count_flops, decided_flops

    shares = {}
    for allocation in (0.0, 1.0):
        out = tmp_path / f"allocation-{allocation}"
        schedule = {"schedule": {"allocation": allocation}}
        result = prune_tiny(out, tiny_fashion, weights=dense_weights, overrides=schedule)
        assert abs(result.after.flops.mean_ratio - 0.5) / 0.5 < 0.05
        model, info = load_pruned(out)
        decided = decided_flops(count_flops(model, info.input_shape))
        dearest, cheapest = max(decided, key=decided.get), min(decided, key=decided.get)
        keep = {layer.name: layer.keep_ratio_out for layer in result.after.flops.layers}
        shares[allocation] = keep[dearest] / keep[cheapest]
    assert shares[1.0] < 0.8 * shares[0.0], shares


def test_the_teacher_is_checkpointed_once_not_per_process(pruned):
    from manidp_cli.training.checkpoint import load_checkpoint

    state = load_checkpoint(pruned.out_dir / "checkpoint.pt")
    assert pruned.out_dir.joinpath("recipe.yaml").read_text().count("distill_weight: 1.0") == 1
    assert set(state["shared"]["teacher"]) == set(timm.create_model("test_resnet", in_chans=1).state_dict())
    assert all("teacher" not in rank["objective"] for rank in state["per_rank"])


@pytest.mark.parametrize(("train_images", "expected"), [(None, 48), (32, 32)])
def test_the_starting_mean_loss_reads_only_the_calibration_images(
    tiny_fashion, dense_weights, tmp_path, train_images, expected
):
    """L_bar before epoch 0 is estimated on schedule.calibration_images training images (at most the
    epoch's), not on a pass over the whole training set."""
    from manidp_cli.api.jobs import _objective
    from manidp_cli.core.distributed import World

    overrides = {"data": tiny_fashion, "train_images": train_images, "schedule": {"calibration_images": 48}}
    job = prepare("prune", "test_resnet", weights=dense_weights, out_dir=tmp_path / "run", overrides=overrides)
    objective = _objective(job, World())
    inner = getattr(objective, "objective", objective)  # the ManiDP objective inside distillation
    assert sum(images.shape[0] for images, _ in inner.training_batches()) == expected
    assert len(job.data.train) > 48


def test_distillation_while_the_teacher_is_ahead_is_logged(tiny_fashion, dense_weights, tmp_path):
    """loss.distill_where: teacher_ahead logs the share of steps distilled and the teacher's lead."""
    import json

    overrides = {"loss": {"distill_where": "teacher_ahead"}}
    prune_tiny(tmp_path / "run", tiny_fashion, weights=dense_weights, overrides=overrides)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= epoch["train_distilled_share"] <= 1.0 for epoch in epochs)
    assert all(-1.0 <= epoch["train_teacher_lead"] <= 1.0 for epoch in epochs)
    # the tiny dense start is a weak teacher: the student overtakes it at once, and nothing is distilled
    assert (epochs[-1]["train_teacher_lead"] < 0.0) == (epochs[-1]["train_distilled_share"] == 0.0)


def test_feature_distillation_trains_and_is_logged(tiny_fashion, dense_weights, tmp_path):
    """loss.feature_distill_weight distils the stage outputs: logged per epoch, nonzero once the
    pruned student's features differ from its dense start's, the export loads and runs."""
    import json

    overrides = {"loss": {"feature_distill_weight": 1.0}}
    result = prune_tiny(tmp_path / "run", tiny_fashion, weights=dense_weights, overrides=overrides)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(epoch["train_feature_distill"] > 0.0 for epoch in epochs)
    model, _ = load_pruned(result.out_dir)  # the export is unaffected by the training-time stage hooks
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


def test_feature_distillation_names_models_without_stages():
    from manidp_cli.core.features import stage_names
    from manidp_cli.errors import RecipeError

    with pytest.raises(RecipeError, match="feature_distill_weight"):
        stage_names(nn.Sequential(nn.Conv2d(1, 2, 3)))
    assert stage_names(timm.create_model("resnet18", num_classes=3))[-1] == "layer4"


def test_feature_distillation_of_a_slimmed_student_compares_its_kept_channels():
    """teacher_stage_channels: a narrower student's stage is compared with those teacher channels."""
    from manidp_cli.training.objectives import CrossEntropyObjective, Distilled

    class Net(nn.Module):
        def __init__(self, channels: list[int]):
            super().__init__()
            self.stem = nn.Conv2d(1, len(channels), 1, bias=False)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(len(channels) * 4, 3))
            self.feature_info = [{"module": "stem", "num_chs": len(channels), "reduction": 1}]
            with torch.no_grad():
                self.stem.weight.copy_(torch.tensor(channels, dtype=torch.float32).view(-1, 1, 1, 1) + 1)

        def forward(self, x):
            return self.head(self.stem(x))

    teacher, student = Net([0, 1, 2]), Net([0, 2])
    images, targets = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])
    kept = Distilled(
        CrossEntropyObjective(), teacher, 1.0, 4.0, feature_weight=1.0, teacher_stage_channels=[torch.tensor([0, 2])]
    )
    _, terms = kept.step(student, images, targets)
    assert float(terms["feature_distill"]) == 0.0
    other = Distilled(
        CrossEntropyObjective(), teacher, 1.0, 4.0, feature_weight=1.0, teacher_stage_channels=[torch.tensor([0, 1])]
    )
    _, terms = other.step(student, images, targets)
    assert float(terms["feature_distill"]) > 0.0


def test_linear_decay_fades_distillation_over_the_run():
    """distill_decay linear: the term's weight is 1 - the share of steps taken; none keeps it whole."""
    from manidp_cli.training.objectives import CrossEntropyObjective, Distilled

    images, targets = torch.eye(4), torch.tensor([0, 1, 2, 3])
    student, teacher = nn.Linear(4, 4), nn.Linear(4, 4)
    for decay, progress, share in [("linear", 0.0, 1.0), ("linear", 0.75, 0.25), ("none", 0.75, 1.0)]:
        objective = Distilled(CrossEntropyObjective(), teacher, 2.0, 4.0, decay=decay)
        objective.set_progress(progress)
        _, terms = objective.step(student, images, targets)
        assert float(terms["loss"].detach()) == pytest.approx(float(terms["ce"] + 2.0 * share * terms["distill"]))


def test_distillation_stops_once_the_student_is_ahead():
    """With teacher_ahead the distillation term is added while the teacher's running accuracy is at
    least the student's, and left out (its value still logged) once the student is ahead."""
    from manidp_cli.training.objectives import CrossEntropyObjective, Distilled

    images = torch.eye(4)
    targets = torch.tensor([0, 1, 2, 3])
    perfect, wrong = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        perfect.weight.copy_(torch.eye(4) * 3)
        wrong.weight.copy_(torch.eye(4).roll(1, dims=0) * 3)
    behind = Distilled(CrossEntropyObjective(), perfect, 1.0, 4.0, where="teacher_ahead")
    _, terms = behind.step(wrong, images, targets)
    assert float(terms["loss"].detach()) == pytest.approx(float(terms["ce"] + terms["distill"]))
    ahead = Distilled(CrossEntropyObjective(), wrong, 1.0, 4.0, where="teacher_ahead")
    _, terms = ahead.step(perfect, images, targets)
    assert float(terms["distill"]) > 0.0
    assert float(terms["loss"].detach()) == pytest.approx(float(terms["ce"]))
    assert (float(terms["distilled_share"]), float(terms["teacher_lead"])) == (0.0, pytest.approx(-1.0))


def test_distillation_where_the_teacher_fits_better_is_logged(tiny_fashion, dense_weights, tmp_path):
    """loss.distill_where: teacher_better distils a share of each batch's images and logs that share."""
    import json

    overrides = {"loss": {"distill_where": "teacher_better"}}
    prune_tiny(tmp_path / "run", tiny_fashion, weights=dense_weights, overrides=overrides)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shares = [epoch["train_distilled_share"] for epoch in epochs]
    assert all(0.0 <= share <= 1.0 for share in shares)
    assert 0.0 < sum(shares)  # the pruned student starts below its teacher on some images


def test_a_bf16_teacher_distils_like_a_float32_one():
    """teacher_dtype bfloat16: the teacher runs under bf16 autocast, channels-last; its logits are
    float32's to bf16 rounding, so the distillation term is float32's within a few per mille."""
    from manidp_cli.training.objectives import CrossEntropyObjective, Distilled

    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", num_classes=10, in_chans=1)
    student = timm.create_model("resnet18", num_classes=10, in_chans=1)
    images, targets = torch.randn(8, 1, 32, 32), torch.arange(8)
    terms = {}
    for dtype in (torch.float32, torch.bfloat16):
        objective = Distilled(CrossEntropyObjective(), copy.deepcopy(teacher), 1.0, 4.0, teacher_dtype=dtype)
        assert objective.teacher_dtype == dtype
        _, terms[dtype] = objective.step(student, images, targets)
        assert terms[dtype]["loss"].dtype == torch.float32 and terms[dtype]["loss"].requires_grad
    first_conv = objective.teacher.conv1.weight
    assert first_conv.is_contiguous(memory_format=torch.channels_last)
    assert float(terms[torch.bfloat16]["distill"]) == pytest.approx(float(terms[torch.float32]["distill"]), rel=0.02)
    assert float(terms[torch.bfloat16]["distill"]) != float(terms[torch.float32]["distill"])  # bf16 did run


@pytest.mark.parametrize(
    ("setting", "native", "cap", "expected"),
    [
        ("float32", True, None, torch.float32),
        ("bfloat16", False, None, torch.bfloat16),
        ("auto", True, None, torch.bfloat16),
        ("auto", False, None, torch.float32),
        ("auto", True, "AVX2", torch.float32),  # oneDNN capped below its bf16 kernels: emulated, slow
        ("auto", True, "avx512_core_bf16", torch.bfloat16),
        ("auto", True, "AVX512_CORE_AMX", torch.bfloat16),
    ],
)
def test_teacher_dtype_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch, setting, native, cap, expected):
    from manidp_cli.training import precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert precision.teacher_dtype(setting, torch.device("cpu")) == expected


def test_teacher_dtype_auto_on_a_gpu_follows_its_bf16_support(monkeypatch):
    from manidp_cli.training import precision

    for supported, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert precision.teacher_dtype("auto", torch.device("cuda")) == expected


def test_a_prune_run_records_its_teacher_dtype(tiny_fashion, dense_weights, tmp_path):
    """loss.teacher_dtype is a recipe setting: validated, saved in the run's recipe, and what it
    resolved to on this machine is in the export's metadata."""
    from manidp_cli.errors import RecipeError

    overrides = {"loss": {"teacher_dtype": "bfloat16"}}
    result = prune_tiny(tmp_path / "run", tiny_fashion, weights=dense_weights, overrides=overrides)
    assert "teacher_dtype: bfloat16" in (tmp_path / "run" / "recipe.yaml").read_text()
    assert read_metadata(result.out_dir)["setup"]["teacher_bfloat16"] == 1.0
    with pytest.raises(RecipeError, match="teacher_dtype"):
        bad = {"loss": {"teacher_dtype": "fp8"}}
        prepare("prune", "test_resnet", weights=dense_weights, out_dir=tmp_path / "bad", overrides=bad)


class _TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8)
        self.conv, self.bn = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(torch.relu(self.stem_bn(self.stem(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_gate_grad_clip_bounds_every_step_of_the_gates(tiny_fashion, clip):
    """optimizer.gate_grad_clip: with plain SGD a step moves the gates by lr x their clipped gradient,
    so by at most lr x clip; unclipped, the same run moves them further. The network is not clipped."""
    from manidp_cli.core.gating import gates_of, insert_gates
    from manidp_cli.data import load_data
    from manidp_cli.training.engine import fit
    from manidp_cli.training.objectives import CrossEntropyObjective

    torch.manual_seed(0)
    model = _TwoConvs()  # a Sequential would call the gates' container as a layer
    gates = insert_gates(model, input_shape=(1, 32, 32))
    lr, steps = 0.1, []
    before = [torch.cat([p.detach().flatten() for p in gates.parameters()])]

    def moved(info):
        before.append(torch.cat([p.detach().flatten() for p in gates_of(model).parameters()]))
        steps.append(float((before[-1] - before[-2]).norm()))

    config = OptimizerConfig(lr=lr, momentum=0.0, weight_decay=0.0, min_lr=lr, gate_grad_clip=clip)
    fit(
        model,
        load_data(tiny_fashion),
        CrossEntropyObjective(),
        epochs=1,
        batch_size=16,
        optimizer_config=config,
        on_step=moved,
    )
    largest = max(steps)
    assert largest > 0
    assert (largest <= lr * 1e-3 * 1.01) == (clip is not None), largest  # float32 rounding of the moves


def test_gate_adam_steps_the_gates_by_their_learning_rate_and_the_network_by_sgd(tiny_fashion):
    """optimizer.gate_optimizer adam: Adam's first step moves every gate parameter that has a gradient
    by its learning rate (lr x gate_lr_scale) whatever the gradient's size, while the network's
    parameters take SGD's step, lr x their gradient."""
    from manidp_cli.core.gating import insert_gates, is_gate_key
    from manidp_cli.data import load_data
    from manidp_cli.training.engine import GateAdam, make_optimizer

    torch.manual_seed(0)
    model = _TwoConvs()
    insert_gates(model, input_shape=(1, 32, 32))
    config = OptimizerConfig(lr=0.1, momentum=0.0, weight_decay=0.0, gate_optimizer="adam", gate_lr_scale=0.02)
    optimizer = make_optimizer(model, config)
    assert isinstance(optimizer, GateAdam)
    for group in optimizer.param_groups:  # what the trainer's schedule does before each step
        group["lr"] = config.lr * group["lr_scale"]
    images, targets = next(iter(load_data(tiny_fashion).train.batches(16)))
    nn.functional.cross_entropy(model(images), targets).backward()
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    grads = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    optimizer.step()
    gate_moves = [(params[n] - before[n])[grads[n] != 0].abs() for n in grads if is_gate_key(n)]
    assert gate_moves and all(torch.allclose(m, torch.full_like(m, 0.1 * 0.02), rtol=1e-3) for m in gate_moves)
    network = [n for n in grads if not is_gate_key(n)]
    assert network and all(torch.allclose(params[n] - before[n], -0.1 * grads[n], atol=1e-7) for n in network)
