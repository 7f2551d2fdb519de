"""The writer lock: held by the process that took it, never by the processes it forks (data-loading
workers), so a killed run's folder is free at once even while its workers linger."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eclip.errors import EclipError
from eclip.lock import lock_file, lock_folder

ROOT = Path(__file__).parent.parent

HOLDER = """
import os, sys, time
from eclip.lock import lock_folder
lock = lock_folder(sys.argv[1])
child = os.fork()                 # as a DataLoader worker is made: fork without exec
if child == 0:
    time.sleep(60)
    os._exit(0)
open(sys.argv[2], "w").write(str(child))
time.sleep(60)
"""


def test_a_killed_holder_frees_the_folder_while_its_forked_children_live(tmp_path):
    folder, child_file = tmp_path / "run", tmp_path / "child.pid"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(child_file)], env=env)
    deadline = time.monotonic() + 60
    while not (child_file.is_file() and child_file.read_text()):
        assert holder.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    child = int(child_file.read_text())
    try:
        with pytest.raises(EclipError, match=f"another eclip process \\(pid {holder.pid}\\)"):
            lock_folder(folder)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)                                   # the forked child still runs ...
        lock_folder(folder).release()                       # ... and the folder is free
    finally:
        os.kill(child, signal.SIGKILL)
        holder.kill()


def test_one_process_cannot_take_its_own_lock_twice(tmp_path):
    first = lock_file(tmp_path / "c.jsonl")
    try:
        with pytest.raises(EclipError, match=f"{tmp_path / 'c.jsonl'}: another eclip process \\(pid {os.getpid()}\\)"):
            lock_file(tmp_path / "c.jsonl")
    finally:
        first.release()
    lock_file(tmp_path / "c.jsonl").release()               # released: free again
