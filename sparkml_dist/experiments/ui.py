"""The MLflow UI and REST server on the project's own tracking store, bound to loopback only.

python -m sparkml_dist.ui --config conf/local.yaml [--set ...] [--port 5000]    (what `make mlflow-ui` runs)

Why the server needs nothing but the store: the jobs create their experiment with an explicit artifact
location (``tracking.artifact_url``, a file:// URL in conf/local.yaml), so every run's artifact URI is
absolute and the server reads it directly. ``--default-artifact-root`` and ``--artifacts-destination``
point at the same directory, so an experiment created from the UI lands there too and nothing is written
to the working directory. A tracking URI that is already a server (http://...) is refused: open it instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from sparkml_dist.config import ConfigError, TrackingConfig, load_config
from sparkml_dist.experiments import tracking

HOST = "127.0.0.1"
DB_SCHEMES = ("sqlite:", "postgresql", "mysql", "mssql")


def server_command(cfg: TrackingConfig, port: int, workers: int = 1) -> list[str]:
    """argv of ``mlflow server`` on cfg's store and artifact root, listening on 127.0.0.1:port."""
    if not cfg.tracking_uri.startswith(DB_SCHEMES):
        raise ConfigError(
            f"tracking.tracking_uri={cfg.tracking_uri!r} is not a database the server can serve "
            f"({', '.join(DB_SCHEMES)}); if it is already a tracking server, open it in a browser"
        )
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    if not mlflow_bin.exists():
        raise FileNotFoundError(f"{mlflow_bin} not found: run `make setup` (mlflow is in the project's venv)")
    return [
        str(mlflow_bin),
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--backend-store-uri",
        cfg.tracking_uri,
        "--default-artifact-root",
        cfg.artifact_url,
        "--artifacts-destination",
        cfg.artifact_url,
        "--workers",
        str(workers),
    ]


ML_VIEW = "workflowType=machine_learning"
"""MLflow 3.17's UI keeps one GenAI / Model-training switch per browser (default GenAI) and ignores the
experiment's ``mlflow.experimentKind`` tag while the switch exists; this query parameter selects the
model-training view (Training runs, Model metrics) for the page it opens, and the browser keeps it."""


def page_url(port: int, experiment_id: str, run_id: str | None = None, host: str = HOST) -> str:
    """The UI page of an experiment (or one of its runs), opened in the model-training view."""
    run = f"/runs/{run_id}" if run_id else ""
    return f"http://{host}:{port}/#/experiments/{experiment_id}{run}?{ML_VIEW}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(
    cfg: TrackingConfig, port: int = 0, timeout_s: float = 180.0, log_path: Path | None = None
) -> Iterator[str]:
    """Start ``mlflow server`` on cfg's store, wait until it answers, yield its base URL, stop it on exit."""
    tracking.ensure_experiment(cfg)  # creates the store's tables first, so the server does not race them
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(server_command(cfg, port), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(url, proc, timeout_s, log_path)
        yield url
    finally:
        stop_server(proc)
        if log_path:
            log.close()  # type: ignore[union-attr]


def wait_until_ready(url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path | None = None) -> None:
    """Poll ``url``/health until it answers 200; fail if the process exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path else "(no log)"
            raise RuntimeError(f"mlflow server exited with code {proc.returncode} before answering:\n{tail}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} did not answer /health within {timeout_s:.0f}s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM the server's process group (uvicorn and its workers), SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the MLflow UI on the project's tracking store (loopback).")
    parser.add_argument("--config", default="conf/local.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set).tracking
        cmd = server_command(cfg, args.port, args.workers)
    except (ConfigError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    experiment_id = tracking.ensure_experiment(cfg)
    print(
        f"MLflow UI: {page_url(args.port, experiment_id)}  "
        f"(store {cfg.tracking_uri}, artifacts {cfg.artifact_url}); Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    os.execv(cmd[0], cmd)  # the server replaces this process: Ctrl-C and `kill` reach it directly


if __name__ == "__main__":
    main()
