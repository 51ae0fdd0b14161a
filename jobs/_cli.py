"""What every job shares: argv -> config, one SparkSession, a JSON summary as the last stdout line, and
errors a person can read.

``main(argv)`` of a job raises as a library call does (tests call it). Run as a program, a job goes
through ``run_cli``: a user error (bad input, config or path: ``errors.UserError``, or Spark refusing a
path) prints one short message (what, where, the fix) to stderr and exits with ``errors.EXIT_USER_ERROR``;
its traceback goes to the log at DEBUG (``--log-level DEBUG`` shows it). Anything unexpected keeps its
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from sparkml_dist.config import ConfigError, JobConfig, load_config
from sparkml_dist.errors import EXIT_USER_ERROR, SparkmlDistError, UserError, exit_code_of
from sparkml_dist.runtime.heartbeat import dump_stacks_on_signal

log = logging.getLogger("jobs")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_QUIET_SPARK_LOGGERS = ("org.apache.spark.executor.Executor", "org.apache.spark.scheduler.TaskSetManager")
"""Loggers that print a task's Java stack trace when it fails; in local mode that is the user's console,
and the failure reaches the job anyway (as a clean message when it is the user's)."""


class SparkUserError(UserError):
    """Spark refused the job for a reason the user can fix (a path that does not exist, ...)."""


QUIET_LOGGERS = ("py4j", "matplotlib", "petastorm")


class ConsoleFormatter(logging.Formatter):
    """Our INFO lines are what a person reads at the default level (stage banners, per-epoch progress, where
    the run is tracked): the message alone. Anything else (warnings, other libraries, DEBUG) says when, how
    bad and from where."""

    OURS = ("sparkml_dist", "jobs", "__main__")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name.split(".")[0] in self.OURS and not record.exc_info:
            return record.getMessage()
        return super().format(record)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ConsoleFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])
    logging.getLogger().setLevel(getattr(logging, level))
    # Libraries that log routine chatter at INFO (py4j's "Closing down clientserver connection" per gateway
    # call, matplotlib's font cache, petastorm's "Failed loading Unischema" for every plain Parquet dataset the
    # driver reads, e.g. the parameter server's validation split): shown only when the level asks for DEBUG.
    for chatty in QUIET_LOGGERS:
        logging.getLogger(chatty).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


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
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="log level of the job's own messages (default INFO); DEBUG also logs a user error's traceback",
    )
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        cfg = load_config(args.config, overrides=args.set)
    except ConfigError as exc:
        parser.exit(EXIT_USER_ERROR, f"config error: {exc}\n")
    if args.print_config:
        print(cfg.dump())
        sys.exit(0)
    return cfg


def run_job(description: str, argv: list[str] | None, body: Callable[[JobConfig, Any], dict[str, Any]]) -> dict:
    """Parse the config, build the session, run ``body(cfg, spark)``, stop Spark, print the summary.

    A session that was already active (a caller's, e.g. the tests') is used and left running.
    """
    from pyspark.sql import SparkSession

    from sparkml_dist.runtime.session import build_spark_session, own, stop_spark_session

    cfg = parse_config(description, argv)
    owned = SparkSession.getActiveSession() is None
    spark = build_spark_session(cfg.spark, cfg.launch)
    if owned:
        own(spark)  # the body may hand it back early (session.release) once it needs Spark no more
    if owned and logging.getLogger().level > logging.DEBUG:
        _quiet_task_failures(spark)
    try:
        summary = body(cfg, spark)
    finally:
        if owned:
            stop_spark_session(spark)
    emit(summary)
    return summary


def _quiet_task_failures(spark: Any) -> None:
    try:
        jvm = spark.sparkContext._jvm
        level = jvm.org.apache.logging.log4j.Level.OFF
        for name in _QUIET_SPARK_LOGGERS:
            jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(name, level)
    except Exception:  # noqa: BLE001 (another log4j: keep Spark's own logging as it is)
        log.debug("could not quiet Spark's task-failure loggers", exc_info=True)


def emit(summary: dict[str, Any]) -> None:
    """The job's result as one JSON object, the last line on stdout (schedulers parse it): NaN and
    infinities become null, so the line is strict JSON whatever a metric came out as."""
    sys.stdout.flush()
    print(json.dumps(json_safe(summary), default=str, allow_nan=False), flush=True)


def json_safe(value: Any) -> Any:
    """``value`` with every float that is NaN or infinite replaced by None (recursively)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def user_error_of(exc: BaseException) -> SparkmlDistError | None:
    """The user error ``exc`` is, or stands for (a Spark refusal the user can fix); None if it is neither."""
    if isinstance(exc, SparkmlDistError):
        return exc
    try:
        from pyspark.errors import AnalysisException
    except ImportError:  # pragma: no cover (pyspark is pinned)
        return None
    if isinstance(exc, AnalysisException):
        text = str(exc)
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        if "PATH_NOT_FOUND" in text or "Path does not exist" in text:
            return SparkUserError(f"{first}: fix the path in the config (--set section.key=...)")
        if "UNABLE_TO_INFER_SCHEMA" in text:
            return SparkUserError(f"{first}: the path holds no Parquet data; fix the path or write the data first")
        return None
    name = type(exc).__name__
    if name == "Py4JJavaError" and "java.io.FileNotFoundException" in str(exc):
        line = next((x for x in str(exc).splitlines() if "FileNotFoundException" in x), "a file is missing")
        return SparkUserError(f"{line.strip()}: a file was removed while the job ran, or the path is wrong")
    return None


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> NoReturn:
    """Run a job's ``main`` as a program: exit 0 on success; on a user error print it on a few lines and
    exit with its code (2); let anything unexpected raise with its traceback."""
    dump_stacks_on_signal()  # kill -USR1 <pid>: where every thread of a job that seems stuck is
    try:
        main(argv)
    except SystemExit:
        raise
    except BaseException as exc:
        user = user_error_of(exc)
        if user is None:
            raise
        log.debug("traceback of the error below", exc_info=exc)
        sys.stdout.flush()
        print(f"error: {type(user).__name__}: {user}", file=sys.stderr, flush=True)
        if not isinstance(exc, UserError):
            print("(details: re-run with --log-level DEBUG)", file=sys.stderr, flush=True)
        _skip_teardown_collection(argv)
        sys.exit(exit_code_of(user))
    _skip_teardown_collection(argv)
    sys.exit(0)


def _skip_teardown_collection(argv: list[str] | None) -> None:
    """The job is over and its process exits next: move every live object out of the garbage collector's
    reach. The interpreter's teardown otherwise runs full collections over torch's, MLflow's and PySpark's
    object graphs only to free memory the process is about to return: 1.1-1.5 s of every job's wall after its
    last line (measured 2026-12-07: 1.3 s -> 0.17 s with torch and MLflow imported; freezing in an atexit
    handler instead saves less, as handlers that run before it collect). Nothing else changes: objects still
    die by reference count (files close, atexit handlers and ``weakref.finalize`` run); only cyclic garbage,
    which the exit frees anyway, is left uncollected. Only for a program (``argv`` None, read from the command
    line): a caller that runs a job inside its own process with its own argv (the tests) keeps its collector."""
    if argv is None:
        import gc

        gc.freeze()
