"""The widths a run starts from, and recipe.static_share's static stage.

A run starts at timm's full width, or narrower: from a statically slimmed ``--weights`` file, and
then, when the recipe sets ``static_share``, slimmed once more by filter-L1 pruning before the
gates are inserted. A checkpoint stores both sets of widths, so that ``--resume`` rebuilds the same
network (and the teacher at the start's widths) from timm's architecture without the start's file.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from manidp_cli.errors import ManidpError, RecipeError
from manidp_cli.models.narrowing import narrow_to, narrowed_widths
from manidp_cli.runtime.static_l1 import StaticCriterion, stage_channels, static_l1

Widths = dict[str, list[int]]  # state-dict key -> the narrower shape (models.narrowing)


def narrow_as_stored(model: nn.Module, widths: Mapping[str, list[int]] | None, source: str) -> None:
    """Give a freshly built ``model`` the widths a checkpoint stored (nothing for full width)."""
    if not widths:
        return
    bad = narrow_to(model, widths)
    if bad is not None:
        raise ManidpError(f"{source} stores a width for {bad!r} that {type(model).__name__} cannot take")


def slim_statically(
    model: nn.Module,
    reference: nn.Module,
    target: float,
    share: float,
    input_shape: tuple[int, int, int],
    stages: list[str] | None = None,
    criterion: StaticCriterion = StaticCriterion(),
) -> list[torch.Tensor] | None:
    """Slim ``model`` in place by filter-L1 pruning (or ``criterion``'s ranking) to ``target ** share``
    of its FLOPs (the static part of the cut). ``reference`` is the architecture at full width: the
    start must be it, not a start that is already slimmed.

    Returns, for each of ``stages`` (timm stage names), which of the start's channels that stage's
    slimmed output keeps: stage-output distillation compares those with its full-width teacher.
    None without ``stages``."""
    if narrowed_widths(model, reference):
        raise RecipeError(
            f"static_share {share} slims a full-width start, but the --weights given are already "
            f"slimmed: set static_share: 0 to gate them as they are"
        )
    # the pruner's example passes must not move the seed that the classifier and gates start from
    with torch.random.fork_rng(devices=[]):
        slimmed = static_l1(model, target**share, input_shape, criterion=criterion)
        kept = stage_channels(model, slimmed.pruning_ratio, input_shape, stages, criterion) if stages else None
    widths = narrowed_widths(slimmed.model, reference)
    bad = narrow_to(model, widths)
    if bad is not None:
        raise RecipeError(
            f"static_share: {type(model).__name__}'s {bad!r} cannot be narrowed to the width the static "
            f"stage chose (no channel pruning of that layer gives it); use static_share: 0"
        )
    model.load_state_dict(slimmed.model.state_dict())
    return kept
