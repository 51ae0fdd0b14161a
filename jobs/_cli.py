"""What every job shares: argv -> config, one SparkSession, and a JSON summary as the last stdout line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from sparkml_dist.config import ConfigError, JobConfig, load_config


def parse_config(description: str, argv: list[str] | None) -> JobConfig:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="conf/local.yaml", help="YAML config (default: conf/local.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.epochs=5 (repeatable)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, overrides=args.set)
    except ConfigError as exc:
        parser.exit(2, f"config error: {exc}\n")
    if args.print_config:
        print(cfg.dump())
        sys.exit(0)
    return cfg


def run_job(description: str, argv: list[str] | None, body: Callable[[JobConfig, Any], dict[str, Any]]) -> dict:
    """Parse the config, build the session, run ``body(cfg, spark)``, stop Spark, print the summary.

    A session that was already active (a caller's, e.g. the tests') is used and left running.
    """
    from pyspark.sql import SparkSession

    from sparkml_dist.session import build_spark_session, stop_spark_session

    cfg = parse_config(description, argv)
    owned = SparkSession.getActiveSession() is None
    spark = build_spark_session(cfg.spark)
    try:
        summary = body(cfg, spark)
    finally:
        if owned:
            stop_spark_session(spark)
    emit(summary)
    return summary


def emit(summary: dict[str, Any]) -> None:
    """The job's result as one JSON object, the last line on stdout (schedulers parse it)."""
    sys.stdout.flush()
    print(json.dumps(summary, default=str), flush=True)
