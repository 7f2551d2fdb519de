"""The only way library code talks to the terminal: stderr for progress and notes,
stdout left to results (tables, JSON) so shell pipelines stay clean.

When a stream is not a terminal (a log file, CI, a pipe) nothing is wrapped at 80 columns and
no live bar is drawn: each line keeps its full width, and progress becomes a plain line now and
then (PROGRESS_EVERY seconds) and once at the end.
"""
from __future__ import annotations

import os
import sys
import time

from rich.console import Console, ConsoleDimensions
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

PLAIN_WIDTH = 10_000      # "unlimited": rich wraps nothing and tables take their natural width
PROGRESS_EVERY = 30.0     # seconds between two plain progress lines


class _Console(Console):
    """A rich Console that is as wide as its lines when its stream is not a terminal."""

    def _size(self) -> ConsoleDimensions:
        if self.is_terminal or self._width is not None:
            return Console.size.fget(self)
        return ConsoleDimensions(PLAIN_WIDTH, Console.size.fget(self).height)

    size = property(_size, Console.size.fset)


err = _Console(stderr=True, highlight=False)
out = _Console(highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """A one-line remark for the user on stderr (never on stdout)."""
    if not os.environ.get("ECLIP_QUIET"):
        err.print(message)


class LogProgress(Progress):
    """rich's Progress for a stream that is not a terminal: no live display and no carriage
    returns; a task's columns (without the bar) as one plain line every `every` seconds and
    when the progress stops."""

    def __init__(self, *columns, every: float = PROGRESS_EVERY, **kwargs):
        super().__init__(*columns, auto_refresh=False, **kwargs)
        self.every = every
        self._printed: dict = {}   # task id -> (time of the last line, completed then)

    def start(self) -> None:
        now = time.monotonic()
        self._printed = {task.id: (now, task.completed) for task in self.tasks}

    def stop(self) -> None:
        for task in self.tasks:
            if self._printed.get(task.id, (0, None))[1] != task.completed:
                self._print(task)

    def add_task(self, *args, **kwargs):
        task_id = super().add_task(*args, **kwargs)
        self._printed[task_id] = (time.monotonic(), self._task(task_id).completed)
        return task_id

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_print(task_id)

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._maybe_print(task_id)

    def refresh(self) -> None:
        pass

    def _maybe_print(self, task_id) -> None:
        if time.monotonic() - self._printed.get(task_id, (0.0, None))[0] >= self.every:
            self._print(self._task(task_id))

    def _task(self, task_id):
        return next(task for task in self.tasks if task.id == task_id)

    def _print(self, task) -> None:
        self._printed[task.id] = (time.monotonic(), task.completed)
        if self.disable:
            return
        parts = []
        for column in self.columns:
            if isinstance(column, BarColumn):
                continue
            rendered = column.render(task) if not isinstance(column, str) else Text(column.format(task=task))
            parts.append(rendered.plain if isinstance(rendered, Text) else str(rendered))
        self.console.print(" ".join(p for p in parts if p), markup=False, highlight=False)


def progress(*extra_columns, transient: bool = False) -> Progress:
    """A progress bar on stderr; `extra_columns` add live fields such as loss or items/s.
    Not a terminal: plain lines instead (LogProgress)."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra_columns,
               TimeElapsedColumn(), TimeRemainingColumn())
    disable = bool(os.environ.get("ECLIP_QUIET"))
    if not err.is_terminal:
        return LogProgress(*columns, console=err, disable=disable)
    return Progress(*columns, console=err, transient=transient, disable=disable)


def stderr_is_terminal() -> bool:
    """Whether progress may be drawn with carriage returns (third-party bars such as tqdm's)."""
    return err.is_terminal


def print_json(obj) -> None:
    """One JSON document on stdout, exactly as scripts expect (no rich markup)."""
    import json
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()
