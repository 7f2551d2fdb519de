"""`eclip embed --format clip-retrieval`: the folder layout clip-retrieval writes, which
embedding-reader, autofaiss and clip-retrieval's back end read.

    img_emb/img_emb_{N}.npy          [rows, dim], fp16 (--dtype), L2-normalised
    text_emb/text_emb_{N}.npy        the same rows' captions
    metadata/metadata_{N}.parquet    image_path, caption, id, entities (JSON); written last
    errors.jsonl                     records left out: their image could not be read
    manifest.json                    as in eclip's own layout, with "layout": "clip-retrieval"
    .empty-partitions/{N}.json       a partition with no readable row (no files: embedding-reader
                                     fails on a file of 0 rows, and clip-retrieval writes none)

Row i of partition N is one sample in all three files (a record: its image and its caption;
with --images or --texts alone, one image or one caption), and the files of a partition match
by sorted name: N is zero-padded to one width, as clip-retrieval pads it. A record whose image
cannot be read is left out of all three and listed in errors.jsonl.

A partition is eclip.embedstore's shard: planned, signed and assigned to a process the same
way, and the unit of resuming. Each file is written whole or not at all; the metadata file,
written last, carries the run's signature in its schema metadata, so a partition is finished
exactly when that file (or its empty-partition note) says so. Images shared by records of one
partition are embedded once.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from eclip.atomic import atomic_path, write_text
from eclip.embedstore import ERRORS, FORMAT, MANIFEST, VERSION, Shard, plan_shards
from eclip.errors import EclipError

LAYOUT = "clip-retrieval"
FOLDERS = {"images": ("img_emb", "img_emb_{}.npy"), "texts": ("text_emb", "text_emb_{}.npy"),
           "metadata": ("metadata", "metadata_{}.parquet")}
EMPTY = ".empty-partitions"
SIGNATURE_KEY, ERRORS_KEY = b"eclip_signature", b"eclip_errors"


def samples(image_items: list[dict], text_items: list[dict], paired: bool) -> tuple[list[dict], tuple]:
    """(samples, kinds): one sample per record of a dataset (paired: text items carry their
    record's image path), else per image or per caption. kinds: ("images", "texts") present."""
    if paired:
        return [{"id": t["id"], "image": t["image"], "text": t["text"], "entities": t["entities"]}
                for t in text_items], ("images", "texts")
    if image_items and text_items:
        raise EclipError("--format clip-retrieval: row i of its files is one image-text pair; give pairs with "
                         "--dataset, or --images or --texts alone")
    if image_items:
        return [{"id": i["id"], "image": i["path"], "text": None, "entities": None} for i in image_items], ("images",)
    return [{"id": t["id"], "image": None, "text": t["text"], "entities": t["entities"]} for t in text_items], \
        ("texts",)


def _fingerprint(sample: dict) -> str:
    stamp = ""
    if sample["image"]:
        try:
            st = os.stat(sample["image"])
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
    return "\0".join(str(sample[k]) for k in ("id", "image", "text", "entities")) + "\0" + stamp


def plan(samples_: list[dict], kinds, shard_size: int, world_size: int, identity: dict, dtype: str) -> list[Shard]:
    return plan_shards(f"{LAYOUT}/{'+'.join(kinds)}", samples_, shard_size, world_size, identity, dtype, _fingerprint)


def width(shards: list[Shard]) -> int:
    """Digits of N: clip-retrieval's zfill(int(log10(partition count)) + 1)."""
    return len(str(max(1, len(shards))))


def partition_path(folder: Path, part: str, shard: Shard, digits: int) -> Path:
    """part: images | texts | metadata | empty (the note of a partition without rows)."""
    if part == "empty":
        return Path(folder) / EMPTY / f"{shard.index:0{digits}d}.json"
    sub, name = FOLDERS[part]
    return Path(folder) / sub / name.format(f"{shard.index:0{digits}d}")


def _empty_note(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _metadata(path: Path) -> dict | None:
    import pyarrow.parquet as pq
    try:
        return dict(pq.read_schema(path).metadata or {})
    except Exception:   # missing, foreign or damaged: not a finished partition
        return None


def finished(folder: Path, shard: Shard, digits: int, kinds) -> bool:
    meta = _metadata(partition_path(folder, "metadata", shard, digits))
    if meta and meta.get(SIGNATURE_KEY, b"").decode() == shard.signature:
        return all(partition_path(folder, kind, shard, digits).is_file() for kind in kinds)
    note = _empty_note(partition_path(folder, "empty", shard, digits))
    return bool(note) and note.get("signature") == shard.signature


def write_partition(folder: Path, shard: Shard, digits: int, vectors: dict, rows: list[dict], errors: list[dict],
                    dtype: str) -> None:
    """vectors: {"images": array, "texts": array} of the kinds present, each [len(rows), dim];
    rows: {"image_path", "caption", "id", "entities"} (keys of absent kinds left out)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    if not rows:
        for part in ("metadata", *FOLDERS):   # an older run's rows of this partition go first
            partition_path(folder, part, shard, digits).unlink(missing_ok=True)
        write_text(partition_path(folder, "empty", shard, digits),
                   json.dumps({"signature": shard.signature, "errors": errors}, ensure_ascii=False))
        return
    for kind, array in vectors.items():
        with atomic_path(partition_path(folder, kind, shard, digits)) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array, dtype=np.float16 if dtype == "fp16" else np.float32))
    columns = [c for c in ("image_path", "caption", "id", "entities") if c in rows[0]]
    table = pa.table({c: pa.array([r[c] for r in rows], type=pa.string()) for c in columns})
    table = table.replace_schema_metadata({SIGNATURE_KEY: shard.signature.encode(),
                                           ERRORS_KEY: json.dumps(errors, ensure_ascii=False).encode()})
    with atomic_path(partition_path(folder, "metadata", shard, digits)) as tmp:
        pq.write_table(table, tmp)


def embed_partitions(run, folder: Path, samples_: list[dict], shards: list[Shard], digits: int, kinds) -> int:
    """Embed and write the given partitions with `run` (eclip.embed's batched encoder); -> rows written.

    With images: one pass of run.images over each partition's distinct images; when a partition's
    last image is done its captions are encoded and the partition written, so no more than one
    partition is held in memory.
    """
    written = 0

    def write(shard, image_vectors, image_rows, image_errors):
        nonlocal written
        part = samples_[shard.start:shard.stop]
        row_of = {r["path"]: i for i, r in enumerate(image_rows)}
        reason = {e["image"]: e["reason"] for e in image_errors}
        keep = [s for s in part if s["image"] is None or s["image"] in row_of]
        vectors = {}
        if "images" in kinds:
            vectors["images"] = image_vectors[[row_of[s["image"]] for s in keep]]
        if "texts" in kinds:
            vectors["texts"] = run.encode_texts([s["text"] for s in keep])
        rows = []
        for s in keep:
            row = {"id": s["id"]}
            if "images" in kinds:
                row["image_path"] = s["image"]
            if "texts" in kinds:
                row.update(caption=s["text"], entities=s["entities"])
            rows.append(row)
        errors = [{"id": s["id"], "image": s["image"], "reason": reason.get(s["image"], "unreadable")}
                  for s in part if s["image"] is not None and s["image"] not in row_of]
        write_partition(folder, shard, digits, vectors, rows, errors, run.dtype)
        written += len(rows)

    if "images" not in kinds:
        texts = [{"id": s["id"], "text": s["text"], "entities": s["entities"], "image": ""} for s in samples_]
        run.texts(texts, shards, sink=lambda shard, vectors, rows, errors: _write_texts(
            folder, shard, digits, vectors, rows, run.dtype))
        return sum(s.stop - s.start for s in shards)
    images, image_shards = [], []
    for shard in shards:   # each partition's distinct images, as consecutive ranges of one list
        start = len(images)
        images += [{"id": p, "path": p} for p in dict.fromkeys(s["image"] for s in samples_[shard.start:shard.stop])]
        image_shards.append(replace(shard, start=start, stop=len(images)))
    by_index = {s.index: s for s in shards}
    run.images(images, image_shards, sink=lambda shard, vectors, rows, errors: write(
        by_index[shard.index], vectors, rows, errors), hash_files=False)   # its metadata has no sha256
    return written


def _write_texts(folder, shard, digits, vectors, rows, dtype):
    write_partition(folder, shard, digits, {"texts": vectors},
                    [{"caption": r["text"], "id": r["id"], "entities": r["entities"]} for r in rows], [], dtype)


def our_files(folder: Path) -> list[Path]:
    """Every file this layout writes in `folder` (for --overwrite and stale partitions)."""
    folder = Path(folder)
    found = [folder / MANIFEST, folder / ERRORS, *(folder / EMPTY).glob("*.json")]
    for sub, name in FOLDERS.values():
        found += (folder / sub).glob(name.format("*"))
    return [p for p in found if p.is_file()]


def leftover_temp_files(folder: Path) -> list[Path]:
    """Temporary files of writes a killed run never finished (eclip.atomic: .NAME.*.tmp)."""
    folder = Path(folder)
    return [p for sub, name in [*FOLDERS.values(), (EMPTY, "*.json")]
            for p in (folder / sub).glob(f".{name.format('*')}.*.tmp")]


def finalize(folder: Path, shards: list[Shard], digits: int, kinds, identity: dict, dim: int, dtype: str,
             model_spec: dict, source: dict) -> dict:
    """Process 0, after every partition is written: check them, errors.jsonl, drop stale
    partitions, then the manifest (written last). Returns the manifest."""
    import numpy as np
    import pyarrow.parquet as pq

    from eclip import __version__
    from eclip.data.dataset import SkipLog
    folder = Path(folder)
    keep, errors, entries, count = set(), [], [], 0
    for shard in shards:
        if not finished(folder, shard, digits, kinds):
            raise EclipError(f"{folder}: partition {shard.index} is missing or unfinished; re-run the same "
                             f"`eclip embed` command to finish it")
        empty = partition_path(folder, "empty", shard, digits)
        note = _empty_note(empty)
        if note and note.get("signature") == shard.signature:
            errors += note.get("errors", [])
            entries.append({"index": shard.index, "rows": 0, "inputs": shard.stop - shard.start})
            keep.add(empty)
            continue
        meta_path = partition_path(folder, "metadata", shard, digits)
        rows = pq.read_metadata(meta_path).num_rows
        entry = {"index": shard.index, "rows": rows, "inputs": shard.stop - shard.start,
                 "metadata": str(meta_path.relative_to(folder))}
        for kind in kinds:
            path = partition_path(folder, kind, shard, digits)
            shape = np.load(path, mmap_mode="r").shape
            if shape != (rows, dim):
                raise EclipError(f"{path}: shape {list(shape)}, its metadata file says [{rows}, {dim}]")
            entry[kind] = str(path.relative_to(folder))
            keep.add(path)
        keep.add(meta_path)
        errors += json.loads(_metadata(meta_path).get(ERRORS_KEY, b"[]"))
        entries.append(entry)
        count += rows
    with atomic_path(folder / ERRORS) as tmp:
        with SkipLog(tmp) as log:
            for e in errors:
                log.write(e.get("id"), e.get("image"), e.get("reason"))
    keep.update((folder / MANIFEST, folder / ERRORS))
    for path in our_files(folder):
        if path not in keep:
            path.unlink(missing_ok=True)
    manifest = {"format": FORMAT, "layout": LAYOUT, "version": VERSION, "eclip_version": __version__,
                "identity": identity, "model_spec": model_spec, "dim": dim, "dtype": dtype, "source": source,
                "kinds": list(kinds), "count": count, "inputs": shards[-1].stop if shards else 0,
                "errors": len(errors), "partitions": entries}
    write_text(folder / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def layout_of(folder: Path) -> str | None:
    """The layout of the embeddings already in `folder`: "eclip", LAYOUT, or None (none there)."""
    from eclip.embedstore import our_files as eclip_files
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        return manifest.get("layout", "eclip")
    except (OSError, ValueError, AttributeError):
        pass
    if any(p.name not in (MANIFEST, ERRORS) for p in our_files(folder)):
        return LAYOUT
    if any(p.name not in (MANIFEST, ERRORS) for p in eclip_files(folder)):
        return "eclip"
    return None
