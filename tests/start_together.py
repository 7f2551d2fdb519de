"""Run eclip commands in this process the moment the test says go, so that two processes begin
each command together (their imports, which take seconds, are done before the first go).

    python start_together.py FOLDER NAME '[["embed", ...], ["train", ...]]' [PRELOAD...]

Before command k it creates FOLDER/ready-k-NAME and waits for FOLDER/go-k; it writes each
command's exit code and stderr to FOLDER/result-NAME.json.
"""
import contextlib
import importlib
import io
import json
import os
import sys
import time
from pathlib import Path


def main():
    folder, name, commands = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    for module in sys.argv[4:]:
        importlib.import_module(module)
    from eclip.cli import app
    results = []
    for k, argv in enumerate(commands):
        (folder / f"ready-{k}-{name}").touch()
        while not (folder / f"go-{k}").exists():
            time.sleep(0.002)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                app(argv, prog_name="eclip")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except Exception as e:   # what `eclip` prints as an internal error
                code, _ = 1, err.write(f"eclip: internal error: {type(e).__name__}: {e}\n")
        results.append({"code": code, "stderr": err.getvalue()})
    (folder / f"result-{name}.json").write_text(json.dumps({"pid": os.getpid(), "results": results}))


if __name__ == "__main__":
    main()
