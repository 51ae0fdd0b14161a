"""Shared fixtures: one local[2] SparkSession for the whole run, loopback only."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from sparkml_dist.config import SparkConfig
    from sparkml_dist.session import build_spark_session

    local_dir = tmp_path_factory.mktemp("spark-local")
    cfg = SparkConfig(
        master="local[2]",
        app_name="sparkml-dist-tests",
        log_level="ERROR",
        conf={
            "spark.ui.enabled": "false",
            "spark.sql.shuffle.partitions": "4",
            "spark.default.parallelism": "4",
            "spark.local.dir": str(local_dir),
            "spark.driver.memory": "2g",
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.driver.host": "127.0.0.1",
        },
    )
    session = build_spark_session(cfg)
    yield session
    session.stop()


def _petastorm_unusable() -> str | None:
    """Why Petastorm cannot run in this interpreter, or None (the readers' own check where it exists)."""
    try:
        from sparkml_dist.readers import petastorm_unusable
    except ImportError:
        try:
            import petastorm  # noqa: F401
        except Exception as exc:  # noqa: BLE001 (ImportError, or AttributeError from a removed pyarrow API)
            return f"import petastorm failed: {type(exc).__name__}: {exc}"
        return None
    return petastorm_unusable()


def pytest_runtest_setup(item: pytest.Item) -> None:
    # @pytest.mark.requires_petastorm: a test of Petastorm itself (not of training, which train.reader=auto
    # runs on the Arrow reader where Petastorm cannot import) is skipped with the reason on such a stack
    # (the modern one, `make test-modern`). Checked only when a marked test is about to run.
    if item.get_closest_marker("requires_petastorm") is not None:
        why = _petastorm_unusable()
        if why is not None:
            pytest.skip(f"requires Petastorm, which cannot run on this stack ({why})")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast", action="store_true",
        help="the edit loop's ring (make test-fast): only tests that need no Spark session and are not marked "
             "slow: config, strategies' maths on thread collectives, models, compressors, readers on files "
             "written without Spark, error messages",
    )  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that asks for the `spark` fixture, directly or through another fixture, starts a JVM and runs Spark
    # jobs (often a barrier stage of real ranks): the full ring's. Deselected, not skipped, so the count is honest.
    if not config.getoption("--fast"):
        return
    keep, drop = [], []
    for item in items:
        heavy = "spark" in getattr(item, "fixturenames", ()) or item.get_closest_marker("slow") is not None
        (drop if heavy else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
