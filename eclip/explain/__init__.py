"""Explanations: for each caption, what an LLM knows about the entities it names and
what they look like (METHOD.md's bridge text), written to a resumable JSONL cache.

    from eclip.explain import explain_records
    from eclip.explain.backends import embedded_backend
    summary = explain_records(records, embedded_backend(), "explanations.jsonl")

Only captions whose (caption, model, prompt) key is not cached are generated, each
once however many records share it; the backend is not even loaded when nothing is
left. Records whose ids come from the data (shards, parquet, files folders: a RecordList)
are explained per sample instead: one line (and one LLM call) per record id, so two samples
with one caption get one explanation each (eclip.explain.cache says how lines are keyed).
Under torchrun / accelerate launch every process takes its own share of the work and
writes its own part file; process 0 merges the parts into the cache.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Optional

from eclip.errors import EclipError
from eclip.lock import lock_file
from eclip.explain.cache import CacheWriter, cached_keys, make_entry, merge_parts
from eclip.explain.processes import rank_world, shard
from eclip.explain.prompt import DEFAULT_TEMPLATE, prompt_sha256, render, validate_template

__all__ = ["explain_records", "unique_captions", "unique_samples", "shard", "DEFAULT_TEMPLATE"]


def unique_captions(records_or_captions: Iterable, limit: Optional[int] = None) -> tuple:
    """[(id, caption)] for the first record of each distinct caption, in input order, and
    the number of records read. Accepts Records, dicts with a "caption", or plain strings.
    `limit` keeps the first `limit` distinct captions."""
    seen = set()
    items = []
    n_records = 0
    for item in records_or_captions:
        if limit is not None and len(items) >= limit:
            break
        n_records += 1
        if isinstance(item, str):
            rid, caption = None, item
        elif isinstance(item, dict):
            rid, caption = item.get("id"), item.get("caption")
        else:
            rid, caption = getattr(item, "id", None), getattr(item, "caption", None)
        if not isinstance(caption, str) or not caption.strip() or caption in seen:
            continue
        seen.add(caption)
        items.append((rid, caption))
    return items, n_records


def unique_samples(records, limit: Optional[int] = None) -> tuple:
    """[(id, caption)] for every record with a caption, once per id, in input order, and the number
    of records read; `limit` keeps the first `limit` samples."""
    seen, items, n_records = set(), [], 0
    for r in records:
        if limit is not None and len(items) >= limit:
            break
        n_records += 1
        if not isinstance(r.caption, str) or not r.caption.strip() or r.id in seen:
            continue
        seen.add(r.id)
        items.append((r.id, r.caption))
    return items, n_records


def part_files(cache_path) -> list:
    cache_path = Path(cache_path)
    return sorted(cache_path.parent.glob(f"{cache_path.name}.part-*"))


def _rate_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class ItemsPerSecond(ProgressColumn):
        # over the whole run: rich's windowed speed jumps when a batch lands all at once
        def render(self, task):
            rate = task.completed / task.elapsed if task.elapsed else 0.0
            return Text(f"{rate:.2f} items/s")

    return ItemsPerSecond()


def explain_records(records_or_captions, backend, cache_path, prompt_template: str = DEFAULT_TEMPLATE,
                    limit: Optional[int] = None, *, dry_run: bool = False, show_progress: bool = True,
                    per_sample: Optional[bool] = None) -> dict:
    """Write an explanation line to `cache_path` for every caption not cached yet; with `per_sample`
    (default: when the records are a RecordList, whose ids come from the data), for every sample
    (record id) not cached yet, a caption-wide line counting as cached for all its samples.

    Returns a summary: captions (distinct; samples when per is "sample"), per ("caption" or
    "sample"), records, cached, generated, failed, cut (answers longer
    than max_new_tokens allows, kept cut: endpoint backends), seconds,
    items_per_s (captions handled per second), generated_per_s (new lines per second of
    generation), model, prompt_sha256, cache; with dry_run=True nothing is generated or
    written and "prompts" lists [{"id", "caption", "prompt"}] of what would be generated.
    """
    t0 = time.perf_counter()
    template = validate_template(prompt_template)
    sha = prompt_sha256(template)
    if limit is not None and limit < 0:
        raise EclipError(f"--limit must be 0 or more, got {limit}")
    if cache_path is None and not dry_run:
        raise EclipError("an output cache file is needed (--output CACHE.jsonl)")
    if per_sample is None:
        from eclip.data.shards import RecordList
        per_sample = isinstance(records_or_captions, RecordList)
    items, n_records = (unique_samples if per_sample else unique_captions)(records_or_captions, limit)
    rank, world = rank_world()
    cache_path = Path(cache_path) if cache_path is not None else None
    # one writer per cache: two runs would each generate (and pay for) what the other is generating
    lock = lock_file(cache_path) if cache_path is not None and not dry_run and rank == 0 else None
    try:
        return _explain(items, n_records, backend, cache_path, template, sha, rank, world, dry_run, show_progress,
                        t0, per_sample)
    finally:
        if lock is not None:
            lock.release()


def _explain(items, n_records, backend, cache_path, template, sha, rank, world, dry_run, show_progress, t0,
             per_sample=False):
    model = backend.name
    if cache_path is not None and world == 1 and not dry_run and part_files(cache_path):
        merge_parts(cache_path, part_files(cache_path))  # left by a killed multi-process run
    done = cached_keys(cache_path, *part_files(cache_path)) if cache_path is not None else set()
    if per_sample:   # its own line, or a caption-wide one (a table's, or an older eclip's)
        todo = [(rid, c) for rid, c in items
                if (c, model, sha) not in done and (c, model, sha, str(rid)) not in done]
    else:            # any line for the caption, keyed or not
        done = {k[:3] for k in done}
        todo = [(rid, c) for rid, c in items if (c, model, sha) not in done]
    summary = {"cache": str(cache_path) if cache_path else None, "model": model, "prompt_sha256": sha,
               "records": n_records, "captions": len(items), "cached": len(items) - len(todo),
               "generated": 0, "failed": 0, "cut": 0, "per": "sample" if per_sample else "caption"}

    if dry_run:
        summary["prompts"] = [{"id": rid, "caption": c, "prompt": render(template, c)} for rid, c in todo]
        return _finish(summary, t0, None)
    if world > 1:
        from eclip.explain.processes import barrier
        barrier()  # everyone has read the cache before anyone writes
    mine = shard(todo, rank, world)
    gen_seconds = None
    if mine:
        target = cache_path if world == 1 else cache_path.with_name(f"{cache_path.name}.part-{rank}")
        from eclip.console import progress
        t_gen = time.perf_counter()
        if hasattr(backend, "load"):
            backend.load()  # before the bar and the file: a model that cannot load leaves no trace
        bar = progress(_rate_column())
        bar.disable = bar.disable or not show_progress or rank != 0
        with CacheWriter(target) as writer, bar:
            task = bar.add_task("explain", total=len(mine))
            prompts = [render(template, c) for _, c in mine]
            for i, text, error in backend.generate(prompts):
                rid, caption = mine[i]
                writer.append(make_entry(rid, caption, text, model, sha, error, key=rid if per_sample else None))
                summary["failed" if error else "generated"] += 1
                bar.advance(task)
        gen_seconds = time.perf_counter() - t_gen
        summary["cut"] = getattr(backend, "answers_cut", 0)
    if world > 1:
        from eclip.explain.processes import barrier, gather
        counts = gather((summary["generated"], summary["failed"], summary["cut"]))  # also waits: every part is complete
        summary["generated"] = sum(g for g, _, _ in counts)
        summary["failed"] = sum(f for _, f, _ in counts)
        summary["cut"] = sum(c for _, _, c in counts)
        if rank == 0:
            merge_parts(cache_path, part_files(cache_path))
        barrier()  # nobody returns before the cache is whole
    return _finish(summary, t0, gen_seconds)


def _finish(summary: dict, t0: float, gen_seconds: Optional[float]) -> dict:
    seconds = time.perf_counter() - t0
    handled = summary["cached"] + summary["generated"] + summary["failed"]
    summary["seconds"] = round(seconds, 4)
    summary["items_per_s"] = round(handled / seconds, 2) if seconds > 0 else None
    new = summary["generated"] + summary["failed"]
    summary["generated_per_s"] = round(new / gen_seconds, 3) if gen_seconds and new else None
    return summary
