"""The ``manidp`` command: parse, call one library function, print. No method logic lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from manidp_cli import __version__

try:  # recent Typer ships its own copy of Click, whose exceptions are these
    from typer._click import exceptions as click_errors
except ImportError:  # older Typer runs on Click itself
    from click import exceptions as click_errors

app = typer.Typer(
    name="manidp",
    help="Dynamic channel pruning (ManiDP) for timm CNNs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

RecipeOpt = Annotated[Optional[Path], typer.Option("--recipe", help="Recipe YAML (see recipes/); flags override it.")]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="embedded | fashion-mnist[:DIR] | cifar10:DIR | cifar100:DIR | imagefolder:DIR")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="Starting weights: .safetensors or a torch file (read with weights_only=True).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Output folder [default: runs/<command>-<model>].")]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", min=1)]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", min=1)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out from its checkpoint.")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Initial learning rate.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda (under torchrun: the local GPU).")]
AmpOpt = Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="bf16 autocast for the forward pass (loss terms stay fp32).")]
ChannelsLastOpt = Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="channels-last memory layout.")]


@app.callback()
def _root() -> None:
    """Dynamic channel pruning (ManiDP) for timm CNNs."""


@app.command()
def version() -> None:
    """Print the manidp version."""
    console.print(f"manidp {__version__}")


def _print_plan(job) -> None:
    recipe = job.recipe
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("model", job.model_name)
    table.add_row("weights", job.weights_source + (" (resuming)" if job.resume else ""))
    table.add_row("data", job.data.description)
    table.add_row("dense cost", f"{job.table.dense_flops / 1e9:.4f} GFLOPs per image at {'x'.join(map(str, job.data.input_shape))} (1 FLOP = 1 multiply-add)")
    if job.kind == "prune":
        table.add_row("gates", f"{len(job.gates)} gated convolutions, {job.table.gate_flops / 1e6:.3f} MFLOPs of gate cost")
        table.add_row("target", f"{recipe.target_flops:.0%} of dense FLOPs on average")
    table.add_row("schedule", f"{recipe.epochs} epochs, batch {recipe.batch_size}, lr {recipe.optimizer.lr}, seed {recipe.seed}")
    world = os.environ.get("WORLD_SIZE", "1")
    per_rank = f"batch {recipe.batch_size} per process x {world} processes" if world != "1" else f"batch {recipe.batch_size}"
    table.add_row("runtime", f"device {recipe.device}, {per_rank}, amp {'on' if recipe.amp else 'off'}, channels-last {'on' if recipe.channels_last else 'off'}")
    table.add_row("output", str(job.out_dir))
    console.print(table)


def _run_with_progress(job):
    from manidp_cli.pipeline import run

    steps = job.data.train.num_batches(job.recipe.batch_size, job.recipe.train_images)
    progress = Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[terms]}"),
        console=console,
        transient=False,
    )
    tasks: dict[int, int] = {}

    def on_step(info) -> None:
        if info.epoch not in tasks:
            tasks[info.epoch] = progress.add_task("", total=steps, completed=info.step - 1, epoch=f"{info.epoch + 1}/{info.epochs}", terms="")
        terms = " ".join(f"{k} {v:.3f}" for k, v in info.terms.items() if k != "loss")
        terms += f" acc {info.running_accuracy:.3f}"
        progress.update(tasks[info.epoch], completed=info.step, terms=terms)

    def on_epoch(metrics) -> None:
        parts = [f"train acc {metrics.get('train_top1', 0):.3f}", f"eval acc {metrics.get('eval_top1', 0):.3f}"]
        if "eval_flops_ratio" in metrics:
            parts.append(f"eval FLOPs {metrics['eval_flops_ratio']:.3f} of dense")
        if "next_target" in metrics:
            parts.append(f"next target {metrics['next_target']:.3f}")
        progress.console.print(f"epoch {int(metrics['epoch']) + 1}: " + ", ".join(parts))

    with progress:
        return run(job, on_step=on_step, on_epoch=on_epoch)


def _print_result(result) -> None:
    if result.interrupted:
        console.print(f"[yellow]interrupted[/]: checkpoint saved in {result.out_dir}; continue with --resume --out {result.out_dir}")
        raise typer.Exit(130)
    table = Table(title="result")
    table.add_column("")
    table.add_column("top-1", justify="right")
    table.add_column("top-5", justify="right")
    table.add_column("FLOPs / dense", justify="right")
    if result.before is not None:
        before = result.before
        table.add_row("before", f"{before['top1']:.4f}", f"{before['top5']:.4f}", f"{before.get('flops_ratio', 1.0):.4f}")
    after = result.after.summary()
    table.add_row("after", f"{after['top1']:.4f}", f"{after['top5']:.4f}", f"{after.get('flops_ratio', 1.0):.4f}" if "flops_ratio" in after else "1 (dense)")
    console.print(table)
    console.print(f"wrote {', '.join(str(p) for p in result.files)} in {result.seconds:.0f} s")


@app.command()
def train(
    model: Annotated[Optional[str], typer.Argument(help="timm model name, e.g. resnet18 (with --resume: read from the checkpoint)")] = None,
    recipe: RecipeOpt = None,
    data: DataOpt = None,
    weights: WeightsOpt = None,
    out: OutOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    amp: AmpOpt = None,
    channels_last: ChannelsLastOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """Train a dense starting point (plain cross-entropy) and export it as safetensors."""
    _train_or_prune(
        "train", model, recipe, weights, out, resume, data=data, epochs=epochs, batch_size=batch_size,
        seed=seed, optimizer={"lr": lr} if lr is not None else None, device=device, amp=amp, channels_last=channels_last,
    )


def _train_or_prune(kind, model, recipe, weights, out, resume, **overrides) -> None:
    from manidp_cli.pipeline import prepare

    job = None
    try:
        job = prepare(kind, model, recipe_path=recipe, overrides=overrides, weights=weights, out_dir=out, resume=resume)
        _print_plan(job)
        result = _run_with_progress(job)
    except KeyboardInterrupt:  # before the first step, or a second Ctrl-C: say what is left
        _print_abort(job)
        raise typer.Exit(130) from None
    _print_result(result)


def _print_abort(job) -> None:
    if job is not None and job.checkpoint.is_file():
        err_console.print(
            f"interrupted: the last checkpoint (written at the end of an epoch) is kept in {job.out_dir}; "
            f"continue with --resume --out {job.out_dir}", highlight=False, markup=False, soft_wrap=True,
        )
    else:
        err_console.print(
            "interrupted before the first checkpoint: nothing to resume; run the command again to start over",
            highlight=False, markup=False, soft_wrap=True,
        )


@app.command()
def prune(
    model: Annotated[Optional[str], typer.Argument(help="timm model name, e.g. resnet34 (with --resume: read from the checkpoint)")] = None,
    target_flops: Annotated[Optional[float], typer.Option("--target-flops", help="Fraction of dense FLOPs to keep on average, 0 < F < 1.")] = None,
    recipe: RecipeOpt = None,
    data: DataOpt = None,
    weights: WeightsOpt = None,
    out: OutOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    amp: AmpOpt = None,
    channels_last: ChannelsLastOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """Insert ManiDP gates, fine-tune to a FLOPs target and export safetensors plus reports.

    Multi-process: torchrun --nproc_per_node N -m manidp_cli prune ... (see docs/distributed.md).
    """
    _train_or_prune(
        "prune", model, recipe, weights, out, resume, target_flops=target_flops, data=data, epochs=epochs,
        batch_size=batch_size, seed=seed, optimizer={"lr": lr} if lr is not None else None, device=device, amp=amp,
        channels_last=channels_last,
    )


def _print_eval(result: dict) -> None:
    flops = result["flops"]
    console.print(f"[bold]{result['model']}[/] from {result['source']}")
    console.print(f"data: {result['data']['description']} (evaluation split, from {result['data']['from']})")
    table = Table(show_header=False, box=None)
    table.add_row("images", str(result["images"]))
    table.add_row("top-1 / top-5", f"{result['top1']:.4f} / {result['top5']:.4f}")
    table.add_row("mean loss", f"{result['loss']:.4f}")
    table.add_row("dense", f"{flops['dense_gflops']:.4f} GFLOPs per image")
    table.add_row("dynamic mean", f"{flops['mean_gflops']:.4f} GFLOPs per image = {flops['mean_ratio']:.4f} of dense")
    for key in ("median", "p10", "p90", "min", "max"):
        table.add_row(f"dynamic {key}", f"{flops[key] / 1e9:.4f} GFLOPs = {flops[key + '_ratio']:.4f} of dense")
    signature = result.get("signature") or {}
    if signature:
        table.add_row("Spearman(loss, FLOPs)", f"{signature['spearman_loss_flops']:+.3f} (complexity: > 0 means hard images get more)")
        table.add_row("Gram correlation", f"{signature['gram_correlation']:+.3f} (similarity: features vs sub-networks, {signature['gram_batches']} batches)")
    fast = result.get("dynamic_execution")
    if fast:
        kind = "gather-free, codebook" if fast["codebook"] else "per-image gathers"
        table.add_row("dynamic executor", f"top-1 {fast['top1']:.4f} / top-5 {fast['top5']:.4f} ({kind}, batch 1, {fast['images']} images)")
        table.add_row("  vs masked model", f"same prediction for {fast['prediction_agreement']:.2%}; largest logit difference {fast['max_logit_difference']:.1e}")
        table.add_row("  decisions", f"{fast['decision_agreement']:.2%} of {fast['decisions']} (image, layer) decisions equal; "
                      f"every decision equal for {fast['images_with_every_decision_equal']:.2%} of images; diverging at near-ties: "
                      f"{fast['images_diverging_at_near_ties']}, unexplained: {fast['images_diverging_unexplained']}")
    console.print(table)
    console.print(result["flops_convention"])


@app.command("eval")
def eval_command(
    export: Annotated[Optional[Path], typer.Argument(help="Export folder or its model.safetensors.")] = None,
    data: DataOpt = None,
    dense: Annotated[Optional[str], typer.Option("--dense", help="Evaluate this timm model unpruned instead (baseline row).")] = None,
    weights: WeightsOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 256,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluate the first N images only.")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Also run every image alone through the dynamic executor (what `manidp bench` times) and report its accuracy.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Measure accuracy and real dynamic FLOPs of an export (or of a dense baseline)."""
    import json

    from manidp_cli.errors import ManidpError
    from manidp_cli.evaluation import evaluate_dense, evaluate_export

    if dense is not None:
        if data is None:
            raise ManidpError("--dense needs --data")
        result = evaluate_dense(dense, weights, data, batch_size, limit)
    elif export is not None:
        result = evaluate_export(export, data, batch_size, limit, dynamic=dynamic)
    else:
        raise ManidpError("give an EXPORT folder, or --dense MODEL --weights FILE --data SPEC")
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_eval(result)


def _rich_report(report) -> Table:
    table = Table(title=f"{report.model} at {'x'.join(map(str, report.input_shape))}: keep ratios {report.measured_on}")
    for column, justify in [("layer", "left"), ("type", "left"), ("kernel", "left"), ("C_in -> C_out", "right"),
                            ("gated", "center"), ("dense MFLOPs", "right"), ("keep out", "right"), ("keep in", "right"),
                            ("dynamic MFLOPs", "right"), ("share", "right")]:
        table.add_column(column, justify=justify)
    for r in report.rows:
        table.add_row(r.name, r.type, r.kernel, f"{r.in_channels} -> {r.out_channels}", "yes" if r.gated else "-",
                      f"{r.dense_mflops:.3f}", f"{r.keep_ratio_out:.3f}", f"{r.keep_ratio_in:.3f}",
                      f"{r.dynamic_mflops:.3f}", f"{r.share:.1%}")
    table.add_row("gates", "", "", "", "", "0.000", "", "", f"{report.gate_mflops:.3f}", f"{report.gate_mflops / report.dynamic_mflops:.1%}")
    table.add_row("other layers", "", "", "", "", f"{report.other_mflops:.3f}", "", "", f"{report.other_mflops:.3f}", f"{report.other_mflops / report.dynamic_mflops:.1%}")
    table.add_row("[bold]total", "", "", "", "", f"[bold]{report.dense_mflops:.3f}", "", "", f"[bold]{report.dynamic_mflops:.3f}", f"[bold]{report.ratio:.1%} of dense")
    return table


@app.command()
def report(
    target: Annotated[str, typer.Argument(help="Export folder / model.safetensors, or a timm model name.")],
    data: DataOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table | json | csv | markdown")] = "table",
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the json/csv/markdown rendering to FILE.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Write PNG figures into DIR.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="With --data: first N images only.")] = None,
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="For a timm model: C,H,W [default: its pretrained config].")] = None,
) -> None:
    """Per-layer FLOPs and keep ratios of an export, or the dense table and gate coverage of a model."""
    from manidp_cli.errors import ManidpError
    from manidp_cli.report import flops_report, model_report

    if fmt not in ("table", "json", "csv", "markdown"):
        raise ManidpError(f"unknown --format {fmt!r}; valid: table, json, csv, markdown")
    if out is not None:  # checked before the report is computed, which can take minutes with --data
        from manidp_cli.files import check_output_file

        out = check_output_file(out, "--out")
    if plots is not None:
        from manidp_cli.inputs import check_writable_folder

        plots = check_writable_folder(plots, "--plots")
    from manidp_cli.inputs import exists

    if exists(Path(target), "TARGET"):
        result = flops_report(target, data=data, limit=limit)
    else:
        shape = None
        if input_size:
            try:
                shape = tuple(int(v) for v in input_size.split(","))
                assert len(shape) == 3
            except (ValueError, AssertionError):
                raise ManidpError(f"--input-size must be C,H,W (e.g. 3,224,224), got {input_size!r}") from None
        result = model_report(target, shape)
    if fmt == "table":
        console.print(_rich_report(result))
        console.print("FLOPs: 1 FLOP = 1 fused multiply-add (fvcore's convention)")
        if result.would_gate:
            console.print(f"{len(result.would_gate)} convolutions would be gated under the default policy: " + ", ".join(result.would_gate))
    else:
        text = result.render(fmt)
        if out is None:
            typer.echo(text, nl=False)
    if out is not None:
        from manidp_cli.export import atomic_write_text

        atomic_write_text(out, result.render("json" if fmt == "table" else fmt))
        console.print(f"wrote {out}")
    if plots is not None:
        if not result.per_image_ratio:
            raise ManidpError("plots need a pruned export (a timm model name has no measured statistics)")
        from manidp_cli.plots import write_plots

        for path in write_plots(result, plots):
            console.print(f"wrote {path}")


@app.command("export-static")
def export_static_command(
    export: Annotated[Path, typer.Argument(help="Export folder or its model.safetensors.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for model.pt2, model.safetensors, config.json.")],
    min_keep_rate: Annotated[float, typer.Option("--min-keep-rate", help="Remove channels kept by at most this fraction of the calibration images.")] = 0.0,
    data: DataOpt = None,
    calibration_images: Annotated[int, typer.Option("--calibration-images", min=1)] = 1024,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Physically remove (almost) never-kept channels; write a gate-free model that runs on torch alone."""
    import json

    from manidp_cli.static import export_static

    result = export_static(export, out, min_keep_rate, data, calibration_images)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    removed = sum(result["channels_removed"].values())
    console.print(f"removed {removed} channels from {len(result['channels_removed'])} layers")
    console.print(f"dense FLOPs {result['dense_flops'] / 1e9:.4f} G = {result['flops_ratio_to_original']:.3f} of the original")
    console.print(f"top-1 {result['accuracy']['top1']:.4f} (gated model: {result['gated_accuracy']['top1']:.4f})")
    console.print(f"wrote {', '.join(result['files'])}; load with {result['load']}")


@app.command()
def bench(
    export: Annotated[Path, typer.Argument(help="Export folder or its model.safetensors.")],
    runs: Annotated[int, typer.Option("--runs", min=3)] = 50,
    warmup: Annotated[int, typer.Option("--warmup", min=0)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Batch for the throughput figure.")] = 32,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1)] = None,
    static: Annotated[Optional[Path], typer.Option("--static", help="A folder written by export-static, timed too.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Time dense vs masked vs dynamic execution (and static-slimmed) of an export, in one run."""
    import json

    from manidp_cli.bench import bench_export

    result = bench_export(export, runs=runs, warmup=warmup, batch_size=batch_size, threads=threads, static_dir=static)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"{result['model']} at {'x'.join(map(str, result['input_shape']))}, {result['threads']} threads")
    for column in ("variant", "layout", "batch-1 ms (median)", "p90", "x dense", f"images/s @ {batch_size}", "x dense", "peak RSS MB"):
        table.add_column(column, justify="left" if column in ("variant", "layout") else "right")
    for name, v in result["variants"].items():
        rss = "-" if v["peak_rss_mb"] is None else f"{v['peak_rss_mb']:.0f}"
        table.add_row(name, v["layout"], f"{v['latency_ms_median']:.2f}", f"{v['latency_ms_p90']:.2f}", f"{v['latency_ratio']:.2f}",
                      f"{v['throughput_images_per_s']:.1f}", f"{v['throughput_ratio']:.2f}", rss)
    console.print(table)
    console.print(f"reference: {result['reference']}; {result['verdict']}")


def main() -> None:
    """Entry point: library errors about user input become one line on stderr and exit code 2."""
    from manidp_cli.errors import ManidpError

    if os.environ.get("RANK", "0") != "0":
        console.quiet = True  # under torchrun only rank 0 prints; errors still reach stderr
    try:
        code = app(standalone_mode=False)  # Click's own error boxes are replaced by one line below
    except ManidpError as exc:
        _print_error(_one_line(exc))
        sys.exit(2)
    except click_errors.NoArgsIsHelpError as exc:  # Typer's Rich help is printed as it is built
        if exc.format_message():
            console.print(exc.format_message(), markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except click_errors.UsageError as exc:  # a bad flag or value: --epochs 0, --target-flops abc
        command = exc.ctx.command_path if exc.ctx is not None else "manidp"
        _print_error(f"{_one_line(exc.format_message())} (see `{command} --help`)")
        sys.exit(exc.exit_code)
    except click_errors.ClickException as exc:
        _print_error(_one_line(exc.format_message()))
        sys.exit(exc.exit_code)
    except typer.Abort:  # end of input at a prompt
        _print_error("aborted")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # without standalone mode Click returns exit codes


def _one_line(message: object) -> str:
    """The message on one line, capped; the exception's type when the message is empty."""
    from manidp_cli.inputs import capped

    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    return capped(text, 1000)


def _print_error(message: str) -> None:
    text = Text("error:", style="bold red")
    text.append(" " + message)  # plain text: a user value such as "[/x]" is not Rich markup
    err_console.print(text, highlight=False, soft_wrap=True)
