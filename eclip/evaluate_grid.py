"""Many models x many datasets, one table: what `eclip evaluate --checkpoint A --checkpoint B
--dataset X --dataset Y` runs, as CLIP_benchmark's results table does.

    grid = evaluate_grid([ModelSpec(checkpoint="a.safetensors"), ModelSpec(checkpoint="b.safetensors")],
                         [("n24news", "test"), ("goodnews", "test")], data_root=None)
    write_grid("results.csv", grid)

Each model is loaded once and embeds each (dataset, split) cell once; with `features_dir` each
cell's features are kept under features_dir/<model>/<dataset-split>/ and reused by the next run
(eclip.features_cache). Every cell's full report (the one `eclip evaluate` gives for one model
and one split) is kept in the grid's JSON.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Optional, Sequence

from eclip.errors import EclipError

TASKS = ("retrieval", "classify")
RETRIEVAL_COLUMNS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "rsum")
CLASSIFY_COLUMNS = ("top1", "top5", "mean_per_class_recall")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise EclipError(f"--task {task}: one of {', '.join(TASKS)}")
    return task


def model_specs(model, pretrained, checkpoints: Sequence, device=None, precision="fp32", seed=None) -> list:
    """One ModelSpec per --checkpoint, plus one for --model / --pretrained when either is given
    (e.g. the zero-shot baseline) or no checkpoint is; EclipError on a model named twice."""
    from eclip.config import ModelSpec
    precision = getattr(precision, "value", precision)
    specs, seen = [], {}
    for c in checkpoints or []:
        key = os.path.realpath(str(c))
        if key in seen:
            raise EclipError(f"--checkpoint {c}: listed twice (as {seen[key]}); each model once")
        seen[key] = str(c)
        specs.append(ModelSpec(checkpoint=str(c), device=device, precision=precision, seed=seed))
    if model is not None or pretrained is not None or not specs:
        specs.append(ModelSpec(model=model, pretrained=pretrained, device=device, precision=precision, seed=seed))
    return specs


def dataset_cells(datasets: Sequence[str], splits: Sequence[str]) -> list[tuple[str, Optional[str]]]:
    """(dataset, split) of every cell: each benchmark on every split, each .jsonl / .csv file once
    (a file has no split); EclipError on a cell named twice."""
    from eclip.data.benchmarks import BENCHMARKS
    cells, seen = [], set()
    for d in datasets:
        is_benchmark = str(d).lower() in BENCHMARKS
        for s in (splits if is_benchmark else [None]):
            key = (str(d).lower(), s) if is_benchmark else (os.path.realpath(str(d)), None)
            if key in seen:
                raise EclipError(f"--dataset {d}{' --split ' + s if s else ''}: listed twice; each dataset once")
            seen.add(key)
            cells.append((str(d), s))
    return cells


def read_cells(cells, data_root, image_folder, options, columns=None, protocol=None) -> dict:
    """Every cell's records (cheap: no image is opened); for classification, their labels checked."""
    from eclip.data.readers import read_dataset
    records = {}
    for dataset, split in cells:
        records[(dataset, split)] = read_dataset(dataset, data_root, split or "test", image_folder=image_folder,
                                                  columns=columns, protocol=protocol)
        if options is not None:
            from eclip.classify import check_labels, split_reader
            check_labels(records[(dataset, split)], dataset, split, options,
                         split_reader(dataset, data_root, image_folder))
    return records


def model_label(spec) -> str:
    """How a model is named in the table: its checkpoint path, else model (+ pretrained)."""
    if spec.checkpoint:
        return str(spec.checkpoint)
    from eclip.config import DEFAULT_MODEL, DEFAULT_PRETRAINED
    model = spec.model or DEFAULT_MODEL
    pretrained = spec.pretrained if spec.pretrained is not None else (DEFAULT_PRETRAINED if spec.model is None
                                                                      else None)
    return f"{model} ({pretrained})" if pretrained else model


def cell_label(cell) -> str:
    dataset, split = cell
    from eclip.data.benchmarks import BENCHMARKS
    name = dataset.lower() if dataset.lower() in BENCHMARKS else Path(dataset).name
    return f"{name}/{split}" if split else name


def evaluate_grid(specs, cells, *, task: str = "retrieval", data_root=None, image_folder=None,
                  recall_k=(1, 5, 10), same_image: str = "bytes", batch_size: int = 64, classify_options=None,
                  features_dir=None, records: Optional[dict] = None, dump_dir=None) -> dict:
    """Evaluate every model on every cell -> {"task", "models": [label], "datasets": [label],
    "columns": [metric], "results": [[report per cell] per model]}. `records` may give a cell's
    records already read ({cell: [Record]}); with `dump_dir`, each retrieval cell's rank dump goes
    to dump_path(dump_dir, model index, cell index) (what the report reads)."""
    from eclip.console import err
    from eclip.model.factory import load_model
    check_task(task)
    records = records or {}
    results = []
    for m, spec in enumerate(specs):
        model = load_model(spec)
        row = []
        for d, cell in enumerate(cells):
            dataset, split = cell
            err.print(f"[dim]{model_label(spec)} on {cell_label(cell)} ({m + 1}/{len(specs)})[/dim]")
            folder = None if features_dir is None else Path(features_dir) / _slug(model_label(spec)) / _slug(cell_label(cell))
            if task == "retrieval":
                from eclip.evaluate import evaluate
                row.append(evaluate(spec, dataset, data_root, split or "test", recall_k=recall_k,
                                    batch_size=batch_size, model=model, records=records.get(cell),
                                    image_folder=image_folder, same_image=same_image, features_dir=folder,
                                    dump_ranks=None if dump_dir is None else dump_path(dump_dir, m, d)))
            else:
                from eclip.classify import classify
                row.append(classify(spec, dataset, data_root, split or "test", options=classify_options,
                                    model=model, records=records.get(cell), image_folder=image_folder,
                                    features_dir=folder))
        results.append(row)
        del model
    return {"task": task, "models": [model_label(s) for s in specs], "datasets": [cell_label(c) for c in cells],
            "columns": list(RETRIEVAL_COLUMNS if task == "retrieval" else CLASSIFY_COLUMNS), "results": results}


def dump_path(folder, model_index: int, cell_index: int) -> Path:
    return Path(folder) / f"ranks-{model_index}-{cell_index}.jsonl"


def _slug(text: str) -> str:
    """A folder name for a model or cell label: readable part + a short hash (labels may be paths)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(text.rstrip("/")) or text)[:60]
    return f"{readable}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"


def cell_value(report: dict, column: str):
    """One number of a cell's report, by table column name."""
    if column.startswith(("t2i_", "i2t_")):
        direction = "text_to_image" if column.startswith("t2i_") else "image_to_text"
        return report[direction].get(column[4:])
    return report.get(column)


def grid_rows(grid: dict) -> tuple[list, list]:
    """(header, rows) of the flat table: model, then "<dataset> <metric>" for every cell and metric."""
    header = ["model"] + [f"{d} {c}" for d in grid["datasets"] for c in grid["columns"]]
    rows = [[name] + [cell_value(cell, c) for cell in row for c in grid["columns"]]
            for name, row in zip(grid["models"], grid["results"])]
    return header, rows


def write_grid(path, grid: dict) -> None:
    """--output: CSV when FILE ends in .csv, else JSON (every cell's full report); atomic."""
    import json

    from eclip.atomic import write_text
    if str(path).lower().endswith(".csv"):
        import csv
        import io
        header, rows = grid_rows(grid)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([[("" if v is None else v) for v in row] for row in rows])
        write_text(path, buffer.getvalue())
    else:
        write_text(path, json.dumps(grid, indent=2, ensure_ascii=False) + "\n")


def grid_table(grid: dict):
    """A rich Table: a row per model, a column group per dataset (its name over its metrics)."""
    from rich.table import Table
    what = "retrieval" if grid["task"] == "retrieval" else "classification"
    table = Table(title=f"{what}: {len(grid['models'])} model(s) x {len(grid['datasets'])} dataset(s)")
    table.add_column("model")
    for d in grid["datasets"]:
        for i, c in enumerate(grid["columns"]):
            table.add_column(f"{d}\n{c}" if i == 0 else f"\n{c}", justify="right")
    _, rows = grid_rows(grid)
    for row in rows:
        table.add_row(row[0], *("-" if v is None else f"{v:.2f}" for v in row[1:]))
    return table
