"""``manidp eval``: accuracy and measured dynamic FLOPs of an export or a dense baseline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from manidp_cli.cli.app import app
from manidp_cli.cli.options import DataOpt, ImgSizeOpt, JsonOpt, MeasureDeviceOpt, MeasureWorkersOpt, WeightsOpt
from manidp_cli.cli.progress import task_progress
from manidp_cli.cli.render import console, err_console, print_json
from manidp_cli.errors import ManidpError
from manidp_cli.inputs import DEFAULT_WORKERS

if TYPE_CHECKING:
    from manidp_cli.api import CascadeResult, DynamicExecution, EvalResult


def _print_eval(result: EvalResult) -> None:
    flops = result.flops
    console.print(f"[bold]{result.model}[/] from {result.source}")
    console.print(f"data: {result.data.description} (evaluation split, from {result.data.given_by})")
    console.print(f"input: {'x'.join(map(str, result.input_shape))}")
    table = Table(show_header=False, box=None)
    table.add_row("images", str(result.images))
    table.add_row("top-1 / top-5", f"{result.top1:.4f} / {result.top5:.4f}")
    table.add_row("mean loss", f"{result.loss:.4f}")
    table.add_row("dense", f"{flops.dense / 1e9:.4f} GFLOPs per image")
    table.add_row("dynamic mean", f"{flops.mean / 1e9:.4f} GFLOPs per image = {flops.ratio('mean'):.4f} of dense")
    for key in ("median", "p10", "p90", "min", "max"):
        table.add_row(f"dynamic {key}", f"{getattr(flops, key) / 1e9:.4f} GFLOPs = {flops.ratio(key):.4f} of dense")
    if result.architecture_dense_flops is not None:
        table.add_row(
            "of the architecture",
            f"mean {result.mean_ratio_of_architecture:.4f} of timm's full-width network "
            f"({result.architecture_dense_flops / 1e9:.4f} GFLOPs; 'dense' above is the slimmed start)",
        )
    if flops.routed_channel_share is not None:
        table.add_row(
            "routed channels",
            f"{flops.routed_channel_share:.1%} of the gated channels change with the image (near 0: a static mask)",
        )
    signature = result.signature
    if signature is not None:
        table.add_row(
            "Spearman(loss, FLOPs)",
            _correlation(signature.spearman_loss_flops, "every image gets the same FLOPs")
            + " (complexity: > 0 means hard images get more)",
        )
        table.add_row(
            "Gram correlation",
            _correlation(signature.gram_correlation, "constant saliencies")
            + f" (similarity: features vs sub-networks, {signature.gram_batches} batches)",
        )
    if result.dynamic_execution is not None:
        _add_dynamic_rows(table, result.dynamic_execution)
    console.print(table)
    console.print(result.flops_convention)


def _correlation(value: float | None, why_undefined: str) -> str:
    return f"{value:+.3f}" if value is not None else f"undefined: {why_undefined}"


def _add_dynamic_rows(table: Table, fast: DynamicExecution) -> None:
    kind = "gather-free, codebook" if fast.codebook else "per-image gathers"
    decisions = fast.decisions
    table.add_row(
        "dynamic executor", f"top-1 {fast.top1:.4f} / top-5 {fast.top5:.4f} ({kind}, batch 1, {fast.images} images)"
    )
    table.add_row(
        "  vs masked model",
        f"same prediction for {fast.prediction_agreement:.2%}; "
        f"largest logit difference {fast.max_logit_difference:.1e}",
    )
    every = decisions.images_agreeing / decisions.images if decisions.images else 1.0
    table.add_row(
        "  decisions",
        f"{decisions.rate:.2%} of {decisions.decisions} (image, layer) decisions equal; "
        f"every decision equal for {every:.2%} of images; diverging at near-ties: "
        f"{decisions.images_at_near_ties}, unexplained: {decisions.images_unexplained}",
    )


def _print_cascade(result: CascadeResult) -> None:
    console.print(f"[bold]{result.model}[/]: {result.narrow.source} escalating to {result.wide.source}")
    console.print(f"data: {result.data.description} (evaluation split, from {result.data.given_by})")
    table = Table(show_header=False, box=None)
    table.add_row("images", str(result.images))
    for name, member in (("narrow alone", result.narrow), ("wide alone", result.wide)):
        table.add_row(name, f"top-1 {member.top1:.4f} at {member.flops_ratio:.4f} of the full-width network's FLOPs")
    if result.wide.top1 <= result.narrow.top1:
        # e.g. a long fine-tune makes the pruned export more accurate than the start it came from
        table.add_row("note", "the wide member is no more accurate than the narrow one alone: escalating cannot help")
    cascade = result.cascade
    table.add_row(
        "cascade",
        f"top-1 {cascade.top1:.4f} at {result.flops_ratio:.4f} (target {result.target_flops}); "
        f"{cascade.escalated_share:.1%} of the images escalated",
    )
    if cascade.cross_fitted:
        table.add_row("", "cross-fitted: each half of the images judged by a threshold fitted on the other half")
        fitted = "fitted on every image; manidp_cli.runtime.cascade.Cascade runs it"
    else:
        table.add_row("", "the saved threshold, not refitted: optimistic on the images it was fitted on")
        fitted = "saved in the cascade file; manidp_cli.load_cascade runs it"
    if cascade.spearman_loss_flops is not None:
        table.add_row("spearman", f"{cascade.spearman_loss_flops:+.3f} between per-image loss and per-image FLOPs")
    table.add_row(
        "threshold",
        f"{cascade.threshold:.6f}: escalate when the narrow export's top softmax probability is below it ({fitted})",
    )
    if result.saved_to is not None:
        table.add_row("saved", f"{result.saved_to}: both exports and the threshold in one file")
    console.print(table)
    console.print(result.flops_convention)


def _evaluate_cascade(export: Path | None, escalate_to: Path | None, to_start: bool, target_flops: float | None, **run):
    from manidp_cli.api import START, evaluate_cascade_exports

    if escalate_to is not None and to_start:
        raise ManidpError("give --escalate-to WIDE_EXPORT or --escalate-to-start, not both")
    if export is None or (escalate_to is None and not to_start) or target_flops is None:
        raise ManidpError(
            "a cascade needs an EXPORT, --escalate-to WIDE_EXPORT (or --escalate-to-start) and --target-flops F "
            "together"
        )
    return evaluate_cascade_exports(export, START if to_start else escalate_to, target_flops, **run)


def _check_modes(export: Path | None, dense: str | None, data: str | None, cascade: bool, dynamic: bool) -> bool:
    """Refuse combinations eval cannot measure; whether EXPORT is a saved cascade file."""
    from manidp_cli.api import is_cascade

    if dense is None and export is None:
        raise ManidpError("give an EXPORT folder, or --dense MODEL --weights FILE --data SPEC")
    if dense is not None and (data is None or cascade):
        raise ManidpError("--dense needs --data, and takes no --escalate-to, --target-flops or --save-cascade")
    if cascade and dynamic:
        raise ManidpError("--dynamic times one export; leave it out with --escalate-to")
    saved = dense is None and is_cascade(export)
    if saved and (cascade or dynamic):
        raise ManidpError(
            f"{export} is a saved cascade: eval takes it alone (no --escalate-to, --target-flops, --save-cascade "
            "or --dynamic)"
        )
    return saved


@app.command("eval")
def eval_command(
    export: Annotated[
        Optional[Path],
        typer.Argument(help="Export folder or its model.safetensors, or a cascade file (--save-cascade)."),
    ] = None,
    data: DataOpt = None,
    dense: Annotated[
        Optional[str], typer.Option("--dense", help="Evaluate this timm model unpruned instead (baseline row).")
    ] = None,
    weights: WeightsOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 256,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluate the first N images only.")] = None,
    dynamic: Annotated[
        bool,
        typer.Option(
            "--dynamic",
            help="Also run every image alone through the dynamic executor (what `manidp bench` times) "
            "and report its accuracy.",
        ),
    ] = False,
    escalate_to: Annotated[
        Optional[Path],
        typer.Option(
            "--escalate-to",
            help="A wider export of the same network: images the EXPORT is unsure of are answered by it "
            "(a cascade; needs --target-flops).",
        ),
    ] = None,
    escalate_to_start: Annotated[
        bool,
        typer.Option(
            "--escalate-to-start",
            help="Escalate to the dense network the EXPORT was pruned from, as its metadata records it "
            "(its --weights file, unchanged since, or timm's pretrained weights for the same classes).",
        ),
    ] = False,
    target_flops: Annotated[
        Optional[float],
        typer.Option(
            "--target-flops",
            help="With --escalate-to: the cascade's mean FLOPs, a share of the full-width network's.",
        ),
    ] = None,
    save_cascade: Annotated[
        Optional[Path],
        typer.Option(
            "--save-cascade",
            help="With --escalate-to: write both exports and the fitted threshold to this new file "
            "(manidp eval FILE measures it, manidp_cli.load_cascade runs it).",
        ),
    ] = None,
    img_size: ImgSizeOpt = None,
    workers: MeasureWorkersOpt = DEFAULT_WORKERS,
    device: MeasureDeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Measure accuracy and real dynamic FLOPs of an export, a saved cascade, or a dense baseline."""
    from manidp_cli.api import evaluate_cascade_file, evaluate_dense, evaluate_export

    cascade = escalate_to is not None or escalate_to_start or target_flops is not None or save_cascade is not None
    saved = _check_modes(export, dense, data, cascade, dynamic)
    with task_progress(err_console) as on_progress:  # stderr: stdout holds the result alone
        run = {"img_size": img_size, "workers": workers, "device": device, "on_progress": on_progress}
        if dense is not None:
            result = evaluate_dense(dense, weights, data, batch_size, limit, **run)
        elif saved:
            result = evaluate_cascade_file(export, data, batch_size, limit, **run)
        elif cascade:
            run.update(data=data, batch_size=batch_size, limit=limit, save_to=save_cascade)
            result = _evaluate_cascade(export, escalate_to, escalate_to_start, target_flops, **run)
        else:
            result = evaluate_export(export, data, batch_size, limit, dynamic=dynamic, **run)
    if as_json:
        print_json(result)
    elif cascade or saved:
        _print_cascade(result)
    else:
        _print_eval(result)
