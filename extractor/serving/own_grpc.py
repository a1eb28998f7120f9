"""The own gRPC door (`extractor.v1.FeatureService`): protobuf <-> numpy, message sizes, per-image errors."""

from __future__ import annotations

import time

import grpc

from extractor.errors import ExtractorError, LimitExceededError
from extractor.serving.concurrency import ConcurrencyLimits
from extractor.serving.loaded_models import ModelState, ModelStatus
from extractor.models import PRESETS
from extractor.serving.grpc_status import status_for
from extractor.serving.requests import Call, RawPixels, StreamRequest, batch_size
from extractor.serving.service import FeatureService
from extractor.wire import KEY_BYTES, vectors_per_response, vectors_response_bytes
from protos import feature_service_pb2 as pb
from protos import feature_service_pb2_grpc as pb_grpc

NO_DEADLINE = 1e8  # grpc reports "no deadline" as a remaining time of centuries
STATE = {ModelState.READY: pb.ModelStatus.READY, ModelState.LOADING: pb.ModelStatus.LOADING,
         ModelState.UNAVAILABLE: pb.ModelStatus.UNAVAILABLE}


def raw_pixels(tensor: pb.Tensor) -> RawPixels:
    return RawPixels(tensor.data, tuple(tensor.shape), tensor.dtype)


def images_from(messages) -> list[bytes | RawPixels]:
    return [raw_pixels(m.pixels) if m.WhichOneof("content") == "pixels" else m.encoded for m in messages]


def batch_from(request) -> RawPixels | None:
    return raw_pixels(request.batch) if request.HasField("batch") else None


def matrix(array) -> pb.Matrix:
    """(rows, dim) float32 -> one packed little-endian bytes field."""
    return pb.Matrix(data=array.astype("<f4", copy=False).tobytes(), rows=array.shape[0], dim=array.shape[1])


def image_errors(errors: list[tuple[int, ExtractorError]]) -> list[pb.ImageError]:
    return [pb.ImageError(index=index, code=status_for(error)[0].value[0], message=str(error))
            for index, error in errors]


def embed_response(outcome) -> pb.EmbedResponse:
    return pb.EmbedResponse(fingerprint=outcome.fingerprint, vectors=matrix(outcome.vectors),
                            cached=outcome.cached.tolist(), keys=outcome.keys,
                            errors=image_errors(outcome.errors), offset=outcome.offset)


def call_from(context: grpc.ServicerContext) -> Call:
    remaining = context.time_remaining()
    deadline = time.monotonic() + remaining if remaining is not None and remaining < NO_DEADLINE else None
    return Call(deadline, context.is_active)


def model_status(status: ModelStatus) -> pb.ModelStatus:
    return pb.ModelStatus(name=status.name, state=STATE[status.state], reason=status.reason)


class FeatureServicer(pb_grpc.FeatureServiceServicer):
    """Translates each RPC into a call on the `FeatureService` core and its result back. Refuses, before any
    work, calls whose vectors would not fit one response message of `max_message_bytes`. `concurrency` is
    shown to clients with the other limits (the call guard enforces it)."""

    def __init__(self, service: FeatureService, max_message_bytes: int,
                 concurrency: ConcurrencyLimits = ConcurrencyLimits()):
        self.service = service
        self.max_message_bytes = max_message_bytes
        self.concurrency = concurrency

    def _fits(self, backbone: str, images: int, batch: RawPixels | None = None) -> None:
        """Refuse `images` and those of `batch` if their vectors would not fit one response message."""
        dim = self.service.output_dim(backbone)
        count = images + batch_size(batch)
        size = vectors_response_bytes(count, dim)
        if size > self.max_message_bytes:
            fit = vectors_per_response(self.max_message_bytes, dim)
            raise LimitExceededError(f"response bytes ({count} vectors of {dim} floats; {fit} fit)",
                                     size, self.max_message_bytes)

    def _backbone(self, spec) -> pb.Backbone:
        limits = self.service.limits
        return pb.Backbone(
            name=spec.name, summary=spec.summary, input_size=spec.input_size, channels=spec.channels,
            recipe=spec.preprocessing.name, recipes=sorted(PRESETS), pooling=spec.pooling,
            output_dim=self.service.output_dim(spec.name), fingerprint=spec.fingerprint, weights_sha256=spec.sha256 or "",
            limits=pb.Limits(max_images_per_request=limits.max_images_per_request,
                             max_message_bytes=self.max_message_bytes,
                             max_decoded_pixels=limits.max_decoded_pixels,
                             max_request_pixels=limits.max_request_pixels,
                             max_pixels_in_flight=limits.max_pixels_in_flight,
                             max_pixel_wait_seconds=limits.max_pixel_wait_seconds,
                             max_streams=self.concurrency.max_streams,
                             max_concurrent_calls=self.concurrency.max_calls,
                             stream_idle_seconds=self.concurrency.stream_idle_seconds))

    def ListBackbones(self, request, context):
        return pb.ListBackbonesResponse(backbones=[self._backbone(spec) for spec in self.service.backbones()])

    def GetBackbone(self, request, context):
        return self._backbone(self.service.backbone(request.name))

    def Embed(self, request, context):
        batch = batch_from(request)
        self._fits(request.backbone, len(request.images), batch)
        outcome = self.service.embed(request.backbone, images_from(request.images), batch=batch,
                                     all_or_nothing=request.all_or_nothing, call=call_from(context))
        return embed_response(outcome)

    def EmbedStream(self, request_iterator, context):
        def requests():
            backbone = ""
            for r in request_iterator:
                backbone = r.backbone or backbone
                batch = batch_from(r)
                self._fits(backbone, len(r.images), batch)
                yield StreamRequest(r.backbone, images_from(r.images), r.all_or_nothing, batch)

        for outcome in self.service.embed_stream(requests(), call_from(context)):
            yield embed_response(outcome)

    def GetEmbeddings(self, request, context):
        if len(request.keys) % KEY_BYTES == 0:  # else the core refuses the keys themselves
            self._fits(request.backbone, len(request.keys) // KEY_BYTES)
        vectors, found = self.service.get_embeddings(request.backbone, request.keys)
        return pb.GetEmbeddingsResponse(vectors=matrix(vectors), found=found.tolist())

    def ListHeads(self, request, context):
        return pb.ListHeadsResponse(heads=[
            pb.Head(name=head.name, backbone=self.service.head_backbone(head) or "",
                    backbone_fingerprint=head.backbone_fingerprint, class_names=head.class_names)
            for head in self.service.list_heads()])

    def Classify(self, request, context):
        outcome = self.service.classify(request.head, images_from(request.images), batch=batch_from(request),
                                        all_or_nothing=request.all_or_nothing, call=call_from(context))
        return pb.ClassifyResponse(class_names=outcome.class_names, probabilities=matrix(outcome.probabilities),
                                   labels=outcome.labels, cached=outcome.cached.tolist(),
                                   errors=image_errors(outcome.errors))

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[model_status(status) for status in self.service.list_models()])

    def LoadModel(self, request, context):
        return model_status(self.service.load_model(request.name))

    def UnloadModel(self, request, context):
        return model_status(self.service.unload_model(request.name))
