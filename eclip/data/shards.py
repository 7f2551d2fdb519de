"""webdataset tar shards and img2dataset's `files` folders, to records.

A sample is the members that share a key (webdataset's rule: the name up to the first dot of
its last path part), as img2dataset writes them: `000010005.jpg`, `.txt`, `.json`. Shards are
named by a brace pattern (`shards/{00000..00099}.tar`, braceexpand), a folder of `.tar` files,
a text file listing one URL per line, or `pipe:COMMAND` (webdataset's convention; streamed
only). Local paths and fsspec URLs (https://, s3://, gs://, ... with the matching fsspec
package) are read the same way.

Reading uses eclip.data.tarmembers (tarfile is too slow on webdataset's PAX headers) over a file fsspec opens, not webdataset's pipeline: records need each
image member's byte offset (eclip.data.members reads it back on demand, so no image is held in
memory), and every bad sample must be counted and named with its shard and key, which
webdataset's handlers swallow. webdataset's own `gopen` opens `pipe:` URLs.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from eclip.data.members import is_remote, tar_address
from eclip.data.records import Record, clean_label
from eclip.errors import EclipError

DEFAULT_IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
DEFAULT_TEXT_KEY = "txt"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LIST_SUFFIXES = (".txt", ".lst", ".shards")
KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")    # webdataset.tariterators.base_plus_ext


@dataclass
class Columns:
    """Which fields make a pair (--image-key, --text-key, --id-key, as open_clip spells them).
    Shards: member extensions (`jpg;png`), or a field of the `json` member for text and id.
    Tables: column names."""
    image_key: Optional[str] = None      # ';'-list; None: jpg;png;jpeg;webp (shards), image (tables)
    text_key: Optional[str] = None       # None: txt (shards), text or caption (tables)
    id_key: Optional[str] = None         # None: __key__ (shards), id (tables)

    @classmethod
    def given(cls, image_key=None, text_key=None, id_key=None) -> Optional["Columns"]:
        """--image-key / --text-key / --id-key for the readers; None when none is given."""
        return cls(image_key, text_key, id_key) if (image_key or text_key or id_key) else None

    def image_exts(self) -> tuple:
        return tuple(k.strip().lower() for k in self.image_key.split(";") if k.strip()) \
            if self.image_key else DEFAULT_IMAGE_KEYS


@dataclass
class Skipped:
    """A sample that made no record: where it was and why (skipped.jsonl / errors.jsonl)."""
    shard: str
    key: str
    reason: str

    def to_log(self) -> dict:
        return {"id": self.key, "image": f"{self.shard}#{self.key}", "reason": self.reason}


class RecordList(list):
    """Records, and the samples left out while reading them (`skipped`: [Skipped]); for shards,
    `shard_numbers` {shard URL: its number in the whole list}."""
    skipped: list

    def __init__(self, records=(), skipped=(), shard_numbers=None):
        super().__init__(records)
        self.skipped = list(skipped)
        self.shard_numbers = shard_numbers or {}

    def partitions(self, items: list, field: str) -> list:
        """[(shard number, start, stop)]: the runs of `items` whose `field` (an image address) lies in
        one shard; embed writes one output partition per input shard."""
        from eclip.data.members import container_of
        out = []
        for i, item in enumerate(items):
            number = self.shard_numbers[container_of(item[field])]
            if out and out[-1][0] == number:
                out[-1] = (number, out[-1][1], i + 1)
            else:
                out.append((number, i, i + 1))
        return out


def shard_selection(text: Optional[str], count: int) -> range:
    """--shards A-B (both included, from 0) as a range over `count` shards; all when None."""
    if not text:
        return range(count)
    try:
        a, b = (int(p) for p in text.split("-", 1)) if "-" in text else (int(text), int(text))
    except ValueError:
        raise EclipError(f"--shards {text}: expected A-B, e.g. 0-499") from None
    if not 0 <= a <= b < count:
        raise EclipError(f"--shards {text}: the dataset has shards 0-{count - 1}")
    return range(a, b + 1)


# ---- which shards ------------------------------------------------------------------------------

def is_shard_source(dataset: str) -> bool:
    name = str(dataset)
    if name.startswith("pipe:"):
        return True
    low = name.lower()
    if low.endswith(SHARD_SUFFIXES) or (low.endswith(LIST_SUFFIXES) and not is_remote(name)):
        return True
    return not is_remote(name) and Path(name).expanduser().is_dir() and any(_local_tars(Path(name).expanduser()))


def list_shards(dataset: str) -> list[str]:
    """The shard URLs `dataset` names, checked to exist (local) or to open (remote, the first one);
    EclipError in one line otherwise. Cheap: nothing but names and one stat / request."""
    from braceexpand import braceexpand
    name = str(dataset)
    where = f"--dataset {name}"
    if name.startswith("pipe:"):
        return list(braceexpand(name))
    path = Path(name).expanduser()
    if not is_remote(name) and path.is_dir():
        urls = sorted(str(p) for p in _local_tars(path))
        if not urls:
            raise EclipError(f"{where}: no .tar shards in this folder")
        return urls
    if not is_remote(name) and name.lower().endswith(LIST_SUFFIXES):
        if not path.is_file():
            raise EclipError(f"{where}: shard list not found")
        from eclip.data.readers import read_lines
        urls = [line.strip() for _, line in read_lines(path) if line.strip() and not line.startswith("#")]
        urls = [u if is_remote(u) or u.startswith("pipe:") or os.path.isabs(u) else str(path.parent / u) for u in urls]
        if not urls:
            raise EclipError(f"{where}: the list names no shards")
        return [u for pattern in urls for u in _expand_checked(pattern, where)]
    return _expand_checked(name, where)


def _expand_checked(pattern: str, where: str) -> list[str]:
    from braceexpand import braceexpand
    if pattern.startswith("pipe:"):
        return list(braceexpand(pattern))
    urls = [u if is_remote(u) else os.path.abspath(os.path.expanduser(u)) for u in braceexpand(pattern)]
    if any(c in pattern for c in "*?["):
        urls = _globbed(urls, where)
    if not urls:
        raise EclipError(f"{where}: the pattern names no shards")
    if is_remote(urls[0]):
        _check_opens(urls[0], where)
        return urls
    missing = [u for u in urls if not os.path.isfile(u)]
    if len(missing) == len(urls):
        raise EclipError(f"{where}: no shard matches ({len(urls)} names, none exists; first: {urls[0]})")
    if missing:
        raise EclipError(f"{where}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})")
    return urls


def _globbed(patterns: list, where: str) -> list[str]:
    import fsspec
    out = []
    for p in patterns:
        fs, _, paths = fsspec.get_fs_token_paths(p)
        found = sorted(fs.glob(paths[0]))
        if is_remote(p):
            found = [fs.unstrip_protocol(f) for f in found]
        out += found
    if not out:
        raise EclipError(f"{where}: the pattern matches no shard")
    return out


def _check_opens(url: str, where: str) -> None:
    try:
        import fsspec
        with fsspec.open(url, "rb") as f:
            f.read(1)
    except ImportError as e:
        raise EclipError(f"{where}: reading {url.split('://')[0]}:// URLs needs a package that is not "
                         f"installed ({e.name}; e.g. pip install aiohttp for https://, s3fs for s3://)") from None
    except Exception as e:     # fsspec backends raise their own types
        raise EclipError(f"{where}: cannot open {url} ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def _local_tars(folder: Path):
    return (p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(SHARD_SUFFIXES))


# ---- samples -----------------------------------------------------------------------------------

@dataclass
class Sample:
    shard: str
    key: str
    parts: dict = field(default_factory=dict)     # ext -> bytes (small members) or (offset, size)


def open_shard(url: str, stream: bool = False):
    """A binary file object of a shard: local, fsspec URL, or pipe: (webdataset.gopen). `stream`: read
    once from the start (no range requests needed)."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen
        return gopen(url, "rb")
    if is_remote(url):
        import fsspec
        if stream:
            return fsspec.open(url, "rb", block_size=0).open()
        try:
            return fsspec.open(url, "rb").open()
        except ValueError as e:     # fsspec's HTTP file refuses a server without range requests
            raise EclipError(f"{url}: {str(e).split('.')[0]}; embed / evaluate / explain read images by "
                             f"byte range; train streams such shards") from None
    return open(url[len("file://"):] if url.startswith("file://") else url, "rb")


def shard_samples(url: str, image_exts: tuple, skipped: list, stream: bool = False) -> Iterator[Sample]:
    """Samples of one shard in order. Image members are left in the tar as (offset, size) unless
    `stream` (one pass over an unseekable stream: then their bytes are kept). A damaged tar ends
    the shard with one Skipped entry naming the last good key; the samples before it are kept."""
    try:
        f = open_shard(url, stream)
    except OSError as e:
        skipped.append(Skipped(url, "", f"shard unreadable ({e.strerror or type(e).__name__})"))
        return
    current, last = None, ""
    stream = stream or url.startswith("pipe:")
    from eclip.data.tarmembers import DamagedTar, tar_members
    try:
        with f:
            source = f
            if url.lower().endswith((".tar.gz", ".tgz")):
                import gzip
                source = gzip.GzipFile(fileobj=f)
            keep = None if stream else (lambda name: name.rsplit(".", 1)[-1].lower() not in image_exts)
            for name, offset, size, data in tar_members(source, keep, seekable=not stream):
                m = KEY_EXT.match(name)
                if not m:
                    continue
                key, ext = m[1], m[2].lower()
                if current is not None and key != current.key:
                    yield current
                    last = current.key
                    current = None
                if current is None:
                    current = Sample(url, key)
                current.parts[ext] = data if data is not None else (offset, size)
    except (DamagedTar, EOFError, OSError, ValueError) as e:
        damage = e
    else:
        if current is not None:
            yield current
        return
    reason = str(damage) if isinstance(damage, DamagedTar) else "truncated shard" if isinstance(damage, EOFError) \
        else f"damaged shard ({type(damage).__name__}: {str(damage)[:80]})"
    m = KEY_EXT.match(getattr(damage, "name", None) or "")
    if m and (current is None or m[1] != current.key):   # the damage starts a new sample: the one before is whole
        if current is not None:
            yield current
        current = Sample(url, m[1])
    skipped.append(Skipped(url, current.key if current else last, f"{reason}; the shard's later samples are lost"))


def folder_samples(folder: Path) -> Iterator[Sample]:
    """img2dataset's `files` output: NNNNN/NNNNNNNNN.jpg + .txt + .json, grouped by key (relative path
    without the extension); images stay files."""
    names = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names += [os.path.relpath(os.path.join(root, f), folder) for f in files if not f.startswith(".")]
    current = None
    for name in sorted(names, key=lambda n: (KEY_EXT.match(n)[1] if KEY_EXT.match(n) else n, n)):
        m = KEY_EXT.match(name)
        if not m or name.endswith(("_stats.json", ".parquet")):     # img2dataset's per-shard metadata
            continue
        if current is not None and m[1] != current.key:
            yield current
            current = None
        if current is None:
            current = Sample(str(folder), m[1])
        current.parts[m[2].lower()] = os.path.join(folder, name)
    if current is not None:
        yield current


def is_files_folder(dataset: str) -> bool:
    """A folder of image files each with a .txt beside it (img2dataset's `files` output)."""
    path = Path(str(dataset)).expanduser()
    if is_remote(str(dataset)) or not path.is_dir():
        return False
    for root, dirs, files in os.walk(path):
        stems = {f.rsplit(".", 1)[0] for f in files if f.lower().endswith(".txt")}
        if any(f.rsplit(".", 1)[0] in stems for f in files if f.lower().endswith(DEFAULT_IMAGE_KEYS)):
            return True
        dirs[:] = sorted(dirs)[:3]
    return False


def sample_record(sample: Sample, columns: Columns, image: Optional[str], skipped: list) -> Optional[Record]:
    """The record of a sample, or None (and a Skipped entry) when it lacks an image or a text.
    `image`: its address or path (None when it has no image member)."""
    def fail(reason):
        skipped.append(Skipped(sample.shard, sample.key, reason))

    meta = {}
    if "json" in sample.parts:
        raw = _bytes(sample.parts["json"])
        try:
            meta = json.loads(raw) if raw.strip() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return fail("json member is not valid JSON")
        if not isinstance(meta, dict):
            meta = {}
    if image is None:
        return fail(f"no image member ({';'.join(columns.image_exts())})")
    text_key = columns.text_key or DEFAULT_TEXT_KEY
    if text_key in sample.parts:
        try:
            text = _bytes(sample.parts[text_key]).decode("utf-8-sig")
        except UnicodeDecodeError:
            return fail(f"{text_key} member is not UTF-8 text")
    else:
        text = meta.get(text_key)
    if not isinstance(text, str) or not text.strip():
        return fail(f"no text ({text_key})")
    key = sample.key.rsplit("/", 1)[-1]       # files output: 00000/000000012 -> 000000012, as in its shards
    rid = key if not columns.id_key or columns.id_key == "__key__" else meta.get(columns.id_key)
    if rid is None or isinstance(rid, (dict, list)):
        return fail(f"no id ({columns.id_key} in the json member)")
    from eclip.data.readers import _entities
    try:
        entities = _entities(meta.get("entities"), f"{sample.shard} sample {sample.key}")
    except EclipError:
        return fail("'entities' in the json member is not a list of entities")
    explanation = meta.get("explanation")
    label = meta.get("label")     # a class for `evaluate --task classify`
    return Record(str(rid), image, text.strip(), explanation if isinstance(explanation, str) and explanation else None,
                  entities, label=clean_label(label))


def _bytes(part) -> bytes:
    if isinstance(part, (bytes, bytearray)):
        return bytes(part)
    with open(part, "rb") as f:       # a file of img2dataset's files output
        return f.read()


def read_shards(dataset: str, columns: Optional[Columns] = None, shards: Optional[str] = None) -> RecordList:
    """Records of every sample of the shards `dataset` names (image = a tar member address,
    eclip.data.members), in shard order; samples without an image or a text are left out and
    listed in `.skipped`. `shards` (A-B) reads only those (eclip embed --shards)."""
    columns = columns or Columns()
    every = list_shards(dataset)
    urls = [every[i] for i in shard_selection(shards, len(every))]
    exts = columns.image_exts()
    skipped, records = [], []
    for url in urls:
        if url.startswith("pipe:") or url.lower().endswith((".tar.gz", ".tgz")):
            raise EclipError(f"--dataset {dataset}: {url} can only be streamed (pipe: or compressed); "
                             f"train --shuffle-buffer streams it; embed / evaluate / explain need plain .tar shards they can seek in")
        for s in shard_samples(url, exts, skipped):
            hit = next((e for e in exts if e in s.parts), None)
            image = tar_address(url, f"{s.key}.{hit}", *s.parts[hit]) if hit else None
            record = sample_record(s, columns, image, skipped)
            if record is not None:
                records.append(record)
    from eclip.data.readers import announce_skipped
    return announce_skipped(RecordList(records, skipped, {u: i for i, u in enumerate(every)}), dataset)


def read_files_folder(dataset: str, columns: Optional[Columns] = None) -> RecordList:
    """Records of img2dataset's `files` output folder (images stay files)."""
    columns = columns or Columns()
    exts = columns.image_exts()
    folder = Path(dataset).expanduser().resolve()
    skipped, records = [], []
    for s in folder_samples(folder):
        hit = next((e for e in exts if e in s.parts), None)
        record = sample_record(s, columns, s.parts[hit] if hit else None, skipped)
        if record is not None:
            records.append(record)
    from eclip.data.readers import announce_skipped
    return announce_skipped(RecordList(records, skipped), dataset)
