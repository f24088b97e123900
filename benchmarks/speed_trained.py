"""End-to-end speed of trained models: manidp at iso-accuracy against Torch-Pruning's static networks.

The models are the accuracy benchmark's (benchmarks/accuracy_vs_flops.py: ``--model``, resnet18
by default, full Fashion-MNIST, one dense start): the dense start, Torch-Pruning's L1 networks at
0.45 and 0.30 of the FLOPs, and the manidp default at the FLOPs where its accuracy matches the best
static arm's at 0.45 (``--iso-target``, an arm of that benchmark), with the default's codebook
variant at the same target (``codebook4``: 4 keep-sets per layer, gather-free execution) timed beside it. Static
networks are timed with the dense start's weights pruned by ``static_l1`` (the trained arms'
architecture exactly; their weights do not change a dense kernel's time); the manidp exports are
the trained ones, run on real evaluation images (their decisions depend on them). At 224 px the
32 px images are resized (timing only; accuracies are the 32 px ones). Each input size is timed in
``--repeats`` interleaved runs (``bench_models``: batch-1 latency median and p90, batch-64
throughput, peak memory), and the medians of the runs' figures are
reported. Each manidp arm is also timed as its static export (``ARM_static``: ``manidp
export-static --min-keep-rate`` ``--static-keep-rate``, its accuracy and FLOPs measured again): a
trained model's gates may barely depend on the image (docs/results.md), and then the static export
is the faster way to run it. The JSON's ``iso_accuracy`` holds, per model and input size, the
``deployment`` (a dynamic arm or a static export) with the lowest batch-1 latency among those at
least as accurate as Torch-Pruning's 0.45 network, its ``top1``, ``latency_ratio_vs_torch_pruning``
(over the fastest layout of Torch-Pruning's 0.45 network, batch 1) and
``throughput_ratio_vs_torch_pruning`` (batch 64); every deployment's ratios are under ``arms``::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed_trained.py --threads 2   # quiet machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from manidp_cli.analysis.bench import bench_models, dense_twin
from manidp_cli.analysis.evaluation import evaluate
from manidp_cli.analysis.machine import cpu_info
from manidp_cli.core.flops import count_flops
from manidp_cli.files import atomic_write_text
from manidp_cli.io import load_pruned
from manidp_cli.runtime.execute import folded_model
from manidp_cli.runtime.slimming import mask_statistics, slim
from manidp_cli.runtime.static_l1 import static_l1

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import accuracy_vs_flops as accuracy  # noqa: E402 - the sibling benchmark names the arms

STATIC_TARGETS = (0.45, 0.3)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=accuracy.DEFAULT_MODEL, help="the accuracy benchmark's --model whose arms are timed"
    )
    parser.add_argument("--work", type=Path, default=None, help="default: the accuracy benchmark's for --model")
    parser.add_argument("--summary", type=Path, default=None, help="default: the accuracy benchmark's for --model")
    parser.add_argument("--budget", type=int, default=18000)
    parser.add_argument(
        "--lr",
        type=float,
        default=accuracy.DEFAULT_LR,
        help="the learning rate the timed arms were fine-tuned at (the accuracy benchmark's --lr); the "
        "static reference accuracy comes from --summary, whatever its learning rate",
    )
    parser.add_argument("--iso-target", type=float, default=0.39, help="the manidp arms' FLOPs target")
    parser.add_argument(
        "--arms", nargs="+", default=["manidp", "codebook4"], help="dynamic arms at --iso-target (first: the default)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="default: results/speed_trained[_MODEL].json")
    parser.add_argument(
        "--static-keep-rate",
        type=float,
        default=0.5,
        help="each arm is also timed as its static export (export-static --min-keep-rate this); negative: not",
    )
    parser.add_argument("--calibration-images", type=int, default=1024, help="the static exports' (export-static's)")
    args = parser.parse_args()
    args.work = args.work or accuracy.default_work(args.model)
    args.summary = args.summary or accuracy.default_summary(args.model)
    args.out = args.out or ROOT / "results" / f"speed_trained{accuracy.model_suffix(args.model)}.json"
    return args


def _arm_args(args) -> argparse.Namespace:
    return argparse.Namespace(
        lr=args.lr,
        data="fashion-mnist",
        dense_epochs=3,
        dense_images=None,
        work=args.work,
        model=args.model,
        teacher_dtype="float32",  # the accuracy benchmark's default: the keys of its arms
        batch=accuracy.DEFAULT_BATCH,  # likewise
    )


def _cell(summary: dict, arm: str, budget: int, target: float) -> dict | None:
    return summary["cells"].get(f"{arm}|{budget}|{target}")


def _best_static(summary: dict, budget: int, target: float) -> dict:
    cells = {arm: _cell(summary, arm, budget, target) for arm in accuracy.STATIC_ARMS}
    arm, cell = max(((a, c) for a, c in cells.items() if c), key=lambda item: item[1]["mean"])
    return {"arm": arm, "top1_mean": cell["mean"], "top1_sd": cell["stdev"], "flops_ratio": cell["flops_ratio_mean"]}


def _fastest(variants: dict, prefix: str) -> tuple[str, dict]:
    names = [name for name in variants if name == prefix or name == f"{prefix}_channels_last"]
    name = min(names, key=lambda n: variants[n]["latency_ms_median"])
    return name, variants[name]


def _fastest_throughput(variants: dict, prefixes: tuple[str, ...]) -> float:
    return max(
        v["throughput_images_per_s"] for name, v in variants.items() if name.removesuffix("_channels_last") in prefixes
    )


def _ratios(result: dict, prefix: str) -> tuple[float, float]:
    """(batch-1 latency, batch throughput) of variant ``prefix`` (its faster layout) over Torch-Pruning's 0.45."""
    variants = result["variants"]
    _, mine = _fastest(variants, prefix)
    _, peer = _fastest(variants, "torch_pruning_0.45")
    prefixes = (prefix, "masked") if prefix == "dynamic" else (prefix,)  # free masks batch through the masked path
    throughput = _fastest_throughput(variants, prefixes) / _fastest_throughput(variants, ("torch_pruning_0.45",))
    return mine["latency_ms_median"] / peer["latency_ms_median"], throughput


def static_exports(gated: dict, data, shape, args) -> tuple[dict, dict]:
    """Each arm's static export (``manidp export-static``: masks folded as their means, channels kept
    by at most ``--static-keep-rate`` of the calibration images removed), its accuracy and FLOPs
    measured: (name -> network, name -> row)."""
    if args.static_keep_rate < 0:
        return {}, {}
    networks, rows = {}, {}
    for arm, model in gated.items():
        calibration = (x for x, _ in data.train.batches(256, limit=args.calibration_images))
        frequency, mean_mask = mask_statistics(model, calibration)
        network = slim(model, frequency, mean_mask, args.static_keep_rate, shape).model
        networks[f"{arm}_static"] = network
        rows[f"{arm}_static"] = {
            "top1": evaluate(network, data.eval, 256).top1,
            "flops_ratio": count_flops(network, shape).total_flops / count_flops(model, shape).dense_flops,
            "min_keep_rate": args.static_keep_rate,
            "calibration_images": args.calibration_images,
        }
    return networks, rows


def _fastest_deployment(arms: dict, models: dict) -> str:
    """The manidp deployment (dynamic execution or static export) with the lowest batch-1 latency
    among those at least as accurate as Torch-Pruning's 0.45 network (all of them when none is)."""
    peer = models["torch_pruning_0.45"]["top1_mean"]
    matching = [arm for arm in arms if models[arm]["top1"] >= peer] or list(arms)
    return min(matching, key=lambda arm: arms[arm]["latency_ratio_vs_torch_pruning"])


def time_size(gated: dict, dense, statics: dict, eval_images: torch.Tensor, size: int, args, exports: dict) -> dict:
    """``gated``: arm -> trained gated model; the first is timed as "dynamic", the others under their
    names; ``exports``: name -> a static export, timed under its name."""
    shape = (eval_images.shape[1], size, size)
    images = eval_images if size == eval_images.shape[-1] else F.interpolate(eval_images, size=size, mode="bilinear")
    folded = {f"torch_pruning_{target}": folded_model(model, shape) for target, model in statics.items()}
    folded.update({name: folded_model(model, shape) for name, model in exports.items()})
    main_arm, *others = gated
    runs = [
        bench_models(
            gated[main_arm],
            dense,
            shape,
            runs=args.runs,
            warmup=max(2, args.runs // 5),
            batch_size=args.batch_size,
            threads=args.threads,
            extra_static=folded,
            extra_dynamic={arm: gated[arm] for arm in others},
            images=images,
        ).to_dict()
        for _ in range(args.repeats)
    ]
    out = {"input_shape": list(shape), "runs": runs, "arms": {}}
    for arm in [*gated, *exports]:
        per_run = [_ratios(result, "dynamic" if arm == main_arm else arm) for result in runs]
        out["arms"][arm] = {
            "latency_ratio_vs_torch_pruning": statistics.median(r[0] for r in per_run),
            "throughput_ratio_vs_torch_pruning": statistics.median(r[1] for r in per_run),
            "per_run": per_run,
        }
    return out


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    summary = json.loads(args.summary.read_text())
    gated, rows = {}, {}
    arm_rows = {r["key"]: r for r in (json.loads(p.read_text()) for p in (args.work / "arms").glob("*.json"))}
    for arm in args.arms:
        spec = {"arm": arm, "target": args.iso_target, "seed": 0, "budget": args.budget}
        export = accuracy.run_folder(args.work, accuracy.arm_key(spec, _arm_args(args)))
        if not (export / "model.safetensors").is_file():
            print(f"skipping {arm}: no export at {export} (run accuracy_vs_flops.py for it first)", flush=True)
            continue
        gated[arm], info = load_pruned(export)
        row = arm_rows[export.name]
        rows[arm] = {"top1": row["top1"], "flops_ratio": row["flops_ratio"], "seed": 0, "export": str(export)}
    if not gated:
        raise SystemExit(f"no export of {args.arms} at target {args.iso_target}: nothing to time")
    dense = dense_twin(next(iter(gated.values())), info.metadata["model"], info.metadata["model_kwargs"])
    shape = tuple(info.input_shape)
    statics = {target: static_l1(dense, target, shape).model for target in STATIC_TARGETS}
    data, _ = info.load_data(None)
    eval_images = next(iter(data.eval.batches(args.batch_size)))[0]
    models = {
        "dense": {"top1": summary["dense_start"]["eval_top1_per_epoch"][-1], "flops_ratio": 1.0},
        **{f"torch_pruning_{t}": _best_static(summary, args.budget, t) for t in STATIC_TARGETS},
        **rows,
    }
    exports, export_rows = static_exports(gated, data, shape, args)
    models.update(export_rows)
    sizes = {}
    for size in args.sizes:
        sizes[str(size)] = time_size(gated, dense, statics, eval_images, size, args, exports)
        fastest = _fastest_deployment(sizes[str(size)]["arms"], models)
        sizes[str(size)]["fastest_deployment"] = fastest
        for arm, ratios in sizes[str(size)]["arms"].items():
            print(
                f"{args.model} {size} px, {arm}: over torch-pruning 0.45, batch-1 latency "
                f"{ratios['latency_ratio_vs_torch_pruning']:.2f}x, batch-{args.batch_size} throughput "
                f"{ratios['throughput_ratio_vs_torch_pruning']:.2f}x",
                flush=True,
            )
    result = {
        "benchmark": "speed_trained",
        "model": args.model,
        "data": "fashion-mnist",
        "budget": args.budget,
        "lr": args.lr,
        "threads": args.threads,
        "cpu": cpu_info().to_dict(),
        "models": models,
        "static_flops_ratio": {
            str(t): count_flops(m, shape).total_flops / info.metadata["dense_flops"] for t, m in statics.items()
        },
        # the default's figures where a script looks for them; every arm's under "arms"
        "iso_accuracy": {
            args.model: {
                size: {
                    **{k: v for k, v in s["arms"][s["fastest_deployment"]].items() if k != "per_run"},
                    "deployment": s["fastest_deployment"],
                    "top1": models[s["fastest_deployment"]]["top1"],
                    "arms": s["arms"],
                }
                for size, s in sizes.items()
                if args.arms[0] in s["arms"]
            }
        },
        "sizes": sizes,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"\n{'model':22s} {'top1':>7s} {'FLOPs':>6s}")
    for name, row in models.items():
        top1 = row.get("top1", row.get("top1_mean"))
        print(f"{name:22s} {100 * top1:7.2f} {row['flops_ratio']:6.3f}")
    for size, s in sizes.items():
        variants = s["runs"][0]["variants"]
        print(
            f"\n{size} px (first run): "
            + ", ".join(f"{n} {v['latency_ms_median']:.2f} ms" for n, v in variants.items())
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
