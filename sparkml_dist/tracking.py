"""MLflow: the only module that imports mlflow.

The driver creates the run (params, tags) before the barrier stage starts, so a bad tracking URI fails
before any training; rank 0 logs per-epoch metrics into that run from its executor; the driver logs the
final model and plots when the stage returns. A resumed or retried run keeps logging into the same run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparkml_dist.config import JobConfig, TrackingConfig

MODEL_NAME = "model"


class TrackingError(RuntimeError):
    """The tracking server cannot be reached or the run cannot be found."""


@dataclass(frozen=True)
class RunHandle:
    """What a rank needs to log into the driver's run (picklable, shipped to executors)."""

    tracking_uri: str
    experiment_id: str
    run_id: str


def _client(uri: str) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _ensure_local_dirs(cfg: TrackingConfig) -> None:
    if cfg.tracking_uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(cfg.tracking_uri[len("sqlite:///") - 1 :]) or ".", exist_ok=True)
    if cfg.artifact_url.startswith("file://"):
        os.makedirs(cfg.artifact_url[len("file://") :], exist_ok=True)


def ensure_experiment(cfg: TrackingConfig) -> str:
    """Experiment id for cfg.experiment, created if needed. Fails fast if the store is unreachable."""
    _ensure_local_dirs(cfg)
    client = _client(cfg.tracking_uri)
    try:
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is not None:
            return str(exp.experiment_id)
        return str(client.create_experiment(cfg.experiment, artifact_location=cfg.artifact_url))
    except Exception as exc:  # mlflow raises many kinds (requests, sqlalchemy, MlflowException)
        raise TrackingError(
            f"MLflow tracking store tracking.tracking_uri={cfg.tracking_uri!r} cannot be used: {exc}. "
            "Start the server (make mlflow-ui) or fix the URI."
        ) from exc


def start_run(cfg: JobConfig, tags: dict[str, str], kind: str, resume_run_id: str | None = None) -> RunHandle:
    """Create a run with the resolved config as params, or reopen ``resume_run_id``."""
    experiment_id = ensure_experiment(cfg.tracking)
    client = _client(cfg.tracking.tracking_uri)
    if resume_run_id:
        try:
            run = client.get_run(resume_run_id)
        except Exception as exc:
            raise TrackingError(
                f"train.resume_run_id={resume_run_id!r} is not a run in {cfg.tracking.tracking_uri}"
            ) from exc
        client.update_run(resume_run_id, status="RUNNING")
        return RunHandle(cfg.tracking.tracking_uri, run.info.experiment_id, resume_run_id)
    run = client.create_run(experiment_id, run_name=cfg.tracking.run_name, tags={"kind": kind, **tags})
    params = [(k, v[:6000]) for k, v in cfg.flat().items()]
    from mlflow.entities import Param

    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params[i : i + 100]])
    client.log_text(run.info.run_id, cfg.dump(), "config.yaml")
    return RunHandle(cfg.tracking.tracking_uri, experiment_id, run.info.run_id)


def set_tags(run: RunHandle, tags: dict[str, str]) -> None:
    client = _client(run.tracking_uri)
    for k, v in tags.items():
        client.set_tag(run.run_id, k, v)


def log_metrics(run: RunHandle, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
    """Log one step's metrics (rank 0 from its executor, or a baseline from the driver)."""
    import time

    from mlflow.entities import Metric

    ts = timestamp_ms or int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None and np.isfinite(v)]
    _client(run.tracking_uri).log_batch(run.run_id, metrics=batch)


def metric_history(run: RunHandle, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in _client(run.tracking_uri).get_metric_history(run.run_id, key)]


def log_dict(run: RunHandle, data: dict, name: str) -> None:
    _client(run.tracking_uri).log_dict(run.run_id, data, name)


def finish_run(run: RunHandle, status: str = "FINISHED") -> None:
    _client(run.tracking_uri).set_terminated(run.run_id, status=status)


def log_torch_model(run: RunHandle, model: Any, example: np.ndarray) -> str:
    """Log ``model`` (mapping features -> class probabilities) so mlflow.pyfunc can load it. Returns its URI."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        out = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, out)
    with _active(run):
        info = mlflow.pytorch.log_model(model, name=MODEL_NAME, signature=signature, input_example=example)
    return str(info.model_uri)


def log_plot(run: RunHandle, history: list[dict[str, float]], keys: tuple[str, ...], name: str) -> None:
    """A PNG of the given per-epoch metrics against epoch, logged as an artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    for key in keys:
        ax.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("log-loss")
    ax.legend()
    ax.grid(alpha=0.3)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        _client(run.tracking_uri).log_artifact(run.run_id, path)


@contextlib.contextmanager
def _active(run: RunHandle) -> Iterator[None]:
    import mlflow

    mlflow.set_tracking_uri(run.tracking_uri)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run.run_id:
        yield
        return
    with mlflow.start_run(run_id=run.run_id, nested=active is not None):
        yield


@dataclass(frozen=True)
class RunRecord:
    """A finished run as the comparison needs it: tags, final metrics and metric histories."""

    run_id: str
    kind: str
    status: str
    tags: dict[str, str]
    metrics: dict[str, float]
    histories: dict[str, list[tuple[int, float]]]
    start_ms: int
    end_ms: int | None


def get_run_record(cfg: TrackingConfig, run_id: str, keys: tuple[str, ...]) -> RunRecord:
    client = _client(cfg.tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise TrackingError(f"run id {run_id!r} does not exist in {cfg.tracking_uri}") from exc
    hist = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}
    return RunRecord(
        run_id=run_id,
        kind=run.data.tags.get("kind", "unknown"),
        status=run.info.status,
        tags=dict(run.data.tags),
        metrics=dict(run.data.metrics),
        histories={k: sorted(v) for k, v in hist.items()},
        start_ms=int(run.info.start_time),
        end_ms=int(run.info.end_time) if run.info.end_time else None,
    )


def latest_runs_by_kind(cfg: TrackingConfig, data_fingerprint: str) -> list[str]:
    """Newest FINISHED run id of each kind (tag) on one data fingerprint, in the configured experiment."""
    experiment_id = ensure_experiment(cfg)
    client = _client(cfg.tracking_uri)
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.data_fingerprint = '{data_fingerprint}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=500,
    )
    newest: dict[str, str] = {}
    for run in runs:
        kind = run.data.tags.get("kind")
        if kind and kind != "comparison" and kind not in newest:
            newest[kind] = run.info.run_id
    return list(newest.values())


def log_artifacts(run: RunHandle, local_dir: str) -> None:
    _client(run.tracking_uri).log_artifacts(run.run_id, local_dir)
