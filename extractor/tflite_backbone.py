"""Image embeddings from a uint8-quantized TFLite model (MobileNet V1), dequantized to float32."""

from __future__ import annotations

import logging
import os
import threading
import warnings

import numpy as np

from extractor.errors import InvalidInputError

log = logging.getLogger(__name__)


def _new_interpreter(model_path: str, num_threads: int | None):
    """A LiteRT interpreter when ai-edge-litert is installed, else TensorFlow's own (same kernels)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        # tf.lite.Interpreter warns on every construction that it moves to ai-edge-litert; the
        # fallback is deliberate, so only that one warning is silenced.
        warnings.filterwarnings("ignore", message=r"\s*Warning: tf\.lite\.Interpreter is deprecated",
                                category=UserWarning)
        interpreter = Interpreter(model_path=model_path, num_threads=num_threads)
    log.info("TFLite model %s runs on %s.%s", model_path, Interpreter.__module__, Interpreter.__name__)
    return interpreter


class TFLiteEmbedder:
    """One TFLite interpreter with a uint8 image input and a per-tensor quantized output.

    The interpreter is not thread-safe, so calls are serialised by a lock. Images run one at a time:
    resizing the batch dimension works but measured no faster on CPU, and it reallocates all tensors
    (memory growing with n) whenever the batch size changes.
    """

    def __init__(self, model_path: str | os.PathLike, num_threads: int | None = None):
        self.model_path = str(model_path)
        self._interpreter = _new_interpreter(self.model_path, num_threads)
        self._interpreter.allocate_tensors()
        inputs, outputs = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise InvalidInputError(
                f"{self.model_path}: expected one input and one output tensor, "
                f"got {len(inputs)} and {len(outputs)}")
        (model_input,), (model_output,) = inputs, outputs
        if tuple(model_input["shape"][:1]) != (1,) or np.dtype(model_input["dtype"]) != np.uint8:
            raise InvalidInputError(
                f"{self.model_path}: expected a uint8 input of batch size 1, got "
                f"{np.dtype(model_input['dtype'])} {tuple(model_input['shape'])}")
        quantization = model_output["quantization_parameters"]
        if np.dtype(model_output["dtype"]) != np.uint8 or len(quantization["scales"]) != 1:
            raise InvalidInputError(
                f"{self.model_path}: expected a uint8 output quantized per tensor, got "
                f"{np.dtype(model_output['dtype'])} with {len(quantization['scales'])} scale(s)")
        self._input_index, self._output_index = model_input["index"], model_output["index"]
        self.image_shape: tuple[int, ...] = tuple(int(d) for d in model_input["shape"][1:])
        self.output_dim = int(np.prod(model_output["shape"][1:]))
        self.scale = np.float32(quantization["scales"][0])
        self.zero_point = np.float32(quantization["zero_points"][0])
        self._lock = threading.Lock()

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """(n, *image_shape) uint8 pixels, 0..255 as decoded -> (n, output_dim) float32 embeddings.

        For MobileNet V1: (n, 224, 224, 3) -> (n, 1024), each value a step of the output scale in 0..6.
        """
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.shape[1:] != self.image_shape:
            received = (f"{batch.dtype} array of shape {batch.shape}" if isinstance(batch, np.ndarray)
                        else type(batch).__name__)
            raise InvalidInputError(
                f"expected a uint8 array of shape (n, {', '.join(map(str, self.image_shape))}), "
                f"got {received}")
        quantized = np.empty((len(batch), self.output_dim), dtype=np.uint8)
        with self._lock:
            for i, image in enumerate(batch):
                self._interpreter.set_tensor(self._input_index, image[np.newaxis])
                self._interpreter.invoke()
                quantized[i] = self._interpreter.get_tensor(self._output_index).reshape(-1)
        return (quantized.astype(np.float32) - self.zero_point) * self.scale
