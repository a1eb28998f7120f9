"""Image decoding and validation: bytes or arrays in, one canonical uint8 (H, W, C) array out.

The canonical pixels are the image as a viewer shows it, so that its key and vector are those of the
picture a person sees:
- EXIF orientation is applied (a photo stored sideways with "rotate 90" is the upright photo);
- 16-bit and 32-bit integer samples are scaled to 8 bits by their declared depth, never clipped
  (a 16-bit value v becomes v >> 8, as Pillow does for 16-bit RGB); signed samples follow
  scikit-image's convention: negative values become 0 and the positive range is scaled;
- palette, LA, PA, CMYK, YCbCr and 1-bit images become RGB or grayscale; alpha is dropped
  (the colour under a transparent pixel is kept, as for (H, W, 4) arrays);
- an animated or multi-page image is its first frame;
- an RGB image whose three channels are equal everywhere is grayscale (H, W, 1): a grayscale image and
  its RGB copy share one key, because preprocessing gives them the same model input (gray is repeated
  to 3 channels; the luma of equal channels is that value).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings

import numpy as np

from extractor.errors import InvalidInputError, LimitExceededError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # decoded pixels per image; larger headers are decompression bombs
# The formats the readers accept (datasets.IMAGE_SUFFIXES). Pillow's other plugins (EPS through Ghostscript,
# DDS, SPIDER, ...) are never tried on bytes a client sends.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")
TIFF_BITS_PER_SAMPLE, TIFF_SAMPLE_FORMAT, TIFF_SIGNED = 258, 339, 2
STRIP_PIXELS = 1024 * 1024  # images larger than this are copied out of Pillow in strips of rows


def canonical_pixels(array: np.ndarray) -> np.ndarray:
    """Validate an image array and return it as contiguous uint8 (H, W, C) with C in {1, 3}.

    (H, W) grayscale gains a channel axis; (H, W, 4) RGBA loses its alpha; uint16 samples are scaled
    to 8 bits (v >> 8); RGB with three equal channels becomes (H, W, 1).
    """
    if not isinstance(array, np.ndarray):
        raise InvalidInputError(f"image must be a numpy array, got {type(array).__name__}")
    if array.dtype == np.uint16:
        array = to_8_bits(array, bits=16)
    elif array.dtype != np.uint8:
        raise InvalidInputError(f"image dtype must be uint8 or uint16, got {array.dtype} "
                                "(scale other types to 0..255 uint8 first)")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InvalidInputError(
            f"image shape must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {tuple(array.shape)}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(f"image has no pixels: shape {tuple(array.shape)}")
    if array.shape[2] == 4:
        array = array[:, :, :3]
    if array.shape[2] == 3 and _channels_equal(array):
        array = array[:, :, :1]
    return np.ascontiguousarray(array)


def _channels_equal(rgb: np.ndarray) -> bool:
    red = rgb[:, :, 0]
    return bool(np.array_equal(red, rgb[:, :, 1]) and np.array_equal(red, rgb[:, :, 2]))


def to_8_bits(samples: np.ndarray, bits: int, signed: bool = False) -> np.ndarray:
    """Integer samples of a declared depth (`bits`, signed or not) scaled to uint8 without clipping
    the range: v >> (bits - 8) for unsigned; signed: negatives to 0, then v >> (bits - 9)."""
    wide = samples.astype(np.int64)
    if signed:
        wide = np.maximum(wide, 0)
        bits -= 1
    if bits > 8:
        wide >>= bits - 8
    return np.clip(wide, 0, 255).astype(np.uint8)  # clip only guards samples over the declared depth


def pixel_digest(image: np.ndarray) -> bytes:
    """sha256 of canonical pixels with their dtype and shape (32 bytes): an image's identity."""
    digest = hashlib.sha256(f"{image.dtype.str}|{'x'.join(map(str, image.shape))}|".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.digest()


def _open(data: bytes):
    """Pillow's lazily opened image (header read, no pixel decoded) for bytes of an accepted format."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidInputError("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # The caller compares the declared size with its own limit; Pillow's warning says nothing more.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:  # over twice Pillow's threshold: refused inside Image.open
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        raise LimitExceededError("decoded pixels", int(declared[1]) if declared else "unknown",
                                 2 * Image.MAX_IMAGE_PIXELS) from None
    except UnidentifiedImageError:
        raise InvalidInputError("cannot decode image: not a recognised image format") from None
    except Exception as exc:  # Pillow's plugins raise TypeError, IndexError, ... too on some damaged headers
        raise InvalidInputError(f"cannot decode image: {exc}") from exc


def declared_image_size(data: bytes) -> tuple[int, int]:
    """(width, height) that an encoded image's header declares, read without decoding any pixel.

    Raises InvalidInputError for bytes that are not an accepted image format, and LimitExceededError
    for a header over Pillow's own ceiling (twice its decompression-bomb threshold, about 179 million
    pixels), which Pillow refuses to open at all.
    """
    with _open(data) as image:
        return image.size


def check_declared_size(data: bytes, max_pixels: int) -> int:
    """The pixel count an encoded image declares; LimitExceededError if over `max_pixels`, before any
    pixel is decoded (what a server calls to refuse a decompression bomb, or to sum a request's pixels)."""
    with _open_within(data, max_pixels) as image:
        return image.size[0] * image.size[1]


def _open_within(data: bytes, max_pixels: int):
    """`_open`, refusing a declared size over `max_pixels` before any pixel is decoded."""
    try:
        image = _open(data)
    except LimitExceededError as exc:
        raise LimitExceededError("decoded pixels", exc.value, max_pixels) from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise LimitExceededError("decoded pixels", width * height, max_pixels)
    return image


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG/... bytes into canonical uint8 pixels (H, W, 1) or (H, W, 3) (see the module
    docstring for what canonical means). The declared size is checked against `max_pixels` before
    any pixel is decoded."""
    with _open_within(data, max_pixels) as image:
        try:
            return canonical_pixels(_viewed_pixels(image))
        except (LimitExceededError, InvalidInputError):
            raise
        except Exception as exc:  # Pillow's plugins raise TypeError, IndexError, ... too on some damaged files
            raise InvalidInputError(f"cannot decode image: {exc}") from exc


def _viewed_pixels(image) -> np.ndarray:
    """The first frame of an opened image as a viewer shows it: (H, W) or (H, W, 3|4) uint8."""
    from PIL import ImageOps

    image.load()
    bits, signed = _declared_depth(image)  # read before the transpose, which drops the format's tags
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an image that needs no turning
    mode = image.mode
    if mode.startswith("I"):  # "I;16", "I;16B", "I;16S", "I" (32-bit, or 16-bit PNG and PGM)
        return to_8_bits(np.asarray(image), bits, signed)
    if mode in ("L", "RGB", "RGBA"):
        return _pixels_of(image)
    if mode in ("1", "F"):  # "F": float samples taken as 0..255, as Pillow converts them
        return np.asarray(image.convert("L"))
    if mode == "LA":
        return np.asarray(image)[:, :, 0]
    if mode in ("P", "PA"):  # through RGBA, so a palette's transparency does not need a warning
        return np.asarray(image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))  # CMYK, YCbCr, LAB, RGBX, RGBa, ...


def _pixels_of(image) -> np.ndarray:
    """`np.asarray(image)` of an 8-bit L, RGB or RGBA image; a large one is copied a strip of rows at a time,
    because Pillow's whole-image copy holds the pixels twice over (its chunks, then their join) beside the
    decoded image: a server decoding for many clients would need that much more memory per pixel."""
    width, height = image.size
    if width * height <= STRIP_PIXELS:
        return np.asarray(image)
    out = np.empty((height, width, len(image.mode)) if image.mode != "L" else (height, width), dtype=np.uint8)
    rows = max(1, STRIP_PIXELS // width)
    for top in range(0, height, rows):
        out[top:top + rows] = np.asarray(image.crop((0, top, width, min(height, top + rows))))
    return out


def _declared_depth(image) -> tuple[int, bool]:
    """(bits per sample, signed) of an integer image: a TIFF says so in its tags; Pillow reads other
    formats' 16-bit samples (PNG, PGM with any maxval, scaled) into 16-bit range."""
    if image.mode.startswith("I;16"):
        return 16, image.mode.endswith("S")
    tags = getattr(image, "tag_v2", None)
    if image.mode == "I" and tags is not None and TIFF_BITS_PER_SAMPLE in tags:
        bits = tags[TIFF_BITS_PER_SAMPLE]
        bits = bits[0] if isinstance(bits, tuple) else bits
        sample_format = tags.get(TIFF_SAMPLE_FORMAT, 1)
        sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
        return int(bits), sample_format == TIFF_SIGNED
    return 16, False


def read_image_file(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode one image file (see `decode_image`)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block, /dev/zero never end
            raise InvalidInputError(f"cannot read {path}: not a regular file")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_image(data, max_pixels)
