# Architecture ablations of decoder-only LMs. `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STUDY ?= full_grid
WORKERS ?= auto
ARGS ?=
PORT ?= 5000
HOST ?= 127.0.0.1
# make server: the tracking server's database and artifact root (README: Scaling out).
BACKEND ?= sqlite:///mlflow.db
ARTIFACTS ?= mlartifacts
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install lint format test test-slow ablate ui server report cost bench bench-sweep gpu-check clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch from local disk first; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its test extra (idempotent)

lint: $(STAMP) ## ruff: lint, import order and formatting (check only)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## ruff: apply fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP) ## Run the test suite (CPU, offline; slow and gpu tests left out)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP) ## Run only the slow tests (extrapolation on real text, long sweeps)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

ablate: $(STAMP) ## Run a study: make ablate [STUDY=full_grid] [WORKERS=auto|N] [ARGS="..."], then its report
	@# The report is written even when some trials failed; make then exits with the sweep's status.
	$(BIN)/python -m pipeline.train -m ablation=$(STUDY) hydra.sweeper.workers=$(WORKERS) $(ARGS); status=$$?; \
	$(BIN)/python -m pipeline.report --study $(STUDY) && exit $$status

report: $(STAMP) ## Rebuild a study's comparison report from MLflow: make report STUDY=name
	$(BIN)/python -m pipeline.report --study $(STUDY)

ui: $(STAMP) ## MLflow UI on 127.0.0.1:$(PORT) (HOST=... to share it) over the same store (honours MLFLOW_TRACKING_URI); prints each study's runs-table address
	$(BIN)/python -m pipeline.ui --host $(HOST) --port $(PORT)

server: $(STAMP) ## MLflow tracking server: make server [HOST=127.0.0.1] [PORT=5000] [BACKEND=sqlite:///mlflow.db|postgresql+psycopg2://...] [ARTIFACTS=mlartifacts]
	@# Bound to 127.0.0.1 unless HOST= says otherwise; beyond this machine also pass
	@# SERVER_ARGS="--allowed-hosts HOST:PORT --cors-allowed-origins https://..." (README: Scaling out).
	$(BIN)/mlflow server --host $(HOST) --port $(PORT) --backend-store-uri "$(BACKEND)" \
		--artifacts-destination "$(ARTIFACTS)" $(SERVER_ARGS)

cost: $(STAMP) ## Analytic inference-cost table, no training: make cost ARGS="model=llama"
	$(BIN)/python -m pipeline.cost $(ARGS)

bench: $(STAMP) ## Step-time benchmark against a minimal GPT, transformers and x-transformers
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.step_time $(ARGS)

bench-sweep: $(STAMP) ## Time a whole study in a fresh folder (issue 16 targets): make bench-sweep [STUDY=] [WORKERS=]
	$(BIN)/python -m benchmarks.sweep_time --study $(STUDY) --workers $(WORKERS) $(ARGS)

gpu-check: $(STAMP) ## GPU checks: the gpu tests, then trials/hour at 1, 2, 4 slots on one GPU (results to $$OUT)
	$(BIN)/python -m pytest -q -m gpu $${OUT:+--junitxml=$$OUT/gpu-check.xml} $(PYTEST_ARGS); status=$$?; \
	$(BIN)/python -m benchmarks.gpu_slots && exit $$status

clean: ## Remove caches and local stores (keeps .venv)
	rm -rf outputs multirun reports .cache mlflow.db mlruns mlartifacts optuna.db
