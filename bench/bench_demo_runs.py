"""Time per step of the demo's two training runs with and without the options that change no weight.

The demo trains EntityCLIP and `--no-experts` at once, one torch thread and one loading worker each,
on 38-step epochs. Its between-step work (validating, saving 90 MB of locked MiniLM twice,
decoding and tokenizing every pair again) is a large share of such short epochs. This runs both
pairs of runs back to back on the same data, each pair as the demo runs them:

  baseline   validation every 5 epochs (as the demo did before), a save and a fresh decode every epoch
  demo       the demo's `--save-frequency 5 --data-cache-mb 256` on top

and prints each run's steady time per step (after its first epoch, which fills the caches) and the
ratio demo / baseline, then checks that both pairs ended with the same weights, tensor for tensor.

  python bench/bench_demo_runs.py [--epochs 10] [--output bench-out/demo-runs]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def steady_ms_per_step(log: Path) -> float:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    first = [r for r in train if r["epoch"] == 1][-1]
    return 1000 * (train[-1]["elapsed_s"] - first["elapsed_s"]) / (train[-1]["step"] - first["step"])


def main(argv=None) -> int:
    import demo
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--output", default="bench-out/demo-runs")
    args = ap.parse_args(argv)
    out = Path(args.output).resolve()
    settings = {**demo.settings(), "epochs": args.epochs}
    data = out / "data"
    if not (data / "test.jsonl").is_file():
        from eclip.data.demo_set import build_demo_set
        build_demo_set(data, n_flags=settings["n_flags"], views_per_entity=settings["views"], include_optional=False)
    baseline_only = {"--save-frequency": "1", "--data-cache-mb": "0"}
    figures = {}
    for variant in ("baseline", "demo"):
        runs = {}
        for name, no_experts in demo.MODELS.items():
            run = out / variant / ("clip" if no_experts else "entityclip")
            shutil.rmtree(run, ignore_errors=True)
            argv_ = demo.train_args(settings, data, run, no_experts=no_experts,
                                    explanations=None if no_experts else str(demo.SHIPPED))
            if variant == "baseline":
                for flag, value in baseline_only.items():
                    argv_[argv_.index(flag) + 1] = value
            runs[f"{variant} {name}"] = (argv_, run)
        started = time.perf_counter()
        demo.train_runs(runs, 2)
        print(f"{variant}: both runs in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        for name, (_, run) in runs.items():
            figures[name] = (steady_ms_per_step(run / "log.jsonl"), run)
    import torch
    from safetensors.torch import load_file
    print(f"| run ({args.epochs} epochs of the demo set, two at once) | baseline ms/step | demo ms/step | ratio |")
    print("| --- | --- | --- | --- |")
    same = True
    for name in demo.MODELS:
        (b, brun), (d, drun) = figures[f"baseline {name}"], figures[f"demo {name}"]
        print(f"| {name} | {b:.1f} | {d:.1f} | {d / b:.2f}x |")
        x, y = load_file(str(brun / "last.safetensors")), load_file(str(drun / "last.safetensors"))
        same &= x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    print(f"same weights with and without the options: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
