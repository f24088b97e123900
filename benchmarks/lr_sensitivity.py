"""Top-1 against the fine-tuning learning rate, per FLOPs target: the accuracy benchmark's summaries
read back (no training), so that each side can be compared at its own best rate.

The summaries of one dense start at several ``--lr`` (benchmarks/accuracy_vs_flops.py's ``--out``
files) hold every finished arm, at their own rate and at the others; each arm is counted once (by
its key), and cells are (arm, budget, target, lr) with mean, sd and the seeds. Per budget and
target the best rate of each arm is reported, with the best static and the best default cell, the
difference, and what the issue's +0.5-point margin needs beside the budget's unpruned ceiling (the
best ``dense`` / ``dense_kd`` cell at any rate). JSON + plot + printed table::

    .venv/bin/python benchmarks/lr_sensitivity.py benchmarks/results/accuracy_vs_flops_start2*.json \\
        --exclude benchmarks/results/accuracy_vs_flops_start2_bf16teacher.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from accuracy_vs_flops import DEFAULT_ARMS, DEFAULT_LR, DENSE_ARMS, MARGIN, STATIC_ARMS  # noqa: E402 - the sibling names the arms

from manidp_cli.files import atomic_write_text  # noqa: E402

SHOWN = (*DEFAULT_ARMS, *STATIC_ARMS, *DENSE_ARMS)


@dataclass(frozen=True)
class Cell:
    arm: str
    budget: int
    target: float
    lr: float
    top1: list[float]
    seeds: list[int]
    flops_ratio: float

    @property
    def mean(self) -> float:
        return statistics.mean(self.top1)

    @property
    def stdev(self) -> float | None:
        return statistics.stdev(self.top1) if len(self.top1) > 1 else None

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": self.mean, "stdev": self.stdev}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", type=Path, nargs="+", help="accuracy_vs_flops.py summaries of one dense start")
    parser.add_argument("--exclude", type=Path, nargs="*", default=[], help="summaries to leave out")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "lr_sensitivity_start2.json")
    parser.add_argument("--plot", type=Path, default=None, help="default: --out with .png")
    args = parser.parse_args()
    args.plot = args.plot or args.out.with_suffix(".png")
    return args


def read_rows(paths: list[Path]) -> list[dict]:
    """Every current arm of the summaries, once each; refuses summaries of different dense starts."""
    rows: dict[str, dict] = {}
    evaluations, digests = set(), set()  # summaries written before the weights' digest was kept lack it
    for path in paths:
        summary = json.loads(path.read_text())
        start = summary["dense_start"]
        evaluations.add(json.dumps(start["eval_top1_per_epoch"]))
        digests |= {start["weights_sha256"]} if "weights_sha256" in start else set()
        for row in summary["arms"] + summary["other_learning_rates"]:
            rows.setdefault(row["key"], row)
    if len(evaluations) > 1 or len(digests) > 1:
        raise SystemExit(
            f"error: the summaries come from different dense starts ({sorted(evaluations)}); give those of one"
        )
    return list(rows.values())


def cells_of(rows: list[dict]) -> list[Cell]:
    grouped: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["arm"] in SHOWN:
            # rows cached before the learning rate was recorded ran at the default one (split_rows)
            lr = row.get("lr", DEFAULT_LR)
            grouped.setdefault((row["arm"], row["budget"], row["target"], lr), []).append(row)
    cells = []
    for (arm, budget, target, lr), members in sorted(grouped.items()):
        members.sort(key=lambda r: r["seed"])
        top1 = [r["top1"] for r in members]
        flops = statistics.mean(r["flops_ratio"] for r in members)
        cells.append(Cell(arm, budget, target, lr, top1, [r["seed"] for r in members], flops))
    return cells


def best(cells: list[Cell], arms: tuple[str, ...], budget: int, target: float, min_seeds: int) -> Cell | None:
    """The most accurate cell of these arms at this budget and target, over every rate, among cells
    with at least ``min_seeds`` seeds."""
    mine = [c for c in cells if c.arm in arms and c.budget == budget and c.target == target]
    mine = [c for c in mine if len(c.seeds) >= min_seeds]
    return max(mine, key=lambda c: c.mean, default=None)


def comparisons(cells: list[Cell], min_seeds: int) -> list[dict]:
    out = []
    for budget in sorted({c.budget for c in cells}):
        ceiling = best(cells, DENSE_ARMS, budget, 1.0, min_seeds)
        for target in sorted({c.target for c in cells if c.budget == budget and c.arm in DEFAULT_ARMS}):
            mine = best(cells, DEFAULT_ARMS, budget, target, min_seeds)
            static = best(cells, STATIC_ARMS, budget, target, min_seeds)
            if mine is None or static is None:
                continue
            needed = static.mean + MARGIN
            out.append(
                {
                    "budget": budget,
                    "target": target,
                    "default": mine.to_dict(),
                    "best_static": static.to_dict(),
                    "difference": mine.mean - static.mean,
                    "needed_for_margin": needed,
                    "unpruned_ceiling": ceiling.to_dict() if ceiling else None,
                    "margin_above_ceiling": needed - ceiling.mean if ceiling else None,
                }
            )
    return out


def compared_targets(cells: list[Cell], budget: int) -> list[float]:
    """Targets of this budget with a static and a default cell, where some arm has two rates or more:
    the panels worth drawing (largest target first)."""
    here = [c for c in cells if c.budget == budget]
    both = {c.target for c in here if c.arm in STATIC_ARMS} & {c.target for c in here if c.arm in DEFAULT_ARMS}
    swept = {c.target for c in here if sum(o.arm == c.arm and o.target == c.target for o in here) > 1}
    return sorted(both & swept, reverse=True)


def plot(cells: list[Cell], path: Path) -> None:
    """One row per budget with a learning-rate sweep, one panel per compared target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {b: t for b in sorted({c.budget for c in cells}) if (t := compared_targets(cells, b))}
    if not rows:
        print("no plot: no target with a static and a default cell and two learning rates", flush=True)
        return
    columns = max(len(t) for t in rows.values())
    fig, axes = plt.subplots(
        len(rows), columns, figsize=(5 * columns, 4.5 * len(rows)), layout="constrained", squeeze=False
    )
    for row, (budget, targets) in zip(axes, rows.items()):
        for ax, target in zip(row, targets):
            _panel(ax, cells, budget, target)
        for ax in row[len(targets) :]:
            ax.set_visible(False)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _panel(ax, cells: list[Cell], budget: int, target: float) -> None:
    here = [c for c in cells if c.budget == budget]
    for colour, arm in enumerate((*DEFAULT_ARMS, *STATIC_ARMS)):  # one colour per arm on every panel
        mine = sorted((c for c in here if c.arm == arm and c.target == target), key=lambda c: c.lr)
        if mine:
            ax.errorbar(
                [c.lr for c in mine],
                [100 * c.mean for c in mine],
                yerr=[100 * (c.stdev or 0.0) for c in mine],
                color=f"C{colour}",
                marker="o",
                capsize=3,
                label=arm,
            )
    ceiling = best(cells, DENSE_ARMS, budget, 1.0, min_seeds=1)
    if ceiling:
        seeds = f"{len(ceiling.seeds)} seed{'s' if len(ceiling.seeds) > 1 else ''}"
        label = f"unpruned ({ceiling.arm}, lr {ceiling.lr}, {seeds})"
        ax.axhline(100 * ceiling.mean, color="gray", linestyle="--", label=label)
    rates = sorted({c.lr for c in here})
    ax.set_xscale("log")
    ax.set_xticks(rates, [f"{lr:g}" for lr in rates])
    ax.minorticks_off()
    ax.set_xlabel("fine-tuning learning rate (SGD, cosine)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{target:.2f} of the FLOPs, {budget:,} images")
    ax.legend(fontsize="x-small", loc="best", framealpha=0.6)


def main() -> None:
    args = parse_args()
    excluded = {path.resolve() for path in args.exclude}
    paths = [path for path in args.summaries if path.resolve() not in excluded]
    cells = cells_of(read_rows(paths))
    verdicts = comparisons(cells, min_seeds=3)
    result = {
        "benchmark": "lr_sensitivity",
        "summaries": [str(path) for path in paths],
        "cells": [c.to_dict() for c in cells],
        "best_rate_comparisons": verdicts,  # cells of 3 seeds or more only
    }
    atomic_write_text(args.out, json.dumps(result, indent=1))
    plot(cells, args.plot)
    print(f"{'arm':12s} {'budget':>7s} {'target':>6s} {'lr':>6s} {'top1':>7s} {'sd':>6s} seeds")
    for c in cells:
        sd = f"{100 * c.stdev:6.2f}" if c.stdev is not None else "      "
        print(f"{c.arm:12s} {c.budget:>7,} {c.target:6.2f} {c.lr:6.3f} {100 * c.mean:7.2f} {sd} {len(c.seeds)}")
    for v in verdicts:
        d, s = v["default"], v["best_static"]
        line = (
            f"budget {v['budget']:>7,} target {v['target']:.2f}: {d['arm']} {100 * d['mean']:.2f} (lr {d['lr']}) vs "
            f"{s['arm']} {100 * s['mean']:.2f} (lr {s['lr']}): {100 * v['difference']:+.2f}"
        )
        if v["unpruned_ceiling"]:
            needed, above = 100 * v["needed_for_margin"], 100 * v["margin_above_ceiling"]
            line += f"; +0.5 needs {needed:.2f}, {above:+.2f} from the unpruned ceiling"
        print(line)


if __name__ == "__main__":
    main()
