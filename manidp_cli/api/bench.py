"""``manidp bench``: time an export's dense, masked, dynamic (and static-slimmed) execution."""

from __future__ import annotations

from pathlib import Path

import torch

from manidp_cli.analysis.bench import BenchResult, bench_models, dense_twin
from manidp_cli.core.distributed import resolve_device
from manidp_cli.core.progress import ProgressCallback
from manidp_cli.errors import DataError, ManidpError, WeightsError
from manidp_cli.io import LoadedExport, load_pruned
from manidp_cli.runtime.execute import folded_model
from manidp_cli.runtime.slimming import load_static
from manidp_cli.runtime.static_l1 import require_torch_pruning, static_l1

BASELINES = ("static-l1",)
BENCH_IMAGES = 32  # evaluation images the batch-1 calls cycle through


def _evaluation_images(info: LoadedExport, img_size: int | None, count: int) -> tuple[torch.Tensor | None, str]:
    """Real images for a trained network's decisions: the export's evaluation images, or None
    (random images) when its data cannot be read here, with what was used."""
    try:
        data, _ = info.load_data(None, img_size)
    except DataError as exc:
        return None, f"random images (the export's data is not readable here: {exc})"
    images = next(iter(data.eval.batches(count)))[0]
    return images, f"{len(images)} evaluation images of {data.spec}"


def bench_export(
    path: str | Path,
    *,
    runs: int = 50,
    warmup: int = 10,
    batch_size: int = 32,
    threads: int | None = None,
    static_dir: str | Path | None = None,
    img_size: int | None = None,
    device: str = "cpu",
    baseline: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> BenchResult:
    """``manidp bench`` of an export at the input size recorded in it, or at ``img_size`` px, on
    ``device`` (cpu by default: the speed the project measures is the CPU's, docs/speed.md).
    ``baseline="static-l1"`` also times Torch-Pruning's L1 network at the export's measured FLOPs
    ratio, pruned from the export's own weights (variant "torch_pruning"; timing only, not trained)."""
    if baseline is not None and baseline not in BASELINES:
        raise ManidpError(f"--baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if baseline is not None:
        require_torch_pruning()  # a missing package is said before any work
    target = resolve_device(device)
    # the static network is rebuilt from its weights and config, never unpickled from model.pt2
    static, static_config = load_static(static_dir) if static_dir else (None, None)
    gated, info = load_pruned(path)
    shape = (info.input_shape[0], img_size, img_size) if img_size else info.input_shape
    if static_config is not None and static_config["input_shape"] != shape:
        raise WeightsError(f"--static {static_dir} takes {static_config['input_shape']} images, not {shape}")
    dense = dense_twin(gated, info.metadata["model"], info.metadata["model_kwargs"])
    static = folded_model(static, shape) if static is not None else None
    extra_static = {}
    if baseline is not None:
        ratio = info.metadata.get("flops", {}).get("mean_ratio")
        if ratio is None:
            raise WeightsError(f"{info.path} records no measured FLOPs ratio: --baseline needs a pruned export")
        extra_static["torch_pruning"] = folded_model(static_l1(dense, ratio, shape).model, shape)
    images, inputs = _evaluation_images(info, img_size, max(batch_size, BENCH_IMAGES))
    result = bench_models(
        gated,
        dense,
        shape,
        runs=runs,
        warmup=warmup,
        batch_size=batch_size,
        threads=threads,
        static=static,
        extra_static=extra_static,
        images=images,
        device=target,
        on_progress=on_progress,
    )
    result.inputs = inputs
    result.model = info.metadata["model"]
    result.export = str(info.path)
    result.flops_ratio = info.metadata.get("flops", {}).get("mean_ratio")
    return result
