import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from stages import imaging
from stages.contract import PermanentStageError
from tests.stages.conftest import encode


def refused(data, match):
    with pytest.raises(PermanentStageError, match=match):
        imaging.load_image(data)


def png_claiming_size(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims another size (how a decompression bomb looks)."""
    data = bytearray(encode(Image.new("RGB", (64, 64), "white")))
    ihdr = bytearray(data[16:29])  # IHDR payload: width, height, depth, colour, ...
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


# --- refusals ------------------------------------------------------------------------------------


def test_missing_image_is_refused():
    refused(None, "no image")


def test_zero_bytes_are_refused():
    refused(b"", r"empty \(0 bytes\)")


@pytest.mark.parametrize("data", [b"hello, this is not an image", bytes(range(256)) * 4])
def test_non_image_bytes_are_refused(data):
    refused(data, "not a recognised image format")


def test_wrong_type_is_refused():
    refused("a string", "must be bytes")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_refused(fmt):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    data = encode(noise, fmt)
    refused(data[: len(data) // 2], "truncated or corrupt")


def test_decompression_bomb_is_refused_from_the_header_alone():
    # 50 MP is over our 40 MP default but under Pillow's own hard limit: our check must catch it.
    refused(png_claiming_size(10_000, 5_000), "decompression bomb.*50000000 pixels")


def test_huge_bomb_is_refused_even_where_pillow_objects_first():
    refused(png_claiming_size(40_000, 40_000), "decompression bomb")


def test_pixel_limit_comes_from_the_environment(monkeypatch):
    data = encode(Image.new("RGB", (64, 64), "white"))
    assert imaging.load_image(data).size == (64, 64)
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "4000")
    refused(data, "4096 pixels exceeds the limit of 4000")


def test_bad_pixel_limit_is_a_configuration_error(monkeypatch):
    monkeypatch.setenv("MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        imaging.load_image(encode(Image.new("RGB", (64, 64))))


def test_tiny_image_is_refused():
    refused(encode(Image.new("RGB", (8, 8), "white")), "too small: 8x8")


def test_extreme_aspect_ratio_is_refused():
    refused(
        encode(Image.new("RGB", (20_000, 100), "white")), "aspect ratio too extreme: 20000x100 is 200.0:1"
    )


def test_limits_are_inclusive():
    img = imaging.load_image(encode(Image.new("RGB", (640, 32), "white")))  # 20:1, 32 px side
    assert img.size == (640, 32)


# --- conversions ---------------------------------------------------------------------------------


def close(actual, expected, tol=3):
    return all(abs(int(a) - int(e)) <= tol for a, e in zip(actual, expected, strict=True))


def test_cmyk_becomes_rgb():
    img = imaging.load_image(encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95))
    assert img.mode == "RGB"
    assert close(img.getpixel((32, 32)), (255, 0, 0), tol=6)


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits():
    arr = np.full((64, 64), 32896, dtype=np.uint16)  # 128 * 257
    arr[:, 32:] = 65535
    data = encode(Image.fromarray(arr))
    img = imaging.load_image(data)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (128, 128, 128)
    assert img.getpixel((63, 0)) == (255, 255, 255)


def test_palette_with_transparency_is_composited_on_white():
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    pal.paste(1, (0, 0, 32, 64))
    data = encode(pal, transparency=1)  # index 1 (red) is transparent
    img = imaging.load_image(data)
    assert img.getpixel((10, 10)) == (255, 255, 255)
    assert img.getpixel((50, 10)) == (0, 0, 255)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 128), (32, 0, 64, 64))
    img = imaging.load_image(encode(rgba))
    assert img.getpixel((10, 10)) == (255, 255, 255)
    assert close(img.getpixel((50, 10)), (127, 127, 255), tol=1)


def test_greyscale_with_and_without_alpha():
    grey = imaging.load_image(encode(Image.new("L", (64, 64), 77)))
    assert grey.getpixel((5, 5)) == (77, 77, 77)
    la = imaging.load_image(encode(Image.new("LA", (64, 64), (0, 0))))
    assert la.getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (128, 64), (255, 0, 0))
    stored.paste((0, 0, 255), (64, 0, 128, 64))  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img = imaging.load_image(encode(stored, "JPEG", quality=95, exif=exif))
    assert img.size == (64, 128)
    assert close(img.getpixel((32, 10)), (255, 0, 0), tol=10)  # stored left edge is now the top
    assert close(img.getpixel((32, 118)), (0, 0, 255), tol=10)


def test_png_round_trip():
    img = Image.new("RGB", (40, 50), (1, 2, 3))
    assert imaging.load_image(imaging.encode_png(img)).getpixel((0, 0)) == (1, 2, 3)


# --- WCAG ----------------------------------------------------------------------------------------


def test_wcag_hand_computed_values():
    black, white = imaging.relative_luminance((0, 0, 0)), imaging.relative_luminance((255, 255, 255))
    assert imaging.contrast_ratio(black, white) == pytest.approx(21.0)
    grey = imaging.relative_luminance(imaging.hex_to_rgb("#777777"))
    # (119/255 + 0.055) / 1.055) ** 2.4 = 0.18447; (1.05) / (0.23447) = 4.478
    assert grey == pytest.approx(0.18447, abs=1e-4)
    assert imaging.contrast_ratio(grey, white) == pytest.approx(4.478, abs=0.005)
    red = imaging.relative_luminance((255, 0, 0))
    assert red == pytest.approx(0.2126)
    assert imaging.contrast_ratio(red, white) == pytest.approx(3.998, abs=0.005)


def test_worst_contrast_uses_the_closest_tenth_not_the_mean():
    white_lum = np.full(100, 1.0)
    assert imaging.worst_contrast((0, 0, 0), white_lum) == pytest.approx(21.0)
    mixed = white_lum.copy()
    mixed[:15] = 0.0  # 15% of the background is as dark as the text
    assert imaging.worst_contrast((0, 0, 0), mixed) == pytest.approx(1.0)
    few = white_lum.copy()
    few[:5] = 0.0  # 5%: within the tolerated worst tenth
    assert imaging.worst_contrast((0, 0, 0), few) == pytest.approx(21.0)


def test_colour_helpers():
    assert imaging.hex_to_rgb("#0a0B0c") == (10, 11, 12)
    assert imaging.hex_to_rgb("fff") == (255, 255, 255)
    assert imaging.rgb_to_hex((10, 11, 12)) == "#0a0b0c"
    with pytest.raises(ValueError):
        imaging.hex_to_rgb("#12")


def test_the_contrast_table_answers_as_worst_contrast_does():
    import numpy as np

    rng = np.random.default_rng(7)
    for n in (1, 2, 9, 10, 11, 250, 4000):
        for skew in (0.3, 1.0, 3.0):
            background = rng.random(n) ** skew
            background[: n // 3] = np.round(background[: n // 3], 2)  # ties
            table = imaging.ContrastTable(background)
            for rgb in [(0, 0, 0), (255, 255, 255), (128, 128, 128), *map(tuple, rng.integers(0, 256, (5, 3)))]:
                assert table.worst(rgb) == imaging.worst_contrast(rgb, background), (n, rgb)


def test_the_8bit_luminance_table_is_the_wcag_formula():
    import numpy as np

    rgb = np.random.default_rng(3).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    assert np.allclose(imaging.luminance_8bit(rgb), imaging.relative_luminance(rgb), rtol=0, atol=1e-12)
