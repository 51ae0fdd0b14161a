"""Score the candidate training run and the current champion on the validation split; record both.

spark-submit jobs/evaluate.py --config conf/local.yaml --set promote.logical_date=2024-01-31
python -m jobs.evaluate --config conf/local.yaml --set promote.logical_date=2024-01-31 \
    [--set promote.candidate_run_id=<run id>] [--set promote.registered_model=sparkml-dist]
Then jobs/promote.py with the same --set values decides. Rerunning for the same date reuses its run.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from jobs._cli import run_cli, run_job
from sparkml_dist.config import JobConfig
from sparkml_dist.experiments.promote import evaluate


def _body(cfg: JobConfig, spark: Any) -> dict[str, Any]:
    return asdict(evaluate(spark, cfg))


def main(argv: list[str] | None = None) -> dict:
    return run_job("Evaluate the candidate and the champion for one logical date.", argv, _body)


if __name__ == "__main__":
    run_cli(main)
