"""Atomic outputs: a crash between writing and publishing leaves the old complete output, never a partial.

Crash points (``faults.crash_point``) sit where each writer has written its temporary copy but not yet
published it; ``SPARKML_DIST_CRASH_AT=name`` SIGKILLs the process there, ``name:raise`` raises. Writers
without Spark (checkpoints, the compare report) are killed for real in a subprocess (a few seconds each);
the Spark writers (partition output; score.py's predictions go through the same ``storage.atomic_output``)
crash in-process with an exception at the same points, since a SIGKILL would take the shared session.
Costs: about 60 s in all on the 2-core CI machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sparkml_dist import checkpoint
from sparkml_dist.config import GenerateConfig, load_config
from sparkml_dist.faults import CRASH_AT, InjectedCrash
from sparkml_dist.manifest import read_manifest
from sparkml_dist.partition import partition
from sparkml_dist.storage import HadoopFS, recover
from sparkml_dist.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(code: str, crash_at: str | None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CRASH_AT}
    if crash_at:
        env[CRASH_AT] = crash_at
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_checkpoint_killed_before_publish_leaves_the_previous_checkpoint(tmp_path):
    url = f"file://{tmp_path}/ckpt"
    save = "from sparkml_dist import checkpoint; checkpoint.save_checkpoint({url!r}, {epoch}, {{'epoch': {epoch}}})"
    assert _run(save.format(url=url, epoch=1), None).returncode == 0
    crashed = _run(save.format(url=url, epoch=2), "checkpoint.before_publish")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert checkpoint.load_latest(url) == {"epoch": 1}
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names[1] == "epoch-000001.pt" and names[0].startswith(".epoch-000002.pt.tmp-")
    assert _run(save.format(url=url, epoch=2), None).returncode == 0  # the next save is unaffected
    assert checkpoint.load_latest(url) == {"epoch": 2}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch-000001.pt", "epoch-000002.pt"]


def test_compare_report_killed_before_publish_leaves_the_previous_report(tmp_path):
    from sparkml_dist import tracking

    cfg = load_config(None, [f"paths.work_dir={tmp_path}"])
    ids = []
    for kind, loss in (("allreduce", 0.5), ("gd", 0.6)):
        run = tracking.start_run(cfg, {"data_fingerprint": "fp", "world_size": "2"}, kind)
        for step in (1, 2):
            tracking.log_metrics(run, {"val_log_loss": loss / step, "elapsed_s": float(step)}, step=step)
        tracking.finish_run(run)
        ids.append(run.run_id)
    out = tmp_path / "report"
    code = (
        "from jobs import compare; compare.main(['--set', 'paths.work_dir={work}', '--runs', {ids}, "
        "'--out', '{out}'{extra}])"
    )
    first = _run(code.format(work=tmp_path, ids=", ".join(map(repr, ids)), out=out, extra=""), None)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(out)
    assert {"report.md", "table.csv", "table.json"} <= set(before)
    target = ", '--target-log-loss', '0.3'"
    crashed = _run(
        code.format(work=tmp_path, ids=", ".join(map(repr, ids)), out=out, extra=target), "compare.before_publish"
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert _snapshot(out) == before  # the old report, byte for byte
    assert json.loads((out / "table.json").read_text())["target_log_loss"] != 0.3


@pytest.fixture(scope="module")
def raw_url(spark, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("atomic-raw") / "data"
    write_dataset(spark, GenerateConfig(output_url=f"file://{out}", rows=600, features=3, partitions=2, seed=3))
    return f"file://{out}"


@pytest.mark.parametrize("point", ["storage.before_publish", "storage.between_renames"])
def test_partition_crash_while_publishing_keeps_the_old_output_recoverable(
    spark, tmp_path, raw_url, point, monkeypatch
):
    sets = [f"paths.work_dir={tmp_path}", f"data.input_url={raw_url}", f"partition.output_url={tmp_path}/out"]
    partition(spark, load_config(None, [*sets, "partition.seed=1"]))
    before = _snapshot(tmp_path / "out")
    monkeypatch.setenv(CRASH_AT, f"{point}:raise")
    with pytest.raises(InjectedCrash):
        partition(spark, load_config(None, [*sets, "partition.seed=2"]))
    monkeypatch.delenv(CRASH_AT)
    siblings = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out"))
    if point == "storage.before_publish":
        assert _snapshot(tmp_path / "out") == before  # untouched, and still what readers get
        assert read_manifest(f"file://{tmp_path}/out").seed == 1
    else:  # the worst moment: old moved aside, new not yet in place; no output at the URL at all
        assert not (tmp_path / "out").exists() and any(s.startswith("out.old-") for s in siblings)
    recover(HadoopFS(spark, f"file://{tmp_path}/out"), f"file://{tmp_path}/out")  # what the next writer does
    assert _snapshot(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
    partition(spark, load_config(None, [*sets, "partition.seed=2"]))  # and the next run publishes normally
    assert read_manifest(f"file://{tmp_path}/out").seed == 2
