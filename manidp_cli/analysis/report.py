"""Per-layer FLOPs reports of exports (measured) and of plain timm models (dense, with the layers
the default policy would gate), with JSON, CSV and Markdown renderings.

Example::

    report = flops_report("runs/demo/pruned")          # stored statistics of the export
    print(report.to_markdown())
    report = flops_report("runs/demo/pruned", data="embedded", limit=500)   # re-measured
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from manidp_cli.analysis.evaluation import evaluate
from manidp_cli.config import GatePolicy
from manidp_cli.core.distributed import World, resolve_device
from manidp_cli.core.flops import FLOP_CONVENTION, CostTable, FlopsStats, LayerStats, count_flops
from manidp_cli.core.gating import select_convs
from manidp_cli.core.progress import ProgressCallback
from manidp_cli.data import LoaderSettings
from manidp_cli.errors import ManidpError
from manidp_cli.inputs import DEFAULT_WORKERS, capped, exception_text, is_dir
from manidp_cli.io import load_pruned, read_metadata
from manidp_cli.models.factory import check_model_name


@dataclass
class LayerRow:
    name: str
    type: str
    kernel: str
    in_channels: int
    out_channels: int
    groups: int
    gated: bool
    dense_mflops: float
    keep_ratio_out: float
    keep_ratio_in: float
    dynamic_mflops: float
    share: float  # of the mean dynamic total


@dataclass
class FlopsReport:
    model: str
    source: str
    input_shape: tuple[int, int, int]
    measured_on: str  # what the keep ratios come from
    rows: list[LayerRow]
    dense_mflops: float  # the whole network without gates
    gate_mflops: float
    other_mflops: float  # everything that is not a convolution, at its dense cost
    dynamic_mflops: float  # mean per image, gates included
    images: int = 0
    per_image_ratio: list[float] = field(default_factory=list)
    per_image_loss: list[float] = field(default_factory=list)
    channel_keep_frequency: dict[str, list[float]] = field(default_factory=dict)
    would_gate: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.dynamic_mflops / self.dense_mflops

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        data["convention"] = FLOP_CONVENTION
        data["ratio"] = self.ratio
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def to_csv(self) -> str:
        buffer = io.StringIO()
        names = list(LayerRow.__dataclass_fields__)
        writer = csv.DictWriter(buffer, fieldnames=names)
        writer.writeheader()
        for row in self.rows:
            writer.writerow(asdict(row))
        return buffer.getvalue()

    def to_markdown(self) -> str:
        lines = [
            f"# {self.model}: per-layer FLOPs ({FLOP_CONVENTION})",
            "",
            f"input {'x'.join(map(str, self.input_shape))}; keep ratios {self.measured_on}",
            "",
            "| layer | type | kernel | C_in -> C_out | gated | dense MFLOPs"
            " | keep out | keep in | dynamic MFLOPs | share |",
            "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.type} | {r.kernel} | {r.in_channels} -> {r.out_channels}"
                f" | {'yes' if r.gated else 'no'} "
                f"| {r.dense_mflops:.3f} | {r.keep_ratio_out:.3f} | {r.keep_ratio_in:.3f}"
                f" | {r.dynamic_mflops:.3f} | {r.share:.1%} |"
            )
        lines.append(
            f"| gates | | | | | 0.000 | | | {self.gate_mflops:.3f} | {self.gate_mflops / self.dynamic_mflops:.1%} |"
        )
        lines.append(
            f"| other layers | | | | | {self.other_mflops:.3f} | | | {self.other_mflops:.3f}"
            f" | {self.other_mflops / self.dynamic_mflops:.1%} |"
        )
        lines.append(
            f"| **total** | | | | | {self.dense_mflops:.3f}"
            f" | | | {self.dynamic_mflops:.3f} | {self.ratio:.1%} of dense |"
        )
        return "\n".join(lines) + "\n"

    def render(self, fmt: str) -> str:
        renderers = {"json": self.to_json, "csv": self.to_csv, "markdown": self.to_markdown}
        if fmt not in renderers:
            raise ManidpError(f"unknown format {fmt!r}; valid: table, {', '.join(renderers)}")
        return renderers[fmt]()


def build_report(
    model: str,
    source: str,
    table: CostTable,
    stats: FlopsStats | None,
    measured_on: str,
    per_image_loss: list[float] | None = None,
    would_gate: list[str] | None = None,
) -> FlopsReport:
    """Combine dense costs with measured statistics (or none: a dense report, all kept)."""
    measured = {layer.name: layer for layer in stats.layers} if stats else {}
    other = sum(layer.dense_flops for layer in table.layers if layer.kind == "other") / 1e6
    gate = table.gate_flops / 1e6
    rows = []
    for layer in table.convs():
        m = measured.get(layer.name)
        dynamic = (m.dynamic_flops if m else layer.dense_flops) / 1e6
        rows.append(
            LayerRow(
                layer.name,
                layer.module_type,
                "x".join(map(str, layer.kernel)),
                layer.in_channels,
                layer.out_channels,
                layer.groups,
                layer.gated,
                layer.dense_flops / 1e6,
                m.keep_ratio_out if m else 1.0,
                m.keep_ratio_in if m else 1.0,
                dynamic,
                0.0,
            )
        )
    total = sum(r.dynamic_mflops for r in rows) + gate + other
    for row in rows:
        row.share = row.dynamic_mflops / total
    dense = table.dense_flops / 1e6
    return FlopsReport(
        model=model,
        source=source,
        input_shape=tuple(table.input_shape),
        measured_on=measured_on,
        rows=rows,
        dense_mflops=dense,
        gate_mflops=gate,
        other_mflops=other,
        dynamic_mflops=total,
        images=len(stats.per_image) if stats else 0,
        per_image_ratio=[f / table.dense_flops for f in stats.per_image] if stats else [],
        per_image_loss=list(per_image_loss or []),
        channel_keep_frequency=dict(stats.channel_keep_frequency) if stats else {},
        would_gate=list(would_gate or []),
    )


def _stats_from_dict(data: dict) -> FlopsStats:

    return FlopsStats(
        data["dense_flops"],
        data["gate_flops"],
        list(data["per_image"]),
        [LayerStats(**layer) for layer in data["layers"]],
        dict(data.get("channel_keep_frequency", {})),
    )


def _stored_report(stored: Path, path: Path) -> FlopsReport | None:
    """The statistics saved in ``report.json`` at export time, checked to be whole and to belong to
    the export beside them; None when the file holds no measurements (a dense export)."""

    meta = read_metadata(path)
    hint = "delete it, or re-measure with --data SPEC"
    try:
        saved = json.loads(stored.read_text())
        if not isinstance(saved, dict):
            raise TypeError("not a JSON object")
        if "measured" not in saved:
            return None
        table = CostTable.from_dict(saved["cost_table"])
        mine = (meta["model"], list(meta["input_shape"]), meta.get("dense_flops", table.dense_flops))
        theirs = (saved.get("model"), list(table.input_shape), table.dense_flops)
        if mine != theirs:
            raise ManidpError(
                f"{stored} does not belong to the export beside it (model, input shape, dense FLOPs: "
                f"{capped(theirs)} there, {capped(mine)} in the export); {hint}"
            )
        stats = _stats_from_dict(saved["measured"])
        spec = meta.get("data", {}).get("spec", "its data")
        where = f"measured on {len(stats.per_image)} evaluation images of {spec} at export time"
        losses = [float(v) for v in saved.get("per_image_loss") or []]
        return build_report(meta["model"], str(path), table, stats, where, losses)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as exc:
        raise ManidpError(f"{stored} is corrupt ({type(exc).__name__}: {exception_text(exc)}); {hint}") from None


def flops_report(
    export: str | Path,
    data: str | None = None,
    limit: int | None = None,
    batch_size: int = 256,
    *,
    img_size: int | None = None,
    workers: int = DEFAULT_WORKERS,
    device: str = "auto",
    on_progress: ProgressCallback | None = None,
) -> FlopsReport:
    """Report of an export: the statistics stored beside it, or re-measured on ``data`` (the
    export's own data when only ``img_size`` is given), on ``device``; ``on_progress`` hears of
    each batch measured."""

    path = Path(export).expanduser()
    folder = path if is_dir(path, "export") else path.parent
    stored = folder / "report.json"
    target = resolve_device(device)
    if data is None and img_size is None and stored.is_file():
        report = _stored_report(stored, path)
        if report is not None:
            return report
    model, info = load_pruned(path)
    if not info.gated:
        raise ManidpError(f"{path} is a dense export: nothing is pruned (use `manidp report {info.metadata['model']}`)")

    images, _ = info.load_data(data, img_size, LoaderSettings.for_device(workers, target))
    model.to(target)
    table = count_flops(model, images.input_shape)
    result = evaluate(
        model, images.eval, batch_size, table=table, limit=limit, world=World(device=target), on_progress=on_progress
    )
    where = f"measured now on {result.images} evaluation images of {images.spec}"
    return build_report(info.metadata["model"], str(path), table, result.flops, where, result.per_image_loss)


def model_report(
    model_name: str, input_shape: tuple[int, int, int] | None = None, policy=None, img_size: int | None = None
) -> FlopsReport:
    """Dense fvcore report of a timm model plus the convolutions the gate policy would gate, at
    ``input_shape``, else at ``img_size`` px with the channels of its pretrained configuration, else
    at that configuration's input size."""
    import timm

    check_model_name(model_name)
    model = timm.create_model(model_name, pretrained=False).eval()
    shape = tuple(input_shape or model.pretrained_cfg.get("input_size", (3, 224, 224)))
    if input_shape is None and img_size is not None:
        shape = (shape[0], img_size, img_size)
    would_gate = sorted(select_convs(model, policy or GatePolicy(), shape))
    table = count_flops(model, shape)
    gated = set(would_gate)
    table = CostTable(
        table.input_shape,
        tuple(type(layer)(**{**asdict(layer), "gated": layer.name in gated}) for layer in table.layers),
        table.total_flops,
    )
    return build_report(
        model_name, f"timm:{model_name}", table, None, "dense (nothing pruned yet)", would_gate=would_gate
    )
