"""What a call asks of the core, and the limits it is held to: images, pixels, deadlines, results."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from extractor.errors import ExtractorError, InvalidInputError, LimitExceededError
from extractor.images import canonical_pixels, check_declared_size, decode_image

PER_IMAGE = "decoded pixels per image"
PER_REQUEST = "decoded pixels per request"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; over any of them the request fails with a `LimitExceededError`.

    This is the one home of admission: every door's call goes through `FeatureService.admit`, which checks
    these before any pixel is decoded. Message sizes are not here: they belong to the doors that send messages.
    """

    max_images_per_request: int = 1024
    # Per image, read from the header before decoding; lower than a local job's default because a server
    # decodes for many clients at once. Also the size of the slices a large request is decoded and embedded in.
    max_decoded_pixels: int = 16 * 1024 * 1024
    # Summed over a request's images (1024 images of 512 x 512): the work one call may ask for.
    max_request_pixels: int = 256 * 1024 * 1024
    # Decoded pixels held at once by every call of every door together (about 192 MiB as RGB): what bounds
    # the server's memory, whatever the requests. A call waits for its share at most `max_pixel_wait_seconds`.
    max_pixels_in_flight: int = 64 * 1024 * 1024
    max_pixel_wait_seconds: float = 10.0

    def __post_init__(self):
        if min(self.max_images_per_request, self.max_decoded_pixels, self.max_request_pixels) < 1 \
                or self.max_pixel_wait_seconds < 0:
            raise InvalidInputError(f"limits must be positive, got {self}")
        if self.max_pixels_in_flight < self.max_decoded_pixels:
            raise InvalidInputError(f"the decoded pixels in flight ({self.max_pixels_in_flight}) must hold at least "
                                    f"one image of the largest size allowed ({self.max_decoded_pixels} pixels)")


@dataclass(frozen=True)
class RawPixels:
    """An image sent as pixels rather than as an encoded file: its bytes, shape and dtype name."""

    data: bytes
    shape: tuple[int, ...]
    dtype: str


ImageInput = bytes | RawPixels | np.ndarray  # bytes: an encoded file; an array: one image of a batch


@dataclass(frozen=True)
class Call:
    """What the transport knows about one call: its deadline (on `time.monotonic`) and whether it is still wanted."""

    deadline: float | None = None
    is_active: Callable[[], bool] = lambda: True

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


@dataclass(frozen=True)
class StreamRequest:
    backbone: str  # empty: the previous request's
    images: Sequence[ImageInput]
    all_or_nothing: bool = False
    batch: RawPixels | None = None


@dataclass
class EmbedOutcome:
    """The result for one batch of images, in request order."""

    fingerprint: str
    vectors: np.ndarray   # (n, d) float32; rows of failed images are NaN
    cached: np.ndarray    # (n,) bool: found in the store rather than computed for this call
    ok: np.ndarray        # (n,) bool
    keys: bytes           # n content keys of KEY_BYTES each; zeros for failed images
    errors: list[tuple[int, ExtractorError]]  # (index within the call, error), by index
    offset: int = 0       # index of the first image within the call


@dataclass
class ClassifyOutcome:
    class_names: list[str]
    probabilities: np.ndarray  # (n, k) float32 over class_names; rows of failed images are NaN
    labels: list[str]          # (n,) most probable class; "" for failed images
    cached: np.ndarray         # (n,) bool
    errors: list[tuple[int, ExtractorError]]


def batch_size(batch: RawPixels | None) -> int:
    """How many images a stacked batch holds (0 for none), once its dtype, shape and data are checked."""
    return len(raw_array(batch, batch=True)) if batch is not None else 0


def raw_array(raw: RawPixels, *, batch: bool = False) -> np.ndarray:
    """Bytes with a shape -> a uint8 array: one image (H, W[, C]), or a batch of n images (n, H, W[, C])."""
    what, ndims, expected = ("batch", (3, 4), "(n, H, W) or (n, H, W, C)") if batch else \
        ("pixel", (2, 3), "(H, W) or (H, W, C)")
    shape = tuple(raw.shape)
    if raw.dtype not in ("uint8", ""):
        raise InvalidInputError(f"{what} dtype must be uint8, got {raw.dtype!r}")
    if len(shape) not in ndims:
        raise InvalidInputError(f"{what} shape must be {expected}, got {shape}")
    if math.prod(shape) != len(raw.data):
        raise InvalidInputError(f"{len(raw.data)} bytes of {what} data do not fill shape {shape}")
    try:
        return np.frombuffer(raw.data, dtype=np.uint8).reshape(shape)
    except ValueError as exc:  # sides too large for an array even with no pixels, e.g. (2**32 - 1, 2**32 - 1, 0)
        raise InvalidInputError(f"{what} shape {shape} cannot be an array: {exc}") from None


def declared_pixels(image: ImageInput, max_pixels: int) -> int:
    """How many pixels one request image will decode to, read from an encoded file's header or a raw image's
    shape without decoding anything; InvalidInputError, or LimitExceededError over `max_pixels`."""
    if isinstance(image, bytes):
        try:
            return check_declared_size(image, max_pixels)
        except LimitExceededError as exc:  # the same limit, named as the server's budgets are
            raise LimitExceededError(PER_IMAGE, exc.value, exc.maximum) from None
    array = raw_array(image) if isinstance(image, RawPixels) else image
    if array.ndim < 2:
        raise InvalidInputError(f"image shape must be (H, W) or (H, W, C), got {tuple(array.shape)}")
    pixels = array.shape[0] * array.shape[1]
    if pixels > max_pixels:
        raise LimitExceededError(PER_IMAGE, pixels, max_pixels)
    return pixels


def pixel_slices(pixels: dict[int, int], most: int) -> list[list[int]]:
    """Image positions (keys of `pixels`, in order) cut into consecutive slices of at most `most` pixels
    together; an image alone over `most` is a slice of its own."""
    slices: list[list[int]] = []
    total = 0
    for position, count in pixels.items():
        if not slices or total + count > most:
            slices.append([])
            total = 0
        slices[-1].append(position)
        total += count
    return slices


def to_pixels(image: ImageInput, max_pixels: int) -> np.ndarray:
    """One request image -> canonical uint8 (H, W, C); raises InvalidInputError or LimitExceededError."""
    if isinstance(image, bytes):
        try:
            return decode_image(image, max_pixels)
        except LimitExceededError as exc:
            raise LimitExceededError(PER_IMAGE, exc.value, exc.maximum) from None
    array = raw_array(image) if isinstance(image, RawPixels) else image
    declared_pixels(array, max_pixels)
    return canonical_pixels(array)


def at_index(index: int, error: ExtractorError) -> ExtractorError:
    """The same kind of error, its message naming the image it is about."""
    if isinstance(error, LimitExceededError):
        return LimitExceededError(f"image {index}: {error.limit}", error.value, error.maximum)
    return type(error)(f"image {index}: {error}")
