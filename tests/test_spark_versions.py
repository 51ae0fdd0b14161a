"""Setup-time Spark selection: the pins `make setup SPARK=4.0` installs, and the lines make refuses. No Spark."""

from __future__ import annotations

import importlib.util
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("spark_requirements", REPO / "scripts" / "spark_requirements.py")
assert _spec is not None and _spec.loader is not None
spark_requirements = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(spark_requirements)


def test_spark_4_0_swaps_only_pyspark_and_keeps_petastorms_pyarrow() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    default = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    reqs = spark_requirements.requirements(spark_requirements.read_overrides(REPO / "scripts" / "spark-4.0.txt"))
    changed = [(a, b) for a, b in zip(default, reqs, strict=True) if a != b]
    assert changed == [("pyspark==3.5.8", "pyspark==4.0.5")]
    assert "pyarrow==14.0.2" in reqs


def test_an_override_for_an_unpinned_package_is_refused(tmp_path: Path) -> None:
    overrides = tmp_path / "spark-x.txt"
    overrides.write_text("# comment\npyspark==4.0.5\nPy_Arrow-Extra==1\n")
    with pytest.raises(SystemExit, match="py-arrow-extra not among pyproject.toml's requirements"):
        spark_requirements.requirements(spark_requirements.read_overrides(overrides))


@pytest.mark.parametrize("line", ["4.1", "4.2", "3.4"])
def test_make_refuses_a_spark_line_petastorms_pyarrow_cannot_run(line: str) -> None:
    proc = subprocess.run(
        ["make", "-n", "setup", f"SPARK={line}"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert f"SPARK={line} is not supported: use one of 3.5 4.0" in proc.stderr
    assert "pyarrow" in proc.stderr


def test_make_selects_a_venv_per_spark_line() -> None:
    # -n: print, never run (the venvs may or may not exist here; nothing is installed).
    env_free = {"PATH": "/usr/bin:/bin"}
    for line, venv in (("3.5", ".venv"), ("4.0", ".venv-spark4.0")):
        proc = subprocess.run(
            ["make", "-n", "-B", "setup", f"SPARK={line}"], cwd=REPO, capture_output=True, text=True, timeout=60,
            env=env_free,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert f"-m venv {venv}\n" in proc.stdout
