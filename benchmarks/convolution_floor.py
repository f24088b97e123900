"""How close can batch-1 dynamic execution get to its convolutions alone?

Records the convolution calls (``F.conv2d``, with their exact tensors) of one image through the dense
network and through the tuned codebook executor, then times, taking turns: each whole model, and a
replay of its convolution calls alone. The codebook's convolutions-only ratio is the floor any
runtime over these kernels could reach; the gap to the whole-model ratio is everything else (gates,
scatter, scaling, Python). Writes ``benchmarks/results/convolution_floor.json``:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/convolution_floor.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from manidp_cli.analysis.bench import interleaved_latency, timing_model
from manidp_cli.runtime.execute import dynamic_model, folded_model, tune_entries

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


def recorded_convolutions(model, image) -> list[tuple]:
    """F.conv2d arguments of every convolution one image runs through ``model``."""
    with torch.inference_mode(), _ConvolutionRecorder() as recorder:
        model(image)
    return recorder.calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--gate-reduction", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "convolution_floor.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = (3, args.size, args.size)
    snapped, dense, _ = timing_model(
        args.model, shape, 0.45, codebook_entries=4, channel_multiple=16, gate_reduction=args.gate_reduction or None
    )
    image = torch.randn(1, *shape).contiguous(memory_format=torch.channels_last)
    dense_model = folded_model(dense, shape).to(memory_format=torch.channels_last)
    codebook = dynamic_model(snapped, shape).to(memory_format=torch.channels_last)
    tune_entries(codebook, [image])
    replays = {
        name: recorded_convolutions(model, image) for name, model in (("dense", dense_model), ("codebook", codebook))
    }
    # each workload takes the image argument interleaved_latency passes (the replays ignore it)
    workloads = {
        "dense": (dense_model, image),
        "dense_convolutions": (lambda _: [F.conv2d(*call) for call in replays["dense"]], image),
        "codebook": (codebook, image),
        "codebook_convolutions": (lambda _: [F.conv2d(*call) for call in replays["codebook"]], image),
    }
    repeats = []
    for _ in range(args.repeats):
        times = interleaved_latency(workloads, args.runs, 3)
        ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
        repeats.append(
            {
                **ms,
                "whole_ratio": ms["codebook"] / ms["dense"],
                "convolutions_ratio": ms["codebook_convolutions"] / ms["dense_convolutions"],
            }
        )
        r = repeats[-1]
        print(
            f"dense {r['dense']:.1f} ms (convolutions {r['dense_convolutions']:.1f}) | codebook {r['codebook']:.1f} ms "
            f"(convolutions {r['codebook_convolutions']:.1f}) | ratio whole {r['whole_ratio']:.3f}, "
            f"convolutions only {r['convolutions_ratio']:.3f}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "convolution_floor",
                "model": args.model,
                "input_shape": list(shape),
                "gate_reduction": args.gate_reduction or None,
                "threads": args.threads,
                "convolution_calls": {k: len(v) for k, v in replays.items()},
                "repeats": repeats,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
