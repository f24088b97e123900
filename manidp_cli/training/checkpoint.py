"""Checkpoints: what a run writes at every epoch end (and on Ctrl-C), and how it is read back.

A checkpoint is a ``torch.save`` dict of tensors and plain values, written atomically and read with
``weights_only=True``; it holds the model, optimiser, per-rank RNG and objective state, the history
and the run's settings (``extra``), enough for ``--resume`` to reach the weights an uninterrupted
run reaches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from manidp_cli.core.distributed import World
from manidp_cli.core.state import non_finite_tensors
from manidp_cli.errors import ManidpError
from manidp_cli.files import atomic_write
from manidp_cli.inputs import capped, exception_text

CHECKPOINT_FORMAT = 2


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through files.atomic_write: a full disk leaves the previous checkpoint as it was
    and no temporary file behind."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


CHECKPOINT_KEYS = ("epoch", "step", "global_step", "model", "optimizer", "per_rank", "history", "extra")
RUN_KEYS = ("kind", "recipe", "model", "weights")  # of the checkpoint's "extra": what --resume rebuilds from


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint read with ``weights_only=True`` and checked to be complete and finite."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a zero-byte or truncated file raises EOFError with no message
        raise ManidpError(f"cannot read checkpoint {capped(path)}: {exception_text(exc)}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ManidpError(f"{capped(path)} is not a manidp checkpoint (format {CHECKPOINT_FORMAT})")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    extra = state.get("extra")
    if not missing and isinstance(extra, dict):
        missing = [f"extra.{key}" for key in RUN_KEYS if not isinstance(extra.get(key), str)]
    if missing or not isinstance(state["model"], dict):
        raise ManidpError(
            f"{capped(path)} is an incomplete manidp checkpoint (missing {', '.join(missing) or 'model'})"
        )
    broken = non_finite_tensors(state["model"])
    if broken:
        raise ManidpError(f"{capped(path)} holds non-finite weights ({capped(broken[0])}); it cannot be resumed")
    return state


class Checkpointer:
    """Writes the training state of every rank into one file (rank 0 writes, all ranks wait)."""

    def __init__(
        self,
        path: Path | None,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        objective,
        world: World,
        extra_state: dict[str, Any] | None,
        scaler: torch.amp.GradScaler | None = None,
    ):
        self.path = path
        self.model = model
        self.optimizer = optimizer
        self.objective = objective
        self.world = world
        self.extra_state = extra_state or {}
        self.scaler = scaler  # fp16 loss scaling (the engine's; disabled under bf16 and fp32)

    def save(
        self,
        epoch: int,
        step: int,
        global_step: int,
        running: dict[str, Any],
        history: list[dict[str, float]],
        setup_metrics: dict[str, float],
    ) -> None:
        """``epoch``/``step``: where a resumed run starts (step 0: the start of ``epoch``)."""
        local = {"rng": torch.get_rng_state(), "objective": self.objective.state_dict(), "running": running}
        ranks = self.world.all_gather_object(local)
        if self.path is None or not self.world.is_main:
            self.world.barrier()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(
            {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch,
                "step": step,
                "global_step": global_step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None and self.scaler.is_enabled() else {},
                "per_rank": ranks,
                "shared": self.objective.shared_state_dict(),
                "history": history,
                "setup": setup_metrics,
                "extra": self.extra_state,
            },
            self.path,
        )
        self.world.barrier()
