"""`--pretrained FILE`: a weights file the user gives, checked before anything reads it.

eclip reads safetensors (and numpy .npz, big_vision's format, which open_clip loads into
SigLIP models) and never unpickles: a PyTorch .pt/.bin/.pth file is refused with the
one-line command that converts it, to be run by the user on a file they trust. A file that
is malformed, or whose tensors do not fit the model, is one line naming it (exit 2).
"""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from eclip.checkpoint import MAX_HEADER
from eclip.errors import EclipError



def convert_command(path: Path) -> str:
    """A one-line python command that writes PATH's tensors to PATH-without-suffix.safetensors."""
    src, dst = str(path).replace("'", "\\'"), str(path.with_suffix(".safetensors")).replace("'", "\\'")
    load = f"torch.load('{src}', weights_only=True, map_location='cpu')"
    return (f"python -c \"import torch, safetensors.torch as s; d = {load}; d = d.get('state_dict', d); "
            f"s.save_file({{k: v.clone().contiguous() for k, v in d.items()}}, '{dst}')\"")


def sniff(path: Path) -> str:
    """'safetensors', 'npz' or 'pickle' from the file's first bytes (the suffix is not trusted)."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if head[:4] == b"PK\x03\x04":   # a zip: numpy's .npz, or torch.save's archive (pickle inside)
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            raise EclipError(f"--pretrained {path}: a damaged zip file, not weights eclip can read") from None
        if any(n.endswith(".pkl") for n in names):
            return "pickle"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise EclipError(f"--pretrained {path}: a zip file that holds neither numpy arrays nor weights")
    if head[:1] == b"\x80":   # a pickle (protocol 2 and later): torch.save's legacy format
        return "pickle"
    if len(head) >= 9:
        n = struct.unpack("<Q", head[:8])[0]
        if head[8:9] == b"{" or n > MAX_HEADER or n > size - 8:
            return "safetensors"   # its header says so, or a malformed one: safetensors names the fault
    raise EclipError(f"--pretrained {path}: not a weights file eclip can read (expected .safetensors)")


def check_weights_file(path) -> str:
    """The format of a user's weights file, after refusing pickles and malformed safetensors."""
    path = Path(path)
    kind = sniff(path)
    if kind == "pickle":
        raise EclipError(f"--pretrained {path}: holds pickled data (a PyTorch .pt/.bin/.pth file), which eclip "
                         f"never loads because unpickling can run code; convert it to safetensors once, on a file "
                         f"you trust, then pass the .safetensors file: {convert_command(path)}")
    if kind == "safetensors":
        from eclip.checkpoint import read_safetensors_header
        try:   # header, offsets and size checked without torch: this runs before any model loads
            read_safetensors_header(path)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise EclipError(f"--pretrained {path}: not a readable .safetensors file ({first})") from None
        if path.suffix.lower() != ".safetensors":   # open_clip picks its reader by the suffix
            raise EclipError(f"--pretrained {path}: holds safetensors data; name it .safetensors")
    elif path.suffix.lower() not in (".npz", ".npy"):
        raise EclipError(f"--pretrained {path}: holds numpy arrays; name it .npz")
    return kind


def load_weights_file(clip, path, model_label: str) -> None:
    """Load a checked weights file into the open_clip model `clip` (open_clip's converters and strict
    loading); weights that do not fit are one line naming the file, the model and the misfit."""
    import open_clip
    path = Path(path)
    try:
        open_clip.load_checkpoint(clip, str(path), strict=True)
    except Exception as e:   # RuntimeError (shapes, keys), AssertionError (pos_embed), AttributeError (.npz)
        raise EclipError(f"--pretrained {path}: these weights do not fit --model {model_label} "
                         f"({misfit(clip, path, e)}); pass the --model they were made for") from None


def misfit(clip, path: Path, error: Exception) -> str:
    """What does not fit, from the shapes in the file and in the model (or open_clip's first line)."""
    expected = {k: list(v.shape) for k, v in clip.state_dict().items()}
    found = _shapes(path)
    if found:
        found = {k.removeprefix("module."): v for k, v in found.items()}
        differ = [k for k in expected if k in found and found[k] != expected[k]]
        missing = [k for k in expected if k not in found]
        unknown = [k for k in found if k not in expected]
        parts = []
        if differ:
            k = differ[0]
            parts.append(f"{len(differ)} tensors differ in shape, e.g. {k} is {found[k]} in the file and "
                         f"{expected[k]} in the model")
        if missing:
            parts.append(f"{len(missing)} of the model's tensors are not in the file, e.g. {missing[0]}")
        if unknown:
            parts.append(f"{len(unknown)} tensors of the file are not in the model, e.g. {unknown[0]}")
        if parts:
            return "; ".join(parts)
    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _shapes(path: Path) -> dict:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        import numpy as np
        with np.load(path, allow_pickle=False) as arrays:
            return {k: list(arrays[k].shape) for k in arrays.files}
    except Exception:
        return {}

