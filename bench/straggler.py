"""One slow worker against none: bulk-synchronous AllReduce against the parameter server's paces.

    .venv/bin/python bench/straggler.py [--ranks 2 4] [--rows 200000] [--steps-per-epoch 25] [--epochs 16]
                                        [--repeats 2]

For each K (ranks/workers): generate and partition the default problem into K shards; MLlib's logistic
regression on them sets the target (its final validation log-loss x 1.01, as bench/compare.py); then each
kind is trained twice as ``python -m jobs.train`` — without a straggler, and with rank/worker 1 sleeping
its own measured step time before every step (``launch.fault_kind=slow``: its steps take about 2x) — and
reports (an "epoch" is cut to --steps-per-epoch steps per rank, so the time to target is resolved to
about that many steps instead of a whole pass; medians over --repeats interleaved runs):

- ``time_to_target_s``: training seconds (the run's elapsed_s) until the first epoch whose validation
  log-loss is at or below the target; ``slowdown``: with straggler / without (goal: the best ps_ssp/ps_async
  <= 1.2, while BSP AllReduce is expected near 2);
- ``bytes_per_step``: what one rank/worker moves per step, measured: AllReduce's ring bytes per rank
  (comm_wire_bytes_per_rank_per_step) and the parameter server's push + pull bytes per worker, and
  ``server_bytes_per_step``: what all server shards together receive and send per global step (K pushes
  and K pulls: O(K x D), against the ring's 2(K-1)/K x D per rank).

Prints one JSON object.
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

KINDS: dict[str, list[str]] = {
    "allreduce": [],
    "ps_bsp": ["comm.strategy=parameter_server", "comm.pace=ssp", "comm.staleness=0"],
    "ps_ssp2": ["comm.strategy=parameter_server", "comm.pace=ssp", "comm.staleness=2"],
    "ps_ssp8": ["comm.strategy=parameter_server", "comm.pace=ssp", "comm.staleness=8"],
    "ps_async": ["comm.strategy=parameter_server", "comm.pace=async"],
}


def _job(module: str, sets: list[str]) -> tuple[dict, float]:
    args = [sys.executable, "-m", module, "--config", "conf/local.yaml"]
    for s in sets:
        args += ["--set", s]
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.monotonic() - t0


def _history(tracking_uri: str, run_id: str) -> tuple[list[dict], dict]:
    from mlflow.tracking import MlflowClient

    from sparkml_dist.experiments.metric_names import mlflow_key

    client = MlflowClient(tracking_uri)
    keys = ("val_log_loss", "elapsed_s", "epoch_s")
    series = {k: dict((m.step, m.value) for m in client.get_metric_history(run_id, mlflow_key(k))) for k in keys}
    epochs = sorted(series["val_log_loss"])
    logged = client.get_run(run_id).data.metrics
    finals = ("comm_bytes_per_step", "comm_wire_bytes_per_rank_per_step", "ring_bytes_per_rank_per_step",
              "staleness_mean", "staleness_max", "bound_wait_s")  # fmt: skip
    return [{"epoch": e, **{k: series[k].get(e) for k in keys}} for e in epochs], {
        k: logged.get(mlflow_key(k)) for k in finals
    }


def _time_to(history: list[dict], target: float) -> float | None:
    for h in history:
        if h["val_log_loss"] is not None and h["val_log_loss"] <= target:
            return round(h["elapsed_s"], 3)
    return None


def _median(values: list) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if len(vals) < len(values) or not vals:
        return None  # a run that never reached the target: no time to report
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def _one_k(k: int, args: argparse.Namespace, root: Path) -> dict:
    work = root / f"k{k}"
    base = [f"paths.work_dir={work}", "tracking.log_model=false", "tracking.system_metrics_s=0",
            f"generate.rows={args.rows}", f"partition.num_shards={k}", f"generate.partitions={k}",
            f"spark.master=local[{max(2, k)}]"]  # fmt: skip
    _job("jobs.generate", base)
    _job("jobs.partition", base)
    mllib, _ = _job("jobs.baseline", [*base, "baselines.kinds=[mllib_lr]"])
    target = mllib["baselines"][0]["final"]["val_log_loss"] * 1.01
    train = [*base, f"train.epochs={args.epochs}", f"train.max_steps_per_epoch={args.steps_per_epoch}"]
    out: dict = {"ranks": k, "target_log_loss": round(target, 6), "kinds": {}}
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for _ in range(args.repeats):
        for kind, sets in KINDS.items():
            res, wall = _job("jobs.train", [*train, *sets])
            hist, metrics = _history(res["tracking_uri"], res["run_id"])
            step_s = sum(h["epoch_s"] for h in hist) / (len(hist) * args.steps_per_epoch)
            slow_sets = ["launch.fault_kind=slow", "launch.fault_rank=1", f"launch.fault_delay_s={step_s:.6f}"]
            slow, slow_wall = _job("jobs.train", [*train, *sets, *slow_sets])
            slow_hist, slow_metrics = _history(slow["tracking_uri"], slow["run_id"])
            runs[kind].append({
                "step_s": step_s, "fast": _time_to(hist, target), "slow": _time_to(slow_hist, target),
                "wall": wall, "slow_wall": slow_wall, "final": hist[-1]["val_log_loss"],
                "slow_final": slow_hist[-1]["val_log_loss"], "m": metrics, "sm": slow_metrics,
            })  # fmt: skip
    for kind, rs in runs.items():
        ps = kind.startswith("ps_")
        m, sm = rs[-1]["m"], rs[-1]["sm"]
        per_step = m["comm_bytes_per_step"] if ps else m["comm_wire_bytes_per_rank_per_step"]
        t_fast, t_slow = _median([r["fast"] for r in rs]), _median([r["slow"] for r in rs])
        out["kinds"][kind] = {
            "step_ms": round(_median([r["step_s"] for r in rs]) * 1000, 3),
            "time_to_target_s": t_fast,
            "time_to_target_with_straggler_s": t_slow,
            "slowdown": round(t_slow / t_fast, 3) if t_fast and t_slow else None,
            "runs_time_to_target_s": [[r["fast"], r["slow"]] for r in rs],
            "final_val_log_loss": round(rs[-1]["final"], 6),
            "final_val_log_loss_with_straggler": round(rs[-1]["slow_final"], 6),
            "job_wall_s": round(_median([r["wall"] for r in rs]), 1),
            "job_wall_with_straggler_s": round(_median([r["slow_wall"] for r in rs]), 1),
            "bytes_per_step": round(per_step, 1),
            "server_bytes_per_step": round(per_step * k, 1) if ps else None,
            "ring_bytes_per_rank_per_step": m["ring_bytes_per_rank_per_step"],
            **({"staleness_mean": m["staleness_mean"], "staleness_mean_with_straggler": sm["staleness_mean"],
                "staleness_max_with_straggler": sm["staleness_max"],
                "bound_wait_s_per_epoch_with_straggler": sm["bound_wait_s"]} if ps else {}),
        }  # fmt: skip
    relaxed = ("ps_ssp2", "ps_ssp8", "ps_async")
    fastest = [v["slowdown"] for n, v in out["kinds"].items() if n in relaxed and v["slowdown"]]
    out["goal_best_async_slowdown_le_1_2"] = bool(fastest and min(fastest) <= 1.2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--steps-per-epoch", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work-dir", default="/tmp/sparkml-bench-straggler")
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    root = Path(args.work_dir)
    shutil.rmtree(root, ignore_errors=True)
    result = {"benchmark": "straggler", "rows": args.rows, "epochs": args.epochs, "cores": os.cpu_count(),
              "steps_per_epoch": args.steps_per_epoch, "repeats": args.repeats,
              "by_ranks": [_one_k(k, args, root) for k in args.ranks]}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
