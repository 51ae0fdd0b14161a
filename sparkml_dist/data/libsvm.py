"""The line a LIBSVM input failed on, found after Spark's reader failed (issue 32, item 11).

Spark's ``libsvm`` source parses each line inside a task (``MLUtils.parseLibSVMRecord``); a bad line fails the
task with about a hundred lines of Java and neither the file nor the line number (``For input string: "x"``,
``Index 6 out of bounds for vector of size 5``). Only then, never on the good path, the partition job scans
the input files here in order, with Spark's rules, and names the first line that breaks one: the file, the
line number (1-based, counting every line) and the fix. Plain Python over pyarrow's filesystems (local, HDFS,
object stores; compressed files by their extension, as Spark reads them); no pyspark.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_JAVA_INT = re.compile(r"[+-]?\d+")
_JAVA_DOUBLE = re.compile(
    r"[+-]?(NaN|Infinity|(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|0[xX]([0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?\d+)"
    r"[fFdD]?"
)
"""What Java's ``Double.parseDouble`` (Scala's ``toDouble``) accepts, after trimming."""
MARKERS = (
    "NumberFormatException",
    "indices should be one-based and in ascending order",
    "out of bounds for vector of size",
    "ArrayIndexOutOfBoundsException",
)
"""Texts of the JVM failures a bad LIBSVM line causes inside Spark's reader."""
_FORMAT = "LIBSVM lines are `label index:value ...` with one-based, ascending indices"
_SHOWN = 60


def is_parse_failure(text: str) -> bool:
    """Whether a Spark failure's text looks like its LIBSVM reader choking on a line."""
    return any(m in text for m in MARKERS)


def _is_double(text: str) -> bool:
    return _JAVA_DOUBLE.fullmatch(text.strip()) is not None


def line_error(line: str, dimension: int | None) -> str | None:
    """What Spark's LIBSVM reader refuses in ``line`` (trimmed, not empty, not a '#' comment), in words with
    the fix; None if it reads it. The same rules: items split on single spaces, the label and values Java
    doubles, indices Java ints, one-based and strictly ascending, and below ``dimension`` when it is given."""
    items = line.split(" ")
    if not _is_double(items[0]):
        return f"the label {items[0]!r} is not a number; {_FORMAT}"
    previous = -1
    for item in items[1:]:
        if not item:
            continue
        parts = item.split(":")
        while parts and not parts[-1]:  # Java's split drops trailing empty strings
            parts.pop()
        if len(parts) < 2:
            return f"{item!r} is not index:value; {_FORMAT}"
        if _JAVA_INT.fullmatch(parts[0]) is None or not -(2**31) <= int(parts[0]) < 2**31:
            return f"the index of {item!r} is not a 32-bit integer; {_FORMAT}"
        if not _is_double(parts[1]):
            return f"the value of {item!r} is not a number; {_FORMAT}"
        index = int(parts[0]) - 1
        if index < 0:
            return f"index {parts[0]} in {item!r} is below 1: LIBSVM indices are one-based (the first feature is 1)"
        if index <= previous:
            return f"index {parts[0]} follows index {previous + 1}: each line's indices must ascend, each once"
        if dimension is not None and index >= dimension:
            return (
                f"feature index {index + 1} (one-based) is beyond data.dimension={dimension}: raise data.dimension to "
                f"at least {index + 1}, or leave it unset to take the largest index in the data"
            )
        previous = index
    return None


def _lines(url: str) -> Iterator[str]:
    """The lines of the file at ``url``, decoded leniently (a bad byte must not hide the bad line)."""
    from sparkml_dist.data.manifest import arrow_fs

    filesystem, path = arrow_fs(url)
    with filesystem.open_input_stream(path) as f:  # compression detected from the extension, as Spark does
        rest = b""
        while chunk := f.read(1 << 20):
            *whole, rest = (rest + chunk).split(b"\n")
            for raw in whole:
                yield raw.decode("utf-8", "replace")
        if rest:
            yield rest.decode("utf-8", "replace")


def find_bad_line(urls: list[str], dimension: int | None) -> tuple[str, int, str, str] | None:
    """(file URL, line number, the line, what is wrong with it) of the first line Spark's reader refuses, in
    file order; None when every line reads (the failure was something else)."""
    for url in urls:
        for number, raw in enumerate(_lines(url), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            why = line_error(line, dimension)
            if why is not None:
                return url, number, line, why
    return None


def bad_line_message(found: tuple[str, int, str, str], key: str = "data.input_url") -> str:
    """One line: the file, the line number, the line (shortened) and what to do."""
    url, number, line, why = found
    shown = line if len(line) <= _SHOWN else f"{line[:_SHOWN]}..."
    return f"{key} file {url} line {number} ({shown!r}): {why}. Fix that line, or move the file out of {key}"
