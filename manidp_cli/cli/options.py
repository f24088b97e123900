"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from manidp_cli.inputs import DEFAULT_WORKERS, IMAGE_SIZE_RANGE

RecipeOpt = Annotated[Optional[Path], typer.Option("--recipe", help="Recipe YAML (see recipes/); flags override it.")]
DataOpt = Annotated[
    Optional[str],
    typer.Option("--data", help="embedded | fashion-mnist[:DIR] | cifar10:DIR | cifar100:DIR | imagefolder:DIR"),
]
ImgSizeOpt = Annotated[
    Optional[int],
    typer.Option(
        "--img-size",
        min=IMAGE_SIZE_RANGE[0],
        max=IMAGE_SIZE_RANGE[1],
        help="Image side in px [default: an export's own size; for image folders the model's pretrained_cfg; "
        "otherwise the data's native size].",
    ),
]
_WORKERS_HELP = "Loader processes for image folders; in-memory data ignores it"
WorkersOpt = Annotated[
    Optional[int],
    typer.Option("--workers", "-j", min=0, help=f"{_WORKERS_HELP} [default: the recipe's, {DEFAULT_WORKERS}]."),
]
MeasureWorkersOpt = Annotated[int, typer.Option("--workers", "-j", min=0, help=f"{_WORKERS_HELP}.")]
WeightsOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--weights",
        help="Starting weights: .safetensors, a torch file (read with weights_only=True), or a folder holding "
        "model.safetensors (a train export, a timm or hub folder).",
    ),
]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Output folder [default: runs/<command>-<model>].")]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", min=1)]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", min=1)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in --out from its checkpoint.")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Initial learning rate.")]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help="auto | cpu | cuda (under torchrun: the local GPU).")
]
MeasureDeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")]
AmpOpt = Annotated[
    Optional[bool], typer.Option("--amp/--no-amp", help="bf16 autocast for the forward pass (loss terms stay fp32).")
]
ChannelsLastOpt = Annotated[
    Optional[bool], typer.Option("--channels-last/--no-channels-last", help="channels-last memory layout.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only JSON on stdout; progress and notices go to stderr.")]
OverrideOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--override", "-o", help="KEY=VALUE for any recipe setting, dotted (-o loss.lambda_sim=0.2); repeatable."
    ),
]
