# afina — every routine action has a target. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# llama.cpp is compiled once by pip and then served from pip's wheel cache;
# portable CPU flags so a cached wheel also runs on another machine's CPU
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
PACKAGES := -e shared[catalog] -e services/ingest -e services/trainer -e services/exporter -e services/evaluator \
            -e services/gateway[llamacpp] -e deploy/local -e cli

.PHONY: help system-packages install demo test scan test-fast lint bench bench-eval bench-ingest bench-merge bench-gateway profile-gateway up up-services down clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(VENV)/.installed: shared/pyproject.toml services/*/pyproject.toml cli/pyproject.toml deploy/local/pyproject.toml requirements-dev.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	# the CPU build of torch first, so no dependency pulls CUDA wheels
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q $(PACKAGES) -r requirements-dev.txt
	touch $@

# Debian packages the tests use: promtool (deploy/ checks) and prometheus (the multi-process test scrapes the
# stack with it). Its package would start a system Prometheus where systemd runs: that one is stopped again.
DEBIAN_PACKAGES := prometheus
system-packages:  ## the Debian packages the tests need (apt-get; root or sudo)
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq \
	    --no-install-recommends $(DEBIAN_PACKAGES) >/dev/null && \
	  { ! command -v systemctl >/dev/null || $$sudo systemctl disable --now prometheus >/dev/null 2>&1 || true; }; }

install: $(VENV)/.installed system-packages  ## create .venv and install every service editable

demo: install  ## start the embedded stack, fine-tune SmolLM2 on the sample data, chat with it
	$(PY) -m afina.cli.demo

test: install  ## unit, integration (real servers) and end-to-end tests
	$(PY) -m pytest

test-fast: install  ## the tests/unit/ tests: no server, no real model (deselects slow, integration, e2e)
	$(PY) -m pytest -m "not slow and not integration and not e2e"

# checkov pins many libraries of its own: it lives in a virtualenv of its own inside .venv
CHECKOV_VERSION := 3.3.30
# the Dockerfiles docker-compose.yml builds
SCANNED_DOCKERFILES := services/gateway/Dockerfile services/ingest/Dockerfile services/exporter/Dockerfile \
                       services/evaluator/Dockerfile services/trainer/Dockerfile
scan: install  ## static security scan (checkov) of the rendered k8s overlays and the Dockerfiles; deploy/checkov.yaml
	test -x $(VENV)/checkov/bin/checkov || { $(PYTHON) -m venv $(VENV)/checkov && \
	  $(VENV)/checkov/bin/pip install -q checkov==$(CHECKOV_VERSION); }
	rm -rf $(VENV)/scan && mkdir -p $(VENV)/scan
	for overlay in dev production; do $(VENV)/bin/kubectl kustomize k8s/overlays/$$overlay > $(VENV)/scan/$$overlay.yaml; done
	$(VENV)/checkov/bin/checkov --config-file deploy/checkov.yaml --framework kubernetes -d $(VENV)/scan
	$(VENV)/checkov/bin/checkov --config-file deploy/checkov.yaml --framework dockerfile \
	  $(foreach dockerfile,$(SCANNED_DOCKERFILES),-f $(dockerfile))

lint: install  ## ruff
	$(VENV)/bin/ruff check shared services cli deploy tests bench

bench: install  ## the end-to-end pipeline benchmark (writes bench/results/)
	$(PY) bench/pipeline_e2e.py

bench-eval: install  ## evaluation throughput: batched/cached decoding vs one call at a time, transformers and llama.cpp
	$(PY) bench/evaluation_throughput.py

bench-merge: install  ## streaming merge vs transformers+PEFT on a Llama-3.2-1B shape: peak RSS, wall, bit-identity
	$(PY) bench/merge_memory.py

bench-gateway: install  ## gateway overhead vs LiteLLM and a bare pass-through, then the 200-stream load run (bench/results/)
	$(PY) bench/gateway_overhead.py
	$(PY) bench/gateway_overhead.py --load

profile-gateway: install  ## cProfile of one proxied chat completion through the gateway's ASGI app, in process
	$(PY) bench/gateway_profile.py

bench-ingest: install  ## ingest throughput and peak RSS vs Hugging Face datasets, 100k and 1M rows (bench/results/)
	$(PY) bench/ingest_throughput.py

up: install  ## start the embedded stack in the background
	$(VENV)/bin/afina up --embedded

up-services: install  ## start every service as its own process (Redis, PostgreSQL, SeaweedFS, llama.cpp server)
	$(VENV)/bin/afina up --services

down:  ## stop whatever `afina up` started
	$(VENV)/bin/afina down

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache
