"""``manidp export-static`` and ``manidp bench``: deployable artifacts and their speed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from manidp_cli.cli.app import app
from manidp_cli.cli.options import DataOpt, ImgSizeOpt, JsonOpt, MeasureDeviceOpt, MeasureWorkersOpt
from manidp_cli.cli.progress import task_progress
from manidp_cli.cli.render import console, err_console, print_json
from manidp_cli.inputs import DEFAULT_WORKERS


@app.command("export-static")
def export_static_command(
    export: Annotated[Path, typer.Argument(help="Export folder or its model.safetensors.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Output folder: model.pt2, model_slim.safetensors, model.safetensors (timm's shapes), "
            "config.json (timm's), manidp.json.",
        ),
    ],
    min_keep_rate: Annotated[
        float,
        typer.Option(
            "--min-keep-rate", help="Remove channels kept by at most this fraction of the calibration images."
        ),
    ] = 0.0,
    data: DataOpt = None,
    calibration_images: Annotated[int, typer.Option("--calibration-images", min=1)] = 1024,
    img_size: ImgSizeOpt = None,
    workers: MeasureWorkersOpt = DEFAULT_WORKERS,
    device: MeasureDeviceOpt = "auto",
    onnx: Annotated[
        bool,
        typer.Option(
            "--onnx", help="Also write model.onnx, checked with onnxruntime (needs: pip install 'manidp[onnx]')."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Physically remove (almost) never-kept channels; write a gate-free model that runs on torch alone."""
    from manidp_cli.api import export_static

    with task_progress(err_console) as on_progress:
        result = export_static(
            export,
            out,
            min_keep_rate,
            data,
            calibration_images,
            onnx=onnx,
            img_size=img_size,
            workers=workers,
            device=device,
            on_progress=on_progress,
        )
    if as_json:
        print_json(result)
        return
    removed = sum(result.channels_removed.values())
    console.print(f"removed {removed} channels from {len(result.channels_removed)} layers")
    console.print(
        f"dense FLOPs {result.dense_flops / 1e9:.4f} G = {result.flops_ratio_to_original:.3f} of the original"
    )
    gated_top1 = (result.gated_accuracy or {}).get("top1", float("nan"))
    console.print(f"top-1 {result.accuracy['top1']:.4f} (gated model: {gated_top1:.4f})")
    console.print(f"wrote {', '.join(result.files)}; load with {result.load}")
    console.print(f"or with timm alone: {result.timm_load.replace('FOLDER', str(out))}")
    console.print(f"model.pt2 batch size: {result.program_batch}")
    if result.onnx is not None:
        check = result.onnx
        console.print(
            f"model.onnx (opset {check.opset}) agrees with PyTorch on {check.images} images: "
            f"max |difference| {check.max_abs_diff:.2e} (tolerance {check.tolerance:.2e})"
        )


@app.command()
def bench(
    export: Annotated[Path, typer.Argument(help="Export folder or its model.safetensors.")],
    runs: Annotated[int, typer.Option("--runs", min=3)] = 50,
    warmup: Annotated[int, typer.Option("--warmup", min=0)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Batch for the throughput figure.")] = 32,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1)] = None,
    static: Annotated[
        Optional[Path], typer.Option("--static", help="A folder written by export-static, timed too.")
    ] = None,
    static_keep_rate: Annotated[
        float,
        typer.Option(
            "--static-keep-rate",
            help="Without --static: time the network export-static --min-keep-rate this would write "
            "(built in memory from the export's training images).",
        ),
    ] = 0.5,
    no_static_export: Annotated[
        bool, typer.Option("--no-static-export", help="Without --static: time no static export.")
    ] = False,
    baseline: Annotated[
        Optional[str],
        typer.Option(
            "--baseline",
            help="static-l1: also time Torch-Pruning's L1 network at the export's FLOPs "
            "(needs pip install 'manidp[bench]').",
        ),
    ] = None,
    img_size: ImgSizeOpt = None,
    device: MeasureDeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Time dense vs masked vs dynamic execution (and static networks) of an export, in one run."""
    from manidp_cli.api import bench_export

    with task_progress(err_console) as on_progress:
        result = bench_export(
            export,
            runs=runs,
            warmup=warmup,
            batch_size=batch_size,
            threads=threads,
            static_dir=static,
            static_keep_rate=None if no_static_export else static_keep_rate,
            img_size=img_size,
            device=device,
            baseline=baseline,
            on_progress=on_progress,
        )
    if as_json:
        print_json(result)
        return
    table = Table(
        title=f"{result.model} at {'x'.join(map(str, result.input_shape))} on {result.device}, {result.threads} threads"
    )
    for column in (
        "variant",
        "layout",
        "batch-1 ms (median)",
        "p90",
        "x dense",
        f"images/s @ {batch_size}",
        "x dense",
        "peak RSS MB",
    ):
        table.add_column(column, justify="left" if column in ("variant", "layout") else "right")
    for name, v in result.variants.items():
        rss = "-" if v.peak_rss_mb is None else f"{v.peak_rss_mb:.0f}"
        table.add_row(
            name,
            v.layout,
            f"{v.latency_ms_median:.2f}",
            f"{v.latency_ms_p90:.2f}",
            f"{v.latency_ratio:.2f}",
            f"{v.throughput_images_per_s:.1f}",
            f"{v.throughput_ratio:.2f}",
            rss,
        )
    console.print(table)
    console.print(f"reference: {result.reference}; {result.verdict}")
    console.print(f"recommendation: {result.recommendation}")
    console.print(f"inputs: {result.inputs}")
    if result.cpu is not None:
        flags = " ".join(result.cpu.isa_flags) or "unknown"
        console.print(f"CPU: {result.cpu.model} ({flags}; torch kernels {result.cpu.torch_capability})")
