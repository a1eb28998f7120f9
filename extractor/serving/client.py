"""Client of the feature service: numpy arrays, encoded bytes or image files in; vectors and class probabilities out."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extractor.errors import ExtractorError, InvalidInputError
from extractor.images import declared_image_size
from extractor.wire import HEADROOM, KEY_BYTES, vectors_per_response
from protos import feature_service_pb2 as pb
from protos import feature_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureService"].full_name
MAX_BACKOFF = 2.0  # seconds between retries, at most
MAX_ATTEMPTS = 5  # gRPC caps a retry policy's attempts at 5
MODEL_CONTROL = ("LoadModel", "UnloadModel")  # not retried: a load that failed UNAVAILABLE would be tried again

ImageLike = np.ndarray | bytes | str | os.PathLike  # pixels, an encoded file's bytes, or a file path
# Images for one call: a sequence of ImageLike, or one stacked uint8 array (n, H, W[, C]), which travels
# as `batch` tensors, without a message per image.
Images = Sequence[ImageLike] | np.ndarray


class RemoteError(ExtractorError):
    """A call the server refused or could not finish; `code` is its grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self.code, self.details = code, details
        super().__init__(f"{code.name}: {details}")


@dataclass
class ImageFailure:
    index: int  # position in the call's images
    code: grpc.StatusCode
    message: str


@dataclass
class EmbedResult:
    fingerprint: str
    vectors: np.ndarray   # (n, d) float32; rows of failed images are NaN
    cached: np.ndarray    # (n,) bool
    keys: list[bytes]     # n content keys (32 bytes; zeros for failed images)
    errors: list[ImageFailure]
    offset: int = 0       # index of the first image within the call


@dataclass
class ClassifyResult:
    class_names: list[str]
    probabilities: np.ndarray  # (n, k) float32; rows of failed images are NaN
    labels: list[str]          # most probable class per image; "" for failed ones
    cached: np.ndarray         # (n,) bool
    errors: list[ImageFailure]


def tensor(array: np.ndarray) -> pb.Tensor:
    """Raw pixels as they are; the server checks dtype and shape."""
    return pb.Tensor(data=array.tobytes(), shape=array.shape, dtype=array.dtype.name)


def image_message(image: ImageLike) -> pb.Image:
    """An array is sent as raw pixels, bytes and paths as encoded files."""
    if isinstance(image, np.ndarray):
        return pb.Image(pixels=tensor(image))
    if isinstance(image, bytes):
        return pb.Image(encoded=image)
    try:
        return pb.Image(encoded=Path(image).read_bytes())
    except OSError as exc:
        raise InvalidInputError(f"cannot read {image}: {exc.strerror or exc}") from exc


def declared_pixels(message: pb.Image) -> int:
    """The pixels an image message will decode to, as its shape or its file's header says (0 when they do not
    say: the server reports that image)."""
    if message.WhichOneof("content") == "pixels":
        shape = message.pixels.shape
        return shape[0] * shape[1] if len(shape) >= 2 else 0
    try:
        width, height = declared_image_size(message.encoded)
    except ExtractorError:
        return 0
    return width * height


def as_matrix(message: pb.Matrix) -> np.ndarray:
    return np.frombuffer(message.data, dtype="<f4").reshape(message.rows, message.dim)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _failures(errors, offset: int = 0) -> list[ImageFailure]:
    return [ImageFailure(e.index + offset, _CODES.get(e.code, grpc.StatusCode.UNKNOWN), e.message) for e in errors]


def _embed_result(response: pb.EmbedResponse) -> EmbedResult:
    keys = response.keys
    return EmbedResult(response.fingerprint, as_matrix(response.vectors), np.array(response.cached, dtype=bool),
                       [keys[i:i + KEY_BYTES] for i in range(0, len(keys), KEY_BYTES)], _failures(response.errors),
                       response.offset)


def retry_policy(retries: int, backoff: float) -> str:
    """The channel's service config: unary calls answered UNAVAILABLE (a server starting or restarting) are
    retried by gRPC itself, up to `retries` times with exponential backoff from `backoff` seconds (with
    gRPC's jitter), within the call's deadline. Streams are not retried."""
    methods = [{"service": SERVICE_NAME, "method": method.name}
               for method in pb.DESCRIPTOR.services_by_name["FeatureService"].methods
               if not method.client_streaming and method.name not in MODEL_CONTROL]
    policy = {"maxAttempts": min(retries + 1, MAX_ATTEMPTS), "initialBackoff": f"{backoff:.3f}s",
              "maxBackoff": f"{max(MAX_BACKOFF, backoff):.3f}s", "backoffMultiplier": 2,
              "retryableStatusCodes": ["UNAVAILABLE"]}
    return json.dumps({"methodConfig": [{"name": methods, **({"retryPolicy": policy} if retries else {})}]})


class FeatureClient:
    """Calls a feature service. Unary calls are retried by gRPC's retry policy (see `retry_policy`; at most
    4 retries) while the server answers UNAVAILABLE; `timeout` is a call's deadline in seconds unless it
    passes its own. Streams are not retried: their vectors are in the server's store, so sending the same
    images again is cheap.
    """

    def __init__(self, target: str, *, token: str | None = None, root_cert: bytes | None = None,
                 timeout: float = 30.0, retries: int = 4, backoff: float = 0.05,
                 max_message_bytes: int = 64 * 1024 * 1024):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.enable_retries", 1), ("grpc.service_config", retry_policy(retries, backoff))]
        if root_cert is not None:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_cert), options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.stub = pb_grpc.FeatureServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self._limits: pb.Limits | None = None
        self._output_dims: dict[str, int] = {}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "FeatureClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_until_serving(self, timeout: float) -> None:
        """Block until the server's health says SERVING: it listens before its backbones are warm."""
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        watch = health_pb2_grpc.HealthStub(self.channel).Watch(request, timeout=timeout, metadata=self.metadata,
                                                                wait_for_ready=True)
        try:
            for response in watch:
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as exc:
            raise RemoteError(exc.code(), exc.details()) from None
        finally:
            watch.cancel()
        raise RemoteError(grpc.StatusCode.UNAVAILABLE, "the server stopped before it was serving")

    def _unary(self, method: Callable, request, timeout: float | None):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise RemoteError(exc.code(), exc.details()) from None

    # --- backbones and heads -------------------------------------------------------------------------

    def backbones(self, timeout: float | None = None) -> list[pb.Backbone]:
        return list(self._unary(self.stub.ListBackbones, pb.ListBackbonesRequest(), timeout).backbones)

    def backbone(self, name: str, timeout: float | None = None) -> pb.Backbone:
        return self._unary(self.stub.GetBackbone, pb.GetBackboneRequest(name=name), timeout)

    def heads(self, timeout: float | None = None) -> list[pb.Head]:
        return list(self._unary(self.stub.ListHeads, pb.ListHeadsRequest(), timeout).heads)

    def models(self, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Every entry of the server's model repository with its state (READY, LOADING, UNAVAILABLE) and reason."""
        return list(self._unary(self.stub.ListModels, pb.ListModelsRequest(), timeout).models)

    def load_model(self, name: str, timeout: float | None = None) -> pb.ModelStatus:
        """Load the repository entry `name` on the server; returns once it is READY."""
        return self._unary(self.stub.LoadModel, pb.LoadModelRequest(name=name), timeout)

    def unload_model(self, name: str, timeout: float | None = None) -> pb.ModelStatus:
        return self._unary(self.stub.UnloadModel, pb.UnloadModelRequest(name=name), timeout)

    def limits(self) -> pb.Limits:
        """The server's limits (asked once)."""
        if self._limits is None:
            self._limits = self.backbones()[0].limits
        return self._limits

    def output_dim(self, backbone: str) -> int:
        """The width of `backbone`'s vectors (asked once)."""
        if backbone not in self._output_dims:
            self._output_dims[backbone] = self.backbone(backbone).output_dim
        return self._output_dims[backbone]

    def _requests(self, images: Images, response_dim: int = 0) -> Iterator[tuple[int, dict]]:
        """(offset, request fields) per request, within the server's limits: images per request, decoded
        pixels per request, and message bytes both for the request and for a response of `response_dim`-wide
        vectors."""
        limits = self.limits()
        budget = max(limits.max_message_bytes - HEADROOM, 1)
        most = limits.max_images_per_request
        most_pixels = limits.max_request_pixels or None  # 0: a server that does not say
        if response_dim:
            most = min(most, vectors_per_response(limits.max_message_bytes, response_dim))
        if isinstance(images, np.ndarray):
            per_request = min(most, max(budget // max(images[0:1].nbytes, 1), 1))
            if most_pixels and images.ndim >= 3:
                per_request = min(per_request, max(most_pixels // max(images.shape[1] * images.shape[2], 1), 1))
            for start in range(0, max(len(images), 1), per_request):
                yield start, {"batch": tensor(images[start:start + per_request])}
            return
        batch: list[pb.Image] = []
        size = pixels = start = 0
        for i, image in enumerate(images):
            message = image_message(image)
            message_pixels = declared_pixels(message) if most_pixels else 0
            if batch and (len(batch) == most or size + message.ByteSize() > budget
                          or (most_pixels and pixels + message_pixels > most_pixels)):
                yield start, {"images": batch}
                batch, size, pixels, start = [], 0, 0, i
            batch.append(message)
            size += message.ByteSize()
            pixels += message_pixels
        if batch or not images:
            yield start, {"images": batch}

    # --- embedding -----------------------------------------------------------------------------------

    def embed(self, backbone: str, images: Images, *, all_or_nothing: bool = False,
              timeout: float | None = None) -> EmbedResult:
        """Vectors (n, d) float32 of `images`, split into as many requests as the server's limits need."""
        parts = []
        for offset, fields in self._requests(images, self.output_dim(backbone)):
            request = pb.EmbedRequest(backbone=backbone, all_or_nothing=all_or_nothing, **fields)
            part = _embed_result(self._unary(self.stub.Embed, request, timeout))
            for failure in part.errors:
                failure.index += offset
            parts.append(part)
        return EmbedResult(parts[0].fingerprint, np.concatenate([p.vectors for p in parts]),
                           np.concatenate([p.cached for p in parts]), [k for p in parts for k in p.keys],
                           [f for p in parts for f in p.errors])

    def embed_stream(self, backbone: str, images: Iterable[ImageLike] | np.ndarray, *, chunk_size: int = 64,
                     timeout: float | None = None) -> Iterator[EmbedResult]:
        """Stream any number of images in chunks of `chunk_size`; yields one result per chunk, in order
        (`offset` says where it starts; error indices count from the stream's first image).
        A stacked array (n, H, W[, C]) goes as `batch` tensors. `timeout` bounds the whole stream (default: none).
        Chunks are made smaller where the server's limits need it."""
        limits = self.limits()
        chunk_size = max(min(chunk_size, limits.max_images_per_request,
                             vectors_per_response(limits.max_message_bytes, self.output_dim(backbone))), 1)

        def requests() -> Iterator[pb.EmbedRequest]:
            if isinstance(images, np.ndarray):
                for start in range(0, len(images), chunk_size):
                    yield pb.EmbedRequest(backbone=backbone, batch=tensor(images[start:start + chunk_size]))
                return
            chunk: list[pb.Image] = []
            for image in images:
                chunk.append(image_message(image))
                if len(chunk) == chunk_size:
                    yield pb.EmbedRequest(backbone=backbone, images=chunk)
                    chunk = []
            if chunk:
                yield pb.EmbedRequest(backbone=backbone, images=chunk)

        try:
            for response in self.stub.EmbedStream(requests(), timeout=timeout, metadata=self.metadata):
                yield _embed_result(response)
        except grpc.RpcError as exc:
            raise RemoteError(exc.code(), exc.details()) from None

    def get_embeddings(self, backbone: str, keys: Sequence[bytes], *,
                       timeout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Stored vectors by content key, never computed: (n, d) float32 (NaN rows where not found), found (n,).
        Split into as many requests as the server's limits need."""
        limits = self.limits()
        per_request = min(limits.max_images_per_request,
                          vectors_per_response(limits.max_message_bytes, self.output_dim(backbone)))
        vectors, found = [], []
        for start in range(0, max(len(keys), 1), per_request):
            request = pb.GetEmbeddingsRequest(backbone=backbone, keys=b"".join(keys[start:start + per_request]))
            response = self._unary(self.stub.GetEmbeddings, request, timeout)
            vectors.append(as_matrix(response.vectors))
            found.append(np.array(response.found, dtype=bool))
        return np.concatenate(vectors), np.concatenate(found)

    def classify(self, head: str, images: Images, *, all_or_nothing: bool = False,
                 timeout: float | None = None) -> ClassifyResult:
        """A saved head's class probabilities (n, k) for `images`, with the most probable label of each."""
        parts = []
        for offset, fields in self._requests(images):
            request = pb.ClassifyRequest(head=head, all_or_nothing=all_or_nothing, **fields)
            response = self._unary(self.stub.Classify, request, timeout)
            parts.append((response, _failures(response.errors, offset)))
        return ClassifyResult(list(parts[0][0].class_names),
                              np.concatenate([as_matrix(r.probabilities) for r, _ in parts]),
                              [label for r, _ in parts for label in r.labels],
                              np.concatenate([np.array(r.cached, dtype=bool) for r, _ in parts]),
                              [f for _, failures in parts for f in failures])


class RemoteBackbone:
    """A served backbone standing in for a local `FrozenBackbone` in an `Embedder`: `embed` sends the
    images to the server, so a local job keeps its own store and feature sets while the server computes."""

    def __init__(self, client: FeatureClient, name: str):
        self.client, self.name = client, name

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """Canonical uint8 images -> (n, d) float32, computed (or found) by the server."""
        return self.client.embed(self.name, images, all_or_nothing=True).vectors


def served_spec(client: FeatureClient, name: str, *, input_size: int | None = None, recipe: str | None = None,
                pooling: str | None = None):
    """The local `BackboneSpec` for the server's backbone `name` with these options, checked to have
    the server's fingerprint: content keys made here and there are then the same."""
    from extractor.models import get_backbone_spec

    served = client.backbone(name)
    spec = get_backbone_spec(name, input_size=input_size, recipe=recipe, pooling=pooling)
    if spec.fingerprint != served.fingerprint:
        raise InvalidInputError(
            f"the server runs {name} with input size {served.input_size}, recipe {served.recipe}, pooling "
            f"{served.pooling}; these options ask for input size {spec.input_size}, recipe {spec.preprocessing.name}, "
            f"pooling {spec.pooling}")
    return spec
