"""The only place that builds a SparkSession."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import uuid
from pathlib import Path

from pyspark import SparkConf, SparkContext
from pyspark.sql import SparkSession

from sparkml_dist.config import LaunchConfig, SparkConfig

log = logging.getLogger("sparkml_dist.session")  # its pre-move name: logging configs keep working

SPARK_LOCAL_IP = "SPARK_LOCAL_IP"
LOCAL_DIRS = "sparkml-dist-spark"
"""Under the system temp dir: one ``<pid>-<id>`` scratch dir (``spark.local.dir``) per local-master driver."""
_LOCAL_DIR: dict[str, Path] = {}
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


MASTER_TIMEOUT_S = 10.0
_MASTER = re.compile(r"local(\[(\d+|\*)(,\d+)?\])?|local-cluster\[\d+,\d+,\d+\]|spark://.+|yarn|k8s://.+|mesos://.+")


def check_master(master: str, timeout_s: float = MASTER_TIMEOUT_S) -> None:
    """Fail in seconds on a malformed master URL or a standalone master nobody answers at.

    Spark's standalone client otherwise retries its registration for about a minute and then leaves a
    SparkContext whose jobs never get executors.
    """
    if not _MASTER.fullmatch(master):
        raise ValueError(
            f"spark.master={master!r} is not a Spark master URL: use local[N], local[N,F], spark://HOST:PORT, "
            "yarn or k8s://https://HOST:PORT"
        )
    if not master.startswith("spark://"):
        return
    errors = []
    for hostport in master[len("spark://") :].split(","):
        host, _, port = hostport.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=timeout_s).close()
            return
        except (OSError, ValueError) as exc:
            errors.append(f"{hostport}: {exc}")
    raise ConnectionError(
        f"spark.master={master!r}: no standalone master answered within {timeout_s:g} s ({'; '.join(errors)}); "
        "start it (sbin/start-master.sh) or fix spark.master"
    )


BARRIER_TIMEOUT = "spark.barrier.sync.timeout"


def barrier_timeout_s(launch: LaunchConfig) -> int:
    """Spark's barrier ``allGather``/``barrier()`` wait (its default: a year). Ours gather the ranks'
    addresses at start and hold the rendezvous until every rank is done: as long as a start or a collective
    may take, plus a minute."""
    return int(max(launch.start_timeout_s, launch.collective_timeout_s)) + 60


def build_spark_session(cfg: SparkConfig, launch: LaunchConfig | None = None) -> SparkSession:
    """Return the SparkSession for a job.

    Under spark-submit the session spark-submit configured is used as it is: its master and every conf key
    it set win, and only keys it left unset are filled from ``cfg.conf``. Run directly (python -m jobs.x,
    tests), a session is built from ``cfg.master`` and ``cfg.conf``. ``spark.barrier.sync.timeout`` is
    ``barrier_timeout_s(launch)`` unless set.
    """
    builder = SparkSession.builder.appName(cfg.app_name)
    defaults = {**_DEFAULTS, BARRIER_TIMEOUT: f"{barrier_timeout_s(launch or LaunchConfig())}s"}
    wanted = {**defaults, **cfg.conf}
    if under_spark_submit():
        # spark-submit's settings live in its JVM's system properties; a SparkConf made before the gateway
        # is up sees none of them (it would then let the YAML's spark.driver.host=127.0.0.1 replace the
        # --conf a cluster submit gave). _ensure_initialized only connects to the gateway spark-submit opened.
        SparkContext._ensure_initialized()
        existing = SparkConf()
        wanted = {k: v for k, v in wanted.items() if not existing.contains(k)}
    else:
        check_master(cfg.master)
        builder = builder.master(cfg.master)
        if cfg.master.startswith("local"):
            # Loopback only for the embedded default: nothing listens on a public interface.
            os.environ.setdefault(SPARK_LOCAL_IP, "127.0.0.1")
            # Local Python workers run the driver's interpreter (the project venv), not the system one.
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            if "spark.local.dir" not in wanted and SparkSession.getActiveSession() is None:
                wanted["spark.local.dir"] = str(_own_local_dir())
    for key, value in wanted.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.log_level)
    return spark


def _own_local_dir() -> Path:
    """A scratch dir for this driver's Spark (shuffle files, blocks), named by its pid; and the sweep of
    those whose driver is gone. A SIGKILLed driver cannot remove its own (Spark's shutdown hook never runs),
    so the next local driver on the machine removes it: scratch outlives a killed driver until then."""
    if "path" in _LOCAL_DIR and _LOCAL_DIR["path"].is_dir():  # a second session of this process
        return _LOCAL_DIR["path"]
    root = Path(tempfile.gettempdir()) / LOCAL_DIRS
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        pid = old.name.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed %s, the Spark scratch dir of driver pid %s, which is gone", old, pid)
    mine = root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    mine.mkdir()
    _LOCAL_DIR["path"] = mine
    return mine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


_RELEASING: dict[int, tuple[threading.Thread, list[BaseException]]] = {}
"""Sessions a job handed back early (``release``), by id: the thread stopping each, and what it raised."""
_OWNED: set[int] = set()
"""Sessions a job built and stops itself (``own``): only these may be released early."""
RELEASE_JOIN_S = 120.0
"""The longest ``stop_spark_session`` waits for an early stop to finish."""


def own(spark: SparkSession) -> None:
    """``spark`` was built by this job, which will stop it (``jobs._cli.run_job``); a caller's session (tests,
    the Estimator, a notebook) is never marked, so ``release`` leaves it running."""
    _OWNED.add(id(spark))


def release(spark: SparkSession) -> None:
    """The job needs ``spark`` no more (training is over; what is left is logging the model and the run): a
    session the job owns starts stopping now, on a thread, so the JVM's stop overlaps the driver's remaining
    work instead of following it (issue 31: ~1.7 s of a ~28 s job). ``stop_spark_session`` then waits for it
    and raises what the stop raised. A session the job does not own is left alone."""
    key = id(spark)
    if key not in _OWNED or key in _RELEASING:
        return
    errors: list[BaseException] = []

    def stop() -> None:
        try:
            _stop(spark)
        except BaseException as exc:  # noqa: BLE001 (handed to the joining thread)
            errors.append(exc)

    thread = threading.Thread(target=stop, name="spark-stop", daemon=True)
    _RELEASING[key] = (thread, errors)
    thread.start()
    log.debug("Spark session released: stopping while the run is logged")


def stop_spark_session(spark: SparkSession) -> None:
    """Stop ``spark`` (or wait for the stop ``release`` started); under spark-submit also release what would
    keep its JVM from exiting.

    Spark 3.5's BarrierTaskContext holds one JVM-wide, non-daemon ``java.util.Timer``. With a local master
    the barrier tasks run inside the driver JVM, so after a training stage that thread keeps spark-submit
    alive forever once the job has returned. Cancelling it after Spark is stopped lets the JVM exit.
    Spark 4.0 made that field a daemon ``ScheduledThreadPoolExecutor`` (checked in 4.0.5's bytecode), which
    never holds the JVM: it is left alone.
    """
    key = id(spark)
    _OWNED.discard(key)
    early = _RELEASING.pop(key, None)
    if early is None:
        _stop(spark)
        return
    thread, errors = early
    thread.join(RELEASE_JOIN_S)
    if thread.is_alive():
        raise TimeoutError(f"Spark did not stop within {RELEASE_JOIN_S:.0f} s of the job releasing it")
    if errors:
        raise errors[0]


def _stop(spark: SparkSession) -> None:
    jvm = spark.sparkContext._jvm
    spark.stop()
    own = _LOCAL_DIR.pop("path", None)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)
    if under_spark_submit() and jvm is not None:
        module = getattr(getattr(jvm.org.apache.spark, "BarrierTaskContext$"), "MODULE$")
        timer = getattr(module, "org$apache$spark$BarrierTaskContext$$timer")()
        if timer.getClass().getName() == "java.util.Timer":
            timer.cancel()
