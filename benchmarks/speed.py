"""Wall-clock speed of dynamic execution against dense, masked and static-slimmed networks.

Gates are random and their thresholds calibrated on random images to keep ``--target`` of the dense
FLOPs (timing needs no training). For each (model, input size) it measures, in one run: dense (BN
folded, NCHW and channels-last; the faster is the reference), masked, dynamic, and a statically
slimmed network with the mean channel counts the gates keep. It also profiles the dynamic path
(where the time goes) and writes ``benchmarks/results/speed.json``. Run on an otherwise idle machine:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from manidp_cli.bench import bench_models, timing_model
from manidp_cli.execute import dynamic_model
from manidp_cli.flops import count_flops, measure_flops
from manidp_cli.static import slim

ROOT = Path(__file__).resolve().parent
CASES = [("resnet34", 224), ("resnet18", 32), ("resnet18", 64), ("resnet18", 128), ("resnet18", 224)]


def static_equivalent(gated, input_shape, batches):
    """A slimmed network that keeps, in every removable layer, as many channels as the gates keep on
    average (the most often kept ones): static slimming at the dynamic network's channel counts."""
    from manidp_cli.static import mask_statistics

    frequency, _ = mask_statistics(gated, batches)
    chosen = {}
    for name, freq in frequency.items():
        k = max(1, int(round(float(freq.sum()))))
        keep = torch.zeros_like(freq)
        keep[torch.topk(freq, k).indices] = 1.0
        chosen[name] = keep
    ones = {name: torch.ones_like(freq) for name, freq in frequency.items()}
    return slim(gated, chosen, ones, 0.5, input_shape).model


def profile_dynamic(gated, input_shape, runs: int = 10) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    model = dynamic_model(gated, input_shape)
    image = torch.randn(1, *input_shape)
    with torch.inference_mode():
        for _ in range(3):
            model(image)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(image)
    rows = []
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]:
        rows.append({"op": event.key, "self_ms_per_image": event.self_cpu_time_total / 1e3 / runs,
                     "share": event.self_cpu_time_total / total, "calls_per_image": event.count / runs})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.45)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "speed.json")
    parser.add_argument("--quick", action="store_true", help="resnet18 at 32 px only, few runs")
    args = parser.parse_args()
    cases = [("resnet18", 32)] if args.quick else CASES
    runs = 5 if args.quick else args.runs
    torch.set_num_threads(args.threads)
    results = []
    for name, size in cases:
        started = time.perf_counter()
        shape = (3, size, size)
        gated, dense, calibrated = timing_model(name, shape, args.target)
        batches = [torch.randn(4, *shape) for _ in range(4)]
        measured = measure_flops(gated, count_flops(gated, shape), batches).mean_ratio
        static = static_equivalent(gated, shape, batches)
        static_ratio = count_flops(static, shape).total_flops / count_flops(dense, shape).total_flops
        result = bench_models(gated, dense, shape, runs=runs, warmup=max(2, runs // 5), batch_size=args.batch_size,
                              threads=args.threads, static=static)
        result.update(model=name, flops_ratio_calibrated=calibrated, flops_ratio_measured=measured,
                      static_flops_ratio=static_ratio, profile_dynamic=profile_dynamic(gated, shape),
                      seconds=time.perf_counter() - started)
        results.append(result)
        v = result["variants"]
        print(f"{name} {size}px: dense {v[result['reference']]['latency_ms_median']:.2f} ms ({result['reference']}), "
              f"masked {v['masked']['latency_ratio']:.2f}x, dynamic {v['dynamic']['latency_ratio']:.2f}x, "
              f"static {min(v['static']['latency_ratio'], v['static_channels_last']['latency_ratio']):.2f}x "
              f"(FLOPs: gated {measured:.3f}, static {static_ratio:.3f})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = args.out.with_name("speed_quick.json") if args.quick else args.out
    out.write_text(json.dumps({"benchmark": "speed", "target": args.target, "threads": args.threads, "cases": results}, indent=1))
    print(f"\n{'case':16s} {'dense ms':>9s} {'masked':>7s} {'dynamic':>8s} {'static':>7s} {'img/s masked':>13s} {'img/s loop':>11s}")
    for r in results:
        v = r["variants"]
        print(f"{r['model'] + ' ' + str(r['input_shape'][-1]):16s} {v[r['reference']]['latency_ms_median']:9.2f} "
              f"{v['masked']['latency_ratio']:7.2f} {v['dynamic']['latency_ratio']:8.2f} "
              f"{min(v['static']['latency_ratio'], v['static_channels_last']['latency_ratio']):7.2f} "
              f"{v['masked']['throughput_images_per_s']:13.1f} {v['dynamic']['throughput_per_image_loop']:11.1f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
