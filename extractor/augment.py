"""Augmented views of an image: seeded mirror flips, shifts and small rotations, as canonical pixels.

A view is an image like any other: the embedder turns its pixels into a vector, kept under the
content key of those pixels (backbone fingerprint + the view's pixels). The recipe, the seed and the
view's number decide the pixels, so a rerun makes the same views (every key found in the store) and
another recipe or seed makes other pixels and so other keys. A data spec asks for views with
`augment=RECIPE&views=K&augment_seed=S` (see `extractor.datasets`), and the feature set named after
that spec carries the recipe and the seed.

View v of an image draws its flip, shift and angle from `numpy.random.default_rng([seed, v, h, r])`,
h and r the first 8 bytes (little-endian) of the original's pixel digest and of the sha256 of the
recipe's text: an image gets the same views in whatever sample or order it comes (trials that share
images and seed share their views' vectors), and two recipes draw apart, never one's shifts for the other's.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import numpy as np

from extractor.errors import InvalidInputError
from extractor.images import canonical_pixels, pixel_digest

_PART = re.compile(r"^(flip|shift(\d+)|rotate(\d+(?:\.\d+)?))$")
MAX_ROTATION = 45.0  # degrees; beyond it a "small rotation" turns a 6 into a 9


@dataclass(frozen=True)
class AugmentRecipe:
    """What a view may do to an image; every amount is drawn per view, uniformly up to its bound."""

    flip: bool = False   # mirror left-right with probability 1/2 (for photos; never for digits or text)
    shift: int = 0       # translate by up to this many pixels along each axis, edge pixels repeated (a crop of
                         # the image padded by its edges)
    rotate: float = 0.0  # rotate about the centre by up to this many degrees either way

    def __post_init__(self):
        if not isinstance(self.shift, int) or self.shift < 0:
            raise InvalidInputError(f"augmentation shift must be a non-negative number of pixels; got {self.shift!r}")
        if not 0 <= self.rotate <= MAX_ROTATION:
            raise InvalidInputError(f"augmentation rotation must be 0 to {MAX_ROTATION:g} degrees; got {self.rotate!r}")
        if not (self.flip or self.shift or self.rotate):
            raise InvalidInputError("an augmentation recipe must flip, shift or rotate")

    @classmethod
    def parse(cls, text: str) -> AugmentRecipe:
        """A recipe from its text: comma-separated `flip`, `shiftN` (pixels), `rotateD` (degrees), in any order."""
        values: dict = {}
        for part in (p.strip() for p in str(text).split(",")):
            match = _PART.match(part)
            if not match:
                raise InvalidInputError(f"unknown augmentation {part!r} in {text!r}; known: flip, shiftN (pixels), "
                                        "rotateD (degrees), joined by commas, e.g. 'flip,shift4,rotate10'")
            name = "flip" if part == "flip" else "shift" if match.group(2) else "rotate"
            if name in values:
                raise InvalidInputError(f"augmentation {name!r} given twice in {text!r}")
            values[name] = True if name == "flip" else int(match.group(2)) if name == "shift" else float(match.group(3))
        return cls(**values)

    def text(self) -> str:
        """The canonical text (`parse` reads it back): the same recipe is always written the same way."""
        parts = ["flip"] * self.flip + [f"shift{self.shift}"] * bool(self.shift) + \
            [f"rotate{self.rotate:g}"] * bool(self.rotate)
        return ",".join(parts)

    def view(self, image: np.ndarray, seed: int, index: int) -> np.ndarray:
        """View `index` of `image` (canonical uint8 (H, W, C)) under `seed`: canonical uint8 pixels, same shape
        (a colour image whose view has equal channels becomes gray, as any canonical image)."""
        from scipy import ndimage

        image = canonical_pixels(image)
        recipe = hashlib.sha256(self.text().encode()).digest()
        rng = np.random.default_rng([int(seed), int(index), int.from_bytes(pixel_digest(image)[:8], "little"),
                                     int.from_bytes(recipe[:8], "little")])
        flip = self.flip and bool(rng.integers(2))
        dy, dx = rng.integers(-self.shift, self.shift + 1, 2) if self.shift else (0, 0)
        angle = math.radians(rng.uniform(-self.rotate, self.rotate)) if self.rotate else 0.0
        if flip:
            image = image[:, ::-1]
        # affine_transform maps each output pixel o to the input point M o + offset: the inverse of
        # "rotate about the centre c, then shift by (dy, dx)", i.e. R^-1 (o - c - t) + c
        cos, sin = math.cos(angle), math.sin(angle)
        inverse = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])
        centre = np.array([(image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2, 0.0])
        offset = centre - inverse @ (centre + np.array([dy, dx, 0.0]))
        moved = ndimage.affine_transform(image.astype(np.float32), inverse, offset, order=1, mode="nearest")
        return canonical_pixels(np.clip(np.rint(moved), 0, 255).astype(np.uint8))
