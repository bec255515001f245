"""Every mode Pillow opens decodes to the RGB image a viewer would show, not a clipped or black one."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chiasm.data.images import ALPHA_BACKGROUND, load_image, to_rgb
from chiasm.data.sample import DataError


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def _grey3(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.int64)[..., None], 3, axis=-1)


def _png16(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand: Pillow cannot save one."""
    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 4 * 64).round().astype(np.uint16).reshape(4, 64)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    expected = np.rint(values.astype(np.float64) * 255 / 65535)
    np.testing.assert_array_equal(_rgb(load_image(path)), _grey3(expected))
    # A plain convert("RGB") clips everything above 255 to white: most of this gradient.
    assert (np.asarray(Image.open(path).convert("RGB"))[..., 0] == 255).mean() > 0.9


@pytest.mark.parametrize("mode, dtype", [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16", "<u2")])
def test_16_bit_grey_in_either_byte_order(mode: str, dtype: str) -> None:
    values = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)
    image = Image.frombytes(mode, (16, 16), values.astype(dtype).tobytes())
    np.testing.assert_array_equal(_rgb(to_rgb(image)), _grey3(np.arange(256).reshape(16, 16)))


def test_32_bit_int_image_is_16_bit_scaled_or_stretched_by_its_range() -> None:
    values = np.array([[0, 257 * 10, 65535]], dtype=np.int32)
    np.testing.assert_array_equal(_rgb(to_rgb(Image.fromarray(values))), _grey3(np.array([[0, 10, 255]])))
    wide = np.array([[-1000, 0, 1000]], dtype=np.int32)  # not a 16-bit range: stretched over its own
    np.testing.assert_array_equal(_rgb(to_rgb(Image.fromarray(wide))), _grey3(np.array([[0, 128, 255]])))


def test_16_bit_rgb_png_keeps_its_levels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, size=(6, 5, 3)).astype(np.uint16)
    values[0, 0] = (65535, 32768, 0)
    path = tmp_path / "rgb16.png"
    _png16(path, values)
    decoded = _rgb(load_image(path))
    expected = np.rint(values.astype(np.float64) * 255 / 65535)
    assert np.abs(decoded - expected).max() <= 1  # Pillow keeps the high byte: v // 256, never 255 for all
    assert tuple(decoded[0, 0]) in {(255, 128, 0), (255, 127, 0)}


def test_float_images_scaled_by_their_range_or_refused(tmp_path: Path) -> None:
    unit = np.linspace(0, 1, 11, dtype=np.float32).reshape(1, 11)
    path = tmp_path / "unit.tiff"
    Image.fromarray(unit).save(path)
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(_rgb(load_image(path)), _grey3(np.rint(unit.astype(np.float64) * 255)))
    eight = np.array([[0.0, 100.4, 255.0]], dtype=np.float32)
    np.testing.assert_array_equal(_rgb(to_rgb(Image.fromarray(eight))), _grey3(np.array([[0, 100, 255]])))
    wide = np.array([[-2.0, 0.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(_rgb(to_rgb(Image.fromarray(wide))), _grey3(np.array([[0, 128, 255]])))
    bad = tmp_path / "nan.tiff"
    Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)).save(bad)
    with pytest.raises(DataError, match=r"sample 'n'.*float image .*nan\.tiff holds NaN"):
        load_image(bad, sample_id="n", source="d.json")


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    index = np.array([[0, 1], [2, 0]], dtype=np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette)
    plain, clear = tmp_path / "p.png", tmp_path / "p-trns.png"
    image.save(plain)
    image.save(clear, transparency=1)  # index 1 (green) is transparent
    expected = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 0, 0]]])
    np.testing.assert_array_equal(_rgb(load_image(plain)), expected)
    expected[0, 1] = ALPHA_BACKGROUND
    np.testing.assert_array_equal(_rgb(load_image(clear)), expected)


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    alpha = np.array([[0, 128, 255]], dtype=np.uint8)
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 40, 0)
    rgba[..., 3] = alpha
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    a = alpha.astype(np.float64)[..., None] / 255
    expected = a * np.array([200, 40, 0]) + (1 - a) * 255
    assert np.abs(_rgb(load_image(path)) - expected).max() <= 1
    assert tuple(_rgb(load_image(path))[0, 0]) == (255, 255, 255)  # fully transparent: background
    la = tmp_path / "la.png"
    Image.new("LA", (2, 2), (30, 0)).save(la)
    assert tuple(_rgb(load_image(la))[1, 1]) == (255, 255, 255)


def test_palette_alpha_and_colour_key_transparency() -> None:
    pa = Image.new("PA", (2, 1))
    pa.putpalette([10, 20, 30] * 256)
    pa.putpixel((0, 0), (0, 255))
    pa.putpixel((1, 0), (0, 0))
    np.testing.assert_array_equal(_rgb(to_rgb(pa)), [[[10, 20, 30], [255, 255, 255]]])
    keyed = Image.fromarray(np.array([[[0, 0, 0], [9, 9, 9]]], dtype=np.uint8))
    keyed.info["transparency"] = (0, 0, 0)
    np.testing.assert_array_equal(_rgb(to_rgb(keyed)), [[[255, 255, 255], [9, 9, 9]]])


def test_cmyk_jpeg_adobe_inverted_and_cmyk_tiff(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    cmyk.paste((0, 0, 0, 255), (8, 0, 16, 16))  # right half black
    jpeg, tiff = tmp_path / "c.jpg", tmp_path / "c.tiff"
    cmyk.save(jpeg, quality=100)
    cmyk.save(tiff)
    assert Image.open(jpeg).info.get("adobe")  # Adobe marker: CMYK stored inverted
    for path, tolerance in ((jpeg, 3), (tiff, 0)):
        decoded = _rgb(load_image(path))
        assert np.abs(decoded[4, 2] - [0, 255, 255]).max() <= tolerance, path
        assert np.abs(decoded[4, 12] - [0, 0, 0]).max() <= tolerance, path


def test_one_bit_image(tmp_path: Path) -> None:
    bits = np.array([[True, False], [False, True]])
    path = tmp_path / "bits.png"
    Image.fromarray(bits).save(path)
    assert Image.open(path).mode == "1"
    np.testing.assert_array_equal(_rgb(load_image(path)), _grey3(bits * 255))


def test_exif_orientation_6_is_turned_upright(tmp_path: Path) -> None:
    """Orientation 6: the stored pixels must be turned 90 degrees clockwise to stand upright."""
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # the stored top-left corner is red
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.size == (32, 64)
    pixels = _rgb(upright)
    assert np.abs(pixels[4, 27] - [255, 0, 0]).max() < 30  # now the top-right corner
    assert np.abs(pixels[4, 4] - [0, 0, 255]).max() < 30
    assert np.abs(pixels[60, 27] - [0, 0, 255]).max() < 30



def test_ycbcr_and_hsv_use_pillows_conversion() -> None:
    np.testing.assert_array_equal(_rgb(to_rgb(Image.new("HSV", (1, 1), (0, 255, 255)))), [[[255, 0, 0]]])
    np.testing.assert_array_equal(_rgb(to_rgb(Image.new("YCbCr", (1, 1), (255, 128, 128)))), [[[255, 255, 255]]])


def test_report_thumbnails_use_the_same_decoder(tmp_path: Path) -> None:
    import base64
    import io

    from chiasm.report.html import _thumbnail

    path = tmp_path / "dark16.png"
    Image.fromarray(np.full((4, 4), 257 * 40, dtype=np.uint16)).save(path)
    uri = _thumbnail(path)
    assert uri is not None
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumb.convert("RGB").getpixel((1, 1)) == (40, 40, 40)  # not clipped to white
