"""`BackboneSpec`: one repository entry resolved for use (file, sha256, options) and its fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from extractor.errors import ChecksumError, InvalidInputError, UnknownNameError
from extractor.models.config import POOLINGS, ModelConfig
from extractor.models.preprocessing import PRESETS, Preprocessing, preset

# 2: the entry's content (runtime, file sha256, cut, preprocessing numbers, ...); 1 hashed a Python registry.
FINGERPRINT_VERSION = 2


@dataclass(frozen=True)
class BackboneSpec:
    """A repository entry with its file resolved and its options chosen.

    The fingerprint hashes everything that changes the vectors: runtime, the file's sha256,
    architecture, signature, cut, input size, channels, layout, the preprocessing numbers and the
    pooling; so changing any of them gives new cache keys. Summary, version and paths do not.
    """

    config: ModelConfig
    path: str                   # the model file (or folder), absolute, or "imagenet"
    sha256: str | None          # what the file must hash to; None until known
    input_size: int
    preprocessing: Preprocessing
    pooling: str

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def summary(self) -> str:
        return self.config.summary

    @property
    def runtime(self) -> str:
        return self.config.runtime

    @property
    def cut(self) -> str | None:
        return self.config.cut

    @property
    def channels(self) -> int:
        return self.config.channels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.input_size, self.input_size, self.channels)

    @property
    def at_defaults(self) -> bool:
        """Whether the options are the entry's own (so its recorded output width applies)."""
        return (self.input_size, self.preprocessing, self.pooling) == (
            self.config.input_size, self.config.preprocessing, self.config.pooling)

    @property
    def output_dim(self) -> int | None:
        """The vector width recorded in the entry, at its own options; other options: None until built
        (`load_backbone(spec).output_dim`)."""
        return self.config.output_dim if self.at_defaults else None

    def fingerprint_fields(self) -> dict:
        if not self.sha256 and self.path != "imagenet":
            raise ChecksumError(f"model {self.name!r} has no sha256 yet: {self.missing_hint()}")
        return {
            "version": FINGERPRINT_VERSION,
            "runtime": self.runtime,
            "sha256": self.sha256 or f"keras-imagenet:{self.config.architecture}",
            "architecture": self.config.architecture,
            "signature": self.config.signature,
            "cut": self.cut,
            "input_size": self.input_size,
            "channels": self.channels,
            "layout": self.config.layout,
            "preprocessing": self.preprocessing.params(),
            "pooling": self.pooling,
        }

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self.fingerprint_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def missing_hint(self) -> str:
        return self.config.missing or (
            f"give its sha256 in {self.config.folder}/config.toml, list it in SHA256SUMS beside the file, "
            "or write a <file>.sha256 sidecar")

    def configure(self, input_size: int | None = None, recipe: str | Preprocessing | None = None,
                  pooling: str | None = None) -> "BackboneSpec":
        """A copy with other options, each checked against what this entry allows."""
        changes = {}
        if input_size is not None and input_size != self.input_size:
            if not self.config.resizable:
                raise InvalidInputError(f"{self.name} takes only input size {self.input_size}, got {input_size}")
            if input_size < self.config.min_input_size:
                raise InvalidInputError(
                    f"{self.name} needs input size >= {self.config.min_input_size}, got {input_size}")
            changes["input_size"] = input_size
        if recipe is not None:
            changes["preprocessing"] = recipe if isinstance(recipe, Preprocessing) else preset(recipe)
        if pooling is not None:
            if pooling not in POOLINGS:
                raise UnknownNameError(f"pooling for {self.name}", pooling, POOLINGS)
            changes["pooling"] = pooling
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict:
        """The entry as plain data (what `models list --json` prints)."""
        try:
            fingerprint = self.fingerprint
        except ChecksumError:
            fingerprint = None
        return {
            "name": self.name, "summary": self.summary, "version": self.config.version, "runtime": self.runtime,
            "file": self.path, "sha256": self.sha256, "architecture": self.config.architecture, "cut": self.cut,
            "input_size": self.input_size, "channels": self.channels, "resizable": self.config.resizable,
            "preprocessing": self.preprocessing.name, "recipes": sorted(PRESETS), "pooling": self.pooling,
            "output_dim": self.output_dim, "fingerprint": fingerprint,
            "folder": self.config.folder, "measured": self.config.measured,
        }
