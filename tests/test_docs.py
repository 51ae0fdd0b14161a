"""The docs site builds in strict mode, the README stays an overview whose links resolve, and the generated
configuration reference lists every config field.

No Spark: this runs in the fast ring (`make test-fast`) too. The build takes a few seconds (`mkdocs build
--strict` into a temporary directory: a broken link or anchor in docs/ fails it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sparkml_dist.config import JobConfig

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_LINES = 300
# [text](target) and ![alt](target); the target up to the first space or closing parenthesis.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, (
        "mkdocs build --strict failed (a broken link or anchor, an undocumented config field, or mkdocs missing: "
        f"pip install -e '.[docs]'):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return out


def _readme_links() -> list[str]:
    """The README's relative link targets (no scheme, not a bare #anchor), outside code blocks."""
    text = re.sub(r"^```.*?^```", "", README.read_text(), flags=re.MULTILINE | re.DOTALL)
    targets = [m.group(1) for m in _LINK.finditer(text)]
    return [t for t in targets if "://" not in t and not t.startswith(("mailto:", "#"))]


def test_readme_is_an_overview_of_at_most_300_lines() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, over {README_MAX_LINES}: move the detail into a docs/ page and link it"
    )


def test_every_relative_link_in_the_readme_resolves(site: Path) -> None:
    links = _readme_links()
    assert links, "no relative links found in README.md"
    broken = []
    for target in links:
        path, _, anchor = target.partition("#")
        if not (REPO / path).exists():
            broken.append(f"{target}: {path} does not exist")
            continue
        if anchor and path.startswith("docs/") and path.endswith(".md"):
            page = site / (path[len("docs/") : -len(".md")] + ".html")
            if f'id="{anchor}"' not in page.read_text():
                broken.append(f"{target}: no anchor #{anchor} in the built {page.name}")
    assert not broken, "README.md links that do not resolve:\n" + "\n".join(broken)


def test_every_docs_page_is_in_the_nav(site: Path) -> None:
    # mkdocs only reports pages left out of the nav at INFO level; a page nobody can reach is a lost page.
    import yaml

    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]

    def pages(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in pages(item)]
        if isinstance(node, dict):
            return [p for value in node.values() for p in pages(value)]
        return []

    in_nav = set(pages(nav))
    on_disk = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert on_disk - in_nav == set(), f"docs pages missing from mkdocs.yml's nav: {sorted(on_disk - in_nav)}"
    assert {"reference/config.md", "contributing.md"} <= in_nav


def test_config_reference_lists_every_config_field(site: Path) -> None:
    page = (site / "reference" / "config.html").read_text()
    missing = []
    count = 0
    for section in dataclasses.fields(JobConfig):
        section_cls = type(getattr(JobConfig(), section.name))
        for f in dataclasses.fields(section_cls):
            count += 1
            if f"<code>{section.name}.{f.name}</code>" not in page:
                missing.append(f"{section.name}.{f.name}")
    assert count > 100
    assert not missing, f"config fields missing from the generated reference: {missing}"


def _generator():  # noqa: ANN202 (a module loaded from scripts/)
    spec = importlib.util.spec_from_file_location("gen_config_reference", REPO / "scripts" / "gen_config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_config_field_without_a_docstring_fails_the_reference() -> None:
    gen = _generator()
    source = '''
from dataclasses import dataclass, field

@dataclass(frozen=True)
class AConfig:
    documented: int = 1
    """Has one."""
    bare: str = "x"
    also_bare: list[str] = field(default_factory=list)

@dataclass(frozen=True)
class JobConfig:
    a: AConfig = field(default_factory=AConfig)
'''
    with pytest.raises(gen.UndocumentedFieldError, match=r"a\.bare \(AConfig\), a\.also_bare \(AConfig\)"):
        gen.render(source)
    documented = source.replace('    bare: str = "x"\n', '    bare: str = "x"\n    """Now documented."""\n')
    documented = documented.replace(
        "field(default_factory=list)\n", 'field(default_factory=list)\n    """A | list."""\n'
    )
    page = gen.render(documented)
    assert "| `a.bare` | `str` | `'x'` | Now documented. |" in page
    assert r"| `a.also_bare` | `list[str]` | `[]` | A \| list. |" in page


def test_the_reference_generator_runs_as_a_script() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_config_reference.py")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# Configuration reference")
