"""Stage outputs of a timm CNN, captured with forward hooks for feature distillation.

A dynamically pruned network keeps its residual streams at full width (output gates cannot skip
them), so its stage outputs have the dense network's shapes and can be compared with the teacher's
channel for channel. The stages are timm's ``feature_info`` modules (the ``features_only`` taps).
"""

from __future__ import annotations

import torch
from torch import nn

from manidp_cli.errors import RecipeError


def stage_names(model: nn.Module) -> list[str]:
    """The modules whose outputs timm exposes as features (``model.feature_info``)."""
    info = getattr(model, "feature_info", None)
    names = [entry["module"] for entry in info or [] if isinstance(entry, dict) and entry.get("module")]
    if not names:
        raise RecipeError(
            f"loss.feature_distill_weight needs stage outputs, and {type(model).__name__} has no timm "
            "feature_info: set loss.feature_distill_weight to 0"
        )
    return names


class StageTap:
    """Holds the outputs of ``names`` from the last forward pass made while ``armed``."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.names = names
        self.outputs: dict[str, torch.Tensor] = {}
        self.armed = False
        for name in names:
            model.get_submodule(name).register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.armed:
                self.outputs[name] = output

        return keep

    def take(self) -> list[torch.Tensor]:
        """The captured outputs in stage order, forgotten here (they hold the autograd graph)."""
        missing = [name for name in self.names if name not in self.outputs]
        if missing:
            raise RuntimeError(f"stage outputs not captured: {', '.join(missing)}")
        outputs = [self.outputs[name] for name in self.names]
        self.outputs = {}
        return outputs
