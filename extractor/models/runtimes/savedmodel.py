"""SavedModel runtime: a TensorFlow SavedModel folder, one signature, cut at one of its output keys."""

from __future__ import annotations

import numpy as np

from extractor.errors import InvalidInputError, UnknownNameError
from extractor.models.runtimes import ModelInfo, Network, check_cut, pool_array

DEFAULT_SIGNATURE = "serving_default"


def _signature(path: str, name: str | None):
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(path)
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"cannot load {path} as a SavedModel: {e}") from e
    name = name or DEFAULT_SIGNATURE
    if name not in loaded.signatures:
        raise UnknownNameError(f"signature of {path}", name, loaded.signatures)
    function = loaded.signatures[name]
    args, kwargs = function.structured_input_signature
    specs = list(kwargs.values()) + [a for a in args if hasattr(a, "shape")]
    if len(specs) != 1 or specs[0].shape.rank != 4:
        raise InvalidInputError(f"{path}: signature {name!r} takes {len(specs)} inputs; an image model takes "
                                "one (n, H, W, C) tensor")
    return loaded, function, specs[0]


def inspect_model(path: str, *, architecture=None, signature=None, input_size=None) -> ModelInfo:
    _, function, input_spec = _signature(path, signature)
    names = sorted(function.structured_outputs)
    return ModelInfo(tuple(input_spec.shape[1:]), input_spec.dtype.name, tuple(names), names[0])


class SavedModelNetwork(Network):
    def __init__(self, spec, path: str):
        # The loaded object owns the variables the signature reads: keep it alive with the function.
        self._loaded, self._function, input_spec = _signature(path, spec.config.signature)
        outputs = sorted(self._function.structured_outputs)
        self._cut = spec.cut or outputs[0]
        check_cut(self._cut, outputs, spec.name)
        self._input_name = input_spec.name
        self.input_dtype = np.dtype(input_spec.dtype.as_numpy_dtype)
        declared = tuple(input_spec.shape[1:])
        if any(d is not None and d != want for d, want in zip(declared, spec.input_shape)):
            raise InvalidInputError(f"{spec.name}: the model takes input {declared}, not {spec.input_shape}")
        self.pooling = spec.pooling

    def forward(self, batch: np.ndarray) -> np.ndarray:
        out = self._function(**{self._input_name: batch})[self._cut].numpy()
        return pool_array(out.astype(np.float32, copy=False), self.pooling)


def open_network(spec, path: str) -> Network:
    return SavedModelNetwork(spec, path)
