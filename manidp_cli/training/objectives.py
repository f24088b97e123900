"""Training objectives for the engine: plain cross-entropy, and ManiDP pruning to a FLOPs target.

``ManiDPObjective`` wires the method's pieces together without containing their formulas: the loss
terms come from ``losses``, the target and thresholds from ``schedule``, FLOPs from ``flops``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from manidp_cli.config import CodebookConfig
from manidp_cli.core.calibration import calibrate_thresholds
from manidp_cli.core.codebook import build_codebooks
from manidp_cli.core.distributed import World
from manidp_cli.core.flops import CostTable, dynamic_flops
from manidp_cli.core.gating import GateSet
from manidp_cli.core.losses import ManiDPLoss
from manidp_cli.core.modes import eval_mode
from manidp_cli.core.recorder import GateRecorder
from manidp_cli.core.schedule import flops_target


class CrossEntropyObjective:
    """Dense training: mean cross-entropy, nothing around epochs."""

    def setup(self, model: nn.Module) -> dict[str, float]:
        return {}

    def epoch_context(self, model: nn.Module):
        return contextlib.nullcontext()

    def step(self, model, images, targets):
        logits = model(images)
        ce = F.cross_entropy(logits.float(), targets)
        return logits, {"loss": ce, "ce": ce.detach()}

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ManiDPObjective:
    """ManiDP fine-tuning (method.md): manifold-regularised loss, thresholds re-set after each epoch
    so that the measured mean FLOPs follow a cosine from 1.0 down to ``target``. With a codebook, the
    last ``codebook.epochs`` epochs train with keep-sets snapped to it (manidp_cli.core.codebook)."""

    def __init__(
        self,
        gates: GateSet,
        table: CostTable,
        loss: ManiDPLoss,
        *,
        target: float,
        epochs: int,
        hold_epochs: int,
        training_batches,
        calibration_batches: list[torch.Tensor],
        search_steps: int = 24,
        codebook: CodebookConfig = CodebookConfig(),
        world: World = World(),
    ):
        self.gates = gates
        self.table = table
        self.loss = loss
        self.target = target
        self.epochs = epochs
        self.hold_epochs = hold_epochs
        self.training_batches = training_batches  # callable -> iterable of (images, labels), no augmentation
        self.calibration_batches = calibration_batches
        self.search_steps = search_steps
        self.codebook = codebook
        self.world = world
        self.mean_loss = 0.0  # L_bar
        self._recorder: GateRecorder | None = None
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self.saliency_sums = {
            name: torch.zeros(g.out_channels, dtype=torch.float64) for name, g in self.gates.by_conv().items()
        }
        self.saliency_count = 0
        self.ce_sum = 0.0
        self.flops_sum = 0.0

    def setup(self, model: nn.Module) -> dict[str, float]:
        """L_bar before epoch 0: one evaluation pass of the starting model over the training set."""
        total, count = 0.0, 0
        device = self.world.device
        with torch.no_grad(), eval_mode(model):
            for images, targets in self.training_batches():
                logits = model(images.to(device))
                total += float(F.cross_entropy(logits.float(), targets.to(device), reduction="sum"))
                count += images.shape[0]
        total, count = self.world.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
        self.mean_loss = total / max(count, 1)
        return {"initial_mean_loss": self.mean_loss}

    @contextlib.contextmanager
    def epoch_context(self, model: nn.Module):
        with GateRecorder(model, features=self.loss.lambda_sim > 0, active_inputs=True) as recorder:
            self._recorder = recorder
            try:
                yield
            finally:
                self._recorder = None

    def step(self, model, images, targets):
        rec = self._recorder
        logits = model(images)
        # autocast may run the forward in bf16; the loss terms are kept in fp32 (ManiDPLoss casts)
        terms = self.loss(logits, targets, rec.saliency, rec.features, self.mean_loss)
        per_image_ce = terms.pop("per_image_ce")
        batch = images.shape[0]
        with torch.no_grad():
            for name, saliency in rec.saliency.items():
                self.saliency_sums[name] += saliency.detach().double().sum(0).cpu()
            self.saliency_count += batch
            self.ce_sum += float(per_image_ce.sum())
            per_image_flops, _ = dynamic_flops(self.table, rec.active_inputs, rec.active_outputs(), batch)
            ratio = per_image_flops.mean() / self.table.dense_flops
            self.flops_sum += float(ratio) * batch
        terms["flops_ratio"] = ratio.to(torch.float32)
        return logits, terms

    def calibrate(self, model: nn.Module, target: float, mean_saliency: dict[str, torch.Tensor]):
        return calibrate_thresholds(
            model, self.table, mean_saliency, self.calibration_batches, target, self.search_steps, self.world
        )

    def _reduce_epoch(self) -> None:
        """Sums and counts of all ranks, so that every rank derives the same L_bar and thresholds."""
        names = sorted(self.saliency_sums)
        scalars = self.world.all_reduce_sum(
            torch.tensor([self.saliency_count, self.ce_sum, self.flops_sum], dtype=torch.float64)
        )
        self.saliency_count, self.ce_sum, self.flops_sum = int(scalars[0]), float(scalars[1]), float(scalars[2])
        self.saliency_sums = {n: self.world.all_reduce_sum(self.saliency_sums[n]) for n in names}

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        self._reduce_epoch()
        count = max(self.saliency_count, 1)
        metrics = {"train_flops_ratio": self.flops_sum / count, "mean_loss": self.ce_sum / count}
        self.mean_loss = self.ce_sum / count  # L_bar for the next epoch
        next_target = (
            flops_target(epoch + 1, self.epochs, self.target, self.hold_epochs)
            if epoch + 1 < self.epochs
            else self.target
        )
        mean_saliency = {name: s / count for name, s in self.saliency_sums.items()}
        if next_target < 1.0:
            search = self.calibrate(model, next_target, mean_saliency)
            if self.codebook.enabled and epoch + 1 == self.epochs - self.codebook.epochs:
                # learned under the final thresholds; snapping moves FLOPs, so calibrate again
                sizes = build_codebooks(model, self.calibration_batches, self.codebook, self.world)
                search = self.calibrate(model, next_target, mean_saliency)
                metrics["codebook_entries"] = sum(sizes.values()) / len(sizes)
            metrics.update(
                next_target=next_target,
                remain_rate=search.remain_rate,
                calibrated_flops_ratio=search.flops_ratio,
            )
        self._reset_epoch()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "mean_loss": self.mean_loss,
            "saliency_sums": dict(self.saliency_sums),
            "saliency_count": self.saliency_count,
            "ce_sum": self.ce_sum,
            "flops_sum": self.flops_sum,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean_loss = state["mean_loss"]
        self.saliency_sums = dict(state["saliency_sums"])
        self.saliency_count = state["saliency_count"]
        self.ce_sum = state["ce_sum"]
        self.flops_sum = state["flops_sum"]
