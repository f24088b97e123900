"""Accuracy, loss, measured dynamic FLOPs and the ManiDP signature over an image set.

The signature checks the two claims of the method on the evaluated images:

- complexity: Spearman correlation between per-image loss and per-image FLOPs (easy images should
  use smaller sub-networks, so it is expected to be positive);
- similarity: per gated layer and batch, the Pearson correlation between the off-diagonal entries of
  the feature Gram matrix F F^T and the sub-network Gram matrix P P^T (method.md's similarity term),
  averaged over layers and the first ``signature_batches`` batches.

Example::

    result = evaluate(model, data.eval, table=count_flops(model, data.input_shape))
    result.summary()["flops"]["median_ratio"], result.signature["spearman_loss_flops"]
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from manidp_cli.data import ImageSet
from manidp_cli.distributed import World
from manidp_cli.errors import ManidpError
from manidp_cli.flops import FLOP_CONVENTION, CostTable, FlopsMeter, FlopsStats
from manidp_cli.recorder import GateRecorder


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks starting at 1, ties given their average rank."""
    values = values.double()
    order = torch.argsort(values)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float64)
    unique, inverse = torch.unique(values, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation; NaN when either side is constant."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denominator = a.norm() * b.norm()
    return float((a @ b) / denominator) if denominator > 0 else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks)."""
    return pearson(_ranks(torch.as_tensor(a)), _ranks(torch.as_tensor(b)))


def gram_correlation(features: torch.Tensor, saliency: torch.Tensor) -> float:
    """Correlation of the off-diagonal entries of F F^T and P P^T (rows L2-normalised)."""
    f = F.normalize(features.double(), dim=1)
    p = F.normalize(saliency.double(), dim=1)
    batch = f.shape[0]
    off = ~torch.eye(batch, dtype=torch.bool)
    return pearson((f @ f.T)[off], (p @ p.T)[off])


@dataclass
class Evaluation:
    images: int
    top1: float
    top5: float
    loss: float
    per_image_loss: list[float] = field(default_factory=list, repr=False)
    flops: FlopsStats | None = None
    signature: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        out = {"images": self.images, "top1": self.top1, "top5": self.top5, "loss": self.loss}
        if self.flops is not None:
            out["flops_ratio"] = self.flops.mean_ratio
            out["mean_flops"] = self.flops.mean_flops
        return out

    def flops_distribution(self) -> dict[str, float]:
        """Mean, median, p10, p90, min, max of per-image FLOPs, absolute and as ratios to dense."""
        if self.flops is None:
            return {}
        per_image = torch.tensor(self.flops.per_image, dtype=torch.float64)
        dense = self.flops.dense_flops
        values = {
            "mean": float(per_image.mean()),
            "median": float(per_image.quantile(0.5)),
            "p10": float(per_image.quantile(0.1)),
            "p90": float(per_image.quantile(0.9)),
            "min": float(per_image.min()),
            "max": float(per_image.max()),
        }
        out = {"dense": dense, "gates": self.flops.gate_flops}
        out.update(values)
        out.update({f"{k}_ratio": v / dense for k, v in values.items()})
        out["mean_gflops"] = values["mean"] / 1e9
        out["dense_gflops"] = dense / 1e9
        return out


def evaluate(
    model: nn.Module,
    images: ImageSet,
    batch_size: int = 256,
    table: CostTable | None = None,
    limit: int | None = None,
    signature_batches: int = 0,
    world: World = World(),
) -> Evaluation:
    """Top-1/top-5 accuracy and mean loss; with ``table`` (a gated model) also its dynamic FLOPs
    and, for ``signature_batches`` > 0, the ManiDP signature (module docstring). With a distributed
    ``world`` each rank evaluates its share and every rank returns the result over all images."""
    device = world.device
    was_training = model.training
    model.eval()
    meter = FlopsMeter(table) if table is not None else None
    correct1 = correct5 = 0
    losses: list[torch.Tensor] = []
    gram: list[float] = []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            recorder = None
            if meter is not None:
                recorder = stack.enter_context(
                    GateRecorder(model, active_inputs=True, features=signature_batches > 0, detach=True)
                )
            for index, (x, y) in enumerate(images.batches(batch_size, limit=limit, shard=(world.rank, world.size))):
                x, y = x.to(device), y.to(device)
                logits = model(x)
                losses.append(F.cross_entropy(logits.float(), y, reduction="none").cpu())
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                correct1 += int((top[:, 0] == y).sum())
                correct5 += int((top == y[:, None]).any(dim=1).sum())
                if meter is not None:
                    meter.update(recorder, x.shape[0])
                    if index < signature_batches and x.shape[0] > 2:
                        per_layer = [gram_correlation(recorder.features[n], s) for n, s in recorder.saliency.items()]
                        per_layer = [c for c in per_layer if c == c]  # drop NaN (constant saliencies)
                        if per_layer:
                            gram.append(sum(per_layer) / len(per_layer))
    finally:
        model.train(was_training)
    per_image = torch.cat(losses) if losses else torch.zeros(0)
    if world.distributed:
        correct1, correct5 = (int(v) for v in world.all_reduce_sum(torch.tensor([correct1, correct5])).tolist())
        per_image = torch.cat(world.all_gather_object(per_image))
        gram = [c for part in world.all_gather_object(gram) for c in part]
        if meter is not None:
            meter.reduce(world)
    n = max(len(per_image), 1)
    stats = meter.stats() if meter is not None else None
    signature = {}
    if stats is not None and signature_batches > 0:
        signature = {
            "spearman_loss_flops": spearman(per_image, torch.tensor(stats.per_image)),
            "gram_correlation": sum(gram) / len(gram) if gram else float("nan"),
            "gram_batches": len(gram),
        }
    return Evaluation(
        images=len(per_image),
        top1=correct1 / n,
        top5=correct5 / n,
        loss=float(per_image.mean()) if len(per_image) else float("nan"),
        per_image_loss=per_image.tolist(),
        flops=stats,
        signature=signature,
    )


@torch.no_grad()
def evaluate_dynamic_execution(
    model: nn.Module, images: ImageSet, input_shape: tuple[int, int, int], limit: int | None = None
) -> dict:
    """Accuracy of the dynamic executor (``execute.dynamic_model``, the one ``manidp bench`` times),
    every image run alone, how far its logits are from the masked model's, and how often it took
    the masked model's decisions (``execute.DecisionAgreement``)."""
    from manidp_cli.execute import DecisionAgreement, dynamic_model

    model.eval()
    fast = dynamic_model(model, input_shape)
    agreement = DecisionAgreement()
    correct1 = correct5 = agree = count = 0
    loss = 0.0
    largest_difference = 0.0
    for x, y in images.batches(64, limit=limit):
        logits, reference = (torch.cat(outputs) for outputs in zip(*(agreement.add(model, fast, image[None]) for image in x)))
        largest_difference = max(largest_difference, float((logits - reference).abs().max()))
        loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
        agree += int((logits.argmax(1) == reference.argmax(1)).sum())
        count += x.shape[0]
    n = max(count, 1)
    return {
        "images": count,
        "top1": correct1 / n,
        "top5": correct5 / n,
        "loss": loss / n,
        "prediction_agreement": agree / n,
        "max_logit_difference": largest_difference,
        "codebook": any(getattr(m, "entry_rows", None) for m in fast.modules()),
        **agreement.to_dict(),
    }


def evaluate_export(
    path: str | Path,
    data: str | None = None,
    batch_size: int = 256,
    limit: int | None = None,
    signature_batches: int = 4,
    dynamic: bool = False,
) -> dict:
    """``manidp eval`` of an export: accuracy, FLOPs distribution and signature as one JSON-able dict.

    Without ``data`` the evaluation split of the data recorded in the export is used. ``dynamic``
    adds the accuracy of the dynamic executor (``dynamic_execution``).
    """
    from manidp_cli.export import load_pruned
    from manidp_cli.flops import count_flops

    model, info = load_pruned(path)
    images, data_from = info.load_data(data)
    table = count_flops(model, info.input_shape) if info.gated else None
    result = evaluate(model, images.eval, batch_size, table=table, limit=limit, signature_batches=signature_batches)
    out = _eval_dict(info.metadata["model"], str(info.path), images, data_from, result, table, info.gated)
    if dynamic:
        if not info.gated:
            raise ManidpError(f"{info.path} is a dense export: --dynamic needs a pruned one")
        out["dynamic_execution"] = evaluate_dynamic_execution(model, images.eval, info.input_shape, limit)
    return out


def evaluate_dense(
    model_name: str,
    weights: str | Path | None,
    data: str,
    batch_size: int = 256,
    limit: int | None = None,
) -> dict:
    """``manidp eval --dense MODEL --weights FILE``: the unpruned baseline row (dense execution)."""
    from manidp_cli.data import load_data
    from manidp_cli.flops import count_flops
    from manidp_cli.models import create_model

    images = load_data(data, model_name)
    model = create_model(
        model_name, num_classes=images.num_classes, in_chans=images.in_chans,
        weights=Path(weights) if weights else None, pretrained=weights is None,
    )
    table = count_flops(model, images.input_shape)
    result = evaluate(model, images.eval, batch_size, limit=limit)
    return _eval_dict(model_name, str(weights or "timm hub"), images, "--data", result, table, False)


def _eval_dict(model_name, source, images, data_from, result: Evaluation, table, gated) -> dict:
    out = {
        "model": model_name,
        "source": source,
        "pruned": gated,
        "data": {"spec": images.spec, "description": images.description, "split": "eval", "from": data_from},
        "images": result.images,
        "top1": result.top1,
        "top5": result.top5,
        "loss": result.loss,
        "flops_convention": FLOP_CONVENTION,
    }
    if result.flops is not None:
        out["flops"] = result.flops_distribution()
        out["signature"] = result.signature
    else:  # dense execution computes every channel
        dense = table.total_flops
        out["flops"] = {
            "dense": dense, "gates": 0, **{k: float(dense) for k in ("mean", "median", "p10", "p90", "min", "max")},
            **{f"{k}_ratio": 1.0 for k in ("mean", "median", "p10", "p90", "min", "max")},
            "mean_gflops": dense / 1e9, "dense_gflops": dense / 1e9,
        }
        out["signature"] = {}
    return out
