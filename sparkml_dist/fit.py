"""Driver side of a training job: manifest -> MLflow run -> barrier stage -> logged model.

Order matters for failing fast: the manifest is verified and the tracking store reached before any
Spark task starts; the run is created only then, and it is marked FAILED if the stage fails.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from pyspark.sql import SparkSession

from sparkml_dist import tracking
from sparkml_dist.config import JobConfig
from sparkml_dist.launch import run_on_ranks
from sparkml_dist.loader import steps_per_epoch
from sparkml_dist.manifest import Manifest, read_manifest
from sparkml_dist.models import ProbabilityModel, build_model
from sparkml_dist.train import TrainJob, train_rank

PROGRESS_POLL_S = 2.0


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

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def run_training(spark: SparkSession, cfg: JobConfig) -> TrainResult:
    """Train cfg.train.model on the manifest's shards with one Horovod rank per shard."""
    started = time.monotonic()
    manifest = read_manifest(cfg.train.manifest_url)
    world = manifest.num_shards
    steps = steps_per_epoch(manifest, cfg.train.batch_size, world, cfg.train.max_steps_per_epoch)
    tracking.ensure_experiment(cfg.tracking)  # unreachable tracking fails here, before any task
    sc = spark.sparkContext
    tags = {
        "spark_app_id": sc.applicationId,
        "manifest_fingerprint": manifest.fingerprint,
        "data_fingerprint": manifest.input_fingerprint,
        "world_size": str(world),
        "launcher": f"spark-barrier+horovod-gloo ({cfg.launch.backend})",
        "model": cfg.train.model,
    }
    run = tracking.start_run(cfg, tags, kind="allreduce", resume_run_id=cfg.train.resume_run_id)
    checkpoint_url = f"{cfg.train.runs_url.rstrip('/')}/{run.run_id}/checkpoints"
    tracking.set_tags(run, {"checkpoint_url": checkpoint_url})
    job = TrainJob(cfg.train, cfg.launch, manifest, run, checkpoint_url, steps)
    print(
        f"training run {run.run_id} ({world} ranks, {steps} steps/epoch, {cfg.train.epochs} epochs) "
        f"tracked in {run.tracking_uri}",
        file=sys.stderr,
    )
    stop = threading.Event()
    progress = threading.Thread(target=_show_progress, args=(run, cfg.train.epochs, stop), daemon=True)
    progress.start()
    try:
        out = run_on_ranks(
            spark,
            functools.partial(train_rank, job=job),
            world,
            cfg.launch,
            description=f"train {cfg.train.model} on {world} Horovod ranks (run {run.run_id})",
        )
    except BaseException:
        tracking.finish_run(run, "FAILED")
        raise
    finally:
        stop.set()
        progress.join(timeout=5)
    if out is None:  # rank 0 always returns its state; None means the launcher lost it
        tracking.finish_run(run, "FAILED")
        raise RuntimeError(f"rank 0 returned no result for run {run.run_id}")
    model_uri = _log_outcome(run, cfg, manifest, out)
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


def assemble_model(cfg: JobConfig, manifest: Manifest, state_dict: dict[str, np.ndarray]) -> torch.nn.Module:
    model = build_model(cfg.train, manifest.num_features, manifest.num_classes)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
    return model.eval()


def _log_outcome(run: tracking.RunHandle, cfg: JobConfig, manifest: Manifest, out: dict[str, Any]) -> str | None:
    history = out["history"]
    tracking.log_dict(run, {"history": history, "steps_per_epoch": out["steps_per_epoch"]}, "history.json")
    if out["start_epoch"]:
        tracking.set_tags(run, {"resumed_from_epoch": str(out["start_epoch"])})
    if history:
        tracking.log_plot(run, history, ("train_loss", "val_log_loss"), "loss_curve.png")
    if not cfg.tracking.log_model:
        return None
    model = ProbabilityModel(assemble_model(cfg, manifest, out["state_dict"])).eval()
    example = np.random.default_rng(0).standard_normal((5, manifest.num_features)).astype(np.float32)
    return tracking.log_torch_model(run, model, example)


def _show_progress(run: tracking.RunHandle, epochs: int, stop: threading.Event) -> None:
    """Print each finished epoch (loss, rows/s, time left) as rank 0 logs it to MLflow."""
    shown = 0
    while not stop.wait(PROGRESS_POLL_S):
        try:
            losses = tracking.metric_history(run, "val_log_loss")
            rates = dict(tracking.metric_history(run, "rows_per_s"))
            times = dict(tracking.metric_history(run, "epoch_s"))
        except Exception:  # progress is best effort; the stage's own errors are what matter
            continue
        for step, loss in sorted(losses):
            if step <= shown:
                continue
            shown = step
            per_epoch = float(np.mean(list(times.values()))) if times else 0.0
            eta = per_epoch * (epochs - step)
            print(
                f"  epoch {step}/{epochs}  val_log_loss {loss:.4f}  {rates.get(step, 0):,.0f} rows/s  ~{eta:.0f}s left",
                file=sys.stderr,
                flush=True,
            )
