"""Loader throughput: our Petastorm path against a raw pyarrow scan of the same files into the same tensors.

    .venv/bin/python bench/loader.py [--rows 2000000] [--features 64] [--batch-size 512] [--work-dir DIR]

Generates ``--rows`` rows with the project's generate + partition code on local[2] Spark, partitioned twice
(array column and scalar columns) into 4 shards. One rank reading all 4 shards (world size 1) is the large
size; rank 0 of 4 (one shard, 1/4 of the rows) is the small one, to show peak RSS does not grow with the
shard. Every path runs in a fresh subprocess, which reports its rows/s into float32 [B, F] / int64 [B]
torch batches and its peak RSS (ru_maxrss). Goal: ``loader`` >= 0.9x ``raw``. Prints one JSON object last.

Paths: ``loader`` (iterate_batches, shuffle off: the same work as the raw scan), ``loader_shuffled``
(row-group order + 20k-row shuffle buffer), ``raw`` (pyarrow.parquet, one row group at a time, the best of
the raw variants here), ``raw_dataset`` (pyarrow.dataset scanner), ``petastorm_default`` (make_batch_reader
with its defaults and its namedtuples: the 0.37x anchor).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PATHS = ("loader", "loader_shuffled", "raw", "raw_dataset", "petastorm_default")
SHARDS = 4


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


def child(task: dict) -> dict:
    """One measurement in this (fresh) process."""
    import dataclasses
    import re
    import warnings

    import numpy as np
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    import torch  # noqa: F401  (imported before the clock starts, like the rank would have)
    from petastorm import make_batch_reader

    from sparkml_dist.config import TrainConfig
    from sparkml_dist.loader import build_loader_spec, iterate_batches
    from sparkml_dist.manifest import read_manifest

    warnings.simplefilter("ignore", FutureWarning)
    m = read_manifest(task["manifest_url"])
    cfg = TrainConfig(batch_size=task["batch_size"], shuffle=task["path"] == "loader_shuffled")
    spec = build_loader_spec(m, 0, task["world_size"], cfg)
    spec = dataclasses.replace(spec, steps=sum(s.rows for s in m.train[:: task["world_size"]]) // spec.batch_size)
    files = [u.removeprefix("file://") for u in spec.urls]
    names, label, bs = list(m.feature_names), m.label_col, spec.batch_size
    cols = [m.features_col] if m.features_col else names
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows, t0 = 0, time.perf_counter()
    if task["path"].startswith("loader"):
        with iterate_batches(spec, 0) as batches:
            for x, _ in batches:
                rows += len(x)
    elif task["path"] == "raw":

        def row_groups():
            for f in files:
                pf = pq.ParquetFile(f)
                for i in range(pf.num_row_groups):
                    yield _arrow_to_numpy(pf.read_row_group(i, columns=[*cols, label]), m.features_col, names, label)

        rows = sum(len(x) for x, _ in _rebatch(row_groups(), bs))
    elif task["path"] == "raw_dataset":
        scan = pads.dataset(files, format="parquet").to_batches(columns=[*cols, label], batch_size=64 * 1024)
        chunks = (_arrow_to_numpy(b, m.features_col, names, label) for b in scan)
        rows = sum(len(x) for x, _ in _rebatch(chunks, bs))
    else:  # petastorm_default: defaults (10 threads, 50 queued row groups), its numpy namedtuples
        fields = [re.escape(c) + "$" for c in [*cols, label]]
        with make_batch_reader(list(spec.urls), schema_fields=fields) as reader:
            chunks = (
                (np.column_stack([getattr(b, c) for c in cols]).astype(np.float32), getattr(b, label).astype(np.int64))
                for b in reader
            )
            rows = sum(len(x) for x, _ in _rebatch(chunks, bs))
    seconds = time.perf_counter() - t0
    return {
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds),
        "rss_after_imports_mb": round(rss_before, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
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
    from sparkml_dist.partition import partition
    from sparkml_dist.session import build_spark_session
    from sparkml_dist.synthetic import write_dataset

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000, help="generated rows; the small size is 1/4")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--work-dir", default=None, help="keep (and reuse) the data here; default: a temp dir")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sparkml-bench-loader-"))
    started = time.perf_counter()
    try:
        urls = prepare(work, args.rows, args.features)
        prep_s = time.perf_counter() - started
        results: dict = {}
        for layout, url in urls.items():
            for size, world in (("small", SHARDS), ("large", 1)):
                task = {"manifest_url": url, "world_size": world, "batch_size": args.batch_size}
                runs = {p: run_child({**task, "path": p}) for p in PATHS}
                raw = max(runs["raw"]["rows_per_s"], runs["raw_dataset"]["rows_per_s"])
                for r in runs.values():
                    r["ratio_vs_raw"] = round(r["rows_per_s"] / raw, 3)
                results.setdefault(layout, {})[size] = runs
                print(layout, size, json.dumps({p: r["rows_per_s"] for p, r in runs.items()}), file=sys.stderr)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    growth = {
        layout: {p: round(r["large"][p]["peak_rss_mb"] - r["small"][p]["peak_rss_mb"], 1) for p in PATHS}
        for layout, r in results.items()
    }
    summary = {
        "benchmark": "loader",
        "machine_cores": os.cpu_count(),
        "rows_generated": args.rows,
        "features": args.features,
        "batch_size": args.batch_size,
        "goal_ratio_vs_raw": 0.9,
        "raw_is": "the faster of raw (pyarrow.parquet per row group) and raw_dataset (pyarrow.dataset)",
        "prepare_s": round(prep_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "loader_ratio_vs_raw": {k: {s: v[s]["loader"]["ratio_vs_raw"] for s in v} for k, v in results.items()},
        "peak_rss_growth_mb_for_4x_rows": growth,
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
