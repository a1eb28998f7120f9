"""Preprocessing as data: canonical uint8 pixels in, the exact tensor a model was built to take out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from extractor.errors import InvalidInputError, UnknownNameError

CHANNEL_ORDERS = ("rgb", "bgr")
DTYPES = ("float32", "uint8")


@dataclass(frozen=True)
class Preprocessing:
    """How canonical pixels become a model's input, in this order:

    1. channels: grayscale is repeated to 3 channels, RGB becomes grayscale for one-channel models;
    2. pad_to: images smaller than this are zero-padded, centred, to this size (the lecture pads MNIST's
       28x28 to 32x32 this way); then every image is resized (bilinear) to the input size;
    3. channel_order: "bgr" reverses RGB (Caffe-trained weights);
    4. dtype "uint8": the pixels as they are; "float32": (pixels - mean) / std per channel, on 0..255
       values (one value for all channels, or one per channel in the model's channel order).

    Written as a division by std, a plain /255 stays bit-exact with `x / 255` in the lecture's scripts.
    `name` only labels the preset it came from: the fingerprint hashes the numbers, not the name.
    """

    name: str = "custom"
    pad_to: int | None = None
    channel_order: str = "rgb"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    dtype: str = "float32"

    def __post_init__(self):
        if self.channel_order not in CHANNEL_ORDERS:
            raise UnknownNameError("channel order", self.channel_order, CHANNEL_ORDERS)
        if self.dtype not in DTYPES:
            raise UnknownNameError("input dtype", self.dtype, DTYPES)
        if self.pad_to is not None and self.pad_to < 1:
            raise InvalidInputError(f"pad_to must be a positive size, got {self.pad_to}")
        for field_name in ("mean", "std"):
            values = getattr(self, field_name)
            if len(values) not in (1, 3):
                raise InvalidInputError(f"{field_name} takes 1 or 3 values, got {len(values)}")
        if any(s == 0 for s in self.std):
            raise InvalidInputError("std must not be 0")

    def params(self) -> dict:
        """What changes the numbers (for the fingerprint): every field but the name."""
        fields = dataclasses.asdict(self)
        del fields["name"]
        if self.dtype == "uint8":  # mean and std do not apply
            del fields["mean"], fields["std"]
        return fields

    def describe(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}

    def apply(self, images: list[np.ndarray], size: int, channels: int) -> np.ndarray:
        """Canonical uint8 images -> the model's input batch (n, size, size, channels)."""
        pixels = fit_pixels(images, size, channels, self.pad_to)
        if self.channel_order == "bgr":
            if channels != 3:
                raise InvalidInputError(f"bgr channel order needs 3 channels, got {channels}")
            pixels = pixels[..., ::-1]
        if self.dtype == "uint8":
            return np.ascontiguousarray(pixels)
        x = pixels.astype(np.float32)
        if any(self.mean):
            x -= np.asarray(self.mean, dtype=np.float32)
        if any(s != 1 for s in self.std):
            x /= np.asarray(self.std, dtype=np.float32)
        return x


PRESETS: dict[str, Preprocessing] = {p.name: p for p in (
    Preprocessing("lecture", pad_to=32, std=(255.0,)),  # the lecture's scripts: zero-pad to 32, / 255
    Preprocessing("unit", std=(255.0,)),                # pixels / 255
    # keras.applications.vgg16.preprocess_input ("caffe"): BGR, ImageNet channel means subtracted.
    Preprocessing("caffe", channel_order="bgr", mean=(103.939, 116.779, 123.68)),
    Preprocessing("tf", mean=(127.5,), std=(127.5,)),  # -1..1 (Inception, MobileNet V2 in Keras)
    # torchvision's ImageNet normalisation, in 0..255 units
    Preprocessing("torch", mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)),
    Preprocessing("lite", mean=(127.0,), std=(128.0,)),  # EfficientNet-Lite: (x - 127) / 128
    Preprocessing("raw"),                                 # pixels as float32 0..255 (normalising models)
    Preprocessing("uint8", dtype="uint8"),                # pixels as they are (quantised TFLite models)
)}


def preset(name: str) -> Preprocessing:
    if name not in PRESETS:
        raise UnknownNameError("preprocessing preset", name, PRESETS)
    return PRESETS[name]


def fit_pixels(images: list[np.ndarray], size: int, channels: int, pad_to: int | None = None) -> np.ndarray:
    """Bring canonical uint8 images to (n, size, size, channels) uint8: channels, padding, resizing.

    Grayscale is repeated to 3 channels; RGB becomes grayscale (ITU-R 601 luma, as Pillow does) for
    one-channel models; resizing is bilinear.
    """
    out = np.empty((len(images), size, size, channels), dtype=np.uint8)
    if not images:
        return out
    shapes = {image.shape for image in images}
    # The common case, small images of one shape: one vectorised path for the whole batch. Images to be resized
    # go one by one, never stacked: a copy of a batch of large images would double a server's decoded pixels.
    if len(shapes) == 1 and images[0].shape[0] * images[0].shape[1] <= max(size, pad_to or 0) ** 2:
        out[:] = _fit_one(np.stack(images), size, channels, pad_to)
    else:
        for i, image in enumerate(images):
            out[i] = _fit_one(image[None], size, channels, pad_to)[0]
    return out


def _fit_one(batch: np.ndarray, size: int, channels: int, pad_to: int | None) -> np.ndarray:
    """(n, H, W, C) uint8 of one shape -> (n, size, size, channels) uint8."""
    if batch.shape[3] == 1 and channels == 3:
        batch = np.repeat(batch, 3, axis=3)
    elif batch.shape[3] == 3 and channels == 1:
        luma = batch.astype(np.uint32) @ np.array([19595, 38470, 7471], dtype=np.uint32)  # Pillow's "L"
        batch = ((luma + 32768) >> 16).astype(np.uint8)[..., None]
    n, height, width, _ = batch.shape
    if pad_to and (height < pad_to or width < pad_to):
        new_h, new_w = max(height, pad_to), max(width, pad_to)
        padded = np.zeros((n, new_h, new_w, batch.shape[3]), dtype=np.uint8)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        padded[:, top:top + height, left:left + width] = batch
        batch, height, width = padded, new_h, new_w
    if (height, width) != (size, size):
        batch = np.stack([_resize(image, size) for image in batch])
    return batch


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    mode = "L" if image.shape[2] == 1 else "RGB"
    resized = Image.fromarray(image[:, :, 0] if mode == "L" else image, mode).resize((size, size), Image.BILINEAR)
    return np.asarray(resized).reshape(size, size, image.shape[2])
