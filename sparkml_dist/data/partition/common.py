"""What every pass of the partition job shares: its errors (and reading a Spark failure on a damaged
Parquet page as one), the working column names, and the read input (``_Input``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql import types as T

from sparkml_dist.data.features import Encoding
from sparkml_dist.data.fingerprint import FileDigest
from sparkml_dist.errors import UserError

SHARD_COL = "shard"
FEATURES_COL = "features"
_KEY, _BUCKET, _POS = "_key", "_bucket", "_pos"
_NULLS = "_nulls"
"""Sparse table input: the numeric columns that are null in the row (named in the fail message)."""
_WHY = "_why"
"""Why an invalid row is invalid, in words (``features.invalid_reason``, the label's rule); null for valid rows."""
# Features per row above which a (sparse) vector is refused rather than densified: 4 bytes each per row.
MAX_DENSE_WIDTH = 1 << 16
_NUMERIC = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.FloatType, T.DoubleType, T.DecimalType)
_INTEGRAL = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)


class PartitionError(UserError):
    """The input or the settings cannot be partitioned; the message names the value and the fix."""


class CorruptInputError(PartitionError):
    """A Parquet file's data failed its page checksum (or could not be decoded): it changed after it was written."""


class _DuplicateRowIds(Exception):
    """Raised by the counting pass under data.duplicate_row_ids=rekey: the rows must be numbered anew."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class _Input:
    df: DataFrame
    """row_id, features (array<float>), label (int; double for regression), valid flag."""
    feature_names: list[str]
    fingerprint: str
    input_bytes: int
    ids_from_input: bool = True
    """row_id is the input's data.row_id_col (checked for nulls and duplicates), not assigned here."""
    encoding: Encoding | None = None
    """The sparse layout's encoding: then df holds indices and values columns instead of features."""
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    """Every input column and its role (``column_roles``)."""
    digests: list[FileDigest] = dataclasses.field(default_factory=list)
    """Each input file's content digest, which ``fingerprint`` was computed from (kept in the manifest)."""
    fingerprint_s: float = 0.0


_CORRUPT = (
    "could not verify page integrity",
    "CRC checksum verification failed",
    "Encountered error while reading file",
)
_READ_FILE = re.compile(r"(?:reading file|Encountered error while reading file) (\S+?)\.?(?:\s|$)")
_STALE_CRC = re.compile(r"ChecksumException: Checksum error: (\S+?) at \d+")


def corrupt_file_error(exc: BaseException, key: str) -> CorruptInputError | None:
    """A CorruptInputError naming the file if ``exc`` is Spark failing to read a damaged Parquet page, or
    Hadoop's checksum side file (``.NAME.crc``) disagreeing with the file."""
    text = str(exc)
    stale = _STALE_CRC.search(text)
    if stale:
        path = stale.group(1)
        side = "/".join([*path.split("/")[:-1], f".{path.rsplit('/', 1)[-1]}.crc"])
        return CorruptInputError(
            f"input file {path} under {key} does not match its Hadoop checksum file {side}: the file changed "
            "after Spark or Hadoop wrote it (damage, or a rewrite by another tool that left the old .crc "
            "behind). Restore the file; if the rewrite was intended, delete that .crc file"
        )
    if not any(m in text for m in _CORRUPT):
        return None
    found = _READ_FILE.search(text)
    where = found.group(1) if found else "a file"
    crc = "checksum" in text.lower() or "integrity" in text
    why = "a data page failed its CRC checksum" if crc else "a data page could not be decoded"
    return CorruptInputError(
        f"input file {where} under {key} is damaged: {why}, so its values changed after it was written "
        "(the footer may still look intact). Restore or rewrite that file, or move it out of the input"
    )
