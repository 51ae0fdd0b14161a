"""MkDocs build hooks (mkdocs.yml `hooks:`), run on every `mkdocs build` / `make docs`.

- The configuration reference, `reference/config.md`, is generated from sparkml_dist/config.py's docstrings
  (scripts/gen_config_reference.py) and never committed, so it cannot drift; an undocumented field fails the
  build naming it.
- CONTRIBUTING.md, kept at the repository root where GitHub shows it, is also a page of the site
  (`contributing.md`); its links into docs/ (`docs/x.md`) are rewritten to site-relative ones.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "scripts" / "gen_config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "reference/config.md", content=_generator().render()))
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    contributing = re.sub(r"\]\(docs/", "](", contributing)
    files.append(File.generated(config, "contributing.md", content=contributing))
    return files
