"""TFLite runtime: a `.tflite` file cut at any tensor (an output, or an intermediate one), dequantized."""

from __future__ import annotations

import logging
import os
import threading
import warnings

import numpy as np

from extractor.errors import InvalidInputError
from extractor.models.quiet import native_stderr_silenced
from extractor.models.runtimes import ModelInfo, Network, check_cut, pool_array

log = logging.getLogger(__name__)


def new_interpreter(model_path: str, *, preserve_all_tensors: bool = False, num_threads: int | None = None):
    """A LiteRT interpreter when ai-edge-litert is installed, else TensorFlow's own (same kernels).

    `preserve_all_tensors` keeps intermediate tensors readable after `invoke` (a cut inside the graph);
    it costs memory and speed, so it is asked for only then.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        # tf.lite.Interpreter warns on every construction that it moves to ai-edge-litert, and again when
        # intermediate tensors are kept; both are deliberate here.
        warnings.filterwarnings("ignore", message=r"\s*Warning: (tf\.lite\.Interpreter is deprecated|Enabling)",
                                category=UserWarning)
        try:
            interpreter = Interpreter(model_path=model_path, num_threads=num_threads,
                                      experimental_preserve_all_tensors=preserve_all_tensors)
        except ValueError as e:
            raise InvalidInputError(f"cannot load {model_path} as a TFLite model: {e}") from e
    log.debug("TFLite model %s runs on %s.%s", model_path, Interpreter.__module__, Interpreter.__name__)
    return interpreter


def _single_input(interpreter, path: str) -> dict:
    inputs = interpreter.get_input_details()
    if len(inputs) != 1 or len(inputs[0]["shape"]) != 4:
        raise InvalidInputError(f"{path}: expected one (n, H, W, C) image input, got "
                                f"{[tuple(d['shape']) for d in inputs]}")
    return inputs[0]


def tensor_names(interpreter) -> list[str]:
    """Every named tensor, graph order, outputs first (the usual cuts)."""
    outputs = [d["name"] for d in interpreter.get_output_details()]
    return outputs + [d["name"] for d in interpreter.get_tensor_details() if d["name"] and d["name"] not in outputs]


def inspect_model(path: str, *, architecture=None, signature=None, input_size=None) -> ModelInfo:
    interpreter = new_interpreter(path)
    model_input = _single_input(interpreter, path)
    return ModelInfo(tuple(int(d) for d in model_input["shape"][1:]), np.dtype(model_input["dtype"]).name,
                     tuple(tensor_names(interpreter)), interpreter.get_output_details()[0]["name"])


class TFLiteNetwork(Network):
    """One interpreter, images run one at a time (batch 1 as most TFLite files are shipped).

    The interpreter is not thread-safe, so calls are serialised by a lock. Resizing the batch dimension
    measured no faster on CPU and reallocates all tensors whenever the batch size changes.
    Quantized outputs are dequantized with the cut tensor's own scale and zero point.
    """

    def __init__(self, spec, path: str):
        # every core for the convolutions (left unset, the interpreter runs one thread); MobileNet V1 gives
        # the same vectors to the bit with 1 or 2 threads
        threads = len(os.sched_getaffinity(0))
        probe = new_interpreter(path, num_threads=threads)
        outputs = [d["name"] for d in probe.get_output_details()]
        cut = spec.cut or outputs[0]
        check_cut(cut, tensor_names(probe), spec.name)
        self._interpreter = probe if cut in outputs else new_interpreter(path, preserve_all_tensors=True,
                                                                         num_threads=threads)
        with native_stderr_silenced():  # XNNPACK announces itself on stderr
            self._interpreter.allocate_tensors()
        model_input = _single_input(self._interpreter, path)
        self.input_dtype = np.dtype(model_input["dtype"])
        if tuple(model_input["shape"][1:]) != spec.input_shape:
            raise InvalidInputError(f"{spec.name}: the model takes input {tuple(model_input['shape'][1:])}, "
                                    f"not {spec.input_shape}")
        if self.input_dtype != np.dtype(spec.preprocessing.dtype):
            raise InvalidInputError(f"{spec.name}: the model takes {self.input_dtype.name} input, the "
                                    f"preprocessing gives {spec.preprocessing.dtype}")
        self._input_index = model_input["index"]
        details = {d["name"]: d for d in self._interpreter.get_tensor_details()}
        self._output = details[cut]
        scales = self._output["quantization_parameters"]["scales"]
        if len(scales) > 1:
            raise InvalidInputError(f"{spec.name}: tensor {cut!r} is quantized per channel; cut elsewhere")
        quantized = np.dtype(self._output["dtype"]).kind in "iu"
        self._scale = np.float32(scales[0]) if quantized and len(scales) else None
        self._zero_point = np.float32(self._output["quantization_parameters"]["zero_points"][0]) \
            if self._scale is not None else None
        self.pooling = spec.pooling
        self._lock = threading.Lock()

    def forward(self, batch: np.ndarray) -> np.ndarray:
        rows = []
        with self._lock:
            for image in batch:
                self._interpreter.set_tensor(self._input_index, image[np.newaxis])
                self._interpreter.invoke()
                rows.append(self._interpreter.get_tensor(self._output["index"]).copy())
        raw = np.concatenate(rows)
        out = raw.astype(np.float32) if self._scale is None else \
            (raw.astype(np.float32) - self._zero_point) * self._scale
        return pool_array(out, self.pooling)


def open_network(spec, path: str) -> Network:
    return TFLiteNetwork(spec, path)
