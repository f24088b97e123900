"""Checks on what the user gives, shared by every command: paths that the system can look up,
output folders that can be written, and values short enough to echo in an error message.

Each check raises a ``ManidpError`` subclass (one line, exit code 2) instead of letting ``OSError``
or an empty exception message reach the user as a traceback.

Example::

    if is_file(weights, "weights file"):   # ManidpError for a 300-character file name
        ...
    raise DataError(f"unknown data specification {capped(spec)}")
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from manidp_cli.errors import ManidpError

ECHO_LIMIT = 200  # characters of a user value quoted in an error message
# --img-size, in pixels per side: most CNNs still run at 8 px; above 4096 a typo (22400) would
# allocate gigabytes per image before anything failed
IMAGE_SIZE_RANGE = (8, 4096)
DEFAULT_WORKERS = 2  # loader processes for image folders (timm's -j): enough to feed a CPU run on 2 cores


def capped(value: object, limit: int = ECHO_LIMIT) -> str:
    """``str(value)`` cut to ``limit`` characters: an error must never echo a huge input (a YAML
    alias bomb expands to megabytes, a garbage file name can be kilobytes)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def exception_text(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, capped; its type name when the message is
    empty (torch raises a bare ``EOFError()`` for a zero-byte file)."""
    for line in str(exc).splitlines():
        if line.strip():
            return capped(line.strip(), 2 * ECHO_LIMIT)
    return type(exc).__name__


def _lookup(path: Path, what: str) -> os.stat_result | None:
    """``stat`` of ``path``, None when it does not exist; ManidpError when the system refuses to
    look it up (name too long, permission denied, a NUL byte)."""
    try:
        return Path(path).expanduser().stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ManidpError(f"{what} {capped(path)}: {exc.strerror or exception_text(exc)}") from None
    except ValueError as exc:  # "embedded null byte"
        raise ManidpError(f"{what} {capped(repr(str(path)))}: {exception_text(exc)}") from None


def is_file(path: Path, what: str) -> bool:
    found = _lookup(path, what)
    return found is not None and stat.S_ISREG(found.st_mode)


def is_dir(path: Path, what: str) -> bool:
    found = _lookup(path, what)
    return found is not None and stat.S_ISDIR(found.st_mode)


def exists(path: Path, what: str) -> bool:
    return _lookup(path, what) is not None


def check_writable_folder(folder: Path, option: str = "--out") -> Path:
    """Refuse an output folder that is a file, lies below a file, or cannot be written, before
    anything is built, trained or written (a run that fails there has wasted its work)."""
    folder = Path(folder).expanduser()
    found = _lookup(folder, option)
    if found is not None and not stat.S_ISDIR(found.st_mode):
        raise ManidpError(f"{option} {capped(folder)} is a file, not a folder")
    existing = folder
    while found is None:  # the folder would be created inside its nearest existing ancestor
        existing = existing.parent
        found = _lookup(existing, option)
        if found is not None and not stat.S_ISDIR(found.st_mode):
            raise ManidpError(f"{option} {capped(folder)}: {capped(existing)} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ManidpError(f"{option} {capped(folder)}: {capped(existing)} is not writable")
    return folder
