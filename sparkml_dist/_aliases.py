"""The package's old, flat module paths, kept working after the move into sub-packages (issue 34, item 1).

``sparkml_dist.train`` now lives at ``sparkml_dist.training.train``; code outside the package (users' code,
notebooks, pickles of a module path, older tests) may still import the old name. A finder at the front of
``sys.meta_path`` answers for every old name, and for every module under an old package name
(``sparkml_dist.readers.cache``): importing it imports the new module and
registers that very object under the old name too, so ``sparkml_dist.train is sparkml_dist.training.train``
and a ``monkeypatch.setattr`` through either name changes the one module. ``python -m`` with an old name runs
the new module's code (``python -m sparkml_dist.spool ...`` and ``python -m sparkml_dist.ui ...`` as
documented).

The package itself imports only the new paths; this table is for callers outside. Standard library only.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Sequence

PACKAGE = "sparkml_dist"

MOVED: dict[str, str] = {
    # the data: inputs -> shards + manifest, the contract between the driver and the ranks, outputs
    "partition": "data.partition",
    "features": "data.features",
    "manifest": "data.manifest",
    "fingerprint": "data.fingerprint",
    "sparse": "data.sparse",
    "synthetic": "data.synthetic",
    "outputs": "data.outputs",
    "storage": "data.storage",
    "libsvm": "data.libsvm",
    # what runs inside a rank: the loop, the modes, models, batches
    "loop": "training.loop",
    "train": "training.train",
    "feature_parallel": "training.feature_parallel",
    "models": "training.models",
    "loader": "training.loader",
    "device": "training.device",
    "checkpoint": "training.checkpoint",
    "sparse_optim": "training.sparse_optim",
    "model_size": "training.model_size",
    "readers": "training.readers",
    # getting ranks running: the barrier stage, the engines, clusters, faults
    "launch": "runtime.launch",
    "rank": "runtime.rank",
    "engines": "runtime.engines",
    "heartbeat": "runtime.heartbeat",
    "session": "runtime.session",
    "cluster": "runtime.cluster",
    "netcluster": "runtime.netcluster",
    "faults": "runtime.faults",
    # MLflow: runs, their outage spool, metric names, the UI, the model registry
    "tracking": "experiments.tracking",
    "spool": "experiments.spool",
    "metric_names": "experiments.metric_names",
    "ui": "experiments.ui",
    "promote": "experiments.promote",
    # the trained model in use
    "score": "serving.score",
    "estimator": "serving.estimator",
    "sparse_pyfunc": "serving.sparse_pyfunc",
}
"""Old name under ``sparkml_dist`` -> new name under ``sparkml_dist``; a package's submodules follow it."""


def new_name(fullname: str) -> str | None:
    """The module's path after the move (``sparkml_dist.readers.cache`` ->
    ``sparkml_dist.training.readers.cache``), or None when ``fullname`` is not under an old name."""
    prefix = PACKAGE + "."
    if not fullname.startswith(prefix):
        return None
    head, dot, rest = fullname[len(prefix) :].partition(".")
    moved = MOVED.get(head)
    if moved is None:
        return None
    return prefix + moved + dot + rest


class AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name; loads it as the new module itself (no second copy, no module code run twice)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = new_name(fullname)
        if new is None:
            return None
        real = importlib.util.find_spec(new)
        if real is None:
            return None
        spec = importlib.machinery.ModuleSpec(
            fullname, self, origin=real.origin, is_package=real.submodule_search_locations is not None
        )
        if spec.submodule_search_locations is not None:
            spec.submodule_search_locations = list(real.submodule_search_locations or [])
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = new_name(spec.name)
        assert new is not None
        return importlib.import_module(new)  # the import system then files it under the old name as well

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing: the module ran once, under its new name."""

    # what runpy asks for ``python -m <old name>``
    def get_code(self, fullname: str) -> types.CodeType | None:
        new = new_name(fullname)
        real = importlib.util.find_spec(new) if new is not None else None
        loader = getattr(real, "loader", None)
        if loader is None or not hasattr(loader, "get_code"):
            raise ImportError(f"no code for {fullname}", name=fullname)
        return loader.get_code(new)

    def is_package(self, fullname: str) -> bool:
        new = new_name(fullname)
        real = importlib.util.find_spec(new) if new is not None else None
        return real is not None and real.submodule_search_locations is not None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once): before the path finder, which would otherwise load a
    second copy of a moved package's submodule under its old name."""
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, AliasFinder())
