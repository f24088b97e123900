"""The ``manidp`` command: parse, call one library function, print. No method logic lives here."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from manidp_cli import __version__

app = typer.Typer(
    name="manidp",
    help="Dynamic channel pruning (ManiDP) for timm CNNs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Dynamic channel pruning (ManiDP) for timm CNNs."""


@app.command()
def version() -> None:
    """Print the manidp version."""
    console.print(f"manidp {__version__}")


def main() -> None:
    """Entry point: library errors about user input become one line on stderr and exit code 2."""
    from manidp_cli.errors import ManidpError

    try:
        app()
    except ManidpError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
