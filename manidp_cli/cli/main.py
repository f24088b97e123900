"""Entry point. A user error (``ManidpError``: bad input) is one line on stderr and exit code 2;
anything else is a bug and keeps its traceback (exit code 1). ``MANIDP_DEBUG=1`` shows the
traceback of a user error too."""

from __future__ import annotations

import os
import sys
import traceback
from importlib import import_module

import typer

from manidp_cli.cli.app import app
from manidp_cli.cli.render import console, err_console, one_line, print_error
from manidp_cli.errors import ManidpError

try:  # recent Typer ships its own copy of Click, whose exceptions are these
    from typer._click import exceptions as click_errors
except ImportError:  # older Typer runs on Click itself
    from click import exceptions as click_errors

DEBUG_VARIABLE = "MANIDP_DEBUG"

# Each module registers its commands on the app when imported; this order is `manidp --help`'s.
COMMAND_MODULES = ("train", "evaluate", "report", "deploy")
for _module in COMMAND_MODULES:
    import_module(f"manidp_cli.cli.{_module}")


def _debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def main() -> None:
    """Run the command line; exits with the command's code."""
    if os.environ.get("RANK", "0") != "0":
        console.quiet = True  # under torchrun only rank 0 prints; errors still reach stderr
    try:
        code = app(standalone_mode=False)  # Click's own error boxes are replaced by one line below
    except ManidpError as exc:
        if _debugging():
            err_console.print(traceback.format_exc(), highlight=False, markup=False, soft_wrap=True)
        print_error(one_line(exc))
        sys.exit(2)
    except click_errors.NoArgsIsHelpError as exc:  # Typer's Rich help is printed as it is built
        if exc.format_message():
            console.print(exc.format_message(), markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except click_errors.UsageError as exc:  # a bad flag or value: --epochs 0, --target-flops abc
        command = exc.ctx.command_path if exc.ctx is not None else "manidp"
        print_error(f"{one_line(exc.format_message())} (see `{command} --help`)")
        sys.exit(exc.exit_code)
    except click_errors.ClickException as exc:
        print_error(one_line(exc.format_message()))
        sys.exit(exc.exit_code)
    except typer.Abort:  # end of input at a prompt
        print_error("aborted")
        sys.exit(1)
    except Exception:  # not the user's input: a bug, reported with everything needed to fix it
        err_console.print(traceback.format_exc(), highlight=False, markup=False, soft_wrap=True)
        print_error("internal error: this is a bug in manidp; please report it with the traceback above")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # without standalone mode Click returns exit codes
