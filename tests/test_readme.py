"""The spark-submit and cluster command blocks of the README and the docs pages run as written, from a fresh shell.

A fresh shell means: the venv not activated, no SPARK_HOME and no PYSPARK_PYTHON, so the blocks work only if
what they call finds its own Spark and Python (bin/spark-submit, make, .venv/bin/python). They run in a
scratch copy of the repository's layout (cwd = its root, as the README assumes) whose conf/local.yaml is the
real one shrunk to a tiny dataset, so `--config conf/local.yaml` trains in seconds and nothing is written
into the real work/. Blocks for YARN and Kubernetes need such a cluster; they are recognised by their
master and are the only ones not run. The docs site (docs/*.md) repeats some of the README's blocks on its
pages; a block that appears in both runs once (ids `local`, `standalone`), and a docs block the README does
not have runs too (ids `local-2`, `standalone-2`, ...), so moving a block into the docs keeps it tested.

Cost: a few minutes on 2 cores (one local spark-submit training, a 2-worker standalone cluster and one
training on it); measured 7 min on Spark 3.5 and 9.4 min on 4.0 on a machine loaded ~7x over its cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparkml_dist.config import load_config
from sparkml_dist.tracking import get_run_record

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
BLOCK_TIMEOUT_S = 420
# Blocks whose master is a YARN or Kubernetes cluster: they cannot run on one machine.
EXTERNAL_MASTERS = ("--master yarn", "--master k8s://")
# The fixed ports the README's standalone block uses (make cluster-up's defaults).
CLUSTER_PORTS = (7077, 8080)
_BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)

TINY = {
    "generate": {"rows": 4000, "features": 8, "partitions": 2},
    "partition": {"num_shards": 2, "row_group_mb": 0.02},
    "train": {"batch_size": 128, "epochs": 2},
    "launch": {"start_timeout_s": 120, "collective_timeout_s": 120, "job_timeout_s": 400},
}


def bash_blocks(text: str) -> list[str]:
    return [m.group(1) for m in _BASH_BLOCK.finditer(text)]


def _code(block: str) -> str:
    """The block without its comments (a comment may mention a command the block does not run)."""
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in block.splitlines())


def submit_blocks(text: str) -> tuple[list[str], list[str]]:
    """(runnable here, external-cluster only) among the blocks that call spark-submit or `make cluster-`."""
    blocks = [b for b in bash_blocks(text) if "spark-submit" in _code(b) or "make cluster-" in _code(b)]
    external = [b for b in blocks if any(m in b for m in EXTERNAL_MASTERS)]
    return [b for b in blocks if b not in external], external


def _fresh_shell_env() -> dict[str, str]:
    """This environment as a new login shell would have it: the venv not on PATH nor activated."""
    venv_bin = str(Path(sys.prefix) / "bin")
    # MAKEFLAGS & co.: under `make test` they would hand make's command-line variables (SPARK=...) to the
    # blocks' own make calls.
    unset = ("SPARK_HOME", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "VIRTUAL_ENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    # The code under test (a clone's editable install points there too; a worktree's may not).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def _scratch_clone(root: Path) -> Path:
    """The repository's layout under ``root`` with this interpreter's venv as .venv and a tiny conf/local.yaml.

    Makefile, pyproject.toml and the setup scripts are copied with an old mtime: make must see the setup as
    done (it is: this venv) and never reinstall into the venv the tests run in; the test checks that first.
    """
    root.mkdir()
    for name in ("jobs", "sparkml_dist", "bin"):
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(Path(sys.prefix))
    for rel in ("Makefile", "pyproject.toml", "scripts"):
        src, dst = REPO / rel, root / rel
        if src.is_dir():
            shutil.copytree(src, dst)
            files = [dst, *dst.rglob("*")]
        else:
            shutil.copy2(src, dst)
            files = [dst]
        for f in files:
            os.utime(f, (0, 0))
    conf = yaml.safe_load((REPO / "conf" / "local.yaml").read_text())
    for section, values in TINY.items():
        conf.setdefault(section, {}).update(values)
    (root / "conf").mkdir()
    (root / "conf" / "local.yaml").write_text(yaml.safe_dump(conf))
    return root


def _run(cmd: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True,
            timeout=BLOCK_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"still running after {BLOCK_TIMEOUT_S} s:\n{cmd}\n{err[-6000:]}")


def _summaries(stdout: str) -> list[dict]:
    """The JSON summaries the jobs printed (each job's last stdout line)."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def test_readme_names_its_spark_submit_blocks() -> None:
    runnable, external = submit_blocks(README.read_text())
    assert any("make cluster-up" in b and "bin/spark-submit" in b for b in runnable), "no standalone block found"
    assert any("make cluster-up" not in b and "bin/spark-submit" in b for b in runnable), "no local block found"
    assert len(external) == 1, "expected one YARN/Kubernetes example block"
    for block in runnable:
        assert ".venv/bin/spark-submit" not in block, (
            "README block calls .venv/bin/spark-submit, which fails unless the venv is activated; "
            f"use bin/spark-submit:\n{block}"
        )


def test_wrapper_finds_the_venv_spark_without_activation() -> None:
    import pyspark

    env = {**_fresh_shell_env(), "SPARKML_DIST_VENV": sys.prefix}
    proc = subprocess.run(
        [str(REPO / "bin" / "spark-submit"), "--version"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"version {pyspark.__version__}" in proc.stdout + proc.stderr


def test_wrapper_names_a_missing_venv(tmp_path: Path) -> None:
    env = {**_fresh_shell_env(), "SPARKML_DIST_VENV": str(tmp_path / "nope")}
    proc = subprocess.run([str(REPO / "bin" / "spark-submit"), "--version"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert str(tmp_path / "nope") in proc.stderr and "make setup" in proc.stderr


def runnable_blocks() -> list[str]:
    """The runnable submit blocks of the README, then those of docs/*.md not already among them, in order."""
    out: list[str] = []
    for text in [README.read_text(), *(p.read_text() for p in sorted(DOCS.glob("*.md")))]:
        out += [b for b in submit_blocks(text)[0] if b not in out]
    return out


def block_ids(blocks: list[str]) -> list[str]:
    ids: list[str] = []
    for block in blocks:
        kind = "standalone" if "make cluster-up" in block else "local"
        n = sum(1 for i in ids if i.split("-")[0] == kind) + 1
        ids.append(kind if n == 1 else f"{kind}-{n}")
    return ids


_RUNNABLE = runnable_blocks()


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory, spark: object) -> Path:
    """The scratch clone with a (tiny) partition output, made by the generate and partition jobs.

    They run in this process on the tests' session (not as the README's blocks: those are the ones under
    test), with the clone's conf/local.yaml and its work/ as work_dir, exactly where the blocks look.
    """
    from jobs import generate, partition

    root = _scratch_clone(tmp_path_factory.mktemp("readme") / "clone")
    uptodate = _run("make -q setup", root, _fresh_shell_env())
    assert uptodate.returncode == 0, f"make would set up again in the scratch clone:\n{uptodate.stdout}"
    argv = ["--config", str(root / "conf" / "local.yaml"), "--set", f"paths.work_dir={root / 'work'}"]
    generate.main(argv)
    partition.main(argv)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("block", _RUNNABLE, ids=block_ids(_RUNNABLE))
def test_readme_block_runs_as_written(block: str, clone: Path) -> None:
    on_cluster = "make cluster-up" in block
    if on_cluster:
        for port in CLUSTER_PORTS:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    pytest.fail(f"port {port} is in use; the README's standalone block needs it (make cluster-up)")
    env = _fresh_shell_env()
    cfg = load_config(clone / "conf" / "local.yaml", [f"paths.work_dir={clone / 'work'}"])
    try:
        proc = _run(block, clone, env)
    finally:
        if on_cluster:
            _run(".venv/bin/python -m sparkml_dist.cluster stop --run-dir work/cluster", clone, env)
    assert proc.returncode == 0, f"README block failed ({proc.returncode}):\n{block}\n{proc.stderr[-6000:]}"
    trained = [s for s in _summaries(proc.stdout) if "run_id" in s]
    assert trained, f"no training summary from:\n{block}\n{proc.stdout[-2000:]}"
    record = get_run_record(cfg.tracking, trained[-1]["run_id"], ())
    assert record.status == "FINISHED"
    assert record.tags["spark_app_id"].startswith("app-" if on_cluster else "local-"), record.tags
