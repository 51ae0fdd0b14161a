# make run   -> set up (if needed) and run generate -> partition -> train on the embedded default
# make test  -> set up (if needed) and run the whole test suite (what .ci/run calls), then the Spark-touching
#               core again on Spark 4.0 (test-spark4)
# SPARK=4.0 (any target) -> the same on pyspark 4.0 in .venv-spark4.0, beside the default .venv (pyspark 3.5)
SHELL := /bin/bash
PYTHON ?= python3.11

# Spark line, chosen at setup time; each has its own venv so both can live side by side. pyproject.toml pins
# the default (3.5); another line's differing pins sit in scripts/spark-$(SPARK).txt and are swapped in by
# scripts/spark_requirements.py (pip cannot override a pin with a constraints file). Only lines whose
# minimum pyarrow admits Petastorm's pyarrow 14.0.2 are offered (README "Spark versions").
SPARK ?= 3.5
SPARK_LINES := 3.5 4.0
ifeq ($(filter $(SPARK),$(SPARK_LINES)),)
$(error SPARK=$(SPARK) is not supported: use one of $(SPARK_LINES). pyspark 4.1 needs pyarrow >= 15 and 4.2+ pyarrow >= 18, which Petastorm cannot use (README "Spark versions"))
endif
ifeq ($(SPARK),3.5)
VENV := .venv
SPARK_PINS :=
else
VENV := .venv-spark$(SPARK)
SPARK_PINS := scripts/spark-$(SPARK).txt
endif
PY := $(VENV)/bin/python
CONFIG ?= conf/local.yaml
SET ?=
export SPARK_LOCAL_IP := 127.0.0.1
export PYSPARK_PYTHON := $(CURDIR)/$(PY)
export PYSPARK_DRIVER_PYTHON := $(CURDIR)/$(PY)

.PHONY: setup run test test-spark4 lint bench clean mlflow-ui airflow-venv airflow-setup airflow-run cluster-up cluster-down
setup: $(VENV)/.stamp-project

# 1. torch and the horovod build tools first: horovod compiles against the installed torch.
$(VENV)/.stamp-base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.13.0" "setuptools>=77,<81" wheel "cmake>=3.27" packaging "cffi>=1.4.0"
	touch $@

# 2. horovod from source, patched (see the script's header), cached as a wheel in .cache/wheels.
$(VENV)/.stamp-horovod: $(VENV)/.stamp-base scripts/build_horovod.sh
	scripts/build_horovod.sh $(VENV)
	touch $@

# 3. the project and the rest of the pinned stack; horovod is already satisfied. For a non-default Spark line:
#    pyproject's requirements with that line's pins swapped in, then the project itself without its deps.
$(VENV)/.stamp-project: $(VENV)/.stamp-horovod pyproject.toml $(SPARK_PINS)
ifeq ($(SPARK_PINS),)
	$(PY) -m pip install --quiet -e ".[dev]"
else
	$(PY) scripts/spark_requirements.py $(SPARK_PINS) > $(VENV)/requirements-spark$(SPARK).txt
	$(PY) -m pip install --quiet -r $(VENV)/requirements-spark$(SPARK).txt
	$(PY) -m pip install --quiet --no-deps -e .
endif
	touch $@

run: setup
	$(PY) -m jobs.main --config $(CONFIG) $(foreach s,$(SET),--set $(s))

test: setup airflow-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q tests
ifeq ($(SPARK),3.5)
	$(MAKE) --no-print-directory test-spark4
endif

# The Spark-touching core (partitioning, barrier launch + training, baselines, scoring, sparse vectors read in
# the JVM and built for MLlib by an Arrow map, Spark's libsvm source, and the README's local
# spark-submit block, which covers session.stop_spark_session on 4.0) on Spark 4.0, in its own venv (set up
# here if needed: the Horovod wheel in .cache/wheels is reused). The standalone-cluster block is left to the
# default run to keep this part short.
SPARK4_TESTS := tests/test_partition.py tests/test_partition_stratified.py tests/test_launch.py tests/test_train.py tests/test_feature_parallel.py \
	tests/test_baselines.py tests/test_score.py tests/test_readme.py tests/test_baselines_sparse.py \
	tests/test_sparse.py::test_a_feature_hasher_vector_stays_sparse_and_exact \
	tests/test_sparse.py::test_libsvm_written_by_spark_trains_on_two_ranks \
	tests/test_ps.py::test_a_worker_killed_under_async_is_resubmitted_and_the_run_finishes \
	--deselect "tests/test_readme.py::test_readme_block_runs_as_written[standalone]"
test-spark4:
	$(MAKE) --no-print-directory SPARK=4.0 setup
	PYSPARK_PYTHON=$(CURDIR)/.venv-spark4.0/bin/python PYSPARK_DRIVER_PYTHON=$(CURDIR)/.venv-spark4.0/bin/python \
	  .venv-spark4.0/bin/pytest -q $(SPARK4_TESTS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf .venv .venv-spark* $(AIRFLOW_VENV) .cache work

# Airflow in its own venv (its dependencies clash with the pinned stack; see scripts/setup_airflow.sh),
# AIRFLOW_HOME under work/ (sqlite), a connection spark_local whose master is SPARK_MASTER.
AIRFLOW_VENV := .venv-airflow
export AIRFLOW_HOME ?= $(CURDIR)/work/airflow
SPARK_MASTER ?= local[2]
DATE ?= $(shell date -u +%F)
airflow-venv: $(AIRFLOW_VENV)/.stamp
$(AIRFLOW_VENV)/.stamp: scripts/setup_airflow.sh scripts/airflow-constraints.txt
	PYTHON=$(PYTHON) scripts/setup_airflow.sh venv $(AIRFLOW_VENV)
	touch $@

airflow-setup: setup airflow-venv
	SPARK_MASTER='$(SPARK_MASTER)' scripts/setup_airflow.sh home

# One run of the retrain DAG for DATE (`airflow dags test`), on synthetic input written for that date.
airflow-run: airflow-setup
	$(PY) -m jobs.generate --config $(CONFIG) --set 'generate.output_url={work_dir}/input/ds=$(DATE)'
	SPARKML_DIST_CONFIG=$(CURDIR)/$(CONFIG) $(AIRFLOW_VENV)/bin/airflow dags test retrain $(DATE)

# A Spark standalone cluster on 127.0.0.1: a master and N one-core workers (PIDs and logs in work/cluster).
N ?= 2
CLUSTER_PORT ?= 7077
cluster-up: setup
	$(PY) -m sparkml_dist.cluster start --workers $(N) --port $(CLUSTER_PORT) --run-dir work/cluster
cluster-down:
	$(PY) -m sparkml_dist.cluster stop --run-dir work/cluster

# The MLflow UI on the store and artifact root of CONFIG (tracking.*), loopback only.
UI_PORT ?= 5000
mlflow-ui: setup
	$(PY) -m sparkml_dist.ui --config $(CONFIG) $(foreach s,$(SET),--set $(s)) --port $(UI_PORT)

# Benchmarks print one JSON object each (figures in README).
bench: setup
	$(PY) bench/partition.py
	$(PY) bench/loader.py
	$(PY) bench/allreduce.py
	$(PY) bench/compare.py
