"""Normalisation statistics refreshed after training: does either side of the comparison gain?

A gated network trains while its thresholds move after every step, so the running BatchNorm
statistics it exports mix the masks of its last steps; a static network's come from augmented
training batches. Either could sit off the statistics of the finished network on unaugmented
images. For every run folder of an accuracy-benchmark work folder that matches, the trained
network (manidp's export, or a static or dense arm's network) is evaluated on the test set as
saved, then again after its normalisation layers' running statistics are recomputed as plain
averages over ``--images`` training images (gates, thresholds and weights unchanged; unaugmented
unless ``--augment``). JSON + table::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/norm_refresh.py --work runs/bench-avf-resnet34-start3 \\
        --match 'hybrid_recipe_s025_fkd_bn_scale-t0.15-b18000-*' 'static_fkd_taylor-t0.15-b18000-*'
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from manidp_cli.analysis.evaluation import evaluate
from manidp_cli.data import ImageData, load_data
from manidp_cli.files import atomic_write_text
from manidp_cli.io import load_pruned
from manidp_cli.models.factory import create_model

sys.path.insert(0, str(Path(__file__).parent))
import accuracy_vs_flops as accuracy  # noqa: E402 - the sibling benchmark names the network file

BATCH = 256


@dataclass(frozen=True)
class Refreshed:
    run: str
    saved_top1: float
    refreshed_top1: float  # after the statistics were recomputed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="an accuracy_vs_flops.py --work folder")
    parser.add_argument("--model", default="resnet34", help="the timm model of the static and dense arms")
    parser.add_argument("--match", nargs="+", default=["*"], help="run folder name patterns")
    parser.add_argument("--images", type=int, default=8192, help="training images the statistics average")
    parser.add_argument("--augment", action="store_true", help="refresh on augmented training images")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/norm_refresh_<work>.json")
    args = parser.parse_args()
    if not (args.work / "runs").is_dir():
        parser.error(f"--work {args.work} has no runs/ folder: give an accuracy_vs_flops.py --work folder")
    return args


def trained_network(run: Path, model_name: str, data: ImageData) -> nn.Module:
    """A manidp export (its metadata says what to build) or a static or dense arm's network."""
    path = run / accuracy.NETWORK_FILE
    if (run / "metrics.jsonl").is_file():
        return load_pruned(path)[0]
    return create_model(model_name, num_classes=data.num_classes, in_chans=data.in_chans, weights=path)


def refresh_statistics(model: nn.Module, data: ImageData, images: int, augment: bool) -> None:
    """Running means and variances recomputed as cumulative averages; everything else in eval mode."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over every batch, not an exponential one
        norm.train()
    with torch.no_grad():
        for batch, _ in data.train.batches(BATCH, shuffle=True, augment=augment, seed=0, limit=images):
            model(batch)
    model.eval()


def measure(run: Path, args: argparse.Namespace, data: ImageData) -> Refreshed:
    saved = evaluate(trained_network(run, args.model, data), data.eval, BATCH).top1
    model = trained_network(run, args.model, data)
    refresh_statistics(model, data, args.images, args.augment)
    return Refreshed(run.name, saved, evaluate(model, data.eval, BATCH).top1)


def printed(row: Refreshed) -> Refreshed:
    diff = 100 * (row.refreshed_top1 - row.saved_top1)
    print(f"{row.run:60s} {100 * row.saved_top1:7.2f} {100 * row.refreshed_top1:9.2f} {diff:+6.2f}", flush=True)
    return row


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    data = load_data(args.data)
    # a folder without its network is still training
    finished = [run for run in accuracy.run_folders(args.work, args.match) if (run / accuracy.NETWORK_FILE).is_file()]
    print(f"{'run':60s} {'saved':>7s} {'refreshed':>9s} {'diff':>6s}")
    rows = [printed(measure(run, args, data)) for run in finished]
    out = args.out or Path(__file__).parent / "results" / f"norm_refresh_{args.work.name}.json"
    settings = {"work": str(args.work), "images": args.images, "augment": args.augment}
    atomic_write_text(out, json.dumps({**settings, "runs": [asdict(row) for row in rows]}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
