"""Runs -> one comparison table, plots and a markdown report: every communication strategy (allreduce,
local SGD, each with its compressor; feature-parallel) next to the MapReduce baselines.

Every run logs per-step metrics with their elapsed seconds (``elapsed_s``), so runs of different kinds
line up on wall time; the loss-vs-time plot has a log-scale time axis because the kinds differ by
orders of magnitude. Bytes: what each run measured per step and per communication round, beside the
theory: a dense ring allreduce moves 2(K-1)/K x D bytes per rank per step; a treeAggregate moves K x D
bytes of partial gradients towards the driver (plus the broadcast of D bytes to each of K tasks).
Rounds: gradient or parameter exchanges (Horovod trainers), MapReduce iterations (baselines).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from sparkml_dist.config import JobConfig
from sparkml_dist.data.outputs import LocalFS, OutputKind, check_output, files_listed
from sparkml_dist.errors import UserError
from sparkml_dist.experiments import tracking
from sparkml_dist.metrics import PRIMARY
from sparkml_dist.runtime import faults

COMPARE_MARKER = "_compare.json"
COMPARE_OUTPUT = OutputKind("compare", COMPARE_MARKER, files_listed)
"""A report directory is marked by _compare.json, which lists its files; only such a directory is replaced."""

HISTORY_KEYS = ("val_log_loss", "elapsed_s", "rows_per_s", "comm_rounds", "step_val_log_loss", "step_elapsed_s")
"""Per-epoch histories, and the mid-epoch evaluations' (``train.eval_every_steps``) logged at global steps."""


class CompareError(UserError):
    """The runs cannot be compared; the message says which and why."""


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    kind: str
    model: str
    world_size: int
    final_val_log_loss: float
    final_val_accuracy: float
    final_val_auc: float
    wall_s: float
    time_to_target_s: float | None
    rows_per_s: float | None
    bytes_per_step_measured: float | None
    bytes_per_step_theory: float | None
    rounds: int | None
    """Communication rounds to the end of training (gradient/parameter exchanges, or MapReduce iterations)."""
    bytes_per_round_measured: float | None
    job_wall_s: float | None
    """The whole job's wall time, submit to result (trainers log it as job_wall_s), when known."""
    curve: list[tuple[int, float, float]]
    """(step, elapsed seconds, validation log-loss)."""


def summarize_run(record: tracking.RunRecord, target: float | None) -> RunSummary:
    m = record.metrics
    losses = dict(record.histories.get("val_log_loss", []))
    elapsed = dict(record.histories.get("elapsed_s", []))
    curve = [(step, elapsed.get(step, float("nan")), loss) for step, loss in sorted(losses.items())]
    inside = dict(record.histories.get("step_elapsed_s", []))  # mid-epoch evaluations, by global step
    scored = [(t, loss) for _, t, loss in curve] + [
        (inside[step], loss) for step, loss in record.histories.get("step_val_log_loss", []) if step in inside
    ]
    reached = [t for t, loss in scored if target is not None and loss <= target]
    rates = [v for _, v in record.histories.get("rows_per_s", [])]
    world = int(record.tags.get("world_size", "0") or 0)
    measured = m.get("comm_bytes_per_step", m.get("allreduce_bytes_per_step", m.get("bytes_per_iteration")))
    epoch_rounds = [v for _, v in record.histories.get("comm_rounds", [])]
    if epoch_rounds:  # Horovod trainers: rounds per epoch; bytes per round from bytes per step
        rounds: int | None = int(sum(epoch_rounds))
        steps = m.get("steps_per_epoch")
        per_round = measured * steps * len(epoch_rounds) / rounds if measured and steps and rounds else None
    elif "bytes_per_iteration" in m:  # MapReduce baselines: one round per iteration
        rounds, per_round = (int(max(losses)) if losses else None), measured
    else:
        rounds, per_round = None, None
    if "ring_bytes_per_rank_per_step" in m:
        theory = m["ring_bytes_per_rank_per_step"]
    elif measured is not None and world:
        theory = measured * world  # treeAggregate: K partial gradients of D bytes travel to the driver
    else:
        theory = None
    wall = max(elapsed.values()) if elapsed else ((record.end_ms or record.start_ms) - record.start_ms) / 1000
    return RunSummary(
        run_id=record.run_id,
        kind=record.kind,
        model=record.tags.get("model", ""),
        world_size=world,
        final_val_log_loss=float(m.get("val_log_loss", float("nan"))),
        final_val_accuracy=float(m.get("val_accuracy", float("nan"))),
        final_val_auc=float(m.get("val_auc", float("nan"))),
        wall_s=float(wall),
        time_to_target_s=min(reached) if reached else None,
        rows_per_s=sum(rates) / len(rates) if rates else None,
        bytes_per_step_measured=measured,
        bytes_per_step_theory=theory,
        rounds=rounds,
        bytes_per_round_measured=per_round,
        job_wall_s=m.get("job_wall_s"),
        curve=curve,
    )


def select_runs(cfg: JobConfig, run_ids: list[str], data_fingerprint: str | None) -> list[tracking.RunRecord]:
    """The named runs, or the newest finished run of each kind on ``data_fingerprint``; all on one data."""
    if not run_ids:
        if not data_fingerprint:
            raise CompareError("give run ids, or a data fingerprint to take the newest run of each kind")
        run_ids = tracking.latest_runs_by_kind(cfg.tracking, data_fingerprint)
        if not run_ids:
            raise CompareError(
                f"no finished runs with data fingerprint {data_fingerprint!r} in {cfg.tracking.experiment!r}"
            )
    records = [tracking.get_run_record(cfg.tracking, r, HISTORY_KEYS) for r in run_ids]
    prints = {r.run_id: r.tags.get("data_fingerprint") for r in records}
    if len(set(prints.values())) > 1:
        raise CompareError(
            f"the runs were trained on different data (data_fingerprint per run: {prints}); "
            "compare runs of one partition input only"
        )
    return records


def compare(
    cfg: JobConfig, run_ids: list[str], data_fingerprint: str | None, target: float | None, out_dir: str
) -> dict:
    """Write table.csv, table.json, report.md and plots to ``out_dir`` and log them in a comparison run."""
    final = Path(out_dir).absolute()
    check_output(LocalFS(), str(final), COMPARE_OUTPUT, "--out", {})  # before any work: a refused path fails fast
    records = select_runs(cfg, run_ids, data_fingerprint)
    regression = [r.run_id for r in records if f"val_{PRIMARY['regression']}" in r.metrics]
    if regression:
        raise CompareError(
            f"runs {regression} trained regression (val_mse, no val_log_loss); the comparison races classifiers "
            "to a log-loss target: pass only classification runs (--runs) or their data's --data-fingerprint"
        )
    if target is None:
        finals = [r.metrics.get("val_log_loss") for r in records if r.kind.startswith("mllib")]
        target = finals[0] * 1.01 if finals and finals[0] is not None else None
    summaries = [summarize_run(r, target) for r in records]
    final.parent.mkdir(parents=True, exist_ok=True)
    out = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")  # published below in one step
    out.mkdir()
    rows = [{k: v for k, v in asdict(s).items() if k != "curve"} for s in summaries]
    try:
        with open(out / "table.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / "table.json").write_text(json.dumps({"target_log_loss": target, "runs": rows}, indent=2))
        plots = _plots(summaries, out)
        (out / "report.md").write_text(_markdown(summaries, target, plots))
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        (out / COMPARE_MARKER).write_text(json.dumps({"runs": [s.run_id for s in summaries], "files": files}))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    faults.crash_point("compare.before_publish")
    check_output(LocalFS(), str(final), COMPARE_OUTPUT, "--out", {})  # again: nothing may have appeared since
    _publish_dir(out, final)
    out = final
    fingerprint = records[0].tags.get("data_fingerprint", "")
    run = tracking.start_run(
        cfg, {"data_fingerprint": fingerprint, "compared_runs": ",".join(run_ids or [])}, "comparison"
    )
    tracking.log_artifacts(run, str(out))
    tracking.finish_run(run)
    return {"comparison_run_id": run.run_id, "out_dir": str(out), "target_log_loss": target, "runs": rows}


def _publish_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written directory into place: a crash leaves the old report or the new one
    (and at worst, between the two renames, the old one under ``.old-*``)."""
    old = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _plots(summaries: list[RunSummary], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for name, x_index, xlabel in (
        ("loss_vs_wall_time.png", 1, "seconds"),
        ("loss_vs_step.png", 0, "epoch / iteration"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if name == "loss_vs_wall_time.png":
            ax.set_xscale("log")  # the kinds differ by orders of magnitude; linear squashes the fast ones
        for s in summaries:
            ax.plot(
                [c[x_index] for c in s.curve], [c[2] for c in s.curve], marker=".", label=f"{s.kind} ({s.run_id[:6]})"
            )
        ax.set_xlabel(f"{xlabel} (log scale)" if name == "loss_vs_wall_time.png" else xlabel)
        ax.set_ylabel("validation log-loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(fig)
        made.append(name)
    fig, ax = plt.subplots(figsize=(7, 4))
    rated = [s for s in summaries if s.rows_per_s]
    ax.bar([s.kind for s in rated], [s.rows_per_s or 0 for s in rated])
    ax.set_ylabel("rows / s")
    fig.savefig(out / "throughput.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    made.append("throughput.png")
    return made


def _markdown(summaries: list[RunSummary], target: float | None, plots: list[str]) -> str:
    def fmt(v: object) -> str:
        if v is None:
            return "–"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cols = [
        "kind", "run_id", "world_size", "final_val_log_loss", "final_val_accuracy", "final_val_auc",
        "wall_s", "job_wall_s", "time_to_target_s", "rounds", "rows_per_s", "bytes_per_step_measured",
        "bytes_per_round_measured", "bytes_per_step_theory",
    ]  # fmt: skip
    lines = [
        "# Communication strategies vs MapReduce",
        "",
        f"Target validation log-loss: {fmt(target)}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for s in summaries:
        d = asdict(s)
        lines.append("| " + " | ".join(fmt(d[c]) for c in cols) + " |")
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    return os.linesep.join(lines)
