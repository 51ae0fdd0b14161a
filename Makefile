# make run   -> set up (if needed) and run generate -> partition -> train on the embedded default
# make test  -> set up (if needed) and run the whole test suite (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= conf/local.yaml
SET ?=
export SPARK_LOCAL_IP := 127.0.0.1
export PYSPARK_PYTHON := $(CURDIR)/$(PY)
export PYSPARK_DRIVER_PYTHON := $(CURDIR)/$(PY)

.PHONY: setup run test lint bench clean mlflow-ui
setup: $(VENV)/.stamp-project

# 1. torch and the horovod build tools first: horovod compiles against the installed torch.
$(VENV)/.stamp-base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.13.0" "setuptools>=77,<81" wheel "cmake>=3.27" packaging
	touch $@

# 2. horovod from source, patched (see the script's header), cached as a wheel in .cache/wheels.
$(VENV)/.stamp-horovod: $(VENV)/.stamp-base scripts/build_horovod.sh
	scripts/build_horovod.sh $(VENV)
	touch $@

# 3. the project and the rest of the pinned stack; horovod is already satisfied.
$(VENV)/.stamp-project: $(VENV)/.stamp-horovod pyproject.toml
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

run: setup
	$(PY) -m jobs.main --config $(CONFIG) $(foreach s,$(SET),--set $(s))

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .cache work

# The MLflow UI on the project's sqlite store, loopback only.
mlflow-ui: setup
	mkdir -p work/mlartifacts
	$(VENV)/bin/mlflow server --host 127.0.0.1 --port 5000 \
	  --backend-store-uri sqlite:///$(CURDIR)/work/mlflow.db --default-artifact-root $(CURDIR)/work/mlartifacts

# Benchmarks print one JSON object each (figures in README).
bench: setup
	$(PY) bench/partition.py
	$(PY) bench/loader.py
	$(PY) bench/allreduce.py
	$(PY) bench/compare.py
