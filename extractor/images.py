"""Image decoding and validation: bytes or arrays in, one canonical uint8 (H, W, C) array out."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings

import numpy as np

from extractor.errors import InvalidInputError, LimitExceededError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # decoded pixels per image; larger headers are decompression bombs
# The formats the readers accept (datasets.IMAGE_SUFFIXES). Pillow's other plugins (EPS through Ghostscript,
# DDS, SPIDER, ...) are never tried on bytes a client sends.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


def canonical_pixels(array: np.ndarray) -> np.ndarray:
    """Validate an image array and return it as contiguous uint8 (H, W, C) with C in {1, 3}.

    (H, W) grayscale gains a channel axis; (H, W, 4) RGBA loses its alpha.
    """
    if not isinstance(array, np.ndarray):
        raise InvalidInputError(f"image must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise InvalidInputError(f"image dtype must be uint8, got {array.dtype}")
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
    return np.ascontiguousarray(array)


def pixel_digest(image: np.ndarray) -> bytes:
    """sha256 of canonical pixels with their dtype and shape (32 bytes): an image's identity."""
    digest = hashlib.sha256(f"{image.dtype.str}|{'x'.join(map(str, image.shape))}|".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.digest()


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG/... bytes into canonical uint8 pixels (H, W, 1) or (H, W, 3).

    The declared size is checked against `max_pixels` before any pixel is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidInputError("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise LimitExceededError("decoded pixels", width * height, max_pixels)
            image.load()
            if image.mode in ("L", "I;16", "I", "F", "1"):
                image = image.convert("L")
            elif image.mode != "RGB":
                image = image.convert("RGB")
    except LimitExceededError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise LimitExceededError("decoded pixels", "over Pillow's bomb threshold", max_pixels) from exc
    except UnidentifiedImageError:
        raise InvalidInputError("cannot decode image: not a recognised image format") from None
    except Exception as exc:  # Pillow's plugins raise TypeError, IndexError, ... too on some damaged files
        raise InvalidInputError(f"cannot decode image: {exc}") from exc
    return canonical_pixels(np.asarray(image))


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
