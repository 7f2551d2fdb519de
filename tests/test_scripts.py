"""scripts/test.sh as CI runs it: pytest's closing summary line must reach the log."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_test_script_prints_the_pytest_summary_line(tmp_path):
    script = (REPO / "scripts" / "test.sh").read_text()
    line = next(l for l in script.splitlines() if "-m pytest" in l)
    flags = [f for f in line.split("-m pytest", 1)[1].split() if f != '"$@"']
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    out = subprocess.run([sys.executable, "-m", "pytest", *flags, "-c", str(REPO / "pyproject.toml"),
                          "--rootdir", str(REPO), str(tmp_path / "test_one.py")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"^1 passed in [\d.]+s", out.stdout, re.M), out.stdout
