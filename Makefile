# The two commands a new user needs:
#   make repro  - set up .venv (once) and run the default DVC pipeline (offline, embedded data)
#   make test   - set up .venv (once) and run the test suite
# Set-up reinstalls only when pyproject.toml or constraints.txt change.

SHELL  := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export DS_BUILD_OPS := 0
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: repro test bench backbone serve mutate install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# dvc.yaml runs `python -m pipelines.<stage>`: the venv's python must come first on PATH.
repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

# The peer benchmark (BENCHMARKS.md §3): the pipeline up to tune, then every method on the same footing.
bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro tune
	$(BIN)/python bench/peers.py $(BENCH_ARGS)

# Rebuild the shipped embedded backbone (weights/): pretrain with params.yaml's `pretrain` section (about 30 min
# on 2 CPU cores), record checksum + command + figures in weights/embedded_backbone.json, keep the log beside it.
backbone: $(STAMP)
	set -o pipefail; $(BIN)/python -m pipelines.pretrain --ship 2>&1 | tee weights/embedded_backbone.log.partial
	mv weights/embedded_backbone.log.partial weights/embedded_backbone.log

# Serve a task's registered champion over REST (after `make repro`): make serve [TASK=digits] [PORT=5001].
# Runs MLflow's scoring server from the venv, venv on PATH (MLflow starts uvicorn by name). README: "Serve".
serve: $(STAMP)
	$(BIN)/python -m pipelines.serve $(if $(TASK),--task $(TASK)) $(if $(PORT),--port $(PORT)) $(SERVE_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Mutation testing (docs/testing.md), not part of `make test`: run it when dynadapter/inference, dynadapter/models,
# train/sparsity.py or train/losses.py change. Config: [tool.mutmut] in pyproject.toml. Resumable: mutmut
# keeps its results in mutants/ and retests only what changed; `rm -rf mutants` for a clean run.
MUTATE_STAMP := $(VENV)/.installed-mutate

$(MUTATE_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,mutate]'
	@touch $(MUTATE_STAMP)

mutate: $(MUTATE_STAMP)
	OMP_NUM_THREADS=1 $(BIN)/mutmut run $(MUTATE_ARGS)
	$(BIN)/mutmut results

clean-venv:
	rm -rf $(VENV)
