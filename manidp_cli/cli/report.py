"""``manidp report``: per-layer FLOPs and keep ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from manidp_cli.cli.app import app
from manidp_cli.cli.options import DataOpt, ImgSizeOpt, JsonOpt, MeasureDeviceOpt, MeasureWorkersOpt
from manidp_cli.cli.progress import task_progress
from manidp_cli.cli.render import console, err_console
from manidp_cli.errors import ManidpError
from manidp_cli.files import atomic_write_text, check_output_file
from manidp_cli.inputs import DEFAULT_WORKERS, check_writable_folder, exists


def _rich_report(report) -> Table:
    table = Table(title=f"{report.model} at {'x'.join(map(str, report.input_shape))}: keep ratios {report.measured_on}")
    for column, justify in [
        ("layer", "left"),
        ("type", "left"),
        ("kernel", "left"),
        ("C_in -> C_out", "right"),
        ("gated", "center"),
        ("dense MFLOPs", "right"),
        ("keep out", "right"),
        ("keep in", "right"),
        ("dynamic MFLOPs", "right"),
        ("share", "right"),
    ]:
        table.add_column(column, justify=justify)
    for r in report.rows:
        table.add_row(
            r.name,
            r.type,
            r.kernel,
            f"{r.in_channels} -> {r.out_channels}",
            "yes" if r.gated else "-",
            f"{r.dense_mflops:.3f}",
            f"{r.keep_ratio_out:.3f}",
            f"{r.keep_ratio_in:.3f}",
            f"{r.dynamic_mflops:.3f}",
            f"{r.share:.1%}",
        )
    table.add_row(
        "gates",
        "",
        "",
        "",
        "",
        "0.000",
        "",
        "",
        f"{report.gate_mflops:.3f}",
        f"{report.gate_mflops / report.dynamic_mflops:.1%}",
    )
    table.add_row(
        "other layers",
        "",
        "",
        "",
        "",
        f"{report.other_mflops:.3f}",
        "",
        "",
        f"{report.other_mflops:.3f}",
        f"{report.other_mflops / report.dynamic_mflops:.1%}",
    )
    table.add_row(
        "[bold]total",
        "",
        "",
        "",
        "",
        f"[bold]{report.dense_mflops:.3f}",
        "",
        "",
        f"[bold]{report.dynamic_mflops:.3f}",
        f"[bold]{report.ratio:.1%} of dense",
    )
    return table


def _input_shape(text: str | None) -> tuple[int, int, int] | None:
    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
        assert len(shape) == 3
    except (ValueError, AssertionError):
        raise ManidpError(f"--input-size must be C,H,W (e.g. 3,224,224), got {text!r}") from None
    return shape


@app.command()
def report(
    target: Annotated[str, typer.Argument(help="Export folder / model.safetensors, or a timm model name.")],
    data: DataOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table | json | csv | markdown")] = "table",
    as_json: JsonOpt = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the json/csv/markdown rendering to FILE.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Write PNG figures into DIR.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="With --data: first N images only.")] = None,
    input_size: Annotated[
        Optional[str], typer.Option("--input-size", help="For a timm model: C,H,W [default: its pretrained config].")
    ] = None,
    img_size: ImgSizeOpt = None,
    workers: MeasureWorkersOpt = DEFAULT_WORKERS,
    device: MeasureDeviceOpt = "auto",
) -> None:
    """Per-layer FLOPs and keep ratios of an export, or the dense table and gate coverage of a model."""
    from manidp_cli.api import flops_report, model_report

    if fmt not in ("table", "json", "csv", "markdown"):
        raise ManidpError(f"unknown --format {fmt!r}; valid: table, json, csv, markdown")
    if as_json:
        if fmt not in ("table", "json"):
            raise ManidpError(f"--json and --format {fmt} ask for two renderings: give one")
        fmt = "json"
    if out is not None:  # checked before the report is computed, which can take minutes with --data
        out = check_output_file(out, "--out")
    if plots is not None:
        plots = check_writable_folder(plots, "--plots")
    if exists(Path(target), "TARGET"):
        with task_progress(err_console) as on_progress:
            result = flops_report(
                target, data, limit, img_size=img_size, workers=workers, device=device, on_progress=on_progress
            )
    else:
        result = model_report(target, _input_shape(input_size), img_size=img_size)
    if fmt == "table":
        console.print(_rich_report(result))
        console.print("FLOPs: 1 FLOP = 1 fused multiply-add (fvcore's convention)")
        if result.would_gate:
            console.print(
                f"{len(result.would_gate)} convolutions would be gated under the default policy: "
                + ", ".join(result.would_gate)
            )
    else:
        text = result.render(fmt)
        if out is None:
            typer.echo(text, nl=False)
    if out is not None:
        atomic_write_text(out, result.render("json" if fmt == "table" else fmt))
        err_console.print(f"wrote {out}")  # notices on stderr: stdout holds only the rendering
    if plots is not None:
        if not result.per_image_ratio:
            raise ManidpError("plots need a pruned export (a timm model name has no measured statistics)")
        from manidp_cli.api import write_plots

        for path in write_plots(result, plots):
            err_console.print(f"wrote {path}")
