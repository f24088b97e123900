"""Static slimming: physically remove the channels the gates (almost) never keep.

A gated convolution's output channel whose keep frequency over the calibration images is at most
``min_keep_rate`` is removed from the convolution and its BatchNorm. When the normalised output
flows (through element-wise activations only) into exactly one dense convolution, it is removed
from that convolution's inputs too. Where it cannot be (a residual addition, a concatenation, a
depthwise convolution: the layout must not change there), the BatchNorm scatters its narrow output
back to full width with zeros in the removed places (``runtime.channels.scatter_outputs``), so the
convolution still computes only its kept channels; manidp.json lists those places
(``scattered_channels``). Only a plain convolution whose BatchNorm keeps a zero channel zero (its
fused activation, if any, maps 0 to 0) is narrowed that way; others keep every channel.

The result has no gates. Each gated channel's BatchNorm is scaled by the channel's mean mask value
over the calibration images (E[saliency x kept]), the best static stand-in for the per-image scaling
(exact for channels that are never kept: they output zero). It is an approximation of the dynamic
network, so its accuracy is measured again rather than assumed.

timm cannot build per-layer widths from a model name, so the slimmed network is written three ways:
a ``torch.export`` program (``model.pt2``: ``torch.export.load(path).module()`` needs torch alone,
optionally ``model.onnx`` too), its own weights (``model_slim.safetensors``, which ``load_static``
narrows a timm model to), and the same network at timm's shapes (``model.safetensors``: every
removed channel exactly zero where it is made and where it is read, so plain timm loads it and
computes the same function, without the speed). ``config.json`` is timm's; manidp's own description
is ``manidp.json`` (static exports before it kept that in ``config.json``: still read).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from manidp_cli.core.gating import INPUT_GATE_SUFFIX, gates_of, strip_gates
from manidp_cli.core.graph import NORM_TYPES, fused_activation, removable_consumers, trace_dataflow, zero_preserving
from manidp_cli.core.modes import eval_mode
from manidp_cli.core.recorder import GateRecorder
from manidp_cli.errors import WeightsError
from manidp_cli.files import staged_folder, write_new_file
from manidp_cli.inputs import capped, exception_text, is_file
from manidp_cli.io import CONFIG_FILE, MODEL_FILE
from manidp_cli.models.factory import check_model_name
from manidp_cli.models.narrowing import narrow_tensor
from manidp_cli.runtime.channels import scatter_outputs
from manidp_cli.runtime.onnx_export import ONNX_FILE, OnnxCheck, check_onnx, export_onnx

PROGRAM_FILE = "model.pt2"
SLIM_WEIGHTS_FILE = "model_slim.safetensors"  # the narrower network; model.safetensors has timm's shapes
METADATA_FILE = "manidp.json"
MAX_BATCH = 4096  # the largest batch the exported program accepts
SCATTERED = "scattered_channels"  # manidp.json: BatchNorm name -> where its narrow output goes


@dataclass(frozen=True)
class ChannelSelection:
    """The positions ``keep`` along ``dim`` that slimming kept of a tensor ``size`` wide there."""

    dim: int
    keep: torch.Tensor
    size: int


def _keep_rows(
    module: nn.Module,
    keep: torch.Tensor,
    dim: int,
    names: tuple[str, ...],
    prefix: str,
    selections: dict[str, list[ChannelSelection]],
) -> None:
    for name in names:
        tensor = getattr(module, name, None)
        if tensor is None:
            continue
        selections.setdefault(f"{prefix}.{name}", []).append(ChannelSelection(dim, keep, tensor.shape[dim]))
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
    # state-dict key -> how it was narrowed (a convolution can lose outputs and inputs)
    selections: dict[str, list[ChannelSelection]] = field(default_factory=dict)
    # BatchNorm name -> the places its narrowed output is scattered to (``scatter_outputs``)
    scattered: dict[str, list[int]] = field(default_factory=dict)


def mask_statistics(model: nn.Module, batches) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per gated layer and channel: the fraction of images that keep it and its mean mask value."""
    frequency: dict[str, torch.Tensor] = {}
    mean_mask: dict[str, torch.Tensor] = {}
    count = 0
    with torch.no_grad(), eval_mode(model), GateRecorder(model, detach=True) as recorder:
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
    channels physically removed (see the module's docstring for where)."""
    slim_model = copy.deepcopy(model).eval()
    followers = gates_of(slim_model).followers()
    strip_gates(slim_model)
    flow = trace_dataflow(slim_model, input_shape)
    # an input gate's mean mask scales the weights that read each input channel; none is removed
    input_means = {n.removesuffix(INPUT_GATE_SUFFIX): m for n, m in mean_mask.items() if n.endswith(INPUT_GATE_SUFFIX)}
    mean_mask = {n: m for n, m in mean_mask.items() if not n.endswith(INPUT_GATE_SUFFIX)}
    consumers = removable_consumers(slim_model, flow, list(mean_mask))
    flow_pairs = flow.conv_norm_pairs()
    # a follower's mask is its producer's keep-set (0/1): its mean is the producer's keep frequency
    follower_means = {follower: keep_frequency[producer] for follower, producer in followers.items()}
    _fold_mean_masks(slim_model, input_means, {**mean_mask, **follower_means}, flow_pairs)
    result = SlimResult(slim_model, {}, {})
    for conv_name in mean_mask:
        frequency = keep_frequency.get(conv_name)
        keep = _kept_channels(frequency, min_keep_rate) if frequency is not None else None
        norm_name = flow_pairs.get(conv_name)
        if keep is None or norm_name is None:
            continue
        consumer_name = consumers.get(conv_name)
        if not _plain_convolution(slim_model, conv_name):
            continue  # a grouped (depthwise) convolution's outputs are tied to its inputs
        if consumer_name is None and not _scatterable(slim_model, norm_name):
            continue  # a norm that is not per-channel, or an activation that moves zero
        _narrow_output_channels(slim_model, conv_name, norm_name, keep, result.selections)
        if consumer_name is None:
            scatter_outputs(slim_model.get_submodule(norm_name), keep, len(frequency))
            result.scattered[norm_name] = keep.tolist()
        else:
            consumer = slim_model.get_submodule(consumer_name)
            _keep_rows(consumer, keep, 1, ("weight",), consumer_name, result.selections)
            consumer.in_channels = len(keep)
        result.removed[conv_name] = len(frequency) - len(keep)
        result.kept_channels[conv_name] = len(keep)
    return result


def _fold_mean_masks(
    model: nn.Module, input_means: dict[str, torch.Tensor], mean_mask: dict[str, torch.Tensor], flow_pairs: dict
) -> None:
    with torch.no_grad():
        for conv_name, scale in input_means.items():
            weight = model.get_submodule(conv_name).weight
            weight.mul_(scale.to(weight.dtype)[None, :, None, None])
        for conv_name, scale in mean_mask.items():
            norm = model.get_submodule(flow_pairs[conv_name])
            norm.weight.mul_(scale.to(norm.weight.dtype))
            norm.bias.mul_(scale.to(norm.bias.dtype))


def _kept_channels(frequency: torch.Tensor, min_keep_rate: float) -> torch.Tensor | None:
    """The channels kept by more than ``min_keep_rate`` of the images (at least one: a convolution
    needs an output), or None when that is every channel."""
    keep = (frequency > min_keep_rate).nonzero().flatten()
    if len(keep) == len(frequency):
        return None
    return keep if len(keep) else frequency.argmax().view(1)


def _plain_convolution(model: nn.Module, conv_name: str) -> bool:
    conv = model.get_submodule(conv_name)
    return isinstance(conv, nn.Conv2d) and conv.groups == 1


def _scatterable(model: nn.Module, norm_name: str) -> bool:
    """Whether a convolution whose output keeps its place can compute only its kept channels and
    have its norm scatter them back: a BatchNorm (per-channel) whose fused activation keeps a zero
    channel zero (a removed channel's folded mean mask is 0 there)."""
    norm = model.get_submodule(norm_name)
    return isinstance(norm, _BatchNorm) and zero_preserving(fused_activation(norm))


def _narrow_output_channels(
    model: nn.Module, conv_name: str, norm_name: str, keep: torch.Tensor, selections: dict
) -> None:
    conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
    _keep_rows(conv, keep, 0, ("weight", "bias"), conv_name, selections)
    conv.out_channels = len(keep)
    assert isinstance(norm, NORM_TYPES)
    _keep_rows(norm, keep, 0, ("weight", "bias", "running_mean", "running_var"), norm_name, selections)
    norm.num_features = len(keep)


def full_width_state_dict(result: SlimResult) -> dict[str, torch.Tensor]:
    """The slimmed network's weights at the original (timm) shapes, the kept channels in their
    places: a removed channel is zero in its convolution and in the one that reads it, and its
    BatchNorm outputs zero (running_var 1 keeps it finite), so the network computes what the
    slimmed one does and loads into ``timm.create_model`` of the same name."""
    state = {}
    for key, tensor in result.model.state_dict().items():
        tensor = tensor.detach()
        for selection in result.selections.get(key, []):
            shape = list(tensor.shape)
            shape[selection.dim] = selection.size
            fill = torch.ones if key.endswith("running_var") else torch.zeros
            tensor = fill(shape, dtype=tensor.dtype).index_copy_(selection.dim, selection.keep, tensor)
        state[key] = tensor.contiguous().clone()
    return state


@dataclass(frozen=True)
class StaticFiles:
    files: tuple[Path, ...]
    program_batch: str  # the batch sizes model.pt2 accepts, and why when only 1
    onnx: OnnxCheck | None = None  # how model.onnx agreed with PyTorch, when written


def _export_program(model: nn.Module, input_shape) -> tuple[torch.export.ExportedProgram, bool, str]:
    """``model`` as a torch.export program; whether its batch is symbolic, and in words."""
    example = (torch.zeros(2, *input_shape),)  # a batch of 1 would specialise the batch size
    try:
        program = torch.export.export(
            model, example, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
        )
        return program, True, f"any from 1 to {MAX_BATCH}"
    except Exception as exc:  # some models do not export with a symbolic batch: batch 1 then
        program = torch.export.export(model, (torch.zeros(1, *input_shape),))
        return program, False, f"1 only (a symbolic batch did not export: {capped(exception_text(exc))})"


def _json_bytes(value: dict) -> bytes:
    return json.dumps(value, indent=2).encode()


def save_static(
    out_dir: Path,
    result: SlimResult,
    input_shape,
    metadata: dict,
    config: dict,
    onnx_images: torch.Tensor | None = None,
) -> StaticFiles:
    """Write into ``out_dir`` (missing or empty) model.pt2 (torch.export), model_slim.safetensors,
    model.safetensors (timm's shapes, see ``full_width_state_dict``), config.json (``config``, timm's)
    and manidp.json (``metadata``); with ``onnx_images`` also model.onnx, checked on those images
    first. Everything is made before anything is written; then all files appear together, or none
    (a full disk leaves nothing behind)."""
    program, batch_dynamic, program_batch = _export_program(result.model, input_shape)
    onnx_model = export_onnx(program) if onnx_images is not None else None
    onnx_check = check_onnx(onnx_model, result.model, onnx_images, batch_dynamic) if onnx_model else None
    metadata = {**metadata, "program_batch": program_batch, "onnx": onnx_check.to_dict() if onnx_check else None}
    slim_tensors = {k: v.detach().contiguous().clone() for k, v in result.model.state_dict().items()}
    contents = {
        SLIM_WEIGHTS_FILE: save(slim_tensors, metadata={"format": "pt"}),
        MODEL_FILE: save(full_width_state_dict(result), metadata={"format": "pt"}),
        CONFIG_FILE: _json_bytes(config),
        METADATA_FILE: _json_bytes(metadata),
    }
    if onnx_model is not None:
        contents[ONNX_FILE] = onnx_model.data
    with staged_folder(out_dir) as stage:
        write_new_file(stage / PROGRAM_FILE, lambda handle: torch.export.save(program, handle))
        for name, data in contents.items():
            write_new_file(stage / name, lambda handle, data=data: handle.write(data))
    return StaticFiles(tuple(out_dir / name for name in (PROGRAM_FILE, *contents)), program_batch, onnx_check)


# What torch.export.save writes for one plain program, under the archive's root folder. Anything
# else (compiled libraries, pickled objects, extra code paths) is refused.
_ARCHIVE_MEMBER = re.compile(
    r"^[^/]+/(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/(weights|constants)/model_(weights|constants)_config\.json|data/weights/weight_\d+"
    r"|data/constants/tensor_\d+|data/sample_inputs/model\.pt)$"
)
# a size symbol (s77), a number, or sympy's spelling of them combined by arithmetic: no other names
_SIZE_EXPRESSION = re.compile(
    r"(?:[su]\d+|-?\d+|Symbol\('[su]\d+'(?:, (?:positive|integer|nonnegative|real)=(?:True|False))*\)|Integer\(-?\d+\)"
    r"|(?:Add|Mul|Pow|Max|Min|FloorDiv|Mod|CeilToInt|FloorToInt)\(|\)|, )+"
)
_MAX_READ = 256 * 2**20  # the members the check reads (JSON, sample inputs); weights are never read


def _payload_problem(archive, root: str, name: str) -> str | None:
    """A weights or constants config may ask torch.export.load to unpickle a payload (use_pickle)
    or to rebuild arbitrary objects; a static export never needs either."""
    entries = json.loads(archive.read(f"{root}/{name}")).get("config", {})
    for key, entry in entries.items():
        if entry.get("use_pickle") or not str(entry.get("path_name", "")).startswith(("weight_", "tensor_")):
            return f"{name} asks to unpickle {key!r}"
    return None


def _expressions(value):
    """Every symbolic-size expression in a serialized program (torch parses them with sympy, which
    evaluates Python)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "expr_str":
                yield item
            else:
                yield from _expressions(item)
    elif isinstance(value, list):
        for item in value:
            yield from _expressions(item)


def _graph_problem(program: dict) -> str | None:
    for node in program["graph_module"]["graph"]["nodes"]:
        if not str(node.get("target", "")).startswith("torch.ops.aten."):
            return f"the graph calls {str(node.get('target'))[:80]!r}, not an aten operator"
    if program.get("guards_code"):
        return "it carries guard code"
    for expression in [*program.get("range_constraints", {}), *_expressions(program)]:
        if not _SIZE_EXPRESSION.fullmatch(str(expression)):
            return f"it carries the size expression {str(expression)[:80]!r}"
    return None


def _sample_inputs_problem(archive, root: str) -> str | None:
    import io

    try:
        torch.load(io.BytesIO(archive.read(f"{root}/data/sample_inputs/model.pt")), weights_only=True)
    except Exception:  # the weights-only unpickler refuses it: something other than tensors
        return "data/sample_inputs/model.pt is a pickle of more than tensors"
    return None


def _archive_problem(archive) -> str | None:
    names = archive.namelist()
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1:
        return "it is not a single torch.export archive"
    root = roots.pop()
    for info in archive.infolist():
        if not _ARCHIVE_MEMBER.match(info.filename):
            return f"it holds {capped(info.filename)}, which a static export never has"
        if "/data/weights/weight_" not in info.filename and info.file_size > _MAX_READ:
            return f"{info.filename} is {info.file_size} bytes, too large to check"
    if f"{root}/models/model.json" not in names or f"{root}/data/sample_inputs/model.pt" not in names:
        return "it has no program"
    return (
        _payload_problem(archive, root, "data/weights/model_weights_config.json")
        or _payload_problem(archive, root, "data/constants/model_constants_config.json")
        or _graph_problem(json.loads(archive.read(f"{root}/models/model.json")))
        or _sample_inputs_problem(archive, root)
    )


def verify_static_program(path: Path) -> None:
    """Refuse a model.pt2 that does more than a plain program of aten operators on tensors: loading
    it with torch.export.load would run what it carries (pickles are unpickled with a fallback to
    weights_only=False; graph targets and guards are resolved as Python). Reads, never loads."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            problem = _archive_problem(archive)
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        problem = f"it cannot be read as a torch.export archive ({exception_text(exc)})"
    if problem:
        raise WeightsError(f"refusing {path}: {problem}; never load it with torch.export.load")


def _read_static_metadata(folder: Path) -> tuple[dict, Path]:
    """What load_static needs from manidp.json, and the slimmed weights file. A static export written
    before manidp.json kept the same fields in config.json and its slimmed weights in model.safetensors."""
    file, weights = folder / METADATA_FILE, folder / SLIM_WEIGHTS_FILE
    if not is_file(file, "static export") and is_file(folder / CONFIG_FILE, "static export"):
        file, weights = folder / CONFIG_FILE, folder / MODEL_FILE
    try:
        metadata = json.loads(file.read_text())
        model_name = metadata["model"]
        kwargs = {key: int(metadata["model_kwargs"][key]) for key in ("num_classes", "in_chans")}
        shape = tuple(int(v) for v in metadata["input_shape"])
        scattered = {str(name): [int(c) for c in places] for name, places in metadata.get(SCATTERED, {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise WeightsError(
            f"{file} is not the {METADATA_FILE} of `manidp export-static` ({type(exc).__name__}: {capped(exc)})"
        ) from exc
    if len(shape) != 3 or min(shape) < 1 or not isinstance(model_name, str):
        raise WeightsError(f"{file}: input_shape must be 3 positive sizes and model a name")
    check_model_name(model_name)
    return {"model": model_name, "model_kwargs": kwargs, "input_shape": shape, SCATTERED: scattered}, weights


def _restore_scatter(model: nn.Module, norm_name: str, places: list[int], timm_shapes: dict, file: Path) -> None:
    """Make the narrowed BatchNorm ``norm_name`` scatter its output to ``places`` again, after
    checking them against the layer and timm's width for it."""
    key = f"{norm_name}.running_mean"
    norm = model.get_submodule(norm_name) if key in timm_shapes else None
    if not isinstance(norm, _BatchNorm):
        raise WeightsError(f"{file}: {METADATA_FILE} scatters {capped(norm_name)!r}, not a BatchNorm of the model")
    width = timm_shapes[key].shape[0]
    if len(places) != norm.num_features or len(set(places)) != len(places) or not all(0 <= c < width for c in places):
        raise WeightsError(
            f"{file}: {norm_name} scatters {norm.num_features} channels, but {METADATA_FILE} gives "
            f"{len(places)} places that must be distinct and in [0, {width})"
        )
    scatter_outputs(norm, torch.tensor(places), width)


def load_static(folder: str | Path) -> tuple[nn.Module, dict]:
    """The slimmed network of an export-static folder, rebuilt from manidp.json (the timm name) and
    model_slim.safetensors (the narrower widths come from the tensors' shapes): data only, so nothing
    in the folder can run code. model.pt2 is checked (``verify_static_program``), never loaded."""
    import timm
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    verify_static_program(folder / PROGRAM_FILE)
    config, file = _read_static_metadata(folder)
    try:
        tensors = load_file(str(file))
    except Exception as exc:
        raise WeightsError(f"cannot read {file}: {exception_text(exc)}") from exc
    model = timm.create_model(config["model"], pretrained=False, **config["model_kwargs"]).eval()
    expected = model.state_dict()
    if set(tensors) != set(expected):
        raise WeightsError(
            f"{file} does not hold the tensors of {config['model']}: {sorted(set(tensors) ^ set(expected))[:3]}"
        )
    for key, tensor in tensors.items():
        owner, _, attribute = key.rpartition(".")
        if tensor.shape != expected[key].shape and not narrow_tensor(
            model.get_submodule(owner), attribute, tensor.shape, trainable=False
        ):
            raise WeightsError(
                f"{file}: {key} has shape {tuple(tensor.shape)}, {config['model']} {tuple(expected[key].shape)}"
            )
    model.load_state_dict(tensors, strict=True)
    for norm_name, places in config[SCATTERED].items():
        _restore_scatter(model, norm_name, places, expected, file)
    try:
        with torch.no_grad():
            model(torch.zeros(1, *config["input_shape"]))
    except RuntimeError as exc:
        raise WeightsError(f"{file}: the narrowed {config['model']} does not run ({exception_text(exc)})") from exc
    return model, config
