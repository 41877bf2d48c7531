# Quickstart: `make demo` (the quickstart sweep on local Ray + SQLite MLflow) and `make test`.
# Both create .venv if it is missing. Torch: with no NVIDIA GPU we install the CPU build torch==2.13.0
# (on the project's dev machines a local wheel, under a minute); with a GPU, pip resolves a CUDA build.
# Override with `make TORCH_SPEC='torch==2.5.1' ...`.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4$(comma)<2.15,torch==2.13.0)
comma := ,

.PHONY: install dev demo test lint clean chromium postgres

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/overtok sweep sweeps/quickstart.yaml
	$(VENV)/bin/overtok report sweeps/quickstart.yaml

test: install chromium postgres
	$(PY) -m pytest -q -ra tests

# the report test opens the dashboard in Debian's headless Chromium
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# the tracking-database test starts a throwaway cluster of Debian's PostgreSQL server on 127.0.0.1
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }

lint: install
	$(VENV)/bin/ruff check overtok analysis tests benchmarks

clean:
	rm -rf results/mlflow.db results/mlflow.db.lock results/mlartifacts results/checkpoints results/ray
