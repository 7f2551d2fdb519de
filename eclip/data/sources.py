"""What a --dataset string names, decided without reading it: a benchmark, a table of pairs
(.jsonl / .csv / .tsv), parquet with the images inside, webdataset shards, or img2dataset's
`files` folder. Cheap and torch-free, so the commands check their inputs before anything heavy.
"""
from __future__ import annotations

from pathlib import Path

from eclip.errors import EclipError

TABLE_SUFFIXES = (".jsonl", ".csv", ".tsv")
KINDS = ("benchmark", "table", "parquet", "shards", "files")


def source_kind(dataset) -> str | None:
    """One of KINDS, or None when `dataset` names none of them."""
    from eclip.data.benchmarks import BENCHMARKS
    from eclip.data.parquet import is_parquet_source
    from eclip.data.shards import is_files_folder, is_shard_source
    name = str(dataset)
    if name.lower() in BENCHMARKS:
        return "benchmark"
    if Path(name).suffix.lower() in TABLE_SUFFIXES:
        return "table"
    if is_shard_source(name):
        return "shards"
    if is_files_folder(name):          # before parquet: img2dataset writes NNNNN.parquet metadata beside it
        return "files"
    if is_parquet_source(name):
        return "parquet"
    return None


def check_source(dataset) -> str:
    """The kind of `dataset`, after the checks that need no model: shards that exist (or the first
    remote one opens), a parquet file or folder that exists. EclipError in one line otherwise."""
    kind = source_kind(dataset)
    if kind == "shards":
        from eclip.data.shards import list_shards
        list_shards(dataset)
    elif kind == "parquet":
        from eclip.data.parquet import parquet_files
        parquet_files(dataset)
    elif kind is None:
        from eclip.data.benchmarks import BENCHMARKS
        raise EclipError(f"--dataset {dataset}: neither a benchmark ({', '.join(BENCHMARKS)}), a .jsonl / .csv / "
                         f".tsv file, .parquet, webdataset shards (.tar, a brace pattern, a folder of .tar or a "
                         f"list of shard URLs) nor a folder of images with .txt captions")
    return kind
