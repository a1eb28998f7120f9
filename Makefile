# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 50051
HTTP_PORT ?= 8000

.DEFAULT_GOAL := help
.PHONY: help setup setup-ray run test test-ray test-slow test-reliability protos bench serve clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install the project with its test tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

setup-ray: setup  ## add the optional Ray engine (embed --engine ray) to .venv
	$(BIN)/python -m pip install -q -e '.[ray]'

run: setup  ## the lecture's three experiments on the shared data (FULL=1: every row at full settings, hours)
	$(BIN)/python -m classifiers run $(if $(FULL),--full)

test: setup  ## the default (fast) tests
	$(BIN)/python -m pytest -q

test-ray: setup-ray  ## the Ray engine's tests (they are skipped by `make test` when Ray is absent)
	$(BIN)/python -c "import ray"  # here a Ray that does not import is a failure, not a skip
	$(BIN)/python -m pytest -q tests/test_ray_engine.py

test-slow: setup  ## the heavy tests (full datasets, long training)
	$(BIN)/python -m pytest -q -m slow

test-reliability: setup  ## the fault, load and bad-input suite
	$(BIN)/python -m pytest -q -m reliability

OIP_PROTOS := protos/grpc_service.proto protos/model_config.proto

protos: setup  ## regenerate the gRPC code beside protos/*.proto
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(filter-out $(OIP_PROTOS),$(wildcard protos/*.proto))
	@# The Open Inference Protocol files compile under their published names (grpc_service.proto imports
	@# "model_config.proto"), so their descriptors are tritonclient's and both load in one process.
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos $(OIP_PROTOS)
	sed -i -E 's/^import (model_config_pb2|grpc_service_pb2) as/from protos import \1 as/' protos/grpc_service_pb2*.py*

BENCHMARKS := $(filter-out benchmarks/common.py benchmarks/__init__.py,$(wildcard benchmarks/*.py))

bench: setup  ## benchmarks: ratios against the baseline measured in the same run (JSON in benchmarks/results)
	@for script in $(BENCHMARKS); do echo "== $$script"; $(BIN)/python $$script || exit 1; done

serve: setup  ## the feature service: gRPC on 127.0.0.1:$(PORT), REST and /metrics on 127.0.0.1:$(HTTP_PORT)
	$(BIN)/python -m extractor serve --port $(PORT) --http-port $(HTTP_PORT)

clean:  ## remove the virtual environment and caches in the tree
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
