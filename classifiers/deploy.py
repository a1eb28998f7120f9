"""One deployable model: preprocessing, the frozen backbone up to its cut and a trained head as one network
taking uint8 pixels, written as a Keras file, a SavedModel, TFLite or ONNX.

Built from stock Keras layers only, so plain Keras, TF Serving, the TFLite interpreter or ONNX Runtime
run it without this project. Its input is (n, S, S, C) uint8 pixels at the backbone's input size and
channels (padding and resizing, which the project does on the host, are the caller's); its output is
(n, k) class probabilities in the order of the head's class names.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from extractor.errors import InvalidInputError, UnknownNameError

log = logging.getLogger(__name__)

FORMATS = {"keras": ".keras", "savedmodel": "", "tflite": ".tflite", "onnx": ".onnx"}


def preprocessing_layers(preprocessing, channels: int) -> list:
    """Keras layers doing `Preprocessing.apply`'s arithmetic on pixels already at the input size: cast to
    float32, channel order, (x - mean) / std, as one fixed per-channel affine map."""
    import keras

    if preprocessing.dtype != "float32":
        raise InvalidInputError(f"preprocessing {preprocessing.name!r} feeds uint8 to the model: export needs a "
                                "backbone that takes float32 input")
    mean = np.broadcast_to(np.asarray(preprocessing.mean, np.float64), (channels,))
    std = np.broadcast_to(np.asarray(preprocessing.std, np.float64), (channels,))
    order = np.arange(channels)[::-1] if preprocessing.channel_order == "bgr" else np.arange(channels)
    kernel = np.zeros((channels, channels), np.float64)
    kernel[order, np.arange(channels)] = 1.0 / std  # output channel j = (input channel order[j] - mean[j]) / std[j]
    affine = keras.layers.Dense(channels, name="preprocessing", trainable=False)
    affine.build((None, None, None, channels))
    affine.set_weights([kernel.astype(np.float32), (-mean / std).astype(np.float32)])
    return [keras.layers.Rescaling(1.0, name="to_float32"), affine]


def head_layers(head, n_features: int) -> list:
    """The head as Keras layers ending in class probabilities: a `KerasHead` as it is, a logistic
    regression (`logreg`, or scikit-learn's own, optionally after a StandardScaler) as Dense + softmax."""
    import keras
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from classifiers.baselines import SweptLogisticRegression
    from classifiers.heads import KerasHead, inference_model

    if isinstance(head, KerasHead):  # rebuilt from its weights: heads saved before they were stock Keras too
        weights = [w for layer in head.model_.layers if layer.trainable_weights for w in layer.get_weights()]
        return list(inference_model(head.spec, weights).layers)
    model = head.model_ if isinstance(head, SweptLogisticRegression) else head
    steps = list(model.named_steps.values()) if isinstance(model, Pipeline) else [model]
    scaler = steps[0] if len(steps) == 2 and isinstance(steps[0], StandardScaler) else None
    linear = steps[-1]
    if not isinstance(linear, LogisticRegression) or len(steps) != (2 if scaler else 1):  # CV is a subclass
        raise InvalidInputError(f"cannot export a {type(head).__name__} head: export takes Keras heads and "
                                "logistic regression (logreg)")
    coef, intercept = linear.coef_.astype(np.float64), linear.intercept_.astype(np.float64)
    if scaler is not None:  # ((x - mu) / sigma) w + b = x (w / sigma) + (b - mu/sigma . w)
        scale = scaler.scale_ if scaler.scale_ is not None else np.ones(n_features)
        mu = scaler.mean_ if scaler.mean_ is not None else np.zeros(n_features)
        intercept = intercept - (mu / scale) @ coef.T
        coef = coef / scale
    if coef.shape[0] == 1:  # binary: p = sigmoid(z) = softmax([0, z])
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    dense = keras.layers.Dense(coef.shape[0], activation="softmax", name="head")
    dense.build((None, n_features))
    dense.set_weights([coef.T.astype(np.float32), intercept.astype(np.float32)])
    return [dense]


def deployable_model(spec, head):
    """One Keras model: (n, S, S, C) uint8 pixels -> (n, k) float32 probabilities, for a Keras-runtime backbone."""
    import keras

    from extractor import paths
    from extractor.models.runtimes.keras_model import cut_model

    if spec.runtime != "keras":
        raise InvalidInputError(f"{spec.name} runs on {spec.runtime}: export builds on Keras-runtime backbones")
    path = spec.path if spec.path == "imagenet" else str(paths.verified_file(spec.path, spec.sha256))
    backbone = cut_model(spec, path)
    pixels = keras.Input(spec.input_shape, dtype="uint8", name="pixels")
    x = pixels
    for layer in preprocessing_layers(spec.preprocessing, spec.channels):
        x = layer(x)
    x = backbone(x)
    if x.shape[-1] != head.n_features_in_:
        raise InvalidInputError(f"the head takes {head.n_features_in_}-d vectors, {spec.name} gives {x.shape[-1]}")
    for layer in head_layers(head, x.shape[-1]):
        x = layer(x)
    model = keras.Model(pixels, x, name=f"{spec.name}_classifier")
    model.trainable = False
    return model


def export_model(model, out: str | os.PathLike, fmt: str) -> Path:
    """Write `model` as `fmt` (keras, savedmodel, tflite, onnx) at `out` (its suffix added); return the path."""
    if fmt not in FORMATS:
        raise UnknownNameError("export format", fmt, FORMATS)
    out = Path(out)
    if FORMATS[fmt] and out.suffix != FORMATS[fmt]:
        out = out.with_name(out.name + FORMATS[fmt])
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "keras":
        model.save(out)
    elif fmt == "savedmodel":
        model.export(str(out), format="tf_saved_model", verbose=False)
    elif fmt == "tflite":
        out.write_bytes(_tflite_bytes(model))
    else:
        _write_onnx(model, out)
    log.info("exported %s as %s: %s", model.name, fmt, out)
    return out


def _tflite_bytes(model) -> bytes:
    import tensorflow as tf

    staging = Path(tempfile.mkdtemp(prefix="export-"))
    try:
        model.export(str(staging / "saved"), format="tf_saved_model", verbose=False)
        return tf.lite.TFLiteConverter.from_saved_model(str(staging / "saved")).convert()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_onnx(model, out: Path) -> None:
    import tensorflow as tf

    try:
        import tf2onnx
    except ImportError:
        from extractor.errors import MissingDependencyError

        raise MissingDependencyError("ONNX export needs the onnx extra: pip install 'frozen-features[onnx]'") from None
    signature = [tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.uint8, name="pixels")]
    function = tf.function(lambda pixels: model(pixels, training=False), input_signature=signature)
    tf2onnx.convert.from_function(function, input_signature=signature, output_path=str(out))
