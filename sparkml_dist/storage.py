"""Where outputs live: Hadoop-FileSystem operations from the driver and atomic publication.

Every output directory is written under a temporary sibling and published with renames, so a crash at
any point leaves either the old complete output or the new complete one, never a mix.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from pyspark.sql import SparkSession

from sparkml_dist import faults
from sparkml_dist.outputs import OutputKind, check_output

_TAG = re.compile(r"^[0-9a-f]{8}$")

WRITE_CHECKSUMS = {"parquet.page.write-checksum.enabled": "true"}
"""Parquet writer options for every Spark write: a CRC32 in every data page header (parquet-mr's default
since 1.12; set so that a change of default cannot silently drop it)."""
READ_VERIFY = {"parquet.page.verify-checksum.enabled": "true"}
"""Parquet reader options: Spark (parquet-mr) checks each page's CRC where the writer set one, so a flipped
byte inside a data page fails the read instead of changing a value."""


class HadoopFS:
    """Thin wrapper over org.apache.hadoop.fs.FileSystem for any scheme Spark can reach."""

    def __init__(self, spark: SparkSession, url: str) -> None:
        jvm = spark.sparkContext._jvm
        assert jvm is not None
        self._jvm = jvm
        conf = spark.sparkContext._jsc.hadoopConfiguration()  # type: ignore[union-attr]
        self._fs = jvm.org.apache.hadoop.fs.Path(url).getFileSystem(conf)

    def _path(self, url: str) -> Any:
        return self._jvm.org.apache.hadoop.fs.Path(url)

    def exists(self, url: str) -> bool:
        return bool(self._fs.exists(self._path(url)))

    def is_file(self, url: str) -> bool:
        return bool(self._fs.isFile(self._path(url)))

    def delete(self, url: str) -> None:
        self._fs.delete(self._path(url), True)

    def rename(self, src: str, dst: str) -> None:
        if not self._fs.rename(self._path(src), self._path(dst)):
            raise OSError(f"could not rename {src} to {dst}")

    def mkdirs(self, url: str) -> None:
        self._fs.mkdirs(self._path(url))

    def read_text(self, url: str) -> str:
        stream = self._fs.open(self._path(url))
        try:
            reader = self._jvm.java.io.BufferedReader(self._jvm.java.io.InputStreamReader(stream, "UTF-8"))
            lines = []
            while (line := reader.readLine()) is not None:
                lines.append(line)
            return "\n".join(lines)
        finally:
            stream.close()

    def write_text(self, url: str, text: str) -> None:
        """Write a small file atomically (temp file + rename)."""
        tmp = f"{url}.tmp-{uuid.uuid4().hex[:8]}"
        stream = self._fs.create(self._path(tmp), True)
        try:
            stream.write(bytearray(text.encode("utf-8")))
        finally:
            stream.close()
        if self.exists(url):
            self.delete(url)
        self.rename(tmp, url)

    def list_dir(self, url: str) -> list[str]:
        """Names of the entries directly under ``url``."""
        return sorted(str(st.getPath().getName()) for st in self._fs.listStatus(self._path(url)))

    def _walk(self, url: str) -> Iterator[tuple[str, Any]]:
        """(path relative to url, FileStatus) of every file below the directory url."""
        root = self._fs.makeQualified(self._path(url)).toString().rstrip("/")
        it = self._fs.listFiles(self._path(url), True)
        while it.hasNext():
            st = it.next()
            yield st.getPath().toString()[len(root) + 1 :], st

    def list_files(self, url: str, suffix: str = "") -> list[tuple[str, int, int]]:
        """(path relative to url, size, mtime) of every file below url that Spark would read, sorted: files
        inside a directory whose name starts with '.' or '_' are hidden from Spark, so skipped here too."""
        out = []
        for rel, st in self._walk(url):
            if any(part.startswith((".", "_")) for part in rel.split("/")) or not rel.endswith(suffix):
                continue
            out.append((rel, int(st.getLen()), int(st.getModificationTime())))
        return sorted(out)

    def list_all(self, url: str) -> list[str]:
        """Relative paths of every file below the directory url, hidden ones included."""
        return sorted(rel for rel, _ in self._walk(url))

    def file_status(self, url: str) -> tuple[int, int]:
        """(size, mtime) of one file."""
        st = self._fs.getFileStatus(self._path(url))
        return int(st.getLen()), int(st.getModificationTime())


@contextlib.contextmanager
def atomic_output(
    spark: SparkSession, url: str, kind: OutputKind, key: str, inputs: Mapping[str, str]
) -> Iterator[str]:
    """Yield a temporary URL to write into; publish it at ``url`` only if the block succeeds.

    ``outputs.check_output`` runs first: an existing ``url`` is replaced only if it is provably an earlier
    output of ``kind`` and overlaps none of ``inputs`` (config key -> URL). The old output (if any) is
    moved aside, the new one renamed into place, then the old one deleted. A leftover ``*.old-*`` sibling
    after a crash still holds the previous complete output.
    """
    fs = HadoopFS(spark, url)
    url = url.rstrip("/")
    recover(fs, url)
    check_output(fs, url, kind, key, inputs)
    tag = uuid.uuid4().hex[:8]
    tmp = f"{url}.tmp-{tag}"
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete(tmp)
        raise
    faults.crash_point("storage.before_publish")
    publish(fs, tmp, url, tag)


def publish(fs: HadoopFS, tmp: str, url: str, tag: str) -> None:
    old = f"{url}.old-{tag}"
    had_old = fs.exists(url)
    if had_old:
        fs.rename(url, old)
    faults.crash_point("storage.between_renames")
    fs.rename(tmp, url)
    if had_old:
        fs.delete(old)


def recover(fs: HadoopFS, url: str) -> None:
    """Undo what a crash left next to ``url``: a moved-aside old output comes back if nothing replaced
    it, and unpublished ``.tmp-*`` / superseded ``.old-*`` siblings are deleted."""
    parent = url.rsplit("/", 1)[0]
    name = url.rsplit("/", 1)[1]
    if not fs.exists(parent):
        return
    siblings = fs.list_dir(parent)
    # Only names this module makes (name + .old-/.tmp- + 8 hex digits): a user's "out.old-backup" is not ours.
    olds = sorted(s for s in siblings if s.startswith(f"{name}.old-") and _TAG.match(s[len(name) + 5 :]))
    if olds and not fs.exists(url):
        fs.rename(f"{parent}/{olds[-1]}", url)
        olds = olds[:-1]
    tmps = [s for s in siblings if s.startswith(f"{name}.tmp-") and _TAG.match(s[len(name) + 5 :])]
    for stale in olds + tmps:
        fs.delete(f"{parent}/{stale}")
