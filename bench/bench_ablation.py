"""Ablation on the demo's entity set: does EntityCLIP beat plain CLIP fine-tuning here, and what does
it owe to its explanations and to each loss term?

    python bench/bench_ablation.py                    # the README's table: 3 seeds x 6 trained rows
    python bench/bench_ablation.py --quick            # 12 flags + 8 photos, 2 epochs, 2 seeds: a smoke run
    python bench/bench_ablation.py --demo-rows        # only the demo's rows: the seed spread it prints
    python bench/bench_ablation.py --demo-rows --split val --seeds 42,43 --set lr=0.004 --output bench-out/sweep-lr4
                                                      # a settings sweep: figures on the validation split only

Rows: the untrained model; plain CLIP fine-tuning (--no-experts); EntityCLIP with (a) the embedded
LLM's explanations (the cache examples/explanations/ ships, written by `eclip explain`), (b) the
caption as its own explanation, (c) appearance explanations that say what each entity looks like
(examples/appearance.py: flag colours and layout derived from the pixels, the photographs' from their
sources); and EntityCLIP with (a) and eta = 0 (no GI-ITM), and with (a) and lambda = 0 (no VTC on
V*, T*). Every trained row uses the demo's model, steps, batch, learning rate, augmentation and
the same seeds; only the row's own change differs. Each run is the `eclip train` command the demo
prints (examples/demo.py, train_args), --jobs of them at once, one torch thread each. Reported: mean
and sample standard deviation over seeds of test text->image R@1, image->text R@1 and rsum of the
last checkpoint (the demo's fixed budget), and text->image R@1 of the checkpoint with the best
validation rsum (what `eclip train` saves as best.safetensors); and per seed, the demo's step 5 on
the last checkpoint: how many named photographs rank their true caption first, on the test views
and on the val views (so a photograph missed on test can be told from a pattern validation shows).

The demo's two rows per seed go to examples/ablation-spread.json (examples/seed_spread.py), which the
demo reads to say whether its own run's gap lies inside the seed spread.

Results are appended to OUTPUT/results.jsonl as each run finishes; a re-run skips what is there
(and resumes a run that was killed half-way).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

ROWS = {   # name -> what differs from the demo's EntityCLIP run (None: not trained)
    "untrained (random init)": None,
    "CLIP fine-tuned (--no-experts)": {"no_experts": True},
    "EntityCLIP (a) LLM explanations": {"explanations": "llm"},
    "EntityCLIP (b) caption as explanation": {"explanations": None},
    "EntityCLIP (c) appearance explanations": {"explanations": "appearance"},
    "EntityCLIP (a), eta = 0": {"explanations": "llm", "eta": 0.0},
    "EntityCLIP (a), lambda = 0": {"explanations": "llm", "lam": 0.0},
    "EntityCLIP (a), --negatives reference": {"explanations": "llm", "negatives": "reference"},
}

DEMO_ROWS = ("untrained (random init)", "CLIP fine-tuned (--no-experts)", "EntityCLIP (a) LLM explanations")


def main(argv=None) -> int:
    import demo   # examples/demo.py: the settings this table explains
    from seed_spread import SPREAD_FILE, write_spread

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="bench-out/ablation", help="folder for data, runs and results")
    ap.add_argument("--seeds", default=None, help="comma-separated (default: 42,43,44; --quick: 42,43)")
    ap.add_argument("--quick", action="store_true", help="a few flags, 2 epochs, 2 seeds")
    ap.add_argument("--scratch", action="store_true", help="the demo's --scratch model (both towers from random weights)")
    ap.add_argument("--demo-rows", action="store_true",
                    help="only the rows the demo shows (untrained, --no-experts, EntityCLIP (a)): its seed spread")
    ap.add_argument("--rows", default=None, help="only the rows whose names contain one of these comma-separated "
                                                  "words (e.g. 'LLM explanations,negatives reference')")
    ap.add_argument("--split", choices=("test", "val"), default="test",
                    help="the split every figure is measured on: val when choosing settings (the test split unseen)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change one of the demo's settings (lr, epochs, batch_size, weight_decay, warmup_steps, "
                         "views), e.g. --set lr=0.004; repeatable")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="training runs at once, one core each (default: 2, or 1 on one core)")
    args = ap.parse_args(argv)
    demo_settings = demo.settings(args.quick, args.scratch)
    settings = {**demo_settings, **_changes(args.set, demo_settings)}
    seeds = [int(s) for s in (args.seeds or ("42,43" if args.quick else "42,43,44")).split(",")]
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), os.getloadavg()

    import torch

    from eclip.data.demo_set import build_demo_set
    data = out / "data"
    demo.forget_other_settings(out, settings, made=("data", "runs", "results.jsonl", "appearance.jsonl"))
    if not (data / "test.jsonl").is_file():
        build_demo_set(data, n_flags=settings["n_flags"], views_per_entity=settings["views"], include_optional=False)
    import appearance
    caches = {"llm": str(demo.SHIPPED), "appearance": str(out / "appearance.jsonl")}
    appearance.write_cache(data / "train.jsonl", caches["appearance"])

    results_file = out / "results.jsonl"
    done = {(r["row"], r["seed"]) for r in _read(results_file)}
    lock = threading.Lock()

    def record(row, seed, metrics, seconds):
        line = {"row": row, "seed": seed, "seconds": round(seconds, 1), **metrics}
        with lock, open(results_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        print(f"{row} seed {seed}: T->I R@1 {metrics['t2i_r1']:.1f}, rsum {metrics['rsum']:.1f}",
              file=sys.stderr, flush=True)

    torch.set_num_threads(1)
    jobs, row_seed = {}, {}      # progress-bar name -> (eclip train arguments, run dir); -> (row, seed)
    wanted = [w.strip().lower() for w in args.rows.split(",")] if args.rows else None
    for seed in seeds:
        for row, change in ROWS.items():
            if (row, seed) in done or args.demo_rows and row not in DEMO_ROWS \
                    or wanted and not any(w in row.lower() for w in wanted):
                continue
            if change is None:
                t0 = time.perf_counter()
                record(row, seed, untrained(data, seed, settings, args.split), time.perf_counter() - t0)
                continue
            explanations = change.get("explanations")
            run, name = out / "runs" / f"{_slug(row)}-{seed}", f"{row} | seed {seed}"
            jobs[name] = (demo.train_args(settings, data, run, seed=seed, no_experts=change.get("no_experts", False),
                                          explanations=caches[explanations] if explanations else None,
                                          eta=change.get("eta"), lam=change.get("lam"),
                                          negatives=change.get("negatives")), run)
            row_seed[name] = (row, seed)

    def finished(name, summary):
        row, seed = row_seed[name]
        with lock:
            metrics = trained(data, summary, args.split)
        record(row, seed, metrics, summary.get("elapsed_s") or 0.0)

    if jobs:
        demo.train_runs(jobs, max(1, args.jobs), done=finished)
    if args.split == "test":     # (the photographs' figures include the test views)
        backfill(results_file, lambda r: demo.photos_first(data, str(out / "runs" / f"{_slug(r['row'])}-{r['seed']}"
                                                                      / "last.safetensors")))

    rows = [r for r in _read(results_file) if r["seed"] in seeds]
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
               f"{torch.__version__}, {args.jobs} runs at once with one torch thread each; load average "
               f"{load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    flags = "".join(f" --{name}" for name in ("scratch", "demo-rows") if getattr(args, name.replace("-", "_")))
    flags += "".join(f" --set {c}" for c in args.set) + (" --split val" if args.split == "val" else "")
    flags += f" --rows '{args.rows}'" if args.rows else ""
    print(table(rows, seeds, settings, machine, time.perf_counter() - started, args.quick, flags, args.split))
    # the demo's two rows per seed, which examples/demo.py prints its own run beside (--quick or other
    # settings: kept in OUTPUT; a validation sweep: none, the spread is of test figures)
    if args.split != "test":
        return 0
    own = args.quick or settings != demo_settings
    spread = write_spread(out / SPREAD_FILE.name if own else SPREAD_FILE, rows, settings, seeds, machine)
    print(f"seed spread for the demo: {'written' if spread else 'not written (rows missing)'}", file=sys.stderr)
    return 0


def _changes(pairs: list, settings: dict) -> dict:
    """--set KEY=VALUE pairs as settings, each value of its setting's type."""
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in settings or key in ("model", "lock_text", "n_flags"):
            raise SystemExit(f"--set {pair}: expected KEY=VALUE with KEY one of lr, epochs, batch_size, "
                             f"weight_decay, warmup_steps, views, live")
        changes[key] = type(settings[key])(value) if settings[key] is not None else value
    return changes


def untrained(data: Path, seed: int, settings: dict, split: str = "test") -> dict:
    """The untrained row: the demo's model config, random weights from `seed`, on the split."""
    import demo
    from eclip.evaluate import evaluate
    from eclip.model.factory import load_model
    model = load_model(model=str(demo.HERE / settings["model"]), pretrained="none",
                       device="cpu", seed=seed)
    result = evaluate(dataset=str(data / f"{split}.jsonl"), model=model)
    return {**_metrics(result), "best_t2i_r1": result["text_to_image"]["R@1"]}


def trained(data: Path, summary: dict, split: str = "test") -> dict:
    """A trained row: its last checkpoint (and, for one column, its best-validation one) on the split."""
    import demo
    from eclip.config import ModelSpec
    from eclip.evaluate import evaluate
    test = str(data / f"{split}.jsonl")
    last = evaluate(ModelSpec(checkpoint=summary["last_checkpoint"], device="cpu"), dataset=test)
    best = evaluate(ModelSpec(checkpoint=summary["best_checkpoint"], device="cpu"), dataset=test)
    return {**_metrics(last), "best_t2i_r1": best["text_to_image"]["R@1"], "best_epoch": summary.get("best_epoch"),
            **(demo.photos_first(data, summary["last_checkpoint"]) if split == "test" else {})}


def backfill(results_file: Path, photos_first) -> int:
    """Results recorded before the photographs column: add it from the run's last checkpoint
    (`photos_first(record)`), rewriting the file whole. Returns how many records gained it."""
    from eclip.atomic import write_text
    records = _read(results_file)
    missing = [r for r in records if ROWS.get(r["row"]) is not None and "photos_first_test" not in r]
    for r in missing:
        r.update(photos_first(r))
    if missing:
        write_text(results_file, "".join(json.dumps(r) + "\n" for r in records))
    return len(missing)


def _metrics(result: dict) -> dict:
    return {"t2i_r1": result["text_to_image"]["R@1"], "i2t_r1": result["image_to_text"]["R@1"],
            "rsum": result["rsum"], "n_images": result["n_images"]}


def table(rows: list, seeds: list, settings: dict, machine: str, seconds: float, quick: bool, flags: str = "",
          split: str = "test") -> str:
    """The markdown table for the README."""
    import demo
    n = rows[0]["n_images"] if rows else 0
    lines = [f"{split.capitalize()} split of the demo set: {n} images and captions (chance R@1 = {100 / max(n, 1):.1f}%). "
             f"Mean ± standard deviation over seeds {', '.join(map(str, seeds))}; every trained row: "
             f"{_model_words(settings)}, {settings['views'] - 2} training views per entity, "
             f"{settings['epochs']} epochs of batch "
             f"{settings['batch_size']}, lr {settings['lr']} (warm-up {settings['warmup_steps']} steps, cosine), "
             f"weight decay {settings['weight_decay']}, --augment, 2/2/2 experts; the last checkpoint, and in "
             f"the last column the one with the best validation rsum (validated every {demo.VAL_FREQUENCY} epochs "
             f"and at the last). Photographs first: the demo's step 5 "
             f"per seed, on the test views (and, in brackets, the val views): how many of the named photographs "
             f"rank their true caption first among that split's photographs' captions.",
             "",
             "| row | T→I R@1 | I→T R@1 | rsum | T→I R@1 per seed | photographs first per seed | T→I R@1, best val |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ROWS:
        mine = sorted((r for r in rows if r["row"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        cells = [_mean_sd([r[k] for r in mine]) for k in ("t2i_r1", "i2t_r1", "rsum")]
        per_seed = ", ".join(f"{r['t2i_r1']:.1f}" for r in mine)
        photos = ", ".join(f"{r['photos_first_test']} ({r['photos_first_val']})" for r in mine
                           if "photos_first_test" in r)
        photos += f" of {mine[0]['n_photos']}" if photos else ""
        lines.append(f"| {name} | {' | '.join(cells)} | {per_seed} | {photos} | "
                     f"{_mean_sd([r['best_t2i_r1'] for r in mine])} |")
    command = "python bench/bench_ablation.py" + (" --quick" if quick else "") + flags
    lines += ["", f"`{command}`: {seconds / 60:.0f} min on {machine}."]
    return "\n".join(lines)


def _model_words(settings: dict) -> str:
    model = f"examples/{settings['model']}"
    return (f"{model} (text tower pretrained and locked, the rest from random weights)" if settings.get("lock_text")
            else f"{model} from random weights")


def _mean_sd(values: list) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _read(path: Path) -> list:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
