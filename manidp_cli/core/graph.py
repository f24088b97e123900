"""Dataflow of a CNN, recorded by running it once.

Gating needs three structural facts about an arbitrary timm CNN: which convolution feeds which
normalisation layer, which convolution reads the image (the stem), and which convolutions sit on the
short branch of a residual addition (the shortcut / downsample path). ``torch.fx`` cannot trace every
timm model (some heads branch on tensor shapes), so instead the model is run once on a small input
while module hooks and a ``TorchFunctionMode`` record which call produced and consumed which tensor.

Example::

    flow = trace_dataflow(timm.create_model("resnet18"), (3, 64, 64))
    flow.conv_norm_pairs()   # {'layer1.0.conv1': 'layer1.0.bn1', ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from manidp_cli.core.modes import eval_mode
from manidp_cli.errors import ModelError

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
"""Normalisation layers a gate may follow; timm's BatchNormAct2d/GroupNormAct subclass these."""

_ADD_OPS = {"add", "add_", "__add__", "__iadd__", "__radd__"}

CHANNELWISE_OPS = {
    "relu",
    "relu_",
    "relu6",
    "silu",
    "silu_",
    "hardswish",
    "hardswish_",
    "gelu",
    "leaky_relu",
    "dropout",
    "elu",
    "mish",
    "max_pool2d",
    "_max_pool2d",
    "avg_pool2d",
}
"""Per-channel ops that map an all-zero channel to an all-zero channel."""


def is_conv(module: nn.Module) -> bool:
    """True for 2-D convolutions, timm's padded variants (Conv2dSame, StdConv2d...) included."""
    return isinstance(module, nn.Conv2d)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


def fused_activation(norm: nn.Module) -> nn.Module | None:
    """The activation a normalisation layer applies itself (timm's ``BatchNormAct2d.act``), if any."""
    act = getattr(norm, "act", None)
    return act if isinstance(act, nn.Module) else None


def zero_preserving(module: nn.Module | None) -> bool:
    """Whether ``module`` (a normalisation layer's fused activation, or None) maps 0 to 0: then
    leaving out a channel that is constant zero before it equals computing it. Call it on a module
    without gate hooks (a gate masking the activation's input would run)."""
    if module is None:
        return True
    with torch.no_grad():
        return bool(torch.all(module(torch.zeros(1, 1, 1, 1)) == 0))


@dataclass
class Call:
    """One recorded call: a leaf module (``name`` set) or a torch function (``op`` set)."""

    index: int
    name: str | None
    op: str | None
    inputs: list[int]
    users: list[int] = field(default_factory=list)
    out_shape: tuple[int, ...] = ()  # a convolution's or normalisation's output: N x C x H x W


@dataclass
class Dataflow:
    """Calls in execution order, with producer/consumer links between them."""

    calls: list[Call]
    module_calls: dict[str, list[int]]

    def conv_names(self) -> list[str]:
        return [c.name for c in self.calls if c.name is not None and c.op == "conv"]

    def conv_norm_pairs(self) -> dict[str, str]:
        """Convolutions (called once) whose output goes only into one normalisation layer."""
        pairs = {}
        for call in self.calls:
            if call.op != "conv" or len(self.module_calls[call.name]) != 1 or len(call.users) != 1:
                continue
            user = self.calls[call.users[0]]
            if user.op == "norm":
                pairs[call.name] = user.name
        return pairs

    def channel_consumers(self, conv_names) -> dict[str, str]:
        """Conv name -> the convolution (called once) that alone reads its normalised output through
        per-channel ops only (``CHANNELWISE_OPS``): an output channel the producer does not compute
        is then a zero input channel of that consumer, for every image."""
        pairs = self.conv_norm_pairs()
        consumers = {}
        for conv_name in conv_names:
            norm_name = pairs.get(conv_name)
            if norm_name is None or len(self.module_calls.get(norm_name, [])) != 1:
                continue
            call = self.calls[self.module_calls[norm_name][0]]
            while len(call.users) == 1:
                user = self.calls[call.users[0]]
                if user.op == "conv":
                    if len(self.module_calls[user.name]) == 1:
                        consumers[conv_name] = user.name
                    break
                if user.op not in CHANNELWISE_OPS or len(user.inputs) != 1:
                    break
                call = user
        return consumers

    def stem_convs(self) -> set[str]:
        """The first convolution executed, which reads the image."""
        convs = self.conv_names()
        return {convs[0]} if convs else set()

    def shortcut_convs(self) -> set[str]:
        """Convolutions on the branch of a residual addition that holds fewer convolutions.

        For ``out = main(x) + shortcut(x)`` each branch is the set of calls that lead to one operand
        but not to the other; the branch with fewer (but some) convolutions is the shortcut.
        """
        ancestors: list[int] = []
        conv_bits = 0
        for call in self.calls:
            bits = 0
            for src in call.inputs:
                bits |= ancestors[src] | (1 << src)
            ancestors.append(bits)
            if call.op == "conv":
                conv_bits |= 1 << call.index
        shortcut_bits = 0
        for call in self.calls:
            if call.op not in _ADD_OPS or len(call.inputs) != 2:
                continue
            a, b = call.inputs
            reach_a = ancestors[a] | (1 << a)
            reach_b = ancestors[b] | (1 << b)
            branch_a = reach_a & ~reach_b & conv_bits
            branch_b = reach_b & ~reach_a & conv_bits
            count_a, count_b = branch_a.bit_count(), branch_b.bit_count()
            if count_a and count_b and count_a != count_b:
                shortcut_bits |= branch_a if count_a < count_b else branch_b
        return {c.name for c in self.calls if c.op == "conv" and shortcut_bits >> c.index & 1}


class _Recorder(TorchFunctionMode):
    """Records torch-function calls made outside leaf modules."""

    def __init__(self, producers: dict[int, int], calls: list[Call], keep_alive: list):
        super().__init__()
        self.producers = producers
        self.calls = calls
        self.keep_alive = keep_alive
        self.leaf_depth = 0

    def record(self, name: str | None, op: str, inputs, outputs) -> None:
        index = len(self.calls)
        srcs = []
        for t in _tensors(inputs):
            src = self.producers.get(id(t))
            if src is not None and src not in srcs:
                srcs.append(src)
        call = Call(index=index, name=name, op=op, inputs=srcs)
        if name is not None:  # a module's, not a function's (its arguments may be lazy parameters)
            call.out_shape = tuple(next(_tensors(outputs)).shape)
        self.calls.append(call)
        for src in srcs:
            self.calls[src].users.append(index)
        for t in _tensors(outputs):
            self.producers[id(t)] = index
            self.keep_alive.append(t)  # ids must stay unique while the trace runs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.leaf_depth == 0:
            outputs = list(_tensors(out))
            if outputs:
                op = getattr(func, "__name__", str(func))
                self.record(None, op, (args, kwargs), out)
        return out


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def trace_dataflow(model: nn.Module, input_shape: tuple[int, int, int]) -> Dataflow:
    """Run ``model`` once on a random image of ``input_shape`` (C, H, W) and record its dataflow.

    Convolutions and normalisation layers are recorded as single calls (their internals are hidden);
    everything else is recorded op by op.
    """
    producers: dict[int, int] = {}
    calls: list[Call] = []
    keep_alive: list = []
    recorder = _Recorder(producers, calls, keep_alive)
    module_calls: dict[str, list[int]] = {}
    handles = []

    def enter(module, args):
        recorder.leaf_depth += 1

    def leave_for(name: str, op: str):
        def leave(module, args, output):
            recorder.leaf_depth -= 1
            if recorder.leaf_depth == 0:
                module_calls.setdefault(name, []).append(len(calls))
                recorder.record(name, op, args, output)

        return leave

    for name, module in model.named_modules():
        op = "conv" if is_conv(module) else "norm" if is_norm(module) else None
        if op is None:
            continue
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave_for(name, op)))
    try:
        param = next(model.parameters(), None)  # the probe takes the model's dtype and device
        image = torch.randn(
            1,
            *input_shape,
            dtype=param.dtype if param is not None else None,
            device=param.device if param is not None else None,
        )
        with torch.no_grad(), eval_mode(model), recorder:
            model(image)
    except Exception as exc:  # the model's own error, reported with what we were doing
        raise ModelError(
            f"could not run {type(model).__name__} on a 1x{'x'.join(map(str, input_shape))} input "
            f"to find its convolutions: {exc}"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    return Dataflow(calls=calls, module_calls=module_calls)


def removable_consumers(model: nn.Module, flow: Dataflow, conv_names) -> dict[str, str]:
    """Conv name -> the dense (groups 1) conv that alone reads its normalised, activated output:
    the one whose input channels static slimming can remove with the producer's output channels.
    ``flow`` must be traced without gates: a gate's own ops would read the same tensors."""
    return {
        producer: consumer
        for producer, consumer in flow.channel_consumers(conv_names).items()
        if model.get_submodule(consumer).groups == 1
    }
