"""Decoding gives the picture a person sees: deep samples scaled, every mode converted, EXIF orientation
applied, the first frame of an animation, one key for a grayscale image and its RGB copy; declared sizes
are read from headers without decoding."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from extractor.embedder import content_key
from extractor.errors import InvalidInputError, LimitExceededError
from extractor.images import canonical_pixels, check_declared_size, declared_image_size, decode_image, to_8_bits
from extractor.models.preprocessing import fit_pixels

GRADIENT_16 = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
EXIF_ORIENTATION = 0x0112


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png_16_bit_rgb(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    height, width, _ = rgb.shape
    rows = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


# --- bit depth -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "PPM"])
def test_a_16_bit_gradient_is_scaled_not_clipped(fmt):
    pixels = decode_image(encode(Image.fromarray(GRADIENT_16), fmt))
    assert pixels.shape == (64, 64, 1)
    np.testing.assert_array_equal(pixels[:, :, 0], (GRADIENT_16 >> 8).astype(np.uint8))
    assert np.mean(pixels == 255) < 0.01  # clipping saturated 99% of this gradient
    assert len(np.unique(pixels)) == 256


def test_an_8_bit_image_stored_in_16_bits_decodes_to_itself():
    eight = np.random.default_rng(0).integers(0, 256, (9, 7), dtype=np.uint8)
    sixteen = eight.astype(np.uint16) * 257  # what a converter writes
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(sixteen), "PNG"))[:, :, 0], eight)


def test_a_16_bit_rgb_png_matches_its_16_bit_grayscale_copy():
    gray = decode_image(encode(Image.fromarray(GRADIENT_16), "PNG"))
    rgb = decode_image(png_16_bit_rgb(np.stack([GRADIENT_16] * 3, axis=-1)))
    np.testing.assert_array_equal(rgb, gray)


def test_32_bit_integer_tiffs_are_scaled_over_their_range():
    positive = np.linspace(0, 2**31 - 1, 256).astype(np.int32).reshape(16, 16)
    pixels = decode_image(encode(Image.fromarray(positive, "I"), "TIFF"))[:, :, 0]
    np.testing.assert_array_equal(pixels, (positive >> 23).astype(np.uint8))
    assert pixels.min() == 0 and pixels.max() == 255
    negative = np.full((4, 4), -5, dtype=np.int32)
    assert decode_image(encode(Image.fromarray(negative, "I"), "TIFF")).max() == 0  # signed: negatives are black


def test_to_8_bits_keeps_the_ends_of_every_depth():
    for bits in (9, 12, 16, 24, 32):
        top = np.array([0, 2**bits - 1], dtype=np.uint64)
        np.testing.assert_array_equal(to_8_bits(top, bits), [0, 255])
    np.testing.assert_array_equal(to_8_bits(np.array([-2**15, -1, 0, 2**15 - 1]), 16, signed=True), [0, 0, 0, 255])


def test_uint16_arrays_are_scaled_like_16_bit_files():
    np.testing.assert_array_equal(canonical_pixels(GRADIENT_16), decode_image(encode(Image.fromarray(GRADIENT_16), "PNG")))
    with pytest.raises(InvalidInputError, match="uint8 or uint16"):
        canonical_pixels(GRADIENT_16.astype(np.int32))


# --- modes -----------------------------------------------------------------------------------------------------

def test_palette_modes_with_and_without_transparency():
    colours = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    palette = Image.fromarray(colours).quantize(8)
    expected = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(decode_image(encode(palette, "PNG")), expected)
    palette.info["transparency"] = 0
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")  # no "palette images with transparency" warning
        np.testing.assert_array_equal(decode_image(encode(palette, "PNG", transparency=0)), expected)
    np.testing.assert_array_equal(decode_image(encode(palette, "GIF")), expected)


def test_la_drops_its_alpha_and_stays_grayscale():
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6)
    la = Image.fromarray(np.stack([gray, np.full_like(gray, 7)], axis=-1), "LA")
    np.testing.assert_array_equal(decode_image(encode(la, "PNG")), gray[:, :, None])


def test_rgba_drops_its_alpha():
    rgba = np.random.default_rng(2).integers(0, 256, (4, 5, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")), rgba[:, :, :3])


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk_becomes_the_rgb_a_viewer_shows(fmt):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # full magenta and yellow, no black: red
    pixels = decode_image(encode(cmyk, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
    assert pixels.shape == (8, 8, 3)
    np.testing.assert_allclose(pixels[4, 4], [255, 0, 0], atol=3)


def test_one_bit_images_are_black_and_white():
    bits = np.random.default_rng(3).integers(0, 2, (7, 9)).astype(bool)
    pixels = decode_image(encode(Image.fromarray(bits), "PNG"))
    np.testing.assert_array_equal(pixels[:, :, 0], np.where(bits, 255, 0))


# --- orientation and frames ------------------------------------------------------------------------------------

# EXIF orientation value -> how the stored pixels become the upright picture
ORIENTATIONS = {1: lambda a: a, 3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1), 8: lambda a: np.rot90(a, 1),
                2: lambda a: a[:, ::-1], 5: lambda a: np.rot90(a, 1)[::-1]}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied_before_hashing(orientation):
    stored = np.random.default_rng(4).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    pixels = decode_image(encode(Image.fromarray(stored), "PNG", exif=exif))
    upright = ORIENTATIONS[orientation](stored)
    np.testing.assert_array_equal(pixels, upright)
    if orientation != 1:
        assert content_key("f", pixels) == content_key("f", np.ascontiguousarray(upright))
        assert content_key("f", pixels) != content_key("f", stored)


def test_a_rotated_jpeg_is_upright():
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:, :16] = 255  # left half white
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored turned 90 degrees counter-clockwise
    pixels = decode_image(encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95))
    assert pixels.shape[:2] == (32, 16)
    assert pixels[:16].mean() > 200 and pixels[16:].mean() < 50  # the white half is now on top


def test_an_animated_image_is_its_first_frame():
    frames = [Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)) for value in ((200, 10, 10), (10, 200, 10))]
    for fmt in ("GIF", "PNG", "WEBP"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                      **({"lossless": True} if fmt == "WEBP" else {}))
        assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
        pixels = decode_image(data)
        np.testing.assert_allclose(pixels[3, 3], (200, 10, 10), atol=8)


# --- grayscale and its RGB copy --------------------------------------------------------------------------------

def test_a_grayscale_image_and_its_rgb_copy_share_one_key_and_one_backbone_input():
    gray = np.random.default_rng(5).integers(0, 256, (20, 24), dtype=np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    from_gray = decode_image(encode(Image.fromarray(gray), "PNG"))
    from_rgb = decode_image(encode(Image.fromarray(rgb), "PNG"))
    np.testing.assert_array_equal(from_gray, from_rgb)
    assert content_key("f", from_gray) == content_key("f", canonical_pixels(rgb))
    for channels in (1, 3):  # what every preprocessing feeds the model, resized or not
        for size in (20, 32):
            np.testing.assert_array_equal(fit_pixels([gray[:20, :20, None]], size, channels),
                                          fit_pixels([rgb[:20, :20]], size, channels))


def test_a_colour_image_keeps_its_three_channels():
    rgb = np.random.default_rng(6).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    assert canonical_pixels(rgb).shape == (4, 4, 3)


# --- declared sizes --------------------------------------------------------------------------------------------

HEADER_ENDS = {"PNG": b"IDAT", "BMP": b"BM", "PPM": b"255\n"}  # where the pixel data starts (BMP: 54 bytes on)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM"])
def test_declared_size_is_read_from_the_header_alone(fmt):
    data = encode(Image.new("RGB", (37, 23)), fmt)
    assert declared_image_size(data) == (37, 23)
    if fmt in HEADER_ENDS:  # cut before the pixel data: the size is still known
        end = 54 if fmt == "BMP" else data.index(HEADER_ENDS[fmt]) + len(HEADER_ENDS[fmt])
        assert declared_image_size(data[:end]) == (37, 23)
    assert check_declared_size(data, 37 * 23) == 37 * 23
    with pytest.raises(LimitExceededError, match="decoded pixels is 851, over the limit of 850"):
        check_declared_size(data, 850)


def test_a_header_declaring_a_huge_image_is_refused_without_decoding():
    header = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
    header += struct.pack(">I", zlib.crc32(header[12:])) + struct.pack(">I", 10**6) + b"IDAT"  # no pixel follows
    with pytest.raises(LimitExceededError, match="decoded pixels is 3600000000, over the limit of 16777216"):
        check_declared_size(header, 16 * 2**20)
    with pytest.raises(LimitExceededError, match="decoded pixels is 3600000000, over the limit of 16777216"):
        decode_image(header, 16 * 2**20)
    with pytest.raises(LimitExceededError, match="3600000000"):  # over what Pillow opens at all
        declared_image_size(header)
    tall = header[:16] + struct.pack(">II", 1, 60000) + header[24:29]
    tall += struct.pack(">I", zlib.crc32(tall[12:])) + header[33:]
    assert declared_image_size(tall) == (1, 60000)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n"])
def test_declared_size_of_bytes_that_are_no_image_is_invalid_input(data):
    with pytest.raises(InvalidInputError):
        declared_image_size(data)


# --- reliability: every mode in every format that writes it, at every orientation --------------------------------

# orientation -> stored pixels to the upright picture (EXIF 274; Pillow's exif_transpose methods)
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
           8: lambda a: np.rot90(a, 1)}
WRITES = {"PNG": ["L", "RGB", "RGBA", "LA", "P", "I;16", "1"], "TIFF": ["L", "RGB", "RGBA", "P", "I;16", "I", "1", "CMYK"],
          "WEBP": ["RGB", "RGBA"], "BMP": ["L", "RGB", "P", "1"], "PPM": ["L", "RGB", "I;16", "1"], "GIF": ["P", "L"]}
CARRIES_ORIENTATION = {"PNG", "TIFF", "WEBP"}


def stored_image(mode: str, rng, height: int, width: int) -> tuple[Image.Image, np.ndarray]:
    """An image in `mode` and the pixels a viewer shows for it unrotated: (H, W) gray or (H, W, 3)."""
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    gray = rgb[:, :, 0]
    if mode in ("L", "LA"):
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        return Image.fromarray(gray if mode == "L" else np.stack([gray, alpha], -1), mode), gray
    if mode == "RGB":
        return Image.fromarray(rgb), rgb
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, gray]), "RGBA"), rgb
    if mode == "P":
        palette = Image.fromarray(rgb).quantize(16)
        return palette, np.asarray(palette.convert("RGB"))
    if mode == "I;16":  # the low byte is noise under the 8 bits a viewer sees
        return Image.fromarray((gray.astype(np.uint16) << 8) | rng.integers(0, 256, gray.shape, dtype=np.uint16)), gray
    if mode == "I":
        return Image.fromarray((gray.astype(np.int32) << 23) | rng.integers(0, 2**23, gray.shape, dtype=np.int32), "I"), gray
    if mode == "1":
        bits = gray > 127
        return Image.fromarray(bits), np.where(bits, 255, 0).astype(np.uint8)
    if mode == "CMYK":
        return Image.fromarray(np.dstack([255 - rgb, np.zeros_like(gray)]), "CMYK"), rgb
    raise ValueError(mode)


def image_mode_cases(seeds: int) -> list[tuple]:
    return [(fmt, mode, orientation, seed) for fmt, modes in sorted(WRITES.items()) for mode in modes
            for orientation in (sorted(UPRIGHT) if fmt in CARRIES_ORIENTATION else [1]) for seed in range(seeds)]


@pytest.mark.parametrize("seeds", [pytest.param(1, id="short"), pytest.param(4, id="full", marks=pytest.mark.reliability)])
def test_every_mode_format_and_orientation_decodes_to_what_a_viewer_shows(seeds, figures):
    cases = image_mode_cases(seeds)
    if seeds == 1:
        cases = cases[::9]  # the default run: a spread of them
    for fmt, mode, orientation, seed in cases:
        rng = np.random.default_rng(seed)
        image, shown = stored_image(mode, rng, int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        options = {"lossless": True, "exact": True} if fmt == "WEBP" else {}  # exact: keep colour under alpha 0
        if orientation != 1:
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = orientation
            options["exif"] = exif
        pixels = decode_image(encode(image, fmt, **options))
        expected = canonical_pixels(np.ascontiguousarray(UPRIGHT[orientation](shown)))
        assert np.array_equal(pixels, expected), (fmt, mode, orientation, seed)
    figures.cases("image modes, formats and orientations", len(cases))
