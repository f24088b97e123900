"""Placing a narrow result back at full width: ``index_copy_`` against the executor's scatter.

A gated convolution that computes only its kept output channels must hand a full-width tensor to a
residual addition. This times ``index_copy_`` on the channel dimension against
``manidp_cli.runtime.channels.scatter_channels`` (a 2-D ``scatter_`` over a (pixels, channels) view on
channels-last tensors), at resnet18's stage shapes for a 224 px input, both layouts, batch 1 and 8,
the two taking turns. Writes ``benchmarks/results/scatter.json``:

    .venv/bin/python benchmarks/scatter.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from manidp_cli.analysis.machine import cpu_info
from manidp_cli.files import atomic_write_text
from manidp_cli.runtime.channels import scatter_channels

ROOT = Path(__file__).resolve().parent
SHAPES = ((64, 56, 32), (64, 56, 60), (128, 28, 64), (256, 14, 128), (512, 7, 400))  # channels, size, kept


def _index_copy(narrow: torch.Tensor, channels: torch.Tensor, out_channels: int) -> torch.Tensor:
    shape = (narrow.shape[0], out_channels, *narrow.shape[-2:])
    layout = torch.channels_last if not narrow.is_contiguous() else torch.contiguous_format
    return torch.empty(shape, memory_format=layout).zero_().index_copy_(1, channels, narrow)


def _microseconds(run, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        run()
    return 1e6 * (time.perf_counter() - started) / calls


def time_case(batch: int, channels: int, size: int, kept: int, layout, rounds: int, calls: int) -> dict:
    index = torch.randperm(channels, generator=torch.Generator().manual_seed(0))[:kept].sort().values
    narrow = torch.randn(batch, kept, size, size).contiguous(memory_format=layout)
    assert torch.equal(_index_copy(narrow, index, channels), scatter_channels(narrow, index, channels))
    times: dict[str, list[float]] = {"index_copy": [], "scatter": []}
    for _ in range(rounds):
        times["index_copy"].append(_microseconds(lambda: _index_copy(narrow, index, channels), calls))
        times["scatter"].append(_microseconds(lambda: scatter_channels(narrow, index, channels), calls))
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "batch": batch,
        "channels": channels,
        "size": size,
        "kept": kept,
        "layout": "channels_last" if layout is torch.channels_last else "contiguous",
        "index_copy_us": median["index_copy"],
        "scatter_us": median["scatter"],
        "speedup": median["index_copy"] / median["scatter"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "scatter.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [
        time_case(batch, channels, size, kept, layout, args.rounds, args.calls)
        for layout in (torch.channels_last, torch.contiguous_format)
        for batch in (1, 8)
        for channels, size, kept in SHAPES
    ]
    print(f"{'layout':14s} {'batch':>5s} {'shape':>14s} {'index_copy us':>14s} {'scatter us':>11s} {'speedup':>8s}")
    for c in cases:
        shape = f"{c['kept']}/{c['channels']}x{c['size']}"
        print(
            f"{c['layout']:14s} {c['batch']:5d} {shape:>14s} {c['index_copy_us']:14.0f} "
            f"{c['scatter_us']:11.0f} {c['speedup']:7.2f}x"
        )
    result = {"benchmark": "scatter", "threads": args.threads, "cpu": cpu_info().to_dict(), "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
