"""AllReduce trainer vs the MapReduce baselines, each until it reaches MLlib's final log-loss x 1.01.

    .venv/bin/python bench/compare.py [--rows 2000000] [--features 64] [--time-cap 300]

Generates the data, partitions it into 2 shards, runs MLlib LogisticRegression to its optimum (the
anchor: about 25 s to log-loss 0.1721 on this data with local[2]), then every other kind with that
target. Time to target = seconds of training until the first evaluation at or below the target (data
loading and process start excluded for every kind; the trainer's job wall time is reported too).
Prints one JSON object; the comparison report (table, plots) is written beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparkml_dist.baselines import run_baselines  # noqa: E402
from sparkml_dist.compare import compare  # noqa: E402
from sparkml_dist.config import load_config  # noqa: E402
from sparkml_dist.fit import run_training  # noqa: E402
from sparkml_dist.partition import partition  # noqa: E402
from sparkml_dist.session import build_spark_session  # noqa: E402
from sparkml_dist.synthetic import write_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--time-cap", type=float, default=300.0)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--work-dir", default="/tmp/sparkml-bench-compare")
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    base = [
        f"paths.work_dir={work}",
        f"generate.rows={args.rows}",
        f"generate.features={args.features}",
        "generate.partitions=8",
        "partition.num_shards=2",
        "partition.validation_fraction=0.05",
        "partition.row_group_mb=4",
        "spark.log_level=ERROR",
        "spark.conf={spark.ui.enabled: 'false', spark.driver.memory: 8g, spark.sql.shuffle.partitions: '8', "
        "spark.driver.host: 127.0.0.1, spark.driver.bindAddress: 127.0.0.1}",
        f"baselines.time_cap_s={args.time_cap}",
        "baselines.max_iterations=200",
        "baselines.partitions_per_shard=1",
    ]
    cfg = load_config(None, base)
    spark = build_spark_session(cfg.spark)
    out: dict = {"benchmark": "compare", "rows": args.rows, "features": args.features, "anchor_mllib_s": 25.0}
    try:
        write_dataset(spark, cfg.generate)
        partition(spark, cfg)
        mllib = run_baselines(spark, load_config(None, [*base, "baselines.kinds=[mllib_lr]"]))[0]
        target = mllib.final["val_log_loss"] * 1.01
        out.update({"target_log_loss": target, "mllib_final_val_log_loss": mllib.final["val_log_loss"]})
        kinds = {"mllib_lr": {"time_to_target_s": mllib.seconds, "final_val_log_loss": mllib.final["val_log_loss"]}}
        run_ids = [mllib.run_id]
        others = run_baselines(
            spark,
            load_config(None, [*base, "baselines.kinds=[gd, sgd, averaging]", f"baselines.target_log_loss={target}"]),
        )
        for r in others:
            kinds[r.kind] = {"time_to_target_s": r.time_to_target_s, "final_val_log_loss": r.final["val_log_loss"]}
            run_ids.append(r.run_id)
        t0 = time.monotonic()
        trained = run_training(
            spark,
            load_config(
                None,
                [
                    *base,
                    f"train.epochs={args.epochs}",
                    "train.batch_size=1024",
                    "train.optimizer=adam",
                    "train.lr=0.01",
                    "tracking.log_model=false",
                ],
            ),
        )
        job_s = time.monotonic() - t0
        report = compare(cfg, [*run_ids, trained.run_id], None, target, str(work / "report"))
        allreduce = next(r for r in report["runs"] if r["kind"] == "allreduce")
        kinds["allreduce"] = {
            "time_to_target_s": allreduce["time_to_target_s"],
            "final_val_log_loss": allreduce["final_val_log_loss"],
            "job_wall_s": round(job_s, 2),
            "rows_per_s": allreduce["rows_per_s"],
        }
        for v in kinds.values():
            t = v["time_to_target_s"]
            v["speedup_vs_mllib"] = round(mllib.seconds / t, 2) if t else None
        out["kinds"] = kinds
        keep = Path(__file__).resolve().parents[1] / "docs" / "bench"
        keep.mkdir(parents=True, exist_ok=True)
        pngs = sorted(p.name for p in (work / "report").glob("*.png"))
        for name in pngs:
            shutil.copy(work / "report" / name, keep / f"compare_{name}")
        report_md = (work / "report" / "report.md").read_text()
        for name in pngs:  # the copies are prefixed; keep the report's image links working
            report_md = report_md.replace(f"]({name})", f"](compare_{name})")
        (keep / "compare_report.md").write_text(report_md)
    finally:
        spark.stop()
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
