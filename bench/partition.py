"""Partition throughput against a plain Spark Parquet read+write of the same input, same run: the default
shuffle_split (one global permutation) and stratified_split (each input task deals its rows, no shuffle).

    .venv/bin/python bench/partition.py [--rows 4000000] [--features 32] [--work-dir /tmp/bench-partition]

The plain copy is the practical limit for a job that must move every byte (goal: >= 0.7x its rows/s).
Runs at two sizes a factor 4 apart to show the cost grows linearly. Prints one JSON object.
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

from sparkml_dist.config import load_config  # noqa: E402
from sparkml_dist.data.partition import partition  # noqa: E402
from sparkml_dist.data.synthetic import write_dataset  # noqa: E402
from sparkml_dist.runtime.session import build_spark_session  # noqa: E402

MODES = ("shuffle_split", "stratified_split")
"""The default (one global permutation) and the mode without a network shuffle, each against the copy."""


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.parquet"))


def measure(spark, work: Path, rows: int, features: int, repeats: int) -> dict:
    sets = [
        f"paths.work_dir={work}",
        f"generate.rows={rows}",
        f"generate.features={features}",
        f"generate.partitions={max(2, rows // 500_000)}",
        "partition.num_shards=2",
        "partition.row_group_mb=8",
    ]
    cfg = load_config(None, sets)
    write_dataset(spark, cfg.generate)
    raw = Path(cfg.generate.output_url[len("file://") :])
    size = _du(raw)
    copy_s: list[float] = []
    split_s: dict[str, list[float]] = {m: [] for m in MODES}
    fingerprint_s: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(repeats):
        out = work / f"copy-{i}"
        t0 = time.perf_counter()
        spark.read.parquet(cfg.generate.output_url).write.mode("overwrite").parquet(f"file://{out}")
        copy_s.append(time.perf_counter() - t0)
        shutil.rmtree(out)
        for mode in MODES:
            run_cfg = load_config(None, [*sets, f"partition.output_url={work}/split-{i}", f"partition.mode={mode}"])
            t0 = time.perf_counter()
            result = partition(spark, run_cfg)
            split_s[mode].append(time.perf_counter() - t0)
            fingerprint_s[mode].append(result.fingerprint_s)
            shutil.rmtree(work / f"split-{i}")
    copy = min(copy_s)
    out = {
        "rows": rows,
        "features": features,
        "input_bytes": size,
        "plain_copy_s": round(copy, 2),
        "plain_copy_rows_per_s": round(rows / copy),
        "plain_copy_mb_per_s": round(size / copy / 1e6, 1),
    }
    for mode in MODES:
        split, fp = min(split_s[mode]), min(fingerprint_s[mode])
        out[mode] = {
            "s": round(split, 2),
            "rows_per_s": round(rows / split),
            "mb_per_s": round(size / split / 1e6, 1),
            "ratio_vs_plain_copy": round(copy / split, 3),
            # of s: the content fingerprint's scan (a first partition of new data pays it; an unchanged
            # re-run reuses the manifest's digests)
            "fingerprint_s": round(fp, 2),
            "ratio_vs_plain_copy_without_fingerprint": round(copy / (split - fp), 3),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4_000_000, help="the larger size; the smaller is rows/4")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work-dir", default="/tmp/sparkml-bench-partition")
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    cfg = load_config(
        None,
        [
            "spark.log_level=ERROR",
            "spark.conf={spark.ui.enabled: 'false', spark.driver.memory: 6g, spark.sql.shuffle.partitions: '8', "
            f"spark.local.dir: '{work}/spark-local', spark.driver.host: 127.0.0.1, "
            "spark.driver.bindAddress: 127.0.0.1}",
        ],
    )
    spark = build_spark_session(cfg.spark)
    try:
        small = measure(spark, work / "small", args.rows // 4, args.features, args.repeats)
        large = measure(spark, work / "large", args.rows, args.features, args.repeats)
    finally:
        spark.stop()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "partition",
        "machine_cores": os.cpu_count(),
        "goal_ratio_vs_plain_copy": 0.7,
        "sizes": [small, large],
        **{f"{mode}_cost_growth_for_4x_rows": round(large[mode]["s"] / small[mode]["s"], 2) for mode in MODES},
        "plain_copy_cost_growth_for_4x_rows": round(large["plain_copy_s"] / small["plain_copy_s"], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
