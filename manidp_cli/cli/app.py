"""The ``manidp`` Typer application; each command group registers itself from its own module."""

from __future__ import annotations

import typer

from manidp_cli import __version__
from manidp_cli.cli.render import console

app = typer.Typer(
    name="manidp",
    help="Dynamic channel pruning (ManiDP) for timm CNNs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Dynamic channel pruning (ManiDP) for timm CNNs."""


@app.command()
def version() -> None:
    """Print the manidp version."""
    console.print(f"manidp {__version__}")
