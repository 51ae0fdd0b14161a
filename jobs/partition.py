"""Cut a Parquet data set into sample shards, a validation split and feature groups, with a manifest.

spark-submit jobs/partition.py --config conf/local.yaml --set partition.num_shards=4
python -m jobs.partition --config conf/local.yaml --set partition.mode=random_sample
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from jobs._cli import run_cli, run_job
from sparkml_dist.config import JobConfig
from sparkml_dist.data.partition import partition


def _body(cfg: JobConfig, spark: Any) -> dict[str, Any]:
    return asdict(partition(spark, cfg))


def main(argv: list[str] | None = None) -> dict:
    return run_job("Partition Parquet data into shards for distributed training.", argv, _body)


if __name__ == "__main__":
    run_cli(main)
