"""Every communication strategy against MLlib and the MapReduce baselines, to MLlib's final log-loss x 1.01.

    .venv/bin/python bench/compare.py [--rows 2000000] [--features 64] [--time-cap 300] [--epochs 4]

Generates the data and partitions it into 2 shards (in this process), then runs every kind as the job a
user would submit, one after another: ``python -m jobs.baseline`` for MLlib (first: its final log-loss
x 1.01 is the target) and the MapReduce baselines, ``python -m jobs.train`` for each strategy. Two
clocks per kind:

- ``time_to_target_s``: training seconds until the first evaluation at or below the target (data loading
  and process start excluded, as the runs log it);
- ``job_wall_s``: the whole job, spawn to exit (JVM start, stage launch, validation, model logging).

Prints one JSON object; the comparison report (table, plots) goes to docs/bench/compare_*.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparkml_dist.compare import compare  # noqa: E402
from sparkml_dist.config import load_config  # noqa: E402

STRATEGIES: dict[str, list[str]] = {
    "allreduce": [],
    "allreduce+fp16": ["comm.compression=fp16"],
    "allreduce+topk": ["comm.compression=topk", "comm.topk_ratio=0.1"],
    "local_sgd k=8": ["comm.strategy=local_sgd", "comm.local_steps=8"],
    "local_sgd k=32": ["comm.strategy=local_sgd", "comm.local_steps=32"],
    "local_sgd+topk k=8": ["comm.strategy=local_sgd", "comm.local_steps=8", "comm.compression=topk",
                           "comm.topk_ratio=0.1"],
}  # fmt: skip
BASELINES = ("gd", "sgd", "averaging")


def _job(module: str, sets: list[str]) -> tuple[dict, float]:
    """Run ``python -m module`` with ``--set`` overrides; its JSON summary and its wall seconds."""
    args = [sys.executable, "-m", module, "--config", "conf/local.yaml"]
    for s in sets:
        args += ["--set", s]
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def base_sets(work: Path, rows: int, features: int, time_cap: float) -> list[str]:
    """The --set overrides every job of this benchmark (and bench/peers.py) shares: data, shards, Spark."""
    return [
        f"paths.work_dir={work}",
        f"generate.rows={rows}",
        f"generate.features={features}",
        "generate.partitions=8",
        "partition.num_shards=2",
        "partition.validation_fraction=0.05",
        "partition.row_group_mb=4",
        "spark.log_level=ERROR",
        "spark.conf={spark.ui.enabled: 'false', spark.driver.memory: 8g, spark.sql.shuffle.partitions: '8', "
        "spark.driver.host: 127.0.0.1, spark.driver.bindAddress: 127.0.0.1}",
        f"baselines.time_cap_s={time_cap}",
        "baselines.max_iterations=200",
        "baselines.partitions_per_shard=1",
        "tracking.log_model=true",
    ]


TRAIN = ["train.batch_size=1024", "train.optimizer=adam", "train.lr=0.01"]
"""The training settings every strategy row uses (bench/peers.py gives the peer the same)."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--time-cap", type=float, default=300.0)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--work-dir", default="/tmp/sparkml-bench-compare")
    parser.add_argument("--only", nargs="*", default=None, help="strategies to run (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    base = base_sets(work, args.rows, args.features, args.time_cap)
    train = [f"train.epochs={args.epochs}", *TRAIN]
    out: dict = {"benchmark": "compare", "rows": args.rows, "features": args.features, "anchor_mllib_s": 25.0}
    _job("jobs.generate", base)
    _job("jobs.partition", base)
    mllib, mllib_wall = _job("jobs.baseline", [*base, "baselines.kinds=[mllib_lr]"])
    m = mllib["baselines"][0]
    target = m["final"]["val_log_loss"] * 1.01
    out.update({"target_log_loss": target, "mllib_final_val_log_loss": m["final"]["val_log_loss"]})
    kinds: dict[str, dict] = {
        "mllib_lr": {"time_to_target_s": m["seconds"], "job_wall_s": round(mllib_wall, 2), "run_id": m["run_id"]}
    }
    summary, wall = _job("jobs.baseline", [*base, f"baselines.kinds=[{','.join(BASELINES)}]",
                                            f"baselines.target_log_loss={target}"])  # fmt: skip
    for b in summary["baselines"]:  # one job for the three: its wall is shared, so reported once for all
        kinds[b["kind"]] = {"run_id": b["run_id"], "job_wall_s_all_three": round(wall, 2)}
    for name, sets in STRATEGIES.items():
        if args.only is not None and name not in args.only:
            continue
        trained, wall = _job("jobs.train", [*base, *train, *sets])
        kinds[name] = {"run_id": trained["run_id"], "job_wall_s": round(wall, 2)}
    cfg = load_config(None, base)
    report = compare(cfg, [k["run_id"] for k in kinds.values()], None, target, str(work / "report"))
    by_id = {r["run_id"]: r for r in report["runs"]}
    mllib_s = kinds["mllib_lr"]["time_to_target_s"]
    for v in kinds.values():
        r = by_id[v["run_id"]]
        if "time_to_target_s" not in v:
            v["time_to_target_s"] = r["time_to_target_s"]
        v.update(
            final_val_log_loss=r["final_val_log_loss"],
            rounds=r["rounds"],
            bytes_per_step=r["bytes_per_step_measured"],
            bytes_per_round=r["bytes_per_round_measured"],
            rows_per_s=r["rows_per_s"],
        )
        t = v["time_to_target_s"]
        v["speedup_vs_mllib"] = round(mllib_s / t, 2) if t else None
        if v.get("job_wall_s"):
            v["job_speedup_vs_mllib"] = round(kinds["mllib_lr"]["job_wall_s"] / v["job_wall_s"], 2)
    out["kinds"] = kinds
    reached = {k: v["speedup_vs_mllib"] for k, v in kinds.items() if v["speedup_vs_mllib"] and k in STRATEGIES}
    best = max(reached, key=lambda k: reached[k]) if reached else None
    out["best_strategy"] = best
    out["goal_5x_met"] = bool(best and reached[best] >= 5.0)
    keep = REPO / "docs" / "bench"
    keep.mkdir(parents=True, exist_ok=True)
    pngs = sorted(p.name for p in (work / "report").glob("*.png"))
    for name in pngs:
        shutil.copy(work / "report" / name, keep / f"compare_{name}")
    report_md = (work / "report" / "report.md").read_text()
    for name in pngs:  # the copies are prefixed; keep the report's image links working
        report_md = report_md.replace(f"]({name})", f"](compare_{name})")
    (keep / "compare_report.md").write_text(report_md)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
