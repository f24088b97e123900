"""The ``manidp`` command line: a thin layer over ``manidp_cli.api``."""

from manidp_cli.cli.app import app
from manidp_cli.cli.main import main

__all__ = ["app", "main"]
