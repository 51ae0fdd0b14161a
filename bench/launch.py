"""Seconds from job start to the first training step: our barrier launch vs horovod.spark.run.

    .venv/bin/python bench/launch.py [--repeats 3]

Both start 2 ranks on the same local[2] Spark; the clock starts just before the launch call on the
driver and stops when rank 0 enters the training function (after hvd.init). One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparkml_dist.config import LaunchConfig, SparkConfig  # noqa: E402
from sparkml_dist.runtime.launch import run_on_ranks  # noqa: E402
from sparkml_dist.runtime.session import build_spark_session  # noqa: E402


def first_step(_ctx=None) -> float:
    import horovod.torch as hvd
    import torch

    if not hvd.is_initialized():  # horovod.spark.run leaves hvd.init to the function; our launcher has done it
        hvd.init()
    hvd.allreduce(torch.zeros(1), name="first_step")  # the first collective = the first training step
    return time.time()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark = build_spark_session(
        SparkConfig(
            log_level="ERROR",
            conf={
                "spark.ui.enabled": "false",
                "spark.driver.host": "127.0.0.1",
                "spark.driver.bindAddress": "127.0.0.1",
            },
        )
    )
    barrier, hspark, error = [], [], None
    try:
        for _ in range(args.repeats):
            t0 = time.time()
            barrier.append(run_on_ranks(spark, first_step, 2, LaunchConfig(start_timeout_s=120)) - t0)
        try:
            import horovod.spark

            for _ in range(args.repeats):
                t0 = time.time()
                out = horovod.spark.run(first_step, num_proc=2, use_gloo=True, start_timeout=120, nics=["lo"])
                hspark.append(min(out) - t0)
        except Exception:  # report why the comparison could not run instead of failing the benchmark
            error = traceback.format_exc(limit=3)
    finally:
        spark.stop()
    result = {
        "benchmark": "launch",
        "barrier_first_step_s": [round(x, 2) for x in barrier],
        "horovod_spark_run_first_step_s": [round(x, 2) for x in hspark],
        "barrier_best_s": round(min(barrier), 2),
        "horovod_spark_run_best_s": round(min(hspark), 2) if hspark else None,
        "horovod_spark_run_error": error,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
