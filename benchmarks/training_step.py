"""Training cost: one fine-tuning step of ``manidp prune`` (the default recipe) against a dense step
and the static arms' steps (Torch-Pruning's L1 network, with and without distillation), in one run;
``manidp_no_distill`` is the same step without distillation, so the teacher's share shows apart, and
``manidp_teacher_fp32`` the same step with a float32 teacher (the default, ``loss.teacher_dtype:
auto``, runs it in bf16 where the CPU computes bf16 natively; the static arm's teacher follows it),
and ``manidp_masked`` the step of masked training, which computes every channel of a gated
convolution and multiplies the dropped ones by zero (``narrow_training: false``; the default
computes only the batch's kept channels, ``manidp_cli.core.narrow``).

Every arm trains ``--model`` (resnet18 by default; ``in_chans=1``, 10 classes) at batch 128, as the
accuracy benchmark does, on the same images. The arms take turns, run by run (the order reversed
every round), so that a shared machine's drift falls on all of them alike; a step's time is the wall
time between two step callbacks (the batch's loading included, the same for every arm), the first
``--skip`` steps of each run left out. For ``manidp`` the threshold calibrations (before the first
step, and after the last epoch) are timed apart, and their share of an epoch is given for the
accuracy benchmark's epoch (6,000 images) and for a full Fashion-MNIST epoch (60,000). Writes
``benchmarks/results/training_step.json``::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/training_step.py --threads 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/training_step.py --quick   # smoke check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from manidp_cli.analysis.machine import cpu_info
from manidp_cli.api.jobs import prepare, run
from manidp_cli.config import OptimizerConfig
from manidp_cli.data import load_data
from manidp_cli.files import atomic_write_text
from manidp_cli.models.factory import create_model
from manidp_cli.runtime.static_l1 import static_l1
from manidp_cli.training.engine import fit
from manidp_cli.training.objectives import CrossEntropyObjective, Distilled, ManiDPObjective
from manidp_cli.training.precision import teacher_dtype

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import accuracy_vs_flops as accuracy  # noqa: E402 - the sibling benchmark names the default model and its files

BATCH = 128
TARGET = 0.3
MANIDP_ARMS = {  # manidp arms -> their overrides of the default recipe
    "manidp": {},
    # what loss.teacher_dtype auto saves, where it is bf16
    "manidp_teacher_fp32": {"loss": {"teacher_dtype": "float32"}},
    # the same step without the teacher's forward pass
    "manidp_no_distill": {"loss": {"distill_weight": 0.0}},
    # every channel of a gated convolution computed, then masked (the default before narrow training)
    "manidp_masked": {"narrow_training": False},
    "manidp_masked_no_distill": {"narrow_training": False, "loss": {"distill_weight": 0.0}},
}
EPOCH_IMAGES = {"accuracy_benchmark_epoch": 6000, "fashion_mnist_epoch": 60000}


class StepClock:
    """Wall time between step callbacks, the first ``skip`` steps of a run left out."""

    def __init__(self, skip: int):
        self.skip = skip
        self.times: list[float] = []
        self._last: float | None = None
        self._seen = 0

    def start(self) -> None:
        self._last, self._seen = None, 0

    def __call__(self, info) -> None:
        now = time.perf_counter()
        if self._last is not None and self._seen >= self.skip:
            self.times.append(now - self._last)
        self._last = now
        self._seen += 1


class CalibrationClock:
    """Seconds ManiDPObjective spends in ``setup`` (the first calibration) and ``end_epoch``."""

    def __init__(self):
        self.setup: list[float] = []
        self.end_epoch: list[float] = []

    def install(self) -> None:
        setup, end_epoch = ManiDPObjective.setup, ManiDPObjective.end_epoch

        def timed_setup(objective, model):
            start = time.perf_counter()
            try:
                return setup(objective, model)
            finally:
                self.setup.append(time.perf_counter() - start)

        def timed_end_epoch(objective, model, epoch):
            start = time.perf_counter()
            try:
                return end_epoch(objective, model, epoch)
            finally:
                self.end_epoch.append(time.perf_counter() - start)

        ManiDPObjective.setup, ManiDPObjective.end_epoch = timed_setup, timed_end_epoch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--model", default=accuracy.DEFAULT_MODEL, help="a timm network")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="steps per run")
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps of each run left out")
    parser.add_argument("--out", type=Path, default=None, help="default: results/training_step[_MODEL].json")
    parser.add_argument("--quick", action="store_true", help="embedded data, 1 round of 4 steps")
    args = parser.parse_args()
    args.out = args.out or ROOT / "results" / f"training_step{accuracy.model_suffix(args.model)}.json"
    if args.quick:
        args.data, args.rounds, args.steps, args.skip = "embedded", 1, 4, 1
        args.out = args.out.with_name("training_step_quick.json")
    return args


def _dense_weights(args, work: Path) -> Path:
    """A dense start for the pruned arms: one short dense run (its weights only set the arms going)."""
    out = work / "dense-start"
    overrides = {"data": args.data, "epochs": 1, "batch_size": BATCH, "train_images": BATCH * 2}
    run(prepare("train", args.model, out_dir=out, overrides=overrides))
    return out / "model.safetensors"


def _fit_arm(model, data, objective, args, clock: StepClock) -> None:
    fit(
        model,
        data,
        objective,
        epochs=1,
        batch_size=BATCH,
        optimizer_config=OptimizerConfig(lr=0.05),
        train_limit=BATCH * args.steps,
        on_step=clock,
    )


def run_arm(arm: str, args, data, weights: Path, work: Path, clock: StepClock) -> None:
    clock.start()
    if arm in MANIDP_ARMS:
        overrides = {
            "data": args.data,
            "epochs": 1,
            "batch_size": BATCH,
            "train_images": BATCH * args.steps,
            "target_flops": TARGET,
        }
        overrides.update(MANIDP_ARMS[arm])
        out = Path(tempfile.mkdtemp(dir=work))
        run(prepare("prune", args.model, weights=weights, out_dir=out / "run", overrides=overrides), on_step=clock)
        return
    model = create_model(args.model, num_classes=data.num_classes, in_chans=data.in_chans, weights=weights)
    objective = CrossEntropyObjective()
    if arm in ("static", "static_kd"):
        model = static_l1(model, TARGET, data.input_shape).model
    if arm == "static_kd":
        teacher = create_model(args.model, num_classes=data.num_classes, in_chans=data.in_chans, weights=weights)
        objective = Distilled(objective, teacher, 1.0, 4.0, teacher_dtype=teacher_dtype("auto", torch.device("cpu")))
    _fit_arm(model, data, objective, args, clock)


def summarise(args, clocks: dict[str, StepClock], calibration: CalibrationClock, wall: float) -> dict:
    steps = {
        arm: {
            "median_s": statistics.median(c.times),
            "p90_s": sorted(c.times)[int(0.9 * (len(c.times) - 1))],
            "steps_timed": len(c.times),
        }
        for arm, c in clocks.items()
    }
    dense = steps["dense"]["median_s"]
    for timing in steps.values():
        timing["ratio_to_dense"] = timing["median_s"] / dense
    first = statistics.median(calibration.setup)
    last = statistics.median(calibration.end_epoch)
    step = steps["manidp"]["median_s"]
    shares = {name: (first + last) / (first + last + step * images / BATCH) for name, images in EPOCH_IMAGES.items()}
    return {
        "benchmark": "training_step",
        "model": args.model,
        "data": args.data,
        "batch_size": BATCH,
        "target_flops": TARGET,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "cpu": cpu_info().to_dict(),
        "steps": steps,
        "teacher_dtype": str(teacher_dtype("auto", torch.device("cpu"))).removeprefix("torch."),
        "manidp_step_over_dense": steps["manidp"]["ratio_to_dense"],
        # what the teacher's forward pass adds, in dense steps: the distillation's share of the step
        "distillation_over_dense": steps["manidp"]["ratio_to_dense"] - steps["manidp_no_distill"]["ratio_to_dense"],
        "masked_step_over_dense": steps["manidp_masked"]["ratio_to_dense"],
        "calibration": {
            "before_first_step_s": first,
            "after_last_epoch_s": last,
            "share_of_a_one_epoch_run": shares,
        },
        "wall_seconds": wall,
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    calibration = CalibrationClock()
    calibration.install()
    arms = ["dense", "static", "static_kd", *MANIDP_ARMS]
    clocks = {arm: StepClock(args.skip) for arm in arms}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        weights = _dense_weights(args, work)
        data = load_data(args.data)
        for round_index in range(args.rounds):
            for arm in arms if round_index % 2 == 0 else reversed(arms):
                run_arm(arm, args, data, weights, work, clocks[arm])
                print(f"round {round_index + 1}/{args.rounds} {arm}: {len(clocks[arm].times)} steps timed", flush=True)
    summary = summarise(args, clocks, calibration, time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(summary, indent=1))
    print(f"\n{'arm':24s} {'median s':>9s} {'p90 s':>7s} {'x dense':>8s}")
    for arm, timing in summary["steps"].items():
        print(f"{arm:24s} {timing['median_s']:9.3f} {timing['p90_s']:7.3f} {timing['ratio_to_dense']:8.2f}")
    cal = summary["calibration"]
    print(
        f"calibration: {cal['before_first_step_s']:.2f} s before the first step, {cal['after_last_epoch_s']:.2f} s "
        f"after the last epoch; share of a one-epoch run: "
        + ", ".join(f"{name} {share:.1%}" for name, share in cal["share_of_a_one_epoch_run"].items())
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
