"""What step-level checkpoints cost: the default problem (conf/local.yaml) trained with
train.checkpoint_every_steps = 0 (epoch ends only), and at the intervals given, interleaved repeats.

    .venv/bin/python bench/checkpoint.py [--every 50 10] [--repeats 2]

Per interval: the mean step time (epoch_s / steps, from MLflow), the time the loop spent writing mid-epoch
checkpoints per step (metric checkpoint_s, measured around the writes) and that as a share of the rest of
the step (goal: <= 5% at the interval the README recommends); the step time against the runs without step
checkpoints is printed too, but on a 2-core machine its noise is larger than the effect. One JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _job(module: str, sets: list[str]) -> dict:
    args = [sys.executable, "-m", module, "--config", "conf/local.yaml"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--every", type=int, nargs="+", default=[50, 10])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work-dir", default="/tmp/sparkml-bench-checkpoint")
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from mlflow.tracking import MlflowClient

    from sparkml_dist.experiments.metric_names import mlflow_key

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    base = [f"paths.work_dir={work}", "tracking.log_model=false", "tracking.system_metrics_s=0"]
    _job("jobs.generate", base)
    _job("jobs.partition", base)
    runs: dict[int, list[dict]] = {0: [], **{n: [] for n in args.every}}
    for _ in range(args.repeats):
        for every in runs:
            t0 = time.monotonic()
            out = _job("jobs.train", [*base, f"train.checkpoint_every_steps={every}"])
            client = MlflowClient(out["tracking_uri"])
            epoch_s = [m.value for m in client.get_metric_history(out["run_id"], mlflow_key("epoch_s"))]
            saving = [m.value for m in client.get_metric_history(out["run_id"], mlflow_key("checkpoint_s"))]
            steps = int(client.get_run(out["run_id"]).data.metrics[mlflow_key("steps_per_epoch")])
            wall = round(time.monotonic() - t0, 1)
            runs[every].append({"epoch_s": epoch_s, "checkpoint_s": saving, "steps": steps, "wall_s": wall})
    result: dict = {"benchmark": "checkpoint", "repeats": args.repeats, "runs": {}}
    base_step = statistics.median(sum(r["epoch_s"]) / (len(r["epoch_s"]) * r["steps"]) for r in runs[0])
    for every, rs in runs.items():
        step_s = statistics.median(sum(r["epoch_s"]) / (len(r["epoch_s"]) * r["steps"]) for r in rs)
        # measured directly: the seconds the loop spent writing mid-epoch checkpoints, per step
        saving_s = statistics.median(sum(r["checkpoint_s"]) / (len(r["epoch_s"]) * r["steps"]) for r in rs)
        result["runs"][str(every)] = {
            "step_ms": round(step_s * 1000, 3),
            "checkpoint_ms_per_step": round(saving_s * 1000, 3),
            "overhead_pct": round(100 * saving_s / (step_s - saving_s), 2),
            "step_time_vs_no_checkpoints_pct": round(100 * (step_s / base_step - 1), 2) if every else 0.0,
            "steps_per_epoch": rs[0]["steps"],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
