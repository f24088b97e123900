"""Wall-clock speed of dynamic execution against dense, masked and static-slimmed networks.

Gates are random and their thresholds calibrated on random images to keep ``--target`` of the dense
FLOPs (timing needs no training). For each (model, input size) it measures, in one run: dense (BN
folded, NCHW and channels-last; the faster is the reference), masked, dynamic with free masks
(per-image gathers), dynamic with codebooks of ``--entries`` keep-sets per layer (gather-free;
random gates of reduction ``--gate-reduction`` with codebooks learned on the random images and
thresholds calibrated again; entries tuned by measurement; with ``--gate-reduction`` also a codebook
network with the reference gates), each in both layouts, a statically slimmed network with the
mean channel counts the gates keep, and the real static peer: Torch-Pruning's L1 network at the
gated network's measured FLOPs (``torch_pruning``; it also narrows the residual streams). Every
case records the CPU it ran on (model, ISA flags, torch's kernels).
It also profiles the codebook path (where the time goes) and writes
``benchmarks/results/speed.json``. Run on an otherwise idle machine:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/speed.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from manidp_cli.analysis.bench import bench_models, timing_model
from manidp_cli.analysis.machine import cpu_info
from manidp_cli.core.flops import count_flops, measure_flops
from manidp_cli.runtime.execute import dynamic_model, folded_model, tune_entries
from manidp_cli.runtime.slimming import slim
from manidp_cli.runtime.static_l1 import static_l1

ROOT = Path(__file__).resolve().parent
CASES = [("resnet34", 224), ("resnet18", 32), ("resnet18", 64), ("resnet18", 128), ("resnet18", 224)]


def static_equivalent(gated, input_shape, batches):
    """A slimmed network that keeps, in every removable layer, as many channels as the gates keep on
    average (the most often kept ones): static slimming at the dynamic network's channel counts."""
    from manidp_cli.runtime.slimming import mask_statistics

    frequency, _ = mask_statistics(gated, batches)
    chosen = {}
    for name, freq in frequency.items():
        k = max(1, int(round(float(freq.sum()))))
        keep = torch.zeros_like(freq)
        keep[torch.topk(freq, k).indices] = 1.0
        chosen[name] = keep
    ones = {name: torch.ones_like(freq) for name, freq in frequency.items()}
    return slim(gated, chosen, ones, 0.5, input_shape).model


def profile_dynamic(gated, input_shape, runs: int = 10, channels_last: bool = True) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    model = dynamic_model(gated, input_shape)
    image = torch.randn(1, *input_shape)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    tune_entries(model, [image])
    with torch.inference_mode():
        for _ in range(3):
            model(image)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(image)
    rows = []
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    for event in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]:
        rows.append(
            {
                "op": event.key,
                "self_ms_per_image": event.self_cpu_time_total / 1e3 / runs,
                "share": event.self_cpu_time_total / total,
                "calls_per_image": event.count / runs,
            }
        )
    return rows


def _best(variants: dict, name: str) -> tuple[str, float]:
    """The faster layout of a variant: (layout, ratio to dense)."""
    pair = {
        layout: variants[f"{name}{suffix}"]["latency_ratio"]
        for layout, suffix in (("nchw", ""), ("cl", "_channels_last"))
    }
    layout = min(pair, key=pair.get)
    return layout, pair[layout]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.45)
    parser.add_argument("--entries", type=int, default=4, help="codebook keep-sets per gated layer")
    parser.add_argument("--channel-multiple", type=int, default=16)
    parser.add_argument(
        "--gate-reduction",
        type=int,
        default=8,
        help="the codebook variant's gate reduction r (recipes/codebook-small-gates.yaml; 0: the reference)",
    )
    parser.add_argument("--cases", nargs="+", metavar="MODEL:SIZE", help="e.g. resnet34:224 (default: all five)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "speed.json")
    parser.add_argument("--quick", action="store_true", help="resnet18 at 32 px only, few runs")
    args = parser.parse_args()
    cases = [("resnet18", 32)] if args.quick else CASES
    if args.cases:
        cases = [(case.split(":")[0], int(case.split(":")[1])) for case in args.cases]
    gate_reduction = args.gate_reduction or None
    runs = 5 if args.quick else args.runs
    torch.set_num_threads(args.threads)
    results = []
    for name, size in cases:
        started = time.perf_counter()
        shape = (3, size, size)
        gated, dense, calibrated = timing_model(name, shape, args.target)
        snapped, _, snapped_calibrated = timing_model(
            name,
            shape,
            args.target,
            codebook_entries=args.entries,
            channel_multiple=args.channel_multiple,
            gate_reduction=gate_reduction,
        )
        batches = [torch.randn(4, *shape) for _ in range(4)]
        measured = measure_flops(gated, count_flops(gated, shape), batches).mean_ratio
        snapped_measured = measure_flops(snapped, count_flops(snapped, shape), batches).mean_ratio
        codebooks = {"codebook": snapped}
        reference_gates = {}
        if gate_reduction is not None:  # a codebook network with the reference gates: the gates' share of the time
            codebooks["codebook_reference_gates"], _, calibrated_ref = timing_model(
                name, shape, args.target, codebook_entries=args.entries, channel_multiple=args.channel_multiple
            )
            reference = codebooks["codebook_reference_gates"]
            measured_ref = measure_flops(reference, count_flops(reference, shape), batches).mean_ratio
            reference_gates = {"flops_ratio_calibrated": calibrated_ref, "flops_ratio_measured": measured_ref}
        static = folded_model(static_equivalent(gated, shape, batches), shape)
        static_ratio = count_flops(static, shape).total_flops / count_flops(dense, shape).total_flops
        peer = static_l1(dense, measured, shape)
        result = bench_models(
            gated,
            dense,
            shape,
            runs=runs,
            warmup=max(2, runs // 5),
            batch_size=args.batch_size,
            threads=args.threads,
            static=static,
            extra_dynamic=codebooks,
            extra_static={"torch_pruning": folded_model(peer.model, shape)},
        ).to_dict()
        result.update(
            model=name,
            flops_ratio_calibrated=calibrated,
            flops_ratio_measured=measured,
            codebook={
                "entries": args.entries,
                "channel_multiple": args.channel_multiple,
                "gate_reduction": gate_reduction,
                "flops_ratio_calibrated": snapped_calibrated,
                "flops_ratio_measured": snapped_measured,
                "reference_gates": reference_gates,
            },
            static_flops_ratio=static_ratio,
            torch_pruning_flops_ratio=peer.flops_ratio,
            profile_codebook=profile_dynamic(snapped, shape),
            seconds=time.perf_counter() - started,
        )
        results.append(result)
        v = result["variants"]
        print(
            f"{name} {size}px: dense {v[result['reference']]['latency_ms_median']:.2f} ms ({result['reference']}), "
            f"masked {v['masked']['latency_ratio']:.2f}x, dynamic {_best(v, 'dynamic')[1]:.2f}x, "
            f"codebook {_best(v, 'codebook')[1]:.2f}x"
            + (f" (reference gates {_best(v, 'codebook_reference_gates')[1]:.2f}x)" if reference_gates else "")
            + f", static {_best(v, 'static')[1]:.2f}x, torch-pruning {_best(v, 'torch_pruning')[1]:.2f}x "
            f"(FLOPs: gated {measured:.3f}, codebook {snapped_measured:.3f}, static {static_ratio:.3f}, "
            f"torch-pruning {peer.flops_ratio:.3f})",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = args.out.with_name("speed_quick.json") if args.quick else args.out
    if args.cases and not args.quick and args.out == parser.get_default("out"):
        out = args.out.with_name("speed_" + "_".join(f"{m}-{s}" for m, s in cases) + ".json")
    out.write_text(
        json.dumps(
            {
                "benchmark": "speed",
                "target": args.target,
                "threads": args.threads,
                "cpu": cpu_info().to_dict(),
                "cases": results,
            },
            indent=1,
        )
    )
    columns = (
        ["dynamic", "codebook"]
        + (["codebook_reference_gates"] if gate_reduction is not None else [])
        + ["static", "torch_pruning"]
    )
    titles = {
        "codebook": f"codebook r={gate_reduction or 'ref'}",
        "codebook_reference_gates": "codebook r=ref",
        "torch_pruning": "torch-pruning",
    }
    print(f"\n{'case':16s} {'dense ms':>9s} {'masked':>7s} " + " ".join(f"{titles.get(c, c):>14s}" for c in columns))
    for r in results:
        v = r["variants"]
        cells = [f"{ratio:.2f}x ({layout})" for layout, ratio in (_best(v, n) for n in columns)]
        print(
            f"{r['model'] + ' ' + str(r['input_shape'][-1]):16s} {v[r['reference']]['latency_ms_median']:9.2f} "
            f"{v['masked']['latency_ratio']:6.2f}x " + " ".join(f"{cell:>14s}" for cell in cells)
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
