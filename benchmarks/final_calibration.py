"""What the final calibration costs: finished gated arms as exported, and re-calibrated today.

In feedback mode (the default recipe and hybrid.yaml) the thresholds are calibrated once more after
the last step, so an arm's trained weights do not depend on how that calibration is made. For every
run folder of an accuracy-benchmark work folder (its checkpoint holds the controller's moving
averages and rate, its ``model.safetensors`` the exported thresholds), the exported network is
evaluated on the test set as it is, then with its thresholds calibrated again to the same target by
``core.calibration.calibrate_thresholds`` from those moving averages, on the same calibration
images as training. Arms calibrated before 2026-12-05 were exported from the last epoch's mean
saliencies with unbounded single-layer moves; the difference is what that cost (an arm calibrated
since reads +0.00: its thresholds are found again). JSON + table::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/final_calibration.py \\
        --work runs/bench-avf-resnet34-start4 --match 'hybrid_recipe-t0.03-*'
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from manidp_cli.analysis.evaluation import evaluate
from manidp_cli.config import load_recipe
from manidp_cli.core.calibration import calibrate_thresholds
from manidp_cli.core.flops import count_flops
from manidp_cli.data import load_data
from manidp_cli.files import atomic_write_text
from manidp_cli.io import load_pruned
from manidp_cli.training.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
import accuracy_vs_flops as accuracy  # noqa: E402 - the sibling benchmark finds the run folders


@dataclass(frozen=True)
class Recalibrated:
    run: str
    target: float  # of the network's own dense FLOPs (a hybrid's slimmed start)
    exported_top1: float
    exported_flops: float  # measured / target, test set
    recalibrated_top1: float
    recalibrated_flops: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="an accuracy_vs_flops.py --work folder")
    parser.add_argument("--match", nargs="+", default=["*"], help="run folder name patterns")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/final_calibration_<work>.json"
    )
    return parser.parse_args()


def feedback_state(checkpoint: Path) -> dict | None:
    """The controller's last moving averages and rate, or None (epoch mode, or an unfinished run)."""
    state = load_checkpoint(checkpoint)
    objective = state["per_rank"][0].get("objective") or {}
    objective = objective.get("objective", objective)  # a distilled run wraps it
    return objective.get("feedback") or None


def recalibrate(run: Path, data) -> Recalibrated | None:
    feedback = feedback_state(run / "checkpoint.pt")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if feedback is None or not feedback["means"] or "next_target" not in history[-1]:
        return None
    recipe = load_recipe(run / "recipe.yaml")
    target = history[-1]["next_target"]
    model, _ = load_pruned(run / "model.safetensors")
    table = count_flops(model, data.input_shape)
    exported = evaluate(model, data.eval, recipe.eval_batch_size, table=table)
    batches = [x for x, _ in data.train.batches(recipe.eval_batch_size, limit=recipe.schedule.calibration_images)]
    steps = recipe.schedule.search_steps
    calibrate_thresholds(model, table, feedback["means"], batches, target, steps, start=feedback["rate"])
    again = evaluate(model, data.eval, recipe.eval_batch_size, table=table)
    return Recalibrated(
        run.name,
        target,
        exported.top1,
        exported.flops.mean_ratio / target,
        again.top1,
        again.flops.mean_ratio / target,
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    data = load_data(args.data)
    runs = accuracy.run_folders(args.work, args.match)
    rows = []
    print(f"{'run':48s} {'exported':>9s} {'FLOPs':>6s} {'now':>7s} {'FLOPs':>6s} {'diff':>6s}")
    for run in runs:
        if not all((run / name).is_file() for name in ("checkpoint.pt", "model.safetensors", "metrics.jsonl")):
            continue  # a static or dense arm's folder, or one still training
        row = recalibrate(run, data)
        if row is None:
            continue
        rows.append(row)
        diff = 100 * (row.recalibrated_top1 - row.exported_top1)
        print(
            f"{row.run:48s} {100 * row.exported_top1:9.2f} {row.exported_flops:6.3f} "
            f"{100 * row.recalibrated_top1:7.2f} {row.recalibrated_flops:6.3f} {diff:+6.2f}",
            flush=True,
        )
    out = args.out or Path(__file__).parent / "results" / f"final_calibration_{args.work.name}.json"
    atomic_write_text(out, json.dumps({"work": str(args.work), "runs": [asdict(r) for r in rows]}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
