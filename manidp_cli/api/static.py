"""``manidp export-static``: slim an export on calibration images, measure it, write it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from manidp_cli.analysis.evaluation import evaluate
from manidp_cli.core.flops import count_flops
from manidp_cli.errors import ManidpError, TargetError
from manidp_cli.files import check_new_folder
from manidp_cli.io import load_pruned, timm_config
from manidp_cli.runtime.onnx_export import OnnxCheck, require_onnx
from manidp_cli.runtime.slimming import mask_statistics, save_static, slim

LOAD_HINT = "torch.export.load('model.pt2').module()"
TIMM_LOAD_HINT = "timm.create_model('local-dir:FOLDER', pretrained=True)"
ONNX_CHECK_IMAGES = 8  # evaluation images run through onnxruntime and PyTorch


@dataclass(frozen=True)
class StaticExport:
    """What ``export-static`` wrote and measured; ``to_dict()`` is manidp.json plus ``files``."""

    model: str
    model_kwargs: dict[str, Any]
    input_shape: list[int]
    source_export: str
    min_keep_rate: float
    calibration: dict[str, Any]
    channels_removed: dict[str, int]
    channels_kept: dict[str, int]
    dense_flops: int
    flops_ratio_to_original: float
    accuracy: dict[str, Any]
    gated_accuracy: dict[str, Any] | None
    load: str = LOAD_HINT
    timm_load: str = TIMM_LOAD_HINT
    program_batch: str = ""
    onnx: OnnxCheck | None = None
    files: tuple[str, ...] = ()

    def metadata(self) -> dict[str, Any]:
        """The fields written to manidp.json (``save_static`` adds program_batch and onnx)."""
        return {key: value for key, value in asdict(self).items() if key not in ("files", "program_batch", "onnx")}

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.metadata(),
            "program_batch": self.program_batch,
            "onnx": self.onnx.to_dict() if self.onnx else None,
            "files": list(self.files),
        }


def export_static(
    path: str | Path,
    out_dir: str | Path,
    min_keep_rate: float = 0.0,
    data: str | None = None,
    calibration_images: int = 1024,
    batch_size: int = 256,
    onnx: bool = False,
) -> StaticExport:
    """Slim the export at ``path`` (channels kept by at most ``min_keep_rate`` of the calibration
    images removed, masks folded into BatchNorm), measure it, and write it into ``out_dir``; with
    ``onnx`` also model.onnx, checked against PyTorch on a few evaluation images."""
    if onnx:
        require_onnx()  # a missing package is said before any work
    if not 0 <= min_keep_rate < 1:
        raise TargetError(f"--min-keep-rate must be in [0, 1), got {min_keep_rate}")
    out_dir = check_new_folder(Path(out_dir), "--out", source=Path(path).expanduser())
    model, info = load_pruned(path)
    if not info.gated:
        raise ManidpError(f"{path} is a dense export: nothing to slim")
    meta = info.metadata
    images, _ = info.load_data(data)
    batches = [x for x, _ in images.train.batches(batch_size, limit=calibration_images)]
    frequency, mean_mask = mask_statistics(model, batches)
    result = slim(model, frequency, mean_mask, min_keep_rate, info.input_shape)
    flops = count_flops(result.model, info.input_shape).total_flops
    accuracy = evaluate(result.model, images.eval, batch_size)
    measured = StaticExport(
        model=meta["model"],
        model_kwargs=meta["model_kwargs"],
        input_shape=list(info.input_shape),
        source_export=str(info.path),
        min_keep_rate=min_keep_rate,
        calibration={"data": images.spec, "split": "train", "images": sum(len(b) for b in batches)},
        channels_removed=result.removed,
        channels_kept=result.kept_channels,
        dense_flops=flops,
        flops_ratio_to_original=flops / meta["dense_flops"],
        accuracy=accuracy.summary(),
        gated_accuracy=meta.get("accuracy"),
    )
    onnx_images = next(iter(images.eval.batches(ONNX_CHECK_IMAGES)))[0] if onnx else None
    config = timm_config(result.model, images.data_config, images.classes)
    written = save_static(out_dir, result, info.input_shape, measured.metadata(), config, onnx_images)
    return replace(
        measured,
        program_batch=written.program_batch,
        onnx=written.onnx,
        files=tuple(str(f) for f in written.files),
    )
