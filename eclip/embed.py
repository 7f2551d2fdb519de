"""`eclip embed`: images and captions to L2-normalised vectors in a resumable sharded folder
(layout: eclip.embedstore).

Throughput: DataLoader workers decode and preprocess images while the model runs, on ONNX Runtime
(fp32 on the CPU) or torch (eclip.runtime.engine.load_encoder); the device comes from accelerate
(Accelerator().device) and --precision is autocast. Under `torchrun` /
`accelerate launch` shard k goes to process k % world_size, so every input is embedded exactly
once; process 0 writes the whole tables and the manifest after a barrier.
"""
from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from eclip import clip_retrieval
from eclip.embedstore import COLUMNS, DTYPES, ERRORS, check_identity, finalize, finished_files, \
    leftover_temp_files, our_files, plan_shards, stored_identity, write_shard
from eclip.errors import EclipError, json_problem
from eclip.lock import lock_folder
from eclip.model.text_limit import count_long
from eclip.match import IMAGE_EXTENSIONS

DEFAULT_SHARD_SIZE = 4096
DEFAULT_BATCH_SIZE = 64
LIST_SUFFIXES = {".txt", ".lst", ".list"}
LAYOUTS = ("eclip", clip_retrieval.LAYOUT)


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cpus)


# ---- inputs -------------------------------------------------------------------------------

def image_inputs(arg: str) -> list[dict]:
    """--images DIR | GLOB | LIST.txt | one image file -> [{"id", "path"}] (id = the absolute path).

    DIR: image files below it (by extension, hidden entries skipped), sorted. GLOB: every
    matching file ("**" recurses), sorted. LIST.txt: one path per line in the list's order,
    relative paths taken from the list file's folder, blank and '#' lines skipped.
    """
    path = Path(arg).expanduser()
    if path.is_dir():
        paths = []
        for folder, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            paths += [os.path.join(folder, f) for f in files
                      if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        paths, empty = sorted(os.path.abspath(p) for p in paths), "no image files in this folder"
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        from eclip.data.readers import read_lines
        lines = [line.strip() for _, line in read_lines(path)]
        paths = [os.path.abspath(path.parent / Path(line).expanduser())
                 for line in lines if line and not line.startswith("#")]
        empty = "the list names no files"
    elif path.is_file():
        paths, empty = [os.path.abspath(path)], ""
    elif any(c in arg for c in "*?["):
        paths = sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(arg), recursive=True)
                       if os.path.isfile(p))
        empty = "no files match this pattern"
    else:
        raise EclipError(f"--images {arg}: no such folder, file or matching files")
    if not paths:
        raise EclipError(f"--images {arg}: {empty}")
    return [{"id": p, "path": p} for p in paths]


def text_inputs(arg) -> list[dict]:
    """--texts FILE.txt (one caption per line; id = line number) or FILE.jsonl ({"text" or "caption",
    optional "id" (default: line number), optional "entities"}) -> [{"id", "text", "entities"}]."""
    path = Path(arg).expanduser()
    if not path.is_file():
        raise EclipError(f"--texts {arg}: no such file")
    from eclip.data.readers import read_lines
    items = []
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    for number, line in read_lines(path):
        if not line.strip():
            continue
        if not jsonl:
            items.append({"id": str(number), "text": line, "entities": "[]", "image": ""})
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise EclipError(f"{path} line {number}: invalid JSON ({json_problem(e)})") from None
        text = d.get("text", d.get("caption")) if isinstance(d, dict) else None
        if not isinstance(text, str):
            raise EclipError(f"{path} line {number}: needs a \"text\" (or \"caption\") string")
        entities = d.get("entities") or []
        items.append({"id": str(d.get("id", number)), "text": text,
                      "entities": json.dumps(entities, ensure_ascii=False), "image": ""})
    if not items:
        raise EclipError(f"--texts {arg}: no captions in this file")
    return items


def dataset_inputs(dataset: str, data_root=None, split: str = "test",
                   image_folder: str | None = None, columns=None, records=None) -> tuple[list[dict], list[dict]]:
    """One image row per image file (in the order records first name it; id = its path, as with
    --images) and one text row per record with the record id and its image's path (the ground
    truth evaluate --embeddings rebuilds)."""
    from eclip.data.readers import read_dataset
    if records is None:
        records = read_dataset(dataset, data_root, split, image_folder=image_folder, columns=columns)
    if not records:
        raise EclipError(f"--dataset {dataset}: no records in split {split}")
    images = [{"id": path, "path": path} for path in dict.fromkeys(r.image for r in records)]
    texts = [{"id": r.id, "text": r.caption, "entities": json.dumps(r.entities, ensure_ascii=False),
              "image": r.image} for r in records]
    return images, texts


def _image_fingerprint(item: dict) -> str:
    """What resume compares: the id, the path and the file's size and modification time."""
    try:
        from eclip.data.members import container_of
        st = os.stat(container_of(item["path"]) or item["path"])   # a tar member: its shard's file
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = "missing"
    return f"{item['id']}\0{item['path']}\0{stamp}"


def _text_fingerprint(item: dict) -> str:
    return f"{item['id']}\0{item['text']}\0{item['entities']}\0{item['image']}"


# ---- the run ----------------------------------------------------------------------------

def embed(spec, output, *, images=None, texts=None, dataset=None, data_root=None, split: str = "test",
          dtype: str = "fp16", shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = DEFAULT_BATCH_SIZE,
          workers: int | None = None, overwrite: bool = False, layout: str = "eclip",
          engine: str | None = None, image_folder: str | None = None, columns=None,
          shard_range: str | None = None) -> dict:
    """Embed images and/or captions into OUTPUT, in eclip's own layout (eclip.embedstore) or
    clip-retrieval's (eclip.clip_retrieval). Re-running resumes.

    Returns a summary: counts, shards written / reused, seconds and images/s of this process.
    """
    if layout not in LAYOUTS:
        raise EclipError(f"--format {layout}: one of {', '.join(LAYOUTS)}")
    if dtype not in DTYPES:
        raise EclipError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    if shard_size < 1 or batch_size < 1:
        raise EclipError("--shard-size and --batch-size must be at least 1")
    if workers is not None and workers < 0:
        raise EclipError(f"--workers {workers}: must be 0 or more")
    if dataset and (images or texts):
        raise EclipError("--dataset cannot be combined with --images / --texts")
    if not (dataset or images or texts):
        raise EclipError("nothing to embed: give --images, --texts or --dataset")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise EclipError(f"--output {output}: exists and is not a folder")

    partitions, read_errors = None, []
    if shard_range and not dataset:
        raise EclipError("--shards selects input webdataset shards of --dataset")
    if dataset:
        from eclip.data.sources import check_source
        records = None
        if check_source(dataset) == "shards":   # one output partition per input shard (eclip.data.shards)
            from eclip.data.shards import read_shards
            records = read_shards(dataset, columns, shard_range)
            read_errors = [s.to_log() for s in records.skipped]
            if layout != "eclip" and shard_range:
                raise EclipError("--shards writes eclip's layout (one partition per input shard); drop --format")
        elif shard_range:
            raise EclipError(f"--shards {shard_range}: --dataset {dataset} is not webdataset shards")
        image_items, text_items = dataset_inputs(dataset, data_root, split, image_folder, columns, records)
        if records is not None and layout == "eclip":
            partitions = {"images": records.partitions(image_items, "path"),
                          "texts": records.partitions(text_items, "image")}
        from eclip.data.readers import dataset_label
        name, named_split = dataset_label(dataset, split)
        source = {"dataset": name, "split": named_split, "data_root": str(data_root) if data_root else None}
    else:
        image_items = image_inputs(str(images)) if images else []
        text_items = text_inputs(texts) if texts else []
        source = {"images": str(images) if images else None, "texts": str(texts) if texts else None}
    pairs = None
    if layout == clip_retrieval.LAYOUT:   # before the model: the inputs must make rows of pairs
        pairs = clip_retrieval.samples(image_items, text_items, paired=bool(dataset))

    truncated = count_long(item["text"] for item in text_items)   # cut to MAX_TEXT_CHARS when tokenized
    started = time.perf_counter()
    accelerator = _accelerator(spec.device)
    # one writer per folder: the main process holds its lock for the whole run
    lock = lock_folder(output) if accelerator.is_main_process else None
    try:
        summary = _embed(spec, output, accelerator, started, image_items, text_items, pairs, source, dtype,
                         shard_size, batch_size, workers, overwrite, engine, partitions, read_errors)
        summary["texts_truncated"] = truncated
        return summary
    finally:
        if lock is not None:
            lock.release()


def _embed(spec, output, accelerator, started, image_items, text_items, pairs, source, dtype, shard_size,
           batch_size, workers, overwrite, engine=None, partitions=None, read_errors=()) -> dict:
    layout = "eclip" if pairs is None else clip_retrieval.LAYOUT
    there = clip_retrieval.layout_of(output) if output.is_dir() else None
    if there not in (None, layout) and not overwrite:
        raise EclipError(f"--output {output}: holds embeddings in the {there} layout, not {layout}; give another "
                         f"folder, or --overwrite to replace them")
    rank, world = accelerator.process_index, accelerator.num_processes
    device = spec.device if (spec.device and world == 1) else str(accelerator.device)
    from eclip.runtime.engine import load_encoder
    model = load_encoder(_with_device(spec, device), engine, throughput=True)   # ONNX Runtime or torch
    identity = model.identity()
    loaded = time.perf_counter()

    output.mkdir(parents=True, exist_ok=True)
    existing = stored_identity(output)
    if existing is not None and not overwrite:
        check_identity(existing, identity, f"--output {output}")   # another model's vectors: refuse
    if accelerator.is_main_process:
        stale = leftover_temp_files(output) + clip_retrieval.leftover_temp_files(output)
        if overwrite:
            stale += our_files(output) + clip_retrieval.our_files(output)
        for path in stale:
            path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    summary = {"output": str(output), "layout": layout, "rank": rank, "world_size": world, "written": 0,
               "reused": 0, "seconds": {"load": loaded - started}}
    run = _Run(model, output, identity, dtype, batch_size,
               default_workers() if workers is None else workers, accelerator.is_main_process)
    if pairs is not None:
        _embed_pairs(run, accelerator, pairs, shard_size, summary, model_spec=_recorded_spec(spec), source=source)
    else:
        _embed_own(run, accelerator, image_items, text_items, shard_size, summary, _recorded_spec(spec), source,
                   partitions, read_errors)
    summary["seconds"]["total"] = time.perf_counter() - started
    return summary


def _embed_pairs(run, accelerator, pairs, shard_size, summary, model_spec, source) -> None:
    """--format clip-retrieval: partitions of samples (eclip.clip_retrieval)."""
    samples_, kinds = pairs
    output, rank = run.output, accelerator.process_index
    shards = clip_retrieval.plan(samples_, kinds, shard_size, accelerator.num_processes, run.identity, run.dtype)
    digits = clip_retrieval.width(shards)
    mine = [s for s in shards if s.rank == rank]
    todo = [s for s in mine if not clip_retrieval.finished(output, s, digits, kinds)]
    summary.update(written=len(todo), reused=len(mine) - len(todo))
    t0 = time.perf_counter()
    done = clip_retrieval.embed_partitions(run, output, samples_, todo, digits, kinds)
    seconds = time.perf_counter() - t0
    summary["seconds"]["samples"] = seconds
    summary.update(samples_embedded=done, samples_per_s=done / seconds if seconds > 0 and done else None)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        manifest = clip_retrieval.finalize(output, shards, digits, kinds, run.identity,
                                           dim=run.model.dim, dtype=run.dtype,
                                           model_spec=model_spec, source=source)
        summary.update({"images": manifest["count"] if "images" in kinds else 0, "errors": manifest["errors"],
                        "texts": manifest["count"] if "texts" in kinds else 0,
                        "manifest": str(output / "manifest.json"), "errors_file": str(output / ERRORS)})
    accelerator.wait_for_everyone()


def _embed_own(run, accelerator, image_items, text_items, shard_size, summary, model_spec, source,
               partitions=None, read_errors=()) -> None:
    """eclip's own layout (eclip.embedstore): image shards and text shards."""
    output, rank, world = run.output, accelerator.process_index, accelerator.num_processes
    identity, dtype = run.identity, run.dtype
    plans = {}
    if image_items:
        plans["images"] = plan_shards("images", image_items, shard_size, world, identity, dtype, _image_fingerprint,
                                      (partitions or {}).get("images"))
    if text_items:
        plans["texts"] = plan_shards("texts", text_items, shard_size, world, identity, dtype, _text_fingerprint,
                                     (partitions or {}).get("texts"))
    for kind, items in (("images", image_items), ("texts", text_items)):
        if kind not in plans:
            continue
        mine = [s for s in plans[kind] if s.rank == rank]
        todo = [s for s in mine if finished_files(output, s) is None]
        summary["reused"] += len(mine) - len(todo)
        summary["written"] += len(todo)
        t0 = time.perf_counter()
        done = run.images(items, todo) if kind == "images" else run.texts(items, todo)
        seconds = time.perf_counter() - t0
        summary["seconds"][kind] = seconds
        summary[f"{kind}_embedded"] = done
        summary[f"{kind}_per_s"] = done / seconds if seconds > 0 and done else None

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        manifest = finalize(output, plans, identity, dim=run.model.dim, dtype=dtype,
                            model_spec=model_spec, source=source, read_errors=read_errors)
        summary.update({"images": (manifest["images"] or {}).get("count", 0),
                        "errors": (manifest["images"] or {}).get("errors", 0),
                        "texts": (manifest["texts"] or {}).get("count", 0),
                        "manifest": str(output / "manifest.json"), "errors_file": str(output / ERRORS)})
    accelerator.wait_for_everyone()


def _accelerator(device):
    """accelerate's process state: device, rank, world size, barrier (no mixed-precision state:
    --precision is autocast here, and an Accelerator made earlier in the process may differ)."""
    from datetime import timedelta

    import torch
    from accelerate import PartialState
    cpu = (device or "").startswith("cpu") or (device is None and not torch.cuda.is_available())
    # shards of one process may take hours longer than another's: do not let the barrier time out
    return PartialState(cpu=cpu, timeout=timedelta(hours=24))


def _with_device(spec, device):
    from dataclasses import replace
    return replace(spec, device=device)


def _recorded_spec(spec) -> dict:
    """Model options with absolute paths, so `match --gallery DIR` can reload the same model."""
    d = asdict(spec)
    for key in ("checkpoint", "pretrained", "model"):
        if d.get(key) and os.path.exists(str(d[key])):
            d[key] = os.path.abspath(str(d[key]))
    return {k: d.get(k) for k in ("model", "pretrained", "checkpoint", "seed")}


class _Run:
    """Embeds the shards one process owns, writing each as soon as its last batch is done.
    `model`: an encoder (eclip.runtime.engine), ONNX Runtime or torch."""

    def __init__(self, model, output, identity, dtype, batch_size, workers, show_progress):
        self.model, self.output, self.identity = model, Path(output), identity
        self.dtype, self.batch_size, self.workers = dtype, batch_size, workers
        self.show_progress = show_progress

    def _batches(self, shards):
        """Batches never cross a shard boundary: [(indices, shard, is_last_of_shard)]."""
        out = []
        for s in shards:
            starts = range(s.start, s.stop, self.batch_size)
            for b in starts:
                out.append((list(range(b, min(b + self.batch_size, s.stop))), s, b == starts[-1]))
        return out

    def images(self, items, shards, sink=None, hash_files: bool = True) -> int:
        """Embed items[s.start:s.stop] of each shard; at a shard's end call sink(shard, vectors, rows,
        errors) (default: write an eclip shard). rows: {"id", "path", "sha256"} of the readable images
        (sha256 None when not `hash_files`: the file is then read once, to decode it),
        vectors: float32 numpy [len(rows), dim], L2-normalised; errors: {"id", "image", "reason"}."""
        from torch.utils.data import DataLoader

        from eclip.data.dataset import HashedImages, ImageDataset, collate_hashed, collate_images
        plan = self._batches(shards)
        if not plan:
            return 0
        dataset, collate = (HashedImages, collate_hashed) if hash_files else (ImageDataset, collate_images)
        loader = DataLoader(dataset([it["path"] for it in items], self.model.preprocess),
                            batch_sampler=[p[0] for p in plan], num_workers=self.workers,
                            collate_fn=collate, pin_memory=self.model.device.startswith("cuda"),
                            prefetch_factor=4 if self.workers else None)
        done, vectors, rows, errors = 0, [], [], []
        with self._progress("images", sum(len(p[0]) for p in plan)) as advance:
            for batch, (indices, shard, last) in zip(loader, plan):
                if batch["indices"].numel():
                    vectors.append(self.model.encode_images(batch["images"]))
                    shas = batch["sha256"] if hash_files else [None] * batch["indices"].numel()
                    for i, sha in zip(batch["indices"].tolist(), shas):
                        rows.append({"id": items[i]["id"], "path": items[i]["path"], "sha256": sha})
                errors += [{"id": items[i]["id"], "image": items[i]["path"], "reason": reason}
                           for i, reason in batch["skipped"]]
                advance(len(indices))
                if last:
                    done += len(rows)
                    (sink or self._write)(shard, self._array(vectors), rows, errors)
                    vectors, rows, errors = [], [], []
        return done

    def texts(self, items, shards, sink=None) -> int:
        """Like images(): rows are the items' {"id", "text", "entities", "image"}; no errors."""
        plan = self._batches(shards)
        done, vectors, rows = 0, [], []
        with self._progress("texts", sum(len(p[0]) for p in plan)) as advance:
            for indices, shard, last in plan:
                vectors.append(self.encode_texts([items[i]["text"] for i in indices]))
                rows += [{k: items[i][k] for k in COLUMNS["texts"]} for i in indices]
                advance(len(indices))
                if last:
                    done += len(rows)
                    (sink or self._write)(shard, self._array(vectors), rows, [])
                    vectors, rows = [], []
        return done

    def encode_texts(self, texts: list):
        """L2-normalised float32 numpy [len(texts), dim], in batches."""
        return self._array([self.model.encode_texts(texts[start:start + self.batch_size])
                            for start in range(0, len(texts), self.batch_size)])

    def _array(self, vectors):
        import numpy as np
        return np.concatenate(vectors) if vectors else np.zeros((0, self.model.dim), np.float32)

    def _write(self, shard, array, rows, errors):
        write_shard(self.output, shard, array, rows, errors, self.identity, self.dtype)

    def _progress(self, what, total):
        import contextlib

        from eclip.console import progress

        @contextlib.contextmanager
        def bar():
            if not self.show_progress:
                yield lambda n: None
                return
            with progress() as p:
                task = p.add_task(what, total=total)
                yield lambda n: p.advance(task, n)
        return bar()
