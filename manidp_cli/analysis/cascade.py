"""Escalation cascades: a narrow network answers every image, and a wider one re-answers the images
the narrow one is unsure of (top softmax probability below a threshold).

This is per-image compute that pays on the accuracy benchmark, where the trained gates route almost
nothing (docs/results.md, "Per-image escalation"): a cascade costs the narrow network's FLOPs on
every image plus the wide network's on the escalated ones (nothing is reused), and answers with the
wide network on those. The threshold is fitted to a mean-FLOPs target; the accuracy reported for it
is cross-fitted (each fold's threshold comes from the other folds' images), so no image decides the
threshold it is judged by.

Example::

    narrow = member_outputs(narrow_model, data.eval, count_flops(narrow_model, shape))
    wide = member_outputs(wide_model, data.eval, count_flops(wide_model, shape))
    result = evaluate_cascade(narrow, wide, target_flops=0.25 * full_width_flops)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from manidp_cli.analysis.evaluation import spearman
from manidp_cli.core.flops import CostTable, FlopsMeter
from manidp_cli.core.gating import has_gates
from manidp_cli.core.modes import eval_mode
from manidp_cli.core.progress import ProgressCallback, reported
from manidp_cli.core.recorder import GateRecorder
from manidp_cli.data import ImageSet
from manidp_cli.runtime.cascade import escalates

FOLDS = 2  # even and odd image positions


@dataclass(frozen=True)
class MemberOutputs:
    """One member's answers on an image set, image by image, in the set's order."""

    probabilities: torch.Tensor  # images x classes, softmax
    labels: torch.Tensor
    flops: torch.Tensor  # per image (float64), gates included; any unit, the same for both members

    @property
    def correct(self) -> torch.Tensor:
        return self.probabilities.argmax(1) == self.labels

    @property
    def confidence(self) -> torch.Tensor:
        return self.probabilities.max(1).values


def member_outputs(
    model: nn.Module,
    images: ImageSet,
    table: CostTable,
    batch_size: int = 256,
    limit: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> MemberOutputs:
    """Softmax outputs and per-image FLOPs of ``model`` (gated: measured per image; otherwise the
    table's cost for every image) in one pass over ``images``."""
    device = next(model.parameters()).device
    meter = FlopsMeter(table) if has_gates(model) else None
    probabilities, labels = [], []
    batches = reported(
        images.batches(batch_size, limit=limit), "evaluating", images.num_batches(batch_size, limit), on_progress
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(eval_mode(model))
        recorder = stack.enter_context(GateRecorder(model, detach=True)) if meter is not None else None
        for x, y in batches:
            probabilities.append(model(x.to(device)).float().softmax(1).cpu())
            labels.append(y)
            if meter is not None:
                meter.update(recorder, x.shape[0])
    labels = torch.cat(labels)
    if meter is not None:
        flops = torch.tensor(meter.stats().per_image, dtype=torch.float64)
    else:
        flops = torch.full((len(labels),), float(table.total_flops), dtype=torch.float64)
    return MemberOutputs(torch.cat(probabilities), labels, flops)


def fit_threshold(narrow: MemberOutputs, wide: MemberOutputs, target_flops: float, images: torch.Tensor) -> float:
    """The confidence below which ``images`` (indices) escalate: as many as keep their mean FLOPs
    (the narrow member's on all, the wide member's added on the escalated) at most ``target_flops``,
    least confident first. 0 escalates nothing; above 1 escalates every image."""
    everything = float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)))
    return score_threshold(narrow.confidence, narrow, wide, target_flops, images, nothing=0.0, everything=everything)


def score_threshold(
    score: torch.Tensor,
    narrow: MemberOutputs,
    wide: MemberOutputs,
    target_flops: float,
    images: torch.Tensor,
    *,
    nothing: float = float("-inf"),
    everything: float = float("inf"),
) -> float:
    """``fit_threshold`` for any per-image score (lowest escalates first): the score below which
    ``images`` escalate within ``target_flops``; ``nothing`` or ``everything`` at the two ends."""
    values = score[images]
    order = values.argsort()
    mean_cost = (float(narrow.flops[images].sum()) + wide.flops[images][order].cumsum(0)) / len(images)
    escalated = int((mean_cost <= target_flops).sum())
    if escalated == 0:
        return nothing
    if escalated == len(images):
        return everything
    # midway between the last escalated and the first kept image: the same split for these images
    return float(values[order[escalated - 1]] + values[order[escalated]]) / 2


@dataclass(frozen=True)
class CascadeEvaluation:
    """A cascade at a mean-FLOPs target: cross-fitted accuracy and cost, and the threshold to deploy."""

    top1: float
    mean_flops: float
    escalated_share: float
    threshold: float  # fitted on every image: the one to deploy (``runtime.cascade.Cascade``)
    fold_thresholds: list[float]  # the thresholds the reported figures come from; none: ``threshold``'s
    # Spearman(per-image loss of the answer given, per-image FLOPs): positive when the cascade spends
    # more on the images it finds hard (method.md's signature); None when every image costs the same
    spearman_loss_flops: float | None = None

    @property
    def cross_fitted(self) -> bool:
        return bool(self.fold_thresholds)


def cross_fitted_escalation(
    narrow: MemberOutputs, wide: MemberOutputs, target_flops: float
) -> tuple[torch.Tensor, list[float]]:
    """Which images escalate when each fold is judged by the threshold fitted on the other folds,
    and those thresholds."""
    positions = torch.arange(len(narrow.labels))
    escalate = torch.zeros(len(positions), dtype=torch.bool)
    fold_thresholds = []
    for fold in range(FOLDS):
        held_out = positions % FOLDS == fold
        threshold = fit_threshold(narrow, wide, target_flops, positions[~held_out])
        escalate[held_out] = escalates(narrow.probabilities[held_out], threshold)
        fold_thresholds.append(threshold)
    return escalate, fold_thresholds


def evaluate_cascade(narrow: MemberOutputs, wide: MemberOutputs, target_flops: float) -> CascadeEvaluation:
    """Cross-fitted accuracy and mean FLOPs of escalating from ``narrow`` to ``wide`` at ``target_flops``."""
    escalate, fold_thresholds = cross_fitted_escalation(narrow, wide, target_flops)
    positions = torch.arange(len(narrow.labels))
    return _evaluation(narrow, wide, escalate, fit_threshold(narrow, wide, target_flops, positions), fold_thresholds)


def apply_threshold(narrow: MemberOutputs, wide: MemberOutputs, threshold: float) -> CascadeEvaluation:
    """Accuracy and mean FLOPs of a cascade whose threshold is already chosen (a saved cascade):
    not cross-fitted, so only images it was not fitted on give an unbiased figure."""
    return _evaluation(narrow, wide, escalates(narrow.probabilities, threshold), threshold, [])


def _evaluation(
    narrow: MemberOutputs, wide: MemberOutputs, escalate: torch.Tensor, threshold: float, fold_thresholds: list[float]
) -> CascadeEvaluation:
    correct = torch.where(escalate, wide.correct, narrow.correct)
    answered = torch.where(escalate[:, None], wide.probabilities, narrow.probabilities)
    loss = -answered.gather(1, narrow.labels[:, None]).squeeze(1).double().clamp_min(1e-12).log()
    flops = narrow.flops + wide.flops * escalate
    return CascadeEvaluation(
        top1=float(correct.float().mean()),
        mean_flops=float(flops.mean()),
        escalated_share=float(escalate.float().mean()),
        threshold=threshold,
        fold_thresholds=fold_thresholds,
        spearman_loss_flops=spearman(loss, flops),
    )
