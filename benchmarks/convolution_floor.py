"""How close can batch-1 dynamic execution get to its convolutions alone?

Records the convolution calls (``F.conv2d``, with their exact tensors) of one image through the dense
network and through the tuned codebook executor, then times, taking turns: each whole model, and a
replay of its convolution calls alone. The codebook's convolutions-only ratio is the floor any
runtime over these kernels could reach; the gap to the whole-model ratio is everything else (gates,
scatter, scaling, Python). Writes ``benchmarks/results/convolution_floor.json``:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/convolution_floor.py --threads 2

With ``--export`` (a trained codebook export, e.g. the accuracy benchmark's ``codebook4``) it times
that model on its own test images, resized to ``--size``, beside Torch-Pruning's L1 network at
``--static-target`` of the same dense weights, whole and convolutions alone: how far overhead
removal alone could take the dynamic model against the static one.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/convolution_floor.py --threads 2 \
        --export runs/bench-accuracy-vs-flops/runs/codebook4-t0.39-b18000-s0-4dbfaa4876 \
        --out benchmarks/results/convolution_floor_trained.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from manidp_cli.analysis.bench import dense_twin, interleaved_latency, timing_model
from manidp_cli.analysis.machine import cpu_info
from manidp_cli.files import atomic_write_text
from manidp_cli.io import load_pruned
from manidp_cli.runtime.execute import dynamic_model, folded_model, tune_entries
from manidp_cli.runtime.static_l1 import static_l1

ROOT = Path(__file__).resolve().parent


class _ConvolutionRecorder(TorchFunctionMode):
    """Records every convolution call, whichever reference to the kernel the caller holds."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, torch.conv2d):
            self.calls.append(tuple(args) + tuple(kwargs.values()))
        elif func is torch.mkldnn_convolution:
            x, weight, bias, padding, stride, dilation, groups = args
            self.calls.append((x, weight, bias, stride, padding, dilation, groups))
        return func(*args, **kwargs)


def _ratios(ms: dict[str, float]) -> dict[str, float]:
    """The codebook model over dense (and over Torch-Pruning's, when timed), whole and convolutions alone."""
    ratios = {
        "whole_ratio": ms["codebook"] / ms["dense"],
        "convolutions_ratio": ms["codebook_convolutions"] / ms["dense_convolutions"],
    }
    if "torch_pruning" in ms:
        ratios["whole_ratio_vs_torch_pruning"] = ms["codebook"] / ms["torch_pruning"]
        ratios["convolutions_ratio_vs_torch_pruning"] = ms["codebook_convolutions"] / ms["torch_pruning_convolutions"]
    return ratios


def recorded_convolutions(model, image) -> list[tuple]:
    """F.conv2d arguments of every convolution one image runs through ``model``."""
    with torch.inference_mode(), _ConvolutionRecorder() as recorder:
        model(image)
    return recorder.calls


def _random_gates(args) -> tuple[nn.Module, nn.Module, torch.Tensor, tuple[int, int, int]]:
    shape = (3, args.size, args.size)
    snapped, dense, _ = timing_model(
        args.model, shape, 0.45, codebook_entries=4, channel_multiple=16, gate_reduction=args.gate_reduction or None
    )
    return snapped, dense, torch.randn(1, *shape), shape


def _trained(args) -> tuple[nn.Module, nn.Module, torch.Tensor, tuple[int, int, int]]:
    gated, info = load_pruned(args.export)
    dense = dense_twin(gated, info.metadata["model"], info.metadata["model_kwargs"])
    data, _ = info.load_data(None)
    image = next(iter(data.eval.batches(1)))[0]
    image = F.interpolate(image, size=args.size, mode="bilinear") if image.shape[-1] != args.size else image
    return gated, dense, image, (info.input_shape[0], args.size, args.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--export", type=Path, default=None, help="a trained codebook export instead of random gates")
    parser.add_argument("--static-target", type=float, default=0.45, help="Torch-Pruning's FLOPs (with --export)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--gate-reduction", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "convolution_floor.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    snapped, dense, image, shape = _trained(args) if args.export else _random_gates(args)
    image = image.contiguous(memory_format=torch.channels_last)
    dense_model = folded_model(dense, shape).to(memory_format=torch.channels_last)
    codebook = dynamic_model(snapped, shape).to(memory_format=torch.channels_last)
    tune_entries(codebook, [image])
    models = {"dense": dense_model, "codebook": codebook}
    if args.export:
        static = static_l1(dense, args.static_target, (shape[0], *image.shape[-2:]))
        models["torch_pruning"] = folded_model(static.model, shape).to(memory_format=torch.channels_last)
    replays = {name: recorded_convolutions(model, image) for name, model in models.items()}
    # each workload takes the image argument interleaved_latency passes (the replays ignore it)
    workloads = {}
    for name, model in models.items():
        workloads[name] = (model, image)
        workloads[f"{name}_convolutions"] = (lambda _, calls=replays[name]: [F.conv2d(*c) for c in calls], image)
    repeats = []
    for _ in range(args.repeats):
        times = interleaved_latency(workloads, args.runs, 3)
        ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
        repeats.append({**ms, **_ratios(ms)})
        shown = (f"{k} {v:.3f}" if "ratio" in k else f"{k} {v:.1f} ms" for k, v in repeats[-1].items())
        print(" | ".join(shown), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "convolution_floor",
        "model": args.model if args.export is None else str(args.export),
        "input_shape": list(shape),
        "gate_reduction": args.gate_reduction or None,
        "threads": args.threads,
        "cpu": cpu_info().to_dict(),
        "convolution_calls": {k: len(v) for k, v in replays.items()},
        "repeats": repeats,
        "medians": {k: statistics.median(r[k] for r in repeats) for k in repeats[0]},
    }
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
