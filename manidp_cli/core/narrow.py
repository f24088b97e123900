"""Narrow training: gated convolutions compute only the channels some image of the batch keeps.

Masked training computes every output channel of a gated convolution and then multiplies the ones
an image does not keep by zero, so a pruned network trains at the dense network's cost. Inside
``NarrowTraining`` a gated convolution computes the union of its batch's keep-sets instead; its
BatchNorm normalises those channels only (and updates only their running statistics), and the
narrow tensor flows on:

- into the one convolution that reads it through per-channel ops (``Dataflow.channel_consumers``),
  which then reads only those input channels, as a static pruner's next layer does;
- or, where no such consumer exists (a residual addition), back to full width with zeros in the
  places no image keeps, right after the gate's mask.

The forward pass, the loss and every gradient equal masked training's, with two exceptions that
only touch channels no image of the batch keeps: their BatchNorm running statistics are not
updated by that batch, and the similarity term sees their pooled features as zero (masked training
sees their values before the mask). Only plain ``nn.Conv2d`` (groups 1) with a plain BatchNorm, or
timm's ``BatchNormAct2d`` whose activation keeps zero at zero, is narrowed; other layers train as
before. Module classes are swapped for the duration and restored on exit, so state-dict keys,
checkpoints and exports never see the change.

Example::

    with NarrowTraining(model, (1, 32, 32)):
        loss = objective(model(images))   # same loss as masked training, fewer FLOPs
        loss.backward()
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from manidp_cli.core.gating import SaliencyGate, gates_of, strip_gates
from manidp_cli.core.graph import fused_activation, trace_dataflow, zero_preserving


@dataclass
class BatchChannels:
    """The channels of a ``width``-channel layer that the current batch computes (None: all)."""

    width: int
    channels: torch.Tensor | None = None

    def narrows(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` (B x C ...) holds only the batch's channels."""
        return self.channels is not None and tensor.shape[1] != self.width

    def widen(self, narrow: torch.Tensor) -> torch.Tensor:
        """``narrow`` placed at its channels of a zero tensor ``width`` wide (differentiable)."""
        shape = (narrow.shape[0], self.width) + tuple(narrow.shape[2:])
        return narrow.new_zeros(shape).index_copy(1, self.channels, narrow)

    def select(self, full: torch.Tensor) -> torch.Tensor:
        return full.index_select(1, self.channels)


class ComputesKeptChannels:
    """Mixed into an ``nn.Conv2d``: computes only the channels its gate's batch keeps
    (``kept_outputs``) from only the channels its producer computed (``read_inputs``)."""

    kept_outputs: BatchChannels | None
    read_inputs: BatchChannels | None
    batch_union: Callable[[], torch.Tensor | None]  # ``_batch_union`` of the convolution's own gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # type: ignore[attr-defined]
        if self.read_inputs is not None and self.read_inputs.narrows(x):
            weight = weight.index_select(1, self.read_inputs.channels)
        if self.kept_outputs is not None:
            channels = self.batch_union()
            self.kept_outputs.channels = channels
            if channels is not None:
                weight = weight.index_select(0, channels)
                bias = None if bias is None else bias.index_select(0, channels)
        return self._conv_forward(x, weight, bias)  # type: ignore[attr-defined]


def _batch_union(gate: SaliencyGate) -> torch.Tensor | None:
    """The channels some image of the batch keeps, from the saliencies the gate's pre-hook just
    computed; None when that is every channel."""
    saliency = gate._pending_saliency
    if saliency is None:
        return None
    kept = gate.keep(saliency.detach()).any(dim=0)
    if bool(kept.all()):
        return None
    channels = kept.nonzero().flatten()
    # no image keeps any: compute one channel (masked to zero), as a convolution needs an output
    return channels if len(channels) else kept.to(torch.long).argmax().view(1)


class NormalisesKeptChannels:
    """Mixed into a BatchNorm class: normalises a narrow input with its channels' parameters and
    running statistics (``kept``), updating only those statistics; a fused activation follows."""

    kept: BatchChannels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kept.narrows(x):
            return super().forward(x)  # type: ignore[misc]
        norm: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        channels = self.kept.channels
        factor = 0.0 if norm.momentum is None else norm.momentum
        tracking = norm.training and norm.track_running_stats
        if tracking and norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
            factor = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
        use_buffers = not norm.training or norm.track_running_stats
        mean = norm.running_mean.index_select(0, channels) if use_buffers and norm.running_mean is not None else None
        var = norm.running_var.index_select(0, channels) if use_buffers and norm.running_var is not None else None
        batch_stats = norm.training or (mean is None and var is None)
        weight = None if norm.weight is None else norm.weight.index_select(0, channels)
        bias = None if norm.bias is None else norm.bias.index_select(0, channels)
        y = F.batch_norm(x, mean, var, weight, bias, batch_stats, factor, norm.eps)
        if tracking and mean is not None:
            with torch.no_grad():  # F.batch_norm updated the narrow copies: write them back
                norm.running_mean.index_copy_(0, channels, mean)
                norm.running_var.index_copy_(0, channels, var)
        drop, act = getattr(norm, "drop", None), fused_activation(norm)
        if isinstance(drop, nn.Module):
            y = drop(y)
        return act(y) if act is not None else y


@functools.cache
def _mixed_class(mixin: type, base: type) -> type:
    return type(f"{mixin.__name__}{base.__name__}", (mixin, base), {"__module__": __name__})


def _narrowable_norm(norm: nn.Module) -> bool:
    """A BatchNorm this module can normalise narrowly: ``nn.BatchNorm2d``, or timm's
    ``BatchNormAct2d`` (its drop and activation run after), whose activation keeps zero at zero."""
    if type(norm) is not nn.BatchNorm2d and type(norm).__name__ != "BatchNormAct2d":
        return False
    return zero_preserving(fused_activation(norm))


def _plain_conv(conv: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and conv.groups == 1


@dataclass(frozen=True)
class NarrowPlan:
    """Which gated convolutions compute only kept channels, and where their output goes: the
    convolution that reads only those channels, or (None) a scatter back to full width."""

    consumers: dict[str, str | None]  # gated conv -> its narrow consumer, or None
    norms: dict[str, str]  # gated conv -> its BatchNorm


def plan_narrowing(model: nn.Module, input_shape: tuple[int, int, int]) -> NarrowPlan:
    """The narrowing of ``model``'s gated convolutions (traced on a gate-free copy)."""
    plain = copy.deepcopy(model)
    strip_gates(plain)
    flow = trace_dataflow(plain, input_shape)
    pairs = flow.conv_norm_pairs()
    output_gates = [g for g in gates_of(model).values() if g.side == "output"]
    consumers_of = flow.channel_consumers([g.conv_name for g in output_gates])
    consumers: dict[str, str | None] = {}
    norms: dict[str, str] = {}
    for gate in output_gates:
        name, norm_name = gate.conv_name, pairs.get(gate.conv_name)
        if norm_name is None or not _plain_conv(model.get_submodule(name)):
            continue
        if not _narrowable_norm(plain.get_submodule(norm_name)):  # the copy: no gate hooks on its act
            continue
        consumer = consumers_of.get(name)
        consumers[name] = consumer if consumer is not None and _plain_conv(model.get_submodule(consumer)) else None
        norms[name] = norm_name
    return NarrowPlan(consumers, norms)


class NarrowTraining:
    """A context manager under which ``model``'s gated convolutions compute only the channels their
    batch keeps (see the module's docstring); ``plan`` (from ``plan_narrowing``) can be reused."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], plan: NarrowPlan | None = None):
        self.model = model
        self.plan = plan if plan is not None else plan_narrowing(model, input_shape)
        self._classes: dict[nn.Module, type] = {}
        self._handles: list = []

    def _swap(self, module: nn.Module, mixin: type) -> None:
        if module not in self._classes:
            self._classes[module] = type(module)
            module.__class__ = _mixed_class(mixin, type(module))

    def _narrow_conv(self, conv: nn.Module) -> None:
        self._swap(conv, ComputesKeptChannels)
        conv.__dict__.setdefault("kept_outputs", None)
        conv.__dict__.setdefault("read_inputs", None)

    def __enter__(self) -> NarrowTraining:
        gates = {g.conv_name: g for g in gates_of(self.model).values() if g.side == "output"}
        for conv_name, consumer_name in self.plan.consumers.items():
            gate, conv = gates[conv_name], self.model.get_submodule(conv_name)
            norm = self.model.get_submodule(self.plan.norms[conv_name])
            kept = BatchChannels(conv.out_channels)
            self._narrow_conv(conv)
            conv.kept_outputs, conv.batch_union = kept, functools.partial(_batch_union, gate)
            self._swap(norm, NormalisesKeptChannels)
            norm.kept = kept
            gate.narrow_output = kept
            if consumer_name is None:
                self._handles.append(norm.register_forward_hook(_widen_output(kept)))  # after the mask
                continue
            consumer = self.model.get_submodule(consumer_name)
            self._narrow_conv(consumer)
            consumer.read_inputs = kept
            if consumer_name in gates:
                gates[consumer_name].narrow_input = kept
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for module, cls in self._classes.items():
            module.__class__ = cls
            for attribute in ("kept_outputs", "read_inputs", "batch_union", "kept"):
                module.__dict__.pop(attribute, None)
        for gate in gates_of(self.model).values():
            gate.narrow_input = gate.narrow_output = None
        self._handles.clear()
        self._classes.clear()


def _widen_output(kept: BatchChannels):
    def hook(module, args, output):
        return kept.widen(output) if kept.narrows(output) else output

    return hook
