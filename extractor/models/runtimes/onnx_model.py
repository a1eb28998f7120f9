"""ONNX runtime: an `.onnx` graph through ONNX Runtime, cut at any node output, NHWC or NCHW input."""

from __future__ import annotations

import numpy as np

from extractor.errors import InvalidInputError, MissingDependencyError
from extractor.models.runtimes import ModelInfo, Network, check_cut, pool_array

_ORT_TYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8"}
INSTALL_HINT = "ONNX models need the onnx extra: pip install 'frozen-features[onnx]'"


def _onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(INSTALL_HINT) from e
    return onnx, onnxruntime


def _load_graph(path: str):
    onnx, _ = _onnx()
    try:
        return onnx.load(path)
    except Exception as e:  # onnx raises DecodeError, ValueError or OSError depending on the damage
        raise InvalidInputError(f"cannot load {path} as an ONNX model: {e}") from e


def node_outputs(graph) -> list[str]:
    """Every node output name, graph order, the graph's outputs first."""
    outputs = [o.name for o in graph.output]
    return outputs + [name for node in graph.node for name in node.output if name and name not in outputs]


def _graph_input(graph):
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise InvalidInputError(f"the ONNX graph has {len(inputs)} inputs; an image model has one")
    return inputs[0]


def _layout_and_shape(value_info) -> tuple[str, tuple]:
    dims = [d.dim_value or None for d in value_info.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise InvalidInputError(f"the ONNX input has rank {len(dims)}; an image model takes a rank-4 batch")
    if dims[1] in (1, 3) and dims[3] not in (1, 3):
        return "nchw", (dims[2], dims[3], dims[1])
    return "nhwc", tuple(dims[1:])


def inspect_model(path: str, *, architecture=None, signature=None, input_size=None) -> ModelInfo:
    onnx, _ = _onnx()
    model = _load_graph(path)
    graph_input = _graph_input(model.graph)
    layout, shape = _layout_and_shape(graph_input)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
    return ModelInfo(shape, np.dtype(dtype).name, tuple(node_outputs(model.graph)), model.graph.output[0].name,
                     layout)


class OnnxNetwork(Network):
    """An ONNX Runtime session whose outputs are the cut (added as a graph output when it is inside)."""

    def __init__(self, spec, path: str):
        onnx, ort = _onnx()
        model = _load_graph(path)
        cut = spec.cut or model.graph.output[0].name
        check_cut(cut, node_outputs(model.graph), spec.name)
        if cut not in [o.name for o in model.graph.output]:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(cut))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(model.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types are not importable by a stable path
            raise InvalidInputError(f"ONNX Runtime cannot run {path}: {e}") from e
        session_input = self._session.get_inputs()[0]
        self._input_name, self._cut = session_input.name, cut
        self.input_dtype = np.dtype(_ORT_TYPES.get(session_input.type, "float32"))
        if self.input_dtype != np.dtype(spec.preprocessing.dtype):
            raise InvalidInputError(f"{spec.name}: the model takes {self.input_dtype.name} input, the "
                                    f"preprocessing gives {spec.preprocessing.dtype}")
        self.layout = spec.config.layout
        self.pooling = spec.pooling

    def forward(self, batch: np.ndarray) -> np.ndarray:
        if self.layout == "nchw":
            batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        (out,) = self._session.run([self._cut], {self._input_name: batch})
        if self.layout == "nchw" and out.ndim == 4 and self.pooling != "flatten":
            out = out.transpose(0, 2, 3, 1)  # avg / max pool over the spatial axes, wherever they are
        return pool_array(out.astype(np.float32, copy=False), self.pooling)


def open_network(spec, path: str) -> Network:
    return OnnxNetwork(spec, path)
