"""``manidp bench``: time an export's dense, masked, dynamic (and static-slimmed) execution."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from manidp_cli.analysis.bench import BenchResult, bench_models, dense_twin
from manidp_cli.core.distributed import resolve_device
from manidp_cli.core.progress import ProgressCallback
from manidp_cli.data import ImageData
from manidp_cli.errors import DataError, ManidpError, TargetError, WeightsError
from manidp_cli.io import LoadedExport, load_pruned
from manidp_cli.runtime.execute import folded_model
from manidp_cli.runtime.slimming import load_static, mask_statistics, slim
from manidp_cli.runtime.static_l1 import require_torch_pruning, static_l1

BASELINES = ("static-l1",)
BENCH_IMAGES = 32  # evaluation images the batch-1 calls cycle through
DEFAULT_STATIC_KEEP_RATE = 0.5  # the in-memory static export removes channels at most half the images keep
STATIC_CALIBRATION_IMAGES = 1024  # as export-static's default
AGREEMENT_IMAGES = 256  # evaluation images the static export's top-1 is compared on


def _bench_inputs(
    info: LoadedExport, img_size: int | None, count: int
) -> tuple[ImageData | None, torch.Tensor | None, str]:
    """The export's data and ``count`` of its evaluation images (a trained network's decisions need
    real images), or None for both (random images) when the data cannot be read here; with what
    was used, in words."""
    try:
        data, _ = info.load_data(None, img_size)
    except DataError as exc:
        return None, None, f"random images (the export's data is not readable here: {exc})"
    images = next(iter(data.eval.batches(count)))[0]
    return data, images, f"{len(images)} evaluation images of {data.spec}"


def static_export_in_memory(
    gated: nn.Module, data: ImageData, shape: tuple[int, int, int], keep_rate: float
) -> tuple[nn.Module, str]:
    """The network ``manidp export-static --min-keep-rate keep_rate`` would write (calibrated on the
    same training images), and the advice to give when it is the fastest variant: with how often its
    top-1 agrees with the gated model's on up to ``AGREEMENT_IMAGES`` evaluation images
    (export-static measures its accuracy)."""
    calibration = (x for x, _ in data.train.batches(256, limit=STATIC_CALIBRATION_IMAGES))
    frequency, mean_mask = mask_statistics(gated, calibration)
    network = slim(gated, frequency, mean_mask, keep_rate, shape).model
    agreed = compared = 0
    with torch.no_grad():
        for images, _ in data.eval.batches(64, limit=AGREEMENT_IMAGES):
            agreed += int((gated(images).argmax(1) == network(images).argmax(1)).sum())
            compared += len(images)
    advice = (
        f"use a static export (manidp export-static --min-keep-rate {keep_rate:g}): it is the fastest variant "
        f"here, and its top-1 agrees with the gated model's on {agreed / compared:.1%} of {compared} test images "
        f"(export-static measures its accuracy)"
    )
    return network, advice


def bench_export(
    path: str | Path,
    *,
    runs: int = 50,
    warmup: int = 10,
    batch_size: int = 32,
    threads: int | None = None,
    static_dir: str | Path | None = None,
    static_keep_rate: float | None = DEFAULT_STATIC_KEEP_RATE,
    img_size: int | None = None,
    device: str = "cpu",
    baseline: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> BenchResult:
    """``manidp bench`` of an export at the input size recorded in it, or at ``img_size`` px, on
    ``device`` (cpu by default: the speed the project measures is the CPU's, docs/speed.md).
    ``baseline="static-l1"`` also times Torch-Pruning's L1 network at the export's measured FLOPs
    ratio, pruned from the export's own weights (variant "torch_pruning"; timing only, not trained).
    Without ``static_dir``, the static network ``export-static --min-keep-rate static_keep_rate``
    would write is built in memory and timed as "static" (None: not; nor when the export's data
    cannot be read, since it is calibrated on that data)."""
    if baseline is not None and baseline not in BASELINES:
        raise ManidpError(f"--baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if baseline is not None:
        require_torch_pruning()  # a missing package is said before any work
    if static_keep_rate is not None and not 0 <= static_keep_rate < 1:
        raise TargetError(f"--static-keep-rate must be in [0, 1), got {static_keep_rate}")
    target = resolve_device(device)
    # the static network is rebuilt from its weights and config, never unpickled from model.pt2
    static, static_config = load_static(static_dir) if static_dir else (None, None)
    gated, info = load_pruned(path)
    shape = (info.input_shape[0], img_size, img_size) if img_size else info.input_shape
    if static_config is not None and static_config["input_shape"] != shape:
        raise WeightsError(f"--static {static_dir} takes {static_config['input_shape']} images, not {shape}")
    dense = dense_twin(gated, info.metadata["model"], info.metadata["model_kwargs"])
    extra_static = {}
    if baseline is not None:
        ratio = info.metadata.get("flops", {}).get("mean_ratio")
        if ratio is None:
            raise WeightsError(f"{info.path} records no measured FLOPs ratio: --baseline needs a pruned export")
        extra_static["torch_pruning"] = folded_model(static_l1(dense, ratio, shape).model, shape)
    data, images, inputs = _bench_inputs(info, img_size, max(batch_size, BENCH_IMAGES))
    static_advice = None
    if static is None and static_keep_rate is not None and data is not None:
        static, static_advice = static_export_in_memory(gated, data, shape, static_keep_rate)
    static = folded_model(static, shape) if static is not None else None
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
        static_advice=static_advice,
    )
    result.inputs = inputs
    result.model = info.metadata["model"]
    result.export = str(info.path)
    result.flops_ratio = info.metadata.get("flops", {}).get("mean_ratio")
    return result
