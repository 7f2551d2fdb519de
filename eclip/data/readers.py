"""Readers: benchmark folders (one module each in eclip/data/benchmarks/), or the user's own
table, to records. The checks shared by every reader live here.

Every reader returns `Record`s with absolute image paths and fails at once, in one
line, on a missing folder, a malformed file or an image path that leaves the data
folder. Readers never open images: a bad image is a per-item problem that train
and embed skip and log (eclip.data.images), a bad dataset file is not.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

from eclip.data.benchmarks import BENCHMARKS
from eclip.data.records import Record, clean_label
from eclip.errors import EclipError, json_problem


def default_data_root(name: str) -> Path:
    """$ECLIP_DATA/<name>, else ~/.cache/eclip/data/<name>."""
    base = os.environ.get("ECLIP_DATA")
    return (Path(base) if base else Path.home() / ".cache" / "eclip" / "data") / name


def read_dataset(dataset: str, data_root: Optional[Path] = None, split: str = "train",
                 explanations: Optional[Path] = None, image_folder: Optional[str] = None,
                 columns=None, protocol: Optional[str] = None) -> list[Record]:
    """Records of a benchmark split (eclip.data.benchmarks detects the layout on disk), or of a
    .jsonl / .csv file (whose `split` is ignored: one file is one set of pairs).

    With `explanations`, an `eclip explain` cache or the EntityCLIP authors' CapDsc_mistral file
    fills each record's explanation (eclip.data.explanations). `image_folder` picks a benchmark's
    image folder where its layout offers a choice (GoodNews: images or resized). `columns`
    (eclip.data.shards.Columns) names the image / text / id fields of tables, parquet and shards.
    `protocol` "paper" reads a benchmark as the reference code does (eclip.protocol): empty captions
    kept, GoodNews test with its broken_images.txt entries, GoodNews train/val without unexplained pairs.
    """
    name = str(dataset).lower()
    key_parts = 1
    if name in BENCHMARKS:
        from eclip.data.benchmarks import authors_key_parts, read_benchmark
        root = Path(data_root).expanduser() if data_root else default_data_root(name)
        records = read_benchmark(name, root, split, image_folder, paper=protocol == "paper")
        key_parts = authors_key_parts(name)
    elif image_folder is not None:
        raise EclipError(f"--image-folder {image_folder}: only for a benchmark; a file's image paths "
                         "say where its images are")
    else:
        records = read_source(dataset, columns)   # tables, parquet, shards, files folders (eclip.data.sources)
    if explanations is not None:
        from eclip.console import note
        from eclip.data.explanations import attach_explanations
        records, missing, kind = attach_explanations(records, explanations, key_parts)
        note(f"explanations: {len(records) - missing} of {len(records)} records from {explanations} ({kind}); "
             f"{missing} fall back to their caption")
    if protocol == "paper" and name == "goodnews" and str(split).lower() != "test":
        records = _explained_only(records, explanations, split)
    return records


def _explained_only(records: list[Record], explanations, split) -> list[Record]:
    """GoodNews train/val under --protocol paper: the reference's reader drops pairs without an
    explanation (`img_id not in self.cap_info`), so validation averages over the same pairs."""
    from eclip.console import note
    if explanations is None:
        note(f"--protocol paper: GoodNews {split} read without --explanations, so pairs without one cannot be "
             f"left out as the reference does")
        return records
    kept = [r for r in records if r.explanation]
    if len(kept) < len(records):
        note(f"--protocol paper: GoodNews {split}: left out {len(records) - len(kept)} of {len(records)} pairs "
             f"without an explanation, as the reference's reader does")
    return kept


def dataset_label(dataset, split: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(dataset, split) as reports and manifests name them: a benchmark by its name and split, a
    .jsonl / .csv file by its absolute path and no split (one file is one set of pairs)."""
    if dataset is None or str(dataset).lower() in BENCHMARKS:
        return dataset, split
    return os.path.abspath(str(dataset)), None


# --- the user's own pairs ----------------------------------------------------------------

def read_source(dataset, columns=None) -> list[Record]:
    """Records of a table, parquet, shards or a files folder (eclip.data.sources decides which);
    samples left out while reading are in the result's `.skipped` where the format has them."""
    from eclip.data.sources import check_source
    kind = check_source(dataset)
    if kind == "table":
        return read_table(dataset, columns)
    if kind == "parquet":
        from eclip.data.parquet import read_parquet
        return read_parquet(dataset, columns)
    if kind == "shards":
        from eclip.data.shards import read_shards
        return read_shards(dataset, columns)
    from eclip.data.shards import read_files_folder
    return read_files_folder(dataset, columns)


def announce_skipped(records, dataset):
    """`records` (a RecordList) after the duplicate-id check, with a note on the samples it left out."""
    if records.skipped:
        from eclip.console import note
        first = records.skipped[0]
        note(f"{dataset}: left out {len(records.skipped)} sample(s) without a usable image or text; "
             f"first: {first.shard} {first.key}: {first.reason}")
    return _checked(records, dataset, len(records))


def read_table(path, columns=None) -> list[Record]:
    """A .jsonl or .csv file of pairs: `image` (relative to the file's folder, or absolute),
    `text` (`caption` is accepted too, so `Record.to_dict` lines read back), and optional
    `id` (default: the line number), `explanation`, `entities` (a JSON list; in CSV, a
    JSON string) and `label` (a class, for `evaluate --task classify`). A .tsv file is a CSV with tabs. `columns` (eclip.data.shards.Columns) renames
    the image, text and id fields (--image-key, --text-key, --id-key)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EclipError(f"{path}: dataset file not found")
    folder = path.resolve().parent
    records = []
    for line, row in (_jsonl_rows(path) if path.suffix.lower() == ".jsonl" else _csv_rows(path)):
        where = f"{path} line {line}"
        if columns is not None:
            row = _renamed(row, columns)
        image, text = row.get("image"), row.get("text", row.get("caption"))
        for field, value in (("image", image), ("text", text)):
            if value is not None and not isinstance(value, str):
                raise EclipError(f"{where}: '{field}' must be a string (got {type(value).__name__})")
            if value is None or not value.strip():
                raise EclipError(f"{where}: missing field '{field}'")
        image_path = Path(image).expanduser()
        if not image_path.is_absolute():   # absolute paths are the user's own choice
            image_path = Path(_inside(folder, image, where))
        explanation = row.get("explanation") or None
        if explanation is not None and not isinstance(explanation, str):
            raise EclipError(f"{where}: 'explanation' is not text")
        rid = row.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int, float, type(None))):
            raise EclipError(f"{where}: 'id' must be a string or a number (got {type(rid).__name__})")
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, (str, int, type(None))):
            raise EclipError(f"{where}: 'label' must be a string or a whole number (got {type(label).__name__})")
        records.append(Record(str(line) if rid in (None, "") else str(rid), str(image_path), text,
                              explanation, _entities(row.get("entities"), where),
                              clean_label(label)))
    return _checked(records, path, len(records))


def _renamed(row: dict, columns) -> dict:
    """`row` with the user's --image-key / --text-key / --id-key fields under eclip's own names."""
    out = dict(row)
    for given, ours in ((columns.image_key, "image"), (columns.text_key, "text"), (columns.id_key, "id")):
        if given:
            out[ours] = row.get(given)
            if ours == "text":
                out.pop("caption", None)
    return out


def read_utf8(path) -> str:
    """The text of `path` (a UTF-8 BOM dropped); EclipError naming the line of the first byte
    that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise EclipError(f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); "
                         f"save the file as UTF-8") from None


def read_lines(path) -> list[tuple[int, str]]:
    """[(line number, text)] of a UTF-8 file (read_utf8), split at \n only (a \r before it is
    dropped): str.splitlines() would also split inside a caption at U+2028, U+0085 or a form feed."""
    return [(number, text[:-1] if text.endswith("\r") else text)
            for number, text in enumerate(read_utf8(path).split("\n"), start=1)]


def _jsonl_rows(path):
    for line, text in read_lines(path):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise EclipError(f"{path} line {line}: invalid JSON ({json_problem(e)})") from None
        if not isinstance(row, dict):
            raise EclipError(f"{path} line {line}: expected a JSON object")
        yield line, row


def _csv_rows(path):
    # strict: an unterminated quote is an error, not a field that swallows the rest of the file
    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""), strict=True,
                            delimiter="\t" if Path(path).suffix.lower() == ".tsv" else ",")
    while True:
        start = reader.reader.line_num + 1   # where the next record begins
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            reason = "a quoted field is never closed (unterminated quote)" if "end of data" in str(e) else str(e)
            raise EclipError(f"{path} line {start}: {reason}") from None
        yield reader.line_num, row


def _entities(value, where: str) -> list:
    """[{"text", "type"}, ...] from a list (JSONL) or a JSON string (CSV); bare strings get type ""."""
    if value in (None, ""):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise EclipError(f"{where}: 'entities' is not a JSON list") from None
    if not isinstance(value, list):
        raise EclipError(f"{where}: 'entities' is not a list")
    out = []
    for e in value:
        if isinstance(e, str):
            e = {"text": e, "type": ""}
        if not isinstance(e, dict) or not isinstance(e.get("text"), str):
            raise EclipError(f"{where}: each entity needs a 'text'")
        out.append({"text": e["text"], "type": str(e.get("type") or "")})
    return out


# --- shared checks -----------------------------------------------------------------------

def _root(root, benchmark: str, layout: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise EclipError(f"{root}: {benchmark} data root not found ({layout}; "
                         "pass --data-root or set $ECLIP_DATA)")
    return root.resolve()


def _load_json(path: Path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EclipError(f"{path} line {e.lineno}: invalid JSON ({json_problem(e)})") from None
    except UnicodeDecodeError:
        raise EclipError(f"{path}: not UTF-8 text") from None


def _json_list(path: Path, fields) -> list[dict]:
    items = _load_json(path)
    if not isinstance(items, list):
        raise EclipError(f"{path}: expected a JSON list of records")
    for i, d in enumerate(items):
        missing = [k for k in fields if not isinstance(d, dict) or k not in d]
        if missing:
            raise EclipError(f"{path}: record {i} lacks '{missing[0]}'")
    return items


def _has_caption(d: dict, path: Path, keep_empty: bool = False) -> bool:
    """Benchmarks hold a few pairs without a caption: nothing to match, so they are left out; with
    `keep_empty` (--protocol paper) an empty caption stays, as in the reference's readers (they count
    in its recall denominators), and only a null one goes."""
    caption = d["caption"]
    if caption is not None and not isinstance(caption, str):
        raise EclipError(f"{path}: caption of record {d.get('id', d.get('image_id'))!r} is not text")
    return caption is not None if keep_empty else bool(caption and caption.strip())


def _inside(root: Path, relative: str, where) -> str:
    """The absolute path of `relative` under `root`, refusing any that leaves it.

    Lexical (normpath), not Path.resolve: resolving each of a million files is slow on
    network disks, and a symlinked image folder inside the root is a normal set-up.
    `root` itself is resolved once by the caller.
    """
    path = Path(os.path.normpath(root / str(relative)))
    if not path.is_relative_to(root):
        raise EclipError(f"{where}: image path {relative!r} leaves {root}")
    return str(path)


def _checked(records: list[Record], path, total: int, number_duplicates: bool = False) -> list[Record]:
    """Refuse duplicate ids (they would merge two pairs in every id-keyed output) and say
    how many pairs without a caption were left out. A benchmark (`number_duplicates`) keeps a
    repeated id as the reference does, as its own pair: the second is renamed ID#2, the third ID#3,
    counted and named on stderr."""
    seen, repeats = {}, []
    for i, r in enumerate(records):
        if r.id in seen:
            if not number_duplicates:
                raise EclipError(f"{path}: duplicate id {r.id!r}")
            seen[r.id] += 1
            repeats.append(r.id)
            records[i] = replace(r, id=f"{r.id}#{seen[r.id]}")
        else:
            seen[r.id] = 1
    if repeats:
        from eclip.console import note
        note(f"{path}: {len(repeats)} records repeat an earlier record's id (first: {repeats[0]!r}); each is kept as "
             f"its own pair, renamed ID#2, ID#3, ...")
    if total > len(records):
        from eclip.console import note
        note(f"{path}: left out {total - len(records)} of {total} pairs without a caption")
    return records
