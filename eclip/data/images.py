"""Open real-world image files as 8-bit RGB, or refuse them with a short reason.

News archives hold every kind of file a camera or a CMS ever wrote: rotated
phone photos, CMYK press JPEGs, 16-bit scans, transparent PNG logos, and some
broken downloads. A training run must not crash on the one bad file in a
million, nor silently learn from garbage, so every refusal is an `ImageError`
with a reason that train / embed write to their skip logs.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from eclip.data.members import MemberError, is_address, read_member
from eclip.errors import EclipError

DEFAULT_MAX_PIXELS = 89_478_485   # Pillow's own default: a 1/4 GiB RGBA image


class ImageError(EclipError):
    """An image file eclip cannot use; `reason` is short ("truncated", "missing", ...)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self):   # travels intact from DataLoader workers
        return (type(self), (self.path, self.reason))


def max_image_pixels() -> int:
    """The largest image accepted: $ECLIP_MAX_IMAGE_PIXELS, else Pillow's default."""
    value = os.environ.get("ECLIP_MAX_IMAGE_PIXELS")
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        return int(value)
    except ValueError:
        raise EclipError(f"ECLIP_MAX_IMAGE_PIXELS={value!r}: not a whole number of pixels") from None


def draft(im: Image.Image, reduce: tuple[int, int] | None) -> Image.Image:
    """reduce=(ABOVE, SIDE): a JPEG of more than ABOVE pixels is decoded at 1/2, 1/4 or 1/8 of
    its size (libjpeg's DCT scaling, far faster and smaller than decoding it whole), keeping
    both sides at least SIDE pixels. Other formats, smaller JPEGs and None: unchanged."""
    if reduce and im.format == "JPEG" and im.width * im.height > reduce[0]:
        im.draft("RGB", (reduce[1], reduce[1]))
    return im


def load_image(path, reduce: tuple[int, int] | None = None) -> Image.Image:
    """The image at `path` (a file path, or a binary file object such as an upload) as an upright
    8-bit RGB image, or `ImageError`. `reduce`: see `draft` (only `eclip serve` uses it).

    Truncated files are refused, never padded (LOAD_TRUNCATED_IMAGES stays off):
    a half-grey photo is worse training data than none.
    """
    limit = max_image_pixels()
    source = path
    if isinstance(path, str) and is_address(path):   # a tar member or a parquet cell (eclip.data.members)
        try:
            source = io.BytesIO(read_member(path))
        except MemberError as e:
            raise ImageError(path, str(e)) from None
    # Pillow checks its module-wide limit inside Image.open; keep it equal to ours so both agree.
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                pixels = im.width * im.height
                if pixels > limit:
                    raise ImageError(path, f"decompression bomb ({pixels} pixels)")
                draft(im, reduce).load()
                return to_rgb(upright(im))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(path, f"decompression bomb ({_pixels_in(e)} pixels)") from None
    except FileNotFoundError:
        raise ImageError(path, "missing") from None
    except IsADirectoryError:
        raise ImageError(path, "not a file") from None
    except PermissionError:
        raise ImageError(path, "unreadable (permission denied)") from None
    except UnidentifiedImageError:
        empty = _size(source) == 0
        raise ImageError(path, "empty file" if empty else "not an image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        text = str(e)
        low = text.lower()
        if "truncated" in low or "broken data stream" in low or isinstance(e, EOFError):
            raise ImageError(path, "truncated") from None
        raise ImageError(path, f"unreadable ({type(e).__name__}: {text[:120]})") from None


def _size(source) -> int | None:
    """Bytes in a file path or an open binary file (an upload); None when unknown."""
    try:
        if hasattr(source, "seek"):
            return source.seek(0, os.SEEK_END)
        return os.path.getsize(source) if os.path.isfile(source) else None
    except (OSError, ValueError, TypeError):
        return None


def _pixels_in(error) -> str:
    """Pillow's bomb messages start 'Image size (N pixels) exceeds ...'."""
    text = str(error)
    start = text.find("(")
    return text[start + 1:text.find(" pixels", start)] if start >= 0 else "?"


def upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block must not cost a good photo."""
    try:   # in place: a copy of a photo that needs no turning would only cost memory
        return ImageOps.exif_transpose(im, in_place=True) or im
    except Exception:   # Pillow raises many types on malformed EXIF
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any mode, with the conversions Pillow's `convert` gets wrong."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples: keep the top byte (x / 256); convert("L") would clip everything at 255
        a = np.asarray(im).astype(np.int64)
        return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
        return Image.fromarray(np.nan_to_num(np.clip(a * scale, 0, 255)).astype(np.uint8), "L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        # transparent areas become white (the page a logo sits on), not black
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")   # a copy even when already RGB: the file is closed after this


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """Press photos carry their CMYK profile; use it when littleCMS is available."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms
            return ImageCms.profileToProfile(im, io.BytesIO(icc), ImageCms.createProfile("sRGB"),
                                             outputMode="RGB")
        except Exception:   # a broken profile or no littleCMS: fall back to the plain formula
            pass
    return im.convert("RGB")
