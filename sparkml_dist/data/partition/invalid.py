"""The invalid-row rule and its policy, shared by the partition and scoring jobs: which feature arrays are
valid (``valid_features``), and ``data.invalid_values`` (fail naming the row, or drop) as a Spark filter whose
failure ``clean_invalid_row_error`` turns back into a PartitionError.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from sparkml_dist.data.features import finite_values
from sparkml_dist.data.partition.common import PartitionError


def valid_features(features: Column, n: int) -> Column:
    """True where the array<float> ``features`` has ``n`` elements, none null, NaN or infinite (partition and
    score apply the same rule)."""
    return features.isNotNull() & (F.size(features) == F.lit(n)) & finite_values(features)


_INVALID = "has a NaN/infinite feature"
_INVALID_WHY = " is invalid: "
_INVALID_END = "drop and count such rows"


def apply_invalid_policy(
    df: DataFrame,
    valid: Column,
    row_id_col: str,
    policy: str,
    also: str,
    nulls: Column | None = None,
    reason: Column | None = None,
) -> DataFrame:
    """Keep the rows where ``valid``; under policy 'fail' the first other row fails the Spark job with a
    message naming its id (``clean_invalid_row_error`` turns that into a PartitionError) and, given ``reason``
    (a string column saying why the row is invalid, null where unknown), the cause and its fix; else, given
    ``nulls`` (a string column of the names of null feature columns), the null columns."""
    if policy == "drop":
        return df.filter(valid)
    named = F.lit("")
    if nulls is not None:
        named = F.when(nulls != F.lit(""), F.concat(F.lit("(null in column(s) "), nulls, F.lit(") "))).otherwise("")
    msg = F.concat(
        F.lit(f"{row_id_col} "),
        F.col(row_id_col).cast("string"),
        F.lit(" "),
        named,
        F.lit(
            f"{_INVALID}, a null feature, a features array of the wrong length or {also}; "
            f"clean the input or set data.invalid_values=drop to {_INVALID_END}"
        ),
    )
    if reason is not None:
        explained = F.concat(
            F.lit(f"{row_id_col} "),
            F.col(row_id_col).cast("string"),
            F.lit(_INVALID_WHY),
            reason,
            F.lit(f"; or set data.invalid_values=drop to {_INVALID_END}"),
        )
        msg = F.coalesce(explained, msg)
    # A filter, not a projection: a projected column nobody reads would be pruned and never checked.
    return df.filter(F.when(valid, F.lit(True)).otherwise(F.raise_error(msg)))


def clean_invalid_row_error(exc: BaseException, row_id_col: str = "row_id") -> PartitionError | None:
    """The PartitionError carried by a Spark failure that ``apply_invalid_policy`` raised, if it is one."""
    text = str(exc)
    found = [i for i in (text.find(_INVALID), text.find(_INVALID_WHY)) if i >= 0]
    if not found:
        return None
    at = min(found)
    start = text.rfind(f"{row_id_col} ", 0, at)
    end = text.find(_INVALID_END, start)
    return PartitionError(text[start : end + len(_INVALID_END)])
