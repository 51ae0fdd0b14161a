"""Driver side of a training job: manifest -> MLflow run -> barrier stage -> logged model.

Order matters for failing fast: the manifest is verified and the tracking store reached before any
Spark task starts; the run is created only then, and it is marked FAILED if the stage fails.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from pyspark.sql import SparkSession

from sparkml_dist.config import PS_STRATEGY, CommConfig, JobConfig
from sparkml_dist.data import outputs
from sparkml_dist.data.manifest import Manifest, feature_tags, read_manifest
from sparkml_dist.data.partition import verify_pages
from sparkml_dist.experiments import spool, tracking
from sparkml_dist.experiments.metric_names import mlflow_key
from sparkml_dist.experiments.spool import SPOOL_DIR
from sparkml_dist.metrics import REGRESSION, primary_metric
from sparkml_dist.ps import driver as ps_driver
from sparkml_dist.runtime.launch import WorkerWarmup, job_deadline, run_on_ranks
from sparkml_dist.training import feature_parallel
from sparkml_dist.training.loader import steps_per_epoch
from sparkml_dist.training.model_size import check_model_size, count_parameters
from sparkml_dist.training.models import build_model, check_model_for_data, prediction_model, split_first_layer
from sparkml_dist.training.train import TrainJob, prepare_rank, prepare_worker, train_rank

log = logging.getLogger(__name__)

PROGRESS_POLL_S = 2.0
_LAUNCHERS = {
    "barrier": "spark-barrier+{collectives} (barrier)",  # launch.collectives: horovod or torch (torch.distributed)
    "in_process": "threads of the driver (in_process)",
}
TRAIN_FINGERPRINT_TAG = "train_fingerprint"


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    experiment_id: str
    model_uri: str | None
    world_size: int
    epochs: int
    resumed_from_epoch: int
    final: dict[str, float]
    seconds: float
    tracking_uri: str
    reused: bool = False
    """tracking.run_key already had a FINISHED run with the same training config and data: nothing was trained."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def run_training(spark: SparkSession, cfg: JobConfig, release_spark: Callable[[], None] | None = None) -> TrainResult:
    """Train cfg.train.model on the manifest's shards with one Horovod rank per shard.

    ``release_spark``: called once the ranks have finished, when this job needs Spark no more (a job that
    built its own session passes ``session.release``, which stops it while the run and model are logged)."""
    started = time.monotonic()
    manifest = read_manifest(cfg.train.manifest_url)
    by_feature = cfg.train.mode == "feature_parallel"  # one rank per feature group, not per sample shard
    if by_feature:
        world = feature_parallel.check_manifest(manifest, cfg.train)  # checks the model against the data too
        steps = feature_parallel.steps_per_epoch(manifest, cfg.train)
    else:
        check_model_for_data(cfg.train.model, manifest.num_classes)
        world = manifest.num_shards
        steps = steps_per_epoch(manifest, cfg.train.batch_size, world, cfg.train.max_steps_per_epoch)
    _check_model_fits(cfg, manifest, world if by_feature else 1)
    outputs.check_disjoint(
        "train.runs_url",
        cfg.train.runs_url,
        {"train.manifest_url": cfg.train.manifest_url, "data.input_url": cfg.data.input_url},
    )
    if cfg.train.verify_pages:
        verify_pages(spark, manifest)
    warmup = None
    if cfg.comm.strategy != PS_STRATEGY and cfg.launch.backend == "barrier":  # the driver opens MLflow meanwhile
        warmup = WorkerWarmup.start(spark, world, prepare_worker)
    experiment_id = tracking.ensure_experiment(cfg.tracking)  # unreachable tracking fails here, before any task
    sc = spark.sparkContext
    tags = {
        "spark_app_id": sc.applicationId,
        "manifest_fingerprint": manifest.fingerprint,
        "data_fingerprint": manifest.input_fingerprint,
        "world_size": str(world),
        "launcher": _LAUNCHERS[cfg.launch.backend].format(collectives=cfg.launch.collectives),
        "comm_strategy": cfg.comm.strategy,
        "comm_compression": cfg.comm.compression,
        "model": cfg.train.model,
        "mode": cfg.train.mode,
        **feature_tags(manifest),  # scoring picks the model's input columns by these names
    }
    kind = "feature_parallel" if by_feature else comm_kind(cfg.comm)
    if cfg.comm.strategy == PS_STRATEGY:
        ps_driver.check(cfg)
        kind = ps_driver.kind(cfg)
        tags["launcher"] = "spark-tasks+parameter-server (one job per worker)"
        tags["comm_pace"] = cfg.comm.pace if cfg.comm.pace == "async" else f"ssp(s={cfg.comm.staleness})"
    tags[TRAIN_FINGERPRINT_TAG] = train_fingerprint(cfg, manifest.fingerprint)
    resume_run_id = cfg.train.resume_run_id
    if not resume_run_id and cfg.tracking.run_key:  # a rerun or retry for the same key (e.g. logical date)
        previous = _previous_keyed_run(cfg, kind, tags[TRAIN_FINGERPRINT_TAG], manifest.num_classes)
        if previous is not None and previous.status == "FINISHED":
            log.info("run %s already trained this for %s; reusing it", previous.run_id, cfg.tracking.run_key)
            return _reused_result(cfg, previous, experiment_id, world, started, manifest.num_classes)
        resume_run_id = previous.run_id if previous is not None else None  # resume a failed attempt
    elif not resume_run_id:
        _say_how_to_resume(cfg, tags[TRAIN_FINGERPRINT_TAG])
    run = tracking.start_run(cfg, tags, kind=kind, resume_run_id=resume_run_id)
    tracking.log_manifest_input(run, manifest, context="training")
    run_dir = f"{cfg.train.runs_url.rstrip('/')}/{run.run_id}"
    checkpoint_url = f"{run_dir}/checkpoints"
    tracking.set_tags(run, {"checkpoint_url": checkpoint_url})
    run = dataclasses.replace(run, spool_url=f"{run_dir}/{SPOOL_DIR}")
    rows_per_rank = steps * cfg.train.batch_size + manifest.validation.rows / world  # what bounds an epoch
    launch_cfg = job_deadline(cfg.launch, cfg.train.epochs, rows_per_rank)
    job = TrainJob(cfg.train, launch_cfg, manifest, run, checkpoint_url, steps, cfg.comm, cfg.tracking.system_metrics_s)
    log.info(
        "training run %s (%d ranks, %d steps/epoch, %d epochs) tracked in %s",
        run.run_id, world, steps, cfg.train.epochs, run.tracking_uri,
    )  # fmt: skip
    stop = threading.Event()
    val_key = f"val_{primary_metric(manifest.num_classes)}"
    progress = threading.Thread(target=_show_progress, args=(run, cfg.train.epochs, val_key, stop), daemon=True)
    progress.start()
    try:
        out: dict[str, Any] | None
        if cfg.comm.strategy == PS_STRATEGY:
            out = ps_driver.train(spark, cfg, manifest, run, checkpoint_url, steps)
        else:
            out = run_on_ranks(
                spark,
                functools.partial(train_rank, job=job),
                world,
                launch_cfg,
                description=f"train {cfg.train.model} on {world} Horovod ranks (run {run.run_id})",
                on_retry=functools.partial(_note_restart, run),
                prepare=functools.partial(prepare_rank, job=job),
                warmup=warmup,
            )
    except BaseException:
        tracking.finish_run(run, "FAILED")
        raise
    finally:
        stop.set()
        progress.join(timeout=5)
    if release_spark is not None:  # what follows (the run's last metrics, the model) needs no Spark
        release_spark()
    try:
        if out is None:  # rank 0 always returns its state; None means the launcher lost it
            raise RuntimeError(f"rank 0 returned no result for run {run.run_id}")
        tracking.settle(run, cfg.tracking.outage_wait_s, checkpoint_url)  # metrics kept in an outage go in now
        if by_feature and cfg.tracking.log_model:  # the ranks' weight blocks -> one ordinary model
            out = {**out, "state_dict": feature_parallel.assemble_state_dict(manifest, out["block_urls"])}
        model_uri = _log_outcome(run, cfg, manifest, out)
        wall = {"job_wall_s": time.monotonic() - started, "steps_per_epoch": float(out["steps_per_epoch"])}
        tracking.log_metrics(run, wall, step=len(out["history"]))
    except BaseException:  # the driver's half failed: the run must not stay RUNNING
        tracking.finish_run(run, "FAILED")
        raise
    tracking.finish_run(run)
    history = out["history"]
    return TrainResult(
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        model_uri=model_uri,
        world_size=world,
        epochs=len(history),
        resumed_from_epoch=int(out["start_epoch"]),
        final={k: v for k, v in history[-1].items()} if history else {},
        seconds=round(time.monotonic() - started, 3),
        tracking_uri=run.tracking_uri,
    )


def _check_model_fits(cfg: JobConfig, manifest: Manifest, blocks: int) -> None:
    """Refuse, before any run or task, a model whose rank would not fit ``train.max_model_gib``: counted on
    torch's meta device (no memory), split over ``blocks`` ranks in feature-parallel mode."""
    params = count_parameters(cfg.train, manifest.num_features, manifest.num_classes, manifest.sparse is not None)
    what = f"feature dimension {manifest.num_features:,} of {manifest.root_url}"
    if blocks > 1:
        what += f", split over {blocks} feature-parallel ranks"
    check_model_size(cfg.train, -(-params // blocks), what)


def comm_kind(comm: CommConfig) -> str:
    """The run kind (tag) of a data-parallel run: its strategy, plus its compressor unless none
    (``allreduce``, ``allreduce+fp16``, ``local_sgd+topk``): the compare job shows one line per kind."""
    return comm.strategy if comm.compression == "none" else f"{comm.strategy}+{comm.compression}"


def _say_how_to_resume(cfg: JobConfig, fingerprint: str) -> None:
    """Without a run key a rerun starts afresh; if the same training (same train section, same manifest) was
    left unfinished (a killed driver leaves its run RUNNING), say which flag resumes it from its checkpoint.
    Not done automatically: a RUNNING run may belong to a job that is still alive."""
    left = tracking.unfinished_runs(cfg.tracking, TRAIN_FINGERPRINT_TAG, fingerprint)
    if left:
        run_id, status = left[0]
        log.warning(
            "run %s trained this same config on this manifest and did not finish (status %s); this job starts a "
            "new run. To resume that one from its last checkpoint instead (if no other job is running it), rerun "
            "with --set train.resume_run_id=%s (or set tracking.run_key to resume automatically)",
            run_id, status, run_id,
        )  # fmt: skip


def train_fingerprint(cfg: JobConfig, manifest_fingerprint: str) -> str:
    """Hash of what decides a training result: the train section (less resume_run_id) and the manifest."""
    spec = {**asdict(cfg.train), "resume_run_id": None, "manifest_fingerprint": manifest_fingerprint}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _previous_keyed_run(cfg: JobConfig, kind: str, fingerprint: str, num_classes: int) -> tracking.RunRecord | None:
    """The newest run for tracking.run_key if it trained the same thing; None (it will be replaced) otherwise."""
    found = tracking.keyed_runs(cfg.tracking, kind)
    if not found:
        return None
    record = tracking.get_run_record(cfg.tracking, found[0], (f"val_{primary_metric(num_classes)}",))
    return record if record.tags.get(TRAIN_FINGERPRINT_TAG) == fingerprint else None


def _reused_result(
    cfg: JobConfig, record: tracking.RunRecord, experiment_id: str, world: int, started: float, num_classes: int
) -> TrainResult:
    epochs = len(record.histories[f"val_{primary_metric(num_classes)}"])
    return TrainResult(
        run_id=record.run_id,
        experiment_id=experiment_id,
        model_uri=tracking.run_model_uri(record.run_id) if cfg.tracking.log_model else None,
        world_size=world,
        epochs=epochs,
        resumed_from_epoch=epochs,
        final=dict(record.metrics),
        seconds=round(time.monotonic() - started, 3),
        tracking_uri=cfg.tracking.tracking_uri,
        reused=True,
    )


def assemble_model(cfg: JobConfig, manifest: Manifest, state_dict: dict[str, np.ndarray]) -> torch.nn.Module:
    model = build_model(cfg.train, manifest.num_features, manifest.num_classes, manifest.sparse is not None)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
    return model.eval()


def _log_outcome(run: tracking.RunHandle, cfg: JobConfig, manifest: Manifest, out: dict[str, Any]) -> str | None:
    history = out["history"]
    tracking.log_dict(run, {"history": history, "steps_per_epoch": out["steps_per_epoch"]}, "history.json")
    if out["start_epoch"]:
        tracking.set_tags(run, {"resumed_from_epoch": str(out["start_epoch"])})
    if history:
        keys = ("train_loss", f"val_{primary_metric(manifest.num_classes)}")
        tracking.log_plot(run, history, keys, "loss_curve.png")
    if not cfg.tracking.log_model:
        return None
    if manifest.sparse is not None:
        first, tail = split_first_layer(assemble_model(cfg, manifest, out["state_dict"]))
        served = prediction_model(tail, manifest.num_classes)
        outputs = 1 if manifest.num_classes == REGRESSION else manifest.num_classes
        width = first.weight.shape[1]
        sparse = manifest.sparse
        return tracking.log_sparse_model(run, first, served, width, outputs, sparse.encoding, sparse.dimension)
    model = prediction_model(assemble_model(cfg, manifest, out["state_dict"]), manifest.num_classes)
    example = np.random.default_rng(0).standard_normal((5, manifest.num_features)).astype(np.float32)
    return tracking.log_torch_model(run, model, example)


def _note_restart(run: tracking.RunHandle, attempt: int, error: BaseException) -> None:
    """The stage is about to run again (a rank was lost or stalled): say so in the run, which goes on."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    tracking.set_tags(run, {"restarts": str(attempt), f"restart_{attempt}_reason": first[:4000]})
    log.warning("  restart %d: %s", attempt, first)


def _show_progress(run: tracking.RunHandle, epochs: int, val_key: str, stop: threading.Event) -> None:
    """Print each finished epoch (validation loss, rows/s, time left) as rank 0 logs it to MLflow; during a
    tracking outage, as rank 0 keeps it in the run's spool (so the console still shows progress). One last
    look once the stage has ended, so the final epoch is shown too."""
    shown = 0
    while True:
        ended = stop.wait(PROGRESS_POLL_S)
        try:
            found, kept = _epoch_metrics(run, (val_key, "rows_per_s", "epoch_s"))
        except Exception:  # progress is best effort; the stage's own errors are what matter
            found, kept = {}, False
        losses, rates, times = (found.get(k, {}) for k in (val_key, "rows_per_s", "epoch_s"))
        for step, loss in sorted(losses.items()):
            if step <= shown:
                continue
            shown = step
            per_epoch = float(np.mean(list(times.values()))) if times else 0.0
            eta = per_epoch * (epochs - step)
            where = "  (tracking server away: read from the run's spool)" if kept else ""
            log.info(
                f"  epoch {step}/{epochs}  {val_key} {loss:.4f}  {rates.get(step, 0):,.0f} rows/s  ~{eta:.0f}s left"
                f"{where}"
            )
        if ended:
            return


def _epoch_metrics(run: tracking.RunHandle, keys: tuple[str, ...]) -> tuple[dict[str, dict[int, float]], bool]:
    """(flat key -> {step: value}, whether they came from the spool): from MLflow, or while its server does not
    answer from the batches rank 0 keeps in the run's spool (asking MLflow then would wait out its retries)."""
    if not tracking.in_outage(run):
        return {k: dict(tracking.metric_history(run, k)) for k in keys}, False
    by_key = {mlflow_key(k): k for k in keys}
    out: dict[str, dict[int, float]] = {k: {} for k in keys}
    for key, value, _, step in spool.kept_rows(run.spool_url):
        if key in by_key:
            out[by_key[key]][step] = value
    return out, True
