"""The Open Inference Protocol (KServe v2) on the core, for both its doors (gRPC and REST): models and their
tensors (PIXELS or IMAGES in; EMBEDDING, or PROBABILITIES and LABEL out), metadata, repository, statistics."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from extractor.errors import ExtractorError, InvalidInputError, NotReadyError, UnknownNameError
from extractor.serving.events import ModelUsage
from extractor.serving.loaded_models import ModelStatus
from extractor.serving.requests import Call, RawPixels
from extractor.serving.service import FeatureService

SERVER_NAME = "frozen-features"
VERSION = "1"  # every model has one version
EXTENSIONS = ["model_repository", "statistics", "binary_tensor_data"]
DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64}
BACKBONE_INPUTS = {"PIXELS": ("UINT8", [-1, -1, -1, -1]), "IMAGES": ("BYTES", [-1])}


@dataclass
class Tensor:
    """One named tensor: numeric data as an array of `shape`, BYTES as a flat list of byte strings."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(SERVER_NAME)
    except PackageNotFoundError:
        return "0"


def element_count(shape: list[int], name: str) -> int:
    if any(side < 0 for side in shape):
        raise InvalidInputError(f"input {name!r}: shape {list(shape)} has a negative side")
    return math.prod(shape)


def from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> Tensor:
    """A tensor from its raw bytes (little-endian, row-major; BYTES: each element as a 4-byte length + bytes)."""
    count = element_count(shape, name)
    if datatype == "BYTES":
        return Tensor(name, datatype, list(shape), split_bytes(raw, count, name))
    dtype = _dtype(datatype, name)
    if len(raw) != count * np.dtype(dtype).itemsize:
        raise InvalidInputError(f"input {name!r}: {len(raw)} bytes of {datatype} data do not fill shape "
                                f"{list(shape)} ({count * np.dtype(dtype).itemsize} bytes)")
    return Tensor(name, datatype, list(shape), shaped(np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")),
                                                      shape, name))


def from_values(name: str, datatype: str, shape: list[int], values: list) -> Tensor:
    """A tensor from a flat list of values (JSON data, typed protobuf contents)."""
    count = element_count(shape, name)
    if len(values) != count:
        raise InvalidInputError(f"input {name!r}: {len(values)} values do not fill shape {list(shape)} ({count})")
    if datatype == "BYTES":
        if not all(isinstance(v, (str, bytes)) for v in values):
            raise InvalidInputError(f"input {name!r}: BYTES values must be strings")
        return Tensor(name, datatype, list(shape), [v.encode() if isinstance(v, str) else v for v in values])
    dtype = _dtype(datatype, name)
    try:
        array = np.array(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInputError(f"input {name!r}: values are not {datatype}: {exc}") from None
    if dtype != np.bool_ and not np.array_equal(array, np.array(values, dtype=np.float64)):
        raise InvalidInputError(f"input {name!r}: values out of the range of {datatype}")
    return Tensor(name, datatype, list(shape), shaped(array, shape, name))


def shaped(values: np.ndarray, shape: list[int], name: str) -> np.ndarray:
    """`values` in `shape`; a shape with no elements can still have sides too large for any array."""
    try:
        return values.reshape(shape)
    except ValueError as exc:
        raise InvalidInputError(f"input {name!r}: shape {list(shape)} cannot be an array: {exc}") from None


def _dtype(datatype: str, name: str):
    if datatype not in DTYPES:
        raise InvalidInputError(f"input {name!r}: unknown datatype {datatype!r}; known: BYTES, {', '.join(DTYPES)}")
    return DTYPES[datatype]


def split_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """The protocol's BYTES encoding -> `count` byte strings; refuses lengths that run past the data."""
    items, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise InvalidInputError(f"input {name!r}: BYTES data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, at)
        if at + 4 + size > len(raw):
            raise InvalidInputError(f"input {name!r}: a BYTES element of {size} bytes runs past the data")
        items.append(raw[at + 4:at + 4 + size])
        at += 4 + size
    if len(items) != count:
        raise InvalidInputError(f"input {name!r}: {len(items)} BYTES elements do not fill the shape ({count})")
    return items


def join_bytes(items: list[bytes]) -> bytes:
    """`items` in the protocol's BYTES encoding."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def raw_of(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return join_bytes(tensor.data)
    return np.ascontiguousarray(tensor.data, dtype=np.dtype(DTYPES[tensor.datatype]).newbyteorder("<")).tobytes()


class InferenceModels:
    """The protocol's view of the core: backbones (PIXELS or IMAGES -> EMBEDDING) and heads (-> PROBABILITIES,
    LABEL) as models of one version; a per-image failure fails the whole call, naming the image."""

    def __init__(self, service: FeatureService):
        self.service = service

    def _kind(self, name: str, version: str = "") -> str:
        """"backbone" or "head"; NotReadyError for a backbone known but not READY, UnknownNameError otherwise."""
        if version not in ("", VERSION):
            raise UnknownNameError(f"version of model {name!r}", version, [VERSION])
        self.service.require_ready()
        if name in self.service.heads:
            return "head"
        if name in self.service.served:
            return "backbone"
        try:
            status = self.service.model_status(name)
        except UnknownNameError:
            raise UnknownNameError("model", name, [*self.service.served, *self.service.heads]) from None
        raise NotReadyError(f"model {name!r} is {status.state.value}" + (f": {status.reason}" if status.reason else ""))

    def ready(self, name: str, version: str = "") -> bool:
        try:
            kind = self._kind(name, version)
        except ExtractorError:
            return False
        return kind == "backbone" or self.service.head_backbone(self.service.heads[name]) is not None

    def metadata(self, name: str, version: str = "") -> dict:
        """name, versions, platform, inputs and outputs (each name, datatype, shape; -1 for any size)."""
        kind = self._kind(name, version)
        inputs = [{"name": key, "datatype": datatype, "shape": shape}
                  for key, (datatype, shape) in BACKBONE_INPUTS.items()]
        if kind == "backbone":
            dim = self.service.output_dim(name)
            outputs = [{"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, dim]}]
        else:
            classes = len(self.service.heads[name].class_names)
            outputs = [{"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, classes]},
                       {"name": "LABEL", "datatype": "BYTES", "shape": [-1]}]
        return {"name": name, "versions": [VERSION], "platform": f"frozen_features_{kind}", "inputs": inputs,
                "outputs": outputs}

    def infer(self, name: str, version: str, inputs: list[Tensor], requested: list[str] | None,
              call: Call = Call()) -> list[Tensor]:
        """One inference: exactly one input (PIXELS uint8 [N, H, W, C] or [N, H, W], or IMAGES bytes [N]);
        the outputs asked for (all when `requested` is None), in the model's order."""
        kind = self._kind(name, version)
        if len(inputs) != 1:
            raise InvalidInputError(f"model {name!r} takes one input, PIXELS or IMAGES; got {len(inputs)}")
        tensor = inputs[0]
        if tensor.name not in BACKBONE_INPUTS:
            raise InvalidInputError(f"unknown input {tensor.name!r}; model {name!r} takes PIXELS or IMAGES")
        expected = BACKBONE_INPUTS[tensor.name][0]
        if tensor.datatype != expected:
            raise InvalidInputError(f"input {tensor.name!r} must be {expected}, got {tensor.datatype}")
        if tensor.name == "IMAGES":
            if len(tensor.shape) != 1:
                raise InvalidInputError(f"input 'IMAGES' must have shape [N], got {tensor.shape}")
            images, batch = list(tensor.data), None
        else:
            images, batch = [], RawPixels(np.ascontiguousarray(tensor.data).tobytes(), tuple(tensor.shape), "uint8")
        if kind == "backbone":
            outcome = self.service.embed(name, images, batch=batch, all_or_nothing=True, call=call)
            outputs = [Tensor("EMBEDDING", "FP32", list(outcome.vectors.shape), outcome.vectors)]
        else:
            result = self.service.classify(name, images, batch=batch, all_or_nothing=True, call=call)
            outputs = [Tensor("PROBABILITIES", "FP32", list(result.probabilities.shape), result.probabilities),
                       Tensor("LABEL", "BYTES", [len(result.labels)], [label.encode() for label in result.labels])]
        if requested is None:
            return outputs
        known = {output.name: output for output in outputs}
        unknown = [key for key in requested if key not in known]
        if unknown:
            raise InvalidInputError(f"unknown output {unknown[0]!r}; model {name!r} gives {', '.join(known)}")
        return [output for output in outputs if output.name in requested]

    def repository_index(self, ready_only: bool = False) -> list[ModelStatus]:
        statuses = self.service.list_models()
        return [status for status in statuses if status.state.value == "READY"] if ready_only else statuses

    def statistics(self, name: str = "", version: str = "") -> list[tuple[str, ModelUsage]]:
        """(model, usage) for `name`, or for every backbone and head served when `name` is empty."""
        if name:
            self._kind(name, version)
            return [(name, self.service.usage(name))]
        return [(model, self.service.usage(model)) for model in [*self.service.served, *self.service.heads]]
