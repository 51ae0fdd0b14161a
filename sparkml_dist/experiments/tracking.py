"""MLflow: the only module that imports mlflow.

The driver creates the run (params, tags) before the barrier stage starts, so a bad tracking URI fails
before any training; rank 0 logs per-epoch metrics into that run from its executor; the driver logs the
final model and plots when the stage returns. A resumed or retried run keeps logging into the same run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sparkml_dist.config import JobConfig, TrackingConfig
from sparkml_dist.errors import InfraError
from sparkml_dist.experiments import spool
from sparkml_dist.experiments.metric_names import flat_key, mlflow_key

if TYPE_CHECKING:
    from sparkml_dist.data.manifest import Manifest

log = logging.getLogger("sparkml_dist.tracking")  # its pre-move name: logging configs keep working

MODEL_NAME = "model"
# MLflow 3's UI opens an experiment in the view its kind names; without the tag it guesses (GenAI, here)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
RUN_KEY_TAG = "run_key"


class TrackingError(InfraError):
    """The tracking server cannot be reached or the run cannot be found."""


@dataclass(frozen=True)
class RunHandle:
    """What a rank needs to log into the driver's run (picklable, shipped to executors)."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    spool_url: str = ""
    """Where metrics wait while the tracking server is unreachable (``spool``); empty = no spool (a failed
    log raises, as MLflow's client does)."""


def _client(uri: str) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def warm(run: RunHandle) -> None:
    """Import MLflow and open ``run``'s client before the first log needs it; a local store (sqlite, file)
    is also read once (the run), which opens it. A server is not asked: during an outage that would wait
    out MLflow's retries."""
    client = _client(run.tracking_uri)
    if not spool.is_server(run.tracking_uri):
        client.get_run(run.run_id)


def _ensure_local_dirs(cfg: TrackingConfig) -> None:
    if cfg.tracking_uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(cfg.tracking_uri[len("sqlite:///") - 1 :]) or ".", exist_ok=True)
    if cfg.artifact_url.startswith("file://"):
        os.makedirs(cfg.artifact_url[len("file://") :], exist_ok=True)


def does_not_exist(exc: BaseException) -> bool:
    """True only when MLflow answered "no such run / model / version / alias".

    Everything else (a server that does not answer, a permission error, a broken database) is a failure to
    ask, and must never read as "nothing there": a champion that could not be read is not "no champion".
    """
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    # the SQL registry answers a missing alias with INVALID_PARAMETER_VALUE "Registered model alias X not found."
    return exc.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc.message)


def store_failure(tracking_uri: str, what: str, exc: BaseException) -> TrackingError:
    """The error for a lookup that failed for another reason than "does not exist"."""
    return TrackingError(
        f"could not read {what} from the MLflow store {tracking_uri}: {_first_line(exc)}. The store did not "
        "answer, so nothing is known about it (this is not 'not found'): check the server is up and reachable "
        "(make mlflow-ui for the local one) and run the job again"
    )


PREFLIGHT_TIMEOUT_S = 5.0


def preflight(uri: str, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
    """An http(s) tracking server must accept a connection within ``timeout_s``: MLflow's own client
    retries with back-off for minutes, which would only surface after the Spark job was set up."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=timeout_s).close()
    except OSError as exc:
        raise TrackingError(
            f"MLflow tracking server tracking.tracking_uri={uri!r} is unreachable ({exc}); start it "
            "(make mlflow-ui) or fix tracking.tracking_uri"
        ) from exc


def ensure_experiment(cfg: TrackingConfig) -> str:
    """Experiment id for cfg.experiment, created if needed. Fails fast if the store is unreachable."""
    _ensure_local_dirs(cfg)
    preflight(cfg.tracking_uri)
    client = _client(cfg.tracking_uri)
    try:
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is not None:
            if EXPERIMENT_KIND_TAG not in exp.tags:  # a kind someone chose is kept
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return str(exp.experiment_id)
        return str(
            client.create_experiment(
                cfg.experiment, artifact_location=cfg.artifact_url, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        )
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
            if not does_not_exist(exc):
                raise store_failure(cfg.tracking.tracking_uri, f"run {resume_run_id!r}", exc) from exc
            raise TrackingError(
                f"train.resume_run_id={resume_run_id!r} is not a run in {cfg.tracking.tracking_uri}"
            ) from exc
        client.update_run(resume_run_id, status="RUNNING")
        return RunHandle(cfg.tracking.tracking_uri, run.info.experiment_id, resume_run_id)
    key = cfg.tracking.run_key
    if key:  # a rerun for the same key replaces the earlier runs of this kind: one run per kind and key
        for old in keyed_runs(cfg.tracking, kind):
            client.delete_run(old)
        tags = {**tags, RUN_KEY_TAG: key}
    run = client.create_run(
        experiment_id, run_name=cfg.tracking.run_name, tags={**standard_tags(), "kind": kind, **tags}
    )
    params = [(k, v[:6000]) for k, v in cfg.flat().items()]
    from mlflow.entities import Param

    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params[i : i + 100]])
    client.log_text(run.info.run_id, cfg.dump(), "config.yaml")
    return RunHandle(cfg.tracking.tracking_uri, experiment_id, run.info.run_id)


def standard_tags() -> dict[str, str]:
    """MLflow's own Source, User and Git commit tags (MlflowClient.create_run does not fill them in, unlike
    mlflow.start_run): the program that ran, who ran it, and the project's commit when it is a git checkout."""
    import getpass
    import sys

    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (some containers): the tag is left out
        user = ""
    tags = {MLFLOW_SOURCE_NAME: sys.argv[0] or "python", MLFLOW_SOURCE_TYPE: "JOB"}
    if user:
        tags[MLFLOW_USER] = user
    commit = _project_commit()
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


@functools.lru_cache(maxsize=1)
def _project_commit() -> str:
    """The project checkout's git commit, asked once per process ('' when it is not a checkout or there is
    no git: then no commit tag)."""
    import subprocess

    project = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        done = subprocess.run(
            ["git", "-C", project, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def log_dataset(
    run: RunHandle, *, name: str, source_url: str, digest: str, profile: dict[str, Any], context: str
) -> None:
    """Record what a run read as an MLflow dataset input (the run page's Datasets section): where it is, a
    digest that is the same for two runs on the same data, and a profile (row counts, columns). Logging the
    same dataset again into a resumed run adds nothing."""
    import json
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    class _Profiled(MetaDataset):
        @property
        def profile(self) -> dict[str, Any]:
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile, sort_keys=True)}

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": the same class registered twice
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(source_url)
    dataset = _Profiled(source, name=name, digest=digest)._to_mlflow_entity()
    _client(run.tracking_uri).log_inputs(
        run.run_id, datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])]
    )


def log_manifest_input(run: RunHandle, manifest: Manifest, context: str) -> None:
    """The partition output a run read, as its MLflow dataset: the manifest's URL, its fingerprint as the
    digest, and the row counts per split and the columns as the profile."""
    from sparkml_dist.data.manifest import MANIFEST_NAME

    log_dataset(
        run,
        name=f"partition {manifest.root_url.rstrip('/').rsplit('/', 1)[-1]}",
        source_url=f"{manifest.root_url.rstrip('/')}/{MANIFEST_NAME}",
        digest=manifest.fingerprint,
        profile={
            "input_url": manifest.input_url,
            "input_rows": manifest.input_rows,
            "dropped_rows": manifest.dropped_rows,
            "train_rows": [s.rows for s in manifest.train],
            "validation_rows": manifest.validation.rows,
            "num_features": manifest.num_features,
            "num_classes": manifest.num_classes,
            "mode": manifest.mode,
            "seed": manifest.seed,
            "columns": manifest.schema,
        },
        context=context,
    )


def keyed_runs(cfg: TrackingConfig, kind: str) -> list[str]:
    """Ids of the experiment's live runs of ``kind`` tagged with ``cfg.run_key``, newest first ([] if no key)."""
    if not cfg.run_key:
        return []
    found = _search_runs(cfg, f"tags.kind = '{kind}' and tags.{RUN_KEY_TAG} = '{cfg.run_key}'", max_results=100)
    return [r.info.run_id for r in found]


def unfinished_runs(cfg: TrackingConfig, tag: str, value: str) -> list[tuple[str, str]]:
    """(run id, status) of the experiment's runs tagged ``tag=value`` that did not finish (RUNNING: its
    driver may have been killed; FAILED; KILLED), newest first."""
    found = _search_runs(cfg, f"tags.{tag} = '{value}' and attributes.status != 'FINISHED'", max_results=10)
    return [(r.info.run_id, r.info.status) for r in found]


def _search_runs(cfg: TrackingConfig, filter_string: str, max_results: int) -> list[Any]:
    """The experiment's live runs matching ``filter_string``, newest first."""
    return list(
        _client(cfg.tracking_uri).search_runs(
            [ensure_experiment(cfg)],
            filter_string=filter_string,
            order_by=["attributes.start_time DESC"],
            max_results=max_results,
        )
    )


def set_tags(run: RunHandle, tags: dict[str, str]) -> None:
    client = _client(run.tracking_uri)
    for k, v in tags.items():
        client.set_tag(run.run_id, k, v)


def log_metrics(
    run: RunHandle, metrics: dict[str, float], step: int, timestamp_ms: int | None = None, keep: bool = True
) -> None:
    """Log one step's metrics (rank 0 from its executor, or a baseline from the driver), each under its
    sectioned MLflow name (``metric_names.mlflow_key``: ``train_loss`` is ``train/loss`` in the UI).

    A run with a spool never waits on an unreachable tracking server: the batch is kept in the spool
    (``keep``; system samples are dropped instead) and delivered, oldest first, by the next log that finds
    the server up, or by ``settle`` at the end of the run."""
    import time

    ts = timestamp_ms or int(time.time() * 1000)
    rows = [(mlflow_key(k), float(v), ts, step) for k, v in metrics.items() if v is not None and np.isfinite(v)]
    if not rows:
        return
    if not _spooled(run):
        send_rows(run, rows)
        return
    if spool.reachable(run.tracking_uri):
        try:
            _deliver_spool(run)
            send_rows(run, rows)
            return
        except Exception:
            if spool.reachable(run.tracking_uri):
                raise  # the server answered and refused: not an outage
    if keep:
        where = spool.write(run.spool_url, rows)
        if not _OUTAGE["on"]:
            _OUTAGE["on"] = True
            log.warning(
                "tracking server %s does not answer: run %s's metrics are kept in %s until it is back (first: %s); "
                "training goes on",
                run.tracking_uri, run.run_id, run.spool_url, where.rsplit("/", 1)[-1],
            )  # fmt: skip


_OUTAGE = {"on": False}


def _spooled(run: RunHandle) -> bool:
    """Whether ``run``'s metrics go through its spool: it has one, and its store is a server."""
    return bool(run.spool_url) and spool.is_server(run.tracking_uri)


def in_outage(run: RunHandle) -> bool:
    """Whether ``run`` has a spool and its tracking server does not answer now."""
    return _spooled(run) and not spool.reachable(run.tracking_uri)


def send_rows(run: RunHandle, rows: list[tuple[str, float, int, int]]) -> None:
    """One ``log_batch`` of (MLflow key, value, timestamp ms, step) rows."""
    from mlflow.entities import Metric

    _client(run.tracking_uri).log_batch(run.run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in rows])


def _deliver_spool(run: RunHandle) -> None:
    if not spool.pending(run.spool_url):
        return
    sent = spool.deliver(run.spool_url, lambda rows: send_rows(run, rows))
    if sent:
        _OUTAGE["on"] = False
        # the same level as the warning that started the outage: whoever saw that one sees it end, also when
        # rank 0 delivers it from an executor (whose Python logs only warnings and worse)
        log.warning("tracking server %s is back: delivered %d kept metric batch(es) of run %s", run.tracking_uri,
                    sent, run.run_id)  # fmt: skip


def settle(run: RunHandle, wait_s: float, model_url: str) -> None:
    """The end of a run with a spool: wait up to ``wait_s`` for its tracking server, then deliver what the
    spool holds. If the server stays away, fail saying where the metrics and the trained model are."""
    import time

    if not _spooled(run):
        return
    deadline = time.monotonic() + wait_s
    warned = False
    while not spool.reachable(run.tracking_uri):
        if time.monotonic() > deadline:
            left = len(spool.pending(run.spool_url))
            raise TrackingError(
                f"the tracking server {run.tracking_uri} did not answer for tracking.outage_wait_s={wait_s:g} s at "
                f"the end of run {run.run_id}. Its metrics are kept in {run.spool_url} ({left} batch(es)): once "
                f"the server is back, `python -m sparkml_dist.spool {run.spool_url} --tracking-uri "
                f"{run.tracking_uri} --run-id {run.run_id}` delivers them. The trained model's state is in "
                f"{model_url} (the newest epoch-*.pt); the run stays RUNNING in MLflow."
            )
        if not warned:
            warned = True
            log.warning("tracking server %s does not answer: waiting up to %g s for it before logging run %s's "
                        "model", run.tracking_uri, wait_s, run.run_id)  # fmt: skip
        time.sleep(1.0)
    _deliver_spool(run)


def metric_history(run: RunHandle, key: str) -> list[tuple[int, float]]:
    """(step, value) of the metric logged as ``key`` (the flat name, as ``log_metrics`` was given it)."""
    return [(m.step, m.value) for m in _client(run.tracking_uri).get_metric_history(run.run_id, mlflow_key(key))]


def log_dict(run: RunHandle, data: dict, name: str, best_effort: bool = False) -> None:
    """Log ``data`` as the JSON artifact ``name``; ``best_effort``: during a tracking outage (a run with a
    spool whose server does not answer) skip it with a warning instead of failing the run."""
    if best_effort and in_outage(run):
        log.warning("artifact %s of run %s not logged: the tracking server %s does not answer", name, run.run_id,
                    run.tracking_uri)  # fmt: skip
        return
    _client(run.tracking_uri).log_dict(run.run_id, data, name)


def finish_run(run: RunHandle, status: str = "FINISHED") -> None:
    """Mark ``run`` ended. A FAILED mark is best effort: the error that failed the run is the one to raise
    (an unreachable server must not replace it)."""
    if status != "FINISHED" and in_outage(run):
        log.warning("run %s could not be marked %s: the tracking server %s does not answer", run.run_id, status,
                    run.tracking_uri)  # fmt: skip
        return
    _client(run.tracking_uri).set_terminated(run.run_id, status=status)


def log_torch_model(run: RunHandle, model: Any, example: np.ndarray) -> str:
    """Log ``model`` (features -> class probabilities, or [rows, 1] predicted values for regression) so
    mlflow.pyfunc can load it. Returns its URI."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        out = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, out)
    with _active(run):
        info = mlflow.pytorch.log_model(
            model, name=MODEL_NAME, signature=signature, input_example=example, pip_requirements=pip_requirements()
        )
    return str(info.model_uri)


SPARSE_METADATA_KEY = "sparkml_dist_sparse"
"""MLmodel metadata of a model trained on the sparse layout: its dimension and the input encoding."""


def log_sparse_model(
    run: RunHandle, first: Any, tail: Any, width: int, outputs: int, encoding: dict[str, Any], dimension: int
) -> str:
    """Log a model trained on the sparse layout as a pyfunc of ``sparse_pyfunc.py`` (loads without
    sparkml_dist): its first layer's weight [dimension, width] and bias as a tensor file, ``tail`` (first
    layer's output [rows, width] -> probabilities or value [rows, outputs]) as a torch.export program.
    The signature takes ``indices`` (list<long>) and ``values`` (list<double>: float32 and Python floats
    both convert safely) columns. Returns its URI."""
    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    from mlflow.types.schema import Array

    code = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serving", "sparse_pyfunc.py")
    signature = ModelSignature(
        inputs=Schema([ColSpec(Array("long"), "indices"), ColSpec(Array("double"), "values")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, outputs))]),
    )
    batch = torch.export.Dim("rows", min=1)
    with tempfile.TemporaryDirectory() as d:
        first_path, tail_path = os.path.join(d, "first_layer.pt"), os.path.join(d, "tail.pt2")
        weights = {"weight": first.weight.detach().cpu().contiguous(), "bias": first.bias.detach().cpu().contiguous()}
        torch.save(weights, first_path)
        example = torch.zeros(2, width)
        program = torch.export.export(tail.eval(), (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, tail_path)
        with _active(run):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=code,
                artifacts={"first_layer": first_path, "tail": tail_path},
                signature=signature,
                metadata={SPARSE_METADATA_KEY: {"dimension": dimension, "encoding": encoding}},
                pip_requirements=pip_requirements(),
            )
    return str(info.model_uri)


def pip_requirements() -> list[str]:
    """What serving the logged model needs, pinned to what trained it.

    Given explicitly because MLflow's inference of requirements loads the model in a subprocess: measured
    here, 55 s of a job's wall time against 1.7 s for the same log_model with the list given (2-core
    machine under load), and it pins torch with its local label (``+cpu``), which pip cannot install.
    """
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("mlflow", "torch", "cloudpickle", "numpy")]


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
    ax.set_ylabel("loss")
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
    """A finished run as the comparison needs it: tags, final metrics and metric histories, both under the
    flat names the code uses (``val_log_loss``, not MLflow's ``val/log_loss``)."""

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
        if not does_not_exist(exc):
            raise store_failure(cfg.tracking_uri, f"run {run_id!r}", exc) from exc
        raise TrackingError(f"run id {run_id!r} does not exist in {cfg.tracking_uri}") from exc
    hist = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, mlflow_key(k))] for k in keys}
    return RunRecord(
        run_id=run_id,
        kind=run.data.tags.get("kind", "unknown"),
        status=run.info.status,
        tags=dict(run.data.tags),
        metrics={flat_key(k): v for k, v in run.data.metrics.items()},
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


@contextlib.contextmanager
def system_metrics(run: RunHandle, node_id: str, interval_s: float) -> Iterator[None]:
    """Sample this process's host into ``run`` as system metrics ``system/<node_id>/...`` (MLflow's names:
    CPU and memory use, disk use, network bytes since the start; GPU memory where torch sees a GPU) every
    ``interval_s`` seconds while the block runs, and once more when it ends, so even a short run has one
    sample (0: off). A sampler thread of our own rather than MLflow's SystemMetricsMonitor, which stops for
    good at the first failed lookup of the run (a busy sqlite store under two ranks did exactly that).
    Best effort: a failed sample is skipped, never fails training."""
    if interval_s <= 0:
        yield
        return
    import threading

    import psutil

    prefix = f"system/{node_id}/"
    net0 = psutil.net_io_counters()
    psutil.cpu_percent(None)  # the first call only starts the CPU clock
    stop = threading.Event()
    step = [0]

    def sample() -> None:
        mem, net = psutil.virtual_memory(), psutil.net_io_counters()
        metrics = {
            "cpu_utilization_percentage": psutil.cpu_percent(None),
            "system_memory_usage_megabytes": (mem.total - mem.available) / 2**20,
            "system_memory_usage_percentage": mem.percent,
            "disk_usage_percentage": psutil.disk_usage("/").percent,
            "network_receive_megabytes": (net.bytes_recv - net0.bytes_recv) / 2**20,
            "network_transmit_megabytes": (net.bytes_sent - net0.bytes_sent) / 2**20,
        }
        metrics.update(_gpu_memory())
        try:
            log_metrics(run, {prefix + k: v for k, v in metrics.items()}, step=step[0], keep=False)
        except Exception as exc:  # noqa: BLE001 (a tracking hiccup: skip this sample)
            log.debug("system metrics sample of %s skipped: %s", node_id, exc)
        step[0] += 1

    def loop() -> None:
        while not stop.wait(interval_s):
            sample()

    thread = threading.Thread(target=loop, name=f"system-metrics-{node_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=max(interval_s, 5.0))
        sample()


def _gpu_memory() -> dict[str, float]:
    import sys

    torch = sys.modules.get("torch")  # only where the process already uses torch
    if torch is None or not torch.cuda.is_available():
        return {}
    return {
        f"gpu_{i}_memory_usage_megabytes": torch.cuda.memory_reserved(i) / 2**20
        for i in range(torch.cuda.device_count())
    }


def log_artifacts(run: RunHandle, local_dir: str) -> None:
    _client(run.tracking_uri).log_artifacts(run.run_id, local_dir)


# ------------------------------------------------------------------------ models: scoring and the registry


@dataclass(frozen=True)
class ModelSpec:
    """What a logged model takes and returns, read from its signature."""

    model_uri: str
    num_features: int
    """Width of the float32 input tensor [rows, num_features] (a sparse model: its dimension)."""
    num_classes: int
    """Width of the output: one probability per class (>= 2), or 1: a regression model's predicted value."""
    run_id: str | None
    encoding: dict[str, Any] | None = None
    """A model trained on the sparse layout: how its input columns become indices and values
    (``features.Encoding``); it then takes ``indices`` and ``values`` columns instead of a tensor."""

    @property
    def regression(self) -> bool:
        return self.num_classes == 1


@dataclass(frozen=True)
class ModelVersion:
    """One version of a registered model."""

    name: str
    version: str
    run_id: str | None
    source: str
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def run_model_uri(run_id: str) -> str:
    """URI of the model a training run logged."""
    return f"runs:/{run_id}/{MODEL_NAME}"


def model_spec(tracking_uri: str, model_uri: str) -> ModelSpec:
    """Resolve ``model_uri`` and read its signature; an unknown run, model, alias or version fails with the fix."""
    import mlflow

    client = _client(tracking_uri)
    _check_model_uri(client, tracking_uri, model_uri)
    try:
        info = mlflow.models.get_model_info(model_uri)
    except Exception as exc:
        if not does_not_exist(exc):
            raise store_failure(tracking_uri, f"model {model_uri!r}", exc) from exc
        raise TrackingError(
            f"model {model_uri!r} cannot be found in {tracking_uri} ({_first_line(exc)}); a training run logs "
            f"its model as {run_model_uri('<run id>')} unless tracking.log_model=false"
        ) from exc
    sig = info.signature
    sparse = (info.metadata or {}).get(SPARSE_METADATA_KEY)
    if sparse is not None and sig is not None and sig.outputs is not None:
        width = int(sig.outputs.inputs[0].shape[1])
        return ModelSpec(model_uri, int(sparse["dimension"]), width, info.run_id, dict(sparse["encoding"]))
    inputs = sig.inputs.inputs if sig is not None and sig.inputs is not None else []
    outputs = sig.outputs.inputs if sig is not None and sig.outputs is not None else []
    shapes = [tuple(getattr(s, "shape", None) or ()) for s in (*inputs, *outputs)]
    if len(inputs) != 1 or len(outputs) != 1 or any(len(s) != 2 for s in shapes):
        raise TrackingError(
            f"model {model_uri!r} has signature {sig}; scoring needs one float tensor [rows, features] in and "
            "class probabilities [rows, classes] or values [rows, 1] out (what tracking.log_torch_model logs)"
        )
    return ModelSpec(model_uri, int(shapes[0][1]), int(shapes[1][1]), info.run_id)


def _check_model_uri(client: Any, tracking_uri: str, model_uri: str) -> None:
    """Name what is missing for registry and run URIs before mlflow's own, vaguer, error."""
    if model_uri.startswith("runs:/"):
        run_id = model_uri[len("runs:/") :].split("/", 1)[0]
        try:
            client.get_run(run_id)
        except Exception as exc:
            if not does_not_exist(exc):
                raise store_failure(tracking_uri, f"run {run_id!r}", exc) from exc
            raise TrackingError(f"model {model_uri!r}: run {run_id!r} does not exist in {tracking_uri}") from exc
        return
    name, alias, version = _parse_registry_uri(model_uri)
    if name is None:
        return  # models:/<logged model id>: mlflow's error names it
    try:
        client.get_registered_model(name)
    except Exception as exc:
        if not does_not_exist(exc):
            raise store_failure(tracking_uri, f"registered model {name!r}", exc) from exc
        known = [m.name for m in client.search_registered_models(max_results=50)]
        raise TrackingError(
            f"model {model_uri!r}: no registered model {name!r} in {tracking_uri} (registered: {known}); "
            "run jobs/evaluate.py and jobs/promote.py first, or score a run's model with runs:/<run id>/model"
        ) from exc
    if alias is not None and get_alias(tracking_uri, name, alias) is None:
        aliases = sorted(client.get_registered_model(name).aliases)
        raise TrackingError(
            f"model {model_uri!r}: registered model {name!r} has no alias {alias!r} (aliases: {aliases}); "
            "jobs/promote.py sets the champion alias"
        )
    if version is not None:
        try:
            client.get_model_version(name, version)
        except Exception as exc:
            if not does_not_exist(exc):
                raise store_failure(tracking_uri, f"version {version!r} of {name!r}", exc) from exc
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
            raise TrackingError(
                f"model {model_uri!r}: registered model {name!r} has no version {version!r} (versions: {versions})"
            ) from exc


def _parse_registry_uri(model_uri: str) -> tuple[str | None, str | None, str | None]:
    """(name, alias, version) of models:/name@alias or models:/name/version; (None, ...) for a model id."""
    body = model_uri[len("models:/") :].strip("/") if model_uri.startswith("models:/") else ""
    if "@" in body:
        name, _, alias = body.partition("@")
        return name, alias, None
    if "/" in body:
        name, _, version = body.partition("/")
        return name, None, version
    return None, None, None


def model_udf(spark: Any, model_uri: str) -> Any:
    """A vectorised Spark UDF: array<float> features column -> array<float> class probabilities.

    The model is fetched once on the driver and shipped to the executors, which run it in their own Python
    (the project's pinned stack), not in a per-model environment.
    """
    import mlflow

    return mlflow.pyfunc.spark_udf(spark, model_uri, result_type="array<float>", env_manager="local")


def load_model(tracking_uri: str, model_uri: str) -> Any:
    """The model as an mlflow.pyfunc model (predict: float32 [rows, features] -> probabilities)."""
    import mlflow

    _client(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri)


def _version(mv: Any) -> ModelVersion:
    return ModelVersion(mv.name, str(mv.version), mv.run_id or None, str(mv.source), dict(mv.tags or {}))


def get_alias(tracking_uri: str, name: str, alias: str) -> ModelVersion | None:
    """The version ``alias`` points at, or None when the model or the alias does not exist.

    Any other failure (unreachable server, broken registry) raises TrackingError: reading it as "no champion"
    would promote the candidate as the first model.
    """
    client = _client(tracking_uri)
    try:
        return _version(client.get_model_version_by_alias(name, alias))
    except Exception as exc:
        if does_not_exist(exc):
            return None
        raise store_failure(tracking_uri, f"alias {name}@{alias}", exc) from exc


def find_model_version(tracking_uri: str, name: str, run_id: str) -> ModelVersion | None:
    """The oldest version of ``name`` registered from ``run_id``, or None."""
    client = _client(tracking_uri)
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return _version(min(found, key=lambda v: int(v.version))) if found else None


def register_model(tracking_uri: str, name: str, run_id: str, tags: dict[str, str]) -> ModelVersion:
    """Register the model of ``run_id`` as a new version of ``name`` (created if needed)."""
    import mlflow

    _client(tracking_uri)
    # The run's model is an MLflow 3 logged model (models:/<model id>); registering that URI directly keeps the
    # run id on the version without mlflow's "no artifacts at 'model'" fallback warning.
    source = mlflow.models.get_model_info(run_model_uri(run_id)).model_uri
    mv = mlflow.register_model(source, name, await_registration_for=300, tags=tags)
    return _version(mv)


def set_alias(tracking_uri: str, name: str, alias: str, version: str) -> None:
    _client(tracking_uri).set_registered_model_alias(name, alias, version)


def set_version_tags(tracking_uri: str, mv: ModelVersion, tags: dict[str, str]) -> None:
    client = _client(tracking_uri)
    for k, v in tags.items():
        client.set_model_version_tag(mv.name, mv.version, k, v)


def find_runs(cfg: TrackingConfig, tags: dict[str, str], finished_only: bool = False) -> list[str]:
    """Ids of the configured experiment's runs with all of ``tags``, newest first."""
    experiment_id = ensure_experiment(cfg)
    clauses = [f"tags.{k} = '{v}'" for k, v in tags.items()]
    if finished_only:
        clauses.append("attributes.status = 'FINISHED'")
    runs = _client(cfg.tracking_uri).search_runs(
        [experiment_id], filter_string=" and ".join(clauses), order_by=["attributes.start_time DESC"], max_results=100
    )
    return [r.info.run_id for r in runs]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
