"""Preprocessing recipes: canonical uint8 pixels in, the exact tensor a backbone was built to take out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from extractor.errors import InvalidInputError, UnknownNameError

# keras.applications.vgg16.preprocess_input ("caffe" mode): BGR order, ImageNet channel means subtracted.
CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)


@dataclass(frozen=True)
class Recipe:
    """How pixels become a backbone's input.

    pad_to: images smaller than this are zero-padded, centred, to this size first (the lecture pads
            MNIST's 28x28 to 32x32 this way); then every image is resized to the input size.
    scale:  "unit" = pixels / 255 (float32); "caffe" = vgg16.preprocess_input on 0..255 pixels;
            "uint8" = pixels as they are.
    """

    name: str
    scale: str
    pad_to: int | None = None

    def params(self) -> dict:
        return {"name": self.name, "scale": self.scale, "pad_to": self.pad_to}


LECTURE = Recipe("lecture", "unit", pad_to=32)
CAFFE = Recipe("caffe", "caffe")
UNIT = Recipe("unit", "unit")
RAW = Recipe("uint8", "uint8")


def fit_pixels(images: list[np.ndarray], size: int, channels: int, pad_to: int | None = None) -> np.ndarray:
    """Bring canonical uint8 images to (n, size, size, channels) uint8: channels, padding, resizing.

    Grayscale is repeated to 3 channels; RGB becomes grayscale (ITU-R 601 luma, as Pillow does) for
    one-channel backbones; resizing is bilinear.
    """
    out = np.empty((len(images), size, size, channels), dtype=np.uint8)
    if not images:
        return out
    shapes = {image.shape for image in images}
    if len(shapes) == 1:  # the common case: one vectorised path for the whole batch
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


def scale_pixels(pixels: np.ndarray, scale: str) -> np.ndarray:
    """Apply a recipe's scaling to (n, H, W, C) uint8 pixels."""
    if scale == "uint8":
        return pixels
    if scale == "unit":
        return pixels.astype(np.float32) / np.float32(255)
    if scale == "caffe":
        if pixels.shape[-1] != 3:
            raise InvalidInputError(f"caffe preprocessing needs 3 channels, got {pixels.shape[-1]}")
        return pixels[..., ::-1].astype(np.float32) - CAFFE_BGR_MEAN
    raise UnknownNameError("recipe scale", scale, ["unit", "caffe", "uint8"])


def apply_recipe(recipe: Recipe, images: list[np.ndarray], size: int, channels: int) -> np.ndarray:
    """Canonical uint8 images -> the backbone's input batch (n, size, size, channels)."""
    return scale_pixels(fit_pixels(images, size, channels, recipe.pad_to), recipe.scale)
