"""Register the evaluated candidate and move the champion alias if it wins (no Spark needed).

python -m jobs.promote --config conf/local.yaml --set promote.logical_date=2024-01-31 \
    [--set promote.metric=log_loss] [--set promote.min_improvement=0.001]
Needs jobs/evaluate.py to have run for the same date; rerunning for that date changes nothing.
"""

from __future__ import annotations

from dataclasses import asdict

from jobs._cli import emit, parse_config, run_cli
from sparkml_dist.experiments.promote import promote


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config("Promote the evaluated candidate for one logical date.", argv)
    summary = asdict(promote(cfg))
    emit(summary)
    return summary


if __name__ == "__main__":
    run_cli(main)
