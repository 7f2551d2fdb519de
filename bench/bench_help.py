"""`eclip --help` wall time against `python -c "import open_clip"`, measured in the same run.

Goal (issue: core): `eclip --help` and `eclip SUBCOMMAND --help` under 0.5 s on a 2-core machine,
which is only possible if they never import torch / open_clip. Prints medians and the ratio.
Run: python bench/bench_help.py [--repeat 5]
"""
import argparse
import shutil
import statistics
import subprocess
import sys
import time


def wall(cmd, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    eclip = shutil.which("eclip") or sys.exit("eclip is not on PATH: pip install -e . first")
    baseline = wall([sys.executable, "-c", "import open_clip"], args.repeat)
    print(f"{'command':40s} {'median s':>9s} {'min':>7s} {'max':>7s} {'ratio':>7s}")
    base_name = 'python -c "import open_clip"'
    print(f"{base_name:40s} {baseline[0]:9.3f} {baseline[1]:7.3f} {baseline[2]:7.3f} {1.0:7.3f}")
    for sub in ([], ["train"], ["embed"], ["match"], ["evaluate"], ["explain"]):
        med, lo, hi = wall([eclip, *sub, "--help"], args.repeat)
        name = " ".join(["eclip", *sub, "--help"])
        flag = "" if med < 0.5 else "  (over the 0.5 s goal)"
        print(f"{name:40s} {med:9.3f} {lo:7.3f} {hi:7.3f} {med / baseline[0]:7.3f}{flag}")


if __name__ == "__main__":
    main()
