"""Communication trade-offs in seconds: every strategy on a simulated cluster whose links are shaped (issue 20).

    .venv/bin/python bench/network.py  (as root) [--workers 2] [--rates 100mbit,1gbit,unshaped] [--rows 200000]
        [--features 64] [--work-dir /tmp/sparkml-bench-network] [--plot docs/bench/network_time_to_target.png]

Brings up ``sparkml_dist.netcluster`` (a head namespace with the Spark master, the driver and so the
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
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparkml_dist import netcluster  # noqa: E402
from sparkml_dist.cluster import package_library  # noqa: E402
from sparkml_dist.compare import summarize_run  # noqa: E402
from sparkml_dist.config import load_config  # noqa: E402
from sparkml_dist.tracking import get_run_record  # noqa: E402

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
LARGE = ("allreduce", "allreduce+topk", "local_sgd k=8", "ps async")
BASELINES = ("gd", "sgd", "averaging")
METRICS = ("val_log_loss", "elapsed_s", "rows_per_s", "compute_s", "comm_s", "data_wait_s", "comm_bytes_per_step",
           "comm_wire_bytes_per_rank_per_step", "steps_per_epoch")  # fmt: skip


def _sets(work: Path, shards: int) -> list[str]:
    return [
        f"paths.work_dir={work}", f"partition.num_shards={shards}", "partition.validation_fraction=0.05",
        "partition.row_group_mb=2", f"partition.output_url={work}/data/partitioned-{shards}",
        f"train.manifest_url={work}/data/partitioned-{shards}", "baselines.max_iterations=100",
        "baselines.partitions_per_shard=1", "baselines.time_cap_s=240", "tracking.log_model=false",
        "launch.start_timeout_s=180", "launch.collective_timeout_s=300",
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
    out = {"run_id": run_id, "job_wall_s": round(wall, 1), "time_to_target_s": s.time_to_target_s,
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rates", default="100mbit,1gbit,unshaped")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--large-steps", type=int, default=6)
    parser.add_argument("--only", default=None, help="comma-separated kinds to run (default: all)")
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
    gen = [f"paths.work_dir={work}", f"generate.rows={args.rows}", f"generate.features={args.features}",
           f"generate.partitions={max(2, k)}"]  # fmt: skip
    _local("jobs.generate", gen)
    for shards in sorted({1, k}):
        _local("jobs.partition", [*gen, *_sets(work, shards)])
    py_files = package_library(work / "dist")
    cfg = load_config(REPO / "conf" / "local.yaml", _sets(work, k))
    dense = ["train.batch_size=1024", "train.optimizer=adam", "train.lr=0.01", f"train.epochs={args.epochs}"]
    large = ["train.model=mlp", "train.hidden_sizes=[4096, 2560]", "train.batch_size=256", "train.optimizer=sgd",
             "train.lr=0.01", "train.epochs=1", f"train.max_steps_per_epoch={args.large_steps}"]  # fmt: skip
    out: dict = {"benchmark": "network", "date": time.strftime("%Y-%m-%d"), "machine_cores": os.cpu_count(),
                 "workers": k, "rows": args.rows, "features": args.features, "rates": rates,
                 "large_model_parameters": 64 * 4096 + 4096 + 4096 * 2560 + 2560 + 2560 + 1,
                 "cpu_fairness": f"each worker host's executor (its rank) pinned to its own core of "
                                 f"{os.cpu_count()}; the head (driver, MLlib's driver side, parameter servers) "
                                 "unpinned, sharing them", "runs": {}}  # fmt: skip
    run_dir = work / "netcluster"
    with netcluster.running(run_dir, workers=k, rate=rates[0], name="sdb", subnet="10.213.11", memory="3g",
                            timeout_s=180, pin=True) as cluster:  # fmt: skip
        # one rank alone (unshaped, same code), the denominator of the measured speedup
        cluster = netcluster.reshape(cluster, "unshaped")
        singles = {}
        for name, problem in (("dense", dense), ("large", large)):
            if (name == "large" and args.skip_large) or (name == "dense" and args.skip_dense):
                continue
            summary, wall = _submit(cluster, "train", [*_sets(work, 1), *problem], 1, py_files, work)
            rec = get_run_record(cfg.tracking, summary["run_id"], METRICS)
            singles[name] = {"run_id": summary["run_id"], "rows_per_s": rec.metrics.get("rows_per_s"),
                             "step_s": _step_s(rec), "job_wall_s": round(wall, 1)}  # fmt: skip
        out["one_rank"] = singles
        for rate in rates:
            cluster = netcluster.reshape(cluster, rate)
            runs: dict = {}
            target = None
            if not args.skip_dense and (only is None or "mllib_lr" in only):
                before = netcluster.link_bytes(cluster)
                summary, wall = _submit(cluster, "baseline", [*_sets(work, k), "baselines.kinds=[mllib_lr]"], k,
                                        py_files, work)  # fmt: skip
                links = _delta(netcluster.link_bytes(cluster), before)
                b = summary["baselines"][0]
                target = b["final"]["val_log_loss"] * 1.01
                out.setdefault("target_log_loss", {})[rate] = round(target, 5)
                runs["mllib_lr"] = {"run_id": b["run_id"], "job_wall_s": round(wall, 1),
                                    "time_to_target_s": b["seconds"], "links": links}  # fmt: skip
            if target is not None and (only is None or "baselines" in only):
                before = netcluster.link_bytes(cluster)
                sets = [*_sets(work, k), f"baselines.kinds=[{','.join(BASELINES)}]",
                        f"baselines.target_log_loss={target}"]  # fmt: skip
                summary, wall = _submit(cluster, "baseline", sets, k, py_files, work)
                links = _delta(netcluster.link_bytes(cluster), before)
                for b in summary["baselines"]:
                    rec = summarize_run(get_run_record(cfg.tracking, b["run_id"], METRICS), target)
                    runs[b["kind"]] = {"run_id": b["run_id"], "job_wall_s_all_three": round(wall, 1),
                                       "time_to_target_s": rec.time_to_target_s, "links_all_three": links}  # fmt: skip
            for name, sets in STRATEGIES.items():
                if args.skip_dense or (only is not None and name not in only):
                    continue
                before = netcluster.link_bytes(cluster)
                summary, wall = _submit(cluster, "train", [*_sets(work, k), *dense, *sets], k, py_files, work)
                links = _delta(netcluster.link_bytes(cluster), before)
                runs[name] = _run_figures(cfg, summary["run_id"], target, links, wall, k, singles.get("dense"))
            if not args.skip_large:
                for name in LARGE:
                    if only is not None and name not in only:
                        continue
                    before = netcluster.link_bytes(cluster)
                    sets = [*_sets(work, k), *large, *STRATEGIES[name]]
                    summary, wall = _submit(cluster, "train", sets, k, py_files, work)
                    links = _delta(netcluster.link_bytes(cluster), before)
                    runs[f"large: {name}"] = _run_figures(cfg, summary["run_id"], None, links, wall, k,
                                                          singles.get("large"))  # fmt: skip
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
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    kinds = sorted({k for r in rates for k in out["runs"][r] if not k.startswith("large: ")})
    for kind in kinds:
        ys = [out["runs"][r].get(kind, {}).get("time_to_target_s") for r in rates]
        axes[0].plot(rates, [y if y is not None else float("nan") for y in ys], marker="o", label=kind)
    axes[0].set(title="dense logistic regression: time to MLlib's loss x 1.01", xlabel="link rate", ylabel="s")
    axes[0].legend(fontsize=7)
    for kind in sorted({k for r in rates for k in out["runs"][r] if k.startswith("large: ")}):
        ys = []
        for r in rates:
            f = out["runs"][r].get(kind, {})
            ys.append((f.get("compute_s_per_step") or 0) + (f.get("comm_s_per_step") or 0) or float("nan"))
        axes[1].plot(rates, ys, marker="o", label=kind.removeprefix("large: "))
    axes[1].set(title="10.75M-parameter MLP: seconds per step (T + C)", xlabel="link rate", ylabel="s")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
