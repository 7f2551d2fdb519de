"""Output that is not a terminal (a log file, CI, a pipe) gets whole lines: no wrapping at 80
columns inside words or table cells, no carriage-return progress bars, no bars cut short."""
import os
import subprocess
import sys

SCRIPT = r'''
import time
from rich.table import Table
from eclip.console import note, out, progress
note("validation " + " ".join(f"word{i}" for i in range(40)) + " best so far")
table = Table(title="eclip train", show_header=False)
table.add_row("best checkpoint", "/a/rather/long/path/" + "x" * 90 + "/best.safetensors")
out.print(table)
with progress() as bar:
    task = bar.add_task("embedding images", total=3)
    for _ in range(3):
        bar.advance(task)
'''


def _run(env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "ECLIP_QUIET")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, env=env)


def test_notes_and_tables_keep_whole_lines_when_not_a_terminal():
    result = _run()
    assert result.returncode == 0, result.stderr
    long_note = [line for line in result.stderr.splitlines() if line.startswith("validation ")]
    assert len(long_note) == 1 and long_note[0].endswith("word39 best so far"), result.stderr
    row = [line for line in result.stdout.splitlines() if "best checkpoint" in line]
    assert len(row) == 1 and "x" * 90 + "/best.safetensors" in row[0], result.stdout


def test_progress_is_plain_lines_without_carriage_returns_when_not_a_terminal():
    result = _run()
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    assert "━" not in result.stderr                               # no bar drawn into the log
    last = [line for line in result.stderr.splitlines() if line.startswith("embedding images")]
    assert last and "3/3" in last[-1], result.stderr


def test_quiet_still_silences_progress_and_notes():
    result = _run({"ECLIP_QUIET": "1"})
    assert result.stderr == "", result.stderr
