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
PACKAGES := -e shared[catalog] -e services/ingest -e services/trainer -e services/exporter \
            -e services/gateway[llamacpp] -e deploy/local -e cli

.PHONY: help install demo test test-fast lint bench bench-ingest bench-merge bench-gateway up up-services down clean

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

install: $(VENV)/.installed  ## create .venv and install every service editable

demo: install  ## start the embedded stack, fine-tune SmolLM2 on the sample data, chat with it
	$(PY) -m afina.cli.demo

test: install  ## unit, integration (real servers) and end-to-end tests
	$(PY) -m pytest

test-fast: install  ## the tests/unit/ tests: no server, no real model (deselects slow, integration, e2e)
	$(PY) -m pytest -m "not slow and not integration and not e2e"

lint: install  ## ruff
	$(VENV)/bin/ruff check shared services cli deploy tests bench

bench: install  ## the end-to-end pipeline benchmark (writes bench/results/)
	$(PY) bench/pipeline_e2e.py

bench-merge: install  ## streaming merge vs transformers+PEFT on a Llama-3.2-1B shape: peak RSS, wall, bit-identity
	$(PY) bench/merge_memory.py

bench-gateway: install  ## gateway overhead vs LiteLLM and a bare pass-through, then the 200-stream load run (bench/results/)
	$(PY) bench/gateway_overhead.py
	$(PY) bench/gateway_overhead.py --load

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
