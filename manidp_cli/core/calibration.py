"""Calibration: the thresholds that make a gated model's measured mean FLOPs meet a target.

Thresholds come from each layer's mean saliencies over calibration images; a common remain rate is
searched (``schedule.search_remain_rate``) until the FLOPs measured on those images meet the target.
Codebook widths are fitted the same way (``fit_codebook_widths``), a common scale on every entry's
learned width taking the place of the remain rate.

Example::

    means = mean_saliency(model, batches)
    calibrate_thresholds(model, count_flops(model, (3, 32, 32)), means, batches, target=0.45)
"""

from __future__ import annotations

import torch
from torch import nn

from manidp_cli.core.codebook import LearnedCodebook, install_codebooks
from manidp_cli.core.distributed import World
from manidp_cli.core.flops import CostTable, decided_flops, measure_flops
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


CODEBOOK_WIDTH_TOLERANCE = 0.01  # relative; widths move in whole channel multiples, so no finer


def fit_codebook_widths(
    model: nn.Module,
    table: CostTable,
    learned: dict[str, LearnedCodebook],
    channel_multiple: int,
    batches: list[torch.Tensor],
    target: float,
    steps: int = 12,
    world: World | None = None,
) -> RateSearch:
    """Install ``learned`` with every entry's width scaled by the common factor whose measured mean
    FLOPs on ``batches`` meet ``target`` (the search of ``search_remain_rate``, from 1: the learned
    widths), then, if that misses the target by more than ``CODEBOOK_WIDTH_TOLERANCE``, single
    layers moved by one channel multiple (``_nudge_layers``); return the search, its
    ``remain_rate`` being the common factor.

    Rounding widths to ``channel_multiple`` alone moved resnet34's measured FLOPs from a calibrated
    0.30 to 0.289 or 0.310, and 0.45 to 0.427 (docs/results.md), and recalibrating the thresholds
    afterwards cannot undo it: in a layer with a single keep-set, as most are, the threshold decides
    nothing. A common factor moves every layer's rounding at once, so the FLOPs it can reach are
    levels up to 3% apart on resnet18 at 32 px (0.328 for a 0.34 target)."""

    def measure(scale: float, shifts: dict[str, int] | None = None) -> float:
        install_codebooks(model, learned, channel_multiple, scale, shifts)
        return measure_flops(model, table, batches, world).mean_ratio

    search = search_remain_rate(measure, target, steps=steps, tolerance=CODEBOOK_WIDTH_TOLERANCE, start=1.0)
    scale = search.remain_rate
    steps_by_layer = _multiple_step(model, table, channel_multiple)
    shifts, nudged = _nudge_layers(lambda shifts: measure(scale, shifts), steps_by_layer, search, target)
    install_codebooks(model, learned, channel_multiple, scale, shifts)
    return nudged


MAX_NUDGES = 8  # measurements spent moving single layers after the common-scale search


def _multiple_step(model: nn.Module, table: CostTable, channel_multiple: int) -> dict[str, float]:
    """Per gated layer, about how much of the dense FLOPs one more channel multiple in all its
    entries adds: its share of the FLOPs the gate decides (``flops.decided_flops``)."""
    decided = decided_flops(table)
    return {
        name: channel_multiple * decided.get(name, 0) / gate.out_channels / table.dense_flops
        for name, gate in gates_of(model).by_name().items()
    }


def _nudge_layers(
    measure, steps: dict[str, float], search: RateSearch, target: float
) -> tuple[dict[str, int], RateSearch]:
    """Move one layer's widths by one channel multiple at a time, the layer whose step is nearest the
    remaining error first, keeping a move only when the measured FLOPs come closer to ``target``;
    stop within ``CODEBOOK_WIDTH_TOLERANCE`` or after ``MAX_NUDGES`` measurements. A step below
    twice the error always brings its estimate closer; a move that does not (widths at a bound,
    entries that images leave) is not tried again."""
    shifts: dict[str, int] = {}
    best, evaluations, refused = search.flops_ratio, search.evaluations, set()
    for _ in range(MAX_NUDGES):
        error = target - best
        if abs(error) <= CODEBOOK_WIDTH_TOLERANCE * target:
            break
        direction = 1 if error > 0 else -1
        usable = [
            (abs(abs(error) - step), name)
            for name, step in steps.items()
            if 0 < step < 2 * abs(error) and (name, direction) not in refused
        ]
        if not usable:
            break
        name = min(usable)[1]
        trial = {**shifts, name: shifts.get(name, 0) + direction}
        ratio = measure(trial)
        evaluations += 1
        if abs(target - ratio) < abs(error):
            shifts, best = trial, ratio
        else:
            refused.add((name, direction))
    return shifts, RateSearch(search.remain_rate, best, evaluations)
