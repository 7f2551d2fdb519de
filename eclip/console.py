"""The only way library code talks to the terminal: stderr for progress and notes,
stdout left to results (tables, JSON) so shell pipelines stay clean."""
from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """A one-line remark for the user on stderr (never on stdout)."""
    if not os.environ.get("ECLIP_QUIET"):
        err.print(message)


def progress(*extra_columns, transient: bool = False) -> Progress:
    """A progress bar on stderr; `extra_columns` add live fields such as loss or items/s."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
        disable=bool(os.environ.get("ECLIP_QUIET")),
    )


def print_json(obj) -> None:
    """One JSON document on stdout, exactly as scripts expect (no rich markup)."""
    import json
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()
