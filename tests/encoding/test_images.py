import io

import numpy as np
import pytest
from PIL import Image

from featurecache.encoding import images
from featurecache.errors import FeatureCacheError


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return images.to_rgb(images.open_image(data, "x.img"))


def gradient(h=12, w=16) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 15, y * 20, (x + y) * 7], axis=-1).astype(np.uint8)


def test_modes_become_rgb_uint8():
    rgb = gradient()
    gray = Image.fromarray(rgb[:, :, 0])
    assert (decode(encode(gray, "PNG")) == rgb[:, :, :1].repeat(3, axis=2)).all()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    assert (decode(encode(Image.fromarray(rgba), "PNG")) == rgb).all()  # alpha dropped, colour kept
    pal = Image.fromarray(rgb).quantize(8)
    assert (decode(encode(pal, "PNG")) == np.asarray(pal.convert("RGB"))).all()
    cmyk = decode(encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95))
    assert cmyk.shape == rgb.shape and cmyk.dtype == np.uint8
    assert np.abs(cmyk.astype(int) - rgb).mean() < 12


def test_16bit_png_keeps_its_range():
    arr16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    out = decode(encode(Image.fromarray(arr16), "PNG"))
    assert out.shape == (8, 8, 3)
    assert out[..., 0].max() == (63 * 1000) // 256  # top 8 bits, not clipped to 255
    assert (np.diff(out[..., 0].ravel().astype(int)) >= 0).all()


def test_exif_rotation_is_applied():
    img = Image.fromarray(gradient(10, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    out = decode(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.shape == (30, 10, 3)


@pytest.mark.parametrize("data, words", [
    (b"", "empty file"),
    (b"this is text, not a png", "not a readable image"),
])
def test_bad_bytes_name_the_file(data, words):
    with pytest.raises(FeatureCacheError, match=words) as e:
        images.open_image(data, "photos/cat.png")
    assert "photos/cat.png" in str(e.value) and "\n" not in str(e.value)


def test_truncated_jpeg_is_reported():
    data = encode(Image.fromarray(gradient(64, 64)), "JPEG")
    with pytest.raises(FeatureCacheError, match="a.jpg"):
        images.open_image(data[: len(data) // 2], "a.jpg")


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose pixel data is a few bytes: decoding it
    would fail as a damaged image, so a refusal "over the limit" proves the check came first."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_before_decoding():
    data = encode(Image.new("L", (9000, 9000)), "PNG")
    with pytest.raises(FeatureCacheError, match="over the limit"):
        images.open_image(data, "bomb.png", max_pixels=10_000_000)
    declared = png_declaring(5000, 5000)  # 25 Mpx: under Pillow's own guard, over ours
    with pytest.raises(FeatureCacheError, match="damaged image"):
        images.open_image(declared, "cut.png", max_pixels=30_000_000)  # decoded: its data is missing
    with pytest.raises(FeatureCacheError, match=r"declares 5000x5000 pixels, over the limit") as e:
        images.open_image(declared, "cut.png", max_pixels=10_000_000)
    assert "damaged" not in str(e.value)  # refused from the header alone, never decoded


def test_arrays_and_resize():
    g = np.arange(16, dtype=np.uint8).reshape(4, 4)
    rgb = images.array_to_rgb(g)
    assert rgb.shape == (4, 4, 3) and (rgb[..., 2] == g).all()
    up = images.resize(rgb, 8, "nearest")
    assert (up[::2, ::2] == rgb).all() and (up[1::2, 1::2] == rgb).all()  # pure repetition
    assert images.resize(rgb, 8, "bilinear").shape == (8, 8, 3)
    with pytest.raises(FeatureCacheError, match="shape"):
        images.array_to_rgb(np.zeros((2, 2, 2, 2)))


def test_hashes_follow_content():
    a = np.zeros((4, 4), np.uint8)
    assert images.array_hash(a) == images.array_hash(a.copy())
    assert images.array_hash(a) != images.array_hash(a.reshape(2, 8))
    b = a.copy()
    b[0, 0] = 1
    assert images.array_hash(a) != images.array_hash(b)
