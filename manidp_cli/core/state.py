"""Checks on state dicts (checkpoints, starting weights, exports)."""

from __future__ import annotations

from typing import Any

import torch

from manidp_cli.core.gating import is_gate_key


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of floating tensors holding NaN, or infinity anywhere but in a gate threshold (where
    -inf means "keep every channel")."""
    broken = []
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        threshold = is_gate_key(name) and name.endswith("threshold")
        if bool(torch.isnan(value).any()) if threshold else not bool(torch.isfinite(value).all()):
            broken.append(name)
    return broken
