"""Print pyproject.toml's requirements (dependencies + the dev extra) with a pins file's changes applied.

Usage: python scripts/spark_requirements.py scripts/spark-4.0.txt > requirements.txt
       python scripts/spark_requirements.py scripts/stack-modern.txt > requirements.txt
       python scripts/spark_requirements.py --get torch scripts/stack-modern.txt   # one requirement
       python scripts/spark_requirements.py --extra docs   # an optional group as pyproject lists it (no pins)

A pins file is used for another Spark line of the pinned stack (scripts/spark-4.0.txt) and for the modern
stack (scripts/stack-modern.txt). Each non-comment line is either `name<specifier>`, which replaces
pyproject's requirement for that name, or `!name`, which drops it (the modern stack drops petastorm, which
cannot import on its pyarrow).

pip cannot override a pinned dependency (a constraints file that says pyspark==4.0.5 against pyproject's
pyspark==3.5.8 is a resolution error), and pyproject.toml keeps the default pins so that a plain
`pip install -e .` gives the default stack. So the Makefile installs another line or stack as
`pip install -r <this output>` followed by `pip install --no-deps -e .`: one resolution over exactly
pyproject's requirements except the overridden or dropped names. A line for a name pyproject does not
require is an error, so the files cannot drift apart silently.
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


def read_overrides(path: Path) -> dict[str, str | None]:
    """name -> the requirement that replaces pyproject's, or None where the line `!name` drops it."""
    overrides: dict[str, str | None] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("!"):
            if not re.fullmatch(r"![A-Za-z0-9][A-Za-z0-9._-]*", line):
                raise SystemExit(f"spark_requirements: `!` takes a bare package name, not {line!r}")
            overrides[_name(line[1:])] = None
        else:
            overrides[_name(line)] = line
    return overrides


def requirements(overrides: dict[str, str | None], pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    pinned = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    unknown = sorted(set(overrides) - {_name(r) for r in pinned})
    if unknown:
        raise SystemExit(f"spark_requirements: {', '.join(unknown)} not among pyproject.toml's requirements")
    out = []
    for requirement in pinned:
        name = _name(requirement)
        if name not in overrides:
            out.append(requirement)
        elif (replacement := overrides[name]) is not None:
            out.append(replacement)
    return out


def extra(name: str, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """pyproject's optional-dependency group `name` as written (the docs tools: no pins file touches them)."""
    groups = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    if name not in groups:
        raise SystemExit(f"spark_requirements: no optional-dependency group {name!r} in pyproject.toml")
    return list(groups[name])


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "--extra":
        print("\n".join(extra(argv[1])))
    elif len(argv) == 3 and argv[0] == "--get":
        name = _name(argv[1])
        found = [r for r in requirements(read_overrides(Path(argv[2]))) if _name(r) == name]
        if not found:
            raise SystemExit(f"spark_requirements: {name} is not required with {argv[2]}")
        print(found[0])
    elif len(argv) == 1:
        print("\n".join(requirements(read_overrides(Path(argv[0])))))
    else:
        raise SystemExit("usage: spark_requirements.py [--get NAME] PINS_FILE | --extra GROUP")


if __name__ == "__main__":
    main(sys.argv[1:])
