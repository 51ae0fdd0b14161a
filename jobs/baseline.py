"""Iterative-MapReduce and Spark MLlib baselines on a partition output, one MLflow run per kind.

spark-submit jobs/baseline.py --config conf/local.yaml --set baselines.kinds=[gd,mllib_lr]
python -m jobs.baseline --set baselines.target_log_loss=0.35 --set baselines.time_cap_s=600
"""

from __future__ import annotations

from typing import Any

from jobs._cli import run_cli, run_job
from sparkml_dist.baselines import run_baselines
from sparkml_dist.config import JobConfig


def _body(cfg: JobConfig, spark: Any) -> dict[str, Any]:
    results = run_baselines(spark, cfg)
    return {
        "manifest_url": cfg.train.manifest_url,
        "tracking_uri": cfg.tracking.tracking_uri,
        "experiment": cfg.tracking.experiment,
        "baselines": [r.summary() for r in results],
    }


def main(argv: list[str] | None = None) -> dict:
    return run_job("MapReduce baselines (gd, sgd, averaging) and Spark MLlib on a partition output.", argv, _body)


if __name__ == "__main__":
    run_cli(main)
