"""Write the configuration reference (Markdown) from sparkml_dist/config.py's dataclasses and their docstrings.

Usage: python scripts/gen_config_reference.py            # the page on stdout
       python scripts/gen_config_reference.py OUT.md     # into a file

The docs site does not commit this page: its build hook (scripts/mkdocs_hooks.py) calls `render()` on every
`mkdocs build`, so the reference cannot drift from the code. The source is read with `ast`, not imported, so
the page needs nothing of the project's stack: for every section of `JobConfig` (its fields are the YAML
sections), every field of that section's dataclass becomes a row `section.key | type | default | description`,
the description being the string literal right after the field (an attribute docstring). A field without one
is an error naming it: a new field gets documented or the docs build fails.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "sparkml_dist" / "config.py"
ROOT_CLASS = "JobConfig"


class UndocumentedFieldError(ValueError):
    """A config field has no docstring (or the source is not laid out as expected)."""


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    default: str
    doc: str


@dataclass(frozen=True)
class Section:
    name: str
    cls: str
    doc: str
    fields: tuple[Field, ...]


def _is_dataclass(node: ast.ClassDef) -> bool:
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Name) and target.id == "dataclass":
            return True
        if isinstance(target, ast.Attribute) and target.attr == "dataclass":
            return True
    return False


def _default(value: ast.expr | None) -> str:
    """The default as written, with `field(default_factory=X)` shown as the value X() makes."""
    if value is None:
        return "(required)"
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
        for kw in value.keywords:
            if kw.arg == "default":
                return ast.unparse(kw.value)
            if kw.arg == "default_factory":
                factory = kw.value
                if isinstance(factory, ast.Name) and factory.id in ("dict", "list", "tuple", "set"):
                    return {"dict": "{}", "list": "[]", "tuple": "()", "set": "set()"}[factory.id]
                if isinstance(factory, ast.Lambda):
                    return ast.unparse(factory.body)
                return f"{ast.unparse(factory)}()"
    return ast.unparse(value)


def _is_classvar(annotation: ast.expr) -> bool:
    text = ast.unparse(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar"))


def _fields(node: ast.ClassDef) -> tuple[list[Field], list[str]]:
    """(documented fields, names of fields without a docstring) of one dataclass, in source order."""
    out: list[Field] = []
    missing: list[str] = []
    body = node.body
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if _is_classvar(stmt.annotation):
            continue
        name = stmt.target.id
        nxt = body[i + 1] if i + 1 < len(body) else None
        if (
            isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
            and nxt.value.value.strip()
        ):
            doc = nxt.value.value
        else:
            missing.append(name)
            continue
        out.append(Field(name, ast.unparse(stmt.annotation), _default(stmt.value), doc))
    return out, missing


def parse(source: str, root_class: str = ROOT_CLASS) -> list[Section]:
    """The sections of ``root_class`` (its fields, each typed with a dataclass), with their documented fields.

    Raises UndocumentedFieldError naming every `section.field` that has no docstring.
    """
    tree = ast.parse(source)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef) and _is_dataclass(n)}
    if root_class not in classes:
        raise UndocumentedFieldError(f"no dataclass {root_class} in the config source")
    sections: list[Section] = []
    missing: list[str] = []
    for stmt in classes[root_class].body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        section, cls_name = stmt.target.id, ast.unparse(stmt.annotation)
        if cls_name not in classes:
            raise UndocumentedFieldError(f"{root_class}.{section} is typed {cls_name}, not a dataclass of this file")
        cls = classes[cls_name]
        fields, undocumented = _fields(cls)
        missing += [f"{section}.{name} ({cls_name})" for name in undocumented]
        sections.append(Section(section, cls_name, ast.get_docstring(cls) or "", tuple(fields)))
    if missing:
        raise UndocumentedFieldError(
            f"{len(missing)} config field(s) without a docstring in sparkml_dist/config.py: "
            + ", ".join(missing)
            + ". Add a string literal right after each field (an attribute docstring): it is the reference."
        )
    return sections


_CODE_SPAN = re.compile(r"(``[^`]+``|`[^`]+`)")


def _cell(text: str) -> str:
    """One Markdown table cell on one line: outside code spans, pipes, `*` and HTML-looking text are escaped
    (Python-Markdown's tables leave a pipe inside a code span alone)."""
    text = " ".join(text.split())
    parts = []
    for piece in _CODE_SPAN.split(text):
        if piece.startswith("`"):
            parts.append(f"`{piece.strip('`')}`")
        else:
            for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("*", r"\*"), ("|", r"\|")):
                piece = piece.replace(raw, escaped)
            parts.append(piece)
    return "".join(parts)


def _code(text: str) -> str:
    text = " ".join(text.split())
    return f"`{text}`" if text else ""


def render(source: str | None = None) -> str:
    """The whole reference page (Markdown)."""
    sections = parse(CONFIG.read_text() if source is None else source)
    count = sum(len(s.fields) for s in sections)
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from sparkml_dist/config.py by scripts/gen_config_reference.py on every docs build; "
        "edit the docstrings there, not this page. -->",
        "",
        f"Every job reads one typed config (`sparkml_dist/config.py`): {len(sections)} sections, {count} keys. "
        "Set them in a YAML file (`--config conf/local.yaml`; sections are top-level keys) or on the command "
        "line with `--set section.key=value`; `--print-config` shows the resolved config. Unknown keys and values "
        "of the wrong type are refused naming `section.key`. This page is generated from the dataclasses' field "
        "docstrings on every docs build, so it always matches the code.",
        "",
        "Values written `{work_dir}` are filled in from `paths.work_dir`.",
        "",
        "Sections: " + ", ".join(f"[`{s.name}`](#{s.name})" for s in sections) + ".",
        "",
    ]
    for s in sections:
        lines += [f"## `{s.name}` {{#{s.name}}}", ""]
        lines += [f"`{s.cls}`" + (f": {_cell(s.doc)}" if s.doc else ""), ""]
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for f in s.fields:
            lines.append(f"| `{s.name}.{f.name}` | {_code(f.type)} | {_code(f.default)} | {_cell(f.doc)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    try:
        page = render()
    except UndocumentedFieldError as exc:
        print(f"gen_config_reference: {exc}", file=sys.stderr)
        return 1
    if argv:
        Path(argv[0]).write_text(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
