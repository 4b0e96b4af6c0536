"""Decoding, colour conversion and resizing of single images, all on Pillow.

Every image that reaches a backbone goes through `to_rgb` and `resize`, whether it came from a file
or an array, so an image stored as PNG and the same pixels given as an array make the same vector.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import FeatureCacheError

# Larger declared sizes are refused before any pixel is decoded (decompression bombs).
MAX_PIXELS = 64_000_000

RESIZE_METHODS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}
# `auto` is not a filter but a rule, resolved per image from its own size (so always the same way):
# nearest when no side shrinks (the classic recipe's upsizing of small images, pixels kept sharp),
# Pillow's bilinear when one does, which widens its kernel with the scale factor (antialiased, like
# Keras' `antialias=True` loaders) instead of sampling every n-th pixel and aliasing. JPEGs bound to
# shrink are decoded at a reduced DCT scale first (`draft`), never below the target size.
RESIZES = ("auto", *RESIZE_METHODS)


def content_hash(data: bytes) -> str:
    """The id of an image: 32 hex digits of BLAKE2b over its bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def array_hash(arr: np.ndarray) -> str:
    """The id of an in-memory image: its pixels, shape and dtype, so a reshaped copy differs."""
    arr = np.ascontiguousarray(arr)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.data)
    return h.hexdigest()


def open_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS, draft: bool = False,
               target: int | None = None) -> Image.Image:
    """Decode encoded bytes fully, upright (EXIF rotation applied), or fail naming `name`.

    draft=True lets a JPEG decode at 1/8 scale (2-4x faster, see docs/RELIABILITY.md); every byte is
    still read, so truncation and corruption show just the same (for checking files, never for pixels).
    target=N (resize `auto` only: it moves pixels, so it is part of that method) lets a JPEG decode at the
    smallest DCT scale (1/2, 1/4, 1/8) that still leaves both sides at least N."""
    if not data:
        raise FeatureCacheError(f"{name}: empty file (0 bytes); remove it or replace it with an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise FeatureCacheError(
                    f"{name}: declares {w}x{h} pixels, over the limit of {max_pixels:,}; "
                    "shrink the image first (decompression-bomb guard)"
                )
            if draft:
                img.draft(None, (1, 1))
            elif target:
                img.draft(None, (target, target))
            img.load()
            return ImageOps.exif_transpose(img)
    except FeatureCacheError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow refuses the grossest sizes itself, before our own limit can be checked.
        raise FeatureCacheError(f"{name}: declares more pixels than Pillow will decode, over the limit of "
                                f"{max_pixels:,}; shrink the image first (decompression-bomb guard)") from e
    except UnidentifiedImageError as e:
        raise FeatureCacheError(f"{name}: not a readable image (no image format recognised); "
                                "remove it or fix it") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise FeatureCacheError(f"{name}: damaged image ({_first_line(e)}); remove it or re-export it") from e


def to_rgb(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8: grayscale is repeated, alpha dropped, palette/CMYK converted, 16-bit scaled down."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: keep the top 8 bits rather than letting convert() clip everything to 255.
        arr = np.asarray(img, dtype=np.uint32)
        scale = 256 if arr.max(initial=0) > 255 else 1
        img = Image.fromarray((arr // scale).clip(0, 255).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8))
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def array_to_rgb(arr: np.ndarray, name: str = "array") -> np.ndarray:
    """An in-memory image (HxW, HxWx1, HxWx3 or HxWx4; uint8, or float in 0..255) as HxWx3 uint8."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise FeatureCacheError(f"{name}: expected an HxW or HxWxC image array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def resize_filter(shape: tuple, size: int, method: str) -> str:
    """The filter `method` uses for an image of `shape` (h, w, ...) going to size x size: `auto` is
    nearest unless a side shrinks, then bilinear (antialiased); nearest and bilinear are themselves."""
    if method != "auto":
        return method
    return "bilinear" if shape[0] > size or shape[1] > size else "nearest"


def resize(rgb: np.ndarray, size: int, method: str) -> np.ndarray:
    """Resize HxWx3 uint8 to size x size; a no-op when it already is."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    filt = RESIZE_METHODS[resize_filter(rgb.shape, size, method)]
    return np.asarray(Image.fromarray(rgb).resize((size, size), filt))


def read_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise FeatureCacheError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e


def decode_bytes(data: bytes, name: str, max_pixels: int = MAX_PIXELS, draft: bool = False,
                 target: int | None = None) -> np.ndarray:
    """Encoded bytes -> HxWx3 uint8, upright, or one FeatureCacheError naming `name` (target: `open_image`)."""
    img = open_image(data, name, max_pixels, draft=draft, target=target)
    try:
        return to_rgb(img)
    except (OSError, ValueError) as e:  # a mode Pillow opens but cannot convert
        raise FeatureCacheError(f"{name}: unsupported image ({img.mode}: {_first_line(e)}); "
                                "convert it to RGB or greyscale") from e


def load_file(path: Path, draft: bool = False, max_pixels: int = MAX_PIXELS, target: int | None = None) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 (draft, target: see `open_image`)."""
    return decode_bytes(read_file(path), str(path), max_pixels, draft, target)


def check_file(path: Path) -> None:
    """Raise what `load_file` would for an unreadable file, at about half its cost."""
    load_file(path, draft=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
