"""Images that live inside a container: a member of a webdataset tar shard, or a cell of a parquet
table. A `Record.image` names one by an address, so the one record type still carries a plain
string and train / embed / evaluate read the bytes only when they load the image:

    /data/shards/00012.tar#000120045.jpg@1536+48211      tar member: byte offset + size
    /data/part-0.parquet#image@row17                     parquet: column, row

Containers may be local paths or fsspec URLs (https://, s3://, ...): the byte range of a tar
member is then one ranged read. Open files are kept per process (DataLoader workers open their
own after the fork) so reading a shard's samples in order costs one open.
"""
from __future__ import annotations

import os
import re
from typing import Optional

TAR = re.compile(r"^(?P<container>.+)#(?P<member>[^#]+)@(?P<offset>\d+)\+(?P<size>\d+)$")
PARQUET = re.compile(r"^(?P<container>.+)#(?P<column>[^#]+)@row(?P<row>\d+)$")


def tar_address(shard: str, member: str, offset: int, size: int) -> str:
    return f"{shard}#{member}@{offset}+{size}"


def parquet_address(path: str, column: str, row: int) -> str:
    return f"{path}#{column}@row{row}"


def is_address(image: str) -> bool:
    return bool(TAR.match(image) or PARQUET.match(image))


def container_of(image: str) -> Optional[str]:
    """The shard or parquet file an address points into; None for a plain path."""
    m = TAR.match(image) or PARQUET.match(image)
    return m["container"] if m else None


class MemberError(OSError):
    """The bytes of an address cannot be read; str() is the short reason the skip logs record."""


def read_member(image: str) -> bytes:
    """The bytes an address names; MemberError (an OSError) when they cannot be read."""
    m = TAR.match(image)
    if m:
        offset, size = int(m["offset"]), int(m["size"])
        data = _read_range(m["container"], offset, size)
        if len(data) < size:
            raise MemberError(f"truncated shard ({len(data)} of {size} bytes of {m['member']})")
        return data
    m = PARQUET.match(image)
    if m:
        return _parquet_cell(m["container"], m["column"], int(m["row"]))
    raise MemberError(f"not a container address: {image}")


def image_sha256(image: str) -> str:
    """sha256 of an image's bytes, whether a file or an address (OSError when unreadable)."""
    import hashlib
    if is_address(image):
        return hashlib.sha256(read_member(image)).hexdigest()
    h = hashlib.sha256()
    with open(image, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


# ---- per-process open files -------------------------------------------------------------------

_open: dict = {}


def _handle(container: str):
    key = (os.getpid(), container)
    if key not in _open:
        if len(_open) > 64:                # a long epoch visits many shards: keep the recent ones
            for k in list(_open)[:32]:
                _close(_open.pop(k))
        _open[key] = _open_container(container)
    return _open[key]


def _close(handle) -> None:
    try:
        handle.close() if hasattr(handle, "close") else os.close(handle)
    except OSError:
        pass


def _open_container(container: str):
    try:
        if is_remote(container):
            import fsspec
            return fsspec.open(container, "rb").open()
        path = container[len("file://"):] if container.startswith("file://") else container
        return os.open(path, os.O_RDONLY)       # os.pread: no shared file offset between threads / forks
    except FileNotFoundError:
        raise MemberError("shard missing") from None
    except OSError as e:
        raise MemberError(f"shard unreadable ({e.strerror or type(e).__name__})") from None


def _read_range(container: str, offset: int, size: int) -> bytes:
    handle = _handle(container)
    try:
        if isinstance(handle, int):
            return os.pread(handle, size, offset)
        handle.seek(offset)
        return handle.read(size)
    except OSError as e:
        raise MemberError(f"shard unreadable ({e.strerror or type(e).__name__})") from None


_row_group: dict = {}   # (pid, path, column) -> (first row, last row + 1, pyarrow column of the group)


def _parquet_cell(path: str, column: str, row: int) -> bytes:
    """Bytes of one image cell: a Hugging Face `Image` struct {bytes, path} or a plain binary column.
    The row's whole row group is read once and kept, so rows read in order cost one read per group."""
    key = (os.getpid(), path, column)
    cached = _row_group.get(key)
    if cached is None or not cached[0] <= row < cached[1]:
        try:
            handle = _handle_parquet(path)
            start = 0
            for g in range(handle.metadata.num_row_groups):
                n = handle.metadata.row_group(g).num_rows
                if row < start + n:
                    break
                start += n
            else:
                raise MemberError(f"no row {row} in this table")
            values = handle.read_row_group(g, columns=[column]).column(0)
        except MemberError:
            raise
        except Exception as e:       # pyarrow raises its own types on damaged files
            raise MemberError(f"unreadable table ({type(e).__name__}: {str(e)[:120]})") from None
        _row_group.clear()           # one group per process: memory stays bounded
        cached = _row_group[key] = (start, start + n, values)
    value = cached[2][row - cached[0]].as_py()
    if isinstance(value, dict):      # datasets' Image feature: {"bytes", "path"}
        data = value.get("bytes")
        if not data and value.get("path"):
            local = value["path"]
            if not os.path.isabs(local) and not is_remote(path):
                local = os.path.join(os.path.dirname(path), local)
            with open(local, "rb") as f:
                return f.read()
        value = data
    if not value:
        raise MemberError("empty image bytes")
    return bytes(value)


def _handle_parquet(path: str):
    import pyarrow.parquet as pq
    key = (os.getpid(), "parquet", path)
    if key not in _open:
        if is_remote(path):
            import fsspec
            _open[key] = pq.ParquetFile(fsspec.open(path, "rb").open())
        else:
            _open[key] = pq.ParquetFile(path)
    return _open[key]
