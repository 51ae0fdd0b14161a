"""Print pyproject.toml's requirements (dependencies + the dev extra) with one Spark line's pins swapped in.

Usage: python scripts/spark_requirements.py scripts/spark-4.0.txt > requirements.txt

pip cannot override a pinned dependency (a constraints file that says pyspark==4.0.5 against pyproject's
pyspark==3.5.8 is a resolution error), and pyproject.toml keeps the default pin so that a plain
`pip install -e .` gives the default stack. So the Makefile installs a non-default Spark line as
`pip install -r <this output>` followed by `pip install --no-deps -e .`: one resolution over exactly
pyproject's pins except the overridden names. An override for a name pyproject does not pin is an error, so
the two files cannot drift apart silently.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise SystemExit(f"spark_requirements: cannot read a package name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def read_overrides(path: Path) -> dict[str, str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {_name(line): line for line in lines if line}


def requirements(overrides: dict[str, str], pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    pinned = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    unknown = sorted(set(overrides) - {_name(r) for r in pinned})
    if unknown:
        raise SystemExit(f"spark_requirements: {', '.join(unknown)} not among pyproject.toml's requirements")
    return [overrides.get(_name(r), r) for r in pinned]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: spark_requirements.py OVERRIDES_FILE")
    print("\n".join(requirements(read_overrides(Path(sys.argv[1])))))
