"""The ``manidp`` command: parse, call one library function, print. No method logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from manidp_cli import __version__

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
    table.add_row("output", str(job.out_dir))
    console.print(table)


def _run_with_progress(job):
    from manidp_cli.pipeline import run

    steps = job.data.train.num_batches(job.recipe.batch_size)
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
    model: Annotated[str, typer.Argument(help="timm model name, e.g. resnet18")],
    recipe: RecipeOpt = None,
    data: DataOpt = None,
    weights: WeightsOpt = None,
    out: OutOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """Train a dense starting point (plain cross-entropy) and export it as safetensors."""
    from manidp_cli.pipeline import prepare

    overrides = {"data": data, "epochs": epochs, "batch_size": batch_size, "seed": seed, "optimizer": {"lr": lr} if lr else None}
    job = prepare("train", model, recipe_path=recipe, overrides=overrides, weights=weights, out_dir=out, resume=resume)
    _print_plan(job)
    _print_result(_run_with_progress(job))


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="timm model name, e.g. resnet34")],
    target_flops: Annotated[Optional[float], typer.Option("--target-flops", help="Fraction of dense FLOPs to keep on average, 0 < F < 1.")] = None,
    recipe: RecipeOpt = None,
    data: DataOpt = None,
    weights: WeightsOpt = None,
    out: OutOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """Insert ManiDP gates, fine-tune to a FLOPs target and export safetensors plus reports."""
    from manidp_cli.pipeline import prepare

    overrides = {
        "target_flops": target_flops, "data": data, "epochs": epochs, "batch_size": batch_size,
        "seed": seed, "optimizer": {"lr": lr} if lr else None,
    }
    job = prepare("prune", model, recipe_path=recipe, overrides=overrides, weights=weights, out_dir=out, resume=resume)
    _print_plan(job)
    _print_result(_run_with_progress(job))


def main() -> None:
    """Entry point: library errors about user input become one line on stderr and exit code 2."""
    from manidp_cli.errors import ManidpError

    try:
        app()
    except ManidpError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
