"""Per-image compute by escalation: a narrow network answers, a wider one re-answers the images the
narrow one is unsure of. Does that beat one model at the same mean FLOPs?

The accuracy benchmark's gated networks route almost nothing per image (1 to 3% of their gated
channels; docs/results.md), so their FLOPs barely vary across images. A cascade of two of its
trained networks is the plainest way to spend more on hard images (``manidp eval --escalate-to``,
``manidp_cli.analysis.cascade``): every test image runs the narrow member (its per-image FLOPs,
gates included); when the narrow member's top softmax probability is below a threshold, the image
also runs the wide member (its FLOPs added; nothing is reused) and takes its answer. The threshold
meets a mean-FLOPs target and is cross-fitted: each half of the test set (even and odd positions)
is judged by a threshold fitted on the other half. FLOPs are shares of timm's full-width network,
as in the accuracy benchmark's JSON. "oracle" escalates exactly the images the wide member gets
right and the narrow one wrong: what no rule can beat with these two members.

Members come from ``<work>/runs/<key>/model.safetensors``: manidp's export for the dynamic and
hybrid arms of benchmarks/accuracy_vs_flops.py, the trained network for its static and dense arms
(``save_network``; arms that ran before it was added must be rerun with ``--rerun``). Per-image
outputs are cached in ``<work>/cascade-cache``. JSON + printed table::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cascade.py --arm hybrid_ce --budget 180000
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cascade.py --arm static --budget 180000
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cascade.py --arm hybrid_ce --wide-arm dense --wide 1.0 --seeds 1 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cascade.py --arm static_fkd --wide-arm start --budget 18000

``--wide-arm start`` escalates to the dense start itself (``<work>/dense-start``, not fine-tuned): the
narrow member has the whole fine-tuning budget, as a single network has.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from manidp_cli.analysis.cascade import FOLDS, MemberOutputs, evaluate_cascade, member_outputs
from manidp_cli.analysis.machine import cpu_info
from manidp_cli.api.evaluate import architecture_flops
from manidp_cli.core.flops import count_flops
from manidp_cli.data import load_data
from manidp_cli.files import atomic_write_bytes, atomic_write_text
from manidp_cli.io import load_pruned
from manidp_cli.models.factory import create_model

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import accuracy_vs_flops as accuracy  # noqa: E402 - the sibling benchmark names the arms and their keys
import speed_trained  # noqa: E402 - the same arm arguments

DATA = "fashion-mnist"  # the accuracy benchmark's data (speed_trained._arm_args): static and dense members
# The wide member "start" is the dense start every arm is fine-tuned from, as it is: escalating to the
# network a user already has costs no fine-tuning images, so the narrow member keeps the whole budget.
START_ARM = "start"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=accuracy.DEFAULT_MODEL)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-avf-start2"))
    parser.add_argument(
        "--summary",
        type=Path,
        nargs="+",
        default=[ROOT / "results" / "accuracy_vs_flops_start2.json"],
        help="the accuracy benchmark's JSON (one per learning rate): the single models compared against",
    )
    parser.add_argument("--arm", default="hybrid_ce", help="the accuracy benchmark's arm of both members")
    parser.add_argument("--narrow-arm", default=None, help="the narrow member's arm, if not --arm")
    parser.add_argument(
        "--wide-arm",
        default=None,
        help=f"the wide member's arm, if not --arm (dense: target 1.0; {START_ARM}: the dense start, not fine-tuned)",
    )
    parser.add_argument(
        "--budget", type=int, default=180000, help="fine-tuning images of the single models compared against"
    )
    parser.add_argument(
        "--narrow-budget",
        type=int,
        default=None,
        help="the narrow member's fine-tuning images, if not --budget (members that together train on --budget "
        "images: the same optimiser budget as one single model)",
    )
    parser.add_argument("--wide-budget", type=int, default=None, help="the wide member's, if not --budget")
    parser.add_argument("--lr", type=float, default=accuracy.DEFAULT_LR, help="both members' learning rate")
    parser.add_argument("--narrow-lr", type=float, default=None, help="the narrow member's, if not --lr")
    parser.add_argument("--wide-lr", type=float, default=None, help="the wide member's, if not --lr")
    parser.add_argument("--narrow", type=float, default=0.15, help="the narrow member's FLOPs target")
    parser.add_argument("--wide", type=float, default=0.45, help="the wide member's FLOPs target")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.3], help="the cascade's mean FLOPs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.narrow_arm = args.narrow_arm or args.arm
    args.wide_arm = args.wide_arm or args.arm
    args.narrow_lr = args.lr if args.narrow_lr is None else args.narrow_lr
    args.wide_lr = args.lr if args.wide_lr is None else args.wide_lr
    args.narrow_budget = args.narrow_budget or args.budget
    args.wide_budget = 0 if args.wide_arm == START_ARM else args.wide_budget or args.budget
    if args.wide_arm == START_ARM:
        args.wide = 1.0
    arms = args.narrow_arm if args.narrow_arm == args.wide_arm else f"{args.narrow_arm}_{args.wide_arm}"
    stem = f"cascade_{arms}_{args.narrow}_{args.wide}_b{args.budget}"
    if (args.narrow_lr, args.wide_lr) != (accuracy.DEFAULT_LR,) * 2:
        stem += f"_lr{args.narrow_lr:g}_{args.wide_lr:g}"
    if (args.narrow_budget, args.wide_budget) != (args.budget,) * 2:
        stem += f"_members{args.narrow_budget}+{args.wide_budget}"
    if args.work.name != "bench-avf-start2":  # another start: its own files
        stem += f"_{args.work.name.removeprefix('bench-avf-')}"
    args.out = args.out or ROOT / "results" / f"{stem}.json"
    return args


def measure_export(export: Path) -> MemberOutputs:
    """A manidp export over its test split: softmax outputs and per-image FLOPs (gates included)."""
    model, info = load_pruned(export)
    images, _ = info.load_data(None)
    outputs = member_outputs(model, images.eval, count_flops(model, images.input_shape), 500)
    return _of_full_width(outputs, architecture_flops(info.metadata, images.input_shape))


def measure_network(path: Path, model_name: str) -> MemberOutputs:
    """A static or dense arm's network (``accuracy.save_network``): the same FLOPs for every image."""
    images = load_data(DATA)
    model = create_model(model_name, num_classes=images.num_classes, in_chans=images.in_chans, weights=path)
    outputs = member_outputs(model, images.eval, count_flops(model, images.input_shape), 500)
    full_width = create_model(model_name, num_classes=images.num_classes, in_chans=images.in_chans)
    return _of_full_width(outputs, count_flops(full_width, images.input_shape).dense_flops)


def _of_full_width(outputs: MemberOutputs, full_width: int) -> MemberOutputs:
    return replace(outputs, flops=outputs.flops / full_width)


def cached_member(args, arm: str, export: Path, cache: Path) -> MemberOutputs:
    stat = export.stat()
    digest = hashlib.sha256(f"{export.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    path = cache / f"{export.parent.name}-{digest}.safetensors"
    if path.is_file():
        return MemberOutputs(**load_safetensors(path.read_bytes()))
    plain = arm in accuracy.STATIC_ARMS or arm in accuracy.DENSE_ARMS
    outputs = measure_network(export, args.model) if plain else measure_export(export)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save_safetensors({k: v.contiguous() for k, v in asdict(outputs).items()}))
    return outputs


def member_path(args, arm: str, target: float, seed: int, lr: float, budget: int | None = None) -> Path:
    """The trained network (or export) of one arm of the accuracy benchmark, or the dense start."""
    if arm == START_ARM:
        start = args.work / "dense-start" / "model.safetensors"
        if not start.is_file():
            sys.exit(f"error: no dense start {start}: run the accuracy benchmark with --work {args.work} first")
        return start
    spec = {"arm": arm, "target": target, "seed": seed, "budget": budget or args.budget}
    key = accuracy.arm_key(spec, speed_trained._arm_args(argparse.Namespace(**{**vars(args), "lr": lr})))
    export = accuracy.run_folder(args.work, key) / accuracy.NETWORK_FILE
    if not export.is_file():
        sys.exit(
            f"error: no network {export}: run the accuracy benchmark's {arm} arm at {target}, lr {lr}, "
            f"budget {spec['budget']} first"
        )
    return export


def member(args, arm: str, target: float, seed: int, lr: float, budget: int | None = None) -> MemberOutputs:
    export = member_path(args, arm, target, seed, lr, budget)
    return cached_member(args, "dense" if arm == START_ARM else arm, export, args.work / "cascade-cache")


def measure_seed(args, seed: int) -> dict:
    narrow = member(args, args.narrow_arm, args.narrow, seed, args.narrow_lr, args.narrow_budget)
    wide = member(args, args.wide_arm, args.wide, seed, args.wide_lr, args.wide_budget)
    # the best any escalation rule could do: escalate exactly the images the wide member gets right
    # and the narrow one wrong
    rescued = wide.correct & ~narrow.correct
    return {
        "seed": seed,
        "narrow": {"top1": float(narrow.correct.float().mean()), "flops_ratio": float(narrow.flops.mean())},
        "wide": {"top1": float(wide.correct.float().mean()), "flops_ratio": float(wide.flops.mean())},
        "oracle": {
            "top1": float((narrow.correct | rescued).float().mean()),
            "flops_ratio": float((narrow.flops + wide.flops * rescued).mean()),
        },
        "cascades": [_cascade_row(narrow, wide, target) for target in args.targets],
        "curve": [_cascade_row(narrow, wide, target) for target in curve_targets(args)],
    }


def curve_targets(args) -> list[float]:
    """The plot's targets: from just above the narrow member's FLOPs to the wide member's."""
    steps = 16
    return [round(args.narrow + (args.wide - args.narrow) * (i + 0.5) / steps, 4) for i in range(steps)]


def _cascade_row(narrow: MemberOutputs, wide: MemberOutputs, target: float) -> dict:
    result = evaluate_cascade(narrow, wide, target)
    row = {"target": target, **asdict(result), "flops_ratio": result.mean_flops}
    del row["mean_flops"]  # the members' FLOPs here are shares of the full-width network already
    return row


def _mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def merged_summaries(paths: list[Path]) -> dict:
    """The cells of several accuracy-benchmark summaries, one per learning rate: the first keeps its
    arm names, the others' arms are named with their rate ("static_fkd@0.01")."""
    cells = {}
    for index, path in enumerate(paths):
        summary = json.loads(path.read_text())
        for key, cell in summary["cells"].items():
            arm, rest = key.split("|", 1)
            cells[f"{arm}@{summary['settings']['lr']:g}|{rest}" if index else key] = cell
    return {"cells": cells}


def comparisons(args, summary: dict) -> list[dict]:
    """Per cascade target: the accuracy benchmark's cells at that budget and target, for comparison."""
    out = []
    for target in args.targets:
        cells = {
            arm: {"mean": cell["mean"], "sd": cell["stdev"], "seeds": cell["seeds"]}
            for key, cell in summary["cells"].items()
            for arm, budget, at in [key.split("|")]
            if int(budget) == args.budget and abs(float(at) - target) < 1e-9
        }
        out.append({"target": target, "single_models": cells})
    return out


def print_table(args, seeds: list[dict], pooled: dict, compared: list[dict]) -> None:
    print(
        f"{args.model}: {args.narrow_arm} at {args.narrow} ({args.narrow_budget:,} images) escalating to "
        f"{args.wide_arm} at {args.wide} ({args.wide_budget:,} images); single models: {args.budget:,} images"
    )
    print(
        f"{'seed':>4s} {'narrow':>15s} {'wide':>15s} {'oracle':>15s} "
        + " ".join(f"{'cascade ' + str(t):>22s}" for t in args.targets)
    )
    for s in seeds:
        cells = [f"{100 * s[m]['top1']:6.2f} @ {s[m]['flops_ratio']:.3f}" for m in ("narrow", "wide", "oracle")]
        cells += [
            f"{100 * c['top1']:6.2f} @ {c['flops_ratio']:.3f} ({100 * c['escalated_share']:.0f}%)"
            for c in s["cascades"]
        ]
        print(
            f"{s['seed']:>4d} "
            + " ".join(f"{c:>15s}" for c in cells[:3])
            + " "
            + " ".join(f"{c:>22s}" for c in cells[3:])
        )
    print(" mean " + "  ".join(f"{n}: {100 * v['mean']:.2f} ± {100 * v['sd']:.2f}" for n, v in pooled.items()))
    for row in compared:
        singles = ", ".join(
            f"{arm} {100 * c['mean']:.2f}" + (f" ± {100 * c['sd']:.2f}" if c["sd"] is not None else "")
            for arm, c in sorted(row["single_models"].items())
        )
        print(f"single models at {row['target']}: {singles or 'none in the summary'}")


def plot(args, seeds: list[dict], summary: dict, path: Path) -> None:
    """The cascade's accuracy against its mean FLOPs (mean ± sd over seeds), beside the accuracy
    benchmark's single models at the same budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    points = list(zip(*(s["curve"] for s in seeds)))  # per target, one row per seed
    ax.errorbar(
        [statistics.fmean(r["flops_ratio"] for r in rows) for rows in points],
        [100 * statistics.fmean(r["top1"] for r in rows) for rows in points],
        yerr=[100 * _mean_sd([r["top1"] for r in rows])["sd"] for rows in points],
        marker=".",
        capsize=2,
        color="black",
        label=f"cascade: {args.narrow_arm} {args.narrow} escalating to {args.wide_arm} {args.wide}",
    )
    arms = dict.fromkeys([args.narrow_arm, args.wide_arm, *accuracy.STATIC_ARMS])
    for arm in (a for a in arms if a not in accuracy.DENSE_ARMS):
        cells = sorted(
            (cell["flops_ratio_mean"], 100 * cell["mean"], 100 * (cell["stdev"] or 0.0))
            for key, cell in summary["cells"].items()
            if key.startswith(f"{arm}|{args.budget}|") and len(cell["seeds"]) > 1
        )
        if cells:
            ax.errorbar(
                *zip(*[(c[0], c[1]) for c in cells]),
                yerr=[c[2] for c in cells],
                marker="o",
                capsize=3,
                label=f"{arm}, one network",
            )
    dense = summary["cells"].get(f"dense|{args.budget}|1.0")
    if dense:
        ax.axhline(100 * dense["mean"], color="gray", linestyle="--", label="unpruned, same fine-tune")
    ax.set_xlabel("mean FLOPs / full-width network's FLOPs (honest count, gates included)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(
        f"{args.model} on Fashion-MNIST; thresholds cross-fitted\nmembers fine-tuned on {args.narrow_budget:,} + "
        f"{args.wide_budget:,} images, single models on {args.budget:,}",
        fontsize="medium",
    )
    ax.legend(fontsize="small", loc="lower right")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def start_digest(args) -> str | None:
    """The weights digest of the dense start the members were fine-tuned from, as the accuracy
    benchmark's summaries record it (benchmarks/margin_table.py pools results by it)."""
    digests = (accuracy.summary_start_digest(json.loads(path.read_text())) for path in args.summary)
    return next((digest for digest in digests if digest), None)


def result_header(args, benchmark: str) -> dict:
    """What a JSON result of this benchmark, or of one reading its members, is about."""
    return {
        "benchmark": benchmark,
        "model": args.model,
        "dense_start_weights_sha256": start_digest(args),
        "budget": args.budget,
        "members": {  # arm, FLOPs target, learning rate, fine-tuning images
            "narrow": [args.narrow_arm, args.narrow, args.narrow_lr, args.narrow_budget],
            "wide": [args.wide_arm, args.wide, args.wide_lr, args.wide_budget],
        },
        "folds": FOLDS,
        "cpu": cpu_info().to_dict(),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    seeds = [measure_seed(args, seed) for seed in args.seeds]
    pooled = {m: _mean_sd([s[m]["top1"] for s in seeds]) for m in ("narrow", "wide", "oracle")}
    for index, target in enumerate(args.targets):
        pooled[f"cascade {target}"] = _mean_sd([s["cascades"][index]["top1"] for s in seeds])
    summary = merged_summaries(args.summary)
    compared = comparisons(args, summary)
    result = {
        **result_header(args, "cascade"),
        "seeds": seeds,
        "top1": pooled,
        "single_models": compared,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    plot(args, seeds, summary, args.out.with_suffix(".png"))
    print_table(args, seeds, pooled, compared)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
