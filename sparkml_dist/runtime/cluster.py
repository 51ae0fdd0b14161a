"""A Spark standalone cluster on this machine: one master and N workers on 127.0.0.1, from the venv's pyspark.

python -m sparkml_dist.cluster start --workers 2 [--port 7077] [--run-dir work/cluster]
python -m sparkml_dist.cluster status [--run-dir work/cluster]
python -m sparkml_dist.cluster stop   [--run-dir work/cluster]
python -m sparkml_dist.cluster package [--dest dist]       # dist/sparkml_dist.zip for --py-files

``start`` launches ``spark-class org.apache.spark.deploy.master.Master`` and N
``org.apache.spark.deploy.worker.Worker`` processes, each in its own process group, waits (with a timeout)
until the master's ``/json`` endpoint reports N alive workers, and records the master URL and the PIDs in
``<run dir>/cluster.json``. ``stop`` ends exactly those process groups (checked against the recorded
command line, so a reused PID is never signalled) and nothing else. Every daemon binds to 127.0.0.1.

``package_library`` zips ``sparkml_dist`` and ``jobs`` for ``spark-submit --py-files``: what executors on
a real cluster need besides the pinned stack.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparkml_dist.errors import InfraError

HOST = "127.0.0.1"
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
STATE_FILE = "cluster.json"
SPARK_HOME = "SPARK_HOME"
SPARK_LOCAL_IP = "SPARK_LOCAL_IP"
SPARK_LOCAL_DIRS = "SPARK_LOCAL_DIRS"
PYSPARK_PYTHON = "PYSPARK_PYTHON"
POLL_S = 0.5


class ClusterError(InfraError):
    """The cluster could not be started, reached or stopped; the message says why and what to do."""


@dataclass(frozen=True)
class ClusterInfo:
    """What ``start`` recorded: enough to submit to the cluster and to stop exactly its processes."""

    master_url: str
    webui_url: str
    run_dir: str
    master_pid: int
    worker_pids: list[int] = field(default_factory=list)
    cores_per_worker: int = 1
    memory_per_worker: str = "1g"

    @property
    def pids(self) -> list[int]:
        return [self.master_pid, *self.worker_pids]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def spark_home() -> Path:
    """The Spark distribution inside the installed pyspark (SPARK_HOME if set)."""
    if os.environ.get(SPARK_HOME):
        return Path(os.environ[SPARK_HOME])
    import importlib.util

    spec = importlib.util.find_spec("pyspark")
    if spec is None or spec.origin is None:
        raise ClusterError("pyspark is not installed in this interpreter; run `make setup` and use .venv/bin/python")
    return Path(spec.origin).parent


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_cluster(
    run_dir: str | Path,
    workers: int = 2,
    port: int = 0,
    webui_port: int = 0,
    cores: int = 1,
    memory: str = "1g",
    timeout_s: float = 120.0,
) -> ClusterInfo:
    """Start a master and ``workers`` workers; return once the master reports them all alive.

    ``port``/``webui_port`` 0 pick free ports. On any failure (timeout included) whatever was started is
    stopped again before the error is raised.
    """
    if workers < 1:
        raise ClusterError(f"workers must be >= 1, got {workers}")
    if cores < 1:
        raise ClusterError(f"cores per worker must be >= 1, got {cores}")
    run_path = Path(run_dir).absolute()
    state = run_path / STATE_FILE
    if state.exists():
        info = read_state(run_path)
        if any(_is_ours(pid) for pid in info.pids):
            raise ClusterError(
                f"a cluster from {state} is still running ({info.master_url}); stop it first "
                f"(python -m sparkml_dist.cluster stop --run-dir {run_path})"
            )
        state.unlink()
    run_path.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    webui_port = webui_port or free_port()
    master_url = f"spark://{HOST}:{port}"
    webui_url = f"http://{HOST}:{webui_port}"
    env = daemon_env(run_path)
    spark_class = str(spark_home() / "bin" / "spark-class")
    started: list[int] = []
    try:
        started.append(
            spawn(
                [spark_class, MASTER_CLASS, "--host", HOST, "--port", str(port), "--webui-port", str(webui_port)],
                env,
                run_path / "master.log",
            )
        )
        wait_for(lambda: master_json(webui_url) is not None, timeout_s, f"the master's web UI {webui_url}", run_path)
        for i in range(workers):
            work = run_path / f"worker-{i}"
            work.mkdir(exist_ok=True)
            cmd = [
                spark_class, WORKER_CLASS, master_url, "--host", HOST, "--cores", str(cores), "--memory", memory,
                "--webui-port", str(free_port()), "--work-dir", str(work),
            ]  # fmt: skip
            started.append(spawn(cmd, env, run_path / f"worker-{i}.log"))
        info = ClusterInfo(master_url, webui_url, str(run_path), started[0], started[1:], cores, memory)
        # Record the PIDs before waiting, so `stop` can end them even if this process is killed meanwhile.
        state.write_text(info.to_json())
        wait_for(
            lambda: alive_workers(webui_url) >= workers, timeout_s, f"{workers} alive workers at {webui_url}", run_path
        )
        return info
    except BaseException:
        _terminate(started, timeout_s=30)
        state.unlink(missing_ok=True)
        raise


def stop_cluster(run_dir: str | Path, timeout_s: float = 30.0) -> list[int]:
    """Stop the processes recorded in ``run_dir``; return the PIDs that were signalled."""
    run_path = Path(run_dir).absolute()
    if not (run_path / STATE_FILE).exists():
        return []
    info = read_state(run_path)
    # Workers first: a master that goes first makes them log reconnect errors.
    stopped = _terminate([*info.worker_pids, info.master_pid], timeout_s)
    (run_path / STATE_FILE).unlink(missing_ok=True)
    return stopped


def read_state(run_dir: str | Path) -> ClusterInfo:
    path = Path(run_dir).absolute() / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterError(
            f"no cluster recorded in {path}; start one with `python -m sparkml_dist.cluster start`"
        ) from None
    return ClusterInfo(**data)


def alive_workers(webui_url: str) -> int:
    """Number of ALIVE workers the master reports (0 if it cannot be reached)."""
    status = master_json(webui_url)
    if status is None:
        return 0
    return sum(1 for w in status.get("workers", []) if w.get("state") == "ALIVE")


@contextlib.contextmanager
def running_cluster(run_dir: str | Path, workers: int = 2, **kwargs: object) -> Iterator[ClusterInfo]:
    """``start_cluster`` as a context manager: the cluster is stopped on exit, whatever happened."""
    info = start_cluster(run_dir, workers, **kwargs)  # type: ignore[arg-type]
    try:
        yield info
    finally:
        stop_cluster(run_dir)


def package_library(dest_dir: str | Path, root: str | Path | None = None) -> Path:
    """Zip the ``sparkml_dist`` and ``jobs`` packages into ``dest_dir`` for ``spark-submit --py-files``."""
    src = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    out = Path(dest_dir).absolute() / "sparkml_dist.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for package in ("sparkml_dist", "jobs"):
            # sub-packages too (comm, ps, readers, ...): an executor without the install imports them from here
            files = sorted(f for f in (src / package).rglob("*.py") if "__pycache__" not in f.parts)
            if not files:
                raise ClusterError(f"no Python files in {src / package}; give the repository root")
            for f in files:
                zf.write(f, f.relative_to(src).as_posix())
    tmp.replace(out)  # never leave a half-written zip under the final name
    return out


# ------------------------------------------------------------------------------------------------ internals


def daemon_env(run_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env[SPARK_HOME] = str(spark_home())
    env[SPARK_LOCAL_IP] = HOST
    env[SPARK_LOCAL_DIRS] = str(run_path / "local")
    env.setdefault(PYSPARK_PYTHON, sys.executable)
    # No daemon reads conf/spark-env.sh from somewhere else on the machine.
    env["SPARK_CONF_DIR"] = str(run_path / "conf")
    (run_path / "conf").mkdir(exist_ok=True)
    return env


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def master_json(webui_url: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{webui_url}/json/", timeout=5) as resp:
            return dict(json.loads(resp.read()))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_for(ready: object, timeout_s: float, what: str, run_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():  # type: ignore[operator]
            return
        time.sleep(POLL_S)
    raise ClusterError(
        f"timed out after {timeout_s:.0f}s waiting for {what}; see the logs in {run_path} "
        "(Java 17 on PATH? a port taken?)"
    )


def _is_ours(pid: int) -> bool:
    """True if ``pid`` is alive and is a Spark master/worker (guards against signalling a reused PID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return MASTER_CLASS in cmdline or WORKER_CLASS in cmdline


def _terminate(pids: list[int], timeout_s: float) -> list[int]:
    """SIGTERM each recorded process group (the daemon and any executor it forked), SIGKILL after timeout."""
    ours = [pid for pid in pids if _is_ours(pid)]
    for pid in ours:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(pid) for pid in ours):
        time.sleep(POLL_S)
    for pid in ours:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    for pid in ours:
        _reap(pid)
    return ours


def _alive(pid: int) -> bool:
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our child (started in this process), so it is not a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# --------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A Spark standalone cluster on 127.0.0.1 from the venv's pyspark.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a master and N workers, wait until all are alive")
    start.add_argument("--workers", type=int, default=2, help="number of workers (default 2)")
    start.add_argument("--port", type=int, default=7077, help="master port (default 7077; 0 = a free one)")
    start.add_argument("--webui-port", type=int, default=8080, help="master web UI port (default 8080; 0 = free)")
    start.add_argument("--cores", type=int, default=1, help="cores per worker (default 1)")
    start.add_argument("--memory", default="1g", help="memory per worker (default 1g)")
    start.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the workers")
    for p in (start, sub.add_parser("stop", help="stop the recorded processes"), sub.add_parser("status")):
        p.add_argument("--run-dir", default="work/cluster", help="PIDs and logs (default work/cluster)")
    package = sub.add_parser("package", help="zip sparkml_dist + jobs for spark-submit --py-files")
    package.add_argument("--dest", default="dist", help="output folder (default dist)")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            info = start_cluster(
                args.run_dir, args.workers, args.port, args.webui_port, args.cores, args.memory, args.timeout
            )
            print(f"master {info.master_url}, web UI {info.webui_url}, {args.workers} workers", file=sys.stderr)
            print(info.to_json())
        elif args.command == "package":
            print(package_library(args.dest))
        elif args.command == "stop":
            stopped = stop_cluster(args.run_dir)
            print(json.dumps({"stopped_pids": stopped}))
        else:
            info = read_state(args.run_dir)
            alive = [pid for pid in info.pids if _is_ours(pid)]
            print(json.dumps({**asdict(info), "alive_pids": alive, "alive_workers": alive_workers(info.webui_url)}))
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
