"""What the package layout promises: user errors vs bugs, shared helpers, typed results."""

from __future__ import annotations

import json

import pytest
from helpers import refuse_symbolic_batches, run_manidp
from torch import nn

from manidp_cli.api import evaluate_export
from manidp_cli.core.gating import GATE_PREFIX, is_gate_key
from manidp_cli.core.modes import eval_mode
from manidp_cli.runtime.slimming import SlimResult, save_static


def test_a_bug_keeps_its_traceback_and_exits_1():
    preamble = (
        "import manidp_cli.api\n"
        "def broken(*args, **kwargs):\n    raise RuntimeError('a bug in the library')\n"
        "manidp_cli.api.prepare = broken\n"
    )
    proc = run_manidp(["train", "test_resnet"], preamble=preamble)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: a bug in the library" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: internal error: this is a bug in manidp")


@pytest.mark.parametrize("debug", ["", "1"])
def test_a_user_error_is_one_line_unless_debugging(debug):
    proc = run_manidp(["prune", "resnet343", "--target-flops", "0.5"], env={"MANIDP_DEBUG": debug})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: unknown model 'resnet343'")
    if debug:
        assert "Traceback" in proc.stderr and "ModelError" in proc.stderr
    else:
        assert len(lines) == 1


@pytest.mark.parametrize("start_training", [True, False])
def test_eval_mode_restores_the_callers_mode_also_on_error(start_training):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train(start_training)
    with eval_mode(model):
        assert not model.training and not model[1].training
    assert model.training is start_training and model[1].training is start_training
    with pytest.raises(ValueError), eval_mode(model):
        raise ValueError
    assert model.training is start_training


def test_gate_keys():
    assert is_gate_key(f"{GATE_PREFIX}.layer1_0_conv1.fc2.bias")
    assert not is_gate_key("layer1.0.conv1.weight")
    assert not is_gate_key(f"{GATE_PREFIX}_other.weight")  # the prefix is a whole name component


@pytest.mark.parametrize("symbolic_fails", [False, True])
def test_static_export_says_which_batch_sizes_its_program_takes(tmp_path, monkeypatch, symbolic_fails):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()).eval()
    if symbolic_fails:
        refuse_symbolic_batches(monkeypatch)
    written = save_static(tmp_path / "static", SlimResult(model, {}, {}), (1, 8, 8), {"model": "test"}, {})
    metadata = json.loads((tmp_path / "static" / "manidp.json").read_text())
    assert metadata["program_batch"] == written.program_batch
    if symbolic_fails:
        assert written.program_batch.startswith("1 only (a symbolic batch did not export: ")
        assert "cannot trace a symbolic batch" in written.program_batch
    else:
        assert written.program_batch == "any from 1 to 4096"
    assert [p.name for p in written.files] == [
        "model.pt2",
        "model_slim.safetensors",
        "model.safetensors",
        "config.json",
        "manidp.json",
    ]


EVAL_KEYS = {
    "model",
    "source",
    "pruned",
    "data",
    "input_shape",
    "images",
    "top1",
    "top5",
    "loss",
    "flops_convention",
    "flops",
    "signature",
}


def test_eval_of_a_dense_export_is_a_typed_result(dense_weights):
    result = evaluate_export(dense_weights.parent, limit=16)
    assert not result.pruned and result.images == 16 and result.signature is None
    assert result.flops.mean == result.flops.dense and result.flops.ratio("p90") == 1.0
    out = result.to_dict()
    assert (
        set(out) == EVAL_KEYS and out["flops"]["mean_ratio"] == 1.0 and out["data"]["from"] == "the export's metadata"
    )
    json.dumps(out)  # what --json prints


def test_eval_of_a_pruned_export_has_the_same_keys(pruned):
    out = evaluate_export(pruned.out_dir, limit=16).to_dict()
    assert set(out) == EVAL_KEYS and out["pruned"] and out["input_shape"] == [1, 32, 32]
    assert set(out["signature"]) == {"spearman_loss_flops", "gram_correlation", "gram_batches"}
    assert 0 < out["flops"]["mean_ratio"] <= 1.01
