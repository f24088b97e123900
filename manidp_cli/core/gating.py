"""ManiDP saliency gates attached to an unmodified CNN with hooks (method.md, "Gate").

A gate per gated convolution reads the convolution's input, predicts a non-negative saliency per
output channel, and multiplies the convolution's normalised output by
``mask = saliency * [saliency >= threshold]``. A gate with a codebook (``manidp_cli.core.codebook``)
keeps one of a few fixed channel sets instead: ``mask = saliency * codebook[entry]``. An *input gate*
(``GatePolicy.inputs``) does the same to the input channels of a convolution that no gated
convolution feeds (a residual stream): it masks the convolution's input, so that convolution skips
the channels it does not read for this image, as a static pruner's removed residual channels are
skipped by every convolution. The model's
code, its ``forward`` and its state-dict keys are untouched: gates live under the ``manidp_gates.``
prefix, so a dense checkpoint loads into a gated model with only gate keys missing.

Example::

    model = timm.create_model("resnet18")
    gates = insert_gates(model, GatePolicy(exclude=("layer4.*",)))
    model(torch.randn(2, 3, 64, 64))   # identical to the dense model until thresholds are set
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from manidp_cli.config import GatePolicy
from manidp_cli.core.graph import Dataflow, fused_activation, trace_dataflow
from manidp_cli.core.taylor import taylor_importance
from manidp_cli.errors import ModelError

GATE_PREFIX = "manidp_gates"
INPUT_GATE_SUFFIX = ":in"  # an input gate's name: its convolution's name and this


def is_gate_key(name: str) -> bool:
    """True for the module, parameter and state-dict names that belong to the gates."""
    return name.startswith(GATE_PREFIX + ".")


class SaliencyGate(nn.Module):
    """pi = clamp(relu(fc2(relu(fc1(GAP(x))))), max=c_max); mask = pi * [pi >= tau] (method.md)."""

    def __init__(
        self,
        conv_name: str,
        mask_site: str,
        mask_site_kind: Literal["input", "output"],
        in_channels: int,
        out_channels: int,
        hidden: int,
        max_saliency: float,
        activation: Literal["relu", "softplus"] = "relu",
        side: Literal["output", "input"] = "output",
    ):
        super().__init__()
        self.activation = activation
        self.side = side
        self.conv_name = conv_name
        self.mask_site = mask_site
        self.mask_site_kind = mask_site_kind
        self.max_saliency = max_saliency
        self.fc1 = nn.Linear(in_channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, out_channels)
        # Zero weights and unit bias make every saliency exactly 1 at insertion, so the gated model
        # reproduces the dense one until thresholds are raised.
        nn.init.zeros_(self.fc2.weight)
        self.set_initial_saliency(torch.ones(out_channels))
        self.register_buffer("threshold", torch.tensor(float("-inf")))
        # K x C_out rows of 0/1, the keep-sets an image may choose from; K = 0: free per-channel masks
        self.register_buffer("codebook", torch.zeros(0, out_channels))
        self._pending_saliency: torch.Tensor | None = None
        # Narrow training (core.narrow.BatchChannels): the channels this batch computes of the
        # convolution's input and output, when only some are
        self.narrow_input = None
        self.narrow_output = None
        # ``depthwise: follow``: the depthwise convolution that reads this gate's channels and keeps
        # the same ones, and where its mask goes (after its normalisation)
        self.follower: str | None = None
        self.follower_site: str | None = None
        self.follower_site_kind: Literal["input", "output"] = "output"
        self._pending_keep: torch.Tensor | None = None

    def set_initial_saliency(self, saliency: torch.Tensor) -> None:
        """fc2's bias such that every image's saliency is ``saliency`` (C_out, positive) while fc2's
        weights are zero."""
        saliency = saliency.to(self.fc2.bias)
        with torch.no_grad():
            if self.activation == "softplus":  # the inverse of softplus
                self.fc2.bias.copy_(saliency + torch.log(-torch.expm1(-saliency)))
            else:
                self.fc2.bias.copy_(saliency)

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """fc2's output to saliencies in [0, max_saliency] (softplus: never exactly 0)."""
        if self.activation == "softplus":
            return F.softplus(logits).clamp(max=self.max_saliency)
        return torch.relu(logits).clamp(max=self.max_saliency)

    @property
    def name(self) -> str:
        """What the gate's saliencies, masks and thresholds are keyed by: its convolution's name, and
        for an input gate that name with ``INPUT_GATE_SUFFIX``."""
        return self.conv_name + INPUT_GATE_SUFFIX if self.side == "input" else self.conv_name

    @property
    def out_channels(self) -> int:
        """The number of channels the gate masks (an input gate's are its convolution's inputs)."""
        return self.fc2.out_features

    def forward(self, conv_input: torch.Tensor) -> torch.Tensor:
        """Saliency, B x C_out, from the convolution's input."""
        pooled = conv_input.mean(dim=(2, 3))
        if self.narrow_input is not None and self.narrow_input.narrows(pooled):
            pooled = self.narrow_input.widen(pooled)  # the channels not computed are zero
        return self.saliency_from_pooled(pooled)

    def saliency_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Saliency from the globally average-pooled input, B x C_in."""
        return self.activate(self.fc2(torch.relu(self.fc1(pooled))))

    @property
    def snaps(self) -> bool:
        """True when keep-sets come from the codebook (it has entries and a threshold is set)."""
        return self.codebook.shape[0] > 0 and bool(torch.isfinite(self.threshold))

    def entry(self, saliency: torch.Tensor) -> torch.Tensor:
        """Per image, the codebook entry with the largest summed excess saliency over the threshold,
        sum_j c_kj * (pi_j - tau): over all channel subsets that sum is largest for the free mask
        [pi >= tau], so this is the free mask's rule restricted to the codebook."""
        return entry_scores(saliency, *entry_score_terms(self.codebook, self.threshold)).argmax(dim=1)

    def keep(self, saliency: torch.Tensor) -> torch.Tensor:
        """B x C_out bool: the channels the convolution must compute for each image."""
        if self.snaps:
            return self.codebook[self.entry(saliency)] > 0
        return (saliency >= self.threshold) & (saliency != 0)

    def decide(self, saliency: torch.Tensor) -> torch.Tensor:
        """The gate's decision per image: its codebook entry (B, long) when it snaps, else its keep-set
        (B x C_out, bool). Two executions agree when their decisions are equal."""
        return self.entry(saliency) if self.snaps else self.keep(saliency)

    def decision_margin(self, saliency: torch.Tensor) -> torch.Tensor:
        """Per image, how far its saliencies are from a different decision (B, float64): the lead of
        the chosen entry's score over the runner-up, or the smallest |pi_j - tau| of a free mask.
        A decision whose margin is below the rounding error of the saliencies is a near-tie: another
        execution of the same network (other kernels, folded BatchNorm) may decide it either way."""
        saliency = saliency.detach().double()
        if self.snaps:
            if self.codebook.shape[0] == 1:
                return saliency.new_full((saliency.shape[0],), float("inf"))
            scores = entry_scores(saliency, *entry_score_terms(self.codebook, self.threshold))
            best = scores.topk(2, dim=1).values
            return best[:, 0] - best[:, 1]
        if not torch.isfinite(self.threshold):
            return saliency.new_full((saliency.shape[0],), float("inf"))
        distance = (saliency - float(self.threshold)).abs()
        if float(self.threshold) <= 0:  # the boundary is then pi = 0 (a zero saliency is never kept)
            distance = torch.minimum(distance, saliency)
        return distance.amin(dim=1)

    def mask(self, saliency: torch.Tensor) -> torch.Tensor:
        if self.snaps:
            return saliency * self.codebook[self.entry(saliency)].to(saliency.dtype)
        return saliency * (saliency >= self.threshold)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the number of codebook entries is only known once one is built: take the stored one
        stored = state_dict.get(prefix + "codebook")
        if stored is not None and stored.shape != self.codebook.shape:
            self.codebook = torch.zeros(stored.shape, dtype=self.codebook.dtype, device=self.codebook.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # Hooks: the conv's pre-hook computes the saliency, the mask site applies it.
    def _on_conv_input(self, module, args):
        self._pending_saliency = self(args[0])

    def _masked(self, tensor: torch.Tensor) -> torch.Tensor:
        saliency, self._pending_saliency = self._pending_saliency, None
        if saliency is None:
            raise RuntimeError(f"gate for {self.conv_name} reached its mask before its convolution ran")
        mask = self.mask(saliency).to(tensor.dtype)
        if self.follower is not None:
            self._pending_keep = self.keep(saliency.detach())
        if self.narrow_output is not None and self.narrow_output.narrows(tensor):
            mask = self.narrow_output.select(mask)
        return tensor * mask[:, :, None, None]

    def _on_site_input(self, module, args):
        return (self._masked(args[0]),) + tuple(args[1:])

    def _on_site_output(self, module, args, output):
        return self._masked(output)

    def _kept_by_follower(self, tensor: torch.Tensor) -> torch.Tensor:
        """The follower's normalised output with the channels this gate switched off set to zero
        (0/1, not the saliency: the producer's mask already scaled what the follower read)."""
        keep, self._pending_keep = self._pending_keep, None
        if keep is None:
            raise RuntimeError(f"{self.follower} (following {self.conv_name}) ran before its producer's mask")
        return tensor * keep.to(tensor.dtype)[:, :, None, None]

    def _on_follower_input(self, module, args):
        return (self._kept_by_follower(args[0]),) + tuple(args[1:])

    def _on_follower_output(self, module, args, output):
        return self._kept_by_follower(output)

    def attach_follower(self, model: nn.Module) -> None:
        """Hook the follower's mask onto its site in ``model`` (``follower_site`` set)."""
        site = model.get_submodule(self.follower_site)
        if self.follower_site_kind == "input":
            site.register_forward_pre_hook(self._on_follower_input)
        else:
            site.register_forward_hook(self._on_follower_output)


def entry_score_terms(codebook: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The constants of ``entry_scores`` for a K x C codebook: C x K in float64, and -tau * |c_k|."""
    codebook = codebook.detach().double()
    return codebook.t().contiguous(), -threshold.detach().double() * codebook.sum(1)


def entry_scores(saliency: torch.Tensor, columns: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """B x K scores sum_j c_kj * (pi_j - tau), the one formula every execution decides entries with.

    In float64 the sum of float32 saliencies is exact in all but extreme ranges, so the score does
    not depend on the kernel's summation order, the batch size or the CPU: equal saliencies give
    equal entries on every path (float32 scores tie or swap within rounding, which made the
    executor and the masked model choose differently on some CPUs)."""
    return torch.addmm(offsets, saliency.detach().double(), columns)


class GateSet(nn.ModuleDict):
    """All gates of a model, keyed by ``gate_key`` of their names."""

    def by_name(self) -> dict[str, SaliencyGate]:
        """Gate name (``SaliencyGate.name``: the convolution's, ':in' added for an input gate) -> gate."""
        return {gate.name: gate for gate in self.values()}

    def output_gated(self) -> set[str]:
        """The convolutions whose output channels are gated."""
        return {gate.conv_name for gate in self.values() if gate.side == "output"}

    def followers(self) -> dict[str, str]:
        """Depthwise convolution -> the gated convolution whose kept channels it keeps (``depthwise: follow``)."""
        return {gate.follower: gate.conv_name for gate in self.values() if gate.follower is not None}

    def input_gated(self) -> dict[str, str]:
        """Convolution -> the name of the gate on its input channels."""
        return {gate.conv_name: gate.name for gate in self.values() if gate.side == "input"}

    def thresholds(self) -> dict[str, float]:
        return {gate.name: float(gate.threshold) for gate in self.values()}

    def set_thresholds(self, thresholds: dict[str, float]) -> None:
        gates = self.by_name()
        unknown = set(thresholds) - set(gates)
        if unknown:
            raise KeyError(f"no gate for {sorted(unknown)}")
        for name, value in thresholds.items():
            gates[name].threshold.fill_(value)

    def reset_thresholds(self) -> None:
        for gate in self.values():
            gate.threshold.fill_(float("-inf"))


def gate_key(gate_name: str) -> str:
    return gate_name.replace(".", "_").replace(INPUT_GATE_SUFFIX, "__in")


def _mask_site(model: nn.Module, norm_name: str) -> tuple[str, Literal["input", "output"]]:
    """Mask after normalisation and before a fused activation (timm's BatchNormAct2d and friends)."""
    if fused_activation(model.get_submodule(norm_name)) is not None:
        return f"{norm_name}.act", "input"
    return norm_name, "output"


def select_convs(model: nn.Module, policy: GatePolicy, input_shape: tuple[int, int, int]) -> dict[str, str]:
    """Map each convolution to gate onto the normalisation layer that follows it."""
    return _select(model, policy, trace_dataflow(model, input_shape))


def _select(model: nn.Module, policy: GatePolicy, flow: Dataflow) -> dict[str, str]:
    pairs = flow.conv_norm_pairs()
    skipped = set()
    if policy.skip_stem:
        skipped |= flow.stem_convs()
    if policy.skip_shortcuts:
        skipped |= flow.shortcut_convs()
    selected = {}
    for conv_name, norm_name in pairs.items():
        if conv_name in skipped or (is_depthwise(model.get_submodule(conv_name)) and policy.depthwise == "skip"):
            continue
        if policy.include and not any(fnmatch.fnmatchcase(conv_name, p) for p in policy.include):
            continue
        if any(fnmatch.fnmatchcase(conv_name, p) for p in policy.exclude):
            continue
        selected[conv_name] = norm_name
    if not selected:
        convs = flow.conv_names()
        raise ModelError(
            f"{type(model).__name__} has no convolution to gate: found {len(convs)} convolutions, "
            f"{len(pairs)} followed by a normalisation layer, all excluded by the policy "
            f"(skip_stem={policy.skip_stem}, skip_shortcuts={policy.skip_shortcuts}, "
            f"include={list(policy.include)}, exclude={list(policy.exclude)})"
        )
    return selected


def is_depthwise(conv: nn.Module) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def follower_convs(model: nn.Module, selected: dict[str, str], input_shape: tuple[int, int, int]) -> dict[str, str]:
    """Selected depthwise convolution -> the selected convolution that alone feeds it through
    per-channel ops (``depthwise: follow``). Deciding such a convolution's channels with a gate of
    its own left most of its kept channels reading nothing (an inverted-residual block at 0.55 of
    the FLOPs kept 7 to 28 channels in each gate, 0 to 8 in common) and training diverged at deep
    cuts; a follower keeps exactly what its producer computes."""
    if not any(is_depthwise(model.get_submodule(name)) for name in selected):
        return {}  # no trace: its probe image draws from the global generator, which seeds the gates
    flow = trace_dataflow(model, input_shape)
    consumers = flow.channel_consumers(sorted(selected))
    return {
        consumer: producer
        for producer, consumer in consumers.items()
        if consumer in selected and is_depthwise(model.get_submodule(consumer))
    }


def input_gate_convs(model: nn.Module, selected: dict[str, str], input_shape: tuple[int, int, int]) -> list[str]:
    """The gated convolutions that get an input gate (``GatePolicy.inputs``): those that read a tensor
    no gated convolution produces through per-channel ops (in a ResNet the residual stream), other
    than the stem (its input is the image) and grouped convolutions (an input channel there belongs
    to one group only)."""
    flow = trace_dataflow(model, input_shape)
    fed = set(flow.channel_consumers(sorted(selected)).values()) | flow.stem_convs()
    return [name for name in selected if name not in fed and model.get_submodule(name).groups == 1]


def _new_gate(
    model: nn.Module, policy: GatePolicy, conv_name: str, norm_name: str | None, cost: GateCost
) -> SaliencyGate:
    """An output gate masking at the normalisation after the convolution, or (``norm_name`` None) an
    input gate masking the convolution's own input."""
    conv = model.get_submodule(conv_name)
    channels = conv.out_channels if norm_name else conv.in_channels
    site, kind = _mask_site(model, norm_name) if norm_name else (conv_name, "input")
    side = "output" if norm_name else "input"
    return SaliencyGate(
        conv_name,
        site,
        kind,
        conv.in_channels,
        channels,
        cost.hidden_width(policy, channels),
        policy.max_saliency,
        policy.activation,
        side,
    )


@dataclass(frozen=True)
class GateCost:
    """What a gate reads and decides per image (FLOPs as fvcore counts them, 1 FLOP = 1 multiply-add):
    its two layers cost hidden x (in_channels + its channels)."""

    in_channels: int
    decided_flops: int  # the dense FLOPs of the convolutions whose channels the gate decides

    def hidden_width(self, policy: GatePolicy, channels: int) -> int:
        """``channels / reduction``, narrowed until the gate's two layers cost at most ``policy.max_cost``
        of what it decides (never below 1). Its pooling is left out: no width makes it cheaper."""
        width = reduction_width(policy, channels)
        if policy.max_cost is None:
            return width
        allowed = policy.max_cost * self.decided_flops / (self.in_channels + channels)
        return max(1, min(width, math.floor(allowed)))


def reduction_width(policy: GatePolicy, channels: int) -> int:
    """A gate's hidden width before ``max_cost``: ``channels / reduction`` (method.md's rule when None)."""
    return max(1, channels // (policy.reduction or (2 if channels >= 80 else 1)))


def narrowed_by_cost(gates: GateSet, policy: GatePolicy) -> list[str]:
    """The gates whose hidden layer ``policy.max_cost`` made narrower than the reduction's width."""
    return [g.name for g in gates.values() if g.fc1.out_features < reduction_width(policy, g.fc2.out_features)]


def gate_costs(model: nn.Module, flow: Dataflow, gated: list[str], followers: dict[str, str]) -> dict[str, GateCost]:
    """Per gated convolution, its gate's ``GateCost``: the FLOPs it decides are its convolution's, its
    follower's, and those of the convolution that reads the channels (as ``core.flops`` counts them)."""
    consumers = flow.channel_consumers(sorted({*gated, *followers}))
    costs = {}
    for name in gated:
        decided = _conv_flops(model, flow, name)
        reader = consumers.get(name)
        if reader is not None:
            decided += _conv_flops(model, flow, reader)
            if reader in followers and consumers.get(reader) is not None:
                decided += _conv_flops(model, flow, consumers[reader])
        costs[name] = GateCost(model.get_submodule(name).in_channels, decided)
    return costs


def _conv_flops(model: nn.Module, flow: Dataflow, name: str) -> int:
    conv = model.get_submodule(name)
    out_shape = flow.calls[flow.module_calls[name][0]].out_shape
    return math.prod(out_shape[1:]) * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)


def insert_gates(
    model: nn.Module,
    policy: GatePolicy | None = None,
    input_shape: tuple[int, int, int] = (3, 64, 64),
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> GateSet:
    """Attach a saliency gate to every convolution ``policy`` selects; return the gates.

    The model is modified in place: a ``manidp_gates`` submodule holds the gates and hooks apply
    them. ``input_shape`` (C, H, W) is the size of the probe image run once to find the
    convolutions; any size the model accepts will do. ``calibration`` (labelled batches) is what
    ``policy.init: taylor`` measures its importance on, before any gate is attached.
    """
    policy = policy or GatePolicy()
    if hasattr(model, GATE_PREFIX):
        raise ModelError(f"{type(model).__name__} already has gates")
    flow = trace_dataflow(model, input_shape)
    selected = _select(model, policy, flow)
    measured = _data_importance(model, policy, selected, calibration)
    followers = follower_convs(model, selected, input_shape) if policy.depthwise == "follow" else {}
    follower_norms = {conv: selected.pop(conv) for conv in followers}
    inputs = input_gate_convs(model, selected, input_shape) if policy.inputs else []
    costs = gate_costs(model, flow, list(selected), followers)
    # an input gate decides its convolution's input channels: that convolution's FLOPs
    input_costs = {c: GateCost(costs[c].in_channels, _conv_flops(model, flow, c)) for c in inputs}
    gates = GateSet()
    for gate in [_new_gate(model, policy, c, n, costs[c]) for c, n in selected.items()] + [
        _new_gate(model, policy, c, None, input_costs[c]) for c in inputs
    ]:
        key = gate_key(gate.name)
        if key in gates:
            raise ModelError(f"two gated convolutions map to the same gate key {key!r}")
        gates[key] = gate
    param = next(model.parameters(), None)
    if param is not None:
        gates.to(device=param.device, dtype=param.dtype)
    model.add_module(GATE_PREFIX, gates)
    if policy.init != "ones":
        initialise_from_importance(model, gates, selected, policy.init, policy.init_strength, measured)
    leaders = {gate.conv_name: gate for gate in gates.values() if gate.side == "output"}
    for follower, producer in followers.items():
        leader = leaders[producer]
        leader.follower = follower
        leader.follower_site, leader.follower_site_kind = _mask_site(model, follower_norms[follower])
    # Input gates first: where a convolution has both, its output gate reads the input it convolves.
    for gate in sorted(gates.values(), key=lambda g: g.side != "input"):
        if gate.side == "input":
            attach_input_gate(model.get_submodule(gate.conv_name), gate)
            continue
        model.get_submodule(gate.conv_name).register_forward_pre_hook(gate._on_conv_input)
        site = model.get_submodule(gate.mask_site)
        if gate.mask_site_kind == "input":
            site.register_forward_pre_hook(gate._on_site_input)
        else:
            site.register_forward_hook(gate._on_site_output)
        if gate.follower is not None:
            gate.attach_follower(model)
    return gates


def attach_input_gate(conv: nn.Module, gate: SaliencyGate) -> None:
    """Hook an input gate onto its convolution (or the module that replaced it) ahead of any other
    pre-hook: the saliency from the input, then the masked input."""
    conv.register_forward_pre_hook(gate._on_site_input, prepend=True)
    conv.register_forward_pre_hook(gate._on_conv_input, prepend=True)


def _data_importance(
    model: nn.Module, policy: GatePolicy, selected: dict[str, str], calibration
) -> dict[str, torch.Tensor] | None:
    """policy.init taylor's importance of every selected convolution's normalised channels, by
    normalisation name; None for the static kinds."""
    if policy.init != "taylor":
        return None
    if calibration is None:
        raise ModelError("gates.init: taylor measures importance on labelled images, and none were given")
    return taylor_importance(model, sorted(set(selected.values())), calibration)


def channel_importance(conv: nn.Module, norm: nn.Module, kind: str) -> torch.Tensor:
    """A static importance per output channel: the filter's L1 norm, or |gamma| / sigma of the
    normalisation after it (how much the channel is amplified)."""
    if kind == "l1_norm":
        return conv.weight.detach().abs().flatten(1).sum(1).double()
    variance = getattr(norm, "running_var", None)
    sigma = torch.sqrt(variance.double() + norm.eps) if variance is not None else torch.ones_like(norm.weight.double())
    return norm.weight.detach().abs().double() / sigma


def initialise_from_importance(
    model: nn.Module,
    gates: GateSet,
    norms: dict[str, str],
    kind: str,
    strength: float,
    measured: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Start every gate from its channels' static importance without changing the network's function.

    Channel k gets the constant saliency b_k = 1 + strength * z_k, z_k = its importance over the
    layer's mean importance, minus 1 (clamped so that b_k >= 0.01), and the normalisation after the
    convolution has its affine weight and bias divided by b_k; the mask multiplies that normalised
    output by b_k, so the output is unchanged. A layer's first threshold cut then removes its least
    important channels, as a static pruner would. An input gate's channel j gets the L1 norm of the
    convolution's weights that read it, and those weights are divided by b_j instead. ``measured``
    (by normalisation name) is the importance of kind ``taylor``. Returns b per gate name."""
    initial = {}
    for gate in gates.values():
        if gate.side == "input":
            initial[gate.name] = _initialise_input_gate(model.get_submodule(gate.conv_name), gate, strength)
            continue
        norm = model.get_submodule(norms[gate.conv_name])
        if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:
            raise ModelError(
                f"{norms[gate.conv_name]} has no affine weight and bias to absorb the gates' initial saliency; "
                f"use gates.init: ones"
            )
        if kind == "taylor":
            importance = measured[norms[gate.conv_name]].double()
        else:
            importance = channel_importance(model.get_submodule(gate.conv_name), norm, kind)
        scale = _initial_saliency(importance, strength)
        gate.set_initial_saliency(scale)
        with torch.no_grad():
            norm.weight.div_(scale.to(norm.weight))
            norm.bias.div_(scale.to(norm.bias))
        initial[gate.name] = scale
    return initial


def _initial_saliency(importance: torch.Tensor, strength: float) -> torch.Tensor:
    z = importance / importance.mean().clamp(min=1e-12) - 1.0
    return (1.0 + strength * z).clamp(min=1e-2).float()


def _initialise_input_gate(conv: nn.Module, gate: SaliencyGate, strength: float) -> torch.Tensor:
    scale = _initial_saliency(conv.weight.detach().abs().double().sum(dim=(0, 2, 3)), strength)
    gate.set_initial_saliency(scale)
    with torch.no_grad():
        conv.weight.div_(scale.to(conv.weight)[None, :, None, None])
    return scale


def has_gates(model: nn.Module) -> bool:
    return isinstance(getattr(model, GATE_PREFIX, None), GateSet)


def gates_of(model: nn.Module) -> GateSet:
    """The gates ``insert_gates`` attached to ``model``."""
    gates = getattr(model, GATE_PREFIX, None)
    if not isinstance(gates, GateSet):
        raise ModelError(f"{type(model).__name__} has no manidp gates; call insert_gates first")
    return gates


def strip_gates(model: nn.Module) -> None:
    """Remove the gates and their hooks: the plain network with the same weights."""
    gates = gates_of(model)
    hook_owners = set()
    for gate in gates.values():
        hook_owners.add(gate.conv_name)
        hook_owners.add(gate.mask_site)
        if gate.follower_site is not None:
            hook_owners.add(gate.follower_site)
    for name in hook_owners:
        module = model.get_submodule(name)
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    delattr(model, GATE_PREFIX)
