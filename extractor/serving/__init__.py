"""The serving floor: one transport-free core (requests and limits, decoding, hot cache, micro-batcher, models) and
its doors (the own gRPC API, the Open Inference Protocol over gRPC and REST, Prometheus metrics)."""
