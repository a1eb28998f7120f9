"""SqueezeNet 1.1 in Keras, cut after fire9, with strict loading of its Keras legacy h5 weights."""

from __future__ import annotations

import logging
import os

import h5py
import keras
import numpy as np
from keras import layers

from extractor.errors import InvalidInputError

log = logging.getLogger(__name__)

# conv1 (3x3/2) and the three 3x3/2 max pools, all 'valid', take a side s to (s - 3) // 2 + 1;
# 31 is the smallest side that still leaves fire6..fire9 a 1x1 map.
MIN_INPUT_SIDE = 31

# (fire id, squeeze filters, expand filters per branch), in order; a max pool follows fire3 and fire5.
_FIRE_MODULES = ((2, 16, 64), (3, 16, 64), (4, 32, 128), (5, 32, 128),
                 (6, 48, 192), (7, 48, 192), (8, 64, 256), (9, 64, 256))
_POOL_AFTER_FIRE = {3: "pool3", 5: "pool5"}

# Pinned so a global keras.config "channels_first" cannot silently change what the kernels see.
_DATA_FORMAT = "channels_last"


def layer_name(h5_name: str) -> str:
    """The Keras layer name for a layer of the h5 file: Keras 3 forbids '/' in names ('fire2/concat')."""
    return h5_name.replace("/", "_")


def build_squeezenet(input_shape: tuple[int, int, int], weights_path: str | os.PathLike | None) -> keras.Model:
    """SqueezeNet 1.1 from (n, H, W, 3) caffe-preprocessed pixels (BGR, ImageNet means subtracted).

    Output: the fire9 concat (the last deterministic layer; drop9 belongs to the head), (n, h, w, 512).
    `weights_path` is a verified h5 file loaded strictly (see `load_squeezenet_weights`), or None.
    """
    if (len(input_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in input_shape)
            or min(input_shape[:2]) < MIN_INPUT_SIDE):
        raise InvalidInputError(
            f"SqueezeNet input shape must be (height, width, channels) with height and width at least "
            f"{MIN_INPUT_SIDE}; got {tuple(input_shape)}")

    inputs = keras.Input(shape=input_shape, name="input_1")
    x = layers.Conv2D(64, 3, strides=2, padding="valid", data_format=_DATA_FORMAT, name="conv1")(inputs)
    x = layers.Activation("relu", name="relu_conv1")(x)
    x = layers.MaxPooling2D(3, strides=2, data_format=_DATA_FORMAT, name="pool1")(x)
    for fire_id, squeeze, expand in _FIRE_MODULES:
        x = _fire_module(x, fire_id, squeeze, expand)
        if fire_id in _POOL_AFTER_FIRE:
            x = layers.MaxPooling2D(3, strides=2, data_format=_DATA_FORMAT, name=_POOL_AFTER_FIRE[fire_id])(x)
    model = keras.Model(inputs, x, name="squeezenet1_1")

    if weights_path is not None:
        count = load_squeezenet_weights(model, weights_path)
        log.info("SqueezeNet: %d tensors loaded from %s", count, weights_path)
    return model


def _fire_module(x, fire_id: int, squeeze: int, expand: int):
    """Squeeze 1x1, then expand 1x1 and 3x3 side by side; concat puts the 1x1 branch first, as trained."""
    prefix = f"fire{fire_id}/"
    x = layers.Conv2D(squeeze, 1, padding="valid", data_format=_DATA_FORMAT,
                      name=layer_name(prefix + "squeeze1x1"))(x)
    x = layers.Activation("relu", name=layer_name(prefix + "relu_squeeze1x1"))(x)
    left = layers.Conv2D(expand, 1, padding="valid", data_format=_DATA_FORMAT,
                         name=layer_name(prefix + "expand1x1"))(x)
    left = layers.Activation("relu", name=layer_name(prefix + "relu_expand1x1"))(left)
    right = layers.Conv2D(expand, 3, padding="same", data_format=_DATA_FORMAT,
                          name=layer_name(prefix + "expand3x3"))(x)
    right = layers.Activation("relu", name=layer_name(prefix + "relu_expand3x3"))(right)
    return layers.Concatenate(axis=-1, name=layer_name(prefix + "concat"))([left, right])


def load_squeezenet_weights(model: keras.Model, weights_path: str | os.PathLike) -> int:
    """Assign every tensor of a Keras legacy h5 weights file to its layer; return how many were assigned.

    Tensors are matched by layer name and, within a layer, by order (kernel, bias): the file's own
    tensor names ('uniform1', 'conv1_b') say nothing about their role. Strict: a tensor with no layer,
    a model layer with weights but no tensors, or a shape that differs raises InvalidInputError naming
    it, and then nothing has been assigned.
    """
    tensors = _read_h5_tensors(weights_path)
    unmatched = {layer.name: layer for layer in model.layers if layer.weights}
    assignments = []
    for h5_layer, named_arrays in tensors.items():
        layer = unmatched.pop(layer_name(h5_layer), None)
        if layer is None:
            raise InvalidInputError(
                f"{weights_path}: tensor {named_arrays[0][0]!r} belongs to layer {h5_layer!r}, "
                f"which the model {model.name!r} does not have")
        if len(named_arrays) != len(layer.weights):
            raise InvalidInputError(
                f"{weights_path}: layer {h5_layer!r} has {len(named_arrays)} tensor(s) in the file "
                f"({', '.join(name for name, _ in named_arrays)}), the model's layer {layer.name!r} "
                f"has {len(layer.weights)}")
        for (name, array), variable in zip(named_arrays, layer.weights):
            if tuple(array.shape) != tuple(variable.shape):
                raise InvalidInputError(
                    f"{weights_path}: tensor {name!r} has shape {tuple(array.shape)}, "
                    f"layer {layer.name!r} expects {tuple(variable.shape)}")
        assignments.append((layer, [array for _, array in named_arrays]))
    if unmatched:
        raise InvalidInputError(
            f"{weights_path}: no tensors in the file for layer(s) {', '.join(sorted(unmatched))} "
            f"of the model {model.name!r}")
    for layer, arrays in assignments:
        layer.set_weights(arrays)
    return sum(len(arrays) for _, arrays in assignments)


def _read_h5_tensors(weights_path: str | os.PathLike) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Every tensor of a Keras legacy h5 weights file: {layer: [(tensor path, array), ...]}, file order.

    Layers without tensors are left out. A tensor that no listed layer names, or a listed one that
    is missing, raises InvalidInputError.
    """
    try:
        f = h5py.File(weights_path, "r")
    except OSError as e:
        raise InvalidInputError(f"cannot read {weights_path} as an HDF5 weights file: {e}") from e
    with f:
        if "layer_names" not in f.attrs:
            raise InvalidInputError(f"{weights_path} is not a Keras h5 weights file: no 'layer_names' attribute")
        datasets: set[str] = set()
        f.visititems(lambda path, obj: datasets.add(path) if isinstance(obj, h5py.Dataset) else None)
        tensors: dict[str, list[tuple[str, np.ndarray]]] = {}
        for h5_layer in _strings(f.attrs["layer_names"]):
            group = f.get(h5_layer)
            if not isinstance(group, h5py.Group):
                raise InvalidInputError(f"{weights_path}: layer {h5_layer!r} is listed but has no group")
            named_arrays = []
            for weight_name in _strings(group.attrs.get("weight_names", [])):
                path = f"{h5_layer}/{weight_name}"
                if path not in datasets:
                    raise InvalidInputError(f"{weights_path}: tensor {path!r} is listed but not in the file")
                named_arrays.append((path, np.asarray(f[path])))
            if named_arrays:
                tensors[h5_layer] = named_arrays
        unclaimed = datasets - {path for named_arrays in tensors.values() for path, _ in named_arrays}
        if unclaimed:
            raise InvalidInputError(
                f"{weights_path}: tensor(s) {', '.join(sorted(unclaimed))} belong to no layer listed in the file")
    return tensors


def _strings(values) -> list[str]:
    """An h5 attribute of names (bytes, or an empty float array when there are none) as str."""
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]
