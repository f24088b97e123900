"""Throughput of codebook batches through the dynamic model against the masked path and dense, in one run.

Random gates calibrated to ``--target`` of the dense FLOPs with codebooks learned on random images
(``bench.timing_model``); all three models channels-last, taking turns batch by batch. The
"grouped" variant is ``dynamic_model``: since 2026-12-01 it runs the union of a batch's entries
where that union is narrow, and groups by entry only where it is nearly every channel. Writes
``benchmarks/results/batch_grouping.json``:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/batch_grouping.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from manidp_cli.analysis.bench import interleaved_latency, timing_model
from manidp_cli.runtime.execute import dynamic_model, folded_model

ROOT = Path(__file__).resolve().parent
CASES = [("resnet34", 224, 16), ("resnet18", 32, 64)]


def measure(name: str, size: int, batch_size: int, target: float, entries: int, rounds: int) -> dict:
    shape = (3, size, size)
    gated, dense, flops = timing_model(name, shape, target, codebook_entries=entries, channel_multiple=16)
    layout = torch.channels_last
    models = {
        "dense": folded_model(dense, shape).to(memory_format=layout),
        "masked": folded_model(gated, shape).to(memory_format=layout),
        "grouped": dynamic_model(gated, shape).to(memory_format=layout),
    }
    batch = torch.randn(batch_size, *shape).contiguous(memory_format=layout)
    # whole batches, the variants taking turns (the helper's warm-up round included)
    times = interleaved_latency({key: (model, batch) for key, model in models.items()}, rounds, 1)
    throughput = {key: batch_size / statistics.median(values) for key, values in times.items()}
    return {
        "model": name,
        "input_size": size,
        "batch_size": batch_size,
        "flops_ratio": flops,
        "entries": entries,
        "images_per_s": throughput,
        "grouped_vs_masked": throughput["grouped"] / throughput["masked"],
        "grouped_vs_dense": throughput["grouped"] / throughput["dense"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.45)
    parser.add_argument("--entries", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "batch_grouping.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [measure(name, size, batch, args.target, args.entries, args.rounds) for name, size, batch in CASES]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"benchmark": "batch_grouping", "threads": args.threads, "cases": results}, indent=1)
    )
    print(f"{'case':22s} {'dense':>9s} {'masked':>9s} {'grouped':>9s} {'vs masked':>10s} {'vs dense':>9s}  (images/s)")
    for r in results:
        t = r["images_per_s"]
        case = f"{r['model']} {r['input_size']}px b{r['batch_size']}"
        print(
            f"{case:22s} {t['dense']:9.1f} {t['masked']:9.1f} {t['grouped']:9.1f} "
            f"{r['grouped_vs_masked']:9.2f}x {r['grouped_vs_dense']:8.2f}x"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
