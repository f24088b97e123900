"""``export-static --onnx``: model.onnx agrees with PyTorch when onnxruntime runs it, a disagreement
or a missing package is one line, and --json stays pure JSON."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import refuse_symbolic_batches, run_manidp
from torch import nn

from manidp_cli.api import export_static
from manidp_cli.errors import ExportError
from manidp_cli.runtime.onnx_export import check_onnx, export_onnx
from manidp_cli.runtime.slimming import SlimResult, save_static

INSTALL = "pip install 'manidp[onnx]'"


@pytest.fixture(scope="module")
def onnx_export(pruned, tmp_path_factory):
    """``manidp export-static --onnx --json`` as a user runs it: the folder and the process."""
    out = tmp_path_factory.mktemp("onnx") / "static"
    args = ["export-static", pruned.out_dir, "--out", out, "--calibration-images", "64", "--onnx", "--json"]
    return out, run_manidp(args)


def test_json_output_is_only_json(onnx_export):
    out, proc = onnx_export
    assert proc.returncode == 0, proc.stderr
    tool = subprocess.run([sys.executable, "-m", "json.tool"], input=proc.stdout, capture_output=True, text=True)
    assert tool.returncode == 0, tool.stderr
    result = json.loads(proc.stdout)
    assert str(out / "model.onnx") in result["files"]
    check = result["onnx"]
    assert check["batch_sizes"] == [8, 1] and 0 <= check["max_abs_diff"] <= check["tolerance"] <= 1e-3
    assert check["onnxruntime"] == onnxruntime.__version__ and check["opset"] >= 17
    assert json.loads((out / "manidp.json").read_text())["onnx"] == check


def test_onnxruntime_agrees_with_the_torch_program(onnx_export):
    out, _ = onnx_export
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    program = torch.export.load(str(out / "model.pt2")).module()  # our own, trusted file
    for batch in (3, 1):
        images = torch.randn(batch, 1, 32, 32)
        (logits,) = session.run(["logits"], {"images": images.numpy()})
        with torch.no_grad():
            expected = program(images).numpy()
        assert logits.shape == (batch, 10) and float(np.abs(logits - expected).max()) <= 1e-4


def tiny_result() -> SlimResult:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    return SlimResult(model.eval(), {}, {})


def test_a_program_of_batch_1_gives_an_onnx_file_of_batch_1(tmp_path, monkeypatch):
    refuse_symbolic_batches(monkeypatch)
    written = save_static(tmp_path / "s", tiny_result(), (1, 8, 8), {}, {}, onnx_images=torch.randn(3, 1, 8, 8))
    assert written.onnx.batch_sizes == (1, 1, 1)  # each image alone
    model = onnx.load(str(tmp_path / "s" / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_an_onnx_file_that_disagrees_is_refused(tmp_path):
    result = tiny_result()
    program = torch.export.export(result.model, (torch.zeros(1, 1, 8, 8),))  # batch 1 only
    exported = export_onnx(program)
    images = torch.randn(2, 1, 8, 8)
    assert check_onnx(exported, result.model, images, batch_dynamic=False).max_abs_diff <= 1e-5
    with torch.no_grad():
        result.model[-1].bias.add_(0.5)  # PyTorch's model no longer is the one exported
    with pytest.raises(ExportError, match=r"model.onnx disagrees with PyTorch: .* differ by up to 0.5"):
        check_onnx(exported, result.model, images, batch_dynamic=False)


def test_a_failed_check_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("manidp_cli.runtime.onnx_export.RELATIVE_TOLERANCE", -1.0)  # no file can pass
    with pytest.raises(ExportError, match="nothing was written"):
        save_static(tmp_path / "s", tiny_result(), (1, 8, 8), {}, {}, onnx_images=torch.randn(2, 1, 8, 8))
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging folder


def test_missing_onnxruntime_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="--onnx needs onnxruntime") as raised:
        export_static(tmp_path / "no-such-export", out, onnx=True)  # not even the export is read
    assert INSTALL in str(raised.value) and not out.exists()
    proc = run_manidp(
        ["export-static", tmp_path / "no-such-export", "--out", out, "--onnx", "--json"],
        preamble="sys.modules['onnxruntime'] = None",
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --onnx needs onnxruntime") and INSTALL in lines[0]
    assert not out.exists()
