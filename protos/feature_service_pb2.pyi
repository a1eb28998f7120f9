from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Limits(_message.Message):
    __slots__ = ("max_images_per_request", "max_message_bytes", "max_decoded_pixels", "max_request_pixels", "max_pixels_in_flight", "max_pixel_wait_seconds", "max_streams", "max_concurrent_calls", "stream_idle_seconds")
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DECODED_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXEL_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_CALLS_FIELD_NUMBER: _ClassVar[int]
    STREAM_IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    max_images_per_request: int
    max_message_bytes: int
    max_decoded_pixels: int
    max_request_pixels: int
    max_pixels_in_flight: int
    max_pixel_wait_seconds: float
    max_streams: int
    max_concurrent_calls: int
    stream_idle_seconds: float
    def __init__(self, max_images_per_request: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_decoded_pixels: _Optional[int] = ..., max_request_pixels: _Optional[int] = ..., max_pixels_in_flight: _Optional[int] = ..., max_pixel_wait_seconds: _Optional[float] = ..., max_streams: _Optional[int] = ..., max_concurrent_calls: _Optional[int] = ..., stream_idle_seconds: _Optional[float] = ...) -> None: ...

class Backbone(_message.Message):
    __slots__ = ("name", "summary", "input_size", "channels", "recipe", "recipes", "pooling", "output_dim", "fingerprint", "limits", "weights_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    RECIPES_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    summary: str
    input_size: int
    channels: int
    recipe: str
    recipes: _containers.RepeatedScalarFieldContainer[str]
    pooling: str
    output_dim: int
    fingerprint: str
    limits: Limits
    weights_sha256: str
    def __init__(self, name: _Optional[str] = ..., summary: _Optional[str] = ..., input_size: _Optional[int] = ..., channels: _Optional[int] = ..., recipe: _Optional[str] = ..., recipes: _Optional[_Iterable[str]] = ..., pooling: _Optional[str] = ..., output_dim: _Optional[int] = ..., fingerprint: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., weights_sha256: _Optional[str] = ...) -> None: ...

class ListBackbonesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBackbonesResponse(_message.Message):
    __slots__ = ("backbones",)
    BACKBONES_FIELD_NUMBER: _ClassVar[int]
    backbones: _containers.RepeatedCompositeFieldContainer[Backbone]
    def __init__(self, backbones: _Optional[_Iterable[_Union[Backbone, _Mapping]]] = ...) -> None: ...

class GetBackboneRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "pixels")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    pixels: Tensor
    def __init__(self, encoded: _Optional[bytes] = ..., pixels: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Matrix(_message.Message):
    __slots__ = ("data", "rows", "dim")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    rows: int
    dim: int
    def __init__(self, data: _Optional[bytes] = ..., rows: _Optional[int] = ..., dim: _Optional[int] = ...) -> None: ...

class ImageError(_message.Message):
    __slots__ = ("index", "code", "message")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    code: int
    message: str
    def __init__(self, index: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("backbone", "images", "all_or_nothing", "batch")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ALL_OR_NOTHING_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    all_or_nothing: bool
    batch: Tensor
    def __init__(self, backbone: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., all_or_nothing: _Optional[bool] = ..., batch: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("fingerprint", "vectors", "cached", "keys", "errors", "offset")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    vectors: Matrix
    cached: _containers.RepeatedScalarFieldContainer[bool]
    keys: bytes
    errors: _containers.RepeatedCompositeFieldContainer[ImageError]
    offset: int
    def __init__(self, fingerprint: _Optional[str] = ..., vectors: _Optional[_Union[Matrix, _Mapping]] = ..., cached: _Optional[_Iterable[bool]] = ..., keys: _Optional[bytes] = ..., errors: _Optional[_Iterable[_Union[ImageError, _Mapping]]] = ..., offset: _Optional[int] = ...) -> None: ...

class GetEmbeddingsRequest(_message.Message):
    __slots__ = ("backbone", "keys")
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    backbone: str
    keys: bytes
    def __init__(self, backbone: _Optional[str] = ..., keys: _Optional[bytes] = ...) -> None: ...

class GetEmbeddingsResponse(_message.Message):
    __slots__ = ("vectors", "found")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    vectors: Matrix
    found: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, vectors: _Optional[_Union[Matrix, _Mapping]] = ..., found: _Optional[_Iterable[bool]] = ...) -> None: ...

class Head(_message.Message):
    __slots__ = ("name", "backbone", "backbone_fingerprint", "class_names")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    backbone: str
    backbone_fingerprint: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., backbone: _Optional[str] = ..., backbone_fingerprint: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...

class ListHeadsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListHeadsResponse(_message.Message):
    __slots__ = ("heads",)
    HEADS_FIELD_NUMBER: _ClassVar[int]
    heads: _containers.RepeatedCompositeFieldContainer[Head]
    def __init__(self, heads: _Optional[_Iterable[_Union[Head, _Mapping]]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("head", "images", "all_or_nothing", "batch")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ALL_OR_NOTHING_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    head: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    all_or_nothing: bool
    batch: Tensor
    def __init__(self, head: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., all_or_nothing: _Optional[bool] = ..., batch: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("class_names", "probabilities", "labels", "cached", "errors")
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    probabilities: Matrix
    labels: _containers.RepeatedScalarFieldContainer[str]
    cached: _containers.RepeatedScalarFieldContainer[bool]
    errors: _containers.RepeatedCompositeFieldContainer[ImageError]
    def __init__(self, class_names: _Optional[_Iterable[str]] = ..., probabilities: _Optional[_Union[Matrix, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ..., cached: _Optional[_Iterable[bool]] = ..., errors: _Optional[_Iterable[_Union[ImageError, _Mapping]]] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "state", "reason")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[ModelStatus.State]
        READY: _ClassVar[ModelStatus.State]
        LOADING: _ClassVar[ModelStatus.State]
        UNAVAILABLE: _ClassVar[ModelStatus.State]
    STATE_UNSPECIFIED: ModelStatus.State
    READY: ModelStatus.State
    LOADING: ModelStatus.State
    UNAVAILABLE: ModelStatus.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: ModelStatus.State
    reason: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[ModelStatus.State, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
