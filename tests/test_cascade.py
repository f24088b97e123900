"""Escalation cascades: the threshold meets its FLOPs target, the reported figures are cross-fitted,
the runtime module answers as the evaluation assumed, and ``manidp eval --escalate-to`` says what
is wrong in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_manidp
from torch import nn

from manidp_cli.analysis.cascade import MemberOutputs, evaluate_cascade, fit_threshold
from manidp_cli.api import START, evaluate_cascade_exports, evaluate_cascade_file
from manidp_cli.api.cascade import _check_members
from manidp_cli.errors import ManidpError, WeightsError
from manidp_cli.io import LoadedExport, load_cascade_file, load_pruned, read_metadata
from manidp_cli.models.start import HUB_START, RANDOM_START, StartFile, build_start
from manidp_cli.runtime.cascade import Cascade, load_cascade


def _members(images: int = 40, seed: int = 0) -> tuple[MemberOutputs, MemberOutputs]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (images,), generator=generator)
    narrow = torch.randn(images, 3, generator=generator).softmax(1)
    wide = torch.randn(images, 3, generator=generator).softmax(1)
    narrow_flops = 1.0 + torch.rand(images, generator=generator, dtype=torch.float64)  # per image, as gates give
    return MemberOutputs(narrow, labels, narrow_flops), MemberOutputs(wide, labels, torch.full((images,), 3.0))


def _mean_cost(narrow: MemberOutputs, wide: MemberOutputs, images: torch.Tensor, threshold: float) -> float:
    escalated = narrow.confidence[images] < threshold
    return float((narrow.flops[images] + wide.flops[images] * escalated).mean())


@pytest.mark.parametrize("target", [1.6, 2.0, 2.9])
def test_the_threshold_spends_the_target_and_one_more_image_would_exceed_it(target):
    narrow, wide = _members()
    every = torch.arange(40)
    threshold = fit_threshold(narrow, wide, target, every)
    assert _mean_cost(narrow, wide, every, threshold) <= target
    next_image = narrow.confidence[narrow.confidence >= threshold].min()
    assert _mean_cost(narrow, wide, every, float(next_image) + 1e-6) > target


def test_thresholds_at_the_ends_escalate_nothing_or_everything():
    narrow, wide = _members()
    every = torch.arange(40)
    assert fit_threshold(narrow, wide, float(narrow.flops.mean()) - 0.01, every) == 0.0
    everything = fit_threshold(narrow, wide, float(narrow.flops.mean()) + 3.0, every)
    assert bool((narrow.confidence < everything).all())


def test_each_half_is_judged_by_the_threshold_fitted_on_the_other_half():
    narrow, wide = _members(images=41, seed=3)
    result = evaluate_cascade(narrow, wide, 2.2)
    positions = torch.arange(41)
    escalate = torch.zeros(41, dtype=torch.bool)
    for fold, threshold in enumerate(result.fold_thresholds):
        held_out = positions % 2 == fold
        assert threshold == fit_threshold(narrow, wide, 2.2, positions[~held_out])
        escalate[held_out] = narrow.confidence[held_out] < threshold
    expected = torch.where(escalate, wide.correct, narrow.correct).float().mean()
    assert result.top1 == pytest.approx(float(expected))
    assert result.mean_flops == pytest.approx(float((narrow.flops + 3.0 * escalate).mean()))
    assert result.escalated_share == pytest.approx(float(escalate.float().mean()))
    assert result.threshold == fit_threshold(narrow, wide, 2.2, positions)


def test_spending_on_the_unsure_images_correlates_loss_with_flops():
    labels = torch.zeros(6, dtype=torch.long)
    # the narrow network is unsure of, and wrong on, the last three images; the wide one is right on all
    narrow = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.85, 0.15], [0.4, 0.6], [0.45, 0.55], [0.3, 0.7]])
    wide = torch.tensor([[0.7, 0.3]] * 6)
    same_cost = MemberOutputs(narrow, labels, torch.ones(6, dtype=torch.float64))
    result = evaluate_cascade(same_cost, MemberOutputs(wide, labels, torch.full((6,), 4.0)), 1.0 + 4.0 * 3 / 6)
    assert result.escalated_share > 0
    assert result.spearman_loss_flops is not None and result.spearman_loss_flops > 0
    nothing_escalated = evaluate_cascade(same_cost, MemberOutputs(wide, labels, torch.full((6,), 4.0)), 1.0)
    assert nothing_escalated.escalated_share == 0
    assert nothing_escalated.spearman_loss_flops is None  # every image cost the same


class _Counting(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.seen: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows = images[:, 0, 0, 0].long()
        self.seen += rows.tolist()
        return self.logits[rows]


def test_the_runtime_cascade_runs_the_wide_network_on_the_unsure_images_only():
    narrow_logits = torch.tensor([[5.0, 0.0], [0.1, 0.0], [0.0, 6.0], [0.0, 0.2]])
    wide_logits = torch.tensor([[0.0, 1.0], [0.0, 2.0], [3.0, 0.0], [4.0, 0.0]])
    narrow, wide = _Counting(narrow_logits), _Counting(wide_logits)
    images = torch.arange(4.0).reshape(4, 1, 1, 1)
    out = Cascade(narrow, wide, threshold=0.9)(images)
    assert wide.seen == [1, 3] and narrow.seen == [0, 1, 2, 3]
    assert torch.equal(out, torch.stack([narrow_logits[0], wide_logits[1], narrow_logits[2], wide_logits[3]]))


def test_eval_of_a_cascade_from_a_pruned_export_to_its_dense_start(pruned, dense_weights):
    wide = Path(dense_weights).parent
    narrow_alone = pruned.after.flops.mean_ratio
    result = evaluate_cascade_exports(pruned.out_dir, wide, target_flops=narrow_alone + 0.25, batch_size=16)
    assert result.images == 64 and result.narrow.flops_ratio == pytest.approx(narrow_alone)
    assert result.narrow.top1 == pytest.approx(pruned.after.top1)
    assert result.wide.flops_ratio == pytest.approx(1.0)
    # cross-fitted on 32 images a half, the spend can pass the target by about one wide image per half
    assert narrow_alone < result.flops_ratio <= narrow_alone + 0.25 + 1.0 / 32
    assert 0 < result.cascade.escalated_share < 1
    # the runtime module with the deployed threshold answers as the members' outputs say it would
    narrow_model, info = load_pruned(pruned.out_dir)
    wide_model, _ = load_pruned(wide)
    images, _ = info.load_data(None)
    x, _ = next(images.eval.batches(64))
    cascade = Cascade(narrow_model, wide_model, result.cascade.threshold).eval()
    with torch.no_grad():
        narrow_logits, wide_logits, out = narrow_model(x), wide_model(x), cascade(x)
    unsure = narrow_logits.softmax(1).max(1).values < result.cascade.threshold
    expected = torch.where(unsure, wide_logits.argmax(1), narrow_logits.argmax(1))
    assert torch.equal(out.argmax(1), expected) and 0 < int(unsure.sum()) < 64


def test_eval_cascade_json_and_its_errors(pruned, dense_weights):
    wide = str(Path(dense_weights).parent)
    ok = run_manidp(["eval", pruned.out_dir, "--escalate-to", wide, "--target-flops", "0.9", "--json"])
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["cascade"]["cross_fitted"] and result["target_flops"] == 0.9
    assert result["narrow"]["flops_ratio"] < result["cascade"]["flops_ratio"]
    for args, message in (
        (["--escalate-to", wide], "needs an EXPORT, --escalate-to WIDE_EXPORT (or --escalate-to-start) and"),
        (["--escalate-to", wide, "--escalate-to-start", "--target-flops", "0.9"], "not both"),
        (["--escalate-to", wide, "--target-flops", "3"], "--target-flops 3.0 is outside what this cascade can spend"),
        (["--target-flops", "0.5", "--dynamic"], "--dynamic times one export"),
    ):
        proc = run_manidp(["eval", pruned.out_dir, *args])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and message in lines[-1], proc.stderr
        assert not any("Traceback" in line for line in lines)


def test_members_of_different_networks_are_refused():
    narrow = LoadedExport(Path("a"), {"model": "resnet18", "model_kwargs": {"num_classes": 10, "in_chans": 1}})
    wide = LoadedExport(Path("b"), {"model": "resnet34", "model_kwargs": {"num_classes": 10, "in_chans": 1}})
    with pytest.raises(ManidpError, match="its architecture .resnet34. differ"):
        _check_members(narrow, wide)
    other_classes = LoadedExport(Path("c"), {"model": "resnet18", "model_kwargs": {"num_classes": 5, "in_chans": 1}})
    with pytest.raises(ManidpError, match="classes and input channels"):
        _check_members(narrow, other_classes)


def test_a_saved_cascade_is_one_file_that_answers_as_evaluated(pruned, dense_weights, tmp_path):
    wide = Path(dense_weights).parent
    file = tmp_path / "cascade.safetensors"
    fitted = evaluate_cascade_exports(pruned.out_dir, wide, target_flops=0.9, batch_size=16, save_to=file)
    assert fitted.saved_to == str(file) and file.is_file()
    narrow_model, info = load_pruned(pruned.out_dir)
    wide_model, _ = load_pruned(wide)
    x, y = next(info.load_data(None)[0].eval.batches(64))
    with torch.no_grad():
        expected = Cascade(narrow_model, wide_model, fitted.cascade.threshold).eval()(x)
        assert torch.equal(load_cascade(file)(x), expected)
    saved = evaluate_cascade_file(file, batch_size=16)
    assert saved.cascade.threshold == fitted.cascade.threshold and not saved.cascade.cross_fitted
    assert saved.cascade.top1 == pytest.approx(float((expected.argmax(1) == y).float().mean()))
    assert saved.narrow.top1 == fitted.narrow.top1 and saved.wide.top1 == fitted.wide.top1
    assert saved.target_flops == 0.9 and 0 < saved.cascade.escalated_share < 1


def test_a_cascade_file_with_a_bad_threshold_is_refused(tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "bad.safetensors"
    save_file({"narrow.w": torch.zeros(1)}, str(file), metadata={"manidp_cascade": json.dumps({"threshold": 7})})
    with pytest.raises(ManidpError, match="needs a 'threshold' from 0 to 2 and a 'fitted' object"):
        load_cascade_file(file)


def test_eval_saves_and_reads_a_cascade_and_other_commands_say_what_it_is(pruned, dense_weights, tmp_path):
    wide, file = str(Path(dense_weights).parent), str(tmp_path / "c.safetensors")
    fit = ["eval", pruned.out_dir, "--escalate-to", wide, "--target-flops", "0.9", "--save-cascade", file, "--json"]
    ok = run_manidp(fit)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["saved_to"] == file
    again = run_manidp(["eval", file, "--json"])
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["cascade"]["threshold"] == json.loads(ok.stdout)["cascade"]["threshold"]
    assert result["cascade"]["cross_fitted"] is False
    for args, message in (
        (fit, "already exists: give a new file name"),
        (["eval", file, "--escalate-to", wide, "--target-flops", "0.9"], "is a saved cascade: eval takes it alone"),
        (["report", file], "is a cascade of two exports"),
        (["prune", "test_resnet", "--weights", file, "--out", str(tmp_path / "p")], "is a cascade of two networks"),
        (["eval", pruned.out_dir, "--save-cascade", str(tmp_path / "d")], "needs an EXPORT, --escalate-to"),
    ):
        proc = run_manidp(args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and message in lines[-1], proc.stderr
        assert not any("Traceback" in line for line in lines)


def test_escalating_to_the_start_is_escalating_to_the_export_it_was_pruned_from(pruned, dense_weights, tmp_path):
    recorded = read_metadata(pruned.out_dir)["start_file"]
    assert recorded == StartFile.of(dense_weights).to_dict() and Path(recorded["path"]).is_absolute()
    file = tmp_path / "to-start.safetensors"
    to_start = evaluate_cascade_exports(pruned.out_dir, START, target_flops=0.9, batch_size=16, save_to=file)
    to_export = evaluate_cascade_exports(pruned.out_dir, Path(dense_weights).parent, target_flops=0.9, batch_size=16)
    assert to_start.wide.top1 == to_export.wide.top1 and to_start.wide.flops_ratio == to_export.wide.flops_ratio
    assert to_start.cascade == to_export.cascade and str(dense_weights) in to_start.wide.source
    narrow_model, info = load_pruned(pruned.out_dir)
    x, _ = next(info.load_data(None)[0].eval.batches(64))
    with torch.no_grad():
        expected = Cascade(narrow_model, load_pruned(Path(dense_weights).parent)[0], to_start.cascade.threshold)(x)
        assert torch.equal(load_cascade(file).eval()(x), expected)
    proc = run_manidp(["eval", pruned.out_dir, "--escalate-to-start", "--target-flops", "0.9", "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cascade"]["top1"] == to_start.cascade.top1
    # a dense run from random weights has no start: one line, exit 2
    dense = run_manidp(["eval", str(Path(dense_weights).parent), "--escalate-to-start", "--target-flops", "1.5"])
    lines = dense.stderr.strip().splitlines()
    assert dense.returncode == 2 and "started from random weights" in lines[-1], dense.stderr
    assert not any("Traceback" in line for line in lines)


def test_a_pretrained_start_is_built_again_when_it_answered_these_classes(dense_weights):
    # a train export is a timm local-dir: model whose pretrained weights answer its 10 classes (offline)
    start = build_start(f"local-dir:{Path(dense_weights).parent}", 10, 1, HUB_START, None)
    dense, _ = load_pruned(Path(dense_weights).parent)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(start(x), dense(x))


def test_a_start_that_cannot_be_found_again_is_refused_with_what_to_give_instead(dense_weights, tmp_path):
    copy = tmp_path / "start.safetensors"
    copy.write_bytes(Path(dense_weights).read_bytes())
    recorded = StartFile.of(copy)
    assert build_start("test_resnet", 10, 1, str(copy), recorded) is not None
    copy.write_bytes(copy.read_bytes() + b" ")  # replaced since the run began
    cases = (
        (str(copy), recorded, "has changed since this export was pruned from it"),
        (str(copy), StartFile(str(tmp_path / "gone.safetensors"), recorded.sha256), "is gone"),
        (HUB_START, None, "whose 1000-class classifier was replaced by a new 10-class one"),
        (RANDOM_START, None, "started from random weights"),
        ("runs/elsewhere/model.safetensors", None, "is not found from here"),
    )
    for source, start_file, message in cases:
        with pytest.raises(WeightsError, match=message) as caught:
            build_start("test_resnet", 10, 1, source, start_file)
        assert "give --escalate-to a dense export of the start instead" in str(caught.value)


@pytest.mark.parametrize("wide_top1, noted", [(0.80, True), (0.90, False)])
def test_eval_says_when_the_wide_member_cannot_help(capsys, wide_top1, noted):
    from manidp_cli.api.cascade import CascadeResult, MemberResult
    from manidp_cli.api.evaluate import DataSource
    from manidp_cli.cli.evaluate import _print_cascade

    narrow, wide = MemberResult("narrow", 0.85, 0.45), MemberResult("wide", wide_top1, 1.0)
    cascade = evaluate_cascade(*_members(), target_flops=2.5)
    data = DataSource("embedded", "demo images", "eval", "--data")
    _print_cascade(CascadeResult("resnet18", data, 40, 100, 0.5, narrow, wide, cascade))
    assert ("escalating cannot help" in capsys.readouterr().out) == noted
