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
from torch.nn.modules.batchnorm import _BatchNorm

from manidp_cli.core.flops import count_flops
from manidp_cli.core.graph import trace_dataflow
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


def _pruned_at(model: nn.Module, ratio: float, input_shape, tp: ModuleType, inner_only: bool = False) -> nn.Module:
    candidate = copy.deepcopy(model).eval()
    head = _classifier(candidate)
    ignored = [head] if head is not None else []
    if inner_only:
        inner = set(trace_dataflow(candidate, input_shape).channel_consumers(_conv_names(candidate)))
        ignored += [module for name, module in candidate.named_modules() if _is_conv(module) and name not in inner]
    pruner = tp.pruner.MetaPruner(
        candidate,
        torch.zeros(1, *input_shape),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=ignored,
    )
    pruner.step()
    return candidate


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def _conv_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if _is_conv(module)]


def stage_channels(
    model: nn.Module, pruning_ratio: float, input_shape: tuple[int, int, int], names: list[str]
) -> list[torch.Tensor]:
    """Which of ``model``'s channels each named stage output keeps after pruning at ``pruning_ratio``
    (a ``StaticL1.pruning_ratio``): what feature distillation compares a slimmed stage with.

    Every BatchNorm's running mean is overwritten with its channel numbers in a copy, the copy is
    pruned the same way (L1 importance does not read running statistics), and the numbers that
    survive in the last BatchNorm at or before each stage's end are that stage's channels."""
    marked = copy.deepcopy(model)
    for norm in marked.modules():
        if isinstance(norm, _BatchNorm):
            norm.running_mean = torch.arange(norm.num_features, dtype=torch.float32)
    pruned = _pruned_at(marked, pruning_ratio, input_shape, require_torch_pruning())
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


def static_l1(model: nn.Module, target: float, input_shape: tuple[int, int, int], inner_only: bool = False) -> StaticL1:
    """``model`` (left unchanged) pruned by Torch-Pruning's L1 importance to the FLOPs ratio nearest
    ``target`` that a bisection of the group ratio finds.

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
        candidate = _pruned_at(model, ratio, input_shape, tp, inner_only)
        flops = count_flops(candidate, input_shape).total_flops / dense
        if best is None or abs(flops - target) < abs(best.flops_ratio - target):
            best = StaticL1(candidate, flops, ratio)
        if flops > target:
            low = ratio
        else:
            high = ratio
    assert best is not None
    return best
