"""Wall-clock measurements, in one run, of dense vs masked vs dynamic (vs static-slimmed) execution.

All variants have BatchNorm folded. The dense reference is the faster of NCHW and channels-last.
Latency is batch 1 (median and p90 over ``runs`` after ``warmup``, the variants taking turns call by
call so that a shared machine's drift falls on all alike); throughput is images per second
at ``batch_size``; peak memory is the process's largest resident set sampled while the variant runs
(Linux), so it includes the Python process and the models built before it (on CUDA it is still the
host's memory, not the GPU's). On CUDA every timed call ends with a synchronisation, so that a
time is the work's and not its launch's.

Example::

    result = bench_models(gated, dense, (3, 32, 32), runs=50)
    result.variants["dynamic"].latency_ratio
"""

from __future__ import annotations

import copy
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch import nn

from manidp_cli.analysis.machine import CpuInfo, cpu_info
from manidp_cli.config import CodebookConfig, GatePolicy
from manidp_cli.core.calibration import calibrate_thresholds, mean_saliency
from manidp_cli.core.codebook import build_codebooks
from manidp_cli.core.flops import count_flops
from manidp_cli.core.gating import gates_of, insert_gates, is_gate_key
from manidp_cli.core.progress import ProgressCallback, reported
from manidp_cli.runtime.execute import dynamic_model, folded_model, tune_entries


class _RssSampler:
    """Samples the resident set size (Linux /proc/self/statm) every millisecond in a thread; the
    kernel's own peak (VmHWM) cannot be reset in every sandbox."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * self._page

    def __enter__(self):
        try:
            self.peak = self._rss()
        except OSError:
            self.peak = None
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        if self.peak is not None:
            self._stop.set()
            self._thread.join()

    @property
    def peak_mb(self) -> float | None:
        return None if self.peak is None else self.peak / 2**20


def _no_sync() -> None:
    pass


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for ``device`` to finish the work queued on it: CUDA runs asynchronously."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else _no_sync


def _times(fn: Callable[[], object], runs: int, warmup: int, sync: Callable[[], None] = _no_sync) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


class CyclingImages:
    """Runs the model on the next image at every call: a trained dynamic network's decisions, and
    so its time, depend on the image."""

    def __init__(self, model: nn.Module, images: torch.Tensor):
        self.model = model
        self.images = [image[None] for image in images]
        self.calls = 0

    def __call__(self, _ignored: torch.Tensor) -> torch.Tensor:
        image = self.images[self.calls % len(self.images)]
        self.calls += 1
        return self.model(image)


def _prepared(
    model: nn.Module, images: torch.Tensor, batch_size: int, channels_last: bool, device: torch.device
) -> tuple[nn.Module, CyclingImages, torch.Tensor]:
    """The model on ``device`` in its layout, a batch-1 caller cycling through ``images``, and a
    batch of ``batch_size`` of them (repeated when there are fewer)."""
    model = model.to(device)
    images = images.to(device)
    batch = images.repeat(-(-batch_size // len(images)), 1, 1, 1)[:batch_size]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
        batch = batch.contiguous(memory_format=torch.channels_last)
    return model, CyclingImages(model, images), batch


def interleaved_latency(
    models: dict[str, tuple[nn.Module, torch.Tensor]],
    runs: int,
    warmup: int,
    sync: Callable[[], None] = _no_sync,
    on_progress: ProgressCallback | None = None,
) -> dict[str, list[float]]:
    """Batch-1 latencies, the variants taking turns call by call so that a shared machine's drift
    falls on all of them alike; ``on_progress`` hears of each round (warm-up rounds included)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    rounds = reported(range(warmup + runs), "timing batch 1", warmup + runs, on_progress, unit="rounds")
    with torch.inference_mode():
        for round_index in rounds:
            if round_index < warmup:
                for model, single in models.values():
                    model(single)
                sync()
                continue
            order = list(models.items())
            if (round_index - warmup) % 2:
                order.reverse()
            for name, (model, single) in order:
                start = time.perf_counter()
                model(single)
                sync()
                times[name].append(time.perf_counter() - start)
    return times


@dataclass
class VariantTiming:
    """One way of running the network: batch-1 latency, throughput at the bench batch, memory."""

    layout: str
    latency_ms_median: float
    latency_ms_p90: float
    throughput_images_per_s: float
    peak_rss_mb: float | None
    tuned_entries: dict[str, int] | None = None
    throughput_per_image_loop: float | None = None
    latency_ratio: float = 1.0
    throughput_ratio: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value is not None or key == "peak_rss_mb"}


@dataclass
class BenchResult:
    """Every variant measured in one run, with ratios to the faster dense layout (``reference``)."""

    input_shape: list[int]
    threads: int
    runs: int
    warmup: int
    batch_size: int
    reference: str
    best_dynamic: str
    verdict: str
    variants: dict[str, VariantTiming]
    model: str | None = None  # set for an export (``manidp bench``)
    export: str | None = None
    flops_ratio: float | None = None
    device: str = "cpu"
    cpu: CpuInfo | None = None  # the host's CPU: its kernels decide the CPU ratios (docs/portability.md)
    recommendation: str = ""  # the fastest variant at batch 1, as advice
    inputs: str = "random images"  # what the variants ran on

    def to_dict(self) -> dict[str, Any]:
        out = {key: value for key, value in self.__dict__.items() if key not in ("model", "export", "flops_ratio")}
        out["variants"] = {name: timing.to_dict() for name, timing in self.variants.items()}
        out["cpu"] = self.cpu.to_dict() if self.cpu is not None else None
        if self.model is not None:
            out.update(model=self.model, export=self.export, flops_ratio=self.flops_ratio)
        return out


def _throughput(
    model: nn.Module, batch: torch.Tensor, runs: int, sync: Callable[[], None]
) -> tuple[float, float | None]:
    """Images per second at the batch's size, and the peak memory while running it."""
    with torch.inference_mode(), _RssSampler() as rss:
        batch_times = _times(lambda: model(batch), max(3, runs // 10), 1, sync)
    return batch.shape[0] / statistics.median(batch_times), rss.peak_mb


def _candidates(gated, dense, input_shape, statics, extra_dynamic) -> dict[str, tuple[nn.Module, bool]]:
    """Variant name -> (model, channels_last)."""
    dense_folded = folded_model(dense, input_shape)
    candidates = {
        "dense": (dense_folded, False),
        "dense_channels_last": (copy.deepcopy(dense_folded), True),
        "masked": (folded_model(gated, input_shape), False),
        "dynamic": (dynamic_model(gated, input_shape), False),
        "dynamic_channels_last": (dynamic_model(gated, input_shape), True),
    }
    for name, other in (extra_dynamic or {}).items():
        candidates[name] = (dynamic_model(other, input_shape), False)
        candidates[f"{name}_channels_last"] = (dynamic_model(other, input_shape), True)
    for name, model in statics.items():
        candidates[name] = (model, False)
        candidates[f"{name}_channels_last"] = (copy.deepcopy(model), True)
    return candidates


def _timing(
    latencies: list[float],
    model: nn.Module,
    batch: torch.Tensor,
    channels_last: bool,
    runs: int,
    tuned: dict | None,
    sync: Callable[[], None],
) -> VariantTiming:
    throughput, peak = _throughput(model, batch, runs, sync)
    timing = VariantTiming(
        "channels_last" if channels_last else "nchw",
        1e3 * statistics.median(latencies),
        1e3 * p90(latencies),
        throughput,
        peak,
    )
    if tuned:
        entries = [entry for layer in tuned.values() for entry in layer.values()]
        timing.tuned_entries = {
            "padded": sum(entry["width"] > entry["own_width"] for entry in entries),
            "onednn": sum(entry["kernel"] == "onednn" for entry in entries),
        }
    return timing


def _verdict(ratio: float, best_dynamic: str, input_shape, gated: nn.Module) -> str:
    if ratio < 1:
        verdict = f"dynamic execution pays here: {ratio:.2f}x the dense latency at batch 1 ({best_dynamic})"
    else:
        verdict = (
            f"dynamic execution does not pay here: {ratio:.2f}x the dense latency at batch 1 "
            f"(per-image overhead exceeds the skipped work at {input_shape[-1]} px); use the masked or "
            f"dense model, or static slimming"
        )
    if not _has_codebooks(gated):
        verdict += (
            "; free per-channel masks need per-image weight gathers: prune with a codebook "
            "(recipes/codebook.yaml) for gather-free execution"
        )
    return verdict


STATIC_ADVICE = {
    "static": "use the static export (manidp export-static): it is the fastest variant here",
    "torch_pruning": (
        "use a static model: Torch-Pruning's L1 network at the same FLOPs is the fastest variant here "
        "(fine-tune it and compare its accuracy before you switch)"
    ),
}


def recommendation(measured: dict[str, VariantTiming], input_shape, static_advice: str | None = None) -> str:
    """Which variant to deploy at batch 1, for this export at this input size: the fastest measured.
    ``static_advice`` replaces the advice for the variant "static" (say, how it was built)."""
    advice = {**STATIC_ADVICE, **({"static": static_advice} if static_advice else {})}
    fastest = min(measured, key=lambda name: measured[name].latency_ms_median)
    timing = measured[fastest]
    base = fastest.removesuffix("_channels_last")
    speed = f"{timing.latency_ratio:.2f}x the dense latency, {timing.layout}"
    if base == "dense":
        return f"run the dense model: no pruned variant beats it at {input_shape[-1]} px ({timing.layout})"
    if base in advice:
        return f"{advice[base]} ({speed})"
    if base == "masked":
        return f"run the masked model (the gated network without dynamic execution, {speed})"
    return f"run the export dynamically with manidp's executor ({fastest}, {speed})"


def bench_models(
    gated: nn.Module,
    dense: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    runs: int = 50,
    warmup: int = 10,
    batch_size: int = 32,
    threads: int | None = None,
    static: nn.Module | None = None,
    extra_dynamic: dict[str, nn.Module] | None = None,
    extra_static: dict[str, nn.Module] | None = None,
    images: torch.Tensor | None = None,
    device: torch.device = torch.device("cpu"),
    on_progress: ProgressCallback | None = None,
    static_advice: str | None = None,
) -> BenchResult:
    """Measure every variant in one run, on ``device``, and give ratios to the dense reference.

    Batch-1 calls cycle through ``images`` (N, C, H, W), the batch is their first ``batch_size``
    (repeated when fewer): a trained dynamic network needs real images, whose decisions it times
    (None: random images, enough for random gates).

    ``static`` is timed as the variant "static" (``static_advice``: what to recommend when it is the
    fastest); ``extra_static`` adds other plain networks under
    their names (say, Torch-Pruning's at the same FLOPs), each in both layouts. ``extra_dynamic``
    adds other gated versions of the same network (say, one with codebooks), each executed
    dynamically in both layouts under its name. ``on_progress`` hears of each latency round and
    each variant's throughput."""
    if threads:
        torch.set_num_threads(threads)
    sync = synchronizer(device)
    statics = {**({"static": static} if static is not None else {}), **(extra_static or {})}
    candidates = _candidates(gated, dense, input_shape, statics, extra_dynamic)
    if images is None:
        images = torch.randn(batch_size, *input_shape)
    prepared = {
        name: (*_prepared(model, images, batch_size, cl, device), cl) for name, (model, cl) in candidates.items()
    }
    dynamic_names = ["dynamic", "dynamic_channels_last"] + [
        f"{name}{suffix}" for name in (extra_dynamic or {}) for suffix in ("", "_channels_last")
    ]
    # codebook entries get their fastest convolution (width, kernel) in the layout they run in
    tuned = {name: tune_entries(prepared[name][0], prepared[name][1].images[:4]) for name in dynamic_names}
    singles = {name: (cycling, cycling.images[0]) for name, (_, cycling, _, _) in prepared.items()}
    latencies = interleaved_latency(singles, runs, warmup, sync, on_progress)
    variants = reported(prepared.items(), f"timing batch {batch_size}", len(prepared), on_progress, unit="variants")
    measured = {
        name: _timing(latencies[name], model, batch, cl, runs, tuned.get(name), sync)
        for name, (model, _, batch, cl) in variants
    }
    best_dynamic = min(dynamic_names, key=lambda n: measured[n].latency_ms_median)
    # Batches: the dynamic model runs them together (the union of the kept channels, or the masked
    # path); this is the alternative it was measured against (each image alone through the dynamic path).
    dynamic, _, batch, _ = prepared[best_dynamic]
    with torch.inference_mode():
        loop = _times(lambda: [dynamic(image[None]) for image in batch], max(3, runs // 10), 1, sync)
    measured[best_dynamic].throughput_per_image_loop = batch_size / statistics.median(loop)
    reference_name = min(("dense", "dense_channels_last"), key=lambda n: measured[n].latency_ms_median)
    reference = measured[reference_name]
    for timing in measured.values():
        timing.latency_ratio = timing.latency_ms_median / reference.latency_ms_median
        timing.throughput_ratio = timing.throughput_images_per_s / reference.throughput_images_per_s
    return BenchResult(
        input_shape=list(input_shape),
        threads=torch.get_num_threads(),
        runs=runs,
        warmup=warmup,
        batch_size=batch_size,
        reference=reference_name,
        best_dynamic=best_dynamic,
        verdict=_verdict(measured[best_dynamic].latency_ratio, best_dynamic, input_shape, gated),
        variants=measured,
        device=str(device),
        cpu=cpu_info(),
        recommendation=recommendation(measured, input_shape, static_advice),
    )


def _has_codebooks(gated: nn.Module) -> bool:
    return any(gate.snaps for gate in gates_of(gated).values())


def dense_twin(gated: nn.Module, model_name: str, model_kwargs: dict) -> nn.Module:
    """The gated model's network without gates (same weights)."""
    dense = timm.create_model(model_name, pretrained=False, **model_kwargs).eval()
    state = {k: v for k, v in gated.state_dict().items() if not is_gate_key(k)}
    dense.load_state_dict(state)
    return dense


def timing_model(
    model_name: str,
    input_shape: tuple[int, int, int],
    target: float,
    seed: int = 0,
    images: int = 16,
    codebook_entries: int = 0,
    channel_multiple: int = 8,
    gate_reduction: int | None = None,
):
    """A gated model with random gates whose thresholds keep ``target`` of the dense FLOPs on random
    images: enough to time execution without training (accuracy is meaningless). With
    ``codebook_entries`` the gates also get codebooks learned on those images (then thresholds are
    calibrated again with snapping, as ``manidp prune`` does). ``gate_reduction`` is the gates' r
    (``GatePolicy.reduction``; None: the reference value)."""
    torch.manual_seed(seed)
    dense = timm.create_model(model_name, pretrained=False).eval()
    gated = copy.deepcopy(dense)
    gates = insert_gates(gated, GatePolicy(reduction=gate_reduction), input_shape=input_shape)
    for gate in gates.values():
        nn.init.normal_(gate.fc2.weight, std=0.05)
        nn.init.uniform_(gate.fc2.bias, 0.5, 1.5)
    batches = [torch.randn(4, *input_shape) for _ in range(max(1, images // 4))]
    table = count_flops(gated, input_shape)
    means = mean_saliency(gated, batches)
    search = calibrate_thresholds(gated, table, means, batches, target, steps=14)
    if codebook_entries:
        build_codebooks(gated, batches, CodebookConfig(entries=codebook_entries, channel_multiple=channel_multiple))
        search = calibrate_thresholds(gated, table, means, batches, target, steps=14)
    return gated, dense, search.flops_ratio
