"""The ONNX copy of a model's CLIP towers: written once per model, cached, checked on every load.

Where: <eclip cache>/onnx/<architecture>-<key>/ ($ECLIP_CACHE or ~/.cache/eclip), holding
image.onnx and text.onnx, their weights in image.onnx.data / text.onnx.data (memory-mapped
by ONNX Runtime), and meta.json. The folder is assembled under a temporary name
(.<entry>.<pid>.<host>.<random>) and renamed into place, so an entry is whole or absent; the
temporary folders of exporters that died (killed mid-export) are removed by the next export.

meta.json records each file's size and sha256. An entry is checked when it is opened: the sizes
always, the checksums once per change of a file's size or modification time (verified.json holds
the (size, mtime) last verified), so a copy damaged in place, even at the same size, is rebuilt,
and an unchanged one costs a stat per file. A change that keeps the modification time (bit rot
under the filesystem) is not detected.

A cache that cannot be written (read-only, full disk, no permission) is no error: the model runs
on torch (eclip.runtime.engine says so in one note), or, with --engine onnx, exit 2 naming it.

The key (eclip.model.source.ModelSource.key) covers the architecture, the weights file's real
path, size, mtime and inode, and the versions of eclip's export, torch and open_clip: changed
weights give a new entry, and the entry of the old weights of the same file is removed. A
truncated or unreadable entry is removed and written again.

Writing one needs torch and open_clip (the towers are traced with torch.onnx.export, then
checked against the torch model on random pixels and sample captions): ~10-30 s on 2 cores,
once. A model the ONNX path cannot reproduce (tokenizer other than CLIP's BPE, unusual
preprocessing, outputs that differ by more than 1e-4) gets an entry that says so and uses torch.
"""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

from eclip.atomic import disk_full, write_text
from eclip.checkpoint import sha256_file
from eclip.atomic import process_alive
from eclip.config import eclip_cache_dir
from eclip.errors import EclipError

EXPORT_FORMAT = 1          # bump when what is exported, or how, changes
TOLERANCE = 1e-4           # largest |ONNX - torch| accepted at export, on normalised features
FILES = ("image.onnx", "image.onnx.data", "text.onnx", "text.onnx.data")
SAMPLE_CAPTIONS = ["Queen Elizabeth II at Windsor", "Zoë Saldaña in Köln &amp; 東京", "", "a " * 100]
STAMP = "verified.json"    # {file: [size, mtime_ns]} whose sha256 matched meta.json's
HOST = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:40] or "host"   # no dots: names split on them
WRITE_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT)
UNOWNED_AFTER_S = 24 * 3600   # a temporary folder whose writer is unknown (earlier eclip) is stale after this


class CacheNotWritable(EclipError):
    """The ONNX copy cannot be written to the cache: eclip.runtime.engine runs the model on torch
    instead, or (--engine onnx) exits 2 with this message."""

    def __init__(self, where: Path, error: BaseException):
        self.where = where
        if disk_full(error, where if where.exists() else None):
            self.reason = "no space left on device"
        elif isinstance(error, OSError) and error.strerror:
            self.reason = error.strerror[:1].lower() + error.strerror[1:]
        else:
            self.reason = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        super().__init__(f"{where}: cannot write the ONNX copy of this model here ({self.reason}); set "
                         f"ECLIP_CACHE to a writable folder, or use --engine torch")


def cache_root() -> Path:
    return eclip_cache_dir() / "onnx"


def package_version(name: str) -> str:
    """A package's version from its version.py, without importing it (torch, open_clip)."""
    spec = importlib.util.find_spec(name)
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "version.py"
        found = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", path.read_text()) if path.is_file() else None
        if found:
            return found.group(1)
    from importlib.metadata import version
    return version({"open_clip": "open_clip_torch"}.get(name, name))


def entry_folder(source) -> Path:
    versions = f"{EXPORT_FORMAT}-{package_version('torch')}-{package_version('open_clip')}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.arch).stem if source.arch.endswith(".json")
                  else source.arch)[:40]
    import hashlib
    return cache_root() / f"{slug}-{hashlib.sha256((source.key() + versions).encode()).hexdigest()[:16]}"


def read_entry(folder: Path) -> dict | None:
    """meta.json of a whole entry, or None (absent, or broken: then it is removed)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != EXPORT_FORMAT:
            raise ValueError("format")
        if "unsupported" not in meta:
            for name in FILES:
                if (folder / name).stat().st_size != meta["sizes"][name]:
                    raise ValueError(f"{name}: truncated or changed")
            verify_checksums(folder, meta)
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        discard(folder)
        return None


def file_stamps(folder: Path) -> dict:
    stamps = {}
    for name in FILES:
        st = (folder / name).stat()
        stamps[name] = [st.st_size, st.st_mtime_ns]
    return stamps


def verify_checksums(folder: Path, meta: dict) -> None:
    """ValueError unless every file's sha256 is meta.json's. A file is hashed only when its (size, mtime)
    differs from the one last verified (verified.json), which is then updated (when the cache allows)."""
    try:
        verified = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        verified = {}
    now = file_stamps(folder)      # taken before hashing: a file changed meanwhile is hashed next time
    changed = [name for name in FILES if verified.get(name) != now[name]]
    for name in changed:
        if sha256_file(folder / name) != meta["sha256"][name]:
            raise ValueError(f"{name}: checksum differs (damaged)")
    if changed:
        try:
            write_text(folder / STAMP, json.dumps(now))
        except OSError:
            pass               # a read-only cache: verified again next time


def discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def remove_stale_work() -> None:
    """Remove the temporary folders of exports whose process is gone (killed mid-export): those named
    after a dead process of this host, and unnamed ones (earlier eclip) a day old."""
    for path in cache_root().iterdir():
        if not path.name.startswith(".") or not path.is_dir():
            continue
        parts = path.name.rsplit(".", 3)          # ".ENTRY.PID.HOST.RANDOM" -> [".ENTRY", PID, HOST, RANDOM]
        if len(parts) == 4 and parts[1].isdigit():
            if parts[2] != HOST or process_alive(int(parts[1])):
                continue
        else:
            try:
                if time.time() - path.stat().st_mtime < UNOWNED_AFTER_S:
                    continue
            except OSError:
                continue
        discard(path)


def work_folder(folder: Path) -> Path:
    """A new private temporary folder for the entry `folder`, named after its writer."""
    while True:
        work = cache_root() / f".{folder.name}.{os.getpid()}.{HOST}.{secrets.token_hex(4)}"
        try:
            work.mkdir(mode=0o700)
            return work
        except FileExistsError:
            continue


def load_or_export(spec, source, throughput: bool = False):
    """The OnnxCLIP for these options, exporting it first if needed; or, when this model runs on
    torch only, the reason (cached too, so later runs do not try again). CacheNotWritable when the
    copy cannot be written."""
    from eclip.runtime.onnxclip import OnnxCLIP
    folder = entry_folder(source)
    for attempt in range(2):
        meta = read_entry(folder)
        if meta is None:
            meta = export(spec, source, folder)
        if "unsupported" in meta:
            return meta["unsupported"]
        try:
            return OnnxCLIP(folder, meta, source.identity, throughput=throughput)
        except Exception as e:   # ONNX Runtime refuses a damaged file: write the entry again, once
            if attempt:
                raise EclipError(f"{folder}: the ONNX copy of this model does not load "
                                 f"({str(e).splitlines()[0][:160]}); run with --engine torch") from None
            discard(folder)


def export(spec, source, folder: Path) -> dict:
    """Trace the towers to ONNX, check them against torch, and move the entry into place."""
    from dataclasses import replace

    from eclip.console import note
    from eclip.model.factory import load_inference_model
    started = time.perf_counter()
    try:
        cache_root().mkdir(parents=True, exist_ok=True)
        remove_stale_work()
        work = work_folder(folder)
    except OSError as e:
        raise CacheNotWritable(cache_root(), e) from None
    try:
        note(f"eclip: writing the ONNX copy of this model for fast CPU starts (once, about half a minute): {folder}")
        model = load_inference_model(replace(spec, device="cpu", precision="fp32"), source=source)
        meta = export_towers(model, work)
        meta.update(format=EXPORT_FORMAT, key=source.key(), source=source.identity,
                    weights=os.path.realpath(source.weights) if source.weights else None,
                    versions={"torch": package_version("torch"), "open_clip": package_version("open_clip")},
                    seconds=round(time.perf_counter() - started, 1))
        (work / "meta.json").write_text(json.dumps(meta, indent=1))
        if "unsupported" not in meta:
            (work / STAMP).write_text(json.dumps(file_stamps(work)))
        _install(work, folder, meta)
    except Exception as e:
        if _write_failed(e, work):
            raise CacheNotWritable(cache_root(), e) from None
        raise
    finally:
        discard(work)
    return read_entry(folder) or meta


def _write_failed(e: BaseException, work: Path) -> bool:
    """Did writing the cache fail (full disk, read-only, permissions), rather than the export itself?"""
    return (isinstance(e, OSError) and e.errno in WRITE_ERRORS) or disk_full(e, work if work.exists() else None)


def _install(work: Path, folder: Path, meta: dict) -> None:
    """Rename the finished entry into place (another process may have won the race: keep its
    entry) and remove entries made from earlier contents of the same weights file."""
    try:
        os.rename(work, folder)
    except OSError:
        if read_entry(folder) is None:
            discard(folder)
            os.rename(work, folder)
    if meta.get("weights"):
        for other in cache_root().iterdir():
            if other == folder or other.name.startswith("."):
                continue
            try:
                old = json.loads((other / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            if old.get("weights") == meta["weights"] and old.get("key") != meta["key"]:
                discard(other)


def export_towers(model, work: Path) -> dict:
    """Trace the image and text towers into `work` (FILES) and check them against torch.

    -> meta (without the keys export() adds); {"unsupported": reason} when ONNX cannot stand in.
    Used by the cache here and by `eclip export --format onnx` (eclip.exporters.onnx)."""
    from eclip.runtime.transform import supports
    tokenizer = clip_bpe_settings(model)
    if tokenizer is None:
        return {"unsupported": "the text tokenizer is not CLIP's BPE"}
    if not supports(model.config.preprocess):
        return {"unsupported": f"preprocessing {model.config.preprocess} needs torchvision"}
    try:
        trace_towers(model, work)
        worst = _compare(model, work, tokenizer)
    except Exception as e:   # an architecture the tracer cannot handle: torch runs it
        if _write_failed(e, work):   # but a full disk is no property of the model: nothing is recorded
            raise
        return {"unsupported": f"export failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"}
    if worst > TOLERANCE:
        return {"unsupported": f"ONNX features differ from torch by {worst:.2e}"}
    return {"name": model.config.clip_name, "embed_dim": model.config.clip_config["embed_dim"],
            "logit_scale": float(model.logit_scale.detach()),
            "preprocess": model.config.preprocess, "tokenizer": tokenizer, "max_difference": worst,
            "sizes": {name: (work / name).stat().st_size for name in FILES},
            "sha256": {name: sha256_file(work / name) for name in FILES}}


def clip_bpe_settings(model) -> dict | None:
    """The settings of eclip.runtime.tokenizer.ClipTokenizer that reproduce this model's tokenizer,
    or None when it is another kind (a Hugging Face tokenizer, a reduction mask)."""
    from open_clip.tokenizer import SimpleTokenizer
    tok = getattr(model.tokenizer, "_wrapped", model.tokenizer)   # under eclip.model.text_limit.CappedTokenizer
    if not isinstance(tok, SimpleTokenizer) or getattr(tok, "reduction_fn", None) is not None:
        return None
    kwargs = model.config.clip_config.get("text_cfg", {}).get("tokenizer_kwargs") or {}
    return {"context_length": int(tok.context_length), "clean": kwargs.get("clean", "lower"),
            "additional_special_tokens": kwargs.get("additional_special_tokens")}


def _tower(model, kind: str):
    """A torch module for export: pixels or token ids -> L2-normalised features."""
    import torch

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.encode_images(x) if kind == "image" else self.model.encode_texts(x)
    return Tower().eval()


def trace_towers(model, work: Path) -> None:
    """image.onnx and text.onnx (+ .data) in `work`: pixels / token ids -> L2-normalised features."""
    import warnings

    import onnx
    import torch
    size = model.config.preprocess.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    inputs = {"image": ("pixels", torch.randn(2, 3, h, w)),
              "text": ("tokens", model.tokenize(["a photo", "the flag of Japan"]))}
    for kind, (name, example) in inputs.items():
        path = work / f"{kind}.onnx"
        # with gradients on: under no_grad nn.MultiheadAttention takes its fused fast path, which
        # the TorchScript exporter cannot translate
        with warnings.catch_warnings(), torch.inference_mode(False), torch.enable_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(_tower(model, kind), (example,), str(path), dynamo=False, opset_version=17,
                              input_names=[name], output_names=["features"],
                              dynamic_axes={name: {0: "batch"}, "features": {0: "batch"}})
        graph = onnx.load(str(path))   # weights to a side file that ONNX Runtime maps instead of copying
        onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{kind}.onnx.data", size_threshold=1024)


def _compare(model, work: Path, tokenizer: dict) -> float:
    """Largest |ONNX - torch| over random pixels and sample captions, tokenized both ways."""
    import numpy as np
    import torch

    from eclip.runtime.onnxclip import OnnxCLIP
    from eclip.runtime.tokenizer import ClipTokenizer
    ours = ClipTokenizer(tokenizer["context_length"], tokenizer["clean"], tokenizer["additional_special_tokens"])
    if not np.array_equal(ours(SAMPLE_CAPTIONS), model.tokenize(SAMPLE_CAPTIONS).numpy()):
        return float("inf")
    meta = {"embed_dim": model.config.clip_config["embed_dim"], "logit_scale": 1.0, "tokenizer": tokenizer,
            "preprocess": model.config.preprocess}
    onnx_model = OnnxCLIP(work, meta, {}, throughput=False)
    size = model.config.preprocess.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    pixels = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        image_ref = model.encode_images(pixels).numpy()
        text_ref = model.encode_texts(model.tokenize(SAMPLE_CAPTIONS)).numpy()
    return float(max(np.abs(onnx_model.encode_images(pixels.numpy()) - image_ref).max(),
                     np.abs(onnx_model.encode_texts(SAMPLE_CAPTIONS) - text_ref).max()))
