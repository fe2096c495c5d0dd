"""Robust cover decoding for feature extraction: Pillow decode -> RGB -> the encoder's size and normalisation.

A user's cover can be missing, empty, not an image, truncated, 0x0, a decompression bomb, CMYK, greyscale,
16-bit, palette or transparent. Every unusable case raises `MediaError(reason)` (the reason goes into the features
manifest); every usable one comes out as an RGB image the encoder sees the same way.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from llmrec.media.audio import MediaError
from llmrec.model.encoders import image_to_pixels

DEFAULT_MAX_PIXELS = 64_000_000
# Transparent regions of a cover are meant to show the page behind it, which is white on most players.
BACKGROUND = (255, 255, 255)


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) with decompression-bomb warnings promoted to errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise MediaError(f"image too large (more than {max_pixels} pixels)", path) from None
        except UnidentifiedImageError:
            raise MediaError("not an image (format not recognised)", path) from None
        except (OSError, ValueError, SyntaxError) as e:
            raise MediaError(_reason(e), path) from None
    w, h = img.size
    if w <= 0 or h <= 0:
        img.close()
        raise MediaError(f"zero-size image ({w}x{h})", path)
    if w * h > max_pixels:
        img.close()
        raise MediaError(f"image too large ({w}x{h} = {w * h} pixels, limit {max_pixels})", path)
    return img


def _short(err: Exception) -> str:
    return (str(err).strip() or type(err).__name__).splitlines()[0][:120]


def _reason(err: Exception) -> str:
    return "truncated image" if "truncated" in str(err).lower() else f"corrupt image ({_short(err)})"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited on white, CMYK/palette/greyscale converted, 16/32-bit and float
    greyscale rescaled to their own range (a plain convert would clip them to white)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` into a fully loaded RGB image, or raise `MediaError` with the reason."""
    path = Path(path)
    if not path.is_file():
        raise MediaError("file not found", path)
    if path.stat().st_size == 0:
        raise MediaError("empty file", path)
    # verify() checks the file's structure (chunk CRCs, ...) without decoding; the image is unusable afterwards,
    # so it is reopened for the real decode.
    with _open(path, max_pixels) as probe:
        try:
            probe.verify()
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for broken files
            raise MediaError(_reason(e), path) from None
    with _open(path, max_pixels) as img:
        try:
            img.seek(0)  # first frame of animated GIF/WebP/APNG
            img.load()
            rgb = to_rgb(ImageOps.exif_transpose(img) or img)
            return rgb.copy() if rgb is img else rgb  # the opened image is closed on leaving the block
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise MediaError(_reason(e), path) from None


def prepare_image(path: str | os.PathLike, size: int, mean: Sequence[float], std: Sequence[float], *,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode and turn into the encoder's input: normalised [3, size, size] float32."""
    return image_to_pixels(load_image(path, max_pixels=max_pixels), size, mean, std)
