"""The dynamic executor against the masked model, decision by decision.

The executor computes its numbers differently from the masked model (BatchNorm folded, narrow
convolutions, other kernels on other CPUs), so the two can only be compared decision by decision:
equal decisions wherever the masked model's decision is clear of rounding, and equal outputs (up
to rounding) given equal decisions. ``manidp eval --dynamic`` reports ``DecisionAgreement``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from manidp_cli.core.gating import SaliencyGate, gates_of
from manidp_cli.core.recorder import GateRecorder
from manidp_cli.runtime.execute import deciding_layers


def force_decisions(model: nn.Module, decisions: dict[str, torch.Tensor]) -> None:
    """Make each named layer of a dynamic model take ``decisions[name]`` (``SaliencyGate.decide``'s
    form, one row per image) on its next call instead of deciding itself; it still records its own."""
    layers = deciding_layers(model)
    unknown = sorted(set(decisions) - set(layers))
    if unknown:
        raise KeyError(f"no dynamic layer named {unknown[0]!r}")
    for name, decision in decisions.items():
        layers[name].forced_decision = decision


def executed_decisions(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each layer's own decision in the dynamic model's last call (forced or not)."""
    return {
        name: layer.last_decision for name, layer in deciding_layers(model).items() if layer.last_decision is not None
    }


@torch.no_grad()
def run_with_decisions(
    model: nn.Module, images: torch.Tensor, forced: dict[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One call of a dynamic model: its output and the decisions its layers made themselves in
    that call (``forced``, if given, is what they then took; see ``force_decisions``)."""
    for layer in deciding_layers(model).values():
        layer.last_decision = layer.last_saliency = layer.forced_decision = None
    if forced:
        force_decisions(model, forced)
    output = model(images)
    return output, executed_decisions(model)


@dataclass(frozen=True)
class ReferenceRun:
    """The masked (gated) model on a batch: its logits, and per gated layer its saliencies, its
    decisions and their margins (``SaliencyGate.decision_margin``)."""

    logits: torch.Tensor
    saliency: dict[str, torch.Tensor]
    decisions: dict[str, torch.Tensor]
    margins: dict[str, torch.Tensor]

    def image(self, index: int) -> dict[str, torch.Tensor]:
        """The decisions of one image, in the form a single-image call takes them."""
        return {name: decision[index : index + 1] for name, decision in self.decisions.items()}


@torch.no_grad()
def reference_run(model: nn.Module, images: torch.Tensor) -> ReferenceRun:
    """Run the masked model (eval mode) and record what each of its gates decided."""

    gates = gates_of(model).by_name()
    with GateRecorder(model, detach=True) as recorder:
        logits = model(images)
    saliency = dict(recorder.saliency)
    decisions = {name: gates[name].decide(s) for name, s in saliency.items()}
    margins = {name: gates[name].decision_margin(s) for name, s in saliency.items()}
    return ReferenceRun(logits, saliency, decisions, margins)


def decision_flip_bounds(
    fast: nn.Module, reference: ReferenceRun, gates: dict[str, SaliencyGate]
) -> dict[str, torch.Tensor]:
    """Per layer and image, the largest margin that the executor's rounding could have flipped in
    its last call: 2 * sum_j |d pi_j| for a codebook entry (each score moves by at most sum |d pi|),
    max_j |d pi_j| for a free mask, d pi being its saliencies minus the masked model's."""
    bounds = {}
    for name, layer in deciding_layers(fast).items():
        if layer.last_saliency is None or name not in reference.saliency:
            continue
        drift = (layer.last_saliency.double() - reference.saliency[name].double()).abs()
        bounds[name] = 2 * drift.sum(dim=1) if gates[name].snaps else drift.amax(dim=1)
    return bounds


def near_tie_only(
    reference: ReferenceRun, index: int, own: dict[str, torch.Tensor], bounds: dict[str, torch.Tensor]
) -> bool:
    """Whether every decision of image ``index`` that differs from the masked model's (``own``
    made from the masked model's inputs, i.e. with its decisions forced) had a margin within what
    rounding can flip."""
    for name, expected in reference.decisions.items():
        if not torch.equal(own[name][index], expected[index]) and float(reference.margins[name][index]) > float(
            bounds[name][index]
        ):
            return False
    return True


@dataclass
class DecisionAgreement:
    """How often the dynamic executor, run as a user runs it (each image deciding for itself),
    took the masked model's decision, over (image, gated layer) pairs and over images. An image
    that diverges is run again with the masked model's decisions forced: it is a near-tie when each
    of its layers then decides as the masked model or within rounding of a tie
    (``decision_flip_bounds``), and ``unexplained`` otherwise (that would be an executor bug)."""

    decisions: int = 0
    agreeing: int = 0
    images: int = 0
    images_agreeing: int = 0
    images_at_near_ties: int = 0
    images_unexplained: int = 0

    def add(self, model: nn.Module, fast: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one image (1 x C x H x W) through both; count; return the executor's output and the
        masked model's (for that image alone: in a batch its own near-ties may fall otherwise)."""
        reference = reference_run(model, image)
        output, own = run_with_decisions(fast, image)
        equal = [name in own and torch.equal(own[name], decision) for name, decision in reference.decisions.items()]
        self.decisions += len(equal)
        self.agreeing += sum(equal)
        self.images += 1
        if all(equal):
            self.images_agreeing += 1
            return output, reference.logits
        _, forced_own = run_with_decisions(fast, image, forced=reference.image(0))
        bounds = decision_flip_bounds(fast, reference, gates_of(model).by_name())
        if near_tie_only(reference, 0, forced_own, bounds):
            self.images_at_near_ties += 1
        else:
            self.images_unexplained += 1
        return output, reference.logits

    @property
    def rate(self) -> float:
        return self.agreeing / self.decisions if self.decisions else 1.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "decision_agreement": self.rate,
            "decisions": self.decisions,
            "images_with_every_decision_equal": self.images_agreeing / self.images if self.images else 1.0,
            "images_diverging_at_near_ties": self.images_at_near_ties,
            "images_diverging_unexplained": self.images_unexplained,
        }
