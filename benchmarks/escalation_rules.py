"""Which images should a cascade escalate? The confidence rule against learned ones.

``manidp eval --escalate-to`` escalates the images whose top softmax probability from the narrow
network is lowest. The oracle (escalate exactly the images the wide network gets right and the
narrow one wrong) is 1 to 1.3 points above it (docs/results.md, "Per-image escalation"). This
benchmark asks how much of that gap a better rule closes, with the same members, the same FLOPs
and the same cross-fitting:

- ``confidence``: the top softmax probability (what eval deploys);
- ``margin``: the top probability minus the second;
- ``entropy``: the softmax entropy (negated: escalate the most uncertain first);
- ``learned_error``: a logistic regression on the narrow network's outputs (sorted probabilities,
  entropy, the predicted class) for "the narrow network is wrong";
- ``learned_rescue``: the same features for "the wide network is right and the narrow one wrong",
  which a rule can only learn from images where both were run (the fitting half).

Each rule is also judged with a second answer on the images it escalates: the mean of the two
members' softmax outputs instead of the wide member's alone (``top1_averaged``; no extra FLOPs,
both members have run on those images).

Every rule ranks the images by a score; the threshold on that score meets the mean-FLOPs target
(``analysis.cascade.score_threshold``, which fits the confidence rule's threshold too).
Both are fitted on one half of the test set (even or odd positions) and judged on the other, as
``analysis.cascade.evaluate_cascade`` does for the confidence rule. Members and their cached
outputs come from benchmarks/cascade.py (same arguments). JSON + printed table::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/escalation_rules.py --arm static --budget 180000 --targets 0.2 0.25
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from manidp_cli.analysis.cascade import FOLDS, MemberOutputs, score_threshold
from manidp_cli.files import atomic_write_text

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import cascade  # noqa: E402 - the sibling benchmark finds and caches the members


def features(narrow: MemberOutputs) -> torch.Tensor:
    """What a rule may look at before deciding: the narrow network's softmax output alone."""
    probabilities = narrow.probabilities.double()
    ordered = probabilities.sort(1, descending=True).values
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(1, keepdim=True)
    predicted = torch.nn.functional.one_hot(probabilities.argmax(1), probabilities.shape[1]).double()
    return torch.cat([ordered[:, :3], ordered[:, :1] - ordered[:, 1:2], entropy, predicted], 1)


def logistic_scores(x: torch.Tensor, y: torch.Tensor, fit: torch.Tensor, steps: int = 200) -> torch.Tensor:
    """P(y) for every image, from a logistic regression fitted on the ``fit`` images only
    (standardised features, a little L2 so that a class with few errors does not diverge)."""
    mean, sd = x[fit].mean(0), x[fit].std(0).clamp_min(1e-6)
    z = (x - mean) / sd
    weights = torch.zeros(z.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weights], max_iter=steps, line_search_fn="strong_wolfe")
    target = y[fit].double()

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        logits = z[fit] @ weights[:-1] + weights[-1]
        value = (
            torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + 1e-3 * weights[:-1].square().sum()
        )
        value.backward()
        return value

    optimiser.step(loss)
    with torch.no_grad():
        return torch.sigmoid(z @ weights[:-1] + weights[-1])


@dataclass(frozen=True)
class RuleResult:
    rule: str
    target: float
    top1: float
    top1_averaged: float  # the escalated images answered by the mean of both members' softmax
    flops_ratio: float
    escalated_share: float
    # on the escalated images alone: the narrow member, the wide one, the mean of their softmax (None: none)
    escalated_top1: tuple[float, float, float] | None


def cross_fitted(rule: str, narrow: MemberOutputs, wide: MemberOutputs, target: float, score_for_fold) -> RuleResult:
    """``score_for_fold(fit)`` scores every image (lowest escalates first) from what the ``fit``
    images show; each half is judged by the score and threshold fitted on the other."""
    positions = torch.arange(len(narrow.labels))
    escalate = torch.zeros(len(positions), dtype=torch.bool)
    for fold in range(FOLDS):
        held_out = positions % FOLDS == fold
        fit = positions[~held_out]
        score = score_for_fold(fit)
        escalate[held_out] = score[held_out] < score_threshold(score, narrow, wide, target, fit)
    correct = torch.where(escalate, wide.correct, narrow.correct)
    averaged = (narrow.probabilities + wide.probabilities).argmax(1) == narrow.labels
    return RuleResult(
        rule=rule,
        target=target,
        top1=float(correct.float().mean()),
        top1_averaged=float(torch.where(escalate, averaged, narrow.correct).float().mean()),
        flops_ratio=float((narrow.flops + wide.flops * escalate).mean()),
        escalated_share=float(escalate.float().mean()),
        escalated_top1=tuple(float(c[escalate].float().mean()) for c in (narrow.correct, wide.correct, averaged))
        if escalate.any()
        else None,
    )


def rules(narrow: MemberOutputs, wide: MemberOutputs) -> dict:
    """Each rule as a function from the fitting images to every image's score (lowest escalates
    first, as the confidence does in ``analysis.cascade.fit_threshold``)."""
    x = features(narrow)
    ordered = narrow.probabilities.sort(1, descending=True).values
    entropy = x[:, 4]
    wrong = ~narrow.correct
    rescued = wide.correct & ~narrow.correct
    return {
        "confidence": lambda fit: ordered[:, 0].double(),
        "margin": lambda fit: (ordered[:, 0] - ordered[:, 1]).double(),
        "entropy": lambda fit: -entropy,
        "learned_error": lambda fit: -logistic_scores(x, wrong, fit),
        "learned_rescue": lambda fit: -logistic_scores(x, rescued, fit),
    }


def measure_seed(args, seed: int) -> dict:
    narrow = cascade.member(args, args.narrow_arm, args.narrow, seed, args.narrow_lr, args.narrow_budget)
    wide = cascade.member(args, args.wide_arm, args.wide, seed, args.wide_lr, args.wide_budget)
    results = [
        cross_fitted(name, narrow, wide, target, score)
        for target in args.targets
        for name, score in rules(narrow, wide).items()
    ]
    return {"seed": seed, "results": [r.__dict__ for r in results]}


def pooled(seeds: list[dict]) -> list[dict]:
    """Mean ± sd over seeds per (rule, target), and each rule's paired difference to confidence."""
    rows = {}
    for seed in seeds:
        for r in seed["results"]:
            rows.setdefault((r["rule"], r["target"]), []).append(r)
    out = []
    for (rule, target), results in rows.items():
        base = rows[("confidence", target)]
        differences = [100 * (r["top1"] - b["top1"]) for r, b in zip(results, base)]
        out.append(
            {
                "rule": rule,
                "target": target,
                "top1_mean": statistics.fmean(r["top1"] for r in results),
                "top1_sd": statistics.stdev(r["top1"] for r in results) if len(results) > 1 else 0.0,
                "top1_averaged_mean": statistics.fmean(r["top1_averaged"] for r in results),
                "flops_ratio_mean": statistics.fmean(r["flops_ratio"] for r in results),
                "escalated_share_mean": statistics.fmean(r["escalated_share"] for r in results),
                "points_over_confidence": differences,
            }
        )
    return out


def main() -> None:
    args = cascade.parse_args()
    if "--out" not in sys.argv:  # cascade's file name for these members, under this benchmark's name
        args.out = args.out.with_name(args.out.name.replace("cascade_", "escalation_rules_", 1))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    seeds = [measure_seed(args, seed) for seed in args.seeds]
    table = pooled(seeds)
    result = {
        **cascade.result_header(args, "escalation_rules"),
        "seeds": seeds,
        "pooled": table,
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(
        f"{args.model}, {args.budget:,} images: {args.narrow_arm} {args.narrow} (lr {args.narrow_lr:g}) -> "
        f"{args.wide_arm} {args.wide} (lr {args.wide_lr:g}), seeds {args.seeds}"
    )
    print(
        f"{'rule':>16s} {'target':>7s} {'top-1 %':>15s} {'averaged':>8s} {'FLOPs':>7s} {'escalated':>9s}  "
        "vs confidence (points, per seed)"
    )
    for row in table:
        diffs = ", ".join(f"{d:+.2f}" for d in row["points_over_confidence"])
        print(
            f"{row['rule']:>16s} {row['target']:>7.3f} {100 * row['top1_mean']:7.2f} ± {100 * row['top1_sd']:.2f} "
            f"{100 * row['top1_averaged_mean']:8.2f} {row['flops_ratio_mean']:7.3f} "
            f"{100 * row['escalated_share_mean']:8.1f}%  {diffs}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
