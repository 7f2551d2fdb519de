"""The folder `eclip embed` writes and `match --gallery` / `evaluate --embeddings` read.

Layout of OUT_DIR (rows of a kind are the concatenation of its shards, in manifest order):

    manifest.json                      written last, atomically: model identity, dim, dtype, counts, shards
    images-00000-r0.safetensors        "embeddings" [rows, dim], L2-normalised; header: signature, errors
    images-00000-r0.parquet            metadata part of that shard: id, path, sha256
    images.parquet                     all parts in row order: row, id, path, sha256
    texts-00000-r0.safetensors / .parquet, texts.parquet   likewise: row, id, text, entities (JSON), image
    errors.jsonl                       images that could not be embedded: {"id", "image", "reason"}

A shard covers a fixed range of the inputs (shard k = inputs [k*S, (k+1)*S)); bad images leave
it with fewer rows. It is finished when both of its files exist with the signature of the
current run (model, dtype, its inputs): that is what makes `eclip embed` resumable. Shard k is
embedded by process k % world_size, whose rank is in the file name.

Reading needs numpy, safetensors and pyarrow only (no torch).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from eclip.atomic import atomic_path, write_text
from eclip.errors import EclipError

FORMAT = "eclip-embeddings"
VERSION = 1
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
KINDS = ("images", "texts")
# texts.image: the path of the record's image (--dataset; empty for --texts): evaluate's ground truth
COLUMNS = {"images": ("id", "path", "sha256"), "texts": ("id", "text", "entities", "image")}
DTYPES = ("fp16", "fp32")
# keys of EntityCLIP.identity() that decide whether two models make the same vectors
IDENTITY_KEYS = ("model", "pretrained", "checkpoint_sha256", "seed", "preprocess")


# ---- model identity ---------------------------------------------------------------------

def comparable_identity(identity: dict, by_content: bool = True) -> dict:
    """The part of an identity that must match. A checkpoint compares by its sha256, a model-config
    file by the sha256 of its bytes (`model_sha256`, when `by_content`), other files by absolute
    path (stores from before model_sha256 keep the path as it was typed)."""
    out = {k: identity.get(k) for k in IDENTITY_KEYS}
    if out["checkpoint_sha256"]:     # a checkpoint alone defines the model, wherever it lies
        out["model"] = out["pretrained"] = None
    else:
        if by_content and identity.get("model_sha256"):
            out["model"] = f"sha256:{identity['model_sha256']}"
        elif out["model"] and os.path.isfile(str(out["model"])):
            out["model"] = os.path.realpath(str(out["model"]))
        if out["pretrained"] and os.path.isfile(str(out["pretrained"])):
            out["pretrained"] = os.path.realpath(str(out["pretrained"]))
    return json.loads(json.dumps(out, sort_keys=True))   # tuples -> lists, as stored


def _comparable_pair(a: dict, b: dict) -> tuple[dict, dict]:
    """Content compares only when both sides know it (a store written before model_sha256 existed)."""
    by_content = bool(a.get("model_sha256")) and bool(b.get("model_sha256"))
    return comparable_identity(a, by_content), comparable_identity(b, by_content)


def describe_identity(identity: dict) -> str:
    if identity.get("checkpoint_sha256"):
        return f"checkpoint sha256 {identity['checkpoint_sha256'][:12]}"
    seed = f" (random weights, seed {identity['seed']})" if identity.get("seed") is not None else ""
    return f"model {identity.get('model')} with pretrained {identity.get('pretrained')}{seed}"


def check_identity(stored: dict, current: dict, where) -> None:
    """EclipError unless `current` (EntityCLIP.identity()) makes the same vectors as `stored`."""
    a, b = _comparable_pair(stored, current)
    if a == b:
        return
    differ = [k for k in IDENTITY_KEYS if a.get(k) != b.get(k)]
    raise EclipError(f"{where}: embeddings were made with {describe_identity(stored)}, not with the "
                     f"{describe_identity(current)} given here ({', '.join(differ)} differ); use the same "
                     f"model options, or embed again with this model")


def identity_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(comparable_identity(identity), sort_keys=True).encode()).hexdigest()


# ---- shard plan (writing) ---------------------------------------------------------------

@dataclass
class Shard:
    kind: str            # images | texts
    index: int           # k: covers inputs [start, stop)
    start: int
    stop: int
    rank: int            # process that embeds it
    signature: str       # model + dtype + the shard's inputs

    @property
    def stem(self) -> str:
        return f"{self.kind}-{self.index:05d}-r{self.rank}"


def plan_shards(kind: str, items: list, shard_size: int, world_size: int, identity: dict, dtype: str,
                fingerprint=None, partitions=None) -> list[Shard]:
    """Cut `items` into shards of `shard_size`; shard k goes to process k % world_size.

    `fingerprint(item)` -> str is what the signature remembers of one input (default: its repr).
    `partitions` [(index, start, stop)] cuts them there instead (one per input webdataset shard):
    the index names the file, so parts embedded on several machines join into one folder.
    """
    base = hashlib.sha256(f"{FORMAT}/{VERSION}/{kind}/{dtype}/{identity_digest(identity)}".encode()).digest()
    shards = []
    cuts = partitions if partitions is not None else \
        [(k, start, min(start + shard_size, len(items))) for k, start in enumerate(range(0, len(items), shard_size))]
    for position, (k, start, stop) in enumerate(cuts):
        h = hashlib.sha256(base)
        for item in items[start:stop]:
            h.update((fingerprint(item) if fingerprint else repr(item)).encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        shards.append(Shard(kind, k, start, stop, position % world_size, h.hexdigest()))
    return shards


def finished_files(folder: Path, shard: Shard) -> tuple[Path, Path] | None:
    """(vectors, metadata) of a finished copy of `shard` (any rank), or None."""
    for vectors in sorted(folder.glob(f"{shard.kind}-{shard.index:05d}-r*.safetensors")):
        meta = vectors.with_suffix(".parquet")
        if meta.is_file() and _shard_signature(vectors) == shard.signature \
                and _parquet_signature(meta) == shard.signature:
            return vectors, meta
    return None


def _shard_signature(path: Path) -> str | None:
    try:
        return read_shard_header(path).get("signature")
    except EclipError:
        return None


def _parquet_signature(path: Path) -> str | None:
    import pyarrow.parquet as pq
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:   # a foreign or damaged file is simply not a finished shard
        return None
    value = meta.get(b"eclip_signature")
    return value.decode() if value else None


def write_shard(folder: Path, shard: Shard, vectors, rows: list[dict], errors: list[dict], identity: dict,
                dtype: str) -> tuple[Path, Path]:
    """Write the metadata part, then the vectors; each whole or not at all.

    vectors: numpy float array [len(rows), dim], L2-normalised. errors: [{"id", "image", "reason"}].
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file
    folder = Path(folder)
    array = np.ascontiguousarray(vectors, dtype=np.float16 if dtype == "fp16" else np.float32)
    columns = COLUMNS[shard.kind]
    table = pa.table({c: pa.array([r[c] for r in rows], type=pa.string()) for c in columns})
    table = table.replace_schema_metadata({"eclip_signature": shard.signature})
    meta_path = folder / f"{shard.stem}.parquet"
    with atomic_path(meta_path) as tmp:
        pq.write_table(table, tmp)
    vec_path = folder / f"{shard.stem}.safetensors"
    header = {"format": FORMAT, "kind": shard.kind, "signature": shard.signature,
              "range": json.dumps([shard.start, shard.stop]), "errors": json.dumps(errors, ensure_ascii=False),
              "identity": json.dumps(identity, sort_keys=True)}
    with atomic_path(vec_path) as tmp:
        save_file({"embeddings": array}, str(tmp), metadata=header)
    return vec_path, meta_path


def read_shard_header(path) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="np") as f:
            meta = dict(f.metadata() or {})
            meta["shape"] = list(f.get_slice("embeddings").get_shape())
    except Exception as e:   # safetensors raises its own types on truncated files
        raise EclipError(f"{path}: not a readable embeddings shard ({str(e).splitlines()[0][:120]})")
    if meta.get("format") != FORMAT:
        raise EclipError(f"{path}: not an eclip embeddings shard")
    return meta


def stored_identity(folder: Path) -> dict | None:
    """The model identity of whatever embeddings already lie in `folder` (manifest, else any shard)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            identity = json.loads(manifest.read_text())["identity"]
            if isinstance(identity, dict):
                return identity
        except (ValueError, KeyError, TypeError):
            pass
    for kind in KINDS:
        for path in sorted(folder.glob(f"{kind}-*-r*.safetensors")):
            try:
                identity = json.loads(read_shard_header(path)["identity"])
            except (EclipError, KeyError, ValueError):
                continue
            if isinstance(identity, dict):
                return identity
    return None


def our_files(folder: Path) -> list[Path]:
    """Every file `eclip embed` writes in `folder` (for --overwrite and stale-shard clean-up)."""
    folder = Path(folder)
    names = [folder / MANIFEST, folder / ERRORS] + [folder / f"{k}.parquet" for k in KINDS]
    for kind in KINDS:
        names += folder.glob(f"{kind}-*-r*.safetensors")
        names += folder.glob(f"{kind}-*-r*.parquet")
        names += folder.glob(f"{kind}-*.ivf.faiss")   # search indexes cached by `match --gallery`
    return [p for p in names if p.is_file()]


def leftover_temp_files(folder: Path) -> list[Path]:
    """Temporary files of writes that a killed run never finished (eclip.atomic names them .NAME.*.tmp)."""
    names = [MANIFEST, ERRORS] + [f"{k}.parquet" for k in KINDS] + [f"{k}-*" for k in KINDS]
    return [p for n in names for p in Path(folder).glob(f".{n}.*.tmp") if p.is_file()]


def finalize(folder: Path, shards: dict[str, list[Shard]], identity: dict, dim: int, dtype: str,
             model_spec: dict, source: dict, read_errors=()) -> dict:
    """Process 0, after every shard is written: whole tables, errors.jsonl, then the manifest.

    Returns the manifest. Shard files not in this run's plan (an older run's) are removed.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from eclip import __version__
    from eclip.data.dataset import SkipLog
    folder = Path(folder)
    manifest = {"format": FORMAT, "version": VERSION, "eclip_version": __version__, "identity": identity,
                "model_spec": model_spec, "dim": dim, "dtype": dtype, "source": source}
    keep, errors = set(), list(read_errors)   # samples the reader left out (no image / text), then unreadable images
    for kind in KINDS:
        if kind not in shards:
            manifest[kind] = None
            continue
        entries, tables, row = [], [], 0
        for shard in shards[kind]:
            found = finished_files(folder, shard)
            if found is None:
                raise EclipError(f"{folder}: shard {shard.stem} is missing or unfinished; re-run the same "
                                 f"`eclip embed` command to finish it")
            vec_path, meta_path = found
            header = read_shard_header(vec_path)
            rows = header["shape"][0]
            table = pq.read_table(meta_path).replace_schema_metadata(None)
            if table.num_rows != rows:
                raise EclipError(f"{vec_path}: {rows} vectors but {table.num_rows} metadata rows")
            tables.append(table.add_column(0, "row", pa.array(range(row, row + rows), type=pa.int64())))
            errors += json.loads(header.get("errors", "[]"))
            entries.append({"vectors": vec_path.name, "meta": meta_path.name, "rows": rows, "first_row": row})
            keep.update((vec_path, meta_path))
            row += rows
        schema = pa.schema([("row", pa.int64())] + [(c, pa.string()) for c in COLUMNS[kind]])
        whole = pa.concat_tables(tables) if tables else schema.empty_table()
        with atomic_path(folder / f"{kind}.parquet") as tmp:
            pq.write_table(whole, tmp)
        manifest[kind] = {"count": row, "inputs": shards[kind][-1].stop if shards[kind] else 0,
                          "table": f"{kind}.parquet", "shards": entries}
        if kind == "images":
            manifest[kind]["errors"] = len(errors)
    with atomic_path(folder / ERRORS) as tmp:
        with SkipLog(tmp) as log:
            for e in errors:
                log.write(e.get("id"), e.get("image"), e.get("reason"))
    keep.update(folder / f"{kind}.parquet" for kind in shards)
    keep.update((folder / MANIFEST, folder / ERRORS))
    for path in our_files(folder):
        if path not in keep:
            path.unlink(missing_ok=True)
    write_text(folder / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


# ---- reading ----------------------------------------------------------------------------

class EmbeddingStore:
    """A finished `eclip embed` folder, validated on open. Row i of vectors(kind) is row i of table(kind)."""

    def __init__(self, path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise EclipError(f"{self.path}: no such embeddings folder")
        if not manifest_path.is_file():
            hint = " (an unfinished `eclip embed` run? re-run it to finish)" if our_files(self.path) else ""
            raise EclipError(f"{self.path}: not an eclip embeddings folder, no {MANIFEST}{hint}")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise EclipError(f"{manifest_path}: not valid JSON ({e})")
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise EclipError(f"{manifest_path}: not an eclip embeddings manifest")
        if m.get("layout", "eclip") != "eclip":
            raise EclipError(f"{self.path}: written with `eclip embed --format {m['layout']}` for other tools "
                             f"(embedding-reader, autofaiss, clip-retrieval); match --gallery and evaluate "
                             f"--embeddings read eclip's own layout: embed again without --format")
        problem = manifest_problem(m)
        if problem:
            raise EclipError(f"{manifest_path}: {problem}")
        if m["version"] > VERSION:
            raise EclipError(f"{manifest_path}: written by a newer eclip (format version {m['version']})")
        self.identity, self.dim, self.dtype = m["identity"], m["dim"], m["dtype"]
        for kind in KINDS:
            for entry in (m.get(kind) or {}).get("shards", []):
                for key in ("vectors", "meta"):
                    if not (self.path / entry[key]).is_file():
                        raise EclipError(f"{self.path}: {entry[key]} listed in {MANIFEST} is missing")
        self._vectors, self._tables = {}, {}

    def has(self, kind: str) -> bool:
        return bool(self.manifest.get(kind)) and self.manifest[kind]["count"] > 0

    def count(self, kind: str) -> int:
        return (self.manifest.get(kind) or {}).get("count", 0)

    def require(self, kind: str) -> None:
        if not self.has(kind):
            flag = "--images" if kind == "images" else "--texts"
            raise EclipError(f"{self.path}: holds no {kind[:-1]} embeddings (embed with {flag} or --dataset)")

    def check_model(self, identity: dict) -> None:
        """Refuse a model other than the one that made these vectors (identity: EntityCLIP.identity())."""
        check_identity(self.identity, identity, self.path)

    def vectors(self, kind: str):
        """float32 numpy array [count, dim], L2-normalised rows."""
        import numpy as np
        from safetensors.numpy import load_file
        self.require(kind)
        if kind not in self._vectors:
            parts = []
            for entry in self.manifest[kind]["shards"]:
                path = self.path / entry["vectors"]
                try:
                    array = load_file(str(path))["embeddings"]
                except Exception as e:
                    raise EclipError(f"{path}: unreadable embeddings shard ({str(e).splitlines()[0][:120]})")
                if array.shape != (entry["rows"], self.dim):
                    raise EclipError(f"{path}: shape {list(array.shape)}, manifest says "
                                     f"[{entry['rows']}, {self.dim}]")
                parts.append(array)
            self._vectors[kind] = np.concatenate(parts).astype(np.float32, copy=False) if parts \
                else np.zeros((0, self.dim), np.float32)
        return self._vectors[kind]

    def table(self, kind: str):
        """pyarrow Table: images [row, id, path, sha256], texts [row, id, text, entities]."""
        import pyarrow.parquet as pq
        self.require(kind)
        if kind not in self._tables:
            path = self.path / self.manifest[kind]["table"]
            try:
                table = pq.read_table(path)
            except Exception as e:
                raise EclipError(f"{path}: unreadable metadata table ({str(e).splitlines()[0][:120]})")
            if table.num_rows != self.count(kind):
                raise EclipError(f"{path}: {table.num_rows} rows, manifest says {self.count(kind)}")
            self._tables[kind] = table
        return self._tables[kind]

    def rows(self, kind: str, indices) -> list[dict]:
        """Metadata of the given rows as dicts."""
        table = self.table(kind)
        return [{c: table.column(c)[int(i)].as_py() for c in table.column_names} for i in indices]


def manifest_problem(m: dict) -> str | None:
    """The first field of a manifest that is missing or of the wrong type, or a file it names
    outside the folder (eclip writes bare file names), as "field 'X' ..."; None when all is well."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def file_name(v):
        return isinstance(v, str) and bool(v) and Path(v).name == v and v not in (".", "..")

    checks = [("version", lambda v: count(v) and v >= 1, "a format version (a positive integer)"),
              ("identity", lambda v: isinstance(v, dict), "the model identity (a JSON object)"),
              ("dim", lambda v: count(v) and v >= 1, "a positive integer"),
              ("dtype", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}")]
    for key, ok, expected in checks:
        if key not in m:
            return f"field '{key}' is missing"
        if not ok(m[key]):
            return f"field '{key}' must be {expected} (got {json.dumps(m[key])[:40]})"
    for key in ("model_spec", "source"):
        if m.get(key) is not None and not isinstance(m[key], dict):
            return f"field '{key}' must be a JSON object"
    for kind in KINDS:
        part = m.get(kind)
        if part is None:
            continue
        if not isinstance(part, dict):
            return f"field '{kind}' must be a JSON object or null (got {json.dumps(part)[:40]})"
        fields = [(f"{kind}.count", part.get("count"), count, "a count (an integer of at least 0)"),
                  (f"{kind}.table", part.get("table"), file_name, "a file name inside the embeddings folder"),
                  (f"{kind}.shards", part.get("shards"), lambda v: isinstance(v, list), "a list")]
        if "errors" in part:
            fields.append((f"{kind}.errors", part["errors"], count, "a count (an integer of at least 0)"))
        for i, entry in enumerate(part.get("shards") if isinstance(part.get("shards"), list) else []):
            where = f"{kind}.shards.{i}"
            if not isinstance(entry, dict):
                fields.append((where, entry, lambda v: False, "a JSON object"))
                continue
            inside = "a file name inside the embeddings folder"
            fields += [(f"{where}.vectors", entry.get("vectors"), file_name, inside),
                       (f"{where}.meta", entry.get("meta"), file_name, inside),
                       (f"{where}.rows", entry.get("rows"), count, "a count (an integer of at least 0)")]
        for name, value, ok, expected in fields:
            if value is None:
                return f"field '{name}' is missing"
            if not ok(value):
                if "file name" in expected and isinstance(value, str):
                    return f"field '{name}' names {value!r}, outside the embeddings folder (eclip writes bare " \
                           f"file names there)"
                return f"field '{name}' must be {expected} (got {json.dumps(value)[:40]})"
    return None


def open_store(path) -> EmbeddingStore:
    return EmbeddingStore(path)


def check_spec(store: EmbeddingStore, spec) -> None:
    """Refuse model options (eclip.config.ModelSpec) that name another model than the store's,
    without building the model: a checkpoint compares by content sha256, otherwise the
    architecture and weights names compare. No model options: nothing to refuse."""
    if spec is None or not (spec.checkpoint or spec.model or spec.pretrained):
        return
    if spec.checkpoint:
        from eclip.checkpoint import read_header, sha256_file
        read_header(spec.checkpoint)   # a truncated or foreign file is reported as such
        given = {"checkpoint_sha256": sha256_file(spec.checkpoint)}
        same = given["checkpoint_sha256"] == store.identity.get("checkpoint_sha256")
    else:
        from eclip.model.source import model_source
        given = model_source(spec)
        mine, theirs = _comparable_pair(given, store.identity)
        same = all(mine[k] == theirs[k] for k in ("model", "pretrained", "checkpoint_sha256", "seed"))
    if not same:
        raise EclipError(f"{store.path}: embeddings were made with {describe_identity(store.identity)}, not with "
                         f"the {describe_identity(given)} given here; use the same model options, or embed again")


def evaluate_embeddings(folder, recall_k=(1, 5, 10), chunk_size=None, dump_ranks=None, spec=None,
                        same_image: str = "bytes") -> dict:
    """`eclip evaluate --embeddings DIR`: retrieval metrics from a store written with --dataset.

    Ground truth as eclip.evaluate builds it: a caption's positive is its record's image (the
    texts' "image" column; stores written before it existed match by record id). Which captions
    share one gallery image is `same_image`: identical bytes (sha256), the same path, or none (every
    caption's image its own item, the reference's protocol). Records whose image could not be
    embedded are left out (their unreadable files counted in n_skipped).
    """
    import json as _json

    import torch

    from eclip.evaluate import check_same_image, evaluate_features, gallery_items
    check_same_image(same_image)
    store = open_store(folder)
    check_spec(store, spec)
    store.require("texts")
    store.require("images")
    images, texts = store.table("images").to_pydict(), store.table("texts").to_pydict()
    image_vectors, text_vectors = store.vectors("images"), store.vectors("texts")
    by_path = "image" in texts and any(texts["image"])
    image_key, text_key = ("path", "image") if by_path else ("id", "id")
    row_of = {}
    for row, key in enumerate(images[image_key]):
        row_of.setdefault(key, row)
    keep = [t for t, key in enumerate(texts[text_key]) if key in row_of]
    if not keep:
        raise EclipError(f"{store.path}: no caption shares a record id with an embedded image; "
                         f"evaluate needs a store written with `eclip embed --dataset`")
    image_row = [row_of[texts[text_key][t]] for t in keep]              # each kept caption's image row
    keys = {"bytes": [images["sha256"][r] for r in image_row], "path": [images["path"][r] for r in image_row],
            "none": range(len(keep))}[same_image]
    first, item_of_text = gallery_items(keys)
    gallery_rows = [image_row[i] for i in first]
    types = [sorted({e.get("type") for e in _json.loads(texts["entities"][t] or "[]")
                     if isinstance(e, dict) and e.get("type")}) for t in keep]
    result = evaluate_features(torch.from_numpy(text_vectors[keep]), torch.from_numpy(image_vectors[gallery_rows]),
                               item_of_text, recall_k=recall_k,
                               chunk_size=chunk_size, dump_ranks=dump_ranks,
                               text_ids=[texts["id"][t] for t in keep],
                               image_ids=[images["path"][r] for r in gallery_rows], text_entity_types=types)
    source = store.manifest.get("source") or {}
    result.update(model=store.identity.get("model"), checkpoint=store.identity.get("checkpoint"),
                  checkpoint_sha256=store.identity.get("checkpoint_sha256"),
                  n_skipped=(store.manifest["images"] or {}).get("errors", 0), dataset=source.get("dataset"), split=source.get("split"),
                  embeddings=str(store.path), same_image=same_image)
    return result
