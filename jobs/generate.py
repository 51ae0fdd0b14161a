"""Write a synthetic classification data set with a known true model.

spark-submit jobs/generate.py --config conf/local.yaml --set generate.rows=1000000
python -m jobs.generate --config conf/local.yaml
"""

from __future__ import annotations

from typing import Any

from jobs._cli import run_cli, run_job
from sparkml_dist.config import JobConfig
from sparkml_dist.data.synthetic import write_dataset


def _body(cfg: JobConfig, spark: Any) -> dict[str, Any]:
    return write_dataset(spark, cfg.generate).to_dict()


def main(argv: list[str] | None = None) -> dict:
    return run_job("Generate synthetic Parquet data with a known model.", argv, _body)


if __name__ == "__main__":
    run_cli(main)
