# One entry point for set-up, code generation, checks, tests, benchmarks and the demo.
# `make demo` and `make test` do all the set-up they need on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed

PROTO_SRC := $(wildcard protos/recsys/v1/*.proto protos/recsys/inference/*.proto)
PROTO_OUT := $(patsubst protos/%.proto,%_pb2.py,$(PROTO_SRC))

.PHONY: help setup tools protos check-protos lint fmt test test-fast e2e bench bench-quality \
	bench-ranker bench-vocab bench-layouts bench-gateway bench-rollout bench-system bench-peers bench-scale bench-index probe demo train \
	bench-train-scale bench-train-shard serve serve-ranking serve-retrieval serve-gateway docs check-docs base-image images images-smoke \
	images-prune images-gpu k8s-render k8s-check clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	scripts/setup-venv.sh $(PYTHON) $(VENV)
	@touch $@

setup: $(STAMP) ## create the virtualenv: the project with the train, dev and distributed extras, pinned

tools: ## install the system tools the tests use (Prometheus server and promtool)
	scripts/install-tools.sh

recsys/%_pb2.py: protos/recsys/%.proto | $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --grpc_python_out=. --pyi_out=. $<

protos: $(PROTO_OUT) ## regenerate the gRPC stubs in recsys/ from protos/ (only what changed)

check-protos: $(STAMP) ## regenerate every stub and fail if the committed ones differ
	scripts/check-protos.sh $(PY)

lint: $(STAMP) ## ruff (lint and format check), mypy and the import contracts
	scripts/lint.sh $(BIN)

fmt: $(STAMP) ## format the code
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

test: $(STAMP) tools ## the whole test suite (unit, integration, e2e, k8s)
	scripts/test.sh $(BIN)

test-fast: $(STAMP) ## unit tests only
	$(BIN)/pytest -q tests/unit

bench: bench-quality bench-ranker bench-vocab bench-gateway bench-rollout ## every benchmark but bench-peers (slow)

bench-quality: $(STAMP) ## model quality: ML-1M vs RecBole, every cross-domain pair both ways, demo time (slow)
	$(PY) -m bench.quality

bench-train-scale: $(STAMP) ## one training epoch at 10 M synthetic interactions: full vs sampled softmax, 10 k-1 M items (slow)
	$(PY) -m bench.train_scale $(ARGS)

bench-train-shard: $(STAMP) ## torchrun, 2 processes: row-sharded vs replicated tables at 1 M items, memory and epoch time
	$(PY) -m bench.train_shard $(ARGS)

bench-ranker: $(STAMP) ## the ranking service against the in-process ONNX Runtime ceiling (slow)
	$(PY) -m bench.ranker

bench-vocab: $(STAMP) ## the Rank API's id mapping in-process: dict, sorted hashes, the vectorised table
	$(PY) -m bench.vocab

bench-layouts: $(STAMP) ## the built-in data set layouts: load time and peak memory per folder, two ways to parse '::'
	$(PY) -m bench.layouts

bench-gateway: $(STAMP) ## the whole stack under load: throughput, latency, where the time goes, HNSW recall (slow)
	$(PY) -m bench.gateway

bench-scale: $(STAMP) ## data at 1 M, 10 M, 100 M interactions: generate, load, split, one train epoch (time, rows/s, peak memory) (slow; data under /tmp)
	$(PY) -m bench.scale $(SCALE_ARGS)

bench-system: $(STAMP) ## the served pipeline on test splits: retrieval order vs dot-product vs learned ranker (slow)
	$(PY) -m bench.system $(SYSTEM_ARGS)

bench-peers: $(STAMP) ## the ranker beside a plain grpc.aio server, KServe and Triton (PyTriton), each in its own venv (slow)
	scripts/setup-peers.sh $(PYTHON) .venv-peers
	$(PY) -m bench.peers $(ARGS)

bench-index: $(STAMP) ## retrieval indexes at 1 M and 10 M synthetic items: build, size, load, memory, recall@500, latency, service start (slow, ~6 GB)
	$(PY) -m bench.index_scale $(ARGS)

bench-rollout: $(STAMP) ## rolling update of the rankers and a model version rollout under load (slow)
	$(PY) -m bench.rollout

probe: $(STAMP) ## bad inputs against a running stack (expected vs observed, health): a table in bench/results/probe.{json,md}
	$(PY) -m bench.probe

e2e: $(STAMP) ## the end-to-end tests: every service as a process on loopback
	$(BIN)/pytest -q tests/e2e

base-image: ## a Python base image from Debian packages (mmdebstrap), for machines with no registry
	scripts/install-images-tools.sh
	scripts/base-image.sh

images: $(STAMP) ## build the CPU images, serving and training, tagged with the package version (podman or docker)
	scripts/install-images-tools.sh
	scripts/images.sh

images-smoke: $(STAMP) ## build cold and cached, train, serve hardened, recommend, drain; bench/results/images.* (~8 min)
	scripts/install-images-tools.sh
	scripts/images-smoke.sh

images-prune: ## remove the smoke's containers, the project's images and dangling build layers
	scripts/images-prune.sh

images-gpu: ## build the GPU image from the CUDA base (needs a registry and PyPI; not built by CI)
	scripts/images-gpu.sh

k8s-render: $(STAMP) ## render every kustomize overlay into build/k8s/
	scripts/k8s-render.sh $(BIN)

k8s-check: $(STAMP) tools ## render, validate and policy-check the manifests, promtool, Dockerfiles
	$(BIN)/pytest -q tests/k8s

clean: ## remove the virtualenv, caches and local run outputs
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs model_repository wheelhouse build/images build/podman

demo: $(STAMP) ## train, publish, start every service, recommend for a warm and a cold-start user
	$(PY) -m devtools.demo

train: $(STAMP) ## train on the default pair (Amazon movies -> books) and publish to ./model_repository
	$(PY) -m training train --config=training/configs/amazon_movies_to_books.toml --repository=model_repository --run-dir=runs/latest

# Each serve target execs the server (no shell left between make and it), so SIGTERM to make
# reaches the server, which drains and exits. ARGS passes flags: make serve ARGS=--domains=books
serve: $(STAMP) ## all three services on 127.0.0.1:8000-8002 against ./model_repository; Ctrl-C stops them
	exec $(PY) -m devtools.serve $(ARGS)

serve-ranking: $(STAMP) ## run the ranking service on ./model_repository
	exec env RANKING_MODEL_REPOSITORY=model_repository $(PY) -m serving.ranking $(ARGS)

serve-retrieval: $(STAMP) ## run the retrieval service on ./model_repository
	exec env RETRIEVAL_MODEL_REPOSITORY=model_repository $(PY) -m serving.retrieval $(ARGS)

serve-gateway: $(STAMP) ## run the gateway against local retrieval and ranking
	exec $(PY) -m gateway $(ARGS)

docs: $(STAMP) ## regenerate docs/settings.md and docs/metrics.md from the settings and metric definitions
	$(PY) -m devtools.refdocs

check-docs: $(STAMP) ## fail if docs/settings.md or docs/metrics.md differ from the code
	$(PY) -m devtools.refdocs --check
