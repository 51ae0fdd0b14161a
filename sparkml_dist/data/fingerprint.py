"""Data fingerprints from content: a copy keeps its fingerprint, an edit changes it, whatever the sizes.

The fingerprint of an input is a hash of its files' relative paths and per-file *content digests*. A file's
digest is computed by one Spark job over every file that needs one (executors read the data in parallel,
nothing is collected but one small row per file): its row count, its schema, and three order-independent
aggregates of a 64-bit hash of each row (every column, by name order): XOR, and the sums of the hash's low
and high 32 bits (decimal sums, which cannot overflow, and which see a duplicated row that XOR would cancel).
So the fingerprint does not depend on where the data lives, its modification times, its compression or the
order of rows inside a file; it changes when any value, row, column or file name does (up to 64-bit hash
collisions). Parquet is hashed by its decoded columns, text (LIBSVM) by its lines.

Cost: one scan of the data. So that a re-run on unchanged data stays cheap at terabyte scale, the digests
are kept in the partition manifest with each file's (size, modification time), and a file whose size and
time are both unchanged keeps its recorded digest without being read. That reuse is the one place where
metadata stands in for content: a file rewritten in place to the same size *with its modification time
forged back* is not re-read (``partition.rehash=true`` reads every file regardless).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

log = logging.getLogger("sparkml_dist.fingerprint")  # its pre-move name: logging configs keep working

_LOW = 0xFFFFFFFF


@dataclass(frozen=True)
class FileDigest:
    """One input file: its path relative to the input URL, size and mtime (for reuse) and content digest."""

    path: str
    size: int
    mtime: int
    digest: str

    def to_list(self) -> list:
        return [self.path, self.size, self.mtime, self.digest]

    @classmethod
    def from_list(cls, row: Sequence) -> FileDigest:
        path, size, mtime, digest = row
        return cls(str(path), int(size), int(mtime), str(digest))


def fingerprint(digests: Sequence[FileDigest]) -> str:
    """The data fingerprint: relative paths and content digests only (not the URL, sizes or times)."""
    body = json.dumps(sorted((d.path, d.digest) for d in digests))
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def file_digests(
    spark: SparkSession,
    url: str,
    files: Sequence[tuple[str, int, int]],
    fmt: str,
    known: Mapping[str, FileDigest] | None = None,
) -> tuple[list[FileDigest], int]:
    """A ``FileDigest`` per file of ``files`` ((URL, size, mtime) below ``url``, in ``fmt`` ``parquet`` or
    ``text``), and how many files were read for them. A file in ``known`` (by relative path) with the same size
    and mtime keeps its digest; the rest are read by one Spark job."""
    url = url.rstrip("/")
    known = known or {}
    rel = {u: (u[len(url) + 1 :] or u.rsplit("/", 1)[-1]) for u, _, _ in files}
    out: dict[str, FileDigest] = {}
    todo = []
    for u, size, mtime in files:
        seen = known.get(rel[u])
        if seen is not None and (seen.size, seen.mtime) == (size, mtime):
            out[u] = seen
        else:
            todo.append((u, size, mtime))
    if todo:
        log.info("fingerprinting %d of %d input file(s) by content (%d unchanged since the last partition)",
                 len(todo), len(files), len(files) - len(todo))  # fmt: skip
        computed = _digest_files(spark, [u for u, _, _ in todo], fmt)
        for u, size, mtime in todo:
            out[u] = FileDigest(rel[u], size, mtime, computed.get(_norm(u), _EMPTY))
    return [out[u] for u, _, _ in files], len(todo)


_EMPTY = "0:0:0:0:-"
"""The digest of a file with no rows (Spark produces no group for it)."""


def _norm(u: str) -> str:
    """A file URL as ``input_file_name()`` and the listing both reduce to: unquoted, with one form of
    ``file:`` (``file:/x`` and ``file:///x`` name the same file)."""
    u = unquote(u)
    return "file:///" + u[len("file:") :].lstrip("/") if u.startswith("file:") else u


def _digest_files(spark: SparkSession, urls: list[str], fmt: str) -> dict[str, str]:
    """{normalized file URL: digest} for the files that hold rows, by one aggregation job."""
    df: DataFrame = spark.read.parquet(*urls) if fmt == "parquet" else spark.read.text(urls)
    cols = sorted(df.columns)
    types = json.dumps([(c, df.schema[c].dataType.simpleString()) for c in cols])
    schema = hashlib.sha256(types.encode()).hexdigest()[:12]
    h = F.xxhash64(*[F.col(f"`{c}`") for c in cols]) if cols else F.lit(0)
    spark.sparkContext.setJobDescription(f"fingerprint: digest {len(urls)} input file(s) by content")
    rows = (
        df.select(F.input_file_name().alias("f"), h.alias("h"))
        .groupBy("f")
        .agg(
            F.count(F.lit(1)).alias("n"),
            F.expr("bit_xor(h)").alias("x"),
            F.sum(F.col("h").bitwiseAND(F.lit(_LOW)).cast("decimal(38,0)")).alias("lo"),
            F.sum(F.shiftrightunsigned("h", 32).cast("decimal(38,0)")).alias("hi"),
        )
        .collect()
    )
    return {_norm(r["f"]): f"{r['n']}:{r['x']}:{r['lo']}:{r['hi']}:{schema}" for r in rows}
