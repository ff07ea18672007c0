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
# make test: pytest-xdist workers (2 measured fastest on 2 cores: README, Tests); -n 0 is serial.
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help install lint format test test-slow ablate ui server report cost bench bench-sweep gpu-wheels gpu-check clean

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

test: $(STAMP) ## Run the test suite in parallel (CPU, offline; slow and gpu tests left out; PYTEST_ARGS="-n 0": serial)
	@# loadgroup: tests sharing a module fixture stay on one worker (tests/conftest.py).
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

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

# The GPU machine is offline and brings its own python3 (3.12), torch and Lightning, pandas and
# pyarrow; `make gpu-wheels` (here, with a package index) fetches everything else as wheels.
WHL := .whl
GPU_PY ?= python3
GPU_SITE := .gpu-site
GPU_OUT ?= $(if $(OUT),$(OUT),gpu-check-out)
GPU_PKGS := 'hydra-core>=1.3.2' 'omegaconf>=2.3' 'optuna>=4.0' 'mlflow-skinny>=3.0' 'sqlalchemy>=2' alembic \
	'datasets>=3.0' 'matplotlib>=3.8' pyyaml psutil 'pytest>=8'
# On the image already (or too big to ship): left out of .whl.
GPU_IMAGE_HAS := numpy pandas pyarrow torch lightning
WHEEL_TAGS := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64

gpu-wheels: ## Wheels for the offline GPU machine (CPython 3.12, x86-64) into .whl/ (<= 60 MB)
	rm -rf $(WHL) && mkdir -p $(WHL)
	@# Hydra's parser runtime is published only as a source archive: build its (pure-Python) wheel.
	$(PY) -m pip wheel -q --no-deps -w $(WHL) 'antlr4-python3-runtime==4.9.3'
	$(PY) -m pip download -q -d $(WHL) --find-links $(WHL) $(WHEEL_TAGS) $(GPU_PKGS)
	for p in $(GPU_IMAGE_HAS); do rm -f $(WHL)/$$p-*.whl; done
	@du -sh $(WHL); test $$(du -sm $(WHL) | cut -f1) -le 60 || { echo "gpu-wheels: .whl/ is over 60 MB"; exit 1; }

gpu-check: ## On the GPU machine, offline: the GPU check script, the `gpu` tests, then trials/hour at 1, 2, 4 slots (to $$OUT)
	@$(GPU_PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
		f'gpu-check: CUDA is not available to {sys.executable} (torch {torch.__version__}); run it on the GPU machine')"
	@test -n "$$(ls $(WHL)/*.whl 2>/dev/null)" || { echo "gpu-check: no wheels in $(WHL)/; run make gpu-wheels first"; exit 1; }
	$(GPU_PY) -m pip install -q --no-index --no-deps --target $(GPU_SITE) --upgrade $(WHL)/*.whl
	mkdir -p $(GPU_OUT)
	PYTHONPATH=$(CURDIR)/$(GPU_SITE):$(CURDIR) $(GPU_PY) -m benchmarks.gpu_check --out $(GPU_OUT) $(ARGS)
	PYTHONPATH=$(CURDIR)/$(GPU_SITE):$(CURDIR) $(GPU_PY) -m pytest -q -m gpu -p no:cacheprovider \
		--junitxml=$(GPU_OUT)/gpu-tests.xml $(PYTEST_ARGS); status=$$?; \
	PYTHONPATH=$(CURDIR)/$(GPU_SITE):$(CURDIR) $(GPU_PY) -m benchmarks.gpu_slots --out $(GPU_OUT) && exit $$status

clean: ## Remove caches and local stores (keeps .venv)
	rm -rf outputs multirun reports .cache mlflow.db mlruns mlartifacts optuna.db $(GPU_SITE) gpu-check-out
