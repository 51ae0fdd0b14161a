"""Sparse, high-dimensional data end to end: a Criteo-like table hashed to ~2^20 dimensions, MLlib against
the AllReduce trainer on the same sparse shards, and the loader's memory against the dimension.

    .venv/bin/python bench/sparse.py [--rows 10000000] [--buckets 40329] [--time-cap 900] [--epochs 2]

1. ``jobs.generate`` (generate.layout=criteo: 13 numeric columns with nulls, 26 Zipf categorical columns),
   ``jobs.partition`` with the 26 columns hashed one-hot into ``--buckets`` each (13 + 26 x 40,329 =
   1,048,567 ~ 2^20 dimensions), numeric nulls filled with the mean, log1p counts: the sparse layout.
2. ``jobs.baseline`` MLlib LogisticRegression on SparseVectors built from those shards (capped at
   ``--time-cap`` seconds); its final validation log-loss x 1.01 is the target.
3. ``jobs.train`` (2 ranks, sparse first layer) on the same shards, one row per way of training it (``KINDS``):
   AllReduce of the dense gradient (train.sparse_gradients=off; with comm.compression=none and nonzero),
   AllReduce of row-sparse gradients (the default, auto) with dense Adam and with each row-sparse optimizer
   (lazy_adam, adagrad, ftrl), and the sparse parameter server (workers pull and push the touched rows, the
   optimizer on the servers); time to the target read from the runs (``compare``), both clocks as in
   bench/compare.py, the bytes each sends per step and the ranks' peak RSS.
4. Loader: one rank's rows/s into torch (sparse CSR batches) and the peak RSS of a process that only
   streams, on the same rows partitioned at 2^16, 2^20 and 2^24 dimensions (``--loader-rows`` rows each).

Prints one JSON object (goal: >= 5x faster than MLlib to the same log-loss; loader RSS flat in the dimension).
``--only`` runs a subset of ``KINDS`` (MLlib always runs: it is the target). The ring kinds evaluate every
``--eval-every-steps`` batches (train.eval_every_steps, default 200): time to target is read to the first
evaluation that reached it, and each row also says when the first epoch end had.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CATEGORICAL = "[" + ",".join(f"c{i}" for i in range(1, 27)) + "]"
PS_ASYNC = ["comm.strategy=parameter_server", "comm.pace=async"]
KINDS: dict[str, list[str]] = {
    # the dense gradient of the 2^20-row layer every step (what issue 16 measured)
    "allreduce dense": ["train.sparse_gradients=off"],
    "allreduce+nonzero dense": ["train.sparse_gradients=off", "comm.compression=nonzero"],
    # row-sparse gradients (train.sparse_gradients=auto): the touched rows travel
    "allreduce rows adam": ["train.optimizer=adam", "train.lr=0.005"],
    "allreduce rows lazy_adam": ["train.optimizer=lazy_adam", "train.lr=0.005"],
    "allreduce rows adagrad": ["train.optimizer=adagrad", "train.lr=ADAGRAD_LR"],
    "allreduce rows ftrl": ["train.optimizer=ftrl", "train.lr=FTRL_LR", "train.ftrl_beta=0.001"],
    "ps async rows adagrad": [*PS_ASYNC, "train.optimizer=adagrad", "train.lr=ADAGRAD_LR"],
}
FILL = "{" + ", ".join(f"i{i}: mean" for i in range(1, 14)) + "}"


def _on_servers(kind: str) -> bool:
    """The kind trains on the parameter server, whose driver evaluates at epoch ends only."""
    return PS_ASYNC[0] in KINDS[kind]


def _job(module: str, sets: list[str]) -> tuple[dict, float]:
    args = [sys.executable, "-m", module, "--config", "conf/local.yaml"]
    for s in sets:
        args += ["--set", s]
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=7200)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def _base(work: Path, rows: int, buckets: int, out: str = "partitioned") -> list[str]:
    return [
        f"paths.work_dir={work}",
        "generate.layout=criteo",
        f"generate.rows={rows}",
        "generate.partitions=8",
        "generate.null_fraction=0.05",
        f"data.categorical_cols={CATEGORICAL}",
        f"data.null_fill={FILL}",
        "data.numeric_transform=log1p",
        f"data.hash_buckets={buckets}",
        f"partition.output_url={work / out}",
        f"train.manifest_url={work / out}",
        "partition.num_shards=2",
        "partition.validation_fraction=0.02",
        "partition.row_group_mb=8",
        "spark.log_level=ERROR",
        "spark.conf={spark.ui.enabled: 'false', spark.driver.memory: 10g, spark.sql.shuffle.partitions: '16', "
        "spark.driver.host: 127.0.0.1, spark.driver.bindAddress: 127.0.0.1}",
    ]


def stream(manifest_url: str, batch_size: int) -> dict:
    """In a fresh process: stream rank 0 of 2's shard once; rows/s into torch and the process's peak RSS."""
    from sparkml_dist.config import TrainConfig
    from sparkml_dist.data.manifest import read_manifest
    from sparkml_dist.training.loader import build_loader_spec, iterate_batches

    manifest = read_manifest(manifest_url)
    spec = build_loader_spec(manifest, 0, 2, TrainConfig(batch_size=batch_size, shuffle=True))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows, nnz = 0, 0
    t0 = time.monotonic()
    with iterate_batches(spec, epoch=0) as batches:
        for x, y in batches:
            rows += len(y)
            nnz += int(x.values().numel())
    seconds = time.monotonic() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "dimension": manifest.num_features,
        "rows": rows,
        "nnz_per_row": round(nnz / max(rows, 1), 2),
        "rows_per_s": round(rows / seconds),
        "peak_rss_mb": round(peak / 1024, 1),
        "rss_before_stream_mb": round(before / 1024, 1),
    }


def _last(cfg, run_id: str, key: str) -> float | None:
    """The last logged value of metric ``key`` of a run (None when it was not logged)."""
    from sparkml_dist.experiments.tracking import get_run_record

    value = get_run_record(cfg.tracking, run_id, (key,)).metrics.get(key)
    return round(value, 1) if value is not None else None


def _at_epoch_end(cfg, run_id: str, target: float) -> float | None:
    """Training seconds to the first epoch end whose validation log-loss reached ``target`` (None: none did):
    compare's per-epoch curve, without the mid-epoch evaluations its time to target also reads."""
    from sparkml_dist.compare import HISTORY_KEYS, summarize_run
    from sparkml_dist.experiments.tracking import get_run_record

    curve = summarize_run(get_run_record(cfg.tracking, run_id, HISTORY_KEYS), target).curve
    hits = [t for _, t, loss in curve if loss <= target]
    return round(min(hits), 2) if hits else None


def _stream_in_child(manifest_url: str, batch_size: int) -> dict:
    code = f"import json, bench.sparse as b; print(json.dumps(b.stream({manifest_url!r}, {batch_size})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"loader stream failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--buckets", type=int, default=40329, help="per categorical column (26 of them)")
    parser.add_argument("--loader-rows", type=int, default=1_000_000)
    parser.add_argument("--time-cap", type=float, default=900.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--work-dir", default="/tmp/sparkml-bench-sparse")
    parser.add_argument("--skip-training", action="store_true", help="loader part only")
    parser.add_argument("--keep", action="store_true", help="reuse generated and partitioned data in --work-dir")
    parser.add_argument("--only", default=None, help="comma-separated KINDS to train (default: all)")
    # picked on 1M rows of the same table, 1 epoch (2026-12-06): adagrad 0.02/0.05/0.2 -> val log-loss
    # 0.604/0.594/0.613; ftrl (beta 0.001) 0.02/0.05 -> 0.607/0.595, (beta 1) 0.05/0.2 -> 0.631/0.618; adam 0.588
    parser.add_argument("--adagrad-lr", type=float, default=0.05)
    parser.add_argument("--ftrl-lr", type=float, default=0.05)
    parser.add_argument(
        "--eval-every-steps",
        type=int,
        default=200,
        help="train.eval_every_steps for the ring kinds (0: evaluate at epoch ends only); the parameter server "
        "evaluates at epoch ends. Time to target is read to the first evaluation that reached it; each row also "
        "gives the time to the first epoch end that had (time_to_target_at_epoch_end_s)",
    )
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from sparkml_dist.compare import compare
    from sparkml_dist.config import load_config

    work = Path(args.work_dir)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    def once(module: str, sets: list[str], marker: Path) -> None:
        if not marker.exists():
            _job(module, sets)

    out: dict = {"benchmark": "sparse", "rows": args.rows, "dimension": 13 + 26 * args.buckets}

    # Loader: the same rows at three dimensions (hash buckets per column chosen for 2^16, 2^20, 2^24).
    loader = []
    small = work / "loader"
    once("jobs.generate", _base(small, args.loader_rows, 1), small / "data" / "raw" / "_truth.json")
    for bits in (16, 20, 24):
        buckets = ((1 << bits) - 13) // 26
        sets = _base(small, args.loader_rows, buckets, out=f"dim{bits}")
        once("jobs.partition", sets, small / f"dim{bits}" / "_manifest.json")
        loader.append(_stream_in_child(f"file://{small / f'dim{bits}'}", args.batch_size))
    out["loader"] = loader
    rss = [x["peak_rss_mb"] for x in loader]
    out["loader_rss_flat"] = max(rss) <= 1.2 * min(rss)
    if args.skip_training:
        print(json.dumps(out))
        return

    base = _base(work, args.rows, args.buckets)
    t0 = time.monotonic()
    once("jobs.generate", base, work / "data" / "raw" / "_truth.json")
    gen_wall = time.monotonic() - t0
    part, part_wall = _job("jobs.partition", base)  # a no-op when the output is already there (its skipped flag)
    out.update(generate_s=round(gen_wall, 1), partition_s=round(part_wall, 1), train_rows=part["train_rows"])
    out["partition_skipped"] = part["skipped"]
    out["loader_full"] = _stream_in_child(f"file://{work / 'partitioned'}", args.batch_size)
    capped = [*base, f"baselines.time_cap_s={args.time_cap}", "baselines.max_iterations=100"]
    mllib, mllib_wall = _job("jobs.baseline", [*capped, "baselines.kinds=[mllib_lr]"])
    m = mllib["baselines"][0]
    target = m["final"]["val_log_loss"] * 1.01
    out.update(mllib_final_val_log_loss=m["final"]["val_log_loss"], target_log_loss=target)
    train = [f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.optimizer=adam"]
    train += ["train.lr=0.005", "tracking.log_model=false"]
    lrs = {"ADAGRAD_LR": str(args.adagrad_lr), "FTRL_LR": str(args.ftrl_lr)}
    only = args.only.split(",") if args.only else list(KINDS)
    unknown = [k for k in only if k not in KINDS]
    if unknown:
        raise SystemExit(f"--only: unknown kind(s) {unknown}; known: {list(KINDS)}")
    runs = {}
    for name in only:
        sets = [s.split("=")[0] + "=" + lrs.get(s.split("=")[1], s.split("=")[1]) for s in KINDS[name]]
        if args.eval_every_steps and not _on_servers(name):
            sets.append(f"train.eval_every_steps={args.eval_every_steps}")
        trained, wall = _job("jobs.train", [*base, *train, *sets])
        runs[name] = (trained["run_id"], wall)
    cfg = load_config(None, base)
    report = compare(cfg, [m["run_id"], *[r for r, _ in runs.values()]], None, target, str(work / "report"))
    by_id = {r["run_id"]: r for r in report["runs"]}
    out["mllib"] = {
        "seconds": m["seconds"],
        "job_wall_s": round(mllib_wall, 1),
        "capped": m["seconds"] >= args.time_cap,
    }
    for name, (run_id, wall) in runs.items():
        ours = by_id[run_id]
        t = ours["time_to_target_s"]
        out[name] = {
            "time_to_target_s": t,
            "speedup_vs_mllib": round(m["seconds"] / t, 2) if t else None,
            "final_val_log_loss": ours["final_val_log_loss"],
            "rows_per_s": ours["rows_per_s"],
            "bytes_per_step": ours["bytes_per_step_measured"],
            "job_wall_s": round(wall, 1),
            "job_wall_vs_mllib": round(mllib_wall / wall, 2),
            "time_to_target_at_epoch_end_s": _at_epoch_end(cfg, run_id, target),
            "rank_peak_rss_mb": _last(cfg, run_id, "rank_peak_rss_mb"),
            "settings": [s for s in KINDS[name]],
            "eval_every_steps": 0 if _on_servers(name) else args.eval_every_steps,
        }
    best = max((out[k]["speedup_vs_mllib"] or 0) for k in runs)
    out["goal_5x_met"] = best >= 5.0
    out["goal_job_wall_5x_met"] = max(out[k]["job_wall_vs_mllib"] for k in runs) >= 5.0
    out["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
