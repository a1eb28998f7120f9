"""The backbone registry: one `BackboneSpec` record per frozen pretrained network, and building it once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from extractor import paths
from extractor.errors import ChecksumError, InvalidInputError, UnknownNameError
from extractor.recipes import CAFFE, LECTURE, RAW, UNIT, Recipe, apply_recipe

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = 1
MNIST_CNN_FILE = "mnist_cnn.keras"


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that belongs to one frozen backbone and its weights.

    The fingerprint hashes every field that changes the output vectors (architecture, weights sha256,
    cut, input size, recipe and its parameters, pooling, dtype), so changing any of them gives new
    cache keys; `summary`, `weights_path` and the allowed values do not change vectors and are left out.
    """

    name: str
    summary: str
    architecture: str
    cut: str
    input_size: int
    channels: int
    recipe: Recipe
    recipes: tuple[Recipe, ...]
    pooling: str
    poolings: tuple[str, ...]
    weights_file: str
    weights_path: str | None = None
    weights_sha256: str | None = None
    fixed_input_size: bool = False
    min_input_size: int = 32
    dtype: str = "float32"
    build: Callable = field(default=None, compare=False, repr=False)
    output_dim_for: Callable = field(default=None, compare=False, repr=False)

    @property
    def output_dim(self) -> int:
        return self.output_dim_for(self)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.input_size, self.input_size, self.channels)

    def fingerprint_fields(self) -> dict:
        if not self.weights_sha256:
            raise ChecksumError(f"backbone {self.name!r} has no weights sha256 yet ({self.weights_hint()})")
        return {
            "version": FINGERPRINT_VERSION,
            "architecture": self.architecture,
            "weights_sha256": self.weights_sha256,
            "cut": self.cut,
            "input_size": self.input_size,
            "channels": self.channels,
            "recipe": self.recipe.params(),
            "pooling": self.pooling,
            "dtype": self.dtype,
        }

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self.fingerprint_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def weights_hint(self) -> str:
        if self.name == "mnist_cnn":
            return "run `python -m extractor pretrain mnist_cnn` first"
        return f"expected {self.weights_file} listed in SHA256SUMS, or pass --weights-sha256"

    def configure(self, input_size: int | None = None, recipe: str | None = None,
                  pooling: str | None = None) -> "BackboneSpec":
        """A copy with other options, each checked against what this backbone allows."""
        changes = {}
        if input_size is not None and input_size != self.input_size:
            if self.fixed_input_size:
                raise InvalidInputError(f"{self.name} takes only input size {self.input_size}, got {input_size}")
            if input_size < self.min_input_size:
                raise InvalidInputError(f"{self.name} needs input size >= {self.min_input_size}, got {input_size}")
            changes["input_size"] = input_size
        if recipe is not None:
            by_name = {r.name: r for r in self.recipes}
            if recipe not in by_name:
                raise UnknownNameError(f"recipe for {self.name}", recipe, by_name)
            changes["recipe"] = by_name[recipe]
        if pooling is not None:
            if pooling not in self.poolings:
                raise UnknownNameError(f"pooling for {self.name}", pooling, self.poolings)
            changes["pooling"] = pooling
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict:
        """The registry entry as plain data (what `extractor backbones --json` prints)."""
        try:
            fingerprint = self.fingerprint
        except ChecksumError:
            fingerprint = None
        return {
            "name": self.name, "summary": self.summary, "output_dim": self.output_dim,
            "input_size": self.input_size, "channels": self.channels, "recipe": self.recipe.name,
            "recipes": [r.name for r in self.recipes], "pooling": self.pooling,
            "poolings": list(self.poolings), "cut": self.cut, "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256, "fingerprint": fingerprint,
        }


# --- builders: (spec, verified weights path) -> function (n, H, W, C) batch -> (n, d) float32 ---------

def _keras_forward(model, spec: BackboneSpec) -> Callable[[np.ndarray], np.ndarray]:
    import tensorflow as tf

    model.trainable = False
    dtype = tf.uint8 if spec.recipe.scale == "uint8" else tf.float32
    compiled = tf.function(lambda x: model(x, training=False), jit_compile=False, reduce_retracing=True,
                           input_signature=[tf.TensorSpec((None, *spec.input_shape), dtype)])
    return lambda batch: compiled(batch).numpy()


def _pooled(keras, features, pooling: str):
    layer = keras.layers.Flatten() if pooling == "flatten" else keras.layers.GlobalAveragePooling2D()
    return layer(features)


def _build_vgg16(spec: BackboneSpec, weights: Path):
    import keras

    base = keras.applications.VGG16(include_top=False, weights=str(weights), input_shape=spec.input_shape)
    model = keras.Model(base.input, _pooled(keras, base.get_layer(spec.cut).output, spec.pooling))
    return _keras_forward(model, spec)


def _build_mnist_cnn(spec: BackboneSpec, weights: Path):
    import keras

    trained = keras.models.load_model(weights, compile=False)
    inputs = keras.Input(spec.input_shape)
    x = inputs
    for layer in trained.layers:  # rebuilt up to the cut; Dropout and the classifier belong to the head
        x = layer(x)
        if layer.name == spec.cut:
            break
    else:
        raise InvalidInputError(f"{weights} has no layer {spec.cut!r}")
    return _keras_forward(keras.Model(inputs, x), spec)


def _build_squeezenet(spec: BackboneSpec, weights: Path):
    from extractor.squeezenet import build_squeezenet

    return _keras_forward(build_squeezenet(spec.input_shape, str(weights), spec.pooling), spec)


def _build_mobilenet_v1(spec: BackboneSpec, weights: Path):
    from extractor.tflite_backbone import TFLiteEmbedder

    return TFLiteEmbedder(str(weights)).embed


def _vgg_like_dim(channels: int, stride: int) -> Callable[[BackboneSpec], int]:
    def output_dim(spec: BackboneSpec) -> int:
        side = spec.input_size // stride
        return channels * (side * side if spec.pooling == "flatten" else 1)
    return output_dim


def _squeezenet_dim(spec: BackboneSpec) -> int:
    side = spec.input_size
    for kernel in (3, 3, 3, 3):  # conv1 (valid, stride 2), then three 3x3/2 max pools
        side = (side - kernel) // 2 + 1
    return 512 * (side * side if spec.pooling == "flatten" else 1)


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="vgg16", summary="VGG16 convolutional base, ImageNet weights (keras.applications)",
            architecture="keras.applications.VGG16/include_top=False", cut="block5_pool",
            input_size=32, channels=3, recipe=LECTURE, recipes=(LECTURE, CAFFE), pooling="flatten",
            poolings=("flatten", "avg"), weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            build=_build_vgg16, output_dim_for=_vgg_like_dim(512, 32)),
        BackboneSpec(
            name="mnist_cnn", summary="the lecture's small CNN pretrained on MNIST digits 0,2,4,6,8",
            architecture="lecture.tl_mnist.cnn/conv32-pool-conv64-pool", cut="flatten",
            input_size=28, channels=1, recipe=UNIT, recipes=(UNIT,), pooling="flatten",
            poolings=("flatten",), weights_file=MNIST_CNN_FILE, fixed_input_size=True, min_input_size=28,
            build=_build_mnist_cnn, output_dim_for=lambda spec: 1600),
        BackboneSpec(
            name="squeezenet", summary="SqueezeNet 1.1 up to fire9, ImageNet weights",
            architecture="squeezenet1.1/fire9-concat", cut="fire9_concat",
            input_size=227, channels=3, recipe=CAFFE, recipes=(CAFFE,), pooling="avg",
            poolings=("avg", "flatten"), weights_file="squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5",
            min_input_size=31, build=_build_squeezenet, output_dim_for=_squeezenet_dim),
        BackboneSpec(
            name="mobilenet_v1", summary="MobileNet V1 1.0 224, uint8-quantized TFLite embedding extractor",
            architecture="tflite.mobilenet_v1_1.0_224_quant/embedding", cut="avgpool",
            input_size=224, channels=3, recipe=RAW, recipes=(RAW,), pooling="avg", poolings=("avg",),
            weights_file="mobilenet_v1_1.0_224_quant_embedding_extractor.tflite", fixed_input_size=True,
            min_input_size=224, build=_build_mobilenet_v1, output_dim_for=lambda spec: 1024),
    )
}


def backbone_names() -> list[str]:
    return sorted(REGISTRY)


def get_backbone_spec(name: str, *, input_size: int | None = None, recipe: str | None = None,
                      pooling: str | None = None, weights: str | os.PathLike | None = None,
                      weights_sha256: str | None = None, data_dir: str | os.PathLike | None = None) -> BackboneSpec:
    """The registry's spec for `name`, configured, with its weights file and expected sha256 resolved.

    Shared weights are found in the data directory and their sha256 in its SHA256SUMS; the pretrained
    MNIST CNN lives in the cache directory with a `.sha256` file beside it; `weights` and
    `weights_sha256` override both.
    """
    if name not in REGISTRY:
        raise UnknownNameError("backbone", name, REGISTRY)
    spec = REGISTRY[name].configure(input_size=input_size, recipe=recipe, pooling=pooling)
    if weights:
        path = Path(weights).expanduser().resolve()
    elif name == "mnist_cnn":
        path = paths.cache_dir() / "models" / spec.weights_file
    else:
        path = (paths.data_dir(data_dir) / spec.weights_file).absolute()  # Ray workers open it from another cwd
    sha256 = weights_sha256 or _listed_sha256(path)
    return dataclasses.replace(spec, weights_path=str(path), weights_sha256=sha256 and sha256.lower())


def _listed_sha256(path: Path) -> str | None:
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        return sidecar.read_text().split()[0]
    return paths.published_sha256(path.name, path.parent)


class FrozenBackbone:
    """A built backbone: canonical uint8 images -> (n, output_dim) float32 vectors.

    Batches are cut into chunks of at most `max_batch` images; the compiled function takes any
    batch size without retracing.
    """

    def __init__(self, spec: BackboneSpec, max_batch: int = 128):
        self.spec = spec
        self.max_batch = max_batch
        weights = paths.verified_file(spec.weights_path or spec.weights_file, spec.weights_sha256) \
            if spec.weights_sha256 else None
        if weights is None:
            raise ChecksumError(f"cannot build {spec.name}: {spec.weights_hint()}")
        log.info("building backbone %s (input %s, recipe %s, %s)", spec.name, spec.input_size,
                 spec.recipe.name, spec.pooling)
        self._forward = spec.build(spec, weights)

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        """Canonical uint8 images -> the backbone's input batch (n, S, S, C)."""
        return apply_recipe(self.spec.recipe, images, self.spec.input_size, self.spec.channels)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed batch (n, S, S, C) -> (n, output_dim) float32."""
        if len(batch) == 0:
            return np.empty((0, self.spec.output_dim), dtype=np.float32)
        chunks = [self._forward(batch[i:i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        out = np.concatenate(chunks).reshape(len(batch), -1).astype(np.float32, copy=False)
        if out.shape[1] != self.spec.output_dim:
            raise InvalidInputError(f"{self.spec.name} gave {out.shape[1]} features, expected {self.spec.output_dim}")
        return out

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """Canonical uint8 images -> (n, output_dim) float32."""
        return self.forward(self.preprocess(images))


_built: dict[str, FrozenBackbone] = {}
_build_lock = threading.Lock()


def load_backbone(spec: BackboneSpec) -> FrozenBackbone:
    """The built backbone for `spec`, built once per process (keyed by fingerprint)."""
    key = spec.fingerprint
    with _build_lock:
        if key not in _built:
            _built[key] = FrozenBackbone(spec)
        return _built[key]
