"""Static slimming: physically remove the channels the gates (almost) never keep.

A gated convolution's output channel whose keep frequency over the calibration images is at most
``min_keep_rate`` is removed from the convolution, its BatchNorm and, when the normalised output
flows (through element-wise activations only) into exactly one dense convolution, from that
convolution's inputs. Channels that feed a residual addition, a concatenation or a depthwise
convolution keep their place (the layout of the network must not change there).

The result has no gates. Each gated channel's BatchNorm is scaled by the channel's mean mask value
over the calibration images (E[saliency x kept]), the best static stand-in for the per-image scaling
(exact for channels that are never kept: they output zero). It is an approximation of the dynamic
network, so its accuracy is measured again rather than assumed. timm cannot build per-layer widths from a model name, so the
runnable artifact is a ``torch.export`` program (``model.pt2``: ``torch.export.load(path).module()``
needs torch alone), written beside the slimmed weights (``model.safetensors``) and ``config.json``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from manidp_cli.gating import GATE_PREFIX, gates_of
from manidp_cli.graph import Dataflow, trace_dataflow

# per-channel ops that map an all-zero channel to an all-zero channel
_ELEMENTWISE = {
    "relu", "relu_", "relu6", "silu", "silu_", "hardswish", "hardswish_", "gelu", "leaky_relu", "dropout", "elu", "mish",
    "max_pool2d", "_max_pool2d", "avg_pool2d",
}


def removable_consumers(model: nn.Module, flow: Dataflow, conv_names) -> dict[str, str]:
    """Conv name -> the dense conv that alone reads its normalised, activated output. ``flow`` must
    be traced without gates: a gate's own ops would read the same tensors."""
    pairs = flow.conv_norm_pairs()
    consumers = {}
    by_index = flow.calls
    for conv_name in conv_names:
        norm_name = pairs.get(conv_name)
        if norm_name is None or len(flow.module_calls.get(norm_name, [])) != 1:
            continue
        call = by_index[flow.module_calls[norm_name][0]]
        while len(call.users) == 1:
            user = by_index[call.users[0]]
            if user.op == "conv":
                conv = model.get_submodule(user.name)
                if conv.groups == 1 and len(flow.module_calls[user.name]) == 1:
                    consumers[conv_name] = user.name
                break
            if user.op not in _ELEMENTWISE or len(user.inputs) != 1:
                break
            call = user
    return consumers


def _keep_rows(module: nn.Module, keep: torch.Tensor, dim: int, names: tuple[str, ...]) -> None:
    for name in names:
        tensor = getattr(module, name, None)
        if tensor is None:
            continue
        sliced = tensor.detach().index_select(dim, keep).clone()
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
        else:
            setattr(module, name, sliced)


@dataclass
class SlimResult:
    model: nn.Module
    removed: dict[str, int]  # gated conv -> output channels removed
    kept_channels: dict[str, int]


def mask_statistics(model: nn.Module, batches) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per gated layer and channel: the fraction of images that keep it and its mean mask value."""
    from manidp_cli.recorder import GateRecorder

    frequency: dict[str, torch.Tensor] = {}
    mean_mask: dict[str, torch.Tensor] = {}
    count = 0
    model.eval()
    with torch.no_grad(), GateRecorder(model, detach=True) as recorder:
        for images in batches:
            model(images)
            for name, mask in recorder.masks().items():
                frequency[name] = frequency.get(name, 0) + (mask != 0).double().sum(0)
                mean_mask[name] = mean_mask.get(name, 0) + mask.double().sum(0)
            count += images.shape[0]
    return ({n: f / count for n, f in frequency.items()}, {n: m / count for n, m in mean_mask.items()})


def slim(
    model: nn.Module,
    keep_frequency: dict[str, torch.Tensor],
    mean_mask: dict[str, torch.Tensor],
    min_keep_rate: float,
    input_shape,
) -> SlimResult:
    """A gate-free copy of ``model``: masks folded into BatchNorm as their means, rarely kept
    channels physically removed where the layout allows."""
    from manidp_cli.graph import NORM_TYPES

    slim_model = copy.deepcopy(model).eval()
    strip_gates(slim_model)
    flow = trace_dataflow(slim_model, input_shape)
    consumers = removable_consumers(slim_model, flow, list(mean_mask))
    flow_pairs = flow.conv_norm_pairs()
    with torch.no_grad():
        for conv_name, scale in mean_mask.items():
            norm = slim_model.get_submodule(flow_pairs[conv_name])
            norm.weight.mul_(scale.to(norm.weight.dtype))
            norm.bias.mul_(scale.to(norm.bias.dtype))
    removed, kept_channels = {}, {}
    for conv_name, consumer_name in consumers.items():
        frequency = keep_frequency.get(conv_name)
        if frequency is None:
            continue
        keep = (frequency > min_keep_rate).nonzero().flatten()
        if len(keep) == len(frequency):
            continue
        if len(keep) == 0:
            keep = frequency.argmax().view(1)  # a convolution needs at least one channel
        conv = slim_model.get_submodule(conv_name)
        norm = slim_model.get_submodule(flow_pairs[conv_name])
        consumer = slim_model.get_submodule(consumer_name)
        _keep_rows(conv, keep, 0, ("weight", "bias"))
        conv.out_channels = len(keep)
        assert isinstance(norm, NORM_TYPES)
        _keep_rows(norm, keep, 0, ("weight", "bias", "running_mean", "running_var"))
        norm.num_features = len(keep)
        _keep_rows(consumer, keep, 1, ("weight",))
        consumer.in_channels = len(keep)
        removed[conv_name] = len(frequency) - len(keep)
        kept_channels[conv_name] = len(keep)
    return SlimResult(slim_model, removed, kept_channels)


def strip_gates(model: nn.Module) -> None:
    """Remove the gates and their hooks: the plain network with the same weights."""
    gates = gates_of(model)
    hook_owners = set()
    for gate in gates.values():
        hook_owners.add(gate.conv_name)
        hook_owners.add(gate.mask_site)
    for name in hook_owners:
        module = model.get_submodule(name)
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    delattr(model, GATE_PREFIX)


def save_static(out_dir: Path, result: SlimResult, input_shape, config: dict) -> list[Path]:
    """Write model.pt2 (torch.export), model.safetensors and config.json into ``out_dir``."""
    from safetensors.torch import save_file

    from manidp_cli.export import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    example = (torch.zeros(2, *input_shape),)  # a batch of 1 would specialise the batch size
    try:
        program = torch.export.export(
            result.model, example, dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
        )
    except Exception:  # some models do not export with a symbolic batch: batch 1 then
        program = torch.export.export(result.model, (torch.zeros(1, *input_shape),))
    torch.export.save(program, str(out_dir / "model.pt2"))
    tensors = {k: v.detach().contiguous().clone() for k, v in result.model.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=1))
    return [out_dir / "model.pt2", out_dir / "model.safetensors", out_dir / "config.json"]


def export_static(
    path: str | Path,
    out_dir: str | Path,
    min_keep_rate: float = 0.0,
    data: str | None = None,
    calibration_images: int = 1024,
    batch_size: int = 256,
) -> dict:
    """``manidp export-static``: slim an export on calibration images, measure it, write it."""
    from manidp_cli.errors import ManidpError, TargetError
    from manidp_cli.evaluation import evaluate
    from manidp_cli.export import load_pruned
    from manidp_cli.flops import count_flops

    if not 0 <= min_keep_rate < 1:
        raise TargetError(f"--min-keep-rate must be in [0, 1), got {min_keep_rate}")
    out_dir = Path(out_dir)
    if (out_dir / "model.pt2").exists():
        raise ManidpError(f"{out_dir} already holds a static export; choose another --out")
    model, info = load_pruned(path)
    if not info.gated:
        raise ManidpError(f"{path} is a dense export: nothing to slim")
    meta = info.metadata
    images, _ = info.load_data(data)
    batches = [x for x, _ in images.train.batches(batch_size, limit=calibration_images)]
    frequency, mean_mask = mask_statistics(model, batches)
    result = slim(model, frequency, mean_mask, min_keep_rate, info.input_shape)
    flops = count_flops(result.model, info.input_shape).total_flops
    accuracy = evaluate(result.model, images.eval, batch_size)
    config = {
        "model": meta["model"],
        "model_kwargs": meta["model_kwargs"],
        "input_shape": list(info.input_shape),
        "source_export": str(info.path),
        "min_keep_rate": min_keep_rate,
        "calibration": {"data": images.spec, "split": "train", "images": sum(len(b) for b in batches)},
        "channels_removed": result.removed,
        "channels_kept": result.kept_channels,
        "dense_flops": flops,
        "flops_ratio_to_original": flops / meta["dense_flops"],
        "accuracy": accuracy.summary(),
        "gated_accuracy": meta.get("accuracy"),
        "load": "torch.export.load('model.pt2').module()",
    }
    files = save_static(out_dir, result, info.input_shape, config)
    return {**config, "files": [str(f) for f in files]}
