"""Cover decoding: bad files become MediaError with a reason; odd modes come out as RGB; pixels are normalised."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from llmrec.media.audio import MediaError
from llmrec.media.image import load_image, prepare_image


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims another size (CRC fixed): a decompression bomb / a 0x0 image."""
    data = bytearray(png_bytes(Image.new("RGB", (4, 4), (10, 20, 30))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def noisy(mode="RGB", size=(64, 64)) -> Image.Image:
    arr = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, ("corrupt image", "truncated image")),
        (png_claiming_size(0, 0), ""),
        (png_bytes(noisy())[:-300], "truncated image"),
        (png_claiming_size(100_000, 100_000), "image too large"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(100), "not an image"),  # audio passed as a cover
    ],
    ids=["empty", "corrupt-bytes", "zero-by-zero", "truncated", "decompression-bomb", "wav-as-image"],
)
def test_bad_images_raise_media_error_with_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(MediaError) as err:
        load_image(path)
    assert err.value.reason.startswith(reason) and err.value.reason
    assert str(path) in str(err.value)


def test_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "big.png"
    noisy(size=(64, 64)).save(path)
    with pytest.raises(MediaError, match="image too large .*4096 pixels, limit 1000"):
        load_image(path, max_pixels=1000)
    assert load_image(path, max_pixels=4096).size == (64, 64)


def test_missing_file(tmp_path):
    with pytest.raises(MediaError, match="file not found"):
        load_image(tmp_path / "none.png")


@pytest.mark.parametrize(
    "img, fmt, expected",
    [
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),  # pure red in CMYK
        (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG", (255, 255, 255)),  # fully transparent -> white
        (Image.new("RGBA", (8, 8), (0, 0, 255, 255)), "PNG", (0, 0, 255)),
        (Image.new("L", (8, 8), 128), "PNG", (128, 128, 128)),
        (Image.new("RGB", (8, 8), (0, 204, 0)).convert("P"), "PNG", (0, 204, 0)),  # on the web palette
        (Image.new("LA", (8, 8), (0, 0)), "PNG", (255, 255, 255)),
    ],
    ids=["cmyk", "rgba-transparent", "rgba-opaque", "greyscale", "palette", "greyscale-alpha"],
)
def test_modes_come_out_rgb(tmp_path, img, fmt, expected):
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, format=fmt)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (8, 8)
    assert out.getpixel((4, 4)) == pytest.approx(expected, abs=3)


def test_sixteen_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    arr = np.tile(np.linspace(0, 60000, 16, dtype=np.uint16), (16, 1))
    path = tmp_path / "g16.png"
    Image.fromarray(arr).save(path)
    out = np.asarray(load_image(path))
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255  # full range, not everything white


def test_prepare_image_resizes_and_normalises(tmp_path):
    path = tmp_path / "c.png"
    Image.new("RGB", (300, 200), (255, 0, 0)).save(path)
    x = prepare_image(path, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (3, 64, 64) and x.dtype.is_floating_point
    assert x[0].mean().item() == pytest.approx(1.0) and x[1].mean().item() == pytest.approx(-1.0)
