# SEED-X training monorepo. `make help` lists targets.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup demo tiny-towers test test-slow test-full lint format bench bench-gpu gpu-wheels sample-data clean

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv with pinned deps (idempotent)

$(VENV)/.installed: pyproject.toml constraints/eval.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints/eval.txt -e '.[dev,eval]'
	touch $@

demo: setup  ## the tiny chain learns 6 photos (CPU, ~3 min): 3 stages, recon/t2i/edit/chat scored, outputs/demo/report.md
	$(PY) -m src.demo out=outputs/demo

tiny-towers: setup  ## rebuild assets/tiny_towers, the trained tiny VAE/UNet of model/detokenizer=tiny_trained
	$(PY) -m data_prep.make_tiny_towers --out assets/tiny_towers

# Two pytest-xdist workers, a test file each at a time (module fixtures built once), one torch thread per worker
# (tests/conftest.py): the 2 cores busy without their thread pools fighting. `PYTEST_WORKERS=0` runs in one process.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile)

test: setup  ## test suite without gpu/slow tiers (~9 min on 2 cores with 2 workers)
	$(PYTEST)

test-slow: setup  ## the slow tier only: subprocess resumes, the demo, the generate CLI (CI runs it after test)
	$(PYTEST) -m "slow and not gpu"

test-full: setup  ## every tier that can run here, slow included
	$(PYTEST) -m "not gpu"

lint: setup  ## ruff
	$(VENV)/bin/ruff check src tests data_prep

format: setup
	$(VENV)/bin/ruff format src tests data_prep

bench: setup  ## throughput benchmark: Lightning vs bare loop, data vs model, packed vs padded (outputs/bench)
	$(PY) -m src.bench --out outputs/bench

bench-gpu:  ## GPU first contact on the device machine (scripts/gpu_check.sh, <= 8 min on one H100; outputs/bench_gpu)
	bash scripts/gpu_check.sh outputs/bench_gpu

gpu-wheels:  ## download the wheels the device machine lacks into .whl/ (needs a registry; carry .whl to the device)
	bash scripts/fetch_gpu_wheels.sh .whl

sample-data: setup  ## rebuild the bundled sample data under assets/sample
	$(PY) -m data_prep.make_sample_data --out assets/sample

clean:  ## remove run outputs (keeps .venv)
	rm -rf outputs logs wandb .pytest_cache
