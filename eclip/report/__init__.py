"""`eclip evaluate --report DIR`: a self-contained HTML page of one evaluation."""
from __future__ import annotations

from pathlib import Path

from eclip.errors import EclipError


def check_report_dir(folder) -> Path:
    """The report goes into a new or empty folder: EclipError when it is a file or holds anything."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise EclipError(f"--report {folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise EclipError(f"--report {folder}: the folder exists and is not empty; give a new or empty folder")
    return folder
