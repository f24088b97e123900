"""Output in one place: the consoles, JSON for ``--json``, and one-line errors."""

from __future__ import annotations

import json
from typing import Any, Protocol

import typer
from rich.console import Console
from rich.text import Text

from manidp_cli.inputs import capped

console = Console()
err_console = Console(stderr=True)


class JsonResult(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def print_json(result: JsonResult) -> None:
    typer.echo(json.dumps(result.to_dict(), indent=2))


def one_line(message: object) -> str:
    """The message on one line, capped; the exception's type when the message is empty."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    return capped(text, 1000)


def print_error(message: str) -> None:
    text = Text("error:", style="bold red")
    text.append(" " + message)  # plain text: a user value such as "[/x]" is not Rich markup
    err_console.print(text, highlight=False, soft_wrap=True)
