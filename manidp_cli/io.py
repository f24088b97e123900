"""Exports: one safetensors file holding all weights (gates and thresholds included) and, in its
metadata, everything needed to rebuild the model without the run that made it; beside it timm's
config.json (``export_config``), so that the hub and timm know the architecture and preprocessing.

A gated export's config.json names the architecture ``manidp_gated``, registered with timm here:
``timm.create_model("local-dir:EXPORT", pretrained=True)`` builds the gated model once this module
is imported, and plain timm stops with "Unknown model (manidp_gated)" instead of quietly loading the
dense weights without their gates.

Example::

    model, info = load_pruned("runs/prune-resnet18")
    info.metadata["flops"]["mean_ratio"]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from timm.models import register_model
from torch import nn

from manidp_cli import __version__
from manidp_cli.config import GatePolicy
from manidp_cli.core.gating import insert_gates
from manidp_cli.data import LoaderSettings, load_data
from manidp_cli.errors import DataError, ModelError, WeightsError
from manidp_cli.files import atomic_write_bytes
from manidp_cli.inputs import capped, exception_text, is_dir, is_file
from manidp_cli.models import cifar_resnet  # noqa: F401  (registers cifar_resnet* with timm)
from manidp_cli.models.factory import CASCADE_PREFIXES, HUB_PREFIXES, check_model_name
from manidp_cli.models.narrowing import narrow_to

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"  # timm's and the Hugging Face hub's
METADATA_KEY = "manidp"
CASCADE_KEY = "manidp_cascade"  # a cascade file's metadata (save_cascade): the threshold, both members'
CASCADE_MEMBERS = tuple(prefix.rstrip(".") for prefix in CASCADE_PREFIXES)  # "narrow", "wide"
GATED_ARCHITECTURE = "manidp_gated"  # config.json's architecture for a gated export (see manidp_gated)


def save_model(path: Path, model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Write ``model``'s state dict to ``path`` (.safetensors) atomically, metadata as JSON."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {METADATA_KEY: json.dumps({**metadata, "manidp_version": __version__}), "format": "pt"}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def timm_config(model: nn.Module, data_config: dict[str, Any], label_names: Sequence[str] = ()) -> dict[str, Any]:
    """config.json as timm's ``save_for_hf`` / ``push_to_hf_hub`` write it for ``model`` (architecture,
    num_classes, num_features, global_pool, model_args, pretrained_cfg), with the preprocessing manidp
    used (``data_config``: input_size, interpolation, mean, std, crop_pct, crop_mode)."""
    import tempfile

    from timm.models import filter_pretrained_cfg
    from timm.models._hub import save_config_for_hf  # timm's own layout; it writes a path, not atomically

    source = filter_pretrained_cfg(dict(model.pretrained_cfg), remove_source=True)
    # a complete pretrained_cfg: timm versions that replace it rather than update it write the same
    pretrained_cfg = {**source, **data_config, "num_classes": model.num_classes}
    model_config: dict[str, Any] = {"pretrained_cfg": pretrained_cfg}
    if label_names:
        model_config["label_names"] = list(label_names)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / CONFIG_FILE
        save_config_for_hf(model, str(path), model_config=model_config)
        config = json.loads(path.read_text())
    config["pretrained_cfg"].pop("tag", None)  # the source weights' tag (e.g. "a1_in1k") does not describe these
    return config


def export_config(
    model: nn.Module, metadata: dict[str, Any], data_config: dict[str, Any], label_names: Sequence[str] = ()
) -> dict[str, Any]:
    """config.json of a ``train`` or ``prune`` export. A dense one is timm's own. A gated one names the
    architecture ``manidp_gated`` (only manidp builds it, see ``manidp_gated``: plain timm cannot
    load the weights without their gates) with the base architecture and its gates as model_args."""
    config = timm_config(model, data_config, label_names)
    if metadata["kind"] != "pruned":
        return config
    config["model_args"] = {
        "base_architecture": config["architecture"],
        **metadata["model_kwargs"],
        "input_shape": list(metadata["input_shape"]),
        "gate_policy": metadata["gate_policy"],
        "gated_layers": list(metadata["gated_layers"]),
        **({NARROWED: metadata[NARROWED]} if metadata.get(NARROWED) else {}),
    }
    config["architecture"] = GATED_ARCHITECTURE
    return config


def save_timm_config(folder: Path, config: dict[str, Any]) -> Path:
    """Write ``config`` as ``folder``/config.json, atomically."""
    return atomic_write_bytes(Path(folder) / CONFIG_FILE, json.dumps(config, indent=2).encode())


def _model_file(path: Path) -> Path:
    path = Path(path).expanduser()
    return path / MODEL_FILE if is_dir(path, "export") else path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The manidp metadata of an export folder or its model.safetensors, checked (see
    ``check_metadata``) before anything is built from it."""
    file = _model_file(Path(path))
    if not is_file(file, "export"):
        raise WeightsError(f"no manidp export at {capped(path)} (expected {capped(file)})")
    header = _header(file)
    if METADATA_KEY not in header and CASCADE_KEY in header:
        raise WeightsError(
            f"{file} is a cascade of two exports: manidp eval measures it and manidp_cli.load_cascade runs "
            "it; other commands take one network (one of the exports it was saved from)"
        )
    if METADATA_KEY not in header:
        raise WeightsError(f"{file} has no manidp metadata (not made by manidp prune/train)")
    return check_metadata(_json_metadata(header[METADATA_KEY], file), file)


def _header(file: Path) -> dict[str, str]:
    """The safetensors file's string metadata (read without loading a tensor)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as exc:
        raise WeightsError(f"cannot read {file}: {exception_text(exc)}") from exc


def _json_metadata(raw: str, file: Path) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise WeightsError(f"{file}: its manidp metadata is not valid JSON ({exception_text(exc)})") from None


# The model_kwargs an export may pass to timm.create_model: manidp writes the first two. Others
# (checkpoint_path, pretrained_cfg_overlay, ...) would make timm read files an export names.
SAFE_MODEL_KWARGS = {
    "num_classes": (1, 100_000),
    "in_chans": (1, 64),
    "drop_rate": (0.0, 1.0),
    "drop_path_rate": (0.0, 1.0),
}
MAX_IMAGE_SIDE = 4096
NARROWED = "narrowed"  # metadata: tensor name -> shape, where a slimmed start made the export narrower than timm's


def _in_range(value: Any, low: float, high: float) -> bool:
    """A number in [low, high]; an integer where ``low`` is one (no booleans, no 10.5 classes)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(low, int) and not isinstance(value, int):
        return False
    return low <= value <= high


def check_metadata(meta: Any, file: Path) -> dict[str, Any]:
    """Refuse metadata that would build a model manidp never exported: unknown keys for timm,
    absurd sizes (1e9 classes allocates terabytes), an unknown model or a bad gate policy."""
    from pydantic import ValidationError

    def bad(why: str) -> WeightsError:
        return WeightsError(f"{capped(file)}: manidp metadata {why}")

    if not isinstance(meta, dict):
        raise bad("is not a JSON object")
    if meta.get("kind") not in ("pruned", "dense") or not isinstance(meta.get("model"), str):
        raise bad(
            f"needs 'kind' (pruned or dense) and 'model'"
            f", got {capped(meta.get('kind'))!r} and {capped(meta.get('model'))!r}"
        )
    try:
        check_model_name(meta["model"])
    except ModelError as exc:
        raise bad(f"names {exc}") from None
    _check_model_kwargs(meta.get("model_kwargs"), bad)
    shape = meta.get("input_shape")
    sides_ok = isinstance(shape, list) and len(shape) == 3 and all(_in_range(v, 1, MAX_IMAGE_SIDE) for v in shape[1:])
    if not sides_ok or shape[0] != meta["model_kwargs"]["in_chans"]:
        raise bad(f"'input_shape' must be [in_chans, H, W] with sides up to {MAX_IMAGE_SIDE}, got {capped(shape)}")
    if not isinstance(meta.get("data", {}), dict) or not isinstance(meta.get("data", {}).get("spec", ""), str):
        raise bad("'data' must be an object with a 'spec' string")
    _check_narrowed(meta.get(NARROWED, {}), bad)
    if meta["kind"] == "pruned":
        layers = meta.get("gated_layers")
        if not isinstance(layers, list) or not all(isinstance(name, str) for name in layers):
            raise bad("'gated_layers' must be a list of layer names")
        try:
            GatePolicy.model_validate(meta.get("gate_policy"))
        except ValidationError as exc:
            raise bad(f"has an invalid 'gate_policy': {capped(exception_text(exc))}") from None
    return meta


def _check_narrowed(narrowed: Any, bad) -> None:
    shapes = narrowed.values() if isinstance(narrowed, dict) else None
    if shapes is None or not all(
        isinstance(shape, list) and 1 <= len(shape) <= 4 and all(_in_range(v, 1, 1 << 16) for v in shape)
        for shape in shapes
    ):
        raise bad(f"'{NARROWED}' must map tensor names to shapes of 1 to 4 sizes up to 65536")


def _check_model_kwargs(kwargs: Any, bad) -> None:
    if not isinstance(kwargs, dict) or not {"num_classes", "in_chans"} <= set(kwargs):
        raise bad("'model_kwargs' must hold num_classes and in_chans")
    unknown = sorted(set(kwargs) - set(SAFE_MODEL_KWARGS))
    if unknown:
        raise bad(f"sets model_kwargs {capped(unknown)}; only {', '.join(SAFE_MODEL_KWARGS)} are accepted")
    for key, value in kwargs.items():
        low, high = SAFE_MODEL_KWARGS[key]
        if not _in_range(value, low, high):
            raise bad(f"model_kwargs.{key} must be between {low} and {high}, got {capped(value)}")


@dataclass
class LoadedExport:
    path: Path
    metadata: dict[str, Any]

    @property
    def gated(self) -> bool:
        return self.metadata.get("kind") == "pruned"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.metadata["input_shape"])

    def load_data(
        self,
        spec: str | None = None,
        image_size: int | tuple[int, int] | None = None,
        loader: LoaderSettings = LoaderSettings(),
    ):
        """``spec``'s data, or the data recorded in the export when None, checked to fit the model;
        returns the data and where its specification came from. Images come at the export's input
        size unless ``image_size`` asks for another."""

        chosen = spec or self.metadata.get("data", {}).get("spec")
        if chosen is None:
            raise DataError("no --data given and none recorded in the export's metadata")
        size = image_size or self.input_shape[1:]
        images = load_data(chosen, self.metadata["model"], image_size=size, loader=loader)
        if images.in_chans != self.input_shape[0]:
            raise DataError(
                f"data {images.spec} gives {images.input_shape} images, the export expects {self.input_shape}"
            )
        classes = self.metadata["model_kwargs"]["num_classes"]
        if images.num_classes != classes:
            raise DataError(f"data {images.spec} has {images.num_classes} classes, the export has {classes}")
        return images, ("--data" if spec else "the export's metadata")


def _build(metadata: dict[str, Any], file: Path) -> nn.Module:
    """The model that ``metadata`` (checked by ``check_metadata``) describes, gates inserted, untrained."""
    import timm

    model = timm.create_model(metadata["model"], pretrained=False, **metadata["model_kwargs"])
    narrowed = metadata.get(NARROWED) or {}
    tensors = model.state_dict()
    bad = next((key for key in narrowed if key not in tensors), None) or narrow_to(model, narrowed)
    if bad is not None:
        raise WeightsError(f"{file}: metadata narrows {capped(bad)!r}, which {metadata['model']} cannot narrow")
    if metadata.get("kind") == "pruned":
        policy = GatePolicy.model_validate(metadata["gate_policy"]).with_constant_start()
        gates = insert_gates(model, policy, input_shape=tuple(metadata["input_shape"]))
        if sorted(gates.by_name()) != sorted(metadata["gated_layers"]):
            raise WeightsError(f"{file}: the gate policy no longer selects the exported layers")
    return model


def load_pruned(path: str | Path) -> tuple[nn.Module, LoadedExport]:
    """Rebuild the (gated) model of an export from the export alone, in eval mode."""
    metadata = read_metadata(path)
    file = _model_file(Path(path))
    model = _loaded(_build(metadata, file), _weights(file), metadata, file)
    return model, LoadedExport(file, metadata)


def _weights(file: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as exc:
        raise WeightsError(f"cannot read the weights in {file}: {exception_text(exc)}") from exc


def _loaded(model: nn.Module, state: dict[str, Any], metadata: dict[str, Any], file: Path) -> nn.Module:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # the first line only says "Error(s) in loading state_dict"
        detail = [line.strip() for line in str(exc).splitlines() if line.strip()][1:] or [exception_text(exc)]
        raise WeightsError(f"{file} does not fit {metadata['model']}: {capped(detail[0])}") from exc
    return model.eval()


@dataclass
class CascadeExport:
    """A cascade file (``save_cascade``): two exports of one network and the threshold between them."""

    path: Path
    narrow: LoadedExport
    wide: LoadedExport
    threshold: float  # escalate when the narrow network's top softmax probability is below it
    fitted: dict[str, Any]  # how the threshold was chosen: target, data, images, cross-fitted figures


def is_cascade(path: str | Path) -> bool:
    """Whether ``path`` is a cascade file rather than an export (folder or model file)."""
    file = Path(path).expanduser()
    return is_file(file, "export") and CASCADE_KEY in _header(file)


@dataclass(frozen=True)
class CascadeMember:
    """One network of a cascade file: an export's metadata (or a dense start's, built alike) and its state dict."""

    metadata: dict[str, Any]
    state: dict[str, Any]


def save_cascade(
    path: Path, narrow: CascadeMember, wide: CascadeMember, threshold: float, fitted: dict[str, Any]
) -> Path:
    """Both members' weights and metadata in one safetensors file, written atomically, with the
    escalation threshold (``load_cascade_file`` rebuilds it)."""
    from safetensors.torch import save

    tensors, spec = {}, {"threshold": threshold, "fitted": fitted, "manidp_version": __version__}
    for role, member in zip(CASCADE_MEMBERS, (narrow, wide)):
        spec[role] = member.metadata
        # copies: tensors a model shares (tied weights) would stop safetensors
        tensors.update({f"{role}.{k}": v.detach().cpu().clone().contiguous() for k, v in member.state.items()})
    return atomic_write_bytes(path, save(tensors, metadata={CASCADE_KEY: json.dumps(spec), "format": "pt"}))


def load_cascade_file(path: str | Path) -> tuple[nn.Module, nn.Module, CascadeExport]:
    """Both networks of a cascade file, in eval mode, and what the file says about them; each
    member's metadata is checked as an export's is."""
    file = Path(path).expanduser()
    if not is_file(file, "cascade"):
        raise WeightsError(f"no cascade file at {capped(path)}")
    header = _header(file)
    if CASCADE_KEY not in header:
        raise WeightsError(f"{file} is not a cascade (made by manidp eval --escalate-to ... --save-cascade)")
    spec = _json_metadata(header[CASCADE_KEY], file)
    threshold = spec.get("threshold") if isinstance(spec, dict) else None
    if not _in_range(threshold, 0.0, 2.0) or not isinstance(spec.get("fitted"), dict):
        raise WeightsError(f"{file}: its cascade metadata needs a 'threshold' from 0 to 2 and a 'fitted' object")
    state = _weights(file)
    members = []
    for role in CASCADE_MEMBERS:
        metadata = check_metadata(spec.get(role), file)
        prefix = f"{role}."
        own = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        members.append((_loaded(_build(metadata, file), own, metadata, file), LoadedExport(file, metadata)))
    (narrow, narrow_info), (wide, wide_info) = members
    return narrow, wide, CascadeExport(file, narrow_info, wide_info, float(threshold), spec["fitted"])


_GATED_ARGS = ("base_architecture", "num_classes", "in_chans", "input_shape", "gate_policy", "gated_layers")
_OPTIONAL_GATED_ARGS = (NARROWED,)


def _gated_metadata(model_args: dict[str, Any]) -> dict[str, Any]:
    """The metadata ``_build`` needs, from a gated export's config.json model_args, checked like an
    export's own (a config.json from the hub is as untrusted as a safetensors header)."""
    where = Path(f"{GATED_ARCHITECTURE} model_args")
    missing = [key for key in _GATED_ARGS if key not in model_args]
    unknown = sorted(set(model_args) - set(_GATED_ARGS) - set(_OPTIONAL_GATED_ARGS))
    if missing or unknown:
        raise WeightsError(
            f"{GATED_ARCHITECTURE} is built from the config.json of a gated manidp export "
            f"(timm.create_model('local-dir:EXPORT')); model_args "
            + (f"lack {', '.join(missing)}" if missing else f"has unknown {capped(unknown)}")
        )
    base = model_args["base_architecture"]
    if not isinstance(base, str) or base.startswith(HUB_PREFIXES):
        raise WeightsError(f"{where}: base_architecture must be a timm model name, got {capped(base)!r}")
    metadata = {
        "kind": "pruned",
        "model": base,
        "model_kwargs": {"num_classes": model_args["num_classes"], "in_chans": model_args["in_chans"]},
        **{key: model_args[key] for key in ("input_shape", "gate_policy", "gated_layers")},
        **({NARROWED: model_args[NARROWED]} if NARROWED in model_args else {}),
    }
    return check_metadata(metadata, where)


@register_model
def manidp_gated(
    pretrained: bool = False,
    pretrained_cfg: dict[str, Any] | None = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    **model_args: Any,
) -> nn.Module:
    """A gated export as a timm model, built from its config.json: ``timm.create_model(
    "local-dir:EXPORT", pretrained=True)`` (or ``"hf-hub:ORG/REPO"``) gives ``load_pruned``'s model
    (in train mode, as timm's models are). Its weights load strictly: gates and thresholds included."""
    from timm.models import load_pretrained

    model_args.pop("pretrained_model_args", None)  # timm's copy of the same arguments
    metadata = _gated_metadata(model_args)
    model = _build(metadata, Path(f"{GATED_ARCHITECTURE} model_args"))
    cfg = {**(pretrained_cfg if isinstance(pretrained_cfg, dict) else {}), **(pretrained_cfg_overlay or {})}
    model.pretrained_cfg = model.default_cfg = cfg
    if pretrained:
        kwargs = metadata["model_kwargs"]
        cache = {"cache_dir": cache_dir} if cache_dir is not None else {}  # older timm has no cache_dir
        load_pretrained(model, cfg, kwargs["num_classes"], kwargs["in_chans"], strict=True, **cache)
    return model
