"""``manidp train`` and ``manidp prune``: plan, progress, result."""

from __future__ import annotations

import os
import time
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import TextColumn
from rich.table import Table

from manidp_cli.cli.app import app
from manidp_cli.cli.options import (
    AmpOpt,
    BatchOpt,
    ChannelsLastOpt,
    DataOpt,
    DeviceOpt,
    EpochsOpt,
    ImgSizeOpt,
    JsonOpt,
    LrOpt,
    OutOpt,
    OverrideOpt,
    RecipeOpt,
    ResumeOpt,
    SeedOpt,
    WeightsOpt,
    WorkersOpt,
)
from manidp_cli.cli.progress import bar, clock, line_every, log_line
from manidp_cli.cli.render import console, err_console, print_json


def _print_plan(job, to: Console) -> None:
    from manidp_cli.api.jobs import LOW_GATED_SHARE

    recipe = job.recipe
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("model", job.model_name)
    table.add_row("weights", job.weights_source + (" (resuming)" if job.resume else ""))
    table.add_row("data", job.data.description)
    table.add_row(
        "dense cost",
        f"{job.table.dense_flops / 1e9:.4f} GFLOPs per image at {'x'.join(map(str, job.data.input_shape))}"
        f" (1 FLOP = 1 multiply-add)",
    )
    if job.command == "prune":
        narrowed = job.gates_narrowed_by_cost
        table.add_row(
            "gates",
            f"{len(job.gates)} gated convolutions"
            + (f" ({len(narrowed)} with a hidden layer narrowed by gates.max_cost)" if narrowed else "")
            + f", {job.table.gate_flops / 1e6:.3f} MFLOPs of gate cost "
            f"({job.table.gate_flops / job.table.dense_flops:.1%} of 'dense'); with "
            f"every gate closed the network still costs {job.gate_floor:.1%} of 'dense', and the target leaves "
            f"the gates {job.gated_share:.1%} of the FLOPs they decide",
        )
        if job.static_flops_ratio is None:
            table.add_row("target", f"{recipe.target_flops:.0%} of dense FLOPs on average")
        else:
            table.add_row(
                "target",
                f"{recipe.target_flops:.0%} of the start's FLOPs on average: static filter-L1 pruning cut the "
                f"start to {job.static_flops_ratio:.1%} ('dense' above, static_share {recipe.static_share}), "
                f"the gates cut that to {job.gate_target:.1%}",
            )
        if job.gated_share < LOW_GATED_SHARE:
            table.add_row(
                "warning",
                f"under {LOW_GATED_SHARE:.0%} of their FLOPs left to the gates, static filter-L1 pruning measured "
                "more accurate than gates alone; part of the cut made statically first (recipes/hybrid.yaml, "
                "static_share) was level with it or ahead (docs/results.md, 'Below 0.15 of the FLOPs')",
            )
        training = "narrow (only the channels a batch keeps)" if recipe.narrow_training else "masked (every channel)"
        table.add_row("training", f"{training}; narrow_training in the recipe")
    table.add_row(
        "schedule", f"{recipe.epochs} epochs, batch {recipe.batch_size}, lr {recipe.optimizer.lr}, seed {recipe.seed}"
    )
    world = os.environ.get("WORLD_SIZE", "1")
    per_rank = (
        f"batch {recipe.batch_size} per process x {world} processes" if world != "1" else f"batch {recipe.batch_size}"
    )
    table.add_row(
        "runtime",
        f"device {recipe.device}, {per_rank}, amp {'on' if recipe.amp else 'off'}"
        f", channels-last {'on' if recipe.channels_last else 'off'}",
    )
    table.add_row("output", str(job.out_dir))
    to.print(table)


def _step_terms(info) -> str:
    terms = " ".join(f"{k} {v:.3f}" for k, v in info.terms.items() if k != "loss")
    return terms + f" acc {info.running_accuracy:.3f}"


class _LogLines:
    """Progress where stdout is not a terminal (nohup, SLURM, CI logs), where a progress bar prints
    nothing: a plain, flushed line every ``every`` steps and at each epoch's last, with the loss
    terms, images per second and the time left."""

    def __init__(self, batch_size: int, every: int, to: Console):
        self.to = to
        self.batch_size = batch_size
        self.every = every
        self.started: tuple[int, int, float] | None = None  # (epoch, step, time) of the first step seen

    def on_step(self, info) -> None:
        now = time.perf_counter()
        if self.started is None or self.started[0] != info.epoch:
            self.started = (info.epoch, info.step - 1, now)
            return
        if info.step % self.every and info.step != info.steps:
            return
        done = info.step - self.started[1]
        per_step = (now - self.started[2]) / max(done - 1, 1)  # the first step of the epoch is the clock's start
        left = (info.steps - info.step) + (info.epochs - info.epoch - 1) * info.steps
        log_line(
            self.to,
            f"epoch {info.epoch + 1}/{info.epochs} step {info.step}/{info.steps} {_step_terms(info)} "
            f"lr {info.lr:.4g} {self.batch_size / per_step:.0f} images/s, {clock(per_step * left)} left",
        )


def _run_with_progress(job, to: Console):
    """Progress on ``to`` (stdout; stderr under --json): a bar on a terminal, plain lines in a log."""
    from manidp_cli.api import run

    def on_epoch(metrics) -> None:
        parts = [f"train acc {metrics.get('train_top1', 0):.3f}", f"eval acc {metrics.get('eval_top1', 0):.3f}"]
        if "eval_flops_ratio" in metrics:
            parts.append(f"eval FLOPs {metrics['eval_flops_ratio']:.3f} of dense")
        if "next_target" in metrics:
            parts.append(f"next target {metrics['next_target']:.3f}")
        log_line(to, f"epoch {int(metrics['epoch']) + 1}: " + ", ".join(parts))

    steps = job.data.train.num_batches(job.recipe.batch_size, job.recipe.train_images)
    if not to.is_terminal:
        lines = _LogLines(job.recipe.batch_size, line_every(steps), to)
        return run(job, on_step=lines.on_step, on_epoch=on_epoch)
    progress = bar(to, TextColumn("[bold]epoch {task.fields[epoch]}"), TextColumn("{task.fields[terms]}"))
    tasks: dict[int, int] = {}

    def on_step(info) -> None:
        if info.epoch not in tasks:
            tasks[info.epoch] = progress.add_task(
                "", total=steps, completed=info.step - 1, epoch=f"{info.epoch + 1}/{info.epochs}", terms=""
            )
        progress.update(tasks[info.epoch], completed=info.step, terms=_step_terms(info))

    with progress:
        return run(job, on_step=on_step, on_epoch=on_epoch)


def _print_result(result, as_json: bool) -> None:
    if as_json:
        print_json(result)
    if result.interrupted:
        err_console.print(
            f"[yellow]interrupted[/]: checkpoint saved in {result.out_dir}"
            f"; continue with --resume --out {result.out_dir}"
        )
        raise typer.Exit(130)
    if as_json:
        return
    table = Table(title="result")
    table.add_column("")
    table.add_column("top-1", justify="right")
    table.add_column("top-5", justify="right")
    table.add_column("FLOPs / dense", justify="right")
    if result.before is not None:
        before = result.before
        table.add_row(
            "before", f"{before['top1']:.4f}", f"{before['top5']:.4f}", f"{before.get('flops_ratio', 1.0):.4f}"
        )
    after = result.after.summary()
    table.add_row(
        "after",
        f"{after['top1']:.4f}",
        f"{after['top5']:.4f}",
        f"{after.get('flops_ratio', 1.0):.4f}" if "flops_ratio" in after else "1 (dense)",
    )
    console.print(table)
    if result.flops_ratio_of_architecture is not None:
        console.print(
            f"FLOPs {result.flops_ratio_of_architecture:.4f} of timm's full-width network "
            f"('dense' above is the slimmed start)"
        )
    console.print(f"wrote {', '.join(str(p) for p in result.files)} in {result.seconds:.0f} s")
    routed = result.after.flops.routed_channel_share() if result.after.flops is not None else None
    if routed is not None:
        # a trained model's gates often barely route (docs/results.md): then a static network is faster
        console.print(
            f"the gates route {routed:.1%} of their channels (kept for some test images, not others); "
            f"`manidp bench {result.out_dir}` times dynamic execution against the static export"
        )


@app.command()
def train(
    model: Annotated[
        Optional[str], typer.Argument(help="timm model name, e.g. resnet18 (with --resume: read from the checkpoint)")
    ] = None,
    recipe: RecipeOpt = None,
    data: DataOpt = None,
    img_size: ImgSizeOpt = None,
    workers: WorkersOpt = None,
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
    override: OverrideOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a dense starting point (plain cross-entropy) and export it as safetensors."""
    _train_or_prune(
        "train",
        model,
        recipe,
        weights,
        out,
        resume,
        as_json,
        override,
        data=data,
        img_size=img_size,
        workers=workers,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        optimizer={"lr": lr} if lr is not None else None,
        device=device,
        amp=amp,
        channels_last=channels_last,
    )


def _train_or_prune(command, model, recipe, weights, out, resume, as_json, pairs, **flags) -> None:
    from manidp_cli.api import prepare
    from manidp_cli.config import with_dotted_overrides

    to = err_console if as_json else console
    job = None
    overrides = with_dotted_overrides(flags, pairs or [])
    try:
        job = prepare(
            command, model, recipe_path=recipe, overrides=overrides, weights=weights, out_dir=out, resume=resume
        )
        _print_plan(job, to)
        result = _run_with_progress(job, to)
    except KeyboardInterrupt:  # before the first step, or a second Ctrl-C: say what is left
        _print_abort(job)
        raise typer.Exit(130) from None
    _print_result(result, as_json)


def _print_abort(job) -> None:
    if job is not None and job.checkpoint.is_file():
        err_console.print(
            f"interrupted: the last checkpoint (written at the end of an epoch) is kept in {job.out_dir}; "
            f"continue with --resume --out {job.out_dir}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    else:
        err_console.print(
            "interrupted before the first checkpoint: nothing to resume; run the command again to start over",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


@app.command()
def prune(
    model: Annotated[
        Optional[str], typer.Argument(help="timm model name, e.g. resnet34 (with --resume: read from the checkpoint)")
    ] = None,
    target_flops: Annotated[
        Optional[float], typer.Option("--target-flops", help="Fraction of dense FLOPs to keep on average, 0 < F < 1.")
    ] = None,
    recipe: RecipeOpt = None,
    data: DataOpt = None,
    img_size: ImgSizeOpt = None,
    workers: WorkersOpt = None,
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
    override: OverrideOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Insert ManiDP gates, fine-tune to a FLOPs target and export safetensors plus reports.

    Multi-process: torchrun --nproc_per_node N -m manidp_cli prune ... (see docs/distributed.md).
    """
    _train_or_prune(
        "prune",
        model,
        recipe,
        weights,
        out,
        resume,
        as_json,
        override,
        target_flops=target_flops,
        data=data,
        img_size=img_size,
        workers=workers,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        optimizer={"lr": lr} if lr is not None else None,
        device=device,
        amp=amp,
        channels_last=channels_last,
    )
