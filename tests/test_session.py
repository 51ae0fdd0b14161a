"""session.release: a job's own session stops on a thread while the run is logged; a caller's is never stopped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import threading
from pyspark import SparkContext
from sparkml_dist.config import SparkConfig
from sparkml_dist.runtime import session

spark = session.build_spark_session(SparkConfig(master="local[1]", conf={"spark.ui.enabled": "false"}))
session.release(spark)  # a session the job does not own (a caller's): left running
assert spark.range(3).count() == 3 and not [t for t in threading.enumerate() if t.name == "spark-stop"]
session.own(spark)
session.release(spark)
session.release(spark)  # twice: one stop
assert [t.name for t in threading.enumerate()].count("spark-stop") <= 1
session.stop_spark_session(spark)  # waits for the early stop
assert SparkContext._active_spark_context is None
assert not [t for t in threading.enumerate() if t.name == "spark-stop"]
print("stopped")
"""


@pytest.mark.slow  # a JVM of its own
def test_a_released_session_stops_on_a_thread_and_a_callers_session_is_left_alone() -> None:
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "stopped"
