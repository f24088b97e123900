"""Progress on the console: a rich bar on a terminal, plain flushed lines where the output is a log
(nohup, SLURM, CI), where a bar prints nothing until the end.

``train``/``prune`` show their steps with these pieces (cli/train.py); ``eval``, ``report``,
``export-static`` and ``bench`` show the library's ``ProgressUpdate``s through ``task_progress``.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from manidp_cli.api import ProgressUpdate


def log_line(to: Console, line: str) -> None:
    """One plain line, flushed at once: a log read while the run goes on must be current."""
    to.print(line, highlight=False, markup=False, soft_wrap=True)
    to.file.flush()


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def line_every(total: int) -> int:
    """Log a line every tenth of a loop, and at least every 50 steps of a long one."""
    return max(1, min(50, total // 10))


def bar(to: Console, label: TextColumn, *extra: TextColumn, **options) -> Progress:
    """The bar every command shows: its label, done / total, elapsed and remaining time; ``options``
    go to rich's ``Progress``."""
    columns = (label, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), *extra)
    return Progress(*columns, console=to, **options)


class _TaskLines:
    """``ProgressUpdate``s as plain lines: one every ``line_every`` units of a task and at its end,
    with the rate and the time left, e.g. ``evaluating 40/79 batches, 3.1 batches/s, 0:00:12 left``."""

    def __init__(self, to: Console):
        self.to = to
        self.started: dict[str, tuple[float, int]] = {}  # task -> (time, units done) when first heard of

    def __call__(self, update: ProgressUpdate) -> None:
        now = time.perf_counter()
        if update.task not in self.started or update.done == 0:
            self.started[update.task] = (now, update.done)
            if update.done == 0:
                return
        if update.done % line_every(update.total) and update.done != update.total:
            return
        since, first = self.started[update.task]
        rate = (update.done - first) / max(now - since, 1e-9)
        left = (update.total - update.done) / rate if rate > 0 else 0.0
        log_line(
            self.to,
            f"{update.task} {update.done}/{update.total} {update.unit}, {rate:.3g} {update.unit}/s, {clock(left)} left",
        )


@contextlib.contextmanager
def task_progress(to: Console) -> Iterator[Callable[[ProgressUpdate], None]]:
    """A callback that shows the library's ``ProgressUpdate``s on ``to``: a bar per task on a
    terminal (removed when done: the result follows), plain lines otherwise.

    The bar is redrawn from the callback, at most ten times a second, not by rich's refresh thread:
    ``bench`` times the calls between two updates, and a thread drawing meanwhile would be timed too."""
    if not to.is_terminal:
        yield _TaskLines(to)
        return
    progress = bar(to, TextColumn("{task.description}"), transient=True, auto_refresh=False)
    tasks: dict[str, int] = {}
    drawn = [0.0]  # when the bar was last drawn

    def on_progress(update: ProgressUpdate) -> None:
        if update.task not in tasks:
            tasks[update.task] = progress.add_task(update.task, total=update.total)
        progress.update(tasks[update.task], completed=update.done, total=update.total)
        now = time.perf_counter()
        if now - drawn[0] >= 0.1 or update.done == update.total:
            drawn[0] = now
            progress.refresh()

    with progress:
        yield on_progress
