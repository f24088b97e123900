"""Torch-Pruning's L1-norm structured pruning to a FLOPs target: the static peer manidp is measured against.

Torch-Pruning (``pip install 'manidp[bench]'``) removes whole coupled channel groups, residual
streams included, ranked by the L1 norm of their weights, with one ratio for every group (its
default). The ratio is bisected until the slimmed network's FLOPs (fvcore, the same count as
everywhere in manidp) meet the target. The classifier keeps its inputs and outputs. A
``StaticCriterion`` ranks the groups otherwise: by their normalisations' |gamma| (network
slimming), or by the first-order Taylor estimate |w * dL/dw| with the cross-entropy's gradients on
labelled calibration images (Molchanov et al., 2019).

Example::

    baseline = static_l1(timm.create_model("resnet18"), 0.45, (3, 224, 224))
    baseline.model, baseline.flops_ratio
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from manidp_cli.core.flops import count_flops
from manidp_cli.core.graph import trace_dataflow
from manidp_cli.core.modes import eval_mode
from manidp_cli.errors import ManidpError, TargetError

BISECTION_STEPS = 14
MAX_PRUNING_RATIO = 0.95


@dataclass(frozen=True)
class StaticL1:
    """The slimmed network, its FLOPs over the original's, and the per-group ratio that gave them."""

    model: nn.Module
    flops_ratio: float
    pruning_ratio: float


CriterionKind = Literal["l1", "bn_scale", "taylor"]


@dataclass(frozen=True)
class StaticCriterion:
    """How the channel groups are ranked: ``kind``, and for taylor the unpruned model's gradients
    (parameter name -> dL/dw, L the mean cross-entropy on the calibration images), measured once so
    that every candidate of the bisection ranks the same way."""

    kind: CriterionKind = "l1"
    gradients: dict[str, torch.Tensor] | None = None

    @classmethod
    def measure(
        cls, kind: CriterionKind, model: nn.Module, calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None
    ) -> StaticCriterion:
        """The criterion ``kind`` for ``model``: taylor reads ``calibration`` (labelled batches)."""
        if kind != "taylor":
            return cls(kind)
        if calibration is None:
            raise ManidpError("the taylor criterion measures gradients on labelled images, and none were given")
        return cls(kind, loss_gradients(model, calibration))

    def importance(self, tp: ModuleType):
        if self.kind == "l1":
            return tp.importance.MagnitudeImportance(p=1)
        if self.kind == "bn_scale":
            return tp.importance.BNScaleImportance()
        return tp.importance.GroupTaylorImportance()

    def prepare(self, candidate: nn.Module) -> None:
        """Give ``candidate`` (a copy of the measured model) the measured gradients to rank by."""
        if self.gradients is None:
            return
        for name, parameter in candidate.named_parameters():
            gradient = self.gradients.get(name)
            parameter.grad = None if gradient is None else gradient.clone()


def loss_gradients(
    model: nn.Module, calibration: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Parameter name -> d(mean cross-entropy over the images)/dw, in eval mode; ``model``'s own
    ``.grad`` fields are left as they are."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    totals = [torch.zeros_like(p) for _, p in named]
    images = 0
    with eval_mode(model):
        for x, y in calibration:
            loss = F.cross_entropy(model(x), y, reduction="sum")
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for total, grad in zip(totals, grads):
                if grad is not None:
                    total += grad
            images += len(x)
    if images == 0:
        raise ManidpError("the taylor criterion needs at least one calibration image")
    return {name: total / images for (name, _), total in zip(named, totals)}


def require_torch_pruning() -> ModuleType:
    try:
        import torch_pruning
    except ImportError:
        raise ManidpError(
            "static L1 pruning (the static baseline, recipe static_share) needs Torch-Pruning: "
            "pip install 'manidp[bench]' (or torch-pruning)"
        ) from None
    return torch_pruning


def _classifier(model: nn.Module) -> nn.Module | None:
    """timm's classifier when the model names one, else the last Linear layer."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Module) and any(p.numel() for p in head.parameters()):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _pruned_at(
    model: nn.Module,
    ratio: float,
    input_shape,
    tp: ModuleType,
    inner_only: bool = False,
    criterion: StaticCriterion = StaticCriterion(),
) -> nn.Module:
    candidate = copy.deepcopy(model).eval()
    criterion.prepare(candidate)
    head = _classifier(candidate)
    ignored = [head] if head is not None else []
    if inner_only:
        inner = set(trace_dataflow(candidate, input_shape).channel_consumers(_conv_names(candidate)))
        ignored += [module for name, module in candidate.named_modules() if _is_conv(module) and name not in inner]
    pruner = tp.pruner.MetaPruner(
        candidate,
        torch.zeros(1, *input_shape),
        importance=criterion.importance(tp),
        pruning_ratio=ratio,
        ignored_layers=ignored,
    )
    pruner.step()
    for parameter in candidate.parameters():
        parameter.grad = None
    return candidate


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def _conv_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if _is_conv(module)]


def stage_channels(
    model: nn.Module,
    pruning_ratio: float,
    input_shape: tuple[int, int, int],
    names: list[str],
    criterion: StaticCriterion = StaticCriterion(),
) -> list[torch.Tensor]:
    """Which of ``model``'s channels each named stage output keeps after pruning at ``pruning_ratio``
    (a ``StaticL1.pruning_ratio``) by ``criterion``: what feature distillation compares a slimmed
    stage with.

    Every BatchNorm's running mean is overwritten with its channel numbers in a copy, the copy is
    pruned the same way (no criterion reads running statistics: taylor's gradients were measured
    before), and the numbers that survive in the last BatchNorm at or before each stage's end are
    that stage's channels."""
    marked = copy.deepcopy(model)
    for norm in marked.modules():
        if isinstance(norm, _BatchNorm):
            norm.running_mean = torch.arange(norm.num_features, dtype=torch.float32)
    pruned = _pruned_at(marked, pruning_ratio, input_shape, require_torch_pruning(), criterion=criterion)
    in_order = [module for _, module in pruned.named_modules()]
    channels = []
    for name in names:
        inside = set(pruned.get_submodule(name).modules())
        end = max(position for position, module in enumerate(in_order) if module in inside)
        norms = [module for module in in_order[: end + 1] if isinstance(module, _BatchNorm)]
        if not norms:
            raise ManidpError(f"no BatchNorm at or before stage {name!r}: its kept channels are unknown")
        channels.append(norms[-1].running_mean.round().long())
    return channels


def static_l1(
    model: nn.Module,
    target: float,
    input_shape: tuple[int, int, int],
    inner_only: bool = False,
    criterion: StaticCriterion = StaticCriterion(),
) -> StaticL1:
    """``model`` (left unchanged) pruned by Torch-Pruning's L1 importance (or ``criterion``'s) to the
    FLOPs ratio nearest ``target`` that a bisection of the group ratio finds.

    ``inner_only`` prunes only the outputs of convolutions that one other convolution alone reads
    through per-channel ops (a residual block's inner widths), and keeps residual streams, stems and
    shortcuts whole: the shape of the cut that manidp's output gates make, whose switched-off
    residual outputs a static network cannot drop."""
    if not 0 < target < 1:
        raise TargetError(f"the static baseline's FLOPs target must be between 0 and 1 (exclusive), got {target}")
    tp = require_torch_pruning()
    dense = count_flops(model, input_shape).total_flops
    low, high = 0.0, MAX_PRUNING_RATIO
    best: StaticL1 | None = None
    for _ in range(BISECTION_STEPS):
        ratio = (low + high) / 2
        candidate = _pruned_at(model, ratio, input_shape, tp, inner_only, criterion)
        flops = count_flops(candidate, input_shape).total_flops / dense
        if best is None or abs(flops - target) < abs(best.flops_ratio - target):
            best = StaticL1(candidate, flops, ratio)
        if flops > target:
            low = ratio
        else:
            high = ratio
    assert best is not None
    return best
