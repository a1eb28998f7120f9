"""The runtimes a repository entry can name, one module each, behind one interface: `Network`.

A runtime opens a model file, cuts it at a named layer / tensor / output key / node output, and maps a
preprocessed batch (n, H, W, C) to the cut's output, pooled to (n, d). `inspect_model` tells what a
file holds (input shape and dtype, the names a cut may take) before an entry exists.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass

import numpy as np

from extractor.errors import InvalidInputError, UnknownNameError

_MODULES = {"keras": "keras_model", "savedmodel": "savedmodel", "tflite": "tflite", "onnx": "onnx_model"}


class CutShapeError(InvalidInputError):
    """The cut's output has a shape the pooling cannot take (an (n, H, W, C) map with pooling none)."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model file holds, read without cutting it."""

    input_shape: tuple[int | None, int | None, int | None]  # (H, W, C) in NHWC order; None: any
    input_dtype: str                                        # "float32" or "uint8"
    names: tuple[str, ...]                                  # what a cut may name, in graph order
    default_cut: str                                        # the model's first output
    layout: str = "nhwc"


class Network:
    """A model cut and pooled: `forward` takes a preprocessed (n, H, W, C) batch, gives (n, d) float32."""

    input_dtype: np.dtype = np.dtype(np.float32)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def runtime_module(runtime: str):
    from extractor.models.quiet import import_tensorflow_quietly

    if runtime not in _MODULES:
        raise UnknownNameError("runtime", runtime, _MODULES)
    import_tensorflow_quietly()
    return importlib.import_module(f"extractor.models.runtimes.{_MODULES[runtime]}")


def open_network(spec, path: str) -> Network:
    """The built network of `spec` (a BackboneSpec) from its verified file."""
    return runtime_module(spec.runtime).open_network(spec, path)


def inspect_model(runtime: str, path: str, *, architecture: str | None = None, signature: str | None = None,
                  input_size: int | None = None) -> ModelInfo:
    return runtime_module(runtime).inspect_model(path, architecture=architecture, signature=signature,
                                                 input_size=input_size)


def check_cut(cut: str, names, model: str) -> None:
    """Refuse a cut the model does not have, naming the closest names it does have."""
    names = list(names)
    if cut not in names:
        closest = difflib.get_close_matches(cut, names, n=8, cutoff=0)
        raise InvalidInputError(f"{model} has no layer or tensor {cut!r}; closest: {', '.join(closest)}")


def pool_array(x: np.ndarray, pooling: str) -> np.ndarray:
    """Pool a cut's output (n, ...) to (n, d): over the spatial axes of (n, H, W, C) for avg and max."""
    if pooling == "none":
        if x.ndim != 2:
            raise CutShapeError(f"the cut gives shape {tuple(x.shape)}, not (n, d): choose pooling "
                                    "flatten, avg or max")
        return x
    if pooling == "flatten":
        return x.reshape(len(x), -1)
    if x.ndim != 4:
        raise CutShapeError(f"{pooling} pooling needs an (n, H, W, C) output, the cut gives {tuple(x.shape)}")
    return x.mean(axis=(1, 2)) if pooling == "avg" else x.max(axis=(1, 2))


def keras_pooling_layer(pooling: str, rank: int):
    """The Keras layer for a pooling, or None (the cut's output is used as it is)."""
    from keras import layers

    if pooling == "none":
        if rank != 2:
            raise CutShapeError(f"the cut gives a rank-{rank} output, not (n, d): choose pooling "
                                    "flatten, avg or max")
        return None
    if pooling == "flatten":
        return layers.Flatten()
    if rank != 4:
        raise CutShapeError(f"{pooling} pooling needs an (n, H, W, C) output, the cut gives rank {rank}")
    return layers.GlobalAveragePooling2D() if pooling == "avg" else layers.GlobalMaxPooling2D()
