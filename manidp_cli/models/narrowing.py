"""Narrow a timm network's layers to the widths of a slimmed state dict.

A network that a static pruner made narrower (Torch-Pruning, manidp's ``export-static``) is stored
as its architecture's tensors with fewer channels. timm builds the architecture at full width; the
functions here give its convolutions, normalisations and linear layers the stored shapes, so that
the slimmed weights load into it and manidp can gate it further.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def narrow_tensor(module: nn.Module, attribute: str, shape: torch.Size, *, trainable: bool) -> bool:
    """Give ``module.attribute`` the narrower ``shape`` (uninitialised; the state dict fills it) and
    update the layer's width attributes. False when the layer or the shape is not one that narrowing
    a channel count explains: another kind of layer, another kernel, groups that no channel pruning
    gives (``narrowed_groups``), a size larger than the layer's."""
    old = getattr(module, attribute, None)
    if not isinstance(old, torch.Tensor) or len(shape) != old.dim():
        return False
    if any(new > now for new, now in zip(shape, old.shape, strict=True)):
        return False  # narrowing never widens (nor lets a file's metadata allocate what it likes)
    if isinstance(module, nn.Conv2d) and attribute in ("weight", "bias"):
        if attribute == "weight":
            groups = narrowed_groups(module.groups, old.shape, shape)
            if groups is None:
                return False
            module.groups = groups
            module.in_channels = shape[1] * groups
        module.out_channels = shape[0]
    elif isinstance(module, _BatchNorm) and attribute in NORM_TENSORS:
        module.num_features = shape[0]
    elif isinstance(module, nn.Linear) and attribute in ("weight", "bias"):
        module.out_features = shape[0]
        if attribute == "weight":
            module.in_features = shape[1]
    else:
        return False
    empty = torch.empty(shape, dtype=old.dtype, device=old.device)
    setattr(module, attribute, nn.Parameter(empty, requires_grad=trainable) if isinstance(old, nn.Parameter) else empty)
    return True


def narrowed_groups(groups: int, old: torch.Size, new: torch.Size) -> int | None:
    """The groups of a convolution whose weight narrows from ``old`` to ``new``, or None when no
    channel pruning explains the new shape. A depthwise convolution keeps one channel per group, so
    its groups follow its width; any other grouped convolution keeps its groups and loses channels
    in each alike (what Torch-Pruning does to both)."""
    if new[2:] != old[2:]:
        return None
    if groups == 1:
        return 1
    if old[1] == 1 and groups == old[0]:  # depthwise, read from the weight: a bias may be narrowed first
        return new[0] if new[1] == 1 else None
    return groups if new[0] % groups == 0 else None


def narrower_keys(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of ``state`` whose tensor is narrower than the model's (same rank, no size larger,
    at least one smaller): the candidates for ``narrow_to``."""
    keys = []
    for key, tensor in state.items():
        mine = own.get(key)
        if mine is None or mine.dim() != tensor.dim() or mine.shape == tensor.shape:
            continue
        if all(theirs <= ours for theirs, ours in zip(tensor.shape, mine.shape, strict=True)):
            keys.append(key)
    return keys


def narrow_to(model: nn.Module, shapes: Mapping[str, Sequence[int]], *, trainable: bool = True) -> str | None:
    """Narrow ``model`` to ``shapes`` (state-dict key -> narrower shape). None when every key was
    narrowed, else the first key that narrowing cannot explain (the model is then partly narrowed
    and must be discarded)."""
    for key, shape in shapes.items():
        owner, _, attribute = key.rpartition(".")
        if not narrow_tensor(model.get_submodule(owner), attribute, torch.Size(shape), trainable=trainable):
            return key
    return None


def narrowed_widths(model: nn.Module, reference: nn.Module) -> dict[str, list[int]]:
    """The tensors of ``model`` narrower than the full-width ``reference`` of its architecture, as
    the shapes that rebuild it (``narrow_to``); empty for a model at full width."""
    own = model.state_dict()
    return {key: list(own[key].shape) for key in narrower_keys(reference.state_dict(), own)}
