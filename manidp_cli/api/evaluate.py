"""``manidp eval``: accuracy and measured dynamic FLOPs of an export, or of a dense baseline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manidp_cli.analysis.evaluation import (
    DynamicExecution,
    Evaluation,
    FlopsDistribution,
    Signature,
    evaluate,
    evaluate_dynamic_execution,
    signature_dict,
)
from manidp_cli.core.distributed import World, resolve_device
from manidp_cli.core.flops import FLOP_CONVENTION, count_flops
from manidp_cli.core.progress import ProgressCallback
from manidp_cli.data import ImageData, LoaderSettings, load_data
from manidp_cli.errors import ManidpError
from manidp_cli.inputs import DEFAULT_WORKERS
from manidp_cli.io import NARROWED, load_pruned
from manidp_cli.models.factory import create_model


@dataclass(frozen=True)
class DataSource:
    """Which images were evaluated, and where that choice came from (--data or the export)."""

    spec: str
    description: str
    split: str
    given_by: str

    def to_dict(self) -> dict[str, str]:
        return {"spec": self.spec, "description": self.description, "split": self.split, "from": self.given_by}


@dataclass(frozen=True)
class EvalResult:
    """What ``manidp eval`` prints; ``to_dict()`` is its ``--json`` output."""

    model: str
    source: str
    pruned: bool
    data: DataSource
    input_shape: tuple[int, int, int]  # C, H, W of the evaluated images (FLOPs are counted at it)
    images: int
    top1: float
    top5: float
    loss: float
    flops: FlopsDistribution
    signature: Signature | None  # None for a dense model
    dynamic_execution: DynamicExecution | None = None
    # an export of a statically slimmed start: the dense FLOPs of timm's full-width architecture, of
    # which ``flops`` (a share of the slimmed network's) is then a smaller share
    architecture_dense_flops: int | None = None
    flops_convention: str = FLOP_CONVENTION

    @property
    def mean_ratio_of_architecture(self) -> float | None:
        return self.flops.mean / self.architecture_dense_flops if self.architecture_dense_flops else None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "model": self.model,
            "source": self.source,
            "pruned": self.pruned,
            "data": self.data.to_dict(),
            "input_shape": list(self.input_shape),
            "images": self.images,
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "flops_convention": self.flops_convention,
            "flops": self.flops.to_dict(),
            "signature": signature_dict(self.signature),
        }
        if self.dynamic_execution is not None:
            out["dynamic_execution"] = self.dynamic_execution.to_dict()
        if self.architecture_dense_flops is not None:
            out["architecture_dense_flops"] = self.architecture_dense_flops
            out["mean_ratio_of_architecture"] = self.mean_ratio_of_architecture
        return out


def _result(
    model_name: str,
    source: str,
    images: ImageData,
    given_by: str,
    result: Evaluation,
    dense_flops: int,
    dynamic: DynamicExecution | None = None,
    architecture_flops: int | None = None,
) -> EvalResult:
    distribution = result.flops_distribution()
    return EvalResult(
        model=model_name,
        source=source,
        pruned=distribution is not None,
        data=DataSource(images.spec, images.description, "eval", given_by),
        input_shape=images.input_shape,
        images=result.images,
        top1=result.top1,
        top5=result.top5,
        loss=result.loss,
        flops=distribution if distribution is not None else FlopsDistribution.of_dense(dense_flops),
        signature=result.signature if distribution is not None else None,
        dynamic_execution=dynamic,
        architecture_dense_flops=architecture_flops,
    )


def evaluate_export(
    path: str | Path,
    data: str | None = None,
    batch_size: int = 256,
    limit: int | None = None,
    signature_batches: int = 4,
    dynamic: bool = False,
    *,
    img_size: int | None = None,
    workers: int = DEFAULT_WORKERS,
    device: str = "auto",
    on_progress: ProgressCallback | None = None,
) -> EvalResult:
    """``manidp eval`` of an export: accuracy, FLOPs distribution and signature.

    Without ``data`` the evaluation split of the data recorded in the export is used, at the
    export's input size unless ``img_size`` asks for another (FLOPs are then counted at that size).
    ``dynamic`` adds the accuracy of the dynamic executor (``dynamic_execution``). ``device`` is
    auto, cpu or cuda; ``on_progress`` hears of each batch.
    """
    target = resolve_device(device)
    model, info = load_pruned(path)
    if dynamic and not info.gated:
        raise ManidpError(f"{info.path} is a dense export: --dynamic needs a pruned one")
    images, data_from = info.load_data(data, img_size, LoaderSettings.for_device(workers, target))
    model.to(target)
    table = count_flops(model, images.input_shape)
    result = evaluate(
        model,
        images.eval,
        batch_size,
        table=table if info.gated else None,
        limit=limit,
        signature_batches=signature_batches,
        world=World(device=target),
        on_progress=on_progress,
    )
    fast = None
    if dynamic:
        fast = evaluate_dynamic_execution(model, images.eval, images.input_shape, limit, target, on_progress)
    architecture = architecture_flops(info.metadata, images.input_shape) if info.metadata.get(NARROWED) else None
    return _result(
        info.metadata["model"], str(info.path), images, data_from, result, table.total_flops, fast, architecture
    )


def architecture_flops(metadata: dict[str, Any], input_shape: tuple[int, int, int]) -> int:
    """Dense FLOPs of the full-width architecture a slimmed export was narrowed from, at ``input_shape``."""
    full_width = create_model(metadata["model"], **metadata["model_kwargs"])
    return count_flops(full_width, input_shape).dense_flops


def evaluate_dense(
    model_name: str,
    weights: str | Path | None,
    data: str,
    batch_size: int = 256,
    limit: int | None = None,
    *,
    img_size: int | None = None,
    workers: int = DEFAULT_WORKERS,
    device: str = "auto",
    on_progress: ProgressCallback | None = None,
) -> EvalResult:
    """``manidp eval --dense MODEL --weights FILE``: the unpruned baseline row (dense execution)."""
    target = resolve_device(device)
    images = load_data(data, model_name, image_size=img_size, loader=LoaderSettings.for_device(workers, target))
    model = create_model(
        model_name,
        num_classes=images.num_classes,
        in_chans=images.in_chans,
        weights=Path(weights) if weights else None,
        pretrained=weights is None,
    ).to(target)
    table = count_flops(model, images.input_shape)
    result = evaluate(model, images.eval, batch_size, limit=limit, world=World(device=target), on_progress=on_progress)
    return _result(model_name, str(weights or "timm hub"), images, "--data", result, table.total_flops)
