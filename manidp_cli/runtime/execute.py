"""Dynamic execution: turn the masks' FLOPs savings into skipped work.

``dynamic_model(gated)`` returns an inference copy in which BatchNorm is folded into every
convolution it follows, and every gated convolution computes, for a single image, only the output
channels its gate keeps, reading only the input channels that are not entirely zero; the narrow result
is scattered back to full width so that the rest of the (unmodified) timm model runs as usual.
A batch of more than one image computes the output channels that any of its images keeps, from the
input channels that any of them has non-zero, and masks each image within them (the full-width
masked convolution when that union is nearly every channel; batching was measured faster on the
CPU than running the images one by one; docs/speed.md).

A gate with a codebook (``manidp_cli.core.codebook``) turns its convolution gather-free: the weights of
every keep-set, and of every pair (producer's keep-set, own keep-set) along narrow chains, are
sliced and laid out once, so an image only picks one and runs it. Batches with codebooks run the
union of their images' entries too, and are grouped by entry where that union is nearly every
channel (docs/speed.md).

Every layer decides (entry or keep-set) with the gate's own rule on its own saliencies, which
differ from the masked model's by rounding only (folded BatchNorm, other kernels); given equal
decisions, outputs equal the masked model's up to float rounding. A decision within rounding of a
tie may go either way: ``run_with_decisions`` and ``DecisionAgreement`` make that visible
(docs/portability.md).

Example::

    fast = dynamic_model(load_pruned("runs/demo/pruned")[0])
    fast(image)   # image: 1 x C x H x W
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from manidp_cli.core.gating import (
    INPUT_GATE_SUFFIX,
    SaliencyGate,
    attach_input_gate,
    entry_score_terms,
    entry_scores,
    gates_of,
    has_gates,
    is_depthwise,
    strip_gates,
)
from manidp_cli.core.graph import fused_activation, removable_consumers, trace_dataflow
from manidp_cli.runtime.channels import (
    ChannelScatter,
    ScattersOutput,
    memory_format_of,
    scatter_channels,
    zeros_in_layout_of,
)

T = TypeVar("T")
# a batch runs only the channels some image keeps (or reads) while they are at most this share of
# the layer; wider, the full-width masked convolution is cheaper than gathering the weights
UNION_MAX_SHARE = 0.9
# gathered weights a layer keeps for single images, most recent decisions first (memory: this many
# copies of the layer's weight at most)
RECENT_WEIGHTS = 4


def fold_batchnorm(conv: nn.Conv2d, norm: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``norm(conv(x))`` as one convolution (eval-mode statistics)."""
    scale = (
        norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
        if norm.affine
        else 1 / torch.sqrt(norm.running_var + norm.eps)
    )
    shift = (norm.bias.detach() if norm.affine else 0) - norm.running_mean * scale
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(norm.running_mean)
    weight = conv.weight.detach() * scale.view(-1, 1, 1, 1)
    return weight, bias * scale + shift


def _after_norm(norm: nn.Module) -> nn.Module:
    """What remains of a normalisation layer once folded: its fused activation, if any, and the
    scatter to full width of a static export's narrowed residual-feeding layer."""
    act = fused_activation(norm)
    after = act if act is not None else nn.Identity()  # not `or`: a Sequential's truth is its length
    if isinstance(norm, ScattersOutput):
        return ChannelScatter(after, norm.output_channels, norm.full_width)
    return after


def _copy_with_weights(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A hook-free copy of ``conv`` (its class, so timm's padded variants keep their padding) that
    computes with ``weight`` and ``bias``."""
    conv = copy.deepcopy(conv)
    conv.weight = nn.Parameter(weight, requires_grad=False)
    conv.bias = nn.Parameter(bias, requires_grad=False)
    conv._forward_pre_hooks.clear()
    return conv


class DecidingInput(nn.Module):
    """An input gate (``GatePolicy.inputs``) in an inference copy: a pre-hook of its convolution that
    masks the input channels the gate switches off, recording its decision and taking a forced one
    like ``DynamicConv`` (``runtime.decisions``). The convolution still reads every input channel:
    the executor does not skip masked inputs yet."""

    def __init__(self, gate: SaliencyGate):
        super().__init__()
        self.gate = gate
        self.last_decision: torch.Tensor | None = None
        self.last_saliency: torch.Tensor | None = None
        self.forced_decision: torch.Tensor | None = None

    def mask_input(self, module: nn.Module, args: tuple) -> tuple:
        saliency = self.gate(args[0])
        own = self.gate.keep(saliency)
        self.last_decision, self.last_saliency = own, saliency
        keep, self.forced_decision = (own if self.forced_decision is None else self.forced_decision), None
        return (args[0] * (saliency * keep).to(args[0].dtype)[:, :, None, None],) + tuple(args[1:])


class FoldedConv(nn.Module):
    """A convolution with its BatchNorm folded in (timm's padded variants keep their padding)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module):
        super().__init__()
        self.conv = _copy_with_weights(conv, *fold_batchnorm(conv, norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def depthwise_channels(x, weight, bias, channels, stride, padding, dilation) -> torch.Tensor:
    """A depthwise convolution of ``channels`` alone (``x`` holds every channel, padded already)."""
    return F.conv2d(
        x.index_select(1, channels),
        weight.index_select(0, channels),
        bias.index_select(0, channels),
        stride,
        padding,
        dilation,
        len(channels),
    )


class FollowingConv(FoldedConv):
    """A depthwise convolution (BatchNorm folded) that computes the channels its producer's gate kept
    (``depthwise: follow``): one image runs only those, a batch is masked to them."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, producer: DynamicConv):
        super().__init__(conv, norm)
        self._producer = [producer]  # a list keeps it out of the module tree
        self.groups = conv.groups
        # along a narrow chain a single image hands over its kept channels alone (``DynamicConv``)
        self.narrow_output = False
        self.last_kept: torch.Tensor | None = None
        self._consumer: list[DynamicConv] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self._producer[0].applied_keep()
        conv = self.conv
        kept = keep[0].nonzero().flatten()
        # a batch, a padded timm variant (it pads in its forward) or no channel kept: masked
        if x.shape[0] != 1 or type(conv) is not nn.Conv2d or len(kept) == 0:
            return conv(x) * keep.to(x.dtype)[:, :, None, None]
        narrow = depthwise_channels(x, conv.weight, conv.bias, kept, conv.stride, conv.padding, conv.dilation)
        if self.narrow_output:
            self.last_kept = kept
            return narrow
        return scatter_channels(narrow, kept, conv.out_channels)


def _weight_key(producer_entry: int, entry: int) -> str:
    """Buffer name of an entry's packed weight for one entry of its producer (0: full input)."""
    return f"weight_{producer_entry}_{entry}"


def _bias_key(entry: int) -> str:
    """Buffer name of an entry's packed bias."""
    return f"bias_{entry}"


def _padded_keys(producer_entry: int, entry: int) -> tuple[str, str]:
    """Buffer names of the zero-padded weight and bias (``use_entry_kernel``) of one entry pair."""
    return f"padded_weight_{producer_entry}_{entry}", f"padded_bias_{producer_entry}_{entry}"


class DynamicConv(nn.Module):
    """Gated convolution + folded BatchNorm; single images compute only kept channels."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, gate: SaliencyGate):
        super().__init__()
        weight, bias = fold_batchnorm(conv, norm)
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("bias", bias.contiguous())
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.same_padding = type(conv).__name__ == "Conv2dSame"
        self.functional_padding = 0 if self.same_padding else conv.padding  # Conv2dSame pads in _pad
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.depthwise = is_depthwise(conv)
        self.gate = gate
        self.conv = _copy_with_weights(conv, weight, bias)  # the masked path for batches and grouped convolutions
        # Narrow chaining: when this layer's output reaches exactly one gated convolution through
        # element-wise activations only, it hands over the kept channels alone and that consumer
        # reads them with the producer's index, skipping the scatter, the zero-channel scan and the
        # input gather.
        self.narrow_output = False
        self.last_kept: torch.Tensor | None = None
        self.last_entry: int | None = None
        # The gate's decision (``SaliencyGate.decide``) of the last call, as this layer made it, and
        # one to take instead on the next call (``force_decisions``): how the tests and ``manidp eval
        # --dynamic`` compare decisions with the masked model's, and outputs given equal decisions.
        self.last_decision: torch.Tensor | None = None
        self.last_saliency: torch.Tensor | None = None  # what the last decision was made from
        self.forced_decision: torch.Tensor | None = None
        self.applied_decision: torch.Tensor | None = None  # the last call's decision or the forced one: what ran
        self._producer: list[DynamicConv] = []  # a list keeps it out of the module tree
        self._consumer: list[DynamicConv] = []
        self.entry_rows: list[torch.Tensor] = []  # per codebook entry, its kept output channels
        self.packed_inputs = False  # weights also sliced per producer entry (narrow input)
        self.tuning: EntryTuning | None = None  # set by tune_entries while it runs
        self._tuned: set[tuple[int, int]] = set()
        self._onednn: set[tuple[int, int]] = set()  # (producer entry, entry) pairs tuned to call oneDNN
        self._recent: dict[tuple[bytes, bytes | None], tuple[torch.Tensor, torch.Tensor]] = {}
        self._recent_version = (-1, -1)  # the weight's and bias's versions the gathered copies were taken at

    def pack(self) -> None:
        """Slice each codebook entry's weights once; call after narrow chains are set up.

        Buffers, so that ``.to(memory_format=torch.channels_last)`` lays them out too. The gate's
        layers are laid out for a single image as well: its first layer sliced to each producer
        entry's channels (a narrow input needs no scatter into a full-width pooled vector), and the
        entry choice as one matrix-vector product, scores = saliency @ C^T - tau * |c_k|."""
        gate = self.gate
        if not gate.snaps or self.groups > 1:
            return
        self.entry_rows = [torch.nonzero(row).flatten() for row in gate.codebook]
        producer = self._producer[0] if self._producer else None
        self.packed_inputs = producer is not None and producer.groups == 1 and producer.gate.snaps
        columns = [torch.nonzero(row).flatten() for row in producer.gate.codebook] if self.packed_inputs else [None]
        hidden = gate.fc1.weight.detach()
        for p, cols in enumerate(columns):
            self.register_buffer(f"gate_hidden_{p}", (hidden if cols is None else hidden[:, cols]).t().contiguous())
        self.register_buffer("gate_out", gate.fc2.weight.detach().t().contiguous())
        self.register_buffer("gate_out_bias", gate.fc2.bias.detach().clone())
        columns_of_entries, offsets = entry_score_terms(gate.codebook, gate.threshold)
        self.register_buffer("entry_columns", columns_of_entries)
        self.register_buffer("entry_offsets", offsets)
        for k, rows in enumerate(self.entry_rows):
            self.register_buffer(_bias_key(k), self.bias.index_select(0, rows).contiguous())
            for p, cols in enumerate(columns):
                self.register_buffer(_weight_key(p, k), self._gather_weight(rows, cols).contiguous())
        self._bind_packed()

    def _bind_packed(self) -> None:
        """Plain lists of the packed buffers, indexed [producer entry][entry], so that a single
        image's path does no name lookups; rebuilt whenever ``_apply`` (``.to(...)``) replaces them."""
        if not self.entry_rows:
            return
        producers = sum(1 for name in self._buffers if name.startswith("gate_hidden_"))
        self._gate_hidden = [self._buffers[f"gate_hidden_{p}"] for p in range(producers)]
        buffers = self._buffers
        self._entries = [
            [
                (
                    buffers.get(_padded_keys(p, k)[0], buffers[_weight_key(p, k)]),
                    buffers.get(_padded_keys(p, k)[1], buffers[_bias_key(k)]),
                    rows,
                    _onednn_conv2d if (p, k) in self._onednn else F.conv2d,
                )
                for k, rows in enumerate(self.entry_rows)
            ]
            for p in range(producers)
        ]

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self._recent.clear()  # gathered from the weights before they moved or changed layout
        self._bind_packed()
        return module

    def _run_packed(self, x: torch.Tensor) -> torch.Tensor:
        """One image through its codebook entry with pre-sliced weights: the gate on the packed
        layers (relu then clamp to c_max is one clamp to [0, c_max]), the entry's convolution, the
        saliency scaling."""
        producer_entry = self._producer[0].last_entry if self.packed_inputs else 0
        hidden = torch.relu(x.mean(dim=(2, 3)) @ self._gate_hidden[producer_entry])
        logits = torch.addmm(self.gate_out_bias, hidden, self.gate_out)
        saliency = (
            logits.clamp_(0.0, self.gate.max_saliency) if self.gate.activation == "relu" else self.gate.activate(logits)
        )
        entry = int(self._choose_entries(saliency))
        if self.tuning is not None and (producer_entry, entry) not in self._tuned:
            self._tune_entry(x, producer_entry, entry)
        weight, bias, rows, convolve = self._entries[producer_entry][entry]
        narrow = convolve(self._pad(x), weight, bias, self.stride, self.functional_padding, self.dilation)
        if weight.shape[0] != len(rows):  # padded by tuning: the extra rows are zero, drop them
            narrow = narrow[:, : len(rows)]
        narrow.mul_(saliency.index_select(1, rows).view(1, -1, 1, 1))
        self.last_entry = entry
        return self._emit(narrow, rows)

    def _choose_entries(self, saliency: torch.Tensor) -> torch.Tensor:
        """``SaliencyGate.entry`` over the packed score terms (the same formula, the same numbers),
        unless a decision was forced."""
        if len(self.entry_rows) == 1:  # a codebook of one keep-set (most of a trained default's): no choice
            own = torch.zeros(saliency.shape[0], dtype=torch.long, device=saliency.device)
        elif self.entry_rows:
            own = entry_scores(saliency, self.entry_columns, self.entry_offsets).argmax(dim=1)
        else:  # not packed (a grouped convolution): the gate's own terms
            own = self.gate.entry(saliency)
        return self._settle(own, saliency)

    def _choose_keep(self, saliency: torch.Tensor) -> torch.Tensor:
        """``SaliencyGate.keep`` (free masks), unless a decision was forced."""
        return self._settle(self.gate.keep(saliency), saliency)

    def _settle(self, own: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
        """Record this layer's own decision; return the forced one instead when there is one."""
        self.last_decision, self.last_saliency = own, saliency
        forced, self.forced_decision = self.forced_decision, None
        if forced is not None and forced.shape != own.shape:
            raise ValueError(
                f"forced decision of shape {tuple(forced.shape)} for a decision of shape {tuple(own.shape)}"
            )
        self.applied_decision = own if forced is None else forced.to(own.device)
        return self.applied_decision

    def applied_keep(self) -> torch.Tensor:
        """B x C_out bool: the output channels the last call computed (its decision or the forced one)."""
        if self.applied_decision is None:
            raise RuntimeError("a convolution that follows this layer ran before it")
        if self.gate.snaps:
            return self.gate.codebook[self.applied_decision] > 0
        return self.applied_decision

    def _tune_entry(self, x: torch.Tensor, producer_entry: int, entry: int) -> None:
        """Time this entry's convolution on ``x`` at its own width and at wider ones (extra rows of
        zeros, dropped after the convolution), each through PyTorch's choice of kernel and through
        oneDNN directly, and keep the fastest if it beats the plain call by the margin.

        Neither is a given on the CPU: oneDNN's speed is not monotonic in the output width (512 ->
        304 channels at 7 x 7, channels-last: 1.5 ms, 512 -> 320: 0.9 ms), and PyTorch sends small
        single-image inputs to an im2col kernel that is slower for some narrow shapes (docs/speed.md)."""
        tuning = self.tuning
        self._tuned.add((producer_entry, entry))
        candidates = self.entry_kernel_candidates(producer_entry, entry, x, tuning)
        if len(candidates) == 1:
            return
        width = len(self.entry_rows[entry])
        source = self._pad(x)
        layout = memory_format_of(x)
        padded = {wide: self._padded_entry(producer_entry, entry, wide) for wide, _ in candidates}

        def run(candidate: tuple[int, str]) -> torch.Tensor:
            wide, kernel = candidate
            out = _KERNELS[kernel](source, *padded[wide], self.stride, self.functional_padding, self.dilation)[
                :, :width
            ]
            # a consumer reads a narrow output contiguously: the copy a padded one needs counts too
            return out.contiguous(memory_format=layout) if self.narrow_output and wide != width else out

        seconds = _time_candidates(run, candidates)
        fastest = min(candidates, key=seconds.__getitem__)
        if seconds[fastest] >= (1 - tuning.min_gain) * seconds[(width, "default")]:
            return
        self.use_entry_kernel(producer_entry, entry, *fastest)

    def entry_kernel_candidates(
        self, producer_entry: int, entry: int, x: torch.Tensor, tuning: EntryTuning
    ) -> list[tuple[int, str]]:
        """What the tuner may choose for one entry's convolution on inputs like ``x``: (width,
        kernel) pairs, the entry's own width and ``"default"`` first."""
        width = len(self.entry_rows[entry])
        widest = min(self.out_channels, width + tuning.max_extra)
        widths = [width] + list(range(-(-(width + 1) // tuning.step) * tuning.step, widest + 1, tuning.step))
        kernels = ["default"]
        onednn_usable = (
            torch.backends.mkldnn.is_available()
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not isinstance(self.functional_padding, str)  # nn.Conv2d's "same"/"valid" have no oneDNN spelling here
        )
        if "onednn" in tuning.kernels and onednn_usable:
            kernels.append("onednn")
        return [(wide, kernel) for wide in widths for kernel in kernels]

    def _padded_entry(self, producer_entry: int, entry: int, wide: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The entry's weight and bias with zero rows appended up to ``wide`` output channels."""
        weight = self._buffers[_weight_key(producer_entry, entry)]
        bias = self._buffers[_bias_key(entry)]
        width = weight.shape[0]
        if wide == width:
            return weight, bias
        padded_weight = zeros_in_layout_of(weight, (wide, *weight.shape[1:]))
        padded_weight[:width] = weight
        return padded_weight, torch.cat([bias, bias.new_zeros(wide - width)])

    def use_entry_kernel(self, producer_entry: int, entry: int, wide: int, kernel: str) -> None:
        """Run this entry's convolution at ``wide`` output channels (zero rows, dropped after it)
        through ``kernel`` ("default": PyTorch's choice, "onednn"): what the tuner applies, and
        what the tests force, one choice at a time."""
        if kernel not in _KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(_KERNELS)}")
        width = len(self.entry_rows[entry])
        if not width <= wide <= self.out_channels:
            raise ValueError(f"width {wide} outside [{width}, {self.out_channels}] for entry {entry}")
        for name in _padded_keys(producer_entry, entry):
            self._buffers.pop(name, None)
        if wide != width:
            weight, bias = self._padded_entry(producer_entry, entry, wide)
            weight_key, bias_key = _padded_keys(producer_entry, entry)
            self.register_buffer(weight_key, weight)
            self.register_buffer(bias_key, bias)
        self._onednn.discard((producer_entry, entry))
        if kernel == "onednn":
            self._onednn.add((producer_entry, entry))
        self._bind_packed()

    def _masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * mask[:, :, None, None].to(x.dtype)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if not self.same_padding:
            return x
        from timm.layers.padding import pad_same

        return pad_same(x, self.conv.weight.shape[-2:], self.stride, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        narrow_input = x.shape[1] != self.in_channels  # the producer handed over its kept channels only
        if self.entry_rows and x.shape[0] == 1 and (self.packed_inputs or not narrow_input):
            return self._run_packed(x)  # with packed inputs a single image always arrives as the producer's entry
        saliency = self._narrow_input_saliency(x) if narrow_input else self.gate(x)
        if self.entry_rows and x.shape[0] == 1:
            return self._run_entry_gathered(x, saliency)
        mask = saliency * self._decision_mask(saliency)
        if x.shape[0] != 1 and self.groups == 1:
            return self._run_union(x, mask, saliency, narrow_input)
        if x.shape[0] != 1 or (self.groups > 1 and not self.depthwise):
            return self._masked(x, mask)
        return self._run_single(x, mask[0].to(x.dtype), narrow_input)

    def _narrow_input_saliency(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's saliency of images whose input holds only the producer's kept channels."""
        pooled = x.new_zeros(x.shape[0], self.in_channels)
        pooled[:, self._producer[0].last_kept] = x.mean(dim=(2, 3))
        return self.gate.saliency_from_pooled(pooled)

    def _decision_mask(self, saliency: torch.Tensor) -> torch.Tensor:
        """0/1 per output channel: the codebook entry's channels, or the channels over the threshold."""
        if self.gate.snaps:  # a grouped convolution with a codebook takes the masked path
            return self.gate.codebook[self._choose_entries(saliency)].to(saliency.dtype)
        return self._choose_keep(saliency).to(saliency.dtype)

    def _active_inputs(self, x: torch.Tensor, narrow_input: bool) -> torch.Tensor:
        """Indices of the input channels that are not entirely zero in every image (for a narrow input:
        all it has)."""
        if narrow_input:
            return self._producer[0].last_kept
        return x.abs().amax(dim=(0, 2, 3)).nonzero().flatten()

    def _run_single(self, x: torch.Tensor, scale: torch.Tensor, narrow_input: bool) -> torch.Tensor:
        """One image without a codebook: only the kept output channels, from the active inputs."""
        kept = scale.nonzero().flatten()
        height, width = self._output_size(x)
        if len(kept) == 0:
            return self._emit(x.new_zeros(1, 0, height, width), kept)
        active = self._active_inputs(x, narrow_input)
        if self.depthwise:
            return self._run_depthwise(x, scale, kept, active, (height, width))
        if len(active) == 0:
            narrow = self.bias.index_select(0, kept)[None, :, None, None].expand(1, len(kept), height, width)
        else:
            source = self._pad(x)
            columns: torch.Tensor | None = active
            if not narrow_input and len(active) > UNION_MAX_SHARE * self.in_channels:
                columns = None  # nearly every input channel is active: read them all, no gather
            elif not narrow_input:
                source = source.index_select(1, active)
            weight, bias = self._recent_weight(kept, columns)
            narrow = F.conv2d(source, weight, bias, self.stride, self.functional_padding, self.dilation)
        return self._emit(narrow * scale.index_select(0, kept)[None, :, None, None], kept)

    def _run_depthwise(
        self, x: torch.Tensor, scale: torch.Tensor, kept: torch.Tensor, active: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        # kept channels whose input is entirely zero output their (folded) bias alone
        constant = (self.bias.index_select(0, kept) * scale.index_select(0, kept))[:, None, None]
        out = x.new_zeros(1, self.out_channels, *size)
        out[0, kept] = constant
        both = kept[torch.isin(kept, active)]
        if len(both):
            narrow = depthwise_channels(
                self._pad(x), self.weight, self.bias, both, self.stride, self.functional_padding, self.dilation
            )
            out[0, both] = narrow[0] * scale.index_select(0, both)[:, None, None]
        return out

    def _run_entry_gathered(self, x: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
        """One image through its codebook entry when its input is the narrow output of a producer
        without a codebook: the entry's weights gathered to the producer's kept channels."""
        entry = int(self._choose_entries(saliency))
        rows = self.entry_rows[entry]
        weight = self._buffers[_weight_key(0, entry)].index_select(1, self._producer[0].last_kept)
        narrow = F.conv2d(
            self._pad(x), weight, self._buffers[_bias_key(entry)], self.stride, self.functional_padding, self.dilation
        )
        narrow.mul_(saliency.index_select(1, rows).view(1, -1, 1, 1))
        self.last_entry = entry
        return self._emit(narrow, rows)

    def _run_grouped(self, x: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
        """A batch, grouped by codebook entry: one narrow convolution per entry in use (the weights of
        an entry over all input channels are gathered once per batch); full-width output."""
        entries = self._choose_entries(saliency)
        source = self._pad(x)
        out = None
        for entry in entries.unique().tolist():
            images = torch.nonzero(entries == entry).flatten()
            rows = self.entry_rows[entry]
            narrow = F.conv2d(
                source.index_select(0, images),
                self.weight.index_select(0, rows),
                self._buffers[_bias_key(entry)],
                self.stride,
                self.functional_padding,
                self.dilation,
            )
            narrow = narrow.mul_(saliency[images][:, rows].to(narrow.dtype)[:, :, None, None])
            if out is None:
                out = zeros_in_layout_of(narrow, (x.shape[0], self.out_channels, *narrow.shape[-2:]))
            out[images[:, None], rows] = narrow
        return out

    def _run_union(
        self, x: torch.Tensor, mask: torch.Tensor, saliency: torch.Tensor, narrow_input: bool = False
    ) -> torch.Tensor:
        """A batch: only the output channels that some image keeps (its free mask or codebook entry),
        from the input channels that are not zero in every image, each image's own mask applied
        within them. When images agree on most decisions (a trained default routes 2-9% of its
        channels, docs/results.md; its codebooks collapse to one entry in most layers), the batch
        costs about one image's share of the FLOPs, where the masked path computes every channel.
        Full width out, or, along a narrow chain, the union alone (its consumer reads it with the
        union's index). Off a chain, a union that is nearly full width takes the masked path, or
        with a codebook one narrow convolution per entry in use."""
        union = mask.ne(0).any(dim=0).nonzero().flatten()
        hands_over = self._hands_over_batches()
        if not (narrow_input or hands_over) and len(union) > UNION_MAX_SHARE * self.out_channels:
            return self._run_grouped(x, saliency) if self.entry_rows else self._masked(x, mask)
        height, width = self._output_size(x)
        narrow = self._union_conv(x, union, narrow_input, (height, width))
        narrow.mul_(mask.index_select(1, union).to(narrow.dtype)[:, :, None, None])
        if hands_over:
            self.last_kept = union
            return narrow
        return scatter_channels(narrow, union, self.out_channels)

    def _hands_over_batches(self) -> bool:
        return self.narrow_output and self._consumer[0].groups == 1

    def _union_conv(
        self, x: torch.Tensor, union: torch.Tensor, narrow_input: bool, size: tuple[int, int]
    ) -> torch.Tensor:
        """Output channels ``union`` of every image, from the input channels that carry anything."""
        active = self._active_inputs(x, narrow_input)  # narrow: the producer's union, read with its index
        if len(union) == 0 or len(active) == 0:  # nothing to read: every kept channel is its bias
            bias = self.bias.index_select(0, union)
            return bias[None, :, None, None].expand(x.shape[0], len(union), *size).clone()
        source, columns = self._pad(x), active
        if not narrow_input and len(active) > UNION_MAX_SHARE * self.in_channels:
            columns = None  # nearly every input carries something: no gather
        elif not narrow_input:
            source = source.index_select(1, active)
        weight, bias = self._recent_weight(union, columns)
        return F.conv2d(source, weight, bias, self.stride, self.functional_padding, self.dilation)

    def _recent_weight(self, rows: torch.Tensor, columns: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """weight[rows][:, columns] and bias[rows], reused while one of the last few images (or
        batch unions) of this layer made the same decision: a trained model repeats most of its
        decisions (the default routes 1.4% of its channels, docs/results.md), and gathering a wide
        layer's weight costs about as much as its convolution at 224 px."""
        if self._recent_version != (self.weight._version, self.bias._version):  # weights changed in place
            self._recent.clear()
            self._recent_version = (self.weight._version, self.bias._version)
        key = (rows.cpu().numpy().tobytes(), None if columns is None else columns.cpu().numpy().tobytes())
        hit = self._recent.pop(key, None)
        if hit is None:
            hit = (self._gather_weight(rows, columns), self.bias.index_select(0, rows))
        self._recent[key] = hit
        while len(self._recent) > RECENT_WEIGHTS:
            self._recent.pop(next(iter(self._recent)))
        return hit

    def _gather_weight(self, rows: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        """weight[rows][:, columns] (all columns when ``columns`` is None)."""
        weight = self.weight.index_select(0, rows)
        return weight if columns is None else weight.index_select(1, columns)

    def _emit(self, narrow: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        if self.narrow_output:
            self.last_kept = kept
            return narrow
        return scatter_channels(narrow, kept, self.out_channels)

    def _output_size(self, x: torch.Tensor) -> tuple[int, int]:
        kh, kw = self.weight.shape[-2:]
        sizes = []
        for i, (size, k) in enumerate(zip(x.shape[-2:], (kh, kw))):
            stride, dilation = self.stride[i], self.dilation[i]
            if self.same_padding:
                sizes.append(-(-size // stride))
            else:
                padding = self.padding[i]
                sizes.append((size + 2 * padding - dilation * (k - 1) - 1) // stride + 1)
        return sizes[0], sizes[1]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, child = _parent(model, name)
    setattr(parent, child, module)


def folded_model(model: nn.Module, input_shape: tuple[int, int, int], dynamic: bool = False) -> nn.Module:
    """An inference copy of ``model`` with BatchNorm folded into the convolutions before it.

    ``dynamic=True`` (a gated model) also turns gated convolutions into ``DynamicConv``. Without it
    a gated model's gates still mask (the masked path) and a dense model simply runs folded.
    """
    model = copy.deepcopy(model).eval()
    gates = gates_of(model).by_name() if has_gates(model) else {}
    # Trace the network without its gates: their own ops read the same tensors and would hide
    # single-consumer chains (the conv -> norm pairs are the same either way).
    plain = model
    if gates:
        plain = copy.deepcopy(model)
        strip_gates(plain)
    flow = trace_dataflow(plain, input_shape)
    pairs = flow.conv_norm_pairs()
    chains = {}
    followers = gates_of(model).followers() if gates else {}
    if dynamic and gates:
        outputs = sorted(gates_of(model).output_gated() | set(followers))
        chains = {p: c for p, c in removable_consumers(plain, flow, outputs).items() if c in gates}
    for conv_name, norm_name in pairs.items():
        norm = model.get_submodule(norm_name)
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            continue  # GroupNorm and friends depend on the image: nothing to fold
        conv = model.get_submodule(conv_name)
        gate = gates.get(conv_name)
        after = _after_norm(norm)
        after._forward_pre_hooks.clear()  # the gate's mask hook on a fused activation
        leader = gates.get(followers.get(conv_name, ""))
        producer = model.get_submodule(leader.conv_name) if leader is not None else None
        if gate is not None and dynamic:
            _replace(model, conv_name, DynamicConv(conv, norm, gate))
        elif isinstance(producer, DynamicConv):  # replaced already: the producer runs first
            _replace(model, conv_name, FollowingConv(conv, norm, producer))
        else:
            _replace(model, conv_name, FoldedConv(conv, norm))
            folded = model.get_submodule(conv_name)
            if gate is not None:  # keep masking: move the gate's hooks to the folded module
                folded.register_forward_pre_hook(gate._on_conv_input)
                folded.register_forward_hook(gate._on_site_output)
            if leader is not None:
                folded.register_forward_hook(leader._on_follower_output)
        input_gate = gates.get(conv_name + INPUT_GATE_SUFFIX)
        if input_gate is not None and dynamic:
            replaced = model.get_submodule(conv_name)
            replaced.input_gate = DecidingInput(input_gate)
            replaced.register_forward_pre_hook(replaced.input_gate.mask_input, prepend=True)
        elif input_gate is not None:
            attach_input_gate(model.get_submodule(conv_name), input_gate)
        _replace(model, norm_name, after)
    for producer_name, consumer_name in chains.items():
        producer, consumer = model.get_submodule(producer_name), model.get_submodule(consumer_name)
        if (
            isinstance(producer, (DynamicConv, FollowingConv))
            and isinstance(consumer, DynamicConv)
            and not consumer.depthwise
        ):
            producer.narrow_output = True
            consumer._producer.append(producer)
            producer._consumer.append(consumer)
    for module in model.modules():
        if isinstance(module, DynamicConv):
            module.pack()
    return model


def _onednn_conv2d(x, weight, bias, stride, padding, dilation) -> torch.Tensor:
    """F.conv2d's arguments, always through oneDNN (PyTorch picks im2col for some small inputs)."""
    return torch.mkldnn_convolution(x, weight, bias, _pair(padding), _pair(stride), _pair(dilation), 1)


_KERNELS: dict[str, Callable[..., torch.Tensor]] = {"default": F.conv2d, "onednn": _onednn_conv2d}


@dataclass(frozen=True)
class EntryTuning:
    """Candidate widths: the entry's own, then multiples of ``step`` up to ``max_extra`` more
    channels (never more than the dense layer's), each through every kernel of ``kernels``
    ("default": PyTorch's choice, "onednn"); a candidate must be ``min_gain`` faster than the
    entry's plain convolution to replace it. ``max_extra=0`` and ``kernels=("default",)`` tune nothing."""

    step: int = 16
    max_extra: int = 64
    min_gain: float = 0.1
    kernels: tuple[str, ...] = ("default", "onednn")


def _time_candidates(run: Callable[[T], torch.Tensor], candidates: list[T], rounds: int = 10) -> dict[T, float]:
    """Fastest of ``rounds`` timings of ``run(candidate)`` for each candidate, taking turns."""
    for candidate in candidates:
        run(candidate)
    seconds = {candidate: float("inf") for candidate in candidates}
    for _ in range(rounds):
        for candidate in candidates:
            start = time.perf_counter()
            run(candidate)
            seconds[candidate] = min(seconds[candidate], time.perf_counter() - start)
    return seconds


def tune_entries(
    model: nn.Module, images: list[torch.Tensor], tuning: EntryTuning = EntryTuning()
) -> dict[str, dict[str, dict]]:
    """Run single ``images`` (in the layout the model will run in) through a dynamic model and,
    for every codebook entry they use, keep the fastest way to run its convolution (see
    ``DynamicConv._tune_entry``); outputs are unchanged up to float rounding. Returns, per layer,
    the entries that changed: {"<producer entry>_<entry>": {"own_width", "width", "kernel"}}."""
    convs = {name: m for name, m in model.named_modules() if isinstance(m, DynamicConv) and m.entry_rows}
    for conv in convs.values():  # a new call starts over (the layout may have changed since)
        for key in [key for key in conv._buffers if key.startswith("padded_")]:
            del conv._buffers[key]
        conv._tuned.clear()
        conv._onednn.clear()
        conv._bind_packed()
        conv.tuning = tuning
    try:
        with torch.inference_mode():
            for image in images:
                model(image)
    finally:
        for conv in convs.values():
            conv.tuning = None
    changed = {}
    for name, conv in convs.items():
        entries = {}
        for p, row in enumerate(conv._entries):
            for k, (weight, _, rows, _) in enumerate(row):
                if weight.shape[0] != len(rows) or (p, k) in conv._onednn:
                    entries[f"{p}_{k}"] = {
                        "own_width": len(rows),
                        "width": int(weight.shape[0]),
                        "kernel": "onednn" if (p, k) in conv._onednn else "default",
                    }
        if entries:
            changed[name] = entries
    return changed


def pin_entry_kernels(model: nn.Module, kernel: str = "default", extra_channels: int = 0) -> int:
    """Run every codebook entry of a dynamic model through ``kernel`` at its own width plus
    ``extra_channels`` zero rows (at most the layer's width), without timing anything: each choice
    the tuner can make, forced everywhere at once (the tests check outputs under each). Layers the
    tuner never offers ``kernel`` for keep theirs. Returns the number of entries pinned."""
    pinned = 0
    for layer in dynamic_layers(model).values():
        if not layer.entry_rows or (kernel == "onednn" and isinstance(layer.functional_padding, str)):
            continue
        layer._tuned.clear()
        for producer_entry in range(len(layer._entries)):
            for entry, rows in enumerate(layer.entry_rows):
                wide = min(layer.out_channels, len(rows) + extra_channels)
                layer.use_entry_kernel(producer_entry, entry, wide, kernel)
                pinned += 1
    return pinned


def dynamic_model(model: nn.Module, input_shape: tuple[int, int, int]) -> nn.Module:
    """Inference copy of a gated model that skips the work of switched-off channels (batch 1)."""
    gates_of(model)
    return folded_model(model, input_shape, dynamic=True)


def dynamic_layers(model: nn.Module) -> dict[str, DynamicConv]:
    """The gated convolutions of a dynamic model, by name (the gated model's conv names)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, DynamicConv)}


def deciding_layers(model: nn.Module) -> dict[str, DynamicConv | DecidingInput]:
    """Everything in a dynamic model that decides per image, by its gate's name: the gated
    convolutions and the input gates."""
    layers: dict[str, DynamicConv | DecidingInput] = dict(dynamic_layers(model))
    for name, module in model.named_modules():
        if isinstance(module, DecidingInput):
            layers[module.gate.name] = module
    return layers
