"""Wall-clock measurements, in one run, of dense vs masked vs dynamic (vs static-slimmed) execution.

All variants have BatchNorm folded. The dense reference is the faster of NCHW and channels-last.
Latency is batch 1 (median and p90 over ``runs`` after ``warmup``, the variants taking turns call by
call so that a shared machine's drift falls on all alike); throughput is images per second
at ``batch_size``; peak memory is the process's largest resident set sampled while the variant runs
(Linux), so it includes the Python process and the models built before it.

Example::

    result = bench_export("runs/demo/pruned", runs=50)
    result["variants"]["dynamic"]["latency_ratio"]
"""

from __future__ import annotations

import copy
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from manidp_cli.execute import dynamic_model, folded_model, tune_entries


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


def _times(fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def _prepared(model: nn.Module, input_shape, batch_size: int, channels_last: bool):
    single = torch.randn(1, *input_shape)
    batch = torch.randn(batch_size, *input_shape)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        single = single.contiguous(memory_format=torch.channels_last)
        batch = batch.contiguous(memory_format=torch.channels_last)
    return model, single, batch


def interleaved_latency(models: dict[str, tuple[nn.Module, torch.Tensor]], runs: int, warmup: int) -> dict[str, list[float]]:
    """Batch-1 latencies, the variants taking turns call by call so that a shared machine's drift
    falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for model, single in models.values():
                model(single)
        for round_index in range(runs):
            order = list(models.items())
            if round_index % 2:
                order.reverse()
            for name, (model, single) in order:
                start = time.perf_counter()
                model(single)
                times[name].append(time.perf_counter() - start)
    return times


def measure_variant(model: nn.Module, batch: torch.Tensor, runs: int) -> dict:
    """Throughput at the batch's size and peak memory of one model."""
    with torch.inference_mode(), _RssSampler() as rss:
        batch_times = _times(lambda: model(batch), max(3, runs // 10), 1)
    return {"throughput_images_per_s": batch.shape[0] / statistics.median(batch_times), "peak_rss_mb": rss.peak_mb}


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
) -> dict:
    """Measure every variant in one run and give ratios to the dense reference.

    ``extra_dynamic`` adds other gated versions of the same network (say, one with codebooks),
    each executed dynamically in both layouts under its name."""
    if threads:
        torch.set_num_threads(threads)
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
    if static is not None:
        candidates["static"] = (static, False)
        candidates["static_channels_last"] = (copy.deepcopy(static), True)
    prepared = {name: (*_prepared(model, input_shape, batch_size, cl), cl) for name, (model, cl) in candidates.items()}
    dynamic_names = ["dynamic", "dynamic_channels_last"] + [
        f"{name}{suffix}" for name in (extra_dynamic or {}) for suffix in ("", "_channels_last")
    ]
    # codebook entries get their fastest convolution (width, kernel) in the layout they run in
    tuned = {name: tune_entries(prepared[name][0], [prepared[name][1]]) for name in dynamic_names}
    latencies = interleaved_latency({name: (m, single) for name, (m, single, _, _) in prepared.items()}, runs, warmup)
    measured = {}
    for name, (model, _, batch, cl) in prepared.items():
        measured[name] = {
            "layout": "channels_last" if cl else "nchw",
            "latency_ms_median": 1e3 * statistics.median(latencies[name]),
            "latency_ms_p90": 1e3 * _p90(latencies[name]),
            **measure_variant(model, batch, runs),
        }
        if tuned.get(name):
            entries = [entry for layer in tuned[name].values() for entry in layer.values()]
            measured[name]["tuned_entries"] = {
                "padded": sum(entry["width"] > entry["own_width"] for entry in entries),
                "onednn": sum(entry["kernel"] == "onednn" for entry in entries),
            }
    best_dynamic = min(dynamic_names, key=lambda n: measured[n]["latency_ms_median"])
    # Batches: the dynamic model runs them through the masked path; this is the alternative it was
    # measured against (each image alone through the dynamic path).
    dynamic, _, batch, _ = prepared[best_dynamic]
    with torch.inference_mode():
        loop = _times(lambda: [dynamic(image[None]) for image in batch], max(3, runs // 10), 1)
    measured[best_dynamic]["throughput_per_image_loop"] = batch_size / statistics.median(loop)
    reference_name = min(("dense", "dense_channels_last"), key=lambda n: measured[n]["latency_ms_median"])
    reference = measured[reference_name]
    for values in measured.values():
        values["latency_ratio"] = values["latency_ms_median"] / reference["latency_ms_median"]
        values["throughput_ratio"] = values["throughput_images_per_s"] / reference["throughput_images_per_s"]
    ratio = measured[best_dynamic]["latency_ratio"]
    if ratio < 1:
        verdict = f"dynamic execution pays here: {ratio:.2f}x the dense latency at batch 1 ({best_dynamic})"
    else:
        verdict = (
            f"dynamic execution does not pay here: {ratio:.2f}x the dense latency at batch 1 "
            f"(per-image overhead exceeds the skipped work at {input_shape[-1]} px); use the masked or "
            f"dense model, or static slimming"
        )
    if not _has_codebooks(gated):
        verdict += "; free per-channel masks need per-image weight gathers: prune with a codebook (recipes/codebook.yaml) for gather-free execution"
    return {
        "input_shape": list(input_shape),
        "threads": torch.get_num_threads(),
        "runs": runs,
        "warmup": warmup,
        "batch_size": batch_size,
        "reference": reference_name,
        "best_dynamic": best_dynamic,
        "verdict": verdict,
        "variants": measured,
    }


def _has_codebooks(gated: nn.Module) -> bool:
    from manidp_cli.gating import gates_of

    return any(gate.snaps for gate in gates_of(gated).values())


def dense_twin(gated: nn.Module, model_name: str, model_kwargs: dict) -> nn.Module:
    """The gated model's network without gates (same weights)."""
    import timm

    from manidp_cli.gating import GATE_PREFIX

    dense = timm.create_model(model_name, pretrained=False, **model_kwargs).eval()
    state = {k: v for k, v in gated.state_dict().items() if not k.startswith(GATE_PREFIX + ".")}
    dense.load_state_dict(state)
    return dense


def bench_export(
    path: str | Path,
    *,
    runs: int = 50,
    warmup: int = 10,
    batch_size: int = 32,
    threads: int | None = None,
    static_dir: str | Path | None = None,
) -> dict:
    """``manidp bench`` of an export at the input size recorded in it."""
    from manidp_cli.errors import WeightsError
    from manidp_cli.export import load_pruned
    from manidp_cli.static import load_static

    # the static network is rebuilt from its weights and config, never unpickled from model.pt2
    static, static_config = load_static(static_dir) if static_dir else (None, None)
    gated, info = load_pruned(path)
    if static_config is not None and static_config["input_shape"] != info.input_shape:
        raise WeightsError(f"--static {static_dir} takes {static_config['input_shape']} images, {info.path} {info.input_shape}")
    dense = dense_twin(gated, info.metadata["model"], info.metadata["model_kwargs"])
    static = folded_model(static, info.input_shape) if static is not None else None
    result = bench_models(
        gated, dense, info.input_shape, runs=runs, warmup=warmup, batch_size=batch_size, threads=threads, static=static
    )
    result["model"] = info.metadata["model"]
    result["export"] = str(info.path)
    result["flops_ratio"] = info.metadata.get("flops", {}).get("mean_ratio")
    return result


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
    import timm

    from manidp_cli.flops import count_flops
    from manidp_cli.gating import GatePolicy, insert_gates
    from manidp_cli.objectives import calibrate_thresholds, mean_saliency

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
        from manidp_cli.codebook import CodebookConfig, build_codebooks

        build_codebooks(gated, batches, CodebookConfig(entries=codebook_entries, channel_multiple=channel_multiple))
        search = calibrate_thresholds(gated, table, means, batches, target, steps=14)
    return gated, dense, search.flops_ratio
