"""The threshold schedule that drives measured mean FLOPs to a target (pure functions).

The reference implementation lowers a channel remain rate with a cosine; manidp's users give a FLOPs
target instead, so the cosine runs over the FLOPs target, and after every epoch a common remain rate
is searched (bisection) whose per-layer thresholds make the *measured* FLOPs meet the scheduled
target. Thresholds come from each layer's mean saliencies over the epoch (method.md).

Example::

    flops_target(epoch=2, epochs=5, final=0.45, hold_epochs=1)   # target used during epoch 2
    thresholds_for_remain_rate({"conv": mean_saliency}, 0.5)      # keeps the top half on average
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

MAX_REMAIN_RATE = 2.0


def flops_target(epoch: int, epochs: int, final: float, hold_epochs: int = 1) -> float:
    """FLOPs target in force during ``epoch``: 1.0 in epoch 0, then down a cosine to ``final``, which
    holds for the last ``hold_epochs`` epochs (the cosine of method.md, over FLOPs instead of a
    channel rate). Thresholds for an epoch are set at the end of the previous one."""
    ramp = max(1, epochs - hold_epochs)
    progress = min(1.0, epoch / ramp)
    return final + (1.0 - final) * (1.0 + math.cos(math.pi * progress)) / 2.0


def thresholds_for_remain_rate(
    mean_saliency: dict[str, torch.Tensor],
    remain_rate: float,
    layer_scales: dict[str, float] | None = None,
    shifts: dict[str, int] | None = None,
) -> dict[str, float]:
    """Per-layer thresholds for a common remain rate r in [0, MAX_REMAIN_RATE], layer l's rate
    being r * ``layer_scales[l]`` (1 where not given: method.md's one rate for every layer).

    For r <= 1: tau_l = the k-th largest mean saliency of layer l, k = ``kept_count`` (ceil(r * C_out),
    at least 1, method.md), plus ``shifts[l]`` channels where given. Saliencies vary per image, so even
    r = 1 drops the channels an image rates below the layer's smallest mean; for 1 < r <= 2 the
    threshold therefore continues linearly from that smallest mean down to 0 (keep every channel with a
    positive saliency), which keeps the family monotone and lets the search reach any FLOPs target.
    """
    thresholds = {}
    for name, mean in mean_saliency.items():
        values = mean.float()
        rate = remain_rate * (layer_scales or {}).get(name, 1.0)
        if rate > 1:
            fraction = min(rate, MAX_REMAIN_RATE) - 1.0
            thresholds[name] = float(values.min()) * (1.0 - fraction)
            continue
        k = kept_count(rate, values.numel(), (shifts or {}).get(name, 0))
        thresholds[name] = float(torch.topk(values, k).values[-1])
    return thresholds


def kept_count(rate: float, channels: int, shift: int = 0) -> int:
    """How many of a layer's ``channels`` a remain rate <= 1 keeps by their mean saliency: ceil(rate *
    channels) plus ``shift``, within [1, channels]."""
    return min(channels, max(1, math.ceil(rate * channels - 1e-9) + shift))


def cost_weighted_scales(decided_flops: dict[str, float], exponent: float) -> dict[str, float]:
    """Per-layer remain-rate scales (F_l / geometric mean of F) ** -exponent, F_l the FLOPs that
    layer l's gate decides (``flops.decided_flops``): with exponent > 0 a layer whose channels
    decide more FLOPs keeps a smaller share of them (0: one rate for every layer)."""
    if exponent == 0 or not decided_flops:
        return {name: 1.0 for name in decided_flops}
    log_mean = sum(math.log(f) for f in decided_flops.values()) / len(decided_flops)
    return {name: math.exp(-exponent * (math.log(f) - log_mean)) for name, f in decided_flops.items()}


@dataclass(frozen=True)
class RateSearch:
    remain_rate: float
    flops_ratio: float
    evaluations: int


MIN_BRACKET = 1e-3  # remain-rate interval below which a search stops: thresholds no longer move measurably


def search_remain_rate(
    measure: Callable[[float], float],
    target: float,
    steps: int = 24,
    tolerance: float = 0.002,
    start: float | None = None,
) -> RateSearch:
    """The common remain rate r in [0, MAX_REMAIN_RATE] whose ``measure(r)`` (a FLOPs ratio, assumed
    non-decreasing in r) is closest to ``target``, stopping once within ``tolerance`` (relative).

    Each measurement runs the network over the calibration images, so the search spends few: FLOPs
    grow roughly with the square of the rate, so the next rate is a secant step on sqrt(FLOPs),
    kept inside the bracket of rates measured below and above the target (a bisection when the step
    would leave it, or when three steps have not halved it; the far end of the bracket on a flat
    stretch, which stops a search whose target is out of reach). It starts at ``start`` (say, the
    rate in force) or at sqrt(target), and stops when the bracket is narrower than ``MIN_BRACKET``.
    Every rate it measures lies strictly inside the bracket of those before, so none repeats.
    """
    low, high = 0.0, MAX_REMAIN_RATE
    widths = [high - low]
    measured: dict[float, float] = {}
    rate = start if start is not None and 0 < start < MAX_REMAIN_RATE else min(1.0, math.sqrt(target))
    best = None
    for evaluations in range(1, steps + 1):
        ratio = measured[rate] = measure(rate)
        if best is None or abs(ratio - target) < abs(best.flops_ratio - target):
            best = RateSearch(rate, ratio, evaluations)
        if abs(ratio - target) <= tolerance * target:
            break
        if ratio > target:
            high = rate
        else:
            low = rate
        widths.append(high - low)
        if widths[-1] < MIN_BRACKET:
            break
        rate = _next_rate(low, high, measured, target, stalled=len(widths) > 3 and widths[-1] > widths[-4] / 2)
    return RateSearch(best.remain_rate, best.flops_ratio, evaluations)


def _next_rate(low: float, high: float, measured: dict[float, float], target: float, stalled: bool) -> float:
    """A secant step on sqrt(FLOPs) through the last two measurements (a square-law step from the
    first alone); the bracket's midpoint when the step leaves (low, high) or when steps have
    stopped halving the bracket (``stalled``); the bracket's far end when the last two
    measurements are equal on one side of the target (a flat stretch: is the target in reach?)."""
    points = list(measured.items())[-2:]
    (r0, f0), (r1, f1) = points if len(points) == 2 else ((0.0, 0.0), points[0])
    if len(points) == 2 and f1 == f0:
        far = high if f1 < target else low
        return (low + high) / 2 if far in measured else far
    if stalled:
        return (low + high) / 2
    if f1 != f0:
        guess = r1 + (math.sqrt(target) - math.sqrt(f1)) * (r1 - r0) / (math.sqrt(f1) - math.sqrt(f0))
    else:
        guess = (low + high) / 2
    return guess if low < guess < high else (low + high) / 2


@dataclass
class FeedbackThresholds:
    """Thresholds that follow the FLOPs measured in training, a few iterations at a time.

    Where ``flops_target`` moves the target once per epoch and a calibration sets thresholds for a
    whole epoch, this controller starts at the target (or ramps to it along a cosine over
    ``ramp_steps``) and, every ``every`` steps, scales the common remain rate by
    sqrt(target / measured): FLOPs grow roughly with the square of the rate (a layer's kept outputs
    times the next layer's kept inputs). Thresholds come from exponential moving averages of each
    layer's per-channel mean saliency (``smoothing`` per update), so they follow the gates as they
    learn. ``update`` takes a window's means summed over all processes (the caller reduces them), so
    every process derives the same thresholds.
    """

    target: float
    ramp_steps: int
    every: int
    smoothing: float = 0.9
    layer_scales: dict[str, float] | None = None  # thresholds_for_remain_rate's
    rate: float = 1.0
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0

    def target_at(self, step: int) -> float:
        if self.ramp_steps <= 0 or step >= self.ramp_steps:
            return self.target
        return self.target + (1.0 - self.target) * (1.0 + math.cos(math.pi * step / self.ramp_steps)) / 2.0

    def due(self) -> bool:
        """Whether the step just counted (``count_step``) ends a window."""
        return self.steps % self.every == 0

    def count_step(self) -> None:
        self.steps += 1

    def update(self, measured: float, window_means: dict[str, torch.Tensor]) -> dict[str, float]:
        """A window's mean FLOPs ratio and per-channel mean saliencies -> the next thresholds."""
        for name, mean in window_means.items():
            old = self.means.get(name)
            self.means[name] = (
                mean.double() if old is None else self.smoothing * old + (1 - self.smoothing) * mean.double()
            )
        target = self.target_at(self.steps)
        self.rate = min(MAX_REMAIN_RATE, max(1e-3, self.rate * math.sqrt(target / max(measured, 1e-6))))
        return thresholds_for_remain_rate(self.means, self.rate, self.layer_scales)

    def state_dict(self) -> dict:
        return {"rate": self.rate, "means": dict(self.means), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.rate, self.means, self.steps = state["rate"], dict(state["means"]), state["steps"]
