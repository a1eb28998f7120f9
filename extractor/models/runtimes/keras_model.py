"""Keras runtime: a `.keras` / `.h5` model file, or a keras.applications architecture with a weights file."""

from __future__ import annotations

import numpy as np

from extractor.errors import InvalidInputError, UnknownNameError
from extractor.models.runtimes import ModelInfo, Network, check_cut, keras_pooling_layer

# Architectures Keras does not ship, written in this project to match published weights.
_OWN_ARCHITECTURES = {"SqueezeNet1.1": "extractor.models.squeezenet:build_squeezenet"}


def _architecture_builder(name: str):
    import importlib

    import keras

    if name in _OWN_ARCHITECTURES:
        module, function = _OWN_ARCHITECTURES[name].split(":")
        return getattr(importlib.import_module(module), function)
    constructor = getattr(keras.applications, name, None)
    if not callable(constructor) or not name[:1].isupper():
        known = [n for n in dir(keras.applications) if n[:1].isupper()] + list(_OWN_ARCHITECTURES)
        raise UnknownNameError("Keras architecture", name, known)
    return lambda input_shape, weights: constructor(include_top=False, weights=weights, input_shape=input_shape)


def load_whole_model(path: str, *, architecture: str | None, input_shape: tuple[int, int, int] | None):
    """The uncut Keras model: the architecture built with its weights, or the file loaded (safe mode:
    a file with Lambda layers or other arbitrary code is refused)."""
    import keras

    if architecture:
        if input_shape is None:
            raise InvalidInputError(f"a {architecture} needs an input size")
        return _architecture_builder(architecture)(input_shape, path)
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except ValueError as e:
        raise InvalidInputError(f"cannot load {path} as a Keras model: {e}") from e


def _input_shape(model) -> tuple:
    if len(model.inputs) != 1:
        raise InvalidInputError(f"the model has {len(model.inputs)} inputs; an image model has one")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise InvalidInputError(f"the model's input has shape {shape}; an image model takes (n, H, W, C)")
    return shape[1:]


def layer_names(model) -> list[str]:
    return [layer.name for layer in model.layers]


def inspect_model(path: str, *, architecture=None, signature=None, input_size=None) -> ModelInfo:
    shape = (input_size, input_size, 3) if architecture else None
    model = load_whole_model(path, architecture=architecture, input_shape=shape)
    names = layer_names(model)
    output_layer = model.outputs[0]._keras_history.operation.name
    return ModelInfo(_input_shape(model), "float32", tuple(names), output_layer)


def cut_model(spec, path: str):
    """The entry's frozen Keras model from its preprocessed input to the pooled cut, (n, d): what both the
    embedding and the classic end-to-end baseline run."""
    import keras

    model = load_whole_model(path, architecture=spec.config.architecture, input_shape=spec.input_shape)
    declared = _input_shape(model)
    if not spec.config.architecture and declared[:2] != (None, None) and declared != spec.input_shape:
        raise InvalidInputError(f"{spec.name}: the model takes input {declared}, not {spec.input_shape}")
    if declared[2] not in (None, spec.channels):
        raise InvalidInputError(f"{spec.name}: the model takes {declared[2]} channels, the entry says {spec.channels}")
    cut = spec.cut or model.outputs[0]._keras_history.operation.name
    check_cut(cut, layer_names(model), spec.name)
    features = model.get_layer(cut).output
    if isinstance(features, (list, tuple)):
        raise InvalidInputError(f"{spec.name}: layer {cut!r} has {len(features)} outputs; cut at a layer with one")
    pooling = keras_pooling_layer(spec.pooling, len(features.shape))
    cut = keras.Model(model.inputs, pooling(features) if pooling else features, name=f"{spec.name}_to_{cut}")
    cut.trainable = False
    return cut


class KerasNetwork(Network):
    """The cut model in a compiled `tf.function` (a steady 1.3-1.7x faster than `predict` on 2 cores)."""

    def __init__(self, spec, path: str):
        import tensorflow as tf

        self.model = model = cut_model(spec, path)  # also what `models optimize` converts
        self.input_dtype = np.dtype(spec.preprocessing.dtype)
        self._compiled = tf.function(lambda x: model(x, training=False), jit_compile=False, reduce_retracing=True,
                                     input_signature=[tf.TensorSpec((None, *spec.input_shape), self.input_dtype)])

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self._compiled(batch).numpy()


def open_network(spec, path: str) -> Network:
    return KerasNetwork(spec, path)
