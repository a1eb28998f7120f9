"""`models optimize`: a Keras entry's cut model converted (TFLite, ONNX, mixed-bfloat16 Keras), added as an entry with its measured speed-up and deviation."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extractor.errors import InvalidInputError, MissingDependencyError, UnknownNameError
from extractor.models.backbone import FrozenBackbone, load_backbone
from extractor.models.config import read_config, write_config
from extractor.models.repository import ModelRepository
from extractor.models.runtimes.onnx_model import INSTALL_HINT as ONNX_INSTALL_HINT
from extractor.models.spec import BackboneSpec

log = logging.getLogger(__name__)

# runtime -> the precisions it can be converted to, the default first
PRECISIONS = {"tflite": ("none", "float16", "dynamic-int8"), "onnx": ("none", "dynamic-int8"),
              "keras": ("bfloat16",)}
_NAME_SUFFIX = {"none": "_fp32", "float16": "_fp16", "dynamic-int8": "_int8", "bfloat16": "_bf16"}
_SUFFIX = {"tflite": ".tflite", "onnx": ".onnx", "keras": ".keras"}


@dataclass(frozen=True)
class Optimized:
    """The new entry and what `models optimize` measured of it against its source."""

    spec: BackboneSpec
    measured: dict


def check_target(runtime: str, quantize: str | None) -> str:
    """The precision asked for, checked against the runtime (default: the runtime's first)."""
    if runtime not in PRECISIONS:
        raise UnknownNameError("optimize runtime", runtime, PRECISIONS)
    precision = quantize or PRECISIONS[runtime][0]
    if precision not in PRECISIONS[runtime]:
        raise InvalidInputError(f"--quantize {precision} does not apply to the {runtime} runtime; it takes "
                                f"{', '.join(PRECISIONS[runtime])}")
    return precision


def default_name(source: BackboneSpec, runtime: str, precision: str) -> str:
    """`vgg16` -> `vgg16_tflite_int8`, `vgg16_onnx_fp32`, `vgg16_bf16`; the input size added when not the entry's."""
    size = f"_{source.input_size}" if source.input_size != source.config.input_size else ""
    return f"{source.name}{size}{'' if runtime == 'keras' else '_' + runtime}{_NAME_SUFFIX[precision]}"


def optimize_entry(repository: ModelRepository, name: str, *, runtime: str, quantize: str | None = None,
                   new_name: str | None = None, input_size: int | None = None,
                   images: list[np.ndarray] | None = None, sample_images: int = 128, sample: str = "random",
                   rounds: int = 5) -> Optimized:
    """Convert Keras entry `name` (its cut model, pooling included; preprocessing unchanged) to `runtime`,
    add the result to `repository` and record in its `[measured]` table its forward speed-up against the
    source and the deviation of its vectors (max abs, min cosine) on `images` (canonical uint8 images;
    default: `sample_images` seeded random ones), with `sample` saying where they came from.
    """
    precision = check_target(runtime, quantize)
    if images is not None and not images or images is None and sample_images < 1:
        raise InvalidInputError("models optimize needs at least one sample image to measure")
    source = repository.spec(name, input_size=input_size)
    if source.runtime != "keras":
        raise InvalidInputError(f"models optimize converts Keras entries; {name} is a {source.runtime} entry "
                                "(add the model it came from as a Keras entry and optimize that)")
    new_name = new_name or default_name(source, runtime, precision)
    if new_name in repository.entries():
        raise InvalidInputError(f"a model named {new_name!r} exists already; remove it or give --as NAME")
    source_backbone = load_backbone(source)
    with tempfile.TemporaryDirectory(prefix="optimize-") as scratch:
        converted = Path(scratch) / f"{new_name}{_SUFFIX[runtime]}"
        started = time.perf_counter()
        CONVERTERS[runtime](source_backbone.network.model, source, precision, converted)
        log.info("converted %s to %s (%s) in %.1f s", name, runtime, precision, time.perf_counter() - started)
        summary = f"{source.summary or name}; {runtime}" + ("" if precision == "none" else f", {precision}")
        spec = repository.add(new_name, converted, runtime=runtime, input_size=source.input_size,
                              preprocessing=source.preprocessing, pooling="none", summary=summary)
    try:
        if images is None:
            rng = np.random.default_rng(0)
            images = [rng.integers(0, 256, source.input_shape, dtype=np.uint8) for _ in range(sample_images)]
        measured = measure_against(source_backbone, load_backbone(spec), images, rounds=rounds)
        measured = {"source": source.name, "source_fingerprint": source.fingerprint, "quantization": precision,
                    "sample": sample, "sample_images": len(images), **measured}
        config = read_config(spec.config.folder)
        write_config(dataclasses.replace(config, measured=measured), spec.config.folder)
    except BaseException:
        repository.remove(new_name)
        raise
    return Optimized(repository.spec(new_name), measured)


def measure_against(source: FrozenBackbone, other: FrozenBackbone, images: list[np.ndarray],
                    rounds: int = 5) -> dict:
    """Forward images/s of both (rounds interleaved, medians) and the deviation of `other`'s vectors."""
    reference, vectors = source.embed(images), other.embed(images)
    max_abs, min_cosine = vector_deviation(reference, vectors)
    rates = interleaved_rates([source, other], images, rounds=rounds)
    return {"images_per_second": round(rates[1], 1), "source_images_per_second": round(rates[0], 1),
            "speedup": round(rates[1] / rates[0], 3), "max_abs_deviation": max_abs, "min_cosine": min_cosine}


def interleaved_rates(backbones: list[FrozenBackbone], images: list[np.ndarray], rounds: int = 5) -> list[float]:
    """Median forward images/s of each backbone on its own preprocessed batch, after one warm-up call,
    the rounds taken in turn so that a load from elsewhere weighs on all of them alike."""
    batches = [backbone.preprocess(images) for backbone in backbones]
    for backbone, batch in zip(backbones, batches):
        backbone.forward(batch)  # tracing, allocation, first-call costs
    seconds = [[] for _ in backbones]
    for _ in range(rounds):
        for backbone, batch, times in zip(backbones, batches, seconds):
            started = time.perf_counter()
            backbone.forward(batch)
            times.append(time.perf_counter() - started)
    return [len(images) / statistics.median(times) for times in seconds]


def vector_deviation(reference: np.ndarray, vectors: np.ndarray) -> tuple[float, float]:
    """(largest absolute difference, smallest cosine similarity of a row pair) of two (n, d) arrays;
    two all-zero rows count as cosine 1, one all-zero row against another row as 0."""
    reference, vectors = reference.astype(np.float64), vectors.astype(np.float64)
    max_abs = float(np.abs(reference - vectors).max(initial=0.0))
    reference_norms, norms = np.linalg.norm(reference, axis=1), np.linalg.norm(vectors, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = (reference * vectors).sum(axis=1) / (reference_norms * norms)
    cosine[np.isnan(cosine)] = 0.0
    cosine[(reference_norms == 0) & (norms == 0)] = 1.0
    return max_abs, float(cosine.min(initial=1.0))


def _input_signature(source: BackboneSpec) -> list:
    """The converted model's one input: any batch of the source's preprocessed images."""
    import tensorflow as tf

    return [tf.TensorSpec((None, *source.input_shape), source.preprocessing.dtype, name="pixels")]


def to_tflite(model, source: BackboneSpec, precision: str, target: Path) -> None:
    """TFLiteConverter on the model's SavedModel: float32, float16 weights, or dynamic-range int8 weights
    (activations stay float; the kernels quantize them on the fly)."""
    import tensorflow as tf

    saved = target.with_suffix(".savedmodel")
    model.export(str(saved), format="tf_saved_model", verbose=False, input_signature=_input_signature(source))
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    if precision != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision == "float16":
        converter.target_spec.supported_types = [tf.float16]
    target.write_bytes(converter.convert())


def to_onnx(model, source: BackboneSpec, precision: str, target: Path) -> None:
    """tf2onnx (opset 17); dynamic-int8: ONNX Runtime's dynamic quantization of the weights."""
    try:
        import tf2onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise MissingDependencyError(ONNX_INSTALL_HINT) from e
    float_file = target if precision == "none" else target.with_name(f"float-{target.name}")
    with contextlib.redirect_stdout(io.StringIO()):  # tf2onnx prints its progress
        tf2onnx.convert.from_keras(model, opset=17, output_path=str(float_file),
                                   input_signature=_input_signature(source))
    if precision == "dynamic-int8":
        quantize_dynamic(float_file, target, weight_type=QuantType.QInt8)


def to_mixed_bfloat16(model, source: BackboneSpec, precision: str, target: Path) -> None:
    """The same layers under Keras' mixed_bfloat16 policy (bfloat16 compute, float32 weights), the last
    layer in float32 so that the vectors leave as float32; saved as a `.keras` file."""
    import keras

    config = model.get_config()
    output_layers = {output._keras_history.operation.name for output in model.outputs}
    for layer in config["layers"]:
        if layer["class_name"] != "InputLayer" and layer["name"] not in output_layers:
            _set_policy(layer, "mixed_bfloat16")
    mixed = keras.Model.from_config(config)
    mixed.set_weights(model.get_weights())
    mixed.save(target)


def _set_policy(layer: dict, policy: str) -> None:
    """Set a serialized layer's dtype policy, inside nested models too."""
    inner = layer.get("config", {})
    if "layers" in inner:
        for sublayer in inner["layers"]:
            if sublayer["class_name"] != "InputLayer":
                _set_policy(sublayer, policy)
        return
    inner["dtype"] = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": policy},
                      "registered_name": None}


CONVERTERS = {"tflite": to_tflite, "onnx": to_onnx, "keras": to_mixed_bfloat16}
