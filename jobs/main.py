"""The main job: generate -> partition -> train on one SparkSession, end to end (what `make run` runs).

python -m jobs.main --config conf/local.yaml [--set train.epochs=5 ...]
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

from jobs._cli import run_cli, run_job
from sparkml_dist.config import JobConfig
from sparkml_dist.fit import run_training
from sparkml_dist.metrics import PRIMARY
from sparkml_dist.partition import partition
from sparkml_dist.synthetic import write_dataset


def _body(cfg: JobConfig, spark: Any) -> dict[str, Any]:
    generated = write_dataset(spark, cfg.generate)
    print(f"generated {generated.rows} rows at {generated.output_url}", file=sys.stderr)
    parts = partition(spark, cfg)
    print(f"partitioned into {len(parts.train_rows)} shards: {parts.manifest_url}", file=sys.stderr)
    trained = run_training(spark, cfg)
    key = f"val_{PRIMARY[cfg.data.task]}"
    print(
        f"\nMLflow run {trained.run_id}: final {key} {trained.final.get(key, float('nan')):.4f}"
        f"\nOpen the MLflow UI with `make mlflow-ui` (http://127.0.0.1:5000), experiment {cfg.tracking.experiment!r}.",
        file=sys.stderr,
    )
    return {"generate": generated.to_dict(), "partition": asdict(parts), "train": asdict(trained)}


def main(argv: list[str] | None = None) -> dict:
    return run_job("Generate, partition and train end to end.", argv, _body)


if __name__ == "__main__":
    run_cli(main)
