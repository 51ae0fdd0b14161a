"""Train on a partition output with Horovod ranks in one Spark barrier stage, tracked in MLflow.

spark-submit jobs/train.py --config conf/local.yaml --set train.epochs=5
python -m jobs.train --config conf/local.yaml --set train.model=mlp
# resume a run from its latest checkpoint:
python -m jobs.train --set train.resume_run_id=<run id>
"""

from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any

from jobs._cli import run_cli, run_job
from sparkml_dist.config import JobConfig
from sparkml_dist.fit import run_training
from sparkml_dist.runtime import session


def _body(cfg: JobConfig, spark: Any) -> dict[str, Any]:
    return asdict(run_training(spark, cfg, release_spark=functools.partial(session.release, spark)))


def main(argv: list[str] | None = None) -> dict:
    return run_job("Distributed training: Petastorm -> PyTorch -> Horovod in a Spark barrier stage.", argv, _body)


if __name__ == "__main__":
    run_cli(main)
