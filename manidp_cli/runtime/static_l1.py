"""Torch-Pruning's L1-norm structured pruning to a FLOPs target: the static peer manidp is measured against.

Torch-Pruning (``pip install 'manidp[bench]'``) removes whole coupled channel groups, residual
streams included, ranked by the L1 norm of their weights, with one ratio for every group (its
default). The ratio is bisected until the slimmed network's FLOPs (fvcore, the same count as
everywhere in manidp) meet the target. The classifier keeps its inputs and outputs.

Example::

    baseline = static_l1(timm.create_model("resnet18"), 0.45, (3, 224, 224))
    baseline.model, baseline.flops_ratio
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from manidp_cli.core.flops import count_flops
from manidp_cli.errors import ManidpError, TargetError

BISECTION_STEPS = 14
MAX_PRUNING_RATIO = 0.95


@dataclass(frozen=True)
class StaticL1:
    """The slimmed network, its FLOPs over the original's, and the per-group ratio that gave them."""

    model: nn.Module
    flops_ratio: float
    pruning_ratio: float


def require_torch_pruning() -> ModuleType:
    try:
        import torch_pruning
    except ImportError:
        raise ManidpError(
            "the static L1 baseline needs Torch-Pruning: pip install 'manidp[bench]' (or torch-pruning)"
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


def _pruned_at(model: nn.Module, ratio: float, input_shape, tp: ModuleType) -> nn.Module:
    candidate = copy.deepcopy(model).eval()
    head = _classifier(candidate)
    pruner = tp.pruner.MetaPruner(
        candidate,
        torch.zeros(1, *input_shape),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[head] if head is not None else [],
    )
    pruner.step()
    return candidate


def static_l1(model: nn.Module, target: float, input_shape: tuple[int, int, int]) -> StaticL1:
    """``model`` (left unchanged) pruned by Torch-Pruning's L1 importance to the FLOPs ratio nearest
    ``target`` that a bisection of the group ratio finds."""
    if not 0 < target < 1:
        raise TargetError(f"the static baseline's FLOPs target must be between 0 and 1 (exclusive), got {target}")
    tp = require_torch_pruning()
    dense = count_flops(model, input_shape).total_flops
    low, high = 0.0, MAX_PRUNING_RATIO
    best: StaticL1 | None = None
    for _ in range(BISECTION_STEPS):
        ratio = (low + high) / 2
        candidate = _pruned_at(model, ratio, input_shape, tp)
        flops = count_flops(candidate, input_shape).total_flops / dense
        if best is None or abs(flops - target) < abs(best.flops_ratio - target):
            best = StaticL1(candidate, flops, ratio)
        if flops > target:
            low = ratio
        else:
            high = ratio
    assert best is not None
    return best
