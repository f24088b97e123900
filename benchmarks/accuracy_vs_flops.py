"""Accuracy vs FLOPs on full Fashion-MNIST: ManiDP against its ablations and static L1 pruning.

Every arm starts from one dense resnet18 (in_chans=1, 10 classes) and is fine-tuned for the same
epochs, images per epoch and optimiser (SGD Nesterov, lr 0.05, cosine, batch 128):

- ``manidp``: full loss;  ``no_similarity``: lambda_sim = 0;  ``no_complexity``: uniform sparsity
  weights (plain L1 gating, FBS-style);
- ``static``: L1-norm structured channel pruning (torch-pruning, the reference implementation) to
  the same FLOPs, then the same fine-tune with cross-entropy;
- ``dense``: the start fine-tuned without pruning, the ceiling of every arm.

Results are appended to ``<work>/arms.jsonl`` as each arm finishes, so an interrupted benchmark
continues where it stopped. Run (about an hour on 2 CPU cores; needs Debian's dataset-fashion-mnist
and ``pip install torch-pruning``)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_vs_flops.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_vs_flops.py --quick   # smoke check
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from manidp_cli.analysis.evaluation import evaluate
from manidp_cli.api.jobs import prepare, run
from manidp_cli.config import OptimizerConfig
from manidp_cli.core.flops import count_flops
from manidp_cli.data import load_data
from manidp_cli.models.factory import create_model
from manidp_cli.training.objectives import CrossEntropyObjective

MODEL = "resnet18"
ROOT = Path(__file__).resolve().parent
ABLATIONS = {
    "manidp": {},
    "no_similarity": {"lambda_sim": 0.0},
    "no_complexity": {"complexity_weighting": False},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-accuracy-vs-flops"))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "accuracy_vs_flops.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "results" / "accuracy_vs_flops.png")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.6, 0.45, 0.3, 0.15])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the arms at 0.45")
    parser.add_argument("--dense-epochs", type=int, default=5)
    parser.add_argument("--dense-images", type=int, default=None, help="images per dense epoch (default: all)")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs of every arm")
    parser.add_argument("--train-images", type=int, default=6000, help="images per fine-tuning epoch")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="one target, one seed, small epochs")
    args = parser.parse_args()
    if args.quick:
        args.targets, args.seeds = [0.45], [0]
        args.dense_epochs, args.dense_images, args.epochs, args.train_images = 1, 3000, 2, 3000
        args.work = args.work.with_name(args.work.name + "-quick")
        args.out = args.out.with_name("accuracy_vs_flops_quick.json")
        args.plot = args.plot.with_name("accuracy_vs_flops_quick.png")
    return args


def dense_start(args) -> tuple[Path, list[dict]]:
    out = args.work / "dense-start"
    export = out / "model.safetensors"
    if not export.exists():
        shutil.rmtree(out, ignore_errors=True)
        job = prepare(
            "train",
            MODEL,
            out_dir=out,
            overrides={
                "data": args.data,
                "epochs": args.dense_epochs,
                "batch_size": 128,
                "train_images": args.dense_images,
                "optimizer": {"lr": 0.1},
            },
        )
        run(job)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return export, history


def fine_tune_overrides(args, seed: int) -> dict:
    return {
        "data": args.data,
        "epochs": args.epochs,
        "batch_size": 128,
        "train_images": args.train_images,
        "seed": seed,
        "optimizer": {"lr": args.lr},
        "schedule": {"calibration_images": 1024, "search_steps": 16},
    }


def run_manidp_arm(args, arm: str, target: float, seed: int, start: Path, out: Path) -> dict:
    overrides = fine_tune_overrides(args, seed)
    overrides.update(target_flops=target, loss=ABLATIONS[arm])
    result = run(prepare("prune", MODEL, weights=start, out_dir=out, overrides=overrides))
    return {
        "top1": result.after.top1,
        "flops_ratio": result.after.flops.mean_ratio,
        "spearman_loss_flops": result.after.signature.get("spearman_loss_flops"),
        "gram_correlation": result.after.signature.get("gram_correlation"),
    }


def static_prune(model: torch.nn.Module, target: float, input_shape) -> tuple[torch.nn.Module, float]:
    """L1-norm structured pruning with torch-pruning, bisecting its global ratio to the FLOPs target."""
    import copy

    import torch_pruning as tp

    dense = count_flops(model, input_shape).total_flops
    example = torch.zeros(1, *input_shape)

    def pruned_at(ratio: float):
        candidate = copy.deepcopy(model).eval()
        pruner = tp.pruner.MetaPruner(
            candidate,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio,
            ignored_layers=[candidate.fc],
        )
        pruner.step()
        return candidate, count_flops(candidate, input_shape).total_flops / dense

    low, high = 0.0, 0.95
    best = None
    for _ in range(14):
        ratio = (low + high) / 2
        candidate, flops = pruned_at(ratio)
        if best is None or abs(flops - target) < abs(best[1] - target):
            best = (candidate, flops)
        if flops > target:
            low = ratio
        else:
            high = ratio
    return best


def run_static_arm(args, target: float, seed: int, start: Path, out: Path, data) -> dict:
    from manidp_cli.training.engine import fit

    torch.manual_seed(seed)
    model = create_model(MODEL, num_classes=data.num_classes, in_chans=data.in_chans, weights=start)
    model, flops = static_prune(model, target, data.input_shape)
    fit(
        model,
        data,
        CrossEntropyObjective(),
        epochs=args.epochs,
        batch_size=128,
        optimizer_config=OptimizerConfig(lr=args.lr),
        seed=seed,
        train_limit=args.train_images,
    )
    result = evaluate(model, data.eval, 256)
    return {"top1": result.top1, "flops_ratio": flops, "spearman_loss_flops": None, "gram_correlation": None}


def run_dense_arm(args, start: Path, data) -> dict:
    from manidp_cli.training.engine import fit

    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=data.num_classes, in_chans=data.in_chans, weights=start)
    fit(
        model,
        data,
        CrossEntropyObjective(),
        epochs=args.epochs,
        batch_size=128,
        optimizer_config=OptimizerConfig(lr=args.lr),
        seed=0,
        train_limit=args.train_images,
    )
    result = evaluate(model, data.eval, 256)
    return {"top1": result.top1, "flops_ratio": 1.0, "spearman_loss_flops": None, "gram_correlation": None}


def iso_accuracy_flops(points: list[tuple[float, float]], accuracy: float) -> float | None:
    """Smallest FLOPs ratio at which the (flops, top1) curve, linearly interpolated, reaches ``accuracy``."""
    points = sorted(points)
    for (f0, a0), (f1, a1) in zip(points, points[1:]):
        if a0 >= accuracy:
            return f0
        if a1 >= accuracy:
            return f0 + (accuracy - a0) * (f1 - f0) / (a1 - a0)
    if points and points[-1][1] >= accuracy:
        return points[-1][0]
    return None


def summarise(args, arms: list[dict], dense_history: list[dict], wall: float) -> dict:
    def mean_at(arm, target):
        rows = [a for a in arms if a["arm"] == arm and a["target"] == target]
        return rows

    curves = {}
    for arm in list(ABLATIONS) + ["static"]:
        points = []
        for target in args.targets:
            rows = [a for a in arms if a["arm"] == arm and a["target"] == target]
            if rows:
                points.append(
                    (statistics.mean(r["flops_ratio"] for r in rows), statistics.mean(r["top1"] for r in rows))
                )
        curves[arm] = points
    seeds = {}
    for arm in ("manidp", "static"):
        rows = mean_at(arm, 0.45)
        if rows:
            accs = [r["top1"] for r in rows]
            seeds[arm] = {
                "seeds": [r["seed"] for r in rows],
                "top1": accs,
                "mean": statistics.mean(accs),
                "stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "flops_ratio_mean": statistics.mean(r["flops_ratio"] for r in rows),
            }
    reference = seeds.get("static", {}).get("mean")
    iso = {arm: iso_accuracy_flops(points, reference) if reference else None for arm, points in curves.items()}
    dense = [a for a in arms if a["arm"] == "dense"]
    return {
        "benchmark": "accuracy_vs_flops",
        "model": MODEL,
        "data": args.data,
        "settings": {
            "dense_epochs": args.dense_epochs,
            "fine_tune_epochs": args.epochs,
            "train_images_per_epoch": args.train_images,
            "lr": args.lr,
            "batch_size": 128,
            "targets": args.targets,
            "seeds_at_0.45": args.seeds,
        },
        "dense_start": {
            "epochs": len(dense_history),
            "eval_top1_per_epoch": [h.get("eval_top1") for h in dense_history],
        },
        "dense_fine_tuned_top1": dense[0]["top1"] if dense else None,
        "arms": arms,
        "curves": {arm: [{"flops_ratio": f, "top1": a} for f, a in pts] for arm, pts in curves.items()},
        "seeds_at_0.45": seeds,
        "iso_accuracy": {"reference": "static arm's mean top-1 at 0.45", "top1": reference, "flops_ratio_needed": iso},
        "wall_seconds": wall,
        "torch_threads": torch.get_num_threads(),
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    for arm, points in summary["curves"].items():
        if points:
            ax.plot([p["flops_ratio"] for p in points], [100 * p["top1"] for p in points], marker="o", label=arm)
    if summary["dense_fine_tuned_top1"] is not None:
        ax.axhline(100 * summary["dense_fine_tuned_top1"], color="gray", linestyle="--", label="dense (same fine-tune)")
    ax.set_xlabel("mean FLOPs / dense FLOPs (1 FLOP = 1 multiply-add)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{summary['model']} on {summary['data']}: accuracy vs FLOPs")
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done_file = args.work / "arms.jsonl"
    done = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.exists() else []
    earlier_seconds = sum(d["seconds"] for d in done)  # arms finished by an interrupted invocation
    start, dense_history = dense_start(args)
    data = load_data(args.data)
    plan = [("dense", 1.0, 0)]
    for target in args.targets:
        for arm in list(ABLATIONS) + ["static"]:
            plan.append((arm, target, 0))
    for seed in args.seeds:
        if seed != 0 and 0.45 in args.targets:
            plan += [("manidp", 0.45, seed), ("static", 0.45, seed)]
    for arm, target, seed in plan:
        key = f"{arm}-{target}-s{seed}"
        if any(d["key"] == key for d in done):
            continue
        out = args.work / key
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        if arm == "dense":
            metrics = run_dense_arm(args, start, data)
        elif arm == "static":
            metrics = run_static_arm(args, target, seed, start, out, data)
        else:
            metrics = run_manidp_arm(args, arm, target, seed, start, out)
        row = {"key": key, "arm": arm, "target": target, "seed": seed, **metrics, "seconds": time.perf_counter() - t0}
        done.append(row)
        with done_file.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{key:28s} top1 {row['top1']:.4f}  FLOPs {row['flops_ratio']:.3f}  {row['seconds']:.0f} s", flush=True)
    wall = earlier_seconds + time.perf_counter() - started
    summary = summarise(args, done, dense_history, wall)
    args.out.write_text(json.dumps(summary, indent=1))
    plot(summary, args.plot)
    print(f"\n{'arm':15s} {'target':>6s} {'seed':>4s} {'top1':>7s} {'FLOPs':>6s} {'spearman':>8s}")
    for d in sorted(done, key=lambda d: (d["arm"], -d["target"], d["seed"])):
        rho = d["spearman_loss_flops"]
        print(
            f"{d['arm']:15s} {d['target']:6.2f} {d['seed']:4d} {d['top1']:7.4f}"
            f" {d['flops_ratio']:6.3f} {'' if rho is None else f'{rho:+.3f}':>8s}"
        )
    print(
        f"iso-accuracy (static @0.45 = {summary['iso_accuracy']['top1']})"
        f": {summary['iso_accuracy']['flops_ratio_needed']}"
    )
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
