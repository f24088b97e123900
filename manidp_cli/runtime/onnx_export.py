"""ONNX export of a static (gate-free) network, checked by running it with onnxruntime.

The ``torch.export`` program that ``model.pt2`` holds is translated by ``torch.onnx.export`` (its
torch.export-based exporter, which needs onnxscript), so both files are one graph; onnxruntime then
runs the ONNX file on a few images and its outputs are compared with PyTorch's.

Example::

    require_onnx()  # before any work: ExportError naming `pip install 'manidp[onnx]'`
    onnx_model = export_onnx(program)
    check = check_onnx(onnx_model, model, images, batch_dynamic=True)
    check.max_abs_diff
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from manidp_cli.core.modes import eval_mode
from manidp_cli.errors import ExportError
from manidp_cli.inputs import exception_text

ONNX_FILE = "model.onnx"
INSTALL_HINT = "pip install 'manidp[onnx]'"
REQUIRED_MODULES = ("onnx", "onnxscript", "onnxruntime")  # the exporter needs the first two
# float32 rounding through a network, relative to the largest |logit| (at least 1): other kernels
# sum in another order; a wrong translation is off by far more
RELATIVE_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def require_onnx() -> None:
    """Raise ExportError, one line naming the extra, unless every package --onnx needs imports."""
    missing = []
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"--onnx needs {', '.join(missing)}, which cannot be imported: {INSTALL_HINT}")


@dataclass(frozen=True)
class OnnxCheck:
    """onnxruntime's outputs against PyTorch's on the same images."""

    images: int
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    tolerance: float
    opset: int
    onnxruntime: str  # its version

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "batch_sizes": list(self.batch_sizes)}


def _name_batch_axis(proto) -> None:
    """The exporter names a symbolic batch after torch's size symbol (``s77``): call it ``batch``."""
    graph = proto.graph
    symbols = {value.type.tensor_type.shape.dim[0].dim_param for value in graph.input} - {""}
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = "batch"


@dataclass(frozen=True)
class OnnxModel:
    data: bytes  # the serialized ModelProto
    opset: int


def export_onnx(program: torch.export.ExportedProgram) -> OnnxModel:
    """The ONNX model of ``program``: input ``images``, output ``logits``, the batch axis as in the program."""
    try:
        exported = torch.onnx.export(
            program, dynamo=True, verbose=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME]
        )
    except Exception as exc:  # an operator without an ONNX translation, for one
        raise ExportError(f"torch.onnx.export failed: {exception_text(exc)}") from exc
    proto = exported.model_proto
    _name_batch_axis(proto)
    opset = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), 0)
    return OnnxModel(proto.SerializeToString(), opset)


def check_onnx(onnx_model: OnnxModel, model: nn.Module, images: torch.Tensor, batch_dynamic: bool) -> OnnxCheck:
    """Run ``onnx_model`` with onnxruntime on ``images`` (as one batch and the first alone when the
    batch is dynamic, else one by one) and compare with ``model``; ExportError beyond the tolerance."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_model.data, providers=["CPUExecutionProvider"])
    batches = [images, images[:1]] if batch_dynamic else list(images.split(1))
    worst, scale = 0.0, 1.0
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            expected = model(batch).float()
            (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
            worst = max(worst, float((torch.from_numpy(got) - expected).abs().max()))
            scale = max(scale, float(expected.abs().max()))
    tolerance = RELATIVE_TOLERANCE * scale
    if not worst <= tolerance:  # NaN fails too
        raise ExportError(
            f"model.onnx disagrees with PyTorch: onnxruntime's outputs differ by up to {worst:.3g} on "
            f"{len(images)} images (tolerance {tolerance:.3g}); nothing was written"
        )
    sizes = tuple(len(batch) for batch in batches)
    return OnnxCheck(len(images), sizes, worst, tolerance, onnx_model.opset, onnxruntime.__version__)
