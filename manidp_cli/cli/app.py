"""The ``manidp`` Typer application; each command group registers itself from its own module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import typer

from manidp_cli import __version__
from manidp_cli.cli.options import JsonOpt
from manidp_cli.cli.render import console, print_json

app = typer.Typer(
    name="manidp",
    help="Dynamic channel pruning (ManiDP) for timm CNNs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"manidp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Dynamic channel pruning (ManiDP) for timm CNNs."""


@app.command()
def version(as_json: JsonOpt = False) -> None:
    """Print the manidp version."""
    if as_json:
        print_json(VersionInfo(__version__))
        return
    console.print(f"manidp {__version__}")


@dataclass(frozen=True)
class VersionInfo:
    version: str

    def to_dict(self) -> dict[str, str]:
        return {"version": self.version}
