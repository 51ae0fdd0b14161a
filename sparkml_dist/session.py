"""The only place that builds a SparkSession."""

from __future__ import annotations

import os
import sys

from pyspark import SparkConf
from pyspark.sql import SparkSession

from sparkml_dist.config import SparkConfig

SPARK_LOCAL_IP = "SPARK_LOCAL_IP"
# Set by spark-submit's PythonRunner in the driver's environment: then the JVM (and its master,
# resources and --conf values) already exists and wins.
PYSPARK_GATEWAY_PORT = "PYSPARK_GATEWAY_PORT"

_DEFAULTS = {
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
}


def under_spark_submit() -> bool:
    return PYSPARK_GATEWAY_PORT in os.environ


def build_spark_session(cfg: SparkConfig) -> SparkSession:
    """Return the SparkSession for a job.

    Under spark-submit the session spark-submit configured is used as it is: its master and every conf key
    it set win, and only keys it left unset are filled from ``cfg.conf``. Run directly (python -m jobs.x,
    tests), a session is built from ``cfg.master`` and ``cfg.conf``.
    """
    builder = SparkSession.builder.appName(cfg.app_name)
    wanted = {**_DEFAULTS, **cfg.conf}
    if under_spark_submit():
        existing = SparkConf()
        wanted = {k: v for k, v in wanted.items() if not existing.contains(k)}
    else:
        builder = builder.master(cfg.master)
        if cfg.master.startswith("local"):
            # Loopback only for the embedded default: nothing listens on a public interface.
            os.environ.setdefault(SPARK_LOCAL_IP, "127.0.0.1")
            # Local Python workers run the driver's interpreter (the project venv), not the system one.
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    for key, value in wanted.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    return spark
