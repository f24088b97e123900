"""``manidp eval NARROW --escalate-to WIDE --target-flops R``: an escalation cascade of two exports.

FLOPs are shares of the dense FLOPs of the architecture at full width (timm's network, also when a
static stage slimmed an export), so both members and the target are on one scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manidp_cli.analysis.cascade import CascadeEvaluation, MemberOutputs, evaluate_cascade, member_outputs
from manidp_cli.api.evaluate import DataSource, architecture_flops
from manidp_cli.core.distributed import resolve_device
from manidp_cli.core.flops import FLOP_CONVENTION, count_flops
from manidp_cli.core.progress import ProgressCallback
from manidp_cli.data import LoaderSettings
from manidp_cli.errors import ManidpError, TargetError
from manidp_cli.inputs import DEFAULT_WORKERS
from manidp_cli.io import LoadedExport, load_pruned


@dataclass(frozen=True)
class MemberResult:
    source: str
    top1: float
    flops_ratio: float  # mean per image, of the full-width architecture

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "top1": self.top1, "flops_ratio": self.flops_ratio}


@dataclass(frozen=True)
class CascadeResult:
    """What ``manidp eval --escalate-to`` prints; ``to_dict()`` is its ``--json`` output."""

    model: str
    data: DataSource
    images: int
    architecture_dense_flops: int
    target_flops: float  # the mean FLOPs asked for, a share of ``architecture_dense_flops``
    narrow: MemberResult
    wide: MemberResult
    cascade: CascadeEvaluation  # mean_flops in FLOPs; flops_ratio below is its share
    flops_convention: str = FLOP_CONVENTION

    @property
    def flops_ratio(self) -> float:
        return self.cascade.mean_flops / self.architecture_dense_flops

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data.to_dict(),
            "images": self.images,
            "flops_convention": self.flops_convention,
            "architecture_dense_flops": self.architecture_dense_flops,
            "target_flops": self.target_flops,
            "narrow": self.narrow.to_dict(),
            "wide": self.wide.to_dict(),
            "cascade": {
                "top1": self.cascade.top1,
                "flops_ratio": self.flops_ratio,
                "escalated_share": self.cascade.escalated_share,
                "threshold": self.cascade.threshold,
                "fold_thresholds": self.cascade.fold_thresholds,
                "cross_fitted": True,
            },
        }


def _check_members(narrow: LoadedExport, wide: LoadedExport) -> None:
    for key, what in (("model", "architecture"), ("model_kwargs", "classes and input channels")):
        if narrow.metadata.get(key) != wide.metadata.get(key):
            raise ManidpError(
                f"--escalate-to {wide.path}: its {what} ({wide.metadata.get(key)}) differ from "
                f"{narrow.path}'s ({narrow.metadata.get(key)}); both members must be the same network"
            )


def _check_target(target: float, narrow: MemberOutputs, wide: MemberOutputs, full_width: int) -> None:
    lowest = float(narrow.flops.mean()) / full_width
    highest = float((narrow.flops + wide.flops).mean()) / full_width
    if not lowest <= target <= highest:
        raise TargetError(
            f"--target-flops {target} is outside what this cascade can spend: from {lowest:.4f} (the narrow "
            f"export alone) to {highest:.4f} (every image escalated), as shares of the full-width network"
        )


def evaluate_cascade_exports(
    narrow_path: str | Path,
    wide_path: str | Path,
    target_flops: float,
    data: str | None = None,
    batch_size: int = 256,
    limit: int | None = None,
    *,
    img_size: int | None = None,
    workers: int = DEFAULT_WORKERS,
    device: str = "auto",
    on_progress: ProgressCallback | None = None,
) -> CascadeResult:
    """Accuracy and mean FLOPs of escalating from one export to another at ``target_flops`` (a share
    of the full-width network's FLOPs), cross-fitted on the evaluation images, and the threshold
    fitted on all of them to deploy (``manidp_cli.runtime.cascade.Cascade``)."""
    target = resolve_device(device)
    narrow_model, narrow_info = load_pruned(narrow_path)
    wide_model, wide_info = load_pruned(wide_path)
    _check_members(narrow_info, wide_info)
    images, data_from = narrow_info.load_data(data, img_size, LoaderSettings.for_device(workers, target))
    shape = images.input_shape
    full_width = architecture_flops(narrow_info.metadata, shape)
    outputs = []
    for model in (narrow_model, wide_model):
        model.to(target)
        table = count_flops(model, shape)
        outputs.append(member_outputs(model, images.eval, table, batch_size, limit, on_progress))
    narrow, wide = outputs
    _check_target(target_flops, narrow, wide, full_width)
    return CascadeResult(
        model=narrow_info.metadata["model"],
        data=DataSource(images.spec, images.description, "eval", data_from),
        images=len(narrow.labels),
        architecture_dense_flops=full_width,
        target_flops=target_flops,
        narrow=_member(narrow_info, narrow, full_width),
        wide=_member(wide_info, wide, full_width),
        cascade=evaluate_cascade(narrow, wide, target_flops * full_width),
    )


def _member(info: LoadedExport, outputs: MemberOutputs, full_width: int) -> MemberResult:
    return MemberResult(str(info.path), float(outputs.correct.float().mean()), float(outputs.flops.mean()) / full_width)
