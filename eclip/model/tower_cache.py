"""A locked tower runs once per distinct input (README, "Training": --tower-cache-mb).

With --lock-text (or --lock-image) a tower's weights never change, so its outputs for an input never
change either: training computes them the first time an input is met and reuses them after. What is
kept is the output of the frozen part alone; whatever stays trainable after the lock runs every step:
  - text, Hugging Face tower: the transformer's last hidden states and its pooled state, keyed by the
    token ids; the projection (trainable after open_clip's lock) is applied each step (hf_text_head);
  - text, open_clip tower: everything `text_tokens` returns (tokens the experts read, pooled feature);
  - image: everything `image_tokens` returns, keyed by the pixels, and only when no augmentation
    changes the pixels from one epoch to the next (otherwise every key would be new).
A locked tower also runs in eval mode (no dropout), as LiT does, cached or not (`keep_locked_in_eval`).

`fully_locked(clip, tower)` is the one place that says whether a tower is frozen whole; anything that
freezes parts of a tower (partial locking) is cached only when this says the whole trunk is frozen.
Memory is bounded: least recently used rows are dropped past `max_mb`; with `folder`, rows are also
written there (one file per input) and read back after eviction or on resume.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import torch
from open_clip.hf_model import HFTextEncoder

from eclip.model.backbone import _text_tower, hf_text_head, hf_text_trunk, image_tokens, text_tokens

TOWERS = ("image", "text")


def _trunk(clip, tower: str) -> tuple[list, list]:
    """(modules, loose parameters) of the part of `tower` whose outputs the cache stands for."""
    if tower == "image":
        return [clip.visual], []
    text = _text_tower(clip)
    if isinstance(text, HFTextEncoder):
        return [text.transformer], []
    if text is clip or text is None and not hasattr(clip, "text"):     # open_clip CLIP: text inlined in the model
        loose = [p for p in (getattr(clip, "positional_embedding", None), getattr(clip, "text_projection", None))
                 if isinstance(p, torch.nn.Parameter)]
        mods = [m for m in (getattr(clip, n, None) for n in ("token_embedding", "transformer", "ln_final"))
                if isinstance(m, torch.nn.Module)]
        return mods, loose
    return [clip.text], []


def fully_locked(clip, tower: str) -> bool:
    """True when no parameter of `tower`'s trunk ("image" or "text") trains: its outputs are fixed."""
    mods, loose = _trunk(clip, tower)
    params = [p for m in mods for p in m.parameters()] + loose
    return bool(params) and not any(p.requires_grad for p in params)


def keep_locked_in_eval(clip) -> None:
    """Put every fully locked tower's trunk in eval mode (after model.train())."""
    for tower in TOWERS:
        if fully_locked(clip, tower):
            for m in _trunk(clip, tower)[0]:
                m.eval()


class RowCache:
    """Per-input rows (tuples of tensors) keyed by bytes; LRU within max_mb; optionally mirrored on disk."""

    def __init__(self, max_mb: float, folder: Path | None = None):
        self.max_bytes, self.bytes = int(max_mb * 2 ** 20), 0
        self.rows: OrderedDict[bytes, tuple] = OrderedDict()
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def get_rows(self, keys: list[bytes], compute) -> list[tuple]:
        """The row of each key; `compute(indices)` -> batched tensors for the keys not kept (each once)."""
        found = {k: self._get(k) for k in dict.fromkeys(keys)}
        missing = [k for k, row in found.items() if row is None]
        self.hits, self.misses = self.hits + len(keys) - len(missing), self.misses + len(missing)
        if missing:
            first = {k: keys.index(k) for k in missing}
            with torch.no_grad():
                batched = compute([first[k] for k in missing])
            for i, k in enumerate(missing):
                found[k] = tuple(t[i].clone() for t in batched)
                self._put(k, found[k])
        return [found[k] for k in keys]

    def _get(self, key: bytes):
        row = self.rows.get(key)
        if row is not None:
            self.rows.move_to_end(key)
            return row
        path = self._path(key)
        if path is not None and path.is_file():
            from safetensors.torch import load_file
            saved = load_file(str(path))
            row = tuple(saved[str(i)] for i in range(len(saved)))
            self._keep(key, row)
            return row
        return None

    def _put(self, key: bytes, row: tuple) -> None:
        self._keep(key, row)
        path = self._path(key)
        if path is not None and not path.is_file():
            from safetensors.torch import save_file
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({str(i): t.contiguous() for i, t in enumerate(row)}, str(tmp))
            os.replace(tmp, path)          # whole or not at all

    def _keep(self, key: bytes, row: tuple) -> None:
        size = sum(t.numel() * t.element_size() for t in row)
        if size > self.max_bytes:
            return
        self.rows[key] = row
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.rows.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in old)

    def _path(self, key: bytes) -> Path | None:
        return self.folder / f"{hashlib.blake2b(key, digest_size=16).hexdigest()}.safetensors" if self.folder else None


def _token_keys(tokens: torch.Tensor) -> list[bytes]:
    return [row.tobytes() for row in tokens.detach().cpu().numpy()]


def _stack(rows: list[tuple]) -> list[torch.Tensor]:
    return [torch.stack(parts) for parts in zip(*rows)]


class Towers:
    """The towers as EntityCLIP's training forward calls them; this one computes everything each time."""

    def image_tokens(self, clip, images):
        return image_tokens(clip, images)

    def text_tokens(self, clip, tokens):
        return text_tokens(clip, tokens)

    def encode_image(self, clip, images):
        return clip.encode_image(images)

    def encode_text(self, clip, tokens):
        return clip.encode_text(tokens)


class CachedTowers(Towers):
    """Towers whose fully locked parts run once per distinct input (see the module's docstring)."""

    def __init__(self, clip, max_mb: float, folder: Path | None = None, cache_images: bool = True):
        text, image = fully_locked(clip, "text"), cache_images and fully_locked(clip, "image")
        folder = Path(folder) if folder else None
        self.text = RowCache(max_mb / (2 if image else 1), folder / "text" if folder else None) if text else None
        self.image = RowCache(max_mb / (2 if text else 1), folder / "image" if folder else None) if image else None

    @property
    def active(self) -> bool:
        return self.text is not None or self.image is not None

    def encode_image(self, clip, images):
        return clip.encode_image(images) if self.image is None else self.image_tokens(clip, images)[1]

    def encode_text(self, clip, tokens):
        if self.text is None:
            return clip.encode_text(tokens)
        tower = _text_tower(clip)
        if isinstance(tower, HFTextEncoder):     # the pooled state alone through the projection
            return tower.proj(torch.stack([row[1] for row in self._hf_rows(tower, tokens)]))
        return self.text_tokens(clip, tokens)[1]

    def image_tokens(self, clip, images):
        if self.image is None:
            return image_tokens(clip, images)
        keys = [hashlib.blake2b(x.detach().cpu().numpy().tobytes(), digest_size=16).digest() for x in images]
        rows = self.image.get_rows(keys, lambda idx: image_tokens(clip, images[idx]))
        tokens, pooled = _stack(rows)
        return tokens, pooled

    def text_tokens(self, clip, tokens):
        if self.text is None:
            return text_tokens(clip, tokens)
        tower = _text_tower(clip)
        if isinstance(tower, HFTextEncoder):     # the frozen transformer once; the projection every step
            return hf_text_head(tower, *_stack(self._hf_rows(tower, tokens)))
        rows = self.text.get_rows(_token_keys(tokens), lambda idx: text_tokens(clip, tokens[idx]))
        return tuple(_stack(rows))

    def _hf_rows(self, tower, tokens):
        return self.text.get_rows(_token_keys(tokens), lambda idx: hf_text_trunk(tower, tokens[idx]))


def training_towers(clip, max_mb: float, folder: Path | None = None, augmented: bool = False) -> Towers:
    """CachedTowers when some tower is fully locked and max_mb > 0 (images only without augmentation), else Towers."""
    if max_mb > 0:
        cached = CachedTowers(clip, max_mb, folder, cache_images=not augmented)
        if cached.active:
            return cached
    return Towers()
