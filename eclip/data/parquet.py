"""Parquet tables with the image inside, to records: Hugging Face `datasets` writes an `Image`
column as a struct of `bytes` and `path`; img2dataset's `parquet` output and many exports hold a
plain binary column (`jpg`). One file, a folder of `.parquet` files or a glob, local or fsspec.

Only the text, id and entity columns are read here; a record's image is an address of its cell
(eclip.data.members), read when the image is loaded, a row group at a time.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from eclip.data.members import is_remote, parquet_address
from eclip.data.records import Record, clean_label
from eclip.data.shards import Columns, RecordList, Skipped
from eclip.errors import EclipError

IMAGE_COLUMNS = ("image", "jpg", "img", "png", "webp", "image_bytes")
TEXT_COLUMNS = ("caption", "text", "txt", "title")
ID_COLUMNS = ("id", "key")


def is_parquet_source(dataset: str) -> bool:
    name = str(dataset)
    if name.lower().endswith(".parquet"):
        return True
    path = Path(name).expanduser()
    return not is_remote(name) and path.is_dir() and any(p.suffix == ".parquet" for p in path.iterdir())


def parquet_files(dataset: str) -> list[str]:
    name = str(dataset)
    where = f"--dataset {name}"
    if is_remote(name) or any(c in name for c in "*?["):
        import fsspec
        fs, _, paths = fsspec.get_fs_token_paths(name)
        found = sorted(p for p in paths)
        files = [fs.unstrip_protocol(p) if is_remote(name) else p for p in found]
        if not files:
            raise EclipError(f"{where}: no parquet file matches")
        return files
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(str(p.resolve()) for p in path.iterdir() if p.suffix == ".parquet")
        if not files:
            raise EclipError(f"{where}: no .parquet files in this folder")
        return files
    if not path.is_file():
        raise EclipError(f"{where}: parquet file not found")
    return [str(path.resolve())]


def _open(path: str):
    import pyarrow.parquet as pq
    try:
        if is_remote(path):
            import fsspec
            return pq.ParquetFile(fsspec.open(path, "rb").open())
        return pq.ParquetFile(path)
    except Exception as e:   # pyarrow's ArrowInvalid and friends
        raise EclipError(f"{path}: not a readable parquet file ({type(e).__name__}: {str(e)[:120]})") from None


def _pick(names, given: Optional[str], defaults, what: str, path: str, option: str) -> Optional[str]:
    if given:
        if given not in names:
            raise EclipError(f"{path}: no column {given!r} ({option}); columns: {', '.join(names)}")
        return given
    return next((c for c in defaults if c in names), None)


def read_parquet(dataset: str, columns: Optional[Columns] = None) -> RecordList:
    """Records of every row; rows without text are left out and listed in `.skipped`. A row whose
    image bytes are empty is found when its image is loaded (skipped and logged there)."""
    import pyarrow as pa
    columns = columns or Columns()
    records, skipped = [], []
    for path in parquet_files(dataset):
        table_file = _open(path)
        schema = table_file.schema_arrow
        names = schema.names
        image = _pick(names, columns.image_key, IMAGE_COLUMNS, "image", path, "--image-key")
        text = _pick(names, columns.text_key, TEXT_COLUMNS, "text", path, "--text-key")
        rid = _pick(names, columns.id_key, ID_COLUMNS, "id", path, "--id-key")
        if image is None or text is None:
            raise EclipError(f"{path}: no {'image' if image is None else 'text'} column (looked for "
                             f"{', '.join(IMAGE_COLUMNS if image is None else TEXT_COLUMNS)}; name it with "
                             f"{'--image-key' if image is None else '--text-key'}); columns: {', '.join(names)}")
        kind = schema.field(image).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or
                (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
            raise EclipError(f"{path}: column {image!r} holds {kind}, not image bytes (a binary column or a "
                             f"Hugging Face Image struct of bytes and path)")
        wanted = [c for c in dict.fromkeys([text, rid, "entities", "explanation", "label"]) if c and c in names]
        row = 0
        for batch in table_file.iter_batches(columns=wanted, batch_size=65536):
            values = batch.to_pydict()
            for i in range(batch.num_rows):
                key = values[rid][i] if rid else row
                caption = values[text][i]
                if not isinstance(caption, str) or not caption.strip():
                    skipped.append(Skipped(path, str(key), f"no text ({text})"))
                elif key is None:
                    skipped.append(Skipped(path, str(row), f"no id ({rid})"))
                else:
                    records.append(Record(str(key) if rid else f"{os.path.basename(path)}:{row}",
                                          parquet_address(path, image, row), caption.strip(),
                                          (values.get("explanation") or [None] * batch.num_rows)[i] or None,
                                          _entities(values.get("entities"), i, path, key),
                                          label=clean_label((values.get("label") or [None] * batch.num_rows)[i])))
                row += 1
    from eclip.data.readers import announce_skipped
    return announce_skipped(RecordList(records, skipped), dataset)



def _entities(column, i, path, key) -> list:
    if not column or column[i] in (None, ""):
        return []
    from eclip.data.readers import _entities as parse
    value = column[i]
    return parse(value if isinstance(value, (list, str)) else json.dumps(value), f"{path} row {key}")
