"""The scale curve: generate -> partition -> one training epoch at sizes a factor 4 apart.

    .venv/bin/python bench/scale.py [--rows 2500000,10000000,40000000] [--features 32] [--work-dir DIR]

Every stage runs as the job a user submits (``python -m jobs.generate|partition|train``, local[2]) while a
sampler reads the resident memory of the job's whole process tree from /proc every 0.2 s: the driver's
Python, the JVM (in local mode the driver and the executors share it: reported as ``jvm``), and the Spark
Python workers (the ranks run in them during training: ``worker`` is the largest one). Per stage and size:
wall seconds (spawn to exit) and the stage's own seconds (its JSON summary: no interpreter/JVM start), and
from the latter rows/s, bytes/s of the Parquet it read and seconds per million rows; the peak RSS of each
kind of process (the JVM's is its heap as the GC lets it grow up to spark.driver.memory, not live data).
Goals (issue 17 section 3): cost per row within +-20% across the sizes, every peak RSS flat within +-15%.
From the largest size: core-hours per TB of input Parquet per stage, and which stage limits.
Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORES = 2
PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def _kind_and_rss(pid: int, root: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
    except OSError:
        return None
    if pid == root:
        return "driver", rss
    if "java" in cmd.split(" ", 1)[0]:
        return "jvm", rss
    if "python" in cmd:
        return "worker", rss
    return None


class Sampler:
    """Peak RSS per process kind of a process tree, sampled until stopped."""

    def __init__(self, root: int, interval_s: float = 0.2) -> None:
        self.root, self.interval_s = root, interval_s
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in _tree(self.root):
                got = _kind_and_rss(pid, self.root)
                if got:
                    kind, rss = got
                    self.peak[kind] = max(self.peak.get(kind, 0), rss)
            self._stop.wait(self.interval_s)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {k: round(v / 2**20, 1) for k, v in sorted(self.peak.items())}


def _job(module: str, sets: list[str]) -> tuple[dict, float, dict[str, float]]:
    args = [sys.executable, "-m", module, "--config", "conf/local.yaml", "--log-level", "WARNING"]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    try:
        out, err = proc.communicate(timeout=3600)
    finally:
        peaks = sampler.stop()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1]), wall, peaks


def _parquet_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.parquet"))


def _spread(values: list[float]) -> float:
    """Largest relative deviation from the median (0.2 = +-20%)."""
    mid = sorted(values)[len(values) // 2]
    return round(max(abs(v - mid) / mid for v in values), 3) if mid else 0.0


def measure(work: Path, rows: int, features: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    base = [
        f"paths.work_dir={work}",
        f"generate.rows={rows}",
        f"generate.features={features}",
        f"generate.partitions={max(2, rows // 1_000_000)}",
        "partition.num_shards=2",
        "partition.validation_fraction=0.02",
        "spark.log_level=ERROR",
        "spark.conf={spark.ui.enabled: 'false', spark.driver.memory: 4g, spark.sql.shuffle.partitions: '"
        f"{max(4, rows // 1_000_000)}', spark.driver.host: 127.0.0.1, spark.driver.bindAddress: 127.0.0.1}}",
        "tracking.log_model=false",
    ]
    stages: dict[str, dict] = {}
    gen, wall, peaks = _job("jobs.generate", base)
    raw_bytes = _parquet_bytes(work / "data" / "raw")
    stages["generate"] = {"wall_s": wall, "job_s": gen["seconds"], "bytes": raw_bytes, "peak_rss_mb": peaks}
    part, wall, peaks = _job("jobs.partition", base)
    part_bytes = _parquet_bytes(work / "data" / "partitioned")
    stages["partition"] = {"wall_s": wall, "job_s": part["seconds"], "bytes": raw_bytes, "peak_rss_mb": peaks}
    trained, wall, peaks = _job("jobs.train", [*base, "train.epochs=1", "train.batch_size=1024"])
    stages["train_1_epoch"] = {"wall_s": wall, "job_s": trained["seconds"], "bytes": part_bytes,
                               "peak_rss_mb": peaks, "epoch_s": round(trained["final"]["epoch_s"], 2)}  # fmt: skip
    for s in stages.values():
        # job_s: the stage's own clock (its JSON summary), without interpreter and JVM start-up, which are a
        # constant ~6-10 s per job here and would hide the per-row cost at the small sizes
        s["wall_s"], s["job_s"] = round(s["wall_s"], 2), round(s["job_s"], 2)
        s["rows_per_s"] = round(rows / s["job_s"])
        s["mb_per_s"] = round(s.pop("bytes") / s["job_s"] / 2**20, 1)
        s["s_per_million_rows"] = round(s["job_s"] / rows * 1e6, 3)
    return {"rows": rows, "features": features, "raw_parquet_mb": round(raw_bytes / 2**20, 1),
            "partitioned_parquet_mb": round(part_bytes / 2**20, 1), "stages": stages}  # fmt: skip


def summarize(points: list[dict]) -> dict:
    """Goals and the 1 TB extrapolation from the measured points (also: ``--summarize saved.json``)."""
    out: dict = {"benchmark": "scale", "cores": CORES, "points": points}
    goals: dict[str, dict] = {}
    for stage in points[0]["stages"]:
        per_row = [p["stages"][stage]["s_per_million_rows"] for p in points]
        # where a process kind is missing at some size (no Python worker ran), it is not compared
        kinds = sorted({k for p in points for k in p["stages"][stage]["peak_rss_mb"]})
        rss = {
            k: _spread([p["stages"][stage]["peak_rss_mb"][k] for p in points])
            for k in kinds
            if all(k in p["stages"][stage]["peak_rss_mb"] for p in points)
        }
        # the marginal cost (seconds per extra million rows between consecutive sizes) takes the fixed cost
        # of a job (session, stage launch) out, which dominates the smallest size
        marginal = [
            round((b["stages"][stage]["job_s"] - a["stages"][stage]["job_s"]) / (b["rows"] - a["rows"]) * 1e6, 3)
            for a, b in zip(points, points[1:], strict=False)
        ]
        goals[stage] = {
            "cost_per_row_spread": _spread(per_row),
            "linear_within_20pct": _spread(per_row) <= 0.20,
            "marginal_s_per_million_rows": marginal,
            "peak_rss_spread": rss,
            "rss_flat_within_15pct": all(v <= 0.15 for v in rss.values()),
        }
        if "epoch_s" in points[0]["stages"][stage]:
            epoch = [p["stages"][stage]["epoch_s"] / p["rows"] * 1e6 for p in points]
            goals[stage]["epoch_s_per_million_rows"] = [round(v, 3) for v in epoch]
            goals[stage]["epoch_linear_within_20pct"] = _spread(epoch) <= 0.20
    out["goals"] = goals
    big = points[-1]
    scale_up = 2**40 / (big["raw_parquet_mb"] * 2**20)
    per_tb = {  # core-hours per TB of input Parquet for each stage, at the largest size's pace
        stage: round(s["job_s"] * scale_up * CORES / 3600, 1) for stage, s in big["stages"].items()
    }
    out["core_hours_per_tb"] = per_tb
    real = {k: v for k, v in per_tb.items() if k != "generate"}  # a user's terabyte is not generated
    out["limiting_stage"] = max(real, key=lambda k: real[k])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="2500000,10000000,40000000")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--work-dir", default="/tmp/sparkml-bench-scale")
    parser.add_argument("--summarize", default=None, help="recompute goals from a saved run's JSON; no runs")
    args = parser.parse_args()
    if args.summarize:
        points = json.loads(Path(args.summarize).read_text())["points"]
    else:
        sizes = [int(r) for r in args.rows.split(",")]
        points = [measure(Path(args.work_dir), rows, args.features) for rows in sizes]
        shutil.rmtree(args.work_dir, ignore_errors=True)
    print(json.dumps(summarize(points)))


if __name__ == "__main__":
    main()
