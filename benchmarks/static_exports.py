"""Accuracy and FLOPs of the accuracy benchmark's trained manidp models as static exports.

For every seed of an arm at a target (benchmarks/accuracy_vs_flops.py's exports), the network
``manidp export-static --min-keep-rate R`` writes (masks folded as their means, channels kept by at
most R of the calibration images removed, residual-feeding layers narrowed and scattered back) is
built for each ``--keep-rates`` R and measured on the full test set beside the gated model. How much
per-image routing a trained model does is measured too: the share of its gated channels whose
decision depends on the image (``routed_channel_share``, as ``manidp eval`` reports it), and per
gated layer the mean over channels of the saliency's coefficient of variation across test images. JSON + printed table::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/static_exports.py --model resnet34 --arm codebook4_fd5 --target 0.3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from manidp_cli.analysis.evaluation import evaluate
from manidp_cli.analysis.machine import cpu_info
from manidp_cli.core.flops import count_flops
from manidp_cli.core.recorder import GateRecorder
from manidp_cli.files import atomic_write_text
from manidp_cli.io import load_pruned
from manidp_cli.runtime.slimming import mask_statistics, slim

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import accuracy_vs_flops as accuracy  # noqa: E402 - the sibling benchmark names the arms
import speed_trained  # noqa: E402 - the same arm arguments


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=accuracy.DEFAULT_MODEL)
    parser.add_argument("--work", type=Path, default=None, help="default: the accuracy benchmark's for --model")
    parser.add_argument("--arm", default="codebook4_fd5")
    parser.add_argument("--target", type=float, default=0.3)
    parser.add_argument("--budget", type=int, default=18000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--calibration-images", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.work = args.work or accuracy.default_work(args.model)
    name = f"static_exports_{args.work.name}_{args.arm}_{args.target}.json"
    args.out = args.out or ROOT / "results" / name
    return args


def saliency_variation(model, eval_set) -> dict[str, float]:
    """Per gated layer, the mean over channels of the saliency's coefficient of variation across
    images (0: the gate gives every image the same saliencies)."""
    total, squares, count = {}, {}, 0
    with torch.no_grad(), GateRecorder(model, detach=True) as recorder:
        for images, _ in eval_set.batches(256):
            model(images)
            for name, saliency in recorder.saliency.items():
                total[name] = total.get(name, 0) + saliency.double().sum(0)
                squares[name] = squares.get(name, 0) + saliency.double().square().sum(0)
            count += images.shape[0]
    variation = {}
    for name, summed in total.items():
        mean = summed / count
        sd = (squares[name] / count - mean.square()).clamp(min=0).sqrt()
        positive = mean > 0
        variation[name] = float((sd[positive] / mean[positive]).mean()) if positive.any() else 0.0
    return variation


def measure_seed(args, seed: int) -> dict:
    spec = {"arm": args.arm, "target": args.target, "seed": seed, "budget": args.budget}
    export = accuracy.run_folder(args.work, accuracy.arm_key(spec, speed_trained._arm_args(args)))
    gated, info = load_pruned(export)
    data, _ = info.load_data(None)
    shape = tuple(info.input_shape)
    table = count_flops(gated, shape)
    gated_eval = evaluate(gated, data.eval, 256, table=table)
    variation = saliency_variation(gated, data.eval)
    calibration = [x for x, _ in data.train.batches(256, limit=args.calibration_images)]
    frequency, mean_mask = mask_statistics(gated, calibration)
    exports = {}
    for rate in args.keep_rates:
        network = slim(gated, frequency, mean_mask, rate, shape).model
        exports[str(rate)] = {
            "top1": evaluate(network, data.eval, 256).top1,
            "flops_ratio": count_flops(network, shape).total_flops / table.dense_flops,
        }
    return {
        "seed": seed,
        "export": str(export),
        "gated": {"top1": gated_eval.top1, "flops_ratio": gated_eval.flops.mean_ratio},
        "routed_channel_share": gated_eval.flops.routed_channel_share(),
        "saliency_variation": variation,
        "saliency_variation_max": max(variation.values()),
        "static_exports": exports,
    }


def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    seeds = [measure_seed(args, seed) for seed in args.seeds]
    summary = {"gated": _mean_sd([s["gated"]["top1"] for s in seeds])}
    for rate in args.keep_rates:
        summary[f"static_{rate}"] = _mean_sd([s["static_exports"][str(rate)]["top1"] for s in seeds])
    result = {
        "benchmark": "static_exports",
        "model": args.model,
        "work": str(args.work),
        "arm": args.arm,
        "target": args.target,
        "budget": args.budget,
        "calibration_images": args.calibration_images,
        "cpu": cpu_info().to_dict(),
        "seeds": seeds,
        "top1": summary,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"{args.model} {args.arm} at {args.target}, {args.budget} images")
    header = f"{'seed':>4s} {'gated':>14s} " + " ".join(f"{'static ' + str(r):>16s}" for r in args.keep_rates)
    print(header + f" {'routed':>7s} {'max CV':>7s}")
    for s in seeds:
        cells = [f"{100 * s['gated']['top1']:6.2f} @ {s['gated']['flops_ratio']:.3f}"]
        exports = (s["static_exports"][str(rate)] for rate in args.keep_rates)
        cells += [f"{100 * e['top1']:6.2f} @ {e['flops_ratio']:.3f}" for e in exports]
        print(
            f"{s['seed']:>4d} "
            + " ".join(f"{c:>16s}" for c in cells)
            + f" {100 * s['routed_channel_share']:6.2f}% {s['saliency_variation_max']:7.4f}"
        )
    print(" mean " + " ".join(f"{n}: {100 * v['mean']:.2f} ± {100 * v['sd']:.2f}" for n, v in summary.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
