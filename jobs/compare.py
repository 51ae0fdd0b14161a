"""Compare runs (AllReduce vs MapReduce baselines): table, plots and markdown report, logged to MLflow.

python -m jobs.compare --config conf/local.yaml --runs RUN_ID RUN_ID ...
python -m jobs.compare --config conf/local.yaml --data-fingerprint FP   # newest run of each kind
"""

from __future__ import annotations

import argparse
import os

from jobs._cli import emit, parse_config, run_cli
from sparkml_dist.compare import compare


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runs", nargs="*", default=[])
    parser.add_argument("--data-fingerprint", default=None)
    parser.add_argument("--target-log-loss", type=float, default=None, help="default: MLlib's final x 1.01")
    parser.add_argument("--out", default=None, help="default: {work_dir}/reports/compare")
    args, rest = parser.parse_known_args(argv)
    cfg = parse_config("Compare training runs.", rest)
    out = args.out or os.path.join(cfg.paths.work_dir, "reports", "compare")
    summary = compare(cfg, args.runs, args.data_fingerprint, args.target_log_loss, out)
    emit(summary)
    return summary


if __name__ == "__main__":
    run_cli(main)
