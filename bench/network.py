"""Communication trade-offs in seconds: every strategy on a simulated cluster whose links are shaped (issue 20).

    .venv/bin/python bench/network.py  (as root) [--workers 2] [--rates 100mbit,1gbit,unshaped] [--rows 200000]
        [--features 64] [--work-dir /tmp/sparkml-bench-network] [--plot docs/bench/network_time_to_target.png]

Brings up ``sparkml_dist.runtime.netcluster`` (a head namespace with the Spark master, the driver and so the
parameter servers; one namespace per worker host, one single-core executor each, pinned to its own CPU) and,
for each link rate (changed in place), runs every kind as the job a user submits (``spark-submit`` from the
head): MLlib (its final log-loss x 1.01 is the target), the MapReduce baselines (gd, sgd, averaging: one
job), AllReduce (none, fp16, top-k 10%), local SGD (k=8) and the parameter server (BSP, SSP s=2, async) on
the dense problem (logistic regression); then a model large enough that communication dominates at
100 Mbit/s (an MLP 64 -> 4096 -> 2560 -> 1, 10.75M parameters, a few steps) with the strategies that
differ most. Per run: job wall time, time to target, the strategy's own byte accounting next to the bytes
each host's link carried (its counters), and the per-step compute T and communication C the ranks measured,
with S = K / (1 + C / T) beside the measured speedup over one rank (same code, one worker, unshaped).

Prints one JSON object; ``--plot`` writes time to target (dense) and step time (large model) against link rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparkml_dist.compare import summarize_run  # noqa: E402
from sparkml_dist.config import load_config  # noqa: E402
from sparkml_dist.experiments.tracking import get_run_record  # noqa: E402
from sparkml_dist.runtime import netcluster  # noqa: E402
from sparkml_dist.runtime.cluster import package_library  # noqa: E402

PS = ["comm.strategy=parameter_server"]
STRATEGIES: dict[str, list[str]] = {
    "allreduce": [],
    "allreduce+fp16": ["comm.compression=fp16"],
    "allreduce+topk": ["comm.compression=topk", "comm.topk_ratio=0.1"],
    "local_sgd k=8": ["comm.strategy=local_sgd", "comm.local_steps=8"],
    "ps bsp": [*PS, "comm.pace=ssp", "comm.staleness=0"],
    "ps ssp s=2": [*PS, "comm.pace=ssp", "comm.staleness=2"],
    "ps async": [*PS, "comm.pace=async"],
}
STRATEGIES["allreduce+nonzero"] = ["comm.compression=nonzero"]  # exact, for sparse gradients
# On the sparse problem the kinds above exchange row-sparse gradients (train.sparse_gradients=auto: the touched
# rows; the parameter server pulls and pushes only them); these are the dense-gradient runs beside them.
STRATEGIES["allreduce dense"] = ["train.sparse_gradients=off"]
STRATEGIES["ps async dense"] = [*PS, "comm.pace=async", "train.sparse_gradients=off"]
DENSE = ("allreduce", "allreduce+fp16", "allreduce+topk", "local_sgd k=8", "ps bsp", "ps ssp s=2", "ps async")
LARGE = ("allreduce", "allreduce+topk", "local_sgd k=8", "ps async")
SPARSE = ("allreduce dense", "allreduce", "allreduce+nonzero", "allreduce+fp16", "allreduce+topk", "local_sgd k=8",
          "ps bsp", "ps ssp s=2", "ps async", "ps async dense")  # fmt: skip
BASELINES = ("gd", "sgd", "averaging")
COIN_FLIP = math.log(2)  # the log-loss of predicting 1/2 (every problem of this bench is binary)
METRICS = ("val_log_loss", "elapsed_s", "rows_per_s", "compute_s", "comm_s", "data_wait_s", "comm_bytes_per_step",
           "comm_wire_bytes_per_rank_per_step", "steps_per_epoch")  # fmt: skip


@dataclass(frozen=True)
class Problem:
    """One training problem of the bench: its data (partitioned once per shard count), its kinds, how it trains."""

    key: str
    data_name: str
    prefix: str
    """Prefix of its kinds' keys in ``runs`` ("" for the dense problem, as in earlier JSON)."""
    baselines: bool
    """MLlib (whose final log-loss x 1.01 is the target) and the MapReduce baselines run on it."""
    kinds: tuple[str, ...]
    train: list[str]
    data: list[str] = field(default_factory=list)


def _sets(work: Path, shards: int, data: str = "partitioned") -> list[str]:
    return [
        f"paths.work_dir={work}", f"partition.num_shards={shards}", "partition.validation_fraction=0.05",
        "partition.row_group_mb=2", f"partition.output_url={work}/data/{data}-{shards}",
        f"train.manifest_url={work}/data/{data}-{shards}", "baselines.max_iterations=100",
        "baselines.partitions_per_shard=1", "baselines.time_cap_s=240", "tracking.log_model=false",
        "launch.start_timeout_s=180", "launch.collective_timeout_s=300",
    ]  # fmt: skip


def _sparse_data(work: Path, rows: int, buckets: int) -> list[str]:
    """The Criteo-like table of bench/sparse.py: 13 numeric columns (5% nulls, mean-filled, log1p) and 26
    Zipf categorical columns hashed one-hot into ``buckets`` each (40,329: ~2^20 dimensions), sparse layout."""
    cats = "[" + ",".join(f"c{i}" for i in range(1, 27)) + "]"
    fill = "{" + ", ".join(f"i{i}: mean" for i in range(1, 14)) + "}"
    return [
        "generate.layout=criteo", f"generate.rows={rows}", "generate.partitions=4", "generate.null_fraction=0.05",
        f"generate.output_url={work}/data/raw-sparse", f"data.input_url={work}/data/raw-sparse",
        f"data.categorical_cols={cats}", f"data.null_fill={fill}", "data.numeric_transform=log1p",
        f"data.hash_buckets={buckets}",
    ]  # fmt: skip


def _local(module: str, sets: list[str]) -> dict:
    """Data preparation on a local master (not the thing measured)."""
    args = [sys.executable, "-m", module, "--config", "conf/local.yaml", *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _submit(cluster, job: str, sets: list[str], executors: int, py_files: Path, work: Path) -> tuple[dict, float]:
    args = ["--config", str(REPO / "conf" / "local.yaml"), *[x for s in sets for x in ("--set", s)]]
    conf = {"spark.local.dir": str(work / "spark-local")}
    cmd = netcluster.submit_command(cluster, REPO / "jobs" / f"{job}.py", args, executors, py_files, "2g", "3g", conf)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=work, env=cluster.env("head"), capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        errors = [x for x in proc.stderr.splitlines() if " INFO " not in x]
        raise RuntimeError(f"{job} {sets[-3:]} failed ({proc.returncode}):\n" + "\n".join(errors[-40:]))
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def _delta(after: dict, before: dict) -> dict[str, dict[str, int]]:
    return {h: {k: after[h][k] - before[h][k] for k in ("sent", "received")} for h in after}


def _step_s(record) -> float | None:
    """Seconds per training step of the last epoch (data wait + compute + communication, averaged over ranks)."""
    m = record.metrics
    per_epoch = int(record.histories.get("steps_per_epoch", [(0, 0)])[-1][1])
    if not per_epoch or "compute_s" not in m:
        return None
    return (m.get("data_wait_s", 0.0) + m["compute_s"] + m.get("comm_s", 0.0)) / per_epoch


def _run_figures(
    cfg, run_id: str, target: float | None, links: dict, wall: float, workers: int, one: dict | None = None
) -> dict:
    """One run's figures; ``one``: the one-rank run of the same problem (``step_s``, ``rows_per_s``)."""
    record = get_run_record(cfg.tracking, run_id, METRICS)
    s = summarize_run(record, target)
    m = record.metrics
    # compute_s, comm_s, data_wait_s are the last epoch's totals (averaged over ranks); per step below
    per_epoch = int(record.histories.get("steps_per_epoch", [(0, 0)])[-1][1]) or None
    epochs = len(record.histories.get("elapsed_s", [])) or 1
    steps = per_epoch * epochs if per_epoch else None
    out: dict = {"run_id": run_id, "job_wall_s": round(wall, 1), "time_to_target_s": s.time_to_target_s,
           "final_val_log_loss": round(s.final_val_log_loss, 5), "rows_per_s": s.rows_per_s,
           "links": links}  # fmt: skip
    sent = [links[f"w{i}"]["sent"] for i in range(1, workers + 1)]
    out["link_bytes_sent_per_worker_mean"] = round(sum(sent) / len(sent))
    out["link_bytes_head_received"] = links["head"]["received"]
    if "compute_s" in m and "comm_s" in m and per_epoch:
        t, c = m["compute_s"] / per_epoch, m["comm_s"] / per_epoch
        out.update({"compute_s_per_step": round(t, 5), "comm_s_per_step": round(c, 5),
                    "data_wait_s_per_step": round(m.get("data_wait_s", 0.0) / per_epoch, 5),
                    "predicted_speedup": round(workers / (1 + c / t), 3) if t > 0 else None})  # fmt: skip
    wire = m.get("comm_wire_bytes_per_rank_per_step")
    if wire is not None and steps:
        out["accounted_wire_bytes_per_rank"] = round(wire * steps)
        out["accounted_payload_bytes_per_step"] = round(m.get("comm_bytes_per_step", 0.0))
        out["link_over_accounted"] = round(out["link_bytes_sent_per_worker_mean"] / max(1.0, wire * steps), 3)
    if one:
        # K x (one rank's seconds per step) / (this run's seconds per step): the speedup S of seed 001,
        # measured; and the ratio of rows/s (whole epochs, validation and logging included)
        step = _step_s(record)
        if step and one.get("step_s"):
            out["measured_speedup"] = round(workers * one["step_s"] / step, 3)
        if one.get("rows_per_s") and s.rows_per_s:
            out["throughput_vs_one_rank"] = round(s.rows_per_s / one["rows_per_s"], 3)
    return out


def _problem_runs(
    cluster,
    work: Path,
    k: int,
    py_files: Path,
    cfg,
    problem: Problem,
    one: dict | None,
    only: set | None,
    fixed_target: float | None = None,
) -> tuple[dict, float | None]:
    """Every kind of one problem at the cluster's current rate: MLlib (the target), each strategy, then the
    MapReduce baselines; returns the runs (keyed with the problem's prefix) and the target. ``fixed_target``
    (an earlier run's target of the same problem) replaces MLlib's, so a part of the kinds can run alone."""
    runs: dict = {}
    target = None
    prefix = problem.prefix
    base = [*_sets(work, k, problem.data_name), *problem.data]

    def wanted(kind: str) -> bool:
        return only is None or kind in only

    def measured(job: str, sets: list[str]) -> tuple[dict, float, dict]:
        before = netcluster.link_bytes(cluster)
        summary, wall = _submit(cluster, job, sets, k, py_files, work)
        return summary, wall, _delta(netcluster.link_bytes(cluster), before)

    if problem.baselines and wanted("mllib_lr"):
        summary, wall, links = measured("baseline", [*base, "baselines.kinds=[mllib_lr]"])
        b = summary["baselines"][0]
        target = b["final"]["val_log_loss"] * 1.01
        runs[f"{prefix}mllib_lr"] = {"run_id": b["run_id"], "job_wall_s": round(wall, 1),
                                     "final_val_log_loss": round(b["final"]["val_log_loss"], 5),
                                     "time_to_target_s": b["seconds"], "links": links}  # fmt: skip
    overfit = target is not None and target > COIN_FLIP
    if fixed_target is not None:  # known before the strategies run: their times are measured against it
        target = fixed_target
    for name in problem.kinds:
        if wanted(name):
            summary, wall, links = measured("train", [*base, *problem.train, *STRATEGIES[name]])
            runs[f"{prefix}{name}"] = _run_figures(cfg, summary["run_id"], target, links, wall, k, one)
    mllib = runs.get(f"{prefix}mllib_lr")
    if mllib is not None and (fixed_target is not None or overfit):
        # MLlib's seconds are its time to its own final loss (it is evaluated once, at the end), not to this target
        mllib["time_to_target_s_of_its_own_final"] = mllib.pop("time_to_target_s")
    if fixed_target is None and overfit and mllib is not None:
        target = _retarget(cfg, {k: v for k, v in runs.items() if v is not mllib}, mllib["final_val_log_loss"])
    # the MapReduce baselines last: their target (and early stop) may be the fallback one
    if problem.baselines and target is not None and wanted("baselines"):
        sets = [*base, f"baselines.kinds=[{','.join(BASELINES)}]", f"baselines.target_log_loss={target}"]
        summary, wall, links = measured("baseline", sets)
        for b in summary["baselines"]:
            rec = summarize_run(get_run_record(cfg.tracking, b["run_id"], METRICS), target)
            runs[f"{prefix}{b['kind']}"] = {
                "run_id": b["run_id"], "job_wall_s_all_three": round(wall, 1),
                "time_to_target_s": rec.time_to_target_s, "links_all_three": links,
                "iterations": b["iterations"], "stopped": b["stopped"], "seconds": round(b["seconds"], 1),
                "final_val_log_loss": round(b["final"]["val_log_loss"], 5),
            }  # fmt: skip
    if fixed_target is not None:
        for f in runs.values():
            f["target_note"] = f"target given on the command line (--target {fixed_target})"
    return runs, target


def _retarget(cfg, runs: dict, mllib_final: float) -> float | None:
    """MLlib's loss x 1.01 is no target when MLlib ended worse than a coin flip (unregularized L-BFGS on ~2^20
    sparse features and fewer rows overfits to a log-loss of ~11): then the target is the best final loss any
    kind reached x 1.01, each kind's time to it recomputed, and the reason recorded in its runs."""
    finals = [f["final_val_log_loss"] for f in runs.values() if f.get("final_val_log_loss") is not None]
    if not finals:
        return None
    target = min(finals) * 1.01
    for f in runs.values():
        f["target_note"] = (f"MLlib ended at {mllib_final:.4f} (worse than a coin flip, {COIN_FLIP:.4f}): "
                            f"target is the best final loss of any kind x 1.01 = {target:.5f}")  # fmt: skip
        if f.get("final_val_log_loss") is not None:
            record = get_run_record(cfg.tracking, f["run_id"], METRICS)
            f["time_to_target_s"] = summarize_run(record, target).time_to_target_s
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rates", default="100mbit,1gbit,unshaped")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--large-steps", type=int, default=6)
    parser.add_argument("--sparse", action="store_true", help="also the sparse problem (Criteo-like, ~2^20 dims)")
    parser.add_argument("--sparse-rows", type=int, default=300_000)
    parser.add_argument("--sparse-epochs", type=int, default=3)
    parser.add_argument("--buckets", type=int, default=40329, help="sparse: hash buckets per categorical column")
    parser.add_argument("--cpus-per-host", type=float, default=None,
                        help="cap each worker host at this many CPUs (default: uncapped, each pinned to its own "
                             "core, while hosts <= cores; 0.8 x cores / hosts when there are more)")  # fmt: skip
    parser.add_argument("--only", default=None, help="comma-separated kinds to run (default: all)")
    parser.add_argument("--target", type=float, default=None,
                        help="a fixed target log-loss (an earlier run's) instead of MLlib's x 1.01, e.g. to run "
                             "only the baselines of a problem with --only baselines")  # fmt: skip
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-dense", action="store_true", help="only the large model (and its one-rank run)")
    parser.add_argument("--work-dir", default="/tmp/sparkml-bench-network")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    why = netcluster.why_not_here()
    if why:
        raise SystemExit(f"bench/network.py needs the simulated cluster: {why}")
    rates = args.rates.split(",")
    for r in rates:
        netcluster.rate_bits(r)
    only = set(args.only.split(",")) if args.only else None
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    k = args.workers
    cores = os.cpu_count() or 1
    cpus = args.cpus_per_host
    if cpus is None and k > cores:
        cpus = round(0.8 * cores / k, 2)
    if cpus is not None and (why := netcluster.why_no_cpu_cap(cpus)):
        raise SystemExit(f"bench/network.py cannot cap the hosts' CPUs: {why}")
    gen = [f"paths.work_dir={work}", f"generate.rows={args.rows}", f"generate.features={args.features}",
           f"generate.partitions={max(2, k)}"]  # fmt: skip
    problems = []
    if not args.skip_dense:
        dense = ["train.batch_size=1024", "train.optimizer=adam", "train.lr=0.01", f"train.epochs={args.epochs}"]
        problems.append(Problem("dense", "partitioned", "", True, DENSE, dense))
    if not args.skip_large:
        large = ["train.model=mlp", "train.hidden_sizes=[4096, 2560]", "train.batch_size=256", "train.optimizer=sgd",
                 "train.lr=0.01", "train.epochs=1", f"train.max_steps_per_epoch={args.large_steps}"]  # fmt: skip
        problems.append(Problem("large", "partitioned", "large: ", False, LARGE, large))
    if args.sparse:
        sparse = [
            "train.batch_size=4096",
            "train.optimizer=adam",
            "train.lr=0.005",
            f"train.epochs={args.sparse_epochs}",
        ]
        data = _sparse_data(work, args.sparse_rows, args.buckets)
        problems.append(Problem("sparse", "sparse", "sparse: ", True, SPARSE, sparse, data))
        _local("jobs.generate", [f"paths.work_dir={work}", *data])
    if any(p.data_name == "partitioned" for p in problems):
        _local("jobs.generate", gen)
    for p in problems:
        for shards in sorted({1, k}):
            marker = work / "data" / f"{p.data_name}-{shards}" / "_manifest.json"
            if not marker.exists():
                _local("jobs.partition", [*gen, *_sets(work, shards, p.data_name), *p.data])
    py_files = package_library(work / "dist")
    cfg = load_config(REPO / "conf" / "local.yaml", _sets(work, k))
    out: dict = {"benchmark": "network", "date": time.strftime("%Y-%m-%d"), "machine_cores": cores,
                 "workers": k, "rows": args.rows, "features": args.features, "rates": rates,
                 "cpus_per_host": cpus,
                 "large_model_parameters": 64 * 4096 + 4096 + 4096 * 2560 + 2560 + 2560 + 1,
                 "cpu_fairness": (f"each worker host's executor (its rank) pinned to core i mod {cores} and capped "
                                  f"at {cpus} CPU by CFS bandwidth control (a cgroup per host), the one-rank "
                                  "runs under the same cap; the head (driver, MLlib's driver side, parameter "
                                  "servers) uncapped, sharing the rest" if cpus is not None else
                                  f"each worker host's executor (its rank) pinned to its own core of {cores}; the "
                                  "head (driver, MLlib's driver side, parameter servers) unpinned, sharing "
                                  "them"), "runs": {}, "link_check": {}}  # fmt: skip
    if args.sparse:
        out.update(sparse_rows=args.sparse_rows, sparse_dimension=13 + 26 * args.buckets)
    run_dir = work / "netcluster"
    with netcluster.running(run_dir, workers=k, rate=rates[0], name="sdb", subnet="10.213.11", memory="3g",
                            timeout_s=180, pin=True, cpus=cpus) as cluster:  # fmt: skip
        # one rank alone (unshaped, same code, same CPU share), the denominator of the measured speedup
        cluster = netcluster.reshape(cluster, "unshaped")
        singles = {}
        for p in problems:
            if only is not None and not only & set(p.kinds):
                continue  # no strategy of it runs: no denominator needed
            one = [*_sets(work, 1, p.data_name), *p.data, *p.train]
            summary, wall = _submit(cluster, "train", one, 1, py_files, work)
            rec = get_run_record(cfg.tracking, summary["run_id"], METRICS)
            singles[p.key] = {"run_id": summary["run_id"], "rows_per_s": rec.metrics.get("rows_per_s"),
                              "step_s": _step_s(rec), "job_wall_s": round(wall, 1)}  # fmt: skip
        out["one_rank"] = singles
        for rate in rates:
            cluster = netcluster.reshape(cluster, rate)
            # what the shaping really gives one TCP stream, worker to head and worker to worker
            out["link_check"][rate] = [netcluster.probe(cluster, "w1", "head", 2.0)]
            if k > 1:
                out["link_check"][rate].append(netcluster.probe(cluster, "w2", "w1", 2.0))
            runs: dict = {}
            for p in problems:
                got, target = _problem_runs(cluster, work, k, py_files, cfg, p, singles.get(p.key), only, args.target)
                runs.update(got)
                if target is not None:
                    key = "target_log_loss" if p.key == "dense" else f"{p.key}_target_log_loss"
                    out.setdefault(key, {})[rate] = round(target, 5)
            out["runs"][rate] = runs
            print(json.dumps({"rate": rate, "done": sorted(runs)}), file=sys.stderr, flush=True)
    if args.plot:
        _plot(out, Path(args.plot))
    print(json.dumps(out))


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = out["rates"]
    kinds = sorted({k for r in rates for k in out["runs"][r]})
    large = f"{out['large_model_parameters'] / 1e6:.2f}M-parameter MLP: seconds per step (T + C)"
    panels = [("", "dense logistic regression: time to MLlib's loss x 1.01", "time_to_target_s"),
              ("large: ", large, None),
              ("sparse: ", "sparse ~2^20 logistic regression: time to target", "time_to_target_s")]  # fmt: skip
    panels = [x for x in panels if any(k.startswith(x[0]) and (x[0] or ": " not in k) for k in kinds)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (prefix, title, metric) in zip(axes[0], panels, strict=True):
        ax.set_prop_cycle(color=[plt.get_cmap("tab20")(i) for i in range(20)])  # one colour per kind (default: 10)
        missing = []
        for kind in [k for k in kinds if k.startswith(prefix) and (prefix or ": " not in k)]:
            ys = []
            for r in rates:
                f = out["runs"][r].get(kind, {})
                if metric:
                    y = f.get(metric)
                else:
                    y = (f.get("compute_s_per_step") or 0) + (f.get("comm_s_per_step") or 0) or None
                ys.append(y if y is not None else float("nan"))
            if all(math.isnan(y) for y in ys):  # nothing to draw
                missing.append(kind.removeprefix(prefix))
                continue
            ax.plot(rates, ys, marker="o", label=kind.removeprefix(prefix))
        if missing:
            note = "no value at any rate (not reached, or no T + C): " + ", ".join(missing)
            ax.text(0.01, 0.99, note, transform=ax.transAxes, fontsize=7, va="top")
        ax.set(title=title, xlabel="link rate", ylabel="s")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{out['workers']} worker hosts" + (f", {out['cpus_per_host']} CPU each" if out.get("cpus_per_host") else "")
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
