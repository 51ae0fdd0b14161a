# make run   -> set up (if needed) and run generate -> partition -> train on the embedded default
# make test-fast -> lint, types and the tests that need no Spark session (the edit loop, a few minutes)
# make test  -> set up (if needed) and run the whole test suite (what .ci/run calls), then the Spark-touching
#               core again on Spark 4.0 (test-spark4) and on the modern stack (test-modern)
# make docs  -> the docs site (MkDocs, mkdocs.yml) into site/, strict: a broken link or anchor, or a config field
#               without a docstring, fails it. make test and make test-fast build it too (seconds)
# SPARK=4.0 (any target)     -> the same on pyspark 4.0 in .venv-spark4.0, beside the default .venv (pyspark 3.5)
# STACK=modern (any target)  -> the same on today's releases in .venv-modern: pyspark 4.3, pyarrow 25, numpy 2,
#                               pandas 3, torch 2.14, no Petastorm (the Arrow reader); README "Stacks"
SHELL := /bin/bash
PYTHON ?= python3.11

# Two stacks, chosen at setup time, each in its own venv(s) so all can live side by side (README "Stacks"):
#   pinned (default): what Petastorm 0.12.1 runs on, pyarrow 14.0.2 / numpy 1.26 / pandas 2.2 / torch 2.13 CPU,
#     on one of two Spark lines (SPARK=3.5, the default, or 4.0).
#   modern: pyproject's requirements with scripts/stack-modern.txt's pins swapped in and petastorm dropped.
# pyproject.toml pins the default; a Spark line's or stack's differing pins sit in a pins file
# (scripts/spark-$(SPARK).txt, scripts/stack-modern.txt) and are swapped in by scripts/spark_requirements.py
# (pip cannot override a pin with a constraints file). The pinned stack offers only the Spark lines whose
# minimum pyarrow admits Petastorm's pyarrow 14.0.2 (README "Spark versions").
STACK ?= pinned
STACKS := pinned modern
SPARK ?= 3.5
SPARK_LINES := 3.5 4.0
ifeq ($(filter $(STACK),$(STACKS)),)
$(error STACK=$(STACK) is not supported: use one of $(STACKS) (pinned, the default, takes SPARK=3.5|4.0; modern is pyspark 4.3 without Petastorm, README "Stacks"))
endif
ifeq ($(STACK),modern)
ifneq ($(SPARK),3.5)
$(error SPARK=$(SPARK) picks a Spark line of the pinned stack; STACK=modern has its own pyspark (scripts/stack-modern.txt): leave SPARK out)
endif
VENV := .venv-modern
PINS := scripts/stack-modern.txt
else
ifeq ($(filter $(SPARK),$(SPARK_LINES)),)
$(error SPARK=$(SPARK) is not supported: use one of $(SPARK_LINES), or STACK=modern for pyspark 4.3 without Petastorm. pyspark 4.1 needs pyarrow >= 15 and 4.2+ pyarrow >= 18, which Petastorm cannot use (README "Spark versions", "Stacks"))
endif
ifeq ($(SPARK),3.5)
VENV := .venv
PINS :=
else
VENV := .venv-spark$(SPARK)
PINS := scripts/spark-$(SPARK).txt
endif
endif
# The torch Horovod is compiled against: pyproject's for the pinned stack, the pins file's for modern.
ifeq ($(STACK),modern)
TORCH_REQ = $(shell $(PYTHON) scripts/spark_requirements.py --get torch $(PINS))
else
TORCH_REQ := torch==2.13.0
endif
PY := $(VENV)/bin/python
CONFIG ?= conf/local.yaml
SET ?=
export SPARK_LOCAL_IP := 127.0.0.1
export PYSPARK_PYTHON := $(CURDIR)/$(PY)
export PYSPARK_DRIVER_PYTHON := $(CURDIR)/$(PY)

.PHONY: setup run test test-fast rings-setup test-spark4 test-modern lint docs bench clean mlflow-ui airflow-venv airflow-setup airflow-run cluster-up cluster-down
setup: $(VENV)/.stamp-project

# 1. torch and the horovod build tools first: horovod compiles against the installed torch. (The modern stack
#    redoes this when its pins file changes, so a new torch pin gets a Horovod built against it.)
$(VENV)/.stamp-base: $(if $(filter modern,$(STACK)),$(PINS))
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_REQ)" "setuptools>=77,<81" wheel "cmake>=3.27" packaging "cffi>=1.4.0"
	touch $@

# 2. horovod from source, patched (see the script's header), cached as a wheel in .cache/wheels/torch-<version>.
$(VENV)/.stamp-horovod: $(VENV)/.stamp-base scripts/build_horovod.sh
	scripts/build_horovod.sh $(VENV)
	touch $@

# 3. the project and the rest of the stack (with the dev and docs tools); horovod is already satisfied. For a
#    non-default Spark line or the modern stack: pyproject's requirements with the pins file's swapped in (or
#    dropped) and the docs group, then the project itself without its deps.
$(VENV)/.stamp-project: $(VENV)/.stamp-horovod pyproject.toml $(PINS)
ifeq ($(PINS),)
	$(PY) -m pip install --quiet -e ".[dev,docs]"
else
	$(PY) scripts/spark_requirements.py $(PINS) > $(VENV)/requirements.txt
	$(PY) scripts/spark_requirements.py --extra docs >> $(VENV)/requirements.txt
	$(PY) -m pip install --quiet -r $(VENV)/requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
endif
	touch $@

run: setup
	$(PY) -m jobs.main --config $(CONFIG) $(foreach s,$(SET),--set $(s))

test: setup airflow-venv
ifeq ($(VENV),.venv)
	$(MAKE) --no-print-directory rings-setup
endif
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(MAKE) --no-print-directory docs
	$(VENV)/bin/pytest -q --durations=25 tests
ifeq ($(VENV),.venv)
	$(MAKE) --no-print-directory test-spark4
	$(MAKE) --no-print-directory test-modern
endif

# The venvs of the two other rings below, set up side by side before any test runs (a failed setup stops CI
# at once; nothing else competes with the tests for the 2 cores): the Spark 4.0 one mostly installs wheels
# (its Horovod wheel is the default venv's, cached) while the modern one compiles Horovod against its own
# torch. Each one's output is printed when both are done, in order.
RING_LOGS := .cache/setup-logs
rings-setup:
	@mkdir -p $(RING_LOGS)
	@echo "setting up .venv-spark4.0 and .venv-modern side by side (output in $(RING_LOGS)/, printed when both end)"
	@$(MAKE) --no-print-directory SPARK=4.0 setup > $(RING_LOGS)/spark4.0.log 2>&1 & spark4=$$!; \
	  $(MAKE) --no-print-directory STACK=modern setup > $(RING_LOGS)/modern.log 2>&1 & modern=$$!; \
	  wait $$spark4; rc_spark4=$$?; wait $$modern; rc_modern=$$?; \
	  echo "== make SPARK=4.0 setup (rc $$rc_spark4)"; cat $(RING_LOGS)/spark4.0.log; \
	  echo "== make STACK=modern setup (rc $$rc_modern)"; cat $(RING_LOGS)/modern.log; \
	  test $$rc_spark4 -eq 0 && test $$rc_modern -eq 0

# The edit loop's ring: lint, types and the tests that need no Spark session (tests/conftest.py --fast: a test
# asking for the `spark` fixture, or marked slow, is deselected). CI runs `make test`.
test-fast: setup airflow-venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(MAKE) --no-print-directory docs
	$(VENV)/bin/pytest -q --fast tests

# The Spark-touching core runs again on two other stacks, each with the part of it that differs there (the
# whole suite runs on the default .venv first). Spark 4.0, the pinned stack's second line: launch, training,
# scoring, sparse vectors read in the JVM and built for MLlib by an Arrow map, Spark's libsvm source, and the
# README's local spark-submit block (it covers session.stop_spark_session on 4.x). The standalone-cluster
# block is left to the default run.
SPARK4_TESTS := tests/test_launch.py tests/test_train.py tests/test_score.py tests/test_baselines_sparse.py \
	tests/test_sparse.py::test_a_feature_hasher_vector_stays_sparse_and_exact \
	tests/test_sparse.py::test_libsvm_written_by_spark_trains_on_two_ranks \
	"tests/test_readme.py::test_readme_block_runs_as_written[local]"
test-spark4:
	$(MAKE) --no-print-directory SPARK=4.0 setup
	PYSPARK_PYTHON=$(CURDIR)/.venv-spark4.0/bin/python PYSPARK_DRIVER_PYTHON=$(CURDIR)/.venv-spark4.0/bin/python \
	  .venv-spark4.0/bin/pytest -q --durations=10 $(SPARK4_TESTS)

# The modern stack (.venv-modern, set up here if needed: its Horovod wheel is cached per torch version in
# .cache/wheels/torch-<version>): pyspark 4.3, pyarrow 25, numpy 2, pandas 3, torch 2.14 and no Petastorm, so
# train.reader=auto picks the Arrow reader and tests of Petastorm itself are skipped with the reason
# (tests/conftest.py, requires_petastorm). It runs what those versions touch: partitioning (Spark writes,
# pyarrow reads and fingerprints), barrier launch and training on both engines, feature-parallel blocks, the
# baselines and MLlib, dense and sparse layouts, scoring (pandas UDFs), the readers and the shard cache, the
# parameter server's lost worker, and `make run`'s main job as a subprocess with its console checked for
# deprecation noise (the warnings differ by stack). Left to the default run (and to Spark 4.0 where it lists
# them), to keep CI inside its limit: the README's spark-submit blocks and Spark's libsvm source (Spark 4.0
# runs both), and four tests that repeat a path kept here with another model or size (deselected below).
MODERN_TESTS := tests/test_partition.py tests/test_partition_stratified.py tests/test_launch.py tests/test_train.py \
	tests/test_feature_parallel.py tests/test_baselines.py tests/test_baselines_sparse.py tests/test_score.py \
	tests/test_readers.py tests/test_cache.py \
	tests/test_sparse.py::test_a_feature_hasher_vector_stays_sparse_and_exact \
	tests/test_ps.py::test_a_worker_killed_under_async_is_resubmitted_and_the_run_finishes \
	tests/test_console.py::test_main_job_console_has_no_deprecation_noise \
	--deselect tests/test_partition.py::test_wide_feature_groups_do_not_grow_the_generated_code \
	--deselect tests/test_feature_parallel.py::test_linear_regression_by_feature_blocks_equals_one_process_and_scores_values \
	--deselect tests/test_baselines.py::test_softmax_regression_for_several_classes \
	--deselect tests/test_baselines_sparse.py::test_mllib_lr_and_gd_learn_a_sparse_problem_in_a_wide_space
test-modern:
	$(MAKE) --no-print-directory STACK=modern setup
	PYSPARK_PYTHON=$(CURDIR)/.venv-modern/bin/python PYSPARK_DRIVER_PYTHON=$(CURDIR)/.venv-modern/bin/python \
	  .venv-modern/bin/pytest -q --durations=10 $(MODERN_TESTS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The docs site into site/ (open site/index.html). Strict: every warning fails, and mkdocs.yml's validation
# makes broken links and anchors warnings; the config reference page is generated by scripts/mkdocs_hooks.py.
# Needs no network. tests/test_docs.py builds it again into a temporary directory with its own checks.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf .venv .venv-spark* .venv-modern $(AIRFLOW_VENV) .cache work site

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
	$(PY) -m sparkml_dist.runtime.cluster start --workers $(N) --port $(CLUSTER_PORT) --run-dir work/cluster
cluster-down:
	$(PY) -m sparkml_dist.runtime.cluster stop --run-dir work/cluster

# The MLflow UI on the store and artifact root of CONFIG (tracking.*), loopback only.
UI_PORT ?= 5000
mlflow-ui: setup
	$(PY) -m sparkml_dist.experiments.ui --config $(CONFIG) $(foreach s,$(SET),--set $(s)) --port $(UI_PORT)

# Benchmarks print one JSON object each (figures in docs/benchmarks.md, headlines in the README).
bench: setup
	$(PY) bench/partition.py
	$(PY) bench/loader.py
	$(PY) bench/allreduce.py
	$(PY) bench/compare.py
