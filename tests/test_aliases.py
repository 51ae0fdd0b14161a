"""The old flat module paths (``sparkml_dist.train``, ``sparkml_dist.readers.cache``, ...) after the move into
sub-packages (issue 34, item 1): each imports as the very module at its new path, ``python -m`` with an old name
still runs, and nothing of ours imports an old path. No Spark session: the fast ring's."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys

import pytest

from sparkml_dist._aliases import MOVED, new_name
from tests.test_layout import PACKAGE, REPO, _imports, _modules


def _old_and_new() -> list[tuple[str, str]]:
    """(old name, new name) for every module under a moved name: each moved module, each package and every
    module in it (``sparkml_dist.readers.cache``...)."""
    pairs = []
    for name in _modules():
        for old, new in MOVED.items():
            prefix = f"{PACKAGE}.{new}"
            if name == prefix or name.startswith(prefix + "."):
                pairs.append((f"{PACKAGE}.{old}{name[len(prefix) :]}", name))
    return sorted(pairs)


def test_the_table_matches_the_tree():
    """Every new path is a module; no old path has a file of its own (the finder, first on the meta path, would
    hide it)."""
    modules = _modules()
    for old, new in MOVED.items():
        assert f"{PACKAGE}.{new}" in modules, new
        assert not (REPO / PACKAGE / f"{old}.py").exists() and not (REPO / PACKAGE / old).exists(), old
    assert len(_old_and_new()) > len(MOVED)  # the packages' submodules too


@pytest.mark.parametrize("old, new", _old_and_new())
def test_an_old_name_imports_the_very_module_at_its_new_path(old, new):
    module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert sys.modules[old] is sys.modules[new] is module
    assert module.__name__ == new
    parent, _, child = old.rpartition(".")
    assert getattr(sys.modules[parent], child) is module  # so `import sparkml_dist.x` then `sparkml_dist.x.y` works


def test_from_an_old_name_import_and_monkeypatch_through_it(monkeypatch):
    import sparkml_dist.train
    from sparkml_dist.readers.cache import build_cache
    from sparkml_dist.train import DataParallel
    from sparkml_dist.training import train

    assert DataParallel is train.DataParallel
    assert build_cache is importlib.import_module("sparkml_dist.training.readers.cache").build_cache
    monkeypatch.setattr(sparkml_dist.train, "DataParallel", None)  # one module: the change shows at both names
    assert train.DataParallel is None
    monkeypatch.setattr("sparkml_dist.train.DataParallel", 1)  # by dotted string too (getattr from the package)
    assert train.DataParallel == 1


def test_an_unknown_name_under_an_old_one_is_still_an_import_error():
    assert new_name("sparkml_dist.config") is None and new_name("sparkml_dist.trainer") is None
    assert new_name("sparkml_dist.readers.cache") == "sparkml_dist.training.readers.cache"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("sparkml_dist.readers.no_such_module")


@pytest.mark.parametrize(
    "module, usage",
    [
        ("sparkml_dist.spool", "usage: python -m sparkml_dist.spool"),  # the documented commands
        ("sparkml_dist.ui", "--port"),
        ("sparkml_dist.cluster", "start,stop,status,package"),
        ("sparkml_dist.experiments.spool", "usage: python -m sparkml_dist.spool"),  # and at their new paths
        ("sparkml_dist.experiments.ui", "--port"),
    ],
)
def test_python_dash_m_runs_old_and_new_names(module, usage):
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert usage in done.stdout, done.stdout


def test_ours_import_only_the_new_paths():
    """The package, the jobs, the benchmarks and the scripts never lean on the alias table: it is for callers
    outside (so a name can leave the table one day without breaking us)."""
    found = []
    for folder in ("sparkml_dist", "jobs", "bench", "scripts", "airflow_dags"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for name, line in _imports(ast.parse(path.read_text(), str(path))):
                if new_name(name) is not None:
                    found.append(f"{path.relative_to(REPO)}:{line} {name}")
    assert not found, found
