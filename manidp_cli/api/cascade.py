"""``manidp eval NARROW --escalate-to WIDE --target-flops R``: an escalation cascade of two exports,
or with ``--escalate-to-start`` of an export and the dense network it was pruned from (``START``).

FLOPs are shares of the dense FLOPs of the architecture at full width (timm's network, also when a
static stage slimmed an export), so both members and the target are on one scale.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from manidp_cli.analysis.cascade import (
    CascadeEvaluation,
    MemberOutputs,
    apply_threshold,
    evaluate_cascade,
    member_outputs,
)
from manidp_cli.api.evaluate import DataSource, architecture_flops
from manidp_cli.core.distributed import resolve_device
from manidp_cli.core.flops import FLOP_CONVENTION, count_flops
from manidp_cli.core.progress import ProgressCallback
from manidp_cli.data import LoaderSettings
from manidp_cli.errors import ManidpError, OutputError, TargetError
from manidp_cli.inputs import DEFAULT_WORKERS, capped, exists, is_dir
from manidp_cli.io import NARROWED, CascadeMember, LoadedExport, load_cascade_file, load_pruned, save_cascade
from manidp_cli.models.factory import create_model
from manidp_cli.models.narrowing import narrowed_widths
from manidp_cli.models.start import START_FILE, StartFile, build_start


class _Start:
    def __repr__(self) -> str:
        return "START"


START = _Start()  # the wide member: the dense network the narrow export was pruned from


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
    target_flops: float | None  # the mean FLOPs asked for, a share of ``architecture_dense_flops``
    narrow: MemberResult
    wide: MemberResult
    cascade: CascadeEvaluation  # mean_flops in FLOPs; flops_ratio below is its share
    flops_convention: str = FLOP_CONVENTION
    saved_to: str | None = None  # the cascade file written (--save-cascade)

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
                "cross_fitted": self.cascade.cross_fitted,
                "spearman_loss_flops": self.cascade.spearman_loss_flops,
            },
            "saved_to": self.saved_to,
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
    wide_path: str | Path | _Start,
    target_flops: float,
    data: str | None = None,
    batch_size: int = 256,
    limit: int | None = None,
    *,
    save_to: str | Path | None = None,
    img_size: int | None = None,
    workers: int = DEFAULT_WORKERS,
    device: str = "auto",
    on_progress: ProgressCallback | None = None,
) -> CascadeResult:
    """Accuracy and mean FLOPs of escalating from one export to another (``START``: to the dense
    network it was pruned from, as its metadata records) at ``target_flops`` (a share of the
    full-width network's FLOPs), cross-fitted on the evaluation images, and the threshold fitted on
    all of them to deploy (``manidp_cli.runtime.cascade.Cascade``). ``save_to`` writes both
    networks and that threshold as one file (``manidp_cli.load_cascade``; ``evaluate_cascade_file``)."""
    target = resolve_device(device)
    if save_to is not None:
        _check_new_file(Path(save_to))
    narrow_model, narrow_info = load_pruned(narrow_path)
    if isinstance(wide_path, _Start):
        wide_model, wide_info = start_of(narrow_info)
    else:
        wide_model, wide_info = load_pruned(wide_path)
    _check_members(narrow_info, wide_info)
    run = (data, img_size, workers, target, batch_size, limit, on_progress)
    pair = _measure_pair((narrow_model, wide_model), narrow_info, *run)
    _check_target(target_flops, pair.narrow, pair.wide, pair.full_width)
    cascade = evaluate_cascade(pair.narrow, pair.wide, target_flops * pair.full_width)
    result = pair.result(target_flops, cascade, (str(narrow_info.path), str(wide_info.path)))
    if save_to is None:
        return result
    # the networks as loaded (strictly, from their files) with their checked metadata: nothing read again
    narrow = CascadeMember(narrow_info.metadata, narrow_model.state_dict())
    wide = CascadeMember(wide_info.metadata, wide_model.state_dict())
    save_cascade(Path(save_to), narrow, wide, cascade.threshold, _fitted(result))
    return replace(result, saved_to=str(save_to))


def start_of(export: LoadedExport) -> tuple[nn.Module, LoadedExport]:
    """The dense network ``export`` was pruned from (``models.start.build_start``), and metadata for
    it as a dense export of the same network and data would have (a cascade file stores it)."""
    meta = export.metadata
    kwargs = meta["model_kwargs"]
    source = meta.get("weights_source", "")
    start_file = StartFile.from_dict(meta.get(START_FILE))
    model = build_start(meta["model"], kwargs["num_classes"], kwargs["in_chans"], source, start_file)
    widths = narrowed_widths(model, create_model(meta["model"], **kwargs))
    metadata = {
        "kind": "dense",
        **{key: meta[key] for key in ("model", "model_kwargs", "input_shape", "data") if key in meta},
        "weights_source": source,
        **({START_FILE: start_file.to_dict()} if start_file is not None else {}),
        **({NARROWED: widths} if widths else {}),
    }
    label = start_file.path if start_file is not None else source
    return model, LoadedExport(Path(f"{label} (the start of {export.path})"), metadata)


def evaluate_cascade_file(
    path: str | Path,
    data: str | None = None,
    batch_size: int = 256,
    limit: int | None = None,
    *,
    img_size: int | None = None,
    workers: int = DEFAULT_WORKERS,
    device: str = "auto",
    on_progress: ProgressCallback | None = None,
) -> CascadeResult:
    """``manidp eval CASCADE``: a saved cascade at its own threshold (not refitted, so not
    cross-fitted: on the images it was fitted on, the figure is a little optimistic)."""
    target = resolve_device(device)
    narrow_model, wide_model, saved = load_cascade_file(path)
    _check_members(saved.narrow, saved.wide)  # save_cascade checked them; the file may have been edited since
    run = (data, img_size, workers, target, batch_size, limit, on_progress)
    pair = _measure_pair((narrow_model, wide_model), saved.narrow, *run)
    cascade = apply_threshold(pair.narrow, pair.wide, saved.threshold)
    return pair.result(saved.fitted.get("target_flops"), cascade, (f"{path} (narrow)", f"{path} (wide)"))


@dataclass(frozen=True)
class _MeasuredPair:
    """Both members' outputs on one image set, FLOPs as counted per image."""

    model: str
    data: DataSource
    narrow: MemberOutputs
    wide: MemberOutputs
    full_width: int  # dense FLOPs of the full-width architecture: the scale of every ratio

    def result(self, target_flops: float | None, cascade: CascadeEvaluation, sources: tuple[str, str]) -> CascadeResult:
        narrow, wide = (
            MemberResult(source, float(out.correct.float().mean()), float(out.flops.mean()) / self.full_width)
            for source, out in zip(sources, (self.narrow, self.wide))
        )
        return CascadeResult(
            self.model, self.data, len(self.narrow.labels), self.full_width, target_flops, narrow, wide, cascade
        )


def _measure_pair(
    models: tuple[nn.Module, nn.Module],
    info: LoadedExport,
    data: str | None,
    img_size: int | None,
    workers: int,
    device: torch.device,
    batch_size: int,
    limit: int | None,
    on_progress: ProgressCallback | None,
) -> _MeasuredPair:
    """Both members over the evaluation images of ``data`` (or the data ``info`` records)."""
    images, data_from = info.load_data(data, img_size, LoaderSettings.for_device(workers, device))
    outputs = []
    for model in models:
        model.to(device)
        table = count_flops(model, images.input_shape)
        outputs.append(member_outputs(model, images.eval, table, batch_size, limit, on_progress))
    return _MeasuredPair(
        model=info.metadata["model"],
        data=DataSource(images.spec, images.description, "eval", data_from),
        narrow=outputs[0],
        wide=outputs[1],
        full_width=architecture_flops(info.metadata, images.input_shape),
    )


def _check_new_file(path: Path) -> None:
    if exists(path, "--save-cascade"):
        raise OutputError(f"--save-cascade {capped(path)} already exists: give a new file name")
    if not is_dir(path.parent, "--save-cascade's folder"):
        raise OutputError(f"--save-cascade {capped(path)}: its folder {capped(path.parent)} does not exist")


def _fitted(result: CascadeResult) -> dict[str, Any]:
    """How a saved cascade's threshold was chosen, kept in the file."""
    return {
        "target_flops": result.target_flops,
        "data": result.data.to_dict(),
        "images": result.images,
        "cross_fitted_top1": result.cascade.top1,
        "cross_fitted_flops_ratio": result.flops_ratio,
        "escalated_share": result.cascade.escalated_share,
    }
