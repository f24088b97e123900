"""Accuracy, loss, measured dynamic FLOPs and the ManiDP signature over an image set.

The signature checks the two claims of the method on the evaluated images:

- complexity: Spearman correlation between per-image loss and per-image FLOPs (easy images should
  use smaller sub-networks, so it is expected to be positive);
- similarity: per gated layer and batch, the Pearson correlation between the off-diagonal entries of
  the feature Gram matrix F F^T and the sub-network Gram matrix P P^T (method.md's similarity term),
  averaged over layers and the first ``signature_batches`` batches.

Example::

    result = evaluate(model, data.eval, table=count_flops(model, data.input_shape))
    result.summary()["flops"]["median_ratio"], result.signature.spearman_loss_flops
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from manidp_cli.core.distributed import World
from manidp_cli.core.flops import CostTable, FlopsMeter, FlopsStats
from manidp_cli.core.modes import eval_mode
from manidp_cli.core.progress import ProgressCallback, reported
from manidp_cli.core.recorder import GateRecorder
from manidp_cli.data import ImageSet
from manidp_cli.runtime.decisions import DecisionAgreement
from manidp_cli.runtime.execute import dynamic_model


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


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation; None when either side is constant (the correlation is undefined)."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denominator = a.norm() * b.norm()
    return float((a @ b) / denominator) if denominator > 0 else None


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman rank correlation (Pearson correlation of average ranks)."""
    return pearson(_ranks(torch.as_tensor(a)), _ranks(torch.as_tensor(b)))


def gram_correlation(features: torch.Tensor, saliency: torch.Tensor) -> float | None:
    """Correlation of the off-diagonal entries of F F^T and P P^T (rows L2-normalised)."""
    f = F.normalize(features.double(), dim=1)
    p = F.normalize(saliency.double(), dim=1)
    batch = f.shape[0]
    off = ~torch.eye(batch, dtype=torch.bool)
    return pearson((f @ f.T)[off], (p @ p.T)[off])


STATISTICS = ("mean", "median", "p10", "p90", "min", "max")


@dataclass(frozen=True)
class FlopsDistribution:
    """Per-image FLOPs over the evaluated images; ``dense`` excludes the gates, ``gates`` is theirs."""

    dense: int
    gates: int
    mean: float
    median: float
    p10: float
    p90: float
    min: float
    max: float
    routed_channel_share: float | None = None  # FlopsStats.routed_channel_share

    @classmethod
    def of_dense(cls, dense: int) -> FlopsDistribution:
        """Dense execution: every image computes every channel."""
        return cls(dense, 0, *(float(dense) for _ in STATISTICS))

    def ratio(self, statistic: str) -> float:
        return getattr(self, statistic) / self.dense

    def to_dict(self) -> dict[str, float]:
        values = {key: getattr(self, key) for key in STATISTICS}
        return {
            "dense": self.dense,
            "gates": self.gates,
            **values,
            **{f"{key}_ratio": value / self.dense for key, value in values.items()},
            "mean_gflops": self.mean / 1e9,
            "dense_gflops": self.dense / 1e9,
            "routed_channel_share": self.routed_channel_share,
        }


@dataclass(frozen=True)
class Signature:
    """The method's two claims measured on the evaluated images (module docstring). A correlation is
    None where it is undefined: when every image gets the same FLOPs (a codebook model whose layers
    each keep one set) or every saliency of a layer is constant over the batches."""

    spearman_loss_flops: float | None
    gram_correlation: float | None
    gram_batches: int

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def signature_dict(signature: Signature | None) -> dict[str, float | int | None]:
    """What JSON outputs and export metadata hold for a signature: empty when there is none (dense)."""
    return signature.to_dict() if signature is not None else {}


@dataclass
class Evaluation:
    images: int
    top1: float
    top5: float
    loss: float
    per_image_loss: list[float] = field(default_factory=list, repr=False)
    flops: FlopsStats | None = None
    signature: Signature | None = None  # None for a dense model, or when not asked for

    def summary(self) -> dict:
        out = {"images": self.images, "top1": self.top1, "top5": self.top5, "loss": self.loss}
        if self.flops is not None:
            out["flops_ratio"] = self.flops.mean_ratio
            out["mean_flops"] = self.flops.mean_flops
        return out

    def flops_distribution(self) -> FlopsDistribution | None:
        """Mean, median, p10, p90, min and max of the per-image FLOPs (None for a dense model)."""
        if self.flops is None:
            return None
        per_image = torch.tensor(self.flops.per_image, dtype=torch.float64)
        return FlopsDistribution(
            dense=self.flops.dense_flops,
            gates=self.flops.gate_flops,
            mean=float(per_image.mean()),
            median=float(per_image.quantile(0.5)),
            p10=float(per_image.quantile(0.1)),
            p90=float(per_image.quantile(0.9)),
            min=float(per_image.min()),
            max=float(per_image.max()),
            routed_channel_share=self.flops.routed_channel_share(),
        )


class _Tally:
    """Per-batch accuracy, losses, FLOPs and signature terms of one evaluation pass."""

    def __init__(self, meter: FlopsMeter | None, signature_batches: int):
        self.meter = meter
        self.signature_batches = signature_batches
        self.correct1 = self.correct5 = 0
        self.losses: list[torch.Tensor] = []
        self.gram: list[float] = []

    def add(self, index: int, logits: torch.Tensor, targets: torch.Tensor, recorder: GateRecorder | None) -> None:
        self.losses.append(F.cross_entropy(logits.float(), targets, reduction="none").cpu())
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.correct1 += int((top[:, 0] == targets).sum())
        self.correct5 += int((top == targets[:, None]).any(dim=1).sum())
        if self.meter is None:
            return
        self.meter.update(recorder, logits.shape[0])
        if index < self.signature_batches and logits.shape[0] > 2:
            per_layer = [gram_correlation(recorder.features[n], s) for n, s in recorder.saliency.items()]
            per_layer = [c for c in per_layer if c is not None]
            if per_layer:
                self.gram.append(sum(per_layer) / len(per_layer))

    def result(self, world: World) -> Evaluation:
        per_image = torch.cat(self.losses) if self.losses else torch.zeros(0)
        correct1, correct5, gram = self.correct1, self.correct5, self.gram
        if world.distributed:
            correct1, correct5 = (int(v) for v in world.all_reduce_sum(torch.tensor([correct1, correct5])).tolist())
            per_image = torch.cat(world.all_gather_object(per_image))
            gram = [c for part in world.all_gather_object(gram) for c in part]
            if self.meter is not None:
                self.meter.reduce(world)
        n = max(len(per_image), 1)
        stats = self.meter.stats() if self.meter is not None else None
        signature = None
        if stats is not None and self.signature_batches > 0:
            signature = Signature(
                spearman_loss_flops=spearman(per_image, torch.tensor(stats.per_image)),
                gram_correlation=sum(gram) / len(gram) if gram else None,
                gram_batches=len(gram),
            )
        return Evaluation(
            images=len(per_image),
            top1=correct1 / n,
            top5=correct5 / n,
            loss=float(per_image.mean()) if len(per_image) else float("nan"),
            per_image_loss=per_image.tolist(),
            flops=stats,
            signature=signature,
        )


def evaluate(
    model: nn.Module,
    images: ImageSet,
    batch_size: int = 256,
    table: CostTable | None = None,
    limit: int | None = None,
    signature_batches: int = 0,
    world: World = World(),
    on_progress: ProgressCallback | None = None,
) -> Evaluation:
    """Top-1/top-5 accuracy and mean loss; with ``table`` (a gated model) also its dynamic FLOPs
    and, for ``signature_batches`` > 0, the ManiDP signature (module docstring). With a distributed
    ``world`` each rank evaluates its share and every rank returns the result over all images. The
    model must be on ``world.device``; ``on_progress`` hears of each batch."""
    tally = _Tally(FlopsMeter(table) if table is not None else None, signature_batches)
    shard = (world.rank, world.size)
    batches = reported(
        images.batches(batch_size, limit=limit, shard=shard),
        "evaluating",
        images.num_batches(batch_size, limit, shard),
        on_progress,
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(eval_mode(model))
        recorder = None
        if table is not None:
            recorder = stack.enter_context(GateRecorder(model, features=signature_batches > 0, detach=True))
        for index, (x, y) in enumerate(batches):
            x, y = x.to(world.device), y.to(world.device)
            tally.add(index, model(x), y, recorder)
    return tally.result(world)


@dataclass(frozen=True)
class DynamicExecution:
    """The dynamic executor's accuracy on images run one at a time, against the masked model."""

    images: int
    top1: float
    top5: float
    loss: float
    prediction_agreement: float
    max_logit_difference: float
    codebook: bool
    decisions: DecisionAgreement

    def to_dict(self) -> dict[str, float | int | bool]:
        fields = {key: value for key, value in self.__dict__.items() if key != "decisions"}
        return {**fields, **self.decisions.to_dict()}


@torch.no_grad()
def evaluate_dynamic_execution(
    model: nn.Module,
    images: ImageSet,
    input_shape: tuple[int, int, int],
    limit: int | None = None,
    device: torch.device = torch.device("cpu"),
    on_progress: ProgressCallback | None = None,
) -> DynamicExecution:
    """Accuracy of the dynamic executor (``runtime.execute.dynamic_model``, the one ``manidp bench``
    times), every image run alone, how far its logits are from the masked model's, and how often it
    took the masked model's decisions (``runtime.decisions.DecisionAgreement``). The model must be
    on ``device``; ``on_progress`` hears of each batch of 64 images."""
    model.eval()
    fast = dynamic_model(model, input_shape)
    agreement = DecisionAgreement()
    correct1 = correct5 = agree = count = 0
    loss = 0.0
    largest_difference = 0.0
    batches = reported(images.batches(64, limit=limit), "dynamic executor", images.num_batches(64, limit), on_progress)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        runs = (agreement.add(model, fast, image[None]) for image in x)
        logits, reference = (torch.cat(outputs) for outputs in zip(*runs))
        largest_difference = max(largest_difference, float((logits - reference).abs().max()))
        loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
        agree += int((logits.argmax(1) == reference.argmax(1)).sum())
        count += x.shape[0]
    n = max(count, 1)
    return DynamicExecution(
        images=count,
        top1=correct1 / n,
        top5=correct5 / n,
        loss=loss / n,
        prediction_agreement=agree / n,
        max_logit_difference=largest_difference,
        codebook=any(getattr(m, "entry_rows", None) for m in fast.modules()),
        decisions=agreement,
    )
