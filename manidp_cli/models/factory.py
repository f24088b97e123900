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
from manidp_cli.models.narrowing import narrow_to, narrower_keys

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


def weights_file(path: Path) -> Path:
    """The weights file of a model folder (a manidp export, a timm or hub folder); other paths as given."""
    if not is_dir(path, "weights folder"):
        return path
    found = next((path / name for name in FOLDER_WEIGHTS if is_file(path / name, "weights file")), None)
    if found is None:
        raise WeightsError(f"folder {capped(path)} holds none of {', '.join(FOLDER_WEIGHTS)}; give the weights file")
    return found


# a cascade file (io.save_cascade) holds each member's state dict under one of these prefixes
CASCADE_PREFIXES = ("narrow.", "wide.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from weights the way ``timm.models.load_state_dict`` reads them: safetensors, or a torch
    file (.pth, .pth.tar, .bin) loaded with ``weights_only=True`` and timm's allow-list (the
    ``argparse.Namespace`` of its train.py checkpoints); the EMA weights when the checkpoint has them,
    else ``state_dict`` / ``model``; DDP and torch.compile prefixes removed. Nothing is unpickled."""
    from timm.models import load_state_dict

    path = weights_file(Path(path).expanduser())
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
    if all(key.startswith(CASCADE_PREFIXES) for key in data):
        raise WeightsError(
            f"{capped(path)} is a cascade of two networks (manidp eval --save-cascade): give one of the exports "
            "it was saved from"
        )
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
    """Sum the stem over input channels when they differ; drop a classifier for another number of
    classes (a narrower one for as many classes stays: a slimmed start's)."""
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
            if stem and value.shape[1] != target.shape[1]:
                value = adapt_input_conv(target.shape[1], value.float()).to(value.dtype)
            elif classifier and key.startswith(f"{classifier}.") and value.shape[0] != target.shape[0]:
                continue  # the fresh classifier fits the data's classes
        adapted[key] = value
    return adapted


def _narrow_to_start(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> str | None:
    """Narrow ``model`` to the tensors of a slimmed start (fewer channels than timm's architecture,
    e.g. Torch-Pruning's output or ``export-static``'s model_slim.safetensors). None when nothing
    was narrowed, else what was, for the error should the widths not chain."""
    own = model.state_dict()
    shapes = {key: state[key].shape for key in narrower_keys(own, state)}
    if not shapes:
        return None
    first = next(iter(shapes))
    narrowed = (
        f"{len(shapes)} tensors narrower than {type(model).__name__}'s, the first {first!r} of shape "
        f"{tuple(shapes[first])} where the model has {tuple(own[first].shape)}"
    )
    bad = narrow_to(model, shapes)
    if bad is not None:
        raise WeightsError(f"{path} does not fit: {narrowed}, and removing channels does not explain {bad!r}")
    return narrowed


def _check_runs(model: nn.Module, path: Path, narrowed: str) -> None:
    """A narrowed start whose widths do not chain (a layer narrowed, its consumer not) fails here,
    with torch's reason, rather than in the middle of training."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    side = int((cfg.get("input_size") or (3, 224, 224))[-1])
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, first.in_channels, side, side))
    except RuntimeError as exc:
        raise WeightsError(
            f"{path} does not fit: {narrowed}, and the narrowed network does not run ({exception_text(exc)}); "
            "a statically pruned start must leave every layer's widths chained"
        ) from exc
    finally:
        model.train(was_training)


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
    """Load dense weights into ``model`` (gates, if any, keep their fresh initialisation). Weights
    with fewer channels than the architecture (a statically slimmed start) narrow its layers first."""
    state = _adapt(model, read_state_dict(path), Path(path))
    narrowed = _narrow_to_start(model, state, Path(path))
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
    if narrowed is not None:
        _check_runs(model, Path(path), narrowed)


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
