"""Calibration: the thresholds that make a gated model's measured mean FLOPs meet a target.

Thresholds come from each layer's mean saliencies over calibration images; a common remain rate is
searched (``schedule.search_remain_rate``) until the FLOPs measured on those images meet the target.

Example::

    means = mean_saliency(model, batches)
    calibrate_thresholds(model, count_flops(model, (3, 32, 32)), means, batches, target=0.45)
"""

from __future__ import annotations

import torch
from torch import nn

from manidp_cli.core.distributed import World
from manidp_cli.core.flops import CostTable, measure_flops
from manidp_cli.core.gating import gates_of
from manidp_cli.core.modes import eval_mode
from manidp_cli.core.recorder import GateRecorder
from manidp_cli.core.schedule import RateSearch, search_remain_rate, thresholds_for_remain_rate


def mean_saliency(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Per gated layer, the mean saliency of every channel over ``batches`` (eval mode)."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    with torch.no_grad(), eval_mode(model), GateRecorder(model, detach=True) as recorder:
        for images in batches:
            model(images)
            for name, saliency in recorder.saliency.items():
                sums[name] = sums.get(name, 0) + saliency.double().sum(0).cpu()
            count += images.shape[0]
    return {name: total / max(count, 1) for name, total in sums.items()}


def calibrate_thresholds(
    model: nn.Module,
    table: CostTable,
    saliency_means: dict[str, torch.Tensor],
    batches: list[torch.Tensor],
    target: float,
    steps: int = 24,
    world: World | None = None,
    layer_scales: dict[str, float] | None = None,
    start: float | None = None,
) -> RateSearch:
    """Set the gates' thresholds so that the measured mean FLOPs on ``batches`` meet ``target``
    (a search on a common remain rate from ``start``, schedule.search_remain_rate, each layer's
    rate scaled by ``layer_scales``); return the search result."""
    gates = gates_of(model)

    def measure(rate: float) -> float:
        gates.set_thresholds(thresholds_for_remain_rate(saliency_means, rate, layer_scales))
        return measure_flops(model, table, batches, world).mean_ratio

    search = search_remain_rate(measure, target, steps=steps, start=start)
    gates.set_thresholds(thresholds_for_remain_rate(saliency_means, search.remain_rate, layer_scales))
    return search
