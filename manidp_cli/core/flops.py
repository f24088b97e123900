"""FLOPs of a gated CNN: dense per-layer costs from fvcore, dynamic per-image costs from masks.

fvcore counts one fused multiply-add as one FLOP; every figure here follows that convention.
For a convolution with groups g the per-image cost (method.md, "FLOPs of a dynamic network") is

    dense_flops * sum_over_groups(active_in_g * active_out_g) * g / (C_in * C_out)

which is dense x (active inputs / C_in) x (active outputs / C_out) when g = 1, and counts only the
channels whose input and output are both active for a depthwise convolution. A channel counts as
skipped only when a gate switched it off, i.e. when an executor can skip it for every input: active
outputs are the channels a layer's own mask keeps (all, for an ungated convolution); active inputs
are the active outputs of the gated convolution that alone feeds the layer through per-channel
operations (normalisation, activation, pooling: ``Dataflow.channel_consumers``), or through a
depthwise convolution that follows that gate (``depthwise: follow``), and every input channel
otherwise. Zeros that arise without a gate (a ReLU zeroing a whole channel) count as
computed, as they do for fvcore and for static pruners, so an unpruned gated network measures its
dense cost plus its gates' own. Everything that is not a convolution counts at its dense cost; each
gate adds its own (pooling and two linear layers).

Example::

    table = count_flops(model, (3, 224, 224))
    stats = measure_flops(model, table, [images])
    stats.mean_ratio    # mean dynamic FLOPs / dense FLOPs
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterable, Literal

import torch
from torch import nn

from manidp_cli.core.gating import gates_of, has_gates, is_gate_key, strip_gates
from manidp_cli.core.graph import is_conv, trace_dataflow
from manidp_cli.core.modes import eval_mode
from manidp_cli.core.recorder import GateRecorder

FLOP_CONVENTION = "1 FLOP = 1 fused multiply-add (fvcore's convention)"


def _flop_count_analysis():
    # fvcore.nn's __init__ scripts a loss function at import, which torch >= 2.10 warns about.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        from fvcore.nn import FlopCountAnalysis
    return FlopCountAnalysis


def _mean_flops(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    # fvcore ignores aten::mean; count global pooling (gates, SE blocks, heads) as one FLOP per
    # input element, as fvcore counts adaptive_avg_pool2d.
    return math.prod(get_shape(inputs[0]))


@dataclass(frozen=True)
class LayerCost:
    """Dense cost of one leaf layer at the table's input size."""

    name: str
    kind: Literal["conv", "gate", "other"]
    module_type: str
    dense_flops: int
    in_channels: int = 0
    out_channels: int = 0
    groups: int = 1
    kernel: tuple[int, ...] = ()
    gated: bool = False
    # the gate whose keep-set is this conv's active inputs: a gated producer conv's name, or this conv's input gate
    input_producer: str | None = None


@dataclass(frozen=True)
class CostTable:
    """Per-layer dense costs; ``dense_flops`` is the model without gates."""

    input_shape: tuple[int, int, int]
    layers: tuple[LayerCost, ...]
    total_flops: int

    @property
    def gate_flops(self) -> int:
        return sum(layer.dense_flops for layer in self.layers if layer.kind == "gate")

    @property
    def dense_flops(self) -> int:
        return self.total_flops - self.gate_flops

    def convs(self) -> list[LayerCost]:
        return [layer for layer in self.layers if layer.kind == "conv"]

    def to_dict(self) -> dict:
        return {
            "input_shape": list(self.input_shape),
            "total_flops": self.total_flops,
            "dense_flops": self.dense_flops,
            "gate_flops": self.gate_flops,
            "layers": [asdict(layer) for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict) -> CostTable:
        layers = tuple(LayerCost(**{**layer, "kernel": tuple(layer["kernel"])}) for layer in data["layers"])
        return cls(tuple(data["input_shape"]), layers, data["total_flops"])


def decided_flops(table: CostTable) -> dict[str, int]:
    """Per gate, the dense FLOPs of the convolutions whose channels it decides: its own
    convolution's (outputs), and those of every convolution whose active inputs it sets."""
    decided: dict[str, int] = {}
    for layer in table.convs():
        if layer.gated:
            decided[layer.name] = decided.get(layer.name, 0) + layer.dense_flops
        if layer.input_producer is not None:
            decided[layer.input_producer] = decided.get(layer.input_producer, 0) + layer.dense_flops
    return decided


def count_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> CostTable:
    """Dense per-layer FLOPs of ``model`` (gated or not) for one C x H x W image, via fvcore."""
    param = next(model.parameters())
    image = torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)
    with torch.no_grad(), eval_mode(model):
        analysis = (
            _flop_count_analysis()(model, image)
            .set_op_handle("aten::mean", _mean_flops)
            .unsupported_ops_warnings(False)
            .uncalled_modules_warnings(False)
            .tracer_warnings("none")
        )
        by_module = analysis.by_module()
    gates = gates_of(model) if has_gates(model) else None
    gated = gates.output_gated() if gates is not None else set()
    followers = gates.followers() if gates is not None else {}
    # an input gate's keep-set is its convolution's active inputs, as a gated producer's would be
    producers = {
        **_input_producers(model, input_shape, gated, followers),
        **(gates.input_gated() if gates is not None else {}),
    }
    layers = []
    for name, module in model.named_modules():
        flops = int(by_module.get(name, 0))
        if is_conv(module):
            layers.append(
                LayerCost(
                    name,
                    "conv",
                    type(module).__name__,
                    flops,
                    module.in_channels,
                    module.out_channels,
                    module.groups,
                    tuple(module.kernel_size),
                    name in gated,
                    producers.get(name),
                )
            )
        elif is_gate_key(name) and name.count(".") == 1:
            layers.append(LayerCost(name, "gate", type(module).__name__, flops))
        elif flops and not list(module.children()) and not is_gate_key(name):
            layers.append(LayerCost(name, "other", type(module).__name__, flops))
    total = int(by_module[""])
    unattributed = total - sum(layer.dense_flops for layer in layers)
    if unattributed:
        layers.append(LayerCost("(functional ops)", "other", "", unattributed))
    return CostTable(tuple(input_shape), tuple(layers), total)


def _input_producers(
    model: nn.Module, input_shape: tuple[int, int, int], gated: set[str], followers: dict[str, str]
) -> dict[str, str]:
    """Consumer conv -> the gated conv whose switched-off outputs are its skipped input channels.
    A follower (``depthwise: follow``) computes its producer's channels, so whatever reads it skips
    the channels that producer's gate switched off."""
    if not gated:
        return {}
    plain = copy.deepcopy(model)  # traced without gates: their own ops read the same tensors
    strip_gates(plain)
    flow = trace_dataflow(plain, input_shape)
    consumers = flow.channel_consumers(sorted(gated | set(followers)))
    return {consumer: followers.get(producer, producer) for producer, consumer in consumers.items()}


def active_inputs(table: CostTable, active_outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Conv name -> B x C_in bool for the convolutions fed by a gated producer (its active outputs);
    a convolution not listed computes every input channel."""
    return {
        layer.name: active_outputs[layer.input_producer]
        for layer in table.convs()
        if layer.input_producer is not None and layer.input_producer in active_outputs
    }


def conv_dynamic_flops(
    layer: LayerCost, active_in: torch.Tensor | None, active_out: torch.Tensor | None, batch: int
) -> torch.Tensor:
    """Per-image FLOPs (float64, length ``batch``) of one convolution given channel activity."""
    g = layer.groups
    given = active_in if active_in is not None else active_out
    device = given.device if given is not None else None
    if active_in is None:
        active_in = torch.ones(batch, layer.in_channels, dtype=torch.bool, device=device)
    if active_out is None:
        active_out = torch.ones(batch, layer.out_channels, dtype=torch.bool, device=device)
    in_per_group = active_in.reshape(batch, g, -1).sum(-1).double()
    out_per_group = active_out.reshape(batch, g, -1).sum(-1).double()
    pairs = (in_per_group * out_per_group).sum(-1).cpu()
    return layer.dense_flops * pairs * g / (layer.in_channels * layer.out_channels)


def dynamic_flops(
    table: CostTable,
    active_outputs: dict[str, torch.Tensor],
    batch: int,
    inputs: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-image total FLOPs and per-conv per-image FLOPs for one batch, from the gates' active
    outputs (``GateRecorder.active_outputs``); ``inputs``: their ``active_inputs``, if already derived."""
    inputs = active_inputs(table, active_outputs) if inputs is None else inputs
    total = torch.full((batch,), float(table.total_flops), dtype=torch.float64)
    per_conv = {}
    for layer in table.convs():
        flops = conv_dynamic_flops(layer, inputs.get(layer.name), active_outputs.get(layer.name), batch)
        per_conv[layer.name] = flops
        total += flops - layer.dense_flops
    return total, per_conv


def closed_gates_flops(table: CostTable) -> float:
    """Per-image FLOPs with every gate switching all its channels off: the least the gates can
    make the network cost (its ungated convolutions, everything that is not a convolution, and
    the gates themselves still count)."""
    # a convolution with no active outputs or no active inputs costs nothing (conv_dynamic_flops)
    decided = sum(layer.dense_flops for layer in table.convs() if layer.gated or layer.input_producer is not None)
    return float(table.total_flops - decided)


@dataclass
class LayerStats:
    """Measured means over images for one convolution."""

    name: str
    dense_flops: int
    gated: bool
    keep_ratio_out: float
    keep_ratio_in: float
    dynamic_flops: float


ROUTING_BAND = 0.02
"""A gated channel kept by more than this share of the images and by fewer than 1 minus it is routed:
its decision depends on the image."""


@dataclass
class FlopsStats:
    """Measured dynamic FLOPs over a set of images."""

    dense_flops: int
    gate_flops: int
    per_image: list[float]
    layers: list[LayerStats]
    channel_keep_frequency: dict[str, list[float]] = field(default_factory=dict)

    @property
    def mean_flops(self) -> float:
        return sum(self.per_image) / len(self.per_image)

    @property
    def mean_ratio(self) -> float:
        return self.mean_flops / self.dense_flops

    def routed_channel_share(self) -> float | None:
        """Share of the gated output channels whose decision depends on the image (``ROUTING_BAND``):
        near 0 the gates act as one static mask. None without gates."""
        frequencies = [f for layer in self.channel_keep_frequency.values() for f in layer]
        if not frequencies:
            return None
        return sum(ROUTING_BAND < f < 1 - ROUTING_BAND for f in frequencies) / len(frequencies)

    def to_dict(self) -> dict:
        return {
            "convention": FLOP_CONVENTION,
            "images": len(self.per_image),
            "routed_channel_share": self.routed_channel_share(),
            "dense_flops": self.dense_flops,
            "gate_flops": self.gate_flops,
            "mean_flops": self.mean_flops,
            "mean_ratio": self.mean_ratio,
            "per_image": self.per_image,
            "layers": [asdict(layer) for layer in self.layers],
            "channel_keep_frequency": self.channel_keep_frequency,
        }


class FlopsMeter:
    """Accumulates dynamic FLOPs batch by batch from a ``GateRecorder`` run with active inputs."""

    def __init__(self, table: CostTable):
        self.table = table
        self.per_image: list[torch.Tensor] = []
        self.layer_flops: dict[str, float] = {}
        self.keep_out: dict[str, float] = {}
        self.keep_in: dict[str, float] = {}
        self.keep_counts: dict[str, torch.Tensor] = {}
        self.images = 0

    def update(self, recorder: GateRecorder, batch: int) -> torch.Tensor:
        """Add one recorded batch; return its per-image FLOPs."""
        active_out = recorder.active_outputs()
        active_in = active_inputs(self.table, active_out)
        total, per_conv = dynamic_flops(self.table, active_out, batch, active_in)
        self.per_image.append(total)
        self.images += batch
        for layer in self.table.convs():
            name = layer.name
            self.layer_flops[name] = self.layer_flops.get(name, 0.0) + float(per_conv[name].sum())
            a_in, a_out = active_in.get(name), active_out.get(name)
            kept_in = float(a_in.float().mean(1).sum()) if a_in is not None else float(batch)
            kept_out = float(a_out.float().mean(1).sum()) if a_out is not None else float(batch)
            self.keep_in[name] = self.keep_in.get(name, 0.0) + kept_in
            self.keep_out[name] = self.keep_out.get(name, 0.0) + kept_out
            if a_out is not None:
                counts = a_out.sum(0).cpu().double()
                self.keep_counts[name] = self.keep_counts.get(name, 0) + counts
        return total

    def reduce(self, world) -> None:
        """Combine the meters of all ranks (sums and counts, per-image values gathered)."""
        if not world.distributed:
            return
        names = [layer.name for layer in self.table.convs()]
        sums = torch.tensor(
            [self.images]
            + [self.layer_flops.get(n, 0.0) for n in names]
            + [self.keep_out.get(n, 0.0) for n in names]
            + [self.keep_in.get(n, 0.0) for n in names],
            dtype=torch.float64,
        )
        sums = world.all_reduce_sum(sums).tolist()
        count = len(names)
        self.images = int(sums[0])
        self.layer_flops = dict(zip(names, sums[1 : 1 + count]))
        self.keep_out = dict(zip(names, sums[1 + count : 1 + 2 * count]))
        self.keep_in = dict(zip(names, sums[1 + 2 * count :]))
        self.keep_counts = {n: world.all_reduce_sum(c) for n, c in sorted(self.keep_counts.items())}
        gathered = world.all_gather_object(
            torch.cat(self.per_image) if self.per_image else torch.zeros(0, dtype=torch.float64)
        )
        self.per_image = [t for t in gathered if len(t)]

    def stats(self) -> FlopsStats:
        n = max(self.images, 1)
        layers = [
            LayerStats(
                layer.name,
                layer.dense_flops,
                layer.gated,
                self.keep_out.get(layer.name, 0.0) / n,
                self.keep_in.get(layer.name, 0.0) / n,
                self.layer_flops.get(layer.name, 0.0) / n,
            )
            for layer in self.table.convs()
        ]
        per_image = torch.cat(self.per_image).tolist() if self.per_image else []
        frequency = {name: (c / n).tolist() for name, c in self.keep_counts.items()}
        return FlopsStats(self.table.dense_flops, self.table.gate_flops, per_image, layers, frequency)


def measure_flops(model: nn.Module, table: CostTable, batches: Iterable[torch.Tensor], world=None) -> FlopsStats:
    """Run ``model`` (eval mode, no grad) over image batches and measure its dynamic FLOPs; with a
    distributed ``world`` each rank passes its own batches and the result covers all of them."""
    meter = FlopsMeter(table)
    with torch.no_grad(), eval_mode(model), GateRecorder(model, detach=True) as recorder:
        for images in batches:
            model(images)
            meter.update(recorder, images.shape[0])
    if world is not None:
        meter.reduce(world)
    return meter.stats()
