"""Progress display for long steps (rich), quiet when output is not a terminal; status lines (agents, what a
run waits for) under the bars."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from rich.console import RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

T = TypeVar("T")
R = TypeVar("R")


class _WithStatus(RichProgress):
    """Rich progress bars followed by free status lines."""

    status_lines: tuple[str, ...] = ()

    def get_renderables(self) -> Iterator[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for line in self.status_lines:
            yield Text(line, style="dim")


class Progress:
    """Spinner for single steps, bar with ETA for loops, status lines below them."""

    def __init__(self) -> None:
        self._p = _WithStatus(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=False,
        )

    def __enter__(self) -> Progress:
        self._p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._p.__exit__(*exc)

    def step(self, description: str, fn: Callable[..., R], *args: Any) -> R:
        """Run one step under a spinner."""
        task = self._p.add_task(description, total=1)
        result = fn(*args)
        self._p.update(task, completed=1)
        return result

    def each(self, description: str, items: Iterable[T], fn: Callable[[T], Any]) -> None:
        """Run ``fn`` on every item with a progress bar."""
        items = list(items)
        task = self._p.add_task(description, total=len(items))
        for item in items:
            fn(item)
            self._p.advance(task)

    def add(self, description: str, total: int) -> int:
        """A task to advance by hand; returns its id."""
        return int(self._p.add_task(description, total=total))

    def update(self, task: int, **kw: Any) -> None:
        """Update a task (completed=, description=, total=)."""
        self._p.update(task, **kw)  # type: ignore[arg-type]

    @property
    def is_terminal(self) -> bool:
        """Whether the display is live (a terminal); else the caller logs what changed."""
        return bool(self._p.console.is_terminal)

    def status(self, lines: Iterable[str]) -> None:
        """Replace the status lines shown under the bars."""
        self._p.status_lines = tuple(lines)
        self._p.refresh()
