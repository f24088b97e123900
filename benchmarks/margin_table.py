"""Issue #14's target, cell by cell: every dense start's best manidp and best static arm, pooled.

benchmarks/accuracy_vs_flops.py writes one summary per work folder and learning rate, and docs/
results.md reports each in its own section. This reads the committed summaries, pools the arms
that ran from one dense start (same weights digest; a summary without one is a start of its own)
over every learning rate and recipe, and for each fine-tuning budget and FLOPs target gives:
the best static arm and the best manidp arm (highest mean top-1 over at least ``--min-seeds``
seeds, each at its own best learning rate), the default recipe's best, the unpruned network
fine-tuned as long (the ceiling), and the issue's verdict: at 0.45 manidp >= the best static arm,
at 0.30 and 0.15 at least 0.5 point above it and above the larger seed sd. Picking the best of
many manidp variants favours manidp (the best of many noisy means is biased upwards); the default's
column carries no such selection. A second table does the same for escalation cascades whose wide
member is the dense start itself (benchmarks/cascade.py ``--wide-arm start``: no fine-tuning images
besides the narrow member's, so the same optimiser budget as one network): the best cascade of each
cell, over narrow members and arms, against the same best static network. JSON + printed tables::

    .venv/bin/python benchmarks/margin_table.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from manidp_cli.files import atomic_write_text

sys.path.insert(0, str(Path(__file__).parent))
import accuracy_vs_flops as accuracy  # noqa: E402 - the sibling benchmark names the arms and the margin

RESULTS = Path(__file__).parent / "results"
TARGETS = (0.45, 0.3, 0.15)
BUDGETS = (18000, 180000)  # the issue's fine-tuning budgets (cascade members ran at others)
EQUAL_ONLY = 0.45  # the target where the issue asks manidp to be level, not ahead


@dataclass(frozen=True)
class Cell:
    """One arm at one learning rate, budget and target of one start, over its seeds."""

    arm: str
    lr: float
    mean: float
    stdev: float | None  # None for one seed
    seeds: tuple[int, ...]
    top1: tuple[float, ...]

    def figure(self) -> str:
        spread = f" ± {self.stdev:.2f}" if self.stdev is not None else ""
        return f"{self.mean:.2f}{spread}"


@dataclass(frozen=True)
class Verdict:
    start: str  # the dense start's weights digest, shortened
    label: str  # the first name, in sorted order, of a summary from that start
    model: str
    budget: int
    target: float
    best_static: Cell
    best_manidp: Cell | None
    default: Cell | None
    unpruned: Cell | None  # the best, over any number of seeds
    difference: float | None  # best manidp minus best static, in points
    needed: float  # top-1 % that the target asks of manidp
    needed_above_unpruned: float | None  # > 0: the target asks more than the unpruned network gives
    met: bool
    # the best cascade escalating to the dense start from a manidp network (arm: "narrow arm at its
    # FLOPs -> start"), judged as best_manidp is; and the best from a static network, for comparison
    best_cascade: Cell | None = None
    best_static_cascade: Cell | None = None
    cascade_difference: float | None = None
    cascade_met: bool = False


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summaries", nargs="+", type=Path, default=None, help="default: resnet summaries in results/")
    parser.add_argument("--min-seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "margin_table.json")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown (docs/results.md)")
    args = parser.parse_args()
    missing = [str(path) for path in args.summaries or [] if not path.is_file()]
    if missing:
        parser.error(f"no summary file {', '.join(missing)}: give accuracy_vs_flops.py --out files")
    return args


def read_summaries(paths: list[Path]) -> list[tuple[Path, dict]]:
    return [(path, json.loads(path.read_text())) for path in paths]


def default_summaries() -> list[tuple[Path, dict]]:
    """The ResNet summaries that name their start's weights (older ones cannot be matched to a start;
    the 2026-11-30 one also predates the honest FLOPs count)."""
    found = [path for path in sorted(RESULTS.glob("accuracy_vs_flops_*.json")) if "mobilenet" not in path.name]
    return [(path, summary) for path, summary in read_summaries(found) if accuracy.summary_start_digest(summary)]


@dataclass
class Start:
    model: str
    labels: list[str]
    runs: dict[tuple[str, int], dict]  # (arm key, seed) -> the arm's row: each run once


def starts_of(summaries: list[tuple[Path, dict]]) -> dict[str, Start]:
    """The current arm rows of every summary, by dense start (its weights digest, else the file's name)."""
    starts: dict[str, Start] = {}
    for path, summary in summaries:
        label = path.stem.removeprefix("accuracy_vs_flops_")
        digest = accuracy.summary_start_digest(summary)
        start = starts.setdefault((digest or label)[:8], Start(summary["model"], [], {}))
        start.labels.append(label)
        for row in [*summary.get("arms", []), *summary.get("other_learning_rates", [])]:
            start.runs.setdefault((row["key"], row["seed"]), row)
    return starts


def cascades_to_the_start() -> dict[str, list[tuple[str, int, float, Cell]]]:
    """Committed cascade results whose wide member is the dense start, by start (digest, shortened):
    (side, budget, target, the cascade over its seeds) for every target each measured; side is
    "cascade static" or "cascade manidp", by the narrow member's arm."""
    found: dict[str, list[tuple[str, int, float, Cell]]] = {}
    for path in sorted(RESULTS.glob("cascade_*.json")):
        result = json.loads(path.read_text())
        digest = result.get("dense_start_weights_sha256")  # older results name no start
        if result.get("benchmark") != "cascade" or not digest or result["members"]["wide"][0] != "start":
            continue
        arm, narrow, lr, budget = result["members"]["narrow"]
        for index, target in enumerate(row["target"] for row in result["seeds"][0]["cascades"]):
            runs = [(seed["seed"], 100 * seed["cascades"][index]["top1"]) for seed in result["seeds"]]
            top1 = tuple(value for _, value in runs)
            spread = statistics.stdev(top1) if len(top1) > 1 else None
            cell = Cell(
                f"{arm} {narrow:g} -> start", lr, statistics.mean(top1), spread, tuple(s for s, _ in runs), top1
            )
            found.setdefault(digest[:8], []).append((f"cascade {side(arm)}", budget, target, cell))
    return found


def required_margin(target: float) -> float:
    """The lead (points) the issue asks over the best static network: none at 0.45, the margin below."""
    return 0.0 if target >= EQUAL_ONLY else 100 * accuracy.MARGIN


def judged(candidate: Cell | None, static: Cell, target: float) -> tuple[float | None, bool]:
    """The candidate's lead over the best static network, and whether the issue's target is met:
    level at 0.45; at least the margin, and more than the larger seed sd, below it."""
    if candidate is None:
        return None, False
    margin = required_margin(target)
    difference = candidate.mean - static.mean
    spread = max(candidate.stdev or 0.0, static.stdev or 0.0)
    return difference, difference >= margin and (margin == 0 or difference > spread)


def cells_of(rows: list[dict]) -> dict[tuple[str, int, float], list[Cell]]:
    """(side, budget, target) -> every arm and learning rate measured there; side is static,
    unpruned or manidp."""
    grouped: dict[tuple[str, str, float, int, float], list[dict]] = {}
    for row in rows:
        lr = row.get("lr", accuracy.DEFAULT_LR)
        grouped.setdefault((side(row["arm"]), labelled(row), lr, row["budget"], row["target"]), []).append(row)
    cells: dict[tuple[str, int, float], list[Cell]] = {}
    for (arm_side, arm, lr, budget, target), runs in grouped.items():
        runs.sort(key=lambda run: run["seed"])
        top1 = tuple(100 * run["top1"] for run in runs)
        spread = statistics.stdev(top1) if len(top1) > 1 else None
        cell = Cell(arm, lr, statistics.mean(top1), spread, tuple(run["seed"] for run in runs), top1)
        cells.setdefault((arm_side, budget, target), []).append(cell)
    return cells


def labelled(row: dict) -> str:
    """The arm's name, with its fine-tuning batch where that is not the benchmark's default (one arm at two
    batches is two cells, never pooled)."""
    batch = row.get("batch", accuracy.DEFAULT_BATCH)
    return row["arm"] if batch == accuracy.DEFAULT_BATCH else f"{row['arm']}, batch {batch}"


def side(arm: str) -> str:
    if arm in accuracy.STATIC_ARMS:
        return "static"
    return "unpruned" if arm in accuracy.DENSE_ARMS else "manidp"


def best(cells: list[Cell], min_seeds: int = 1) -> Cell | None:
    return max((cell for cell in cells if len(cell.seeds) >= min_seeds), key=lambda cell: cell.mean, default=None)


def verdict(start: str, facts: Start, budget: int, target: float, cells: dict, min_seeds: int) -> Verdict | None:
    static = best(cells.get(("static", budget, target), []), min_seeds)
    if static is None:
        return None
    tried = cells.get(("manidp", budget, target), [])
    manidp = best(tried, min_seeds)
    default = best([cell for cell in tried if cell.arm in accuracy.DEFAULT_ARMS], min_seeds)
    unpruned = best(cells.get(("unpruned", budget, 1.0), []))
    needed = static.mean + required_margin(target)
    difference, met = judged(manidp, static, target)
    cascade = best(cells.get(("cascade manidp", budget, target), []), min_seeds)
    static_cascade = best(cells.get(("cascade static", budget, target), []), min_seeds)
    cascade_difference, cascade_met = judged(cascade, static, target)
    above = needed - unpruned.mean if unpruned else None
    label = min(facts.labels)
    return Verdict(
        start,
        label,
        facts.model,
        budget,
        target,
        static,
        manidp,
        default,
        unpruned,
        difference,
        needed,
        above,
        met,
        cascade,
        static_cascade,
        cascade_difference,
        cascade_met,
    )


def verdicts(summaries: list[tuple[Path, dict]], min_seeds: int) -> list[Verdict]:
    out = []
    cascades = cascades_to_the_start()
    for start, facts in starts_of(summaries).items():
        cells = cells_of(list(facts.runs.values()))
        for cascade_side, budget, target, cell in cascades.get(start, []):
            cells.setdefault((cascade_side, budget, target), []).append(cell)
        for budget in sorted({budget for _, budget, _ in cells} & set(BUDGETS)):
            found = (verdict(start, facts, budget, target, cells, min_seeds) for target in TARGETS)
            out.extend(v for v in found if v is not None)
    return out


def shown(cell: Cell | None) -> str:
    return f"{cell.figure()} ({len(cell.seeds)}) {cell.arm} @{cell.lr:g}" if cell else "-"


def signed(value: float | None, width: int = 0) -> str:
    """``value`` in points with its sign, or blanks where there is none."""
    if value is None:
        return "-".rjust(width) if width else ""
    return f"{value:+{width}.2f}"


def print_table(rows: list[Verdict]) -> None:
    """One line of figures per cell, then the arms behind them; "> unpruned" is how far the target
    lies above the unpruned network fine-tuned as long (positive: beyond it)."""
    print(f"{'start':22s} {'images':>7s} {'FLOPs':>5s} {'met':>3s} {'diff':>6s} {'needed':>6s} {'> unpruned':>10s}")
    for v in rows:
        diff, above, met = signed(v.difference, 6), signed(v.needed_above_unpruned, 10), "yes" if v.met else "no"
        print(f"{v.start} {v.label:13s} {v.budget:7d} {v.target:5.2f} {met:>3s} {diff} {v.needed:6.2f} {above}")
        print(f"    static {shown(v.best_static)} | manidp {shown(v.best_manidp)} | default {shown(v.default)}")
        print(f"    unpruned {shown(v.unpruned)}")
        if v.best_cascade:
            met = "yes" if v.cascade_met else "no"
            print(f"    cascade {shown(v.best_cascade)} {signed(v.cascade_difference)} met {met}")
        if v.best_static_cascade:
            print(f"    cascade from a static network {shown(v.best_static_cascade)}")


def markdown_cell(cell: Cell | None) -> str:
    return f"{cell.figure()} (`{cell.arm}`, lr {cell.lr:g}, {len(cell.seeds)} seeds)" if cell else "not run"


def print_markdown(rows: list[Verdict]) -> None:
    print("| start | images | FLOPs | best static | best manidp | difference | target met | target above unpruned |")
    print("| --- | ---: | ---: | --- | --- | ---: | --- | ---: |")
    for v in rows:
        static, manidp = markdown_cell(v.best_static), markdown_cell(v.best_manidp)
        figures = f"{signed(v.difference)} | {'yes' if v.met else 'no'} | {signed(v.needed_above_unpruned)}"
        print(f"| {v.label} ({v.start}) | {v.budget:,} | {v.target:.2f} | {static} | {manidp} | {figures} |")
    with_cascades = [v for v in rows if v.best_cascade or v.best_static_cascade]
    if not with_cascades:
        return
    print(
        "\n| start | images | FLOPs | best static | best cascade to the dense start, manidp narrow | difference "
        "| target met | best cascade to the dense start, static narrow |"
    )
    print("| --- | ---: | ---: | --- | --- | ---: | --- | --- |")
    for v in with_cascades:
        static, cascade = markdown_cell(v.best_static), markdown_cell(v.best_cascade)
        figures = f"{signed(v.cascade_difference)} | {'yes' if v.cascade_met else 'no'}"
        other = markdown_cell(v.best_static_cascade)
        print(f"| {v.label} ({v.start}) | {v.budget:,} | {v.target:.2f} | {static} | {cascade} | {figures} | {other} |")


def main() -> None:
    args = parse_args()
    summaries = read_summaries(args.summaries) if args.summaries else default_summaries()
    rows = verdicts(summaries, args.min_seeds)
    (print_markdown if args.markdown else print_table)(rows)
    report = {
        "summaries": [path.name for path, _ in summaries],
        "min_seeds": args.min_seeds,
        "cells": [asdict(v) for v in rows],
    }
    atomic_write_text(args.out, json.dumps(report, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
