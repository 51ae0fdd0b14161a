"""Output-path safety: a job replaces only what it can prove it wrote, and never writes over its input.

Every job that publishes a directory (generate, partition, score, compare) calls ``check_output`` before it
computes anything, and ``storage.atomic_output`` calls it again before it moves anything, so a new writer
cannot skip it. The rules:

- The output may not be the input, lie inside it, or contain it (paths compared normalized: scheme and
  host lower-cased, ``.``/``..`` and doubled slashes removed, symlinks resolved for ``file://``).
- An existing output must be a directory holding the job's own marker (``_manifest.json``, ``_score.json``,
  ``_truth.json``, ``_compare.json``), and every file in it must be one the marker lists (or bookkeeping
  its writer leaves: ``_SUCCESS``, ``.crc`` files). Anything else is someone's data: the job refuses,
  names the path and a few of the unknown files, and changes nothing.

There is deliberately no "overwrite anyway" flag: emptying a directory is one ``rm -r`` away for the person
who means it, and a flag is one typo away for the person who does not.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sparkml_dist.errors import OutputPathError

log = logging.getLogger("sparkml_dist.outputs")  # its pre-move name: logging configs keep working

SPARK_PART = re.compile(r"^part-\d{5}-[0-9a-fA-F-]+(?:\.c\d{3})?(?:\.[a-z0-9]+)?\.parquet$")
"""A Parquet part file as Spark names it (what a marker that predates its file list may vouch for)."""
_BOOKKEEPING = ("_SUCCESS",)


class OutputFS(Protocol):
    """What the check needs from a filesystem (``storage.HadoopFS`` and ``LocalFS`` provide it)."""

    def exists(self, url: str) -> bool: ...

    def is_file(self, url: str) -> bool: ...

    def list_all(self, url: str) -> list[str]: ...

    def read_text(self, url: str) -> str: ...


@dataclass(frozen=True)
class OutputKind:
    """One kind of output: its job, its marker file, and which files a marker says are the job's."""

    job: str
    """The job's name as users know it, e.g. 'partition' (used in messages)."""
    marker: str
    """File name, at the output's root, that only this job writes and writes last."""
    owned: Callable[[str], set[str] | None]
    """Marker text -> relative paths of the files it vouches for; None if the text is not such a marker."""


def files_listed(text: str) -> set[str] | None:
    """Owned files of a marker that is a JSON object with a ``files`` list (our markers since issue 21);
    a marker without one (written before) vouches for Spark part files only."""
    try:
        raw = json.loads(text)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    files = raw.get("files")
    if files is None:
        return {"*spark-parts*"}
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files)


def normalize_url(url: str) -> str:
    """``url`` in a canonical form for comparing locations: plain paths become ``file://`` URLs; for
    ``file://`` symlinks are resolved (also in a parent of a path that does not exist yet)."""
    url = url.strip()
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", url)
    if m is None or len(m.group(1)) == 1:  # no scheme (or a Windows drive letter)
        return "file://" + os.path.realpath(url)
    scheme, rest = m.group(1).lower(), m.group(2)
    authority = ""
    if rest.startswith("//"):
        authority, _, path = rest[2:].partition("/")
        path = "/" + path
    else:
        path = rest
    if scheme == "file":
        return "file://" + os.path.realpath(path or "/")
    path = posixpath.normpath(path or "/")
    return f"{scheme}://{authority.lower()}{'' if path == '/' else path}"


def relation(a: str, b: str) -> str | None:
    """How location ``a`` relates to ``b``: 'is', 'is inside', 'contains', or None when they are disjoint."""
    na, nb = normalize_url(a).rstrip("/"), normalize_url(b).rstrip("/")
    if na == nb:
        return "is"
    if na.startswith(nb + "/"):
        return "is inside"
    if nb.startswith(na + "/"):
        return "contains"
    return None


def check_disjoint(key: str, url: str, others: Mapping[str, str]) -> None:
    """Refuse ``url`` (config key ``key``) if it is, lies inside, or contains any of ``others`` (key -> url)."""
    for other_key, other in others.items():
        if not other:
            continue
        rel = relation(url, other)
        if rel is not None:
            raise OutputPathError(
                f"{key}={url} {rel} {other_key}={other}: a job must never write where it reads (it would delete "
                f"or re-read its own input); choose a {key} outside {other_key}, and not a parent of it"
            )


def check_output(fs: OutputFS, url: str, kind: OutputKind, key: str, inputs: Mapping[str, str]) -> None:
    """Raise ``OutputPathError`` unless the job may (re)place its output at ``url``.

    Args:
        fs: the filesystem ``url`` lives on.
        url: the output directory.
        kind: the job's kind of output (its marker).
        key: the config key (or flag) that set ``url``, for the message.
        inputs: config key -> URL of everything the job reads.
    """
    url = url.rstrip("/")
    check_disjoint(key, url, inputs)
    if not fs.exists(url):
        return
    if fs.is_file(url):
        raise OutputPathError(f"{key}={url} is an existing file, not a directory: remove it or choose another path")
    files = fs.list_all(url)
    if not files:
        return
    if kind.marker not in files:
        raise OutputPathError(
            f"{key}={url} already holds {len(files)} file(s) (e.g. {_examples(files)}) and no {kind.marker}, so "
            f"it is not an earlier {kind.job} output, and {kind.job} will not replace it; nothing was changed. "
            f"Choose a new or empty directory for {key}, or move those files away yourself"
        )
    owned = kind.owned(fs.read_text(f"{url}/{kind.marker}"))
    if owned is None:
        raise OutputPathError(
            f"{key}={url}: its {kind.marker} is not one {kind.job} wrote (unreadable), so the directory is not "
            f"provably {kind.job}'s output; nothing was changed. Choose another {key}, or remove it yourself"
        )
    unknown = [f for f in files if not _is_owned(f, owned, kind.marker)]
    if unknown:
        raise OutputPathError(
            f"{key}={url} is an earlier {kind.job} output, but it also holds {len(unknown)} file(s) its "
            f"{kind.marker} does not list (e.g. {_examples(unknown)}), which replacing it would delete; nothing was "
            f"changed. Move them out of {url}, or choose another {key}"
        )


def _is_owned(rel: str, owned: set[str], marker: str) -> bool:
    if rel in owned or rel == marker:
        return True
    directory, name = posixpath.split(rel)
    if name in _BOOKKEEPING:
        return True
    if name.startswith(".") and name.endswith(".crc"):  # Hadoop's checksum of a file beside it
        return _is_owned(posixpath.join(directory, name[1:-4]), owned, marker)
    if "*spark-parts*" in owned:
        return bool(SPARK_PART.match(name))
    return False


def _examples(files: list[str], n: int = 3) -> str:
    shown = ", ".join(files[:n])
    return shown + (f" and {len(files) - n} more" if len(files) > n else "")


class LocalFS:
    """``OutputFS`` over local paths or ``file://`` URLs, for writers that do not run on Spark."""

    @staticmethod
    def _p(url: str) -> Path:
        return Path(url[len("file://") :] if url.startswith("file://") else url)

    def exists(self, url: str) -> bool:
        return self._p(url).exists()

    def is_file(self, url: str) -> bool:
        return self._p(url).is_file()

    def list_all(self, url: str) -> list[str]:
        root = self._p(url)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())

    def read_text(self, url: str) -> str:
        return self._p(url).read_text()
