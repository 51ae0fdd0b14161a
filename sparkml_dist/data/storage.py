"""Where outputs live: Hadoop-FileSystem operations from the driver and atomic publication.

Every output directory is written under a temporary sibling and published with renames, so a crash at
any point leaves either the old complete output or the new complete one, never a mix.

One writer at a time: a job holds ``<output>.lock`` (created only if absent: ``O_EXCL`` for local paths,
``FileSystem.create(overwrite=false)`` elsewhere, which HDFS makes atomic; object stores without a conditional
create give no such guarantee) from before it looks at the output until it has published, so a second job on
the same output fails at once naming the first (pid, host, since when) instead of deleting its temporary
files. A lock whose job is gone (its pid no longer runs on this host) is taken over with a warning; one from
another host is never guessed at: the message says to delete it if that job is no longer running.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import socket
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from pyspark.sql import SparkSession

from sparkml_dist.data.outputs import OutputKind, check_output
from sparkml_dist.errors import OutputPathError
from sparkml_dist.runtime import faults

log = logging.getLogger("sparkml_dist.storage")  # its pre-move name: logging configs keep working

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

    def create_new(self, url: str) -> Any:
        """An output stream to a new file; raises (FileAlreadyExistsException) if it exists."""
        return self._fs.create(self._path(url), False)

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


LOCK_SUFFIX = ".lock"
"""The lock file beside an output directory while a job writes it: ``<output>.lock``."""


class OutputLockedError(OutputPathError):
    """Another job is writing the same output (it holds the output's lock file)."""


_HELD = threading.local()
"""Per thread, the outputs whose lock it holds (a job that holds one may open atomic_output inside it)."""


def _held() -> set[str]:
    if not hasattr(_HELD, "urls"):
        _HELD.urls = set()
    urls: set[str] = _HELD.urls
    return urls


@contextlib.contextmanager
def output_lock(spark: SparkSession, url: str, key: str) -> Iterator[None]:
    """Hold ``<url>.lock`` for the block, or raise ``OutputLockedError`` naming the job that holds it.

    Re-entrant within a thread (partition holds it for the whole job, and its atomic_output takes it again).
    """
    url = url.rstrip("/")
    if re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*:(//[^/]*)?", "", url) == "":
        raise OutputPathError(
            f"{key}={url or '/'} is the root of its filesystem: a job replaces its whole output directory; choose "
            "a directory of its own"
        )
    held = _held()
    if url in held:
        yield
        return
    fs = HadoopFS(spark, url)
    lock = url + LOCK_SUFFIX
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "key": key,
        "token": uuid.uuid4().hex,
    }
    made = _make_parents(lock, key, url)
    try:
        _acquire(fs, lock, owner, key, url)
        held.add(url)
        try:
            yield
        finally:
            held.discard(url)
            with contextlib.suppress(Exception):  # the job's own outcome is what to report
                if (_holder(fs, lock) or {}).get("token") == owner["token"]:
                    fs.delete(lock)
    finally:
        for d in made:  # a job that published nothing leaves no directory behind
            with contextlib.suppress(OSError):
                os.rmdir(d)


def _local_path(url: str) -> str | None:
    """The local path of a ``file:`` URL or a plain path; None for other schemes."""
    if url.startswith("file:") or "://" not in url:
        return re.sub(r"^file:(//)?", "", url)
    return None


def _make_parents(lock: str, key: str, url: str) -> list[str]:
    """Create the lock's missing local parent directories; returns them, deepest first (to remove if empty)."""
    path = _local_path(lock)
    if path is None:
        return []
    missing, d = [], os.path.dirname(path)
    while d and d != "/" and not os.path.exists(d):
        missing.append(d)
        d = os.path.dirname(d)
    for m in reversed(missing):
        try:
            os.mkdir(m)
        except FileExistsError:
            continue  # made by another job meanwhile
        except OSError as exc:
            raise OutputPathError(
                f"{key}={url}: cannot create its directory {m} ({exc.strerror}): choose a {key} you can write"
            ) from exc
    return missing


def _acquire(fs: HadoopFS, lock: str, owner: dict[str, Any], key: str, url: str) -> None:
    for _ in range(2):  # a second try after taking over a stale lock
        if _create_exclusive(fs, lock, json.dumps(owner), key, url):
            return
        holder = _holder(fs, lock)
        if holder is not None and _gone(holder):
            log.warning(
                "%s=%s: taking over the lock of a job that is gone (pid %s on %s, since %s): its output was never "
                "published", key, url, holder.get("pid"), holder.get("host"), holder.get("since"),
            )  # fmt: skip
            if (_holder(fs, lock) or {}).get("token") == holder.get("token"):
                fs.delete(lock)
            continue
        who = (
            f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
            if holder
            else "a job that is starting"
        )
        raise OutputLockedError(
            f"{key}={url} is being written by another job ({who}; lock file {lock}): wait for it to finish and run "
            f"again, or write elsewhere; if that job is no longer running, delete {lock}"
        )
    raise OutputLockedError(f"{key}={url}: its lock file {lock} keeps coming back; is another job starting there?")


def _create_exclusive(fs: HadoopFS, lock: str, text: str, key: str, url: str) -> bool:
    """Create ``lock`` holding ``text`` if it does not exist (False if it does), atomically where the
    filesystem allows it."""
    path = _local_path(lock)
    if path is not None:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise OutputPathError(
                f"{key}={url}: cannot create its lock file {lock} ({exc.strerror}): choose a {key} in a directory "
                "you can write"
            ) from exc
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return True
    if fs.exists(lock):
        return False
    try:
        stream = fs.create_new(lock)
    except Exception:  # noqa: BLE001 (FileAlreadyExistsException through py4j: someone was first)
        if fs.exists(lock):
            return False
        raise
    try:
        stream.write(bytearray(text.encode("utf-8")))
    finally:
        stream.close()
    return True


def _holder(fs: HadoopFS, lock: str) -> dict[str, Any] | None:
    """The lock's owner record; None while it is being written, or if it is not ours to read."""
    try:
        value = json.loads(fs.read_text(lock))
    except Exception:  # noqa: BLE001 (missing, empty or foreign: not a holder we can name)
        return None
    return value if isinstance(value, dict) else None


def _gone(holder: dict[str, Any]) -> bool:
    """The holding job is known to have ended: its pid no longer runs on this host."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@contextlib.contextmanager
def atomic_output(
    spark: SparkSession, url: str, kind: OutputKind, key: str, inputs: Mapping[str, str]
) -> Iterator[str]:
    """Yield a temporary URL to write into; publish it at ``url`` only if the block succeeds.

    ``outputs.check_output`` runs first: an existing ``url`` is replaced only if it is provably an earlier
    output of ``kind`` and overlaps none of ``inputs`` (config key -> URL). The old output (if any) is
    moved aside, the new one renamed into place, then the old one deleted. A leftover ``*.old-*`` sibling
    after a crash still holds the previous complete output. All of it under ``output_lock``.
    """
    fs = HadoopFS(spark, url)
    url = url.rstrip("/")
    with output_lock(spark, url, key):
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
