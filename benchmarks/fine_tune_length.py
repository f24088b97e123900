"""Accuracy against fine-tuning length: does a lead at a short fine-tune survive more steps?

benchmarks/accuracy_vs_flops.py fine-tunes every arm for 3 epochs of ``budget / 3`` images at
``--batch``: 18,000 images at batch 128 are 141 optimiser steps, at batch 64 twice as many. This
reads the committed summaries of one dense start (rows pooled by key, so a row in two summaries
counts once), keeps the chosen arms at one FLOPs target, and reports for every (images, batch)
measured: the optimiser steps, each arm's mean ± sd over its seeds at its best learning rate (the
highest mean among those run with at least ``--min-seeds`` seeds), and each arm's lead over the best
of the ``--reference`` arms (static pruning) that ran at the same images and batch, each at its own
best rate. An unpruned arm (``dense``) among ``--arms`` is read at 1.0 of the FLOPs: its lead is the
room static pruning leaves below the network it starts from. Printed table, JSON, and a plot of
top-1 against steps::

    .venv/bin/python benchmarks/fine_tune_length.py --target 0.3 \\
        --summaries benchmarks/results/accuracy_vs_flops_resnet18_s44{,_b64}.json \\
        benchmarks/results/accuracy_vs_flops_resnet18_180k.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from manidp_cli.files import atomic_write_text

sys.path.insert(0, str(Path(__file__).parent))
import accuracy_vs_flops as accuracy  # noqa: E402 - the sibling benchmark's fine-tune length and batch

RESULTS = Path(__file__).parent / "results"
DEFAULT_ARMS = ("static_fkd", "hybrid_recipe_s025_fkd", "hybrid_recipe_s025_fkd_frozen_gates")


@dataclass(frozen=True)
class Length:
    """One arm at one fine-tuning length (images and batch), over its seeds (top-1 %)."""

    arm: str
    images: int
    batch: int
    lr: float
    steps: int
    seeds: tuple[int, ...]
    top1: tuple[float, ...]
    mean: float
    stdev: float | None  # None for one seed
    lead: float | None  # mean minus the best reference arm's at the same images and batch (None: none ran)
    reference: str | None  # that reference arm


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summaries", nargs="+", type=Path, required=True, help="accuracy_vs_flops.py --out files")
    parser.add_argument("--target", type=float, default=0.3, help="the FLOPs target of the rows compared")
    parser.add_argument("--min-seeds", type=int, default=3, help="seeds a learning rate needs to be compared")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS))
    parser.add_argument(
        "--reference",
        nargs="+",
        default=["static_fkd"],
        help="the arms every lead is measured against: the best of them that ran at the same images and batch",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "fine_tune_length.json")
    args = parser.parse_args()
    missing = [str(path) for path in args.summaries if not path.is_file()]
    if missing:
        parser.error(f"no summary file {', '.join(missing)}: give accuracy_vs_flops.py --out files")
    strangers = [arm for arm in args.reference if arm not in args.arms]
    if strangers:
        parser.error(f"--reference {' '.join(strangers)} not among --arms ({', '.join(args.arms)})")
    return args


def pooled_rows(paths: list[Path]) -> tuple[str, list[dict]]:
    """(the dense start's weights digest, every arm row once) from summaries of that one start."""
    digests, rows = set(), {}
    for path in paths:
        summary = json.loads(path.read_text())
        digests.add(accuracy.summary_start_digest(summary))
        for row in [*summary["arms"], *summary["other_learning_rates"], *summary.get("other_batches", [])]:
            rows.setdefault((row["key"], row["seed"]), row)
    if len(digests) != 1 or None in digests:
        raise SystemExit(f"error: the summaries come from {len(digests)} dense starts; give summaries of one")
    return digests.pop(), list(rows.values())


def optimiser_steps(images: int, batch: int) -> int:
    epochs = accuracy.FINE_TUNE_EPOCHS
    return epochs * math.ceil(images // epochs / batch)


def lengths(rows: list[dict], args) -> list[Length]:
    """Each arm at every (images, batch) it ran at, at its best learning rate, sorted by steps; leads
    over ``--reference``."""
    runs: dict[tuple[str, int, int, float], dict[int, float]] = {}
    for row in rows:
        # the unpruned arms run at 1.0 only: read beside the pruned ones, they are the ceiling
        target = 1.0 if row["arm"] in accuracy.DENSE_ARMS else args.target
        if row["arm"] in args.arms and row["target"] == target:
            where = (row["arm"], row["budget"], row.get("batch", accuracy.DEFAULT_BATCH), row["lr"])
            runs.setdefault(where, {})[row["seed"]] = 100 * row["top1"]
    best: dict[tuple[str, int, int], tuple[float, float, dict[int, float]]] = {}  # -> (mean, lr, top1)
    for (arm, images, batch, lr), top1 in runs.items():
        mean = statistics.mean(top1.values())
        if len(top1) >= args.min_seeds and mean > best.get((arm, images, batch), (-math.inf,))[0]:
            best[(arm, images, batch)] = (mean, lr, top1)
    means = {where: mean for where, (mean, _, _) in best.items()}
    found = []
    for (arm, images, batch), (mean, lr, top1) in best.items():
        references = [(means[(ref, images, batch)], ref) for ref in args.reference if (ref, images, batch) in means]
        reference = max(references, default=None)
        found.append(
            Length(
                arm,
                images,
                batch,
                lr,
                optimiser_steps(images, batch),
                tuple(sorted(top1)),
                tuple(top1[seed] for seed in sorted(top1)),
                mean,
                statistics.stdev(top1.values()) if len(top1) > 1 else None,
                None if reference is None else mean - reference[0],
                None if reference is None else reference[1],
            )
        )
    return sorted(found, key=lambda cell: (cell.steps, cell.images, args.arms.index(cell.arm)))


def table(cells: list[Length]) -> str:
    lines = [
        "| images | batch | steps | arm | lr | top-1 % | seeds | lead | over |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for cell in cells:
        spread = f" ± {cell.stdev:.2f}" if cell.stdev is not None else ""
        lead, over = ("", "") if cell.lead is None else (f"{cell.lead:+.2f}", f"`{cell.reference}`")
        lines.append(
            f"| {cell.images:,} | {cell.batch} | {cell.steps} | `{cell.arm}` | {cell.lr:g} | {cell.mean:.2f}{spread} "
            f"| {len(cell.seeds)} | {lead} | {over} |"
        )
    return "\n".join(lines)


def plot(cells: list[Length], arms: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # batch 64 drawn hollow and a little to the right: at 18,000 images it makes as many steps as
    # 36,000 images at batch 128, and the two would hide each other
    for index, arm in enumerate(arms):
        for batch, marker, shift in ((accuracy.DEFAULT_BATCH, "o-", 1.0), (64, "s", 1.05)):
            points = [cell for cell in cells if cell.arm == arm and cell.batch == batch]
            if points:
                axes.errorbar(
                    [cell.steps * shift for cell in points],
                    [cell.mean for cell in points],
                    yerr=[cell.stdev or 0.0 for cell in points],
                    fmt=marker,
                    color=colours[index % len(colours)],
                    markerfacecolor="none" if batch == 64 else None,
                    capsize=3,
                    label=arm if batch == accuracy.DEFAULT_BATCH else f"{arm}, batch 64",
                )
    axes.set_xscale("log")
    axes.set_xlabel(f"optimiser steps of the fine-tune ({accuracy.FINE_TUNE_EPOCHS} epochs; log scale)")
    axes.set_ylabel("top-1 % (mean ± sd over seeds)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    partial = path.with_name(path.name + ".partial.png")
    figure.savefig(partial, dpi=120)
    partial.replace(path)
    plt.close(figure)


def main() -> None:
    args = parse_args()
    digest, rows = pooled_rows(args.summaries)
    cells = lengths(rows, args)
    if not cells:
        raise SystemExit(f"error: no row of {', '.join(args.arms)} at target {args.target} with {args.min_seeds} seeds")
    print(table(cells))
    result = {
        "benchmark": "fine_tune_length",
        "dense_start_weights_sha256": digest,
        "summaries": [path.name for path in args.summaries],
        "target": args.target,
        "min_seeds": args.min_seeds,
        "reference": args.reference,
        "cells": [asdict(cell) for cell in cells],
    }
    atomic_write_text(args.out, json.dumps(result, indent=1))
    title = (
        f"start {digest[:8]}, {args.target:g} of the FLOPs: top-1 against fine-tuning steps (each arm at its best lr)"
    )
    plot(cells, args.arms, title, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
