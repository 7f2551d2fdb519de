"""The same image-text pairs written in every format eclip reads, by the writers people use:
webdataset's ShardWriter (as img2dataset writes shards), pyarrow with the Hugging Face `Image`
struct and with a plain bytes column (img2dataset's parquet output), img2dataset's `files` layout."""
import io
import json
import os
from pathlib import Path


def write_all(records, folder: Path, per_shard: int = 20) -> dict:
    """records: eclip Records of a JSONL set -> {"shards": pattern, "parquet": file, "bytes_parquet": file,
    "files": folder}; the same pairs, in the same order, with the same ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shards").mkdir(exist_ok=True)
    with wds.ShardWriter(str(folder / "shards" / "%05d.tar"), maxcount=per_shard, verbose=0) as w:
        for r in records:
            w.write({"__key__": r.id, "jpg": Path(r.image).read_bytes(), "txt": r.caption,
                     "json": {"key": r.id, "entities": r.entities, **({"label": r.label} if r.label else {})}})
    n = len(list((folder / "shards").glob("*.tar")))
    images = [Path(r.image).read_bytes() for r in records]
    hf = pa.table({"id": [r.id for r in records],
                   "image": pa.array([{"bytes": b, "path": os.path.basename(r.image)} for b, r in zip(images, records)],
                                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                   "caption": [r.caption for r in records]})
    if any(r.label for r in records):      # a class column, as a labelled Hugging Face set has
        hf = hf.append_column("label", pa.array([r.label for r in records], type=pa.string()))
    hf = hf.replace_schema_metadata({"huggingface": json.dumps(
        {"info": {"features": {"id": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"},
                               "caption": {"dtype": "string", "_type": "Value"}}}})})
    pq.write_table(hf, folder / "pairs.parquet", row_group_size=16)
    plain = pa.table({"key": [r.id for r in records], "jpg": pa.array(images, type=pa.binary()),
                      "caption": [r.caption for r in records]})
    pq.write_table(plain, folder / "img2dataset.parquet", row_group_size=16)
    files = folder / "files"
    for i, r in enumerate(records):
        sub = files / f"{i // per_shard:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        stem = sub / f"{i:09d}"          # img2dataset's keys: the sample number; the id goes in the json member
        stem.with_suffix(".jpg").write_bytes(images[i])
        stem.with_suffix(".txt").write_text(r.caption)
        stem.with_suffix(".json").write_text(json.dumps({"key": r.id}))
    return {"shards": str(folder / "shards" / f"{{00000..{n - 1:05d}}}.tar"), "parquet": str(folder / "pairs.parquet"),
            "bytes_parquet": str(folder / "img2dataset.parquet"), "files": str(files), "n_shards": n}


def jpeg(array) -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()
