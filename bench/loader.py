"""Loader throughput: both readers behind the loader (Petastorm with 1..4 reader threads or processes, the
Arrow reader with 1..4 threads) against raw pyarrow scans of the same files into the same tensors, in one run.

    .venv/bin/python bench/loader.py [--rows 2000000] [--features 64] [--batch-size 512] [--repeats 1]
                                     [--reader both|petastorm|arrow] [--work-dir DIR]
                                     [--paths raw_pq,raw_dataset,loader_t1,arrow_t1,...]

Generates ``--rows`` rows with the project's generate + partition code on local[2] Spark, partitioned twice
(array column and scalar columns) into 4 shards. Two shard sizes: one rank reading all 4 shards (world
size 1, ``large``) and rank 0 of 4 (one shard, 1/4 of the rows, ``small``), to show peak RSS does not grow
with the shard. Every measurement runs in a fresh subprocess, which reports its rows/s into float32
[B, F] / int64 [B] torch batches and its peak RSS (ru_maxrss; for the process pool also the largest
worker's) and its CPU seconds (its own + its reader processes'): rows per CPU-second measures efficiency
even on a shared machine, where rows/s is noisy. ``--repeats`` runs every path that many times,
interleaved, so each repeat's ratios are taken in the same conditions; the JSON gives each repeat and the
median. Prints one JSON object last.

Paths: ``raw_pq`` (pyarrow.parquet, one row group at a time, columns decoded on pyarrow's threads),
``raw_dataset`` (pyarrow.dataset scanner: several row groups at once on its own threads), ``loader_t<N>``
(iterate_batches, shuffle off, train.reader=petastorm with N reader threads), ``loader_p<N>`` (N reader
processes), ``loader_shuffled`` (train.reader_workers threads, row-group order + 20k-row shuffle buffer),
``arrow_t<N>`` and ``arrow_shuffled`` (the same with train.reader=arrow), and, on request,
``petastorm_default`` (make_batch_reader with its defaults and its namedtuples). ``--reader`` picks which
reader's paths run by default (both: the JSON's ``readers_side_by_side`` gives their rows/s per thread count;
arrow alone runs where Petastorm does not import). Goal: the best ``loader_*`` with <= 4 workers >= 1.0x the
best raw scan, on both layouts and both sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RAW = ("raw_pq", "raw_dataset")
LOADERS = tuple(f"loader_{kind}{n}" for kind in "tp" for n in range(1, 5))
ARROW = tuple(f"arrow_t{n}" for n in range(1, 5))
READER_PATHS = {"petastorm": (*LOADERS, "loader_shuffled"), "arrow": (*ARROW, "arrow_shuffled")}
PATHS = (*RAW, *READER_PATHS["petastorm"], *READER_PATHS["arrow"])
SHARDS = 4
H100_ROWS_PER_S = {"logistic_regression_batch_8192": 13_200_000, "mlp_2x1024_batch_8192": 5_900_000}
"""What one H100 rank consumes (issue 17); 5.9M rows/s is the bar a GPU rank needs."""


def _rebatch(chunks, bs: int):
    """(x [n, F], y [n]) chunks -> torch batches of exactly bs rows (views; a copy only across chunks)."""
    import numpy as np
    import torch

    cx = cy = None
    for x, y in chunks:
        if cy is not None and len(cy):
            x, y = np.concatenate([cx, x]), np.concatenate([cy, y])
        full = len(y) // bs * bs
        for i in range(0, full, bs):
            yield torch.from_numpy(x[i : i + bs]), torch.from_numpy(y[i : i + bs])
        cx, cy = x[full:], y[full:]


def _arrow_to_numpy(table, features_col: str | None, names: list[str], label: str):
    import numpy as np

    y = table.column(label).to_numpy().astype(np.int64)
    if features_col is None:
        return np.stack([table.column(c).to_numpy() for c in names], axis=1), y
    col = table.column(features_col)
    if hasattr(col, "num_chunks"):  # a Table's ChunkedArray; a RecordBatch gives the Array itself
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    return col.flatten().to_numpy().reshape(len(col), len(names)), y


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its reaped children (the reader processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child(task: dict) -> dict:
    """One measurement in this (fresh) process."""
    import dataclasses
    import re
    import warnings

    import numpy as np
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    import torch  # noqa: F401  (imported before the clock starts, like the rank would have)

    from sparkml_dist.config import TrainConfig
    from sparkml_dist.data.manifest import read_manifest
    from sparkml_dist.training.loader import build_loader_spec, iterate_batches

    warnings.simplefilter("ignore", FutureWarning)
    path = task["path"]
    m = read_manifest(task["manifest_url"])
    reader = "arrow" if path.startswith("arrow_") else "petastorm" if path.startswith("loader_") else "auto"
    cfg = TrainConfig(batch_size=task["batch_size"], shuffle=path.endswith("_shuffled"), reader=reader)
    spec = build_loader_spec(m, 0, task["world_size"], cfg)
    spec = dataclasses.replace(spec, steps=sum(s.rows for s in m.train[:: task["world_size"]]) // spec.batch_size)
    if path.startswith(("loader_", "arrow_")) and not path.endswith("_shuffled"):
        kind, workers = path.split("_", 1)[1][0], int(path.split("_", 1)[1][1:])
        pool = {"t": "thread", "p": "process"}[kind]
        spec = dataclasses.replace(spec, workers_count=workers, reader_pool=pool)
    files = [u.removeprefix("file://") for u in spec.urls]
    names, label, bs = list(m.feature_names), m.label_col, spec.batch_size
    cols = [m.features_col] if m.features_col else names
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu0 = _cpu_s()
    rows, t0 = 0, time.perf_counter()
    if path.startswith(("loader", "arrow")):
        with iterate_batches(spec, 0) as batches:
            for x, _ in batches:
                rows += len(x)
    elif path == "raw_pq":

        def row_groups():
            for f in files:
                pf = pq.ParquetFile(f)
                for i in range(pf.num_row_groups):
                    yield _arrow_to_numpy(pf.read_row_group(i, columns=[*cols, label]), m.features_col, names, label)

        rows = sum(len(x) for x, _ in _rebatch(row_groups(), bs))
    elif path == "raw_dataset":
        scan = pads.dataset(files, format="parquet").to_batches(columns=[*cols, label], batch_size=64 * 1024)
        chunks = (_arrow_to_numpy(b, m.features_col, names, label) for b in scan)
        rows = sum(len(x) for x, _ in _rebatch(chunks, bs))
    elif path == "petastorm_default":  # defaults (10 threads, 50 queued row groups), its numpy namedtuples
        from petastorm import make_batch_reader

        fields = [re.escape(c) + "$" for c in [*cols, label]]
        with make_batch_reader(list(spec.urls), schema_fields=fields) as reader:
            chunks = (
                (np.column_stack([getattr(b, c) for c in cols]).astype(np.float32), getattr(b, label).astype(np.int64))
                for b in reader
            )
            rows = sum(len(x) for x, _ in _rebatch(chunks, bs))
    else:
        raise ValueError(f"unknown path {path!r}: choose from {(*PATHS, 'petastorm_default')}")
    seconds = time.perf_counter() - t0
    cpu = _cpu_s() - cpu0
    return {
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds),
        "cpu_s": round(cpu, 3),
        "rows_per_cpu_s": round(rows / cpu),
        "rss_after_imports_mb": round(rss_before, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "largest_worker_process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def run_child(task: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(task)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{task}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(work: Path, rows: int, features: int) -> dict[str, str]:
    """Generate + partition (both layouts) with the project's code; reused when work holds them already."""
    from sparkml_dist.config import load_config
    from sparkml_dist.data.partition import partition
    from sparkml_dist.data.synthetic import write_dataset
    from sparkml_dist.runtime.session import build_spark_session

    sets = [
        f"paths.work_dir={work}",
        f"generate.rows={rows}",
        f"generate.features={features}",
        f"generate.partitions={max(2, rows // 250_000)}",
        "generate.layout=columns",
        f"partition.num_shards={SHARDS}",
        "partition.validation_fraction=0.01",
        "spark.log_level=ERROR",
        "spark.conf={spark.ui.enabled: 'false', spark.driver.memory: 4g, spark.sql.shuffle.partitions: '8', "
        f"spark.local.dir: '{work}/spark-local', spark.driver.host: 127.0.0.1, spark.driver.bindAddress: 127.0.0.1}}",
    ]
    cfg = load_config(None, sets)
    urls = {layout: f"file://{work}/{layout}" for layout in ("array", "columns")}
    spark = build_spark_session(cfg.spark)
    try:
        if not (work / "data" / "raw" / "_SUCCESS").exists():
            write_dataset(spark, cfg.generate)
        for layout, url in urls.items():
            partition(
                spark, load_config(None, [*sets, f"partition.output_url={url}", f"partition.feature_layout={layout}"])
            )
    finally:
        spark.stop()
    return urls


def _summarize(runs: list[dict]) -> dict:
    """Median of the repeats, with each repeat's rows/s and ratio to that repeat's best raw scan."""
    rates = [r["rows_per_s"] for r in runs]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], int | float)}
    out["rows_per_s_each"] = rates
    out["ratio_vs_best_raw_each"] = [r["ratio_vs_best_raw"] for r in runs]
    out["ratio_vs_best_raw"] = round(statistics.median(out["ratio_vs_best_raw_each"]), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000, help="generated rows; the small size is 1/4")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="runs of every path, interleaved")
    parser.add_argument("--reader", choices=("both", "petastorm", "arrow"), default="both", help="readers to run")
    parser.add_argument("--paths", default=None, help="comma-separated (default: --reader's); raw scans always")
    parser.add_argument("--work-dir", default=None, help="keep (and reuse) the data here; default: a temp dir")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        # The measurement is complete: skip interpreter teardown, where pyarrow 14's thread pools sometimes
        # abort the process ('terminate called without an active exception', apache/arrow#34314; seen in
        # about 1 of 8 Petastorm children, before the reader seam too).
        os._exit(0)
    readers = ("petastorm", "arrow") if args.reader == "both" else (args.reader,)
    chosen = args.paths.split(",") if args.paths else [p for r in readers for p in READER_PATHS[r]]
    paths = list(dict.fromkeys([*RAW, *chosen]))
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sparkml-bench-loader-"))
    started = time.perf_counter()
    try:
        urls = prepare(work, args.rows, args.features)
        prep_s = time.perf_counter() - started
        measured: dict = {}
        for repeat in range(args.repeats):
            for layout, url in urls.items():
                for size, world in (("small", SHARDS), ("large", 1)):
                    task = {"manifest_url": url, "world_size": world, "batch_size": args.batch_size}
                    runs = {p: run_child({**task, "path": p}) for p in paths}
                    raw = max(runs[p]["rows_per_s"] for p in RAW)
                    for p, r in runs.items():
                        r["ratio_vs_best_raw"] = round(r["rows_per_s"] / raw, 3)
                        measured.setdefault(layout, {}).setdefault(size, {}).setdefault(p, []).append(r)
                    rates = {p: round(r["rows_per_s"] / 1e6, 2) for p, r in runs.items()}
                    print(repeat, layout, size, "M rows/s", json.dumps(rates), file=sys.stderr)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    results = {
        lay: {size: {p: _summarize(v) for p, v in by.items()} for size, by in s.items()} for lay, s in measured.items()
    }
    loaders = [p for p in paths if p.startswith(("loader_", "arrow_")) and not p.endswith("_shuffled")]

    def best(r: dict) -> str:
        return max(loaders, key=lambda p: r[p]["rows_per_s"])

    def side_by_side(r: dict) -> dict:
        """rows/s of both readers at each thread count (and shuffled), where both ran."""
        pairs = {f"threads_{n}": (f"loader_t{n}", f"arrow_t{n}") for n in range(1, 5)}
        pairs["shuffled"] = ("loader_shuffled", "arrow_shuffled")
        return {
            k: {
                "petastorm": r[p]["rows_per_s"],
                "arrow": r[a]["rows_per_s"],
                "arrow_vs_petastorm": round(r[a]["rows_per_s"] / r[p]["rows_per_s"], 3),
            }
            for k, (p, a) in pairs.items()
            if p in r and a in r
        }

    summary = {
        "benchmark": "loader",
        "machine_cores": os.cpu_count(),
        "rows_generated": args.rows,
        "features": args.features,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "goal": "best loader_* (<= 4 workers) >= 1.0x the best raw scan, both layouts, both sizes",
        "prepare_s": round(prep_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "readers_side_by_side": {k: {s: side_by_side(v[s]) for s in v} for k, v in results.items()},
        "best_raw": {k: {s: max(RAW, key=lambda p: v[s][p]["rows_per_s"]) for s in v} for k, v in results.items()},
        "best_loader": {k: {s: best(v[s]) for s in v} for k, v in results.items()},
        "best_loader_ratio_vs_best_raw": {
            k: {s: v[s][best(v[s])]["ratio_vs_best_raw"] for s in v} for k, v in results.items()
        },
        "ratio_vs_best_raw": {
            k: {s: {p: v[s][p]["ratio_vs_best_raw"] for p in paths} for s in v} for k, v in results.items()
        },
        "one_rank_rows_per_s_vs_h100_consumption": {
            "loader_rows_per_s": {k: v["large"][best(v["large"])]["rows_per_s"] for k, v in results.items()},
            "h100_consumes_rows_per_s": H100_ROWS_PER_S,
        },
        "rows_per_cpu_s": {
            k: {s: {p: v[s][p]["rows_per_cpu_s"] for p in paths} for s in v} for k, v in results.items()
        },
        "peak_rss_growth_mb_for_4x_rows": {
            k: {p: round(v["large"][p]["peak_rss_mb"] - v["small"][p]["peak_rss_mb"], 1) for p in paths}
            for k, v in results.items()
        },
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
