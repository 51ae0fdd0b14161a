"""Batch-score Parquet data with a logged or registered model; predictions are published atomically.

spark-submit jobs/score.py --config conf/local.yaml --set score.model_uri=models:/sparkml-dist@champion
python -m jobs.score --config conf/local.yaml \
    --set score.model_uri=runs:/<run id>/model \
    --set score.input_url=work/data/raw --set score.output_url=work/data/scores
# a partition output's validation split, keeping the label beside the predictions:
python -m jobs.score --set score.input_url=work/data/partitioned --set score.split=validation \
    --set "score.keep_cols=[label]"
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from jobs._cli import run_cli, run_job
from sparkml_dist.config import JobConfig
from sparkml_dist.serving.score import score


def _body(cfg: JobConfig, spark: Any) -> dict[str, Any]:
    return asdict(score(spark, cfg))


def main(argv: list[str] | None = None) -> dict:
    return run_job("Batch scoring with an MLflow model through a vectorised Spark UDF.", argv, _body)


if __name__ == "__main__":
    run_cli(main)
