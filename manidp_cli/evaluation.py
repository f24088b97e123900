"""Accuracy, loss and (for gated models) measured dynamic FLOPs over an image set."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from manidp_cli.data import ImageSet
from manidp_cli.flops import CostTable, FlopsMeter, FlopsStats
from manidp_cli.recorder import GateRecorder


@dataclass
class Evaluation:
    images: int
    top1: float
    top5: float
    loss: float
    per_image_loss: list[float] = field(default_factory=list, repr=False)
    flops: FlopsStats | None = None

    def summary(self) -> dict:
        out = {"images": self.images, "top1": self.top1, "top5": self.top5, "loss": self.loss}
        if self.flops is not None:
            out["flops_ratio"] = self.flops.mean_ratio
            out["mean_flops"] = self.flops.mean_flops
        return out


def evaluate(
    model: nn.Module,
    images: ImageSet,
    batch_size: int = 256,
    table: CostTable | None = None,
    limit: int | None = None,
    device: torch.device | str = "cpu",
) -> Evaluation:
    """Top-1/top-5 accuracy and mean loss; with ``table`` (a gated model) also its dynamic FLOPs."""
    was_training = model.training
    model.eval()
    meter = FlopsMeter(table) if table is not None else None
    correct1 = correct5 = 0
    losses: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            recorder = GateRecorder(model, active_inputs=True, detach=True) if meter else None
            if recorder:
                recorder.__enter__()
            try:
                for x, y in images.batches(batch_size, limit=limit):
                    x, y = x.to(device), y.to(device)
                    logits = model(x)
                    losses.append(F.cross_entropy(logits.float(), y, reduction="none").cpu())
                    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                    correct1 += int((top[:, 0] == y).sum())
                    correct5 += int((top == y[:, None]).any(dim=1).sum())
                    if meter:
                        meter.update(recorder, x.shape[0])
            finally:
                if recorder:
                    recorder.__exit__(None, None, None)
    finally:
        model.train(was_training)
    per_image = torch.cat(losses) if losses else torch.zeros(0)
    n = max(len(per_image), 1)
    return Evaluation(
        images=len(per_image),
        top1=correct1 / n,
        top5=correct5 / n,
        loss=float(per_image.mean()) if len(per_image) else float("nan"),
        per_image_loss=per_image.tolist(),
        flops=meter.stats() if meter else None,
    )
