"""``manidp export-static``: slim an export on calibration images, measure it, write it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from manidp_cli.analysis.evaluation import evaluate
from manidp_cli.core.distributed import World, resolve_device
from manidp_cli.core.flops import count_flops
from manidp_cli.core.progress import ProgressCallback, reported
from manidp_cli.data import LoaderSettings
from manidp_cli.errors import ManidpError, TargetError
from manidp_cli.files import check_new_folder
from manidp_cli.inputs import DEFAULT_WORKERS
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
    # BatchNorm name -> the places of its kept channels in the full-width output (slimming.SCATTERED)
    scattered_channels: dict[str, list[int]]
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
    *,
    img_size: int | None = None,
    workers: int = DEFAULT_WORKERS,
    device: str = "auto",
    on_progress: ProgressCallback | None = None,
) -> StaticExport:
    """Slim the export at ``path`` (channels kept by at most ``min_keep_rate`` of the calibration
    images removed, masks folded into BatchNorm), measure it, and write it into ``out_dir``; with
    ``onnx`` also model.onnx, checked against PyTorch on a few evaluation images. Images come at
    the export's input size unless ``img_size`` asks for another (the static model is then written
    for that size); calibration and evaluation run on ``device``."""
    if onnx:
        require_onnx()  # a missing package is said before any work
    if not 0 <= min_keep_rate < 1:
        raise TargetError(f"--min-keep-rate must be in [0, 1), got {min_keep_rate}")
    target = resolve_device(device)
    out_dir = check_new_folder(Path(out_dir), "--out", source=Path(path).expanduser())
    model, info = load_pruned(path)
    if not info.gated:
        raise ManidpError(f"{path} is a dense export: nothing to slim")
    meta = info.metadata
    images, _ = info.load_data(data, img_size, LoaderSettings.for_device(workers, target))
    shape = images.input_shape
    model.to(target)
    calibration = images.train.batches(batch_size, limit=calibration_images)
    total = images.train.num_batches(batch_size, calibration_images)
    batches = (x.to(target) for x, _ in reported(calibration, "calibrating", total, on_progress))
    frequency, mean_mask = mask_statistics(model, batches)
    result = slim(model, frequency, mean_mask, min_keep_rate, shape)
    flops = count_flops(result.model, shape).total_flops
    original = meta["dense_flops"] if shape == info.input_shape else count_flops(model, shape).dense_flops
    accuracy = evaluate(result.model, images.eval, batch_size, world=World(device=target), on_progress=on_progress)
    result.model.cpu()  # the program is exported for the CPU, whatever measured it
    measured = StaticExport(
        model=meta["model"],
        model_kwargs=meta["model_kwargs"],
        input_shape=list(shape),
        source_export=str(info.path),
        min_keep_rate=min_keep_rate,
        calibration={"data": images.spec, "split": "train", "images": min(calibration_images, len(images.train))},
        channels_removed=result.removed,
        channels_kept=result.kept_channels,
        scattered_channels=result.scattered,
        dense_flops=flops,
        flops_ratio_to_original=flops / original,
        accuracy=accuracy.summary(),
        gated_accuracy=meta.get("accuracy"),
    )
    onnx_images = next(iter(images.eval.batches(ONNX_CHECK_IMAGES)))[0] if onnx else None
    config = timm_config(result.model, images.data_config, images.classes)
    written = save_static(out_dir, result, shape, measured.metadata(), config, onnx_images)
    return replace(
        measured,
        program_batch=written.program_batch,
        onnx=written.onnx,
        files=tuple(str(f) for f in written.files),
    )
