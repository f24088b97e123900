"""Every file manidp writes goes through here: atomic replacement, checked output paths, run locks.

``atomic_write`` writes into a fresh temporary file beside the target (created exclusively, never
through a symbolic link), flushes it to disk and renames it over the target: a reader sees the old
file or the new one, never half of one. On any failure, a full disk included, the temporary file is
removed and the target is left as it was.

Example::

    atomic_write_text(Path("runs/x/recipe.yaml"), text)
    with run_folder_lock(Path("runs/x")):
        ...  # a second run on runs/x fails at once with OutputError
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from manidp_cli.errors import OutputError
from manidp_cli.inputs import capped, check_writable_folder, is_dir

LOCK_FILE = ".manidp.lock"
# what a manidp run or export folder holds; such files are never overwritten by another command
RUN_MARKERS = ("model.safetensors", "checkpoint.pt", "model.pt2")
RUN_FILES = (
    *RUN_MARKERS,
    "recipe.yaml",
    "metrics.jsonl",
    "report.json",
    "config.json",
    "manidp.json",
    "model_slim.safetensors",
    "model.onnx",
)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pt2", ".pth", ".ckpt", ".bin")
_NAMES = "|".join(re.escape(name) for name in RUN_FILES)
# ".NAME.<12 hex>.tmp" from atomic_write, and the fixed "NAME.tmp" of versions before it
_TEMPORARY = re.compile(rf"^(\.({_NAMES})\.[0-9a-f]{{12}}|({_NAMES}))\.tmp$")


def _open_temporary(folder: Path, name: str) -> tuple[int, Path]:
    """A new file beside the target with a name nobody can predict: O_EXCL refuses any existing
    path, a planted symbolic link included, and O_NOFOLLOW says so explicitly."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    while True:
        path = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder; the rename stands
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _write_error(path: Path, exc: OSError, outcome: str = "was not replaced") -> OutputError:
    reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return OutputError(f"cannot write {path}: {reason}; {path} {outcome}")


class _WriteErrors:
    """The file handed to a writer, remembering the OSError of a failed write: torch.save's zip
    writer turns a full disk into a RuntimeError ("unexpected pos ...") that no longer says so."""

    def __init__(self, handle: BinaryIO):
        self._handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self._handle, name)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Replace ``path`` by what ``write`` writes into the open binary file it is given."""
    path = Path(path)
    try:
        descriptor, temporary = _open_temporary(path.parent, path.name)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    watched = None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            watched = _WriteErrors(handle)
            write(watched)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as exc:  # Ctrl-C included: no temporary file may outlive the write
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        error = exc if isinstance(exc, OSError) else getattr(watched, "error", None)
        if error is not None:
            raise _write_error(path, error) from exc
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed run left in ``folder`` (call it holding the folder's
    lock: then no other run is writing one). Links are removed, never followed."""
    removed = []
    for entry in os.scandir(folder):
        if _TEMPORARY.match(entry.name) and (entry.is_symlink() or entry.is_file(follow_symlinks=False)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a manidp run or export (weights, a checkpoint or a static program)."""
    return any(os.path.lexists(folder / name) for name in RUN_MARKERS)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_new_folder(folder: Path, option: str, source: Path | None = None) -> Path:
    """Refuse an output folder that is a file, the ``source`` it is made from, or anything but empty
    (it would mix with, or destroy, what is there). Writes nothing."""

    folder = check_writable_folder(folder, option)  # a file, below a file, not writable
    if source is not None:
        source = Path(source).expanduser()
        if _same_path(folder, source if is_dir(source, "EXPORT") else source.parent):
            raise OutputError(f"{option} {capped(folder)} is the export being read; give a new folder")
    if os.path.islink(folder) and not is_dir(folder, option):
        raise OutputError(f"{option} {capped(folder)} is a dangling symbolic link; give a new folder")
    if is_dir(folder, option) and any(os.scandir(folder)):
        what = "a manidp run or export" if holds_run(folder) else "files"
        raise OutputError(f"{option} {capped(folder)} already holds {what}; give a new (or empty) folder")
    return folder


def check_output_file(path: Path, option: str) -> Path:
    """Refuse an output file that is a folder, has no folder to go in, holds weights, or would
    replace a file of a manidp run or export. Writes nothing."""

    path = Path(path).expanduser()
    if is_dir(path, option):
        raise OutputError(f"{option} {capped(path)} is a folder; give a file name, e.g. {capped(path / 'report.json')}")
    if not is_dir(path.parent, option):
        raise OutputError(f"{option} {capped(path)}: folder {capped(path.parent)} does not exist")
    if path.suffix in WEIGHT_SUFFIXES:
        raise OutputError(f"{option} {capped(path)} names a weights file; give a report file name (.json, .csv, .md)")
    if path.name in RUN_FILES and holds_run(path.parent):
        raise OutputError(
            f"{option} {capped(path)} would overwrite a file of the manidp run"
            f" in {capped(path.parent)}; give another file"
        )
    return path


def write_new_file(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Create ``path`` (which must not exist: never through a link) with what ``write`` writes."""
    with open(path, "xb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return path


@contextlib.contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """A temporary folder beside ``folder`` to write into; renamed to ``folder`` (which must be
    missing or empty) when the block ends without error, removed otherwise."""
    folder = Path(folder)
    stage = folder.parent / f".{folder.name}.{secrets.token_hex(6)}.tmp"
    try:
        try:
            stage.mkdir(parents=True)
        except OSError as exc:
            raise _write_error(folder, exc, "was not created") from exc
        try:
            yield stage
            _fsync_folder(stage)
        except OSError as exc:  # a full disk while writing the files
            raise _write_error(folder, exc, "was not created") from exc
        try:
            os.rename(stage, folder)  # atomic; refuses a folder that is no longer empty
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise OutputError(f"{folder} was filled by someone else meanwhile; nothing written to it") from exc
            raise _write_error(folder, exc, "was not created") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _fsync_folder(folder.parent)


def _lock_holder(handle: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f"pid {int(os.pread(handle, 32, 0).decode().strip())}"
    return "pid unknown"


def _open_lock(lock: Path) -> int:
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise OutputError(f"cannot lock {lock}: {exc.strerror or exc}") from exc


def _acquire(lock: Path) -> int:
    """The descriptor of ``lock``, flocked. The lock file is removed when a run ends; a run that
    opened it just before that holds a lock on a removed file, so it checks and opens it again."""
    while True:
        handle = _open_lock(lock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(handle)
            os.close(handle)
            raise OutputError(f"{lock.parent} is in use by another manidp run ({holder})") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(handle).st_ino:
                return handle
        os.close(handle)


@contextlib.contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` for a whole run; a second run on the same folder fails
    at once. The kernel releases a flock when its process dies, so a killed run leaves no stale
    lock (only the lock file, which the next run reuses)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc.strerror or exc}") from exc
    lock = folder / LOCK_FILE
    handle = _acquire(lock)
    try:
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # while still holding the lock: see _acquire
        os.close(handle)  # releases the lock
