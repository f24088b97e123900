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

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from manidp_cli.core.codebook import LearnedCodebook, install_codebooks
from manidp_cli.core.distributed import World
from manidp_cli.core.flops import CostTable, decided_flops, measure_flops
from manidp_cli.core.gating import gates_of
from manidp_cli.core.modes import eval_mode
from manidp_cli.core.recorder import GateRecorder
from manidp_cli.core.schedule import RateSearch, kept_count, search_remain_rate, thresholds_for_remain_rate


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


THRESHOLD_TOLERANCE = 0.005  # relative: where single-layer moves stop after the common-rate search
MAX_THRESHOLD_MOVES = 24  # measurements they may spend
# the most channels a single layer's kept count may move from what the common rate keeps there. One
# move as large as the FLOPs gap asked took a resnet34 layer from 21% of its channels to 2% and the
# network from 89.5% to 71% top-1; a quarter of the layer's channels still cost a resnet18 1.3
# points where one channel in each of several layers met the target as closely (docs/results.md)
MAX_LAYER_SHIFT = 1


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
    rate scaled by ``layer_scales``); return the search result.

    A common rate moves every layer's kept count at once, and where the widths share a factor (64,
    128, 256, 512) they all step together: a resnet18 on Fashion-MNIST (32 px) measured 0.1429 and
    0.1556 of the FLOPs on either side of one such rate, and a 0.15 target ended 2.7% below it on
    the calibration images. When the search ends
    further than ``THRESHOLD_TOLERANCE`` from the target, single layers then keep more or fewer
    channels (``_nudge_layers``), each move measured and kept only if it comes closer, and no layer
    moved by more than ``MAX_LAYER_SHIFT`` channels from what the common rate keeps there."""
    gates = gates_of(model)

    def measure(rate: float, shifts: dict[str, int] | None = None) -> float:
        gates.set_thresholds(thresholds_for_remain_rate(saliency_means, rate, layer_scales, shifts))
        return measure_flops(model, table, batches, world).mean_ratio

    search = search_remain_rate(measure, target, steps=steps, start=start)
    rate = search.remain_rate
    layer_rates = {name: rate * (layer_scales or {}).get(name, 1.0) for name in saliency_means}
    movable = {name: layer_rate for name, layer_rate in layer_rates.items() if layer_rate <= 1}
    channels = {name: saliency_means[name].numel() for name in movable}

    def room(name: str, direction: int, shift: int) -> int:
        kept = kept_count(movable[name], channels[name], shift)
        bound = channels[name] - kept if direction > 0 else kept - 1
        return max(0, min(bound, MAX_LAYER_SHIFT - direction * shift))

    shifts, refined = _nudge_layers(
        lambda trial: measure(rate, trial),
        _channel_steps(model, table, 1, movable),
        search,
        target,
        NudgeLimits(THRESHOLD_TOLERANCE, MAX_THRESHOLD_MOVES, room),
    )
    gates.set_thresholds(thresholds_for_remain_rate(saliency_means, rate, layer_scales, shifts))
    return refined


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
    steps_by_layer = _channel_steps(model, table, channel_multiple)
    limits = NudgeLimits(CODEBOOK_WIDTH_TOLERANCE, MAX_NUDGES)
    shifts, nudged = _nudge_layers(lambda shifts: measure(scale, shifts), steps_by_layer, search, target, limits)
    install_codebooks(model, learned, channel_multiple, scale, shifts)
    return nudged


MAX_NUDGES = 8  # measurements spent moving single layers after the common-scale search


def _one_step(name: str, direction: int, shift: int) -> int:
    return 1


@dataclass(frozen=True)
class NudgeLimits:
    """When single-layer moves stop, and how far one move may go."""

    tolerance: float  # relative error at which they stop
    moves: int  # measurements they may spend
    # (layer, direction, its shift so far) -> how many steps one move may take (0: none left)
    room: Callable[[str, int, int], int] = _one_step


def _channel_steps(
    model: nn.Module, table: CostTable, channel_multiple: int, keep: dict[str, float] | None = None
) -> dict[str, float]:
    """Per gated layer, about how much of the dense FLOPs one more channel multiple adds: its share
    of the FLOPs the gate decides (``flops.decided_flops``), times ``keep[layer]`` where given (the
    layer's remain rate: the share of its neighbours' channels that an added channel meets; layers
    not in ``keep`` are left out)."""
    decided = decided_flops(table)
    steps = {}
    for name, gate in gates_of(model).by_name().items():
        if keep is None or name in keep:
            share = channel_multiple * decided.get(name, 0) / gate.out_channels / table.dense_flops
            steps[name] = share * (1.0 if keep is None else keep[name])
    return steps


def _nudge_layers(
    measure, steps: dict[str, float], search: RateSearch, target: float, limits: NudgeLimits
) -> tuple[dict[str, int], RateSearch]:
    """Move one layer at a time by whole steps, the move whose estimated change comes nearest the
    remaining error first, keeping a move only when the measured FLOPs come closer to ``target``;
    stop within ``limits.tolerance`` or after ``limits.moves`` measurements. A move below twice the
    error always brings its estimate closer; a move that does not (a layer at a bound, entries that
    images leave, an estimate far off) is not tried again in that direction."""
    shifts: dict[str, int] = {}
    best, evaluations, refused = search.flops_ratio, search.evaluations, set()
    for _ in range(limits.moves):
        error = target - best
        if abs(error) <= limits.tolerance * target:
            break
        direction = 1 if error > 0 else -1
        move = _nearest_move(steps, error, direction, shifts, refused, limits.room)
        if move is None:
            break
        name, count = move
        trial = {**shifts, name: shifts.get(name, 0) + direction * count}
        ratio = measure(trial)
        evaluations += 1
        if abs(target - ratio) < abs(error):
            shifts, best = trial, ratio
        else:
            refused.add((name, direction))
    return shifts, RateSearch(search.remain_rate, best, evaluations)


def _nearest_move(steps, error, direction, shifts, refused, room) -> tuple[str, int] | None:
    """(layer, steps) whose estimated change comes nearest ``|error|`` while staying below twice it."""
    options = []
    for name, step in steps.items():
        if step <= 0 or (name, direction) in refused:
            continue
        count = min(room(name, direction, shifts.get(name, 0)), max(1, round(abs(error) / step)))
        if count >= 1 and count * step < 2 * abs(error):
            options.append((abs(abs(error) - count * step), name, count))
    return min(options)[1:] if options else None
