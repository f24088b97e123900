"""Progress of long loops, told to the caller's callback: the library never prints.

Example::

    def show(update: ProgressUpdate) -> None:
        print(f"{update.task} {update.done}/{update.total} {update.unit}")

    for x, y in reported(data.eval.batches(256), "evaluating", data.eval.num_batches(256), show):
        ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ProgressUpdate:
    """``done`` of the ``total`` units of ``task`` are finished (0: the task starts now)."""

    task: str
    done: int
    total: int
    unit: str = "batches"


ProgressCallback = Callable[[ProgressUpdate], None]


def reported(
    items: Iterable[T], task: str, total: int, on_progress: ProgressCallback | None, unit: str = "batches"
) -> Iterator[T]:
    """``items`` unchanged; ``on_progress`` hears of the start and of each item the consumer has
    finished with (it is told when the consumer asks for the next one)."""
    if on_progress is None:
        yield from items
        return
    on_progress(ProgressUpdate(task, 0, total, unit))
    for done, item in enumerate(items, start=1):
        yield item
        on_progress(ProgressUpdate(task, done, total, unit))
