"""How fast is a cascade that escalates to the dense start, against one static network at the same FLOPs?

benchmarks/cascade.py measures a cascade's accuracy at a mean-FLOPs target: a narrow network answers
every image and the dense start re-answers the ones it is unsure of. FLOPs are a mean; time is what
a user pays. This times, on the real test images (a cascade's time depends on which images
escalate), with the threshold that ``manidp eval --escalate-to`` would deploy at ``--target``:

- ``cascade``: ``manidp_cli.runtime.cascade.Cascade`` of the narrow network and the dense start;
- ``single``: the static network the cascade is compared with at the same FLOPs;
- ``narrow`` and ``dense``: the two members alone.

Batch 1: every test image in turn (``--latency-images`` of them, the same for every model), the
models taking turns image by image; mean and p90 milliseconds per image. Batches of
``--batch-size``: the whole test set in order, the models taking turns batch by batch; images per
second. Both are repeated ``--repeats`` times and the medians reported, ratios within one run.
Members are plain networks only (static arms, the dense start): a gated manidp export runs at full
width until it is exported static. JSON + printed table::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cascade_speed.py --model resnet34 \\
        --work runs/bench-avf-resnet34-start3 --narrow-arm static_fkd_taylor --narrow 0.15 \\
        --single-arm static_fkd_taylor --target 0.3 --lr 0.02 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from manidp_cli.analysis.bench import CyclingImages, p90
from manidp_cli.analysis.cascade import fit_threshold
from manidp_cli.analysis.machine import cpu_info
from manidp_cli.data import load_data
from manidp_cli.files import atomic_write_text
from manidp_cli.models.factory import create_model
from manidp_cli.runtime.cascade import Cascade, escalates

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import cascade  # noqa: E402 - the sibling benchmark finds the members and caches their outputs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--work", type=Path, required=True, help="the accuracy benchmark's work folder")
    parser.add_argument("--budget", type=int, default=18000, help="fine-tuning images of the networks")
    parser.add_argument("--narrow-arm", required=True, help="a static arm of the accuracy benchmark")
    parser.add_argument("--narrow", type=float, required=True, help="the narrow network's FLOPs target")
    parser.add_argument("--single-arm", required=True, help="the static arm compared at --target")
    parser.add_argument("--target", type=float, required=True, help="the cascade's mean FLOPs")
    parser.add_argument("--lr", type=float, default=0.02, help="both networks' learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--latency-images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not args.work.is_dir():
        parser.error(f"--work {args.work} is not a folder: give the accuracy benchmark's work folder")
    stem = f"cascade_speed_{args.model}_{args.narrow_arm}_{args.narrow:g}_start_{args.target:g}_{args.work.name}"
    args.out = args.out or ROOT / "results" / f"{stem}.json"
    return args


def networks(args, images) -> tuple[dict[str, nn.Module], float, float]:
    """The four models, the deployed threshold and the share of test images it escalates."""

    def plain(path: Path) -> nn.Module:
        kwargs = {"num_classes": images.num_classes, "in_chans": images.in_chans}
        return create_model(args.model, **kwargs, weights=path).eval()

    finder = argparse.Namespace(work=args.work, budget=args.budget, model=args.model, lr=args.lr)
    paths = {
        "narrow": cascade.member_path(finder, args.narrow_arm, args.narrow, args.seed, args.lr),
        "dense": cascade.member_path(finder, cascade.START_ARM, 1.0, args.seed, args.lr),
        "single": cascade.member_path(finder, args.single_arm, args.target, args.seed, args.lr),
    }
    models = {name: plain(path) for name, path in paths.items()}
    outputs = argparse.Namespace(model=args.model, work=args.work)
    narrow = cascade.cached_member(outputs, args.narrow_arm, paths["narrow"], args.work / "cascade-cache")
    dense = cascade.cached_member(outputs, "dense", paths["dense"], args.work / "cascade-cache")
    threshold = fit_threshold(narrow, dense, args.target, torch.arange(len(narrow.labels)))
    escalated = float(escalates(narrow.probabilities, threshold).float().mean())
    models["cascade"] = Cascade(models["narrow"], models["dense"], threshold).eval()
    return models, threshold, escalated


def test_images(images) -> torch.Tensor:
    return torch.cat([batch for batch, _ in images.eval.batches(1000)])


def latencies(models: dict[str, nn.Module], images: torch.Tensor) -> dict[str, list[float]]:
    """Milliseconds per image at batch 1, every model on every image, taking turns image by image."""
    callers = {name: CyclingImages(model, images) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for index in range(len(images)):
            order = list(callers.items()) if index % 2 else list(reversed(callers.items()))
            for name, caller in order:
                start = time.perf_counter()
                caller(images)
                times[name].append(1000 * (time.perf_counter() - start))
    return times


def throughputs(models: dict[str, nn.Module], images: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Images per second over the whole set in batches, the models taking turns batch by batch."""
    seconds = dict.fromkeys(models, 0.0)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            for name, model in models.items():
                began = time.perf_counter()
                model(batch)
                seconds[name] += time.perf_counter() - began
    return {name: len(images) / spent for name, spent in seconds.items()}


def measure(models: dict[str, nn.Module], images: torch.Tensor, args) -> dict[str, dict[str, float]]:
    runs = []
    for repeat in range(args.repeats):
        single = latencies(models, images[: args.latency_images])
        batched = throughputs(models, images, args.batch_size)
        runs.append({name: (statistics.fmean(single[name]), p90(single[name]), batched[name]) for name in models})
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    out = {}
    for name in models:
        mean, tail, rate = (statistics.median(run[name][index] for run in runs) for index in range(3))
        out[name] = {"latency_ms_mean": mean, "latency_ms_p90": tail, "throughput_images_per_s": rate}
    for name in models:
        out[name]["latency_vs_single"] = out[name]["latency_ms_mean"] / out["single"]["latency_ms_mean"]
        out[name]["throughput_vs_single"] = (
            out[name]["throughput_images_per_s"] / out["single"]["throughput_images_per_s"]
        )
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    data = load_data(cascade.DATA)
    models, threshold, escalated = networks(args, data)
    images = test_images(data)
    timed = measure(models, images, args)
    result = {
        "benchmark": "cascade_speed",
        "model": args.model,
        "work": args.work.name,
        "members": {"narrow": [args.narrow_arm, args.narrow], "wide": [cascade.START_ARM, 1.0]},
        "single": [args.single_arm, args.target],
        "lr": args.lr,
        "seed": args.seed,
        "threshold": threshold,
        "escalated_share": escalated,
        "threads": args.threads,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "latency_images": args.latency_images,
        "cpu": cpu_info().to_dict(),
        "models": timed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    members = f"{args.narrow_arm} {args.narrow:g} escalating {escalated:.1%} to the dense start"
    print(f"{args.model}: {members}, at {args.target:g}")
    rate = f"images/s (b{args.batch_size})"
    print(f"{'model':8s} {'ms/image (b1)':>13s} {'p90':>7s} {rate:>16s} {'vs single':>18s}")
    for name, t in timed.items():
        ratios = f"{t['latency_vs_single']:.2f}x / {t['throughput_vs_single']:.2f}x"
        print(
            f"{name:8s} {t['latency_ms_mean']:13.2f} {t['latency_ms_p90']:7.2f} "
            f"{t['throughput_images_per_s']:16.0f} {ratios:>18s}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
