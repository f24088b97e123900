"""Cascades beyond two networks and beyond "the wide network answers": do they reach further?

benchmarks/cascade.py measures two-network cascades: the narrow network answers, the images it is
unsure of also run the wide one, which answers them. This benchmark takes three trained networks of
the accuracy benchmark (narrowest first) and asks two things at the same mean FLOPs, with the same
cross-fitting (each half of the test set, even or odd positions, is judged by what was fitted on
the other half):

- ``three stages``: the first network answers; the images it is unsure of run the second; the images
  the second is unsure of run the third. Both confidence thresholds are fitted together on the
  fitting half: for each share escalated by the first (a grid of ``GRID`` steps), as many of those
  as the FLOPs target leaves room for escalate again (least confident first), and the pair with the
  best accuracy on the fitting half is kept. Costs add up: nothing is reused.
- ``first -> third, mean answer``: the two-stage cascade of the first and third networks, where
  an escalated image is answered by the mean of both networks' softmax outputs (the first one's is
  already computed) instead of the third's alone.

Beside them, every two-stage cascade of the three (``analysis.cascade.evaluate_cascade``, what
``manidp eval --escalate-to`` deploys). Members and their cached outputs come from
benchmarks/cascade.py. JSON + printed table::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cascade_stages.py --work runs/bench-avf-start3 --budget 18000 \\
        --members static_fkd:0.15:0.01 static_fkd:0.45:0.02 dense:1.0:0.01 --targets 0.25 0.3 0.45
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

import torch

from manidp_cli.analysis.cascade import FOLDS, MemberOutputs, cross_fitted_escalation, evaluate_cascade
from manidp_cli.analysis.machine import cpu_info
from manidp_cli.files import atomic_write_text

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import accuracy_vs_flops as accuracy  # noqa: E402 - the arms and their keys
import cascade  # noqa: E402 - finds and caches the members

GRID = 200  # steps of the first threshold's search


@dataclass(frozen=True)
class Member:
    arm: str
    target: float
    lr: float
    budget: int | None  # fine-tuning images; None: --budget

    @classmethod
    def parse(cls, text: str) -> Member:
        try:
            arm, target, lr, *budget = text.split(":")
            if len(budget) > 1:
                raise ValueError
            return cls(arm, float(target), float(lr), int(budget[0]) if budget else None)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected ARM:FLOPS_TARGET:LR[:IMAGES] (e.g. static_fkd:0.15:0.01:9000), got {text!r}"
            ) from None

    def name(self, budget: int) -> str:
        return f"{self.arm} {self.target:g} (lr {self.lr:g}, {self.budget or budget:,} images)"


@dataclass(frozen=True)
class Result:
    cascade: str
    target: float
    top1: float
    flops_ratio: float


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=accuracy.DEFAULT_MODEL)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-avf-start3"))
    parser.add_argument("--budget", type=int, default=18000, help="the members' fine-tuning images, unless given")
    parser.add_argument(
        "--members", type=Member.parse, nargs=3, required=True, help="ARM:TARGET:LR[:IMAGES], narrowest first"
    )
    parser.add_argument("--targets", type=float, nargs="+", required=True, help="the cascades' mean FLOPs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if [m.target for m in args.members] != sorted(m.target for m in args.members):
        parser.error(f"--members must be narrowest first; got targets {[m.target for m in args.members]}")
    names = "_".join(f"{m.arm}{m.target:g}" + (f"b{m.budget}" if m.budget else "") for m in args.members)
    args.out = args.out or ROOT / "results" / f"cascade_stages_{names}_b{args.budget}_{args.work.name}.json"
    return args


def _thresholds(
    first: MemberOutputs, second: MemberOutputs, third: MemberOutputs, target: float, fit: torch.Tensor
) -> tuple[float, float]:
    """The (first, second) confidence thresholds with the best accuracy on the ``fit`` images within
    ``target`` mean FLOPs."""
    confident1, confident2 = first.confidence[fit], second.confidence[fit]
    flops2, flops3 = second.flops[fit], third.flops[fit]
    correct1, correct2, correct3 = first.correct[fit], second.correct[fit], third.correct[fit]
    budget = target * len(fit) - float(first.flops[fit].sum())
    order1 = confident1.argsort()
    best = (-1.0, 0.0, 0.0)
    for escalated1 in range(0, len(fit) + 1, max(1, len(fit) // GRID)):
        once = torch.zeros(len(fit), dtype=torch.bool)
        once[order1[:escalated1]] = True
        room = budget - float(flops2[once].sum())
        if room < 0:
            break
        candidates = once.nonzero().flatten()
        candidates = candidates[confident2[candidates].argsort()]
        escalated2 = int((flops3[candidates].cumsum(0) <= room).sum())
        twice = torch.zeros(len(fit), dtype=torch.bool)
        twice[candidates[:escalated2]] = True
        answer = torch.where(twice, correct3, torch.where(once, correct2, correct1))
        accuracy_here = float(answer.float().mean())
        if accuracy_here > best[0]:
            best = (accuracy_here, _split(confident1, order1, escalated1), _split(confident2, candidates, escalated2))
    return best[1], best[2]


def _split(confidence: torch.Tensor, order: torch.Tensor, escalated: int) -> float:
    """The threshold that escalates exactly ``order[:escalated]`` of these images: midway between the
    last escalated and the first kept one (0: none; above 1: all)."""
    if escalated == 0:
        return 0.0
    if escalated == len(order):
        return 1.5
    return float(confidence[order[escalated - 1]] + confidence[order[escalated]]) / 2


def three_stages(members: list[MemberOutputs], target: float) -> Result:
    first, second, third = members
    positions = torch.arange(len(first.labels))
    correct = torch.zeros(len(positions), dtype=torch.bool)
    flops = torch.zeros(len(positions), dtype=torch.float64)
    for fold in range(FOLDS):
        held_out = positions % FOLDS == fold
        threshold1, threshold2 = _thresholds(first, second, third, target, positions[~held_out])
        held = positions[held_out]
        once = first.confidence[held] < threshold1
        twice = once & (second.confidence[held] < threshold2)
        answered_by_second = torch.where(once, second.correct[held], first.correct[held])
        correct[held] = torch.where(twice, third.correct[held], answered_by_second)
        flops[held] = first.flops[held] + second.flops[held] * once + third.flops[held] * twice
    return Result("three stages", target, float(correct.float().mean()), float(flops.mean()))


def mean_answer(narrow: MemberOutputs, wide: MemberOutputs, target: float, label: str) -> Result:
    """The two-stage cascade's thresholds, but an escalated image takes both members' mean output."""
    escalate, _ = cross_fitted_escalation(narrow, wide, target)
    mixed = (narrow.probabilities + wide.probabilities) / 2
    answers = torch.where(escalate[:, None], mixed, narrow.probabilities).argmax(1)
    top1 = float((answers == narrow.labels).float().mean())
    return Result(label, target, top1, float((narrow.flops + wide.flops * escalate).mean()))


def measure_seed(args, seed: int) -> list[Result]:
    outputs = [
        cascade.member(args, member.arm, member.target, seed, member.lr, member.budget) for member in args.members
    ]
    results = []
    for target in args.targets:
        results.append(three_stages(outputs, target))
        for (i, narrow), (j, wide) in combinations(enumerate(outputs), 2):
            if wide.flops.mean() > target > narrow.flops.mean():
                two = evaluate_cascade(narrow, wide, target)
                results.append(Result(f"{i + 1} -> {j + 1}", target, two.top1, two.mean_flops))
        results.append(mean_answer(outputs[0], outputs[2], target, "1 -> 3, mean answer"))
    return results


def pooled(per_seed: list[list[Result]]) -> list[dict]:
    rows: dict[tuple[str, float], list[Result]] = {}
    for results in per_seed:
        for r in results:
            rows.setdefault((r.cascade, r.target), []).append(r)
    return [
        {
            "cascade": name,
            "target": target,
            "top1_mean": statistics.fmean(r.top1 for r in results),
            "top1_sd": statistics.stdev(r.top1 for r in results) if len(results) > 1 else 0.0,
            "flops_ratio_mean": statistics.fmean(r.flops_ratio for r in results),
            "seeds": len(results),
        }
        for (name, target), results in rows.items()
    ]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    per_seed = [measure_seed(args, seed) for seed in args.seeds]
    table = pooled(per_seed)
    result = {
        "benchmark": "cascade_stages",
        "model": args.model,
        "budget": args.budget,
        "members": [asdict(m) for m in args.members],
        "folds": FOLDS,
        "cpu": cpu_info().to_dict(),
        "seeds": [{"seed": s, "results": [asdict(r) for r in rs]} for s, rs in zip(args.seeds, per_seed)],
        "pooled": table,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"{args.model}, {args.budget:,} images, seeds {args.seeds}; members (narrowest first):")
    for index, member in enumerate(args.members, 1):
        print(f"  {index}: {member.name(args.budget)}")
    print(f"{'cascade':>22s} {'target':>7s} {'top-1 %':>15s} {'FLOPs':>7s}")
    for row in table:
        print(
            f"{row['cascade']:>22s} {row['target']:>7.3f} {100 * row['top1_mean']:7.2f} ± {100 * row['top1_sd']:.2f} "
            f"{row['flops_ratio_mean']:7.3f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
