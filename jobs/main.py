"""The main job: generate -> partition -> train on one SparkSession, end to end (what `make run` runs).

python -m jobs.main --config conf/local.yaml [--set train.epochs=5 ...]
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict
from typing import Any

from jobs._cli import run_cli, run_job
from sparkml_dist.config import JobConfig
from sparkml_dist.data.partition import partition
from sparkml_dist.data.synthetic import write_dataset
from sparkml_dist.experiments.ui import page_url
from sparkml_dist.fit import run_training
from sparkml_dist.metrics import PRIMARY
from sparkml_dist.runtime import session

log = logging.getLogger(__name__)


def _body(cfg: JobConfig, spark: Any) -> dict[str, Any]:
    generated = write_dataset(spark, cfg.generate)
    log.info("generated %d rows at %s", generated.rows, generated.output_url)
    parts = partition(spark, cfg)
    log.info("partitioned into %d shards: %s", len(parts.train_rows), parts.manifest_url)
    trained = run_training(spark, cfg, release_spark=functools.partial(session.release, spark))
    key = f"val_{PRIMARY[cfg.data.task]}"
    log.info(
        "MLflow run %s: final %s %.4f\nOpen the MLflow UI with `make mlflow-ui`, then %s (experiment %r).",
        trained.run_id, key, trained.final.get(key, float("nan")),
        page_url(5000, trained.experiment_id, trained.run_id), cfg.tracking.experiment,
    )  # fmt: skip
    return {"generate": generated.to_dict(), "partition": asdict(parts), "train": asdict(trained)}


def main(argv: list[str] | None = None) -> dict:
    return run_job("Generate, partition and train end to end.", argv, _body)


if __name__ == "__main__":
    run_cli(main)
