"""Creating timm models and loading starting weights, with errors that say what would work.

Weights come only from safetensors files, torch files read with ``weights_only=True`` (timm's
checkpoints included), or timm's pretrained weights through huggingface_hub (its cache when
offline). Nothing is ever unpickled.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
from torch import nn

from manidp_cli.core.gating import has_gates, is_gate_key
from manidp_cli.core.state import non_finite_tensors
from manidp_cli.errors import ModelError, WeightsError
from manidp_cli.inputs import capped, exception_text, is_dir, is_file
from manidp_cli.models import cifar_resnet  # noqa: F401  (registers cifar_resnet* with timm)

HUB_PREFIXES = ("hf-hub:", "local-dir:")  # timm's model names that carry their own source


def check_model_name(name: str) -> None:
    """Raise ModelError with close matches when ``name`` is not a timm model (``hf-hub:org/repo``
    and ``local-dir:PATH`` names are timm's own and are checked when the model is built)."""
    import timm

    if name.startswith(HUB_PREFIXES):
        prefix, _, rest = name.partition(":")
        if not rest or (prefix == "hf-hub" and "/" not in rest):
            raise ModelError(
                f"model name {capped(repr(name))} is incomplete: use hf-hub:ORG/REPO or local-dir:PATH "
                f"(a folder with timm's config.json and weights)"
            )
        return
    if timm.is_model(name):
        return
    matches = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6) if len(name) <= 100 else []
    hint = f"; did you mean {', '.join(matches)}?" if matches else "; see `timm.list_models()`"
    raise ModelError(f"unknown model {capped(repr(name))}{hint}")


_CHECKPOINT_KEYS = ("model_state_dict",)  # read by manidp besides timm's own (state_dict, model, EMA)


FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what timm's local-dir: and the hub look for


def _weights_in(path: Path) -> Path:
    """The weights file of a model folder (a manidp export, a timm or hub folder); other paths as given."""
    if not is_dir(path, "weights folder"):
        return path
    found = next((path / name for name in FOLDER_WEIGHTS if is_file(path / name, "weights file")), None)
    if found is None:
        raise WeightsError(f"folder {capped(path)} holds none of {', '.join(FOLDER_WEIGHTS)}; give the weights file")
    return found


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from weights the way ``timm.models.load_state_dict`` reads them: safetensors, or a torch
    file (.pth, .pth.tar, .bin) loaded with ``weights_only=True`` and timm's allow-list (the
    ``argparse.Namespace`` of its train.py checkpoints); the EMA weights when the checkpoint has them,
    else ``state_dict`` / ``model``; DDP and torch.compile prefixes removed. Nothing is unpickled."""
    from timm.models import load_state_dict

    path = _weights_in(Path(path).expanduser())
    if not is_file(path, "weights file"):
        raise WeightsError(f"weights file {capped(path)} not found")
    try:
        data = load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as exc:  # any reader failure means the file is not usable weights
        raise WeightsError(f"cannot read weights {capped(path)}: {exception_text(exc)}") from exc
    for key in _CHECKPOINT_KEYS:
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = {k.removeprefix("module."): v for k, v in data[key].items()}
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{capped(path)} holds no state dict of tensors")
    return data


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "")


def _causes(exc: BaseException) -> list[BaseException]:
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _hub_error(name: str, exc: Exception) -> WeightsError:
    """One line for failed pretrained weights, saying why and what would work instead."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

    causes = _causes(exc)
    if any(isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for e in causes):
        why = (
            "HF_HUB_OFFLINE is set and they are not in the Hugging Face cache"
            if _offline()
            else "the hub could not be reached and they are not in the Hugging Face cache"
        )
    elif any(isinstance(e, RepositoryNotFoundError) for e in causes):
        why = "the hub has no such repository (or it is private: log in with `hf auth login`)"
    else:
        why = exception_text(exc)
    return WeightsError(
        f"cannot get pretrained weights for {capped(name)}: {why}; pass a local file with "
        f"--weights FILE (safetensors or a torch/timm checkpoint), or train a starting point with "
        f"`manidp train {capped(name)}`"
    )


def _adapt(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Sum the stem over input channels when they differ; drop a classifier of another size."""
    from timm.models import adapt_input_conv

    own = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    first_conv = cfg.get("first_conv")
    classifier = cfg.get("classifier")
    adapted = {}
    for key, value in state.items():
        if is_gate_key(key):
            continue  # gates of a previous run are not a starting point
        target = own.get(key)
        if target is not None and target.shape != value.shape:
            stem = first_conv and key == f"{first_conv}.weight" and value.dim() == 4
            if stem and value.shape[0] == target.shape[0]:
                value = adapt_input_conv(target.shape[1], value.float()).to(value.dtype)
            elif classifier and key.startswith(f"{classifier}."):
                continue  # the fresh classifier fits the data's classes
        adapted[key] = value
    return adapted


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    weights: Path | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """A timm model for ``num_classes`` / ``in_chans``, initialised from ``weights`` or the hub."""
    import timm

    check_model_name(name)
    if weights is None and pretrained:
        # huggingface_hub decides: its cache when offline (HF_HUB_OFFLINE), else the hub, a mirror
        # (HF_ENDPOINT) or a proxy as configured
        try:
            model = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans)
        except Exception as exc:
            raise _hub_error(name, exc) from exc
        return _not_gated(model, name)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    except Exception as exc:
        if not name.startswith(HUB_PREFIXES):
            raise
        raise ModelError(f"cannot build {capped(name)}: {exception_text(exc)}") from exc
    _not_gated(model, name)
    if weights is not None:
        load_weights(model, weights)
    return model


def _not_gated(model: nn.Module, name: str) -> nn.Module:
    """A gated export (``local-dir:`` / ``hf-hub:`` with architecture manidp_gated) is no starting point."""
    if has_gates(model):
        raise ModelError(
            f"{capped(name)} is a gated manidp export: evaluate it with `manidp eval`, or start from its "
            f"weights with its base architecture and --weights (the gates are dropped)"
        )
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Load dense weights into ``model`` (gates, if any, keep their fresh initialisation)."""
    state = _adapt(model, read_state_dict(path), Path(path))
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise WeightsError(f"{path} does not fit {type(model).__name__}: unexpected key {key!r}")
        if own[key].shape != value.shape:
            raise WeightsError(
                f"{path} does not fit {type(model).__name__}: {key!r} has shape "
                f"{tuple(value.shape)}, the model needs {tuple(own[key].shape)}"
            )
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    classifier = cfg.get("classifier") or ""
    missing = [
        k
        for k in own
        if k not in state
        and not is_gate_key(k)
        and not (classifier and k.startswith(classifier + "."))
        and not k.endswith("num_batches_tracked")
    ]
    if missing:
        raise WeightsError(
            f"{path} does not fit {type(model).__name__}: missing key {missing[0]!r} ({len(missing)} missing)"
        )
    _check_finite(state, path)
    model.load_state_dict(state, strict=False)


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN or infinite starting weights: training from them gives a NaN model, which used
    to be exported as a success."""
    broken = non_finite_tensors(state)
    if broken:
        raise WeightsError(
            f"{capped(path)} holds non-finite values (NaN or infinity) in {len(broken)} tensor(s)"
            f", first {capped(broken[0])!r}: "
            f"these weights cannot be trained; use the weights of a run that finished"
        )
