"""The Open Inference Protocol's gRPC door (`inference.GRPCInferenceService`): its messages <-> tensors, raw
(`raw_input_contents`, which tritonclient sends) or typed contents in, raw contents out."""

from __future__ import annotations

from extractor.errors import ExtractorError, InvalidInputError
from extractor.serving.grpc_status import status_for
from extractor.serving.oip import EXTENSIONS, SERVER_NAME, VERSION, InferenceModels, Tensor, from_raw, \
    from_values, raw_of, server_version
from extractor.serving.own_grpc import call_from
from extractor.serving.service import FeatureService
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

# Which field of InferTensorContents holds each datatype's typed values
CONTENTS_FIELD = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
                  "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
                  "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def inputs_from(request: pb.ModelInferRequest) -> list[Tensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(f"{len(raw)} raw input contents for {len(request.inputs)} inputs")
    tensors = []
    for i, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        if raw:
            tensors.append(from_raw(tensor.name, tensor.datatype, shape, raw[i]))
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise InvalidInputError(f"input {tensor.name!r}: datatype {tensor.datatype!r} has no typed contents")
            tensors.append(from_values(tensor.name, tensor.datatype, shape, list(getattr(tensor.contents, field))))
    return tensors


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Health, metadata, inference (unary and streamed), the repository extension and statistics."""

    def __init__(self, service: FeatureService):
        self.service = service
        self.models = InferenceModels(service)

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.ready)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.models.ready(request.name, request.version))

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

    def ModelMetadata(self, request, context):
        meta = self.models.metadata(request.name, request.version)
        tensors = [[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta[key]] for key in ("inputs", "outputs")]
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors[0], outputs=tensors[1])

    def _infer(self, request, context) -> pb.ModelInferResponse:
        requested = [output.name for output in request.outputs] or None
        outputs = self.models.infer(request.model_name, request.model_version, inputs_from(request), requested,
                                    call_from(context))
        return pb.ModelInferResponse(
            model_name=request.model_name, model_version=VERSION, id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
                     for t in outputs],
            raw_output_contents=[raw_of(t) for t in outputs])

    def ModelInfer(self, request, context):
        return self._infer(request, context)

    def ModelStreamInfer(self, request_iterator, context):
        """One response per request, in order; a request that fails gets its error message and the stream
        goes on (the protocol's way), while a failure of the stream itself ends it with a status."""
        for request in request_iterator:
            try:
                yield pb.ModelStreamInferResponse(infer_response=self._infer(request, context))
            except (ExtractorError, TimeoutError) as exc:
                yield pb.ModelStreamInferResponse(error_message=status_for(exc)[1],
                                                  infer_response=pb.ModelInferResponse(id=request.id))

    def ModelStatistics(self, request, context):
        stats = []
        for name, usage in self.models.statistics(request.name, request.version):
            duration = {key: pb.StatisticDuration(count=d.count, ns=d.ns) for key, d in (
                ("success", usage.success), ("fail", usage.fail), ("queue", usage.queue),
                ("compute_infer", usage.compute))}
            stats.append(pb.ModelStatistics(name=name, version=VERSION, last_inference=usage.last_inference_ms,
                                            inference_count=usage.inference_count,
                                            execution_count=usage.execution_count,
                                            inference_stats=pb.InferStatistics(**duration)))
        return pb.ModelStatisticsResponse(model_stats=stats)

    def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(name=s.name, version=VERSION, state=s.state.value, reason=s.reason)
            for s in self.models.repository_index(request.ready)])

    def RepositoryModelLoad(self, request, context):
        self.service.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        self.service.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()
