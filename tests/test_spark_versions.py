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


def test_the_modern_stack_drops_petastorm_and_swaps_the_stacks_pins() -> None:
    reqs = spark_requirements.requirements(spark_requirements.read_overrides(REPO / "scripts" / "stack-modern.txt"))
    by_name = {spark_requirements._name(r): r for r in reqs}
    assert "petastorm" not in by_name  # it cannot import on pyarrow >= 15; the Arrow reader replaces it
    pins = {name: tuple(int(p) for p in by_name[name].split("==")[1].split(".")[:2]) for name in
            ("pyspark", "pyarrow", "numpy", "pandas", "torch")}  # fmt: skip
    assert pins["pyspark"] >= (4, 2) and pins["pyarrow"] >= (18, 0) and pins["numpy"] >= (2, 0)
    assert pins["pandas"] >= (2, 2) and pins["torch"] > (2, 13)
    # Everything else is pyproject's, in pyproject's order (horovod, the dev extra ...).
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    default = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    kept = [r for r in default if spark_requirements._name(r) not in {"petastorm", *pins, "mlflow"}]
    assert [r for r in reqs if r in kept] == kept


def test_a_pins_file_drops_with_a_bang_and_refuses_a_drop_it_cannot_apply(tmp_path: Path) -> None:
    pins = tmp_path / "stack-x.txt"
    pins.write_text("!petastorm   # gone\npyspark==4.3.0\n")
    reqs = spark_requirements.requirements(spark_requirements.read_overrides(pins))
    assert "pyspark==4.3.0" in reqs and not any(r.startswith("petastorm") for r in reqs)
    pins.write_text("!no-such-package\n")
    with pytest.raises(SystemExit, match="no-such-package not among pyproject.toml's requirements"):
        spark_requirements.requirements(spark_requirements.read_overrides(pins))
    pins.write_text("!petastorm==0.12.1\n")
    with pytest.raises(SystemExit, match="takes a bare package name"):
        spark_requirements.read_overrides(pins)


def test_make_sets_up_the_modern_stack_in_its_own_venv_with_its_torch() -> None:
    env_free = {"PATH": "/usr/bin:/bin"}
    torch = subprocess.run(
        ["python3.11", "scripts/spark_requirements.py", "--get", "torch", "scripts/stack-modern.txt"],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env_free, check=True,
    ).stdout.strip()  # fmt: skip
    assert torch.startswith("torch==")
    proc = subprocess.run(
        ["make", "-n", "-B", "setup", "STACK=modern"], cwd=REPO, capture_output=True, text=True, timeout=60,
        env=env_free,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "-m venv .venv-modern\n" in proc.stdout and f'"{torch}"' in proc.stdout
    assert "scripts/build_horovod.sh .venv-modern\n" in proc.stdout
    assert "scripts/stack-modern.txt > .venv-modern/requirements.txt" in proc.stdout
    assert "--no-deps -e ." in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["STACK=latest"], "STACK=latest is not supported: use one of pinned modern"),
        (["STACK=modern", "SPARK=4.0"], "SPARK=4.0 picks a Spark line of the pinned stack"),
    ],
)
def test_make_refuses_an_unknown_stack_or_a_spark_line_for_the_modern_one(args: list[str], message: str) -> None:
    proc = subprocess.run(["make", "-n", "setup", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr
