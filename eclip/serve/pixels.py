"""How many decoded pixels the server holds at once, and giving their memory back.

An uploaded image is small on the wire and large once decoded: an 81-megapixel PNG of one
colour is 100 kB and 243 MB of RGB, more while it is converted. Each request decodes its images
one after another, so it holds one at a time; `PixelBudget` bounds what all requests hold
together (an image larger than the whole budget waits until it is alone). JPEGs over
DRAFT_ABOVE pixels are decoded at a reduced scale (`eclip.data.images.draft`); smaller images
are decoded whole, exactly as `eclip match` does, so the server's scores are the CLI's.

Freed image memory tends to stay with the process (glibc keeps large freed blocks in its
per-thread heaps once its mmap threshold has risen), so when the last decode of a busy spell
ends, `malloc_trim` hands it back to the system.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
import warnings

from PIL import Image

from eclip.data.images import draft, max_image_pixels

DRAFT_ABOVE = 16_000_000       # pixels; a 12-megapixel phone photo is decoded whole
DRAFT_SIDE = 2048              # the reduced decode keeps both sides at least this long (9x a 224 input)
REDUCE = (DRAFT_ABOVE, DRAFT_SIDE)
TRIM_AFTER = 20_000_000        # pixels decoded since the last trim before another is worth it


def planned_pixels(source, reduce: tuple[int, int] | None = REDUCE) -> int:
    """Pixels that decoding `source` (a path or an uploaded file) with `reduce` will hold; 0 when
    Pillow cannot open it or it is over the size limit (load_image then says what is wrong, and
    decodes nothing). A file is left at its start."""
    try:
        with warnings.catch_warnings():   # the bomb warning is load_image's to give
            warnings.simplefilter("ignore")
            with Image.open(source) as im:
                if im.width * im.height > max_image_pixels():
                    return 0
                draft(im, reduce)
                return im.width * im.height
    except Exception:
        return 0
    finally:
        if hasattr(source, "seek"):
            source.seek(0)


class PixelBudget:
    """A counting limit on decoded pixels, shared by the decoding threads."""

    def __init__(self, total: int):
        self.total = max(1, int(total))
        self.used = self.since_trim = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        share = min(max(0, pixels), self.total)
        with self._cond:
            while self.used + share > self.total:
                self._cond.wait()
            self.used += share
        try:
            yield
        finally:
            with self._cond:
                self.used -= share
                self.since_trim += share
                trim = self.used == 0 and self.since_trim >= TRIM_AFTER
                if trim:
                    self.since_trim = 0
                self._cond.notify_all()
            if trim:
                give_memory_back()


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def give_memory_back() -> None:
    """Return the free pages of every malloc heap to the system (glibc only; elsewhere nothing)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
