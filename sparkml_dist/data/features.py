"""Input columns -> the sparse feature space, as Spark expressions (the partition and scoring jobs both use it).

Three input forms become one layout (per row: ascending feature ``indices`` and their ``values``):

- a Spark ML vector column (``VectorAssembler``/``FeatureHasher`` output, dense or sparse) or Spark's
  ``libsvm`` source (which reads into such a column): its indices and values as they are, read in the JVM
  through the vector's SQL form (no Python UDF, no densifying);
- explicit ``data.indices_col`` / ``data.values_col`` list columns with a declared ``data.dimension``;
- table columns: numeric (and boolean, as 0/1) columns at indices 0..n-1, then each categorical column
  one-hot in its own range of indices: ``data.hash_buckets`` of them, the bucket a seeded 64-bit hash of the
  value (the hashing trick), or its vocabulary (the most frequent values, counted in one distributed pass)
  plus one out-of-vocabulary index. Per-column ranges keep every row's indices distinct and ascending by
  construction; a null category is a category of its own.

What was decided (kind, dimension, columns in order, buckets, seed) is an ``Encoding``: stored in the
manifest and with the model, so scoring rebuilds exactly the same space from columns picked by name. It also
records what scoring checks new data against: each categorical column's type, and which categories training
saw (the vocabulary; for hash encoding the buckets training rows hit), so unseen values can be counted.
"""

from __future__ import annotations

import base64
import logging
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkml_dist.config import DataConfig
from sparkml_dist.errors import UserError

INDICES, VALUES = "indices", "values"
_NUMERIC = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.FloatType, T.DoubleType, T.DecimalType)
_NUMERIC_OR_BOOL = (*_NUMERIC, T.BooleanType)
_CATEGORICAL = (T.StringType, T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.BooleanType)
_VECTOR_JSON = "struct<v:struct<type:tinyint,size:int,indices:array<int>,values:array<double>>>"
MAX_DIMENSION = (1 << 31) - 1
"""Indices are stored as int32 (as Spark ML vectors hold them)."""


log = logging.getLogger("sparkml_dist.features")  # its pre-move name: logging configs keep working

VOCABULARY_MIN_COVERAGE = 0.5
"""A vocabulary that covers less than this share of its column's rows is logged as a warning: most rows
then share the one out-of-vocabulary index (e.g. an id-like column whose values are all distinct)."""
SEEN_BUCKETS_MAX_BITS = 1 << 22
"""Hash encoding records the buckets training hit (one bit per bucket, all categorical columns together) up to
this many buckets (512 KB before compression); beyond it unseen values are not counted at scoring."""


class FeatureError(UserError):
    """The input's columns cannot become the configured feature space; the message names the column and fix."""


@dataclass(frozen=True)
class Encoding:
    """How input columns map to the sparse feature space; a pure function of this record and the row."""

    kind: Literal["vector", "indices_values", "columns"]
    dimension: int
    columns: list[str]
    """Input columns read, in order: the vector column; indices then values; or numeric then categorical."""
    numeric: list[str] = field(default_factory=list)
    """kind=columns: columns at indices 0..len-1 (booleans as 0/1)."""
    categorical: list[str] = field(default_factory=list)
    """kind=columns: hashed one-hot, column j in [len(numeric) + j * buckets, ... + buckets)."""
    buckets: int = 0
    seed: int = 0
    fill: dict[str, float] = field(default_factory=dict)
    """kind=columns: the value that replaces a null in these numeric columns (data.null_fill, means resolved)."""
    transform: str = "none"
    """kind=columns: data.numeric_transform (none, log1p, standardize), applied after the fill."""
    scale: dict[str, list[float]] = field(default_factory=dict)
    """transform=standardize: [mean, std] per numeric column, over the input (std 0 is stored as 1)."""
    vocabularies: dict[str, list[str]] = field(default_factory=dict)
    """Vocabulary encoding: per categorical column its values (as strings, most frequent first); value i of
    column j takes index offsets[j] + i, any other value offsets[j] + len(vocabulary)."""
    types: dict[str, str] = field(default_factory=dict)
    """kind=columns: each categorical column's type family in training (``category_type``: string, integer or
    boolean). A value becomes a category through its text, so another family (5 for "5", or ints for hex
    strings) would make every value an unseen one: scoring refuses it. Empty in encodings made before."""
    seen: dict[str, str] = field(default_factory=dict)
    """Hash encoding: per categorical column, the buckets the partitioned input's rows hit (bit b of byte b//8,
    zlib-compressed, base64), so scoring can count values landing in a bucket training never saw; empty when
    not recorded (encodings made before, or more than SEEN_BUCKETS_MAX_BITS buckets)."""

    def widths(self) -> list[int]:
        """Indices each categorical column takes: its buckets, or its vocabulary plus the OOV index."""
        if self.vocabularies:
            return [len(self.vocabularies[c]) + 1 for c in self.categorical]
        return [self.buckets] * len(self.categorical)

    def offsets(self) -> list[int]:
        """First index of each categorical column's range."""
        out, at = [], len(self.numeric)
        for w in self.widths():
            out.append(at)
            at += w
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Encoding:
        return cls(**d)

    def unseen_columns(self) -> dict[str, Column]:
        """Per categorical column whose unseen values can be counted, an expression over the scoring input
        (after ``with_vocabulary_indices``) that is true where the row's value was not seen in training."""
        if self.vocabularies:
            return {
                c: F.col(_VOCAB_INDEX.format(j)) == F.lit(len(self.vocabularies[c]))
                for j, c in enumerate(self.categorical)
            }
        out = {}
        for c in self.categorical:
            if c in self.seen:
                bitmap = zlib.decompress(base64.b64decode(self.seen[c]))
                # nibble i of the hex text holds buckets 4i..4i+3 (bit k: bucket 4i+k), read with built-ins
                nibbles = "".join(f"{b & 15:x}{b >> 4:x}" for b in bitmap)
                bucket = _bucket(c, self.buckets, self.seed)
                nibble = F.conv(F.lit(nibbles).substr(F.shiftright(bucket, 2) + 1, F.lit(1)), 16, 10).cast("int")
                bit = F.pow(F.lit(2), bucket.bitwiseAND(3)).cast("int")
                out[c] = nibble.bitwiseAND(bit) == 0
        return out


def is_sparse_input(dcfg: DataConfig) -> bool:
    """The input form itself is sparse (LIBSVM, indices/values columns, categorical columns)."""
    return dcfg.input_format == "libsvm" or dcfg.indices_col is not None or bool(dcfg.categorical_cols)


def is_vector(dtype: T.DataType) -> bool:
    """A Spark ML (or old MLlib) vector column: what VectorAssembler and every MLlib pipeline produce."""
    from pyspark.ml.linalg import VectorUDT
    from pyspark.mllib.linalg import VectorUDT as MllibVectorUDT

    return isinstance(dtype, (VectorUDT, MllibVectorUDT))


def is_feature_array(dtype: T.DataType | None) -> bool:
    """An array or vector column that holds a whole feature vector per row."""
    return dtype is not None and (isinstance(dtype, T.ArrayType) or is_vector(dtype))


def category_type(dtype: T.DataType) -> str:
    """The type family of a categorical column: values of one family with the same text are the same category
    (an int 5 and a long 5 are both "5"), values of two families never are."""
    if isinstance(dtype, T.StringType):
        return "string"
    if isinstance(dtype, T.BooleanType):
        return "boolean"
    if isinstance(dtype, T.IntegralType):
        return "integer"
    return dtype.simpleString()


def _bucket(c: str, buckets: int, seed: int) -> Column:
    """The hash bucket (0..buckets-1) of categorical column ``c``'s value."""
    return F.pmod(F.xxhash64(F.col(c).cast("string"), F.lit(c), F.lit(seed)), F.lit(buckets)).cast("int")


def _seen_buckets(df: DataFrame, categorical: list[str], buckets: int, seed: int) -> dict[str, str]:
    """Per column the buckets its values hit, in one pass over the categorical columns: (column, 64-bucket word)
    pairs OR-ed in the executors, so at most columns x buckets / 64 rows reach the driver."""
    if not categorical or len(categorical) * buckets > SEEN_BUCKETS_MAX_BITS:
        return {}
    pairs = F.array(
        *[F.struct(F.lit(j).alias("j"), _bucket(c, buckets, seed).alias("b")) for j, c in enumerate(categorical)]
    )
    hits = df.select(F.explode(pairs).alias("p")).select("p.j", "p.b")
    words = hits.groupBy("j", F.shiftright("b", 6).alias("w")).agg(
        F.expr("bit_or(shiftleft(1L, b & 63))").alias("bits")
    )
    maps = {j: bytearray((buckets + 7) // 8) for j in range(len(categorical))}
    for row in words.collect():
        word = (int(row["bits"]) & (2**64 - 1)).to_bytes(8, "little")
        at = int(row["w"]) * 8
        target = maps[int(row["j"])]
        target[at : at + 8] = word[: len(target) - at]
    return {c: base64.b64encode(zlib.compress(bytes(maps[j]), 9)).decode("ascii") for j, c in enumerate(categorical)}


def build_encoding(df: DataFrame, fields: dict[str, T.DataType], dcfg: DataConfig, vector_col: str | None) -> Encoding:
    """Decide the encoding of ``df`` for the sparse layout: the named vector column, the explicit
    indices/values columns, or numeric + categorical columns (``data.feature_cols`` or every numeric and
    boolean column but the label and row key). Raises FeatureError naming a missing or mistyped column."""
    if dcfg.null_fill and (dcfg.indices_col is not None or vector_col is not None):
        raise FeatureError(
            "data.null_fill applies to numeric table columns; the input's features are a vector or indices/values "
            "column: leave data.null_fill empty"
        )
    if dcfg.indices_col is not None:
        values_col = dcfg.values_col or VALUES
        for name, kind in ((dcfg.indices_col, (T.IntegerType, T.LongType)), (values_col, _NUMERIC)):
            dtype = fields.get(name)
            if dtype is None:
                raise FeatureError(f"sparse column {name!r} is not in the input; columns: {sorted(fields)}")
            if not (isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, kind)):
                raise FeatureError(
                    f"sparse column {name!r} has type {dtype.simpleString()}; data.indices_col must be an array of "
                    "integers and data.values_col an array of numbers"
                )
        if dcfg.dimension is None:
            raise FeatureError(
                "data.indices_col needs data.dimension (the width of the feature space: one more than the "
                "largest index any row may hold)"
            )
        return Encoding("indices_values", dcfg.dimension, [dcfg.indices_col, values_col])
    if vector_col is not None:
        return Encoding("vector", _vector_dimension(df, vector_col, dcfg), [vector_col])
    categorical = list(dcfg.categorical_cols or [])
    numeric = dcfg.feature_cols or [
        n
        for n, t in fields.items()
        if isinstance(t, _NUMERIC_OR_BOOL)
        and n not in (dcfg.label_col, dcfg.row_id_col, *categorical, *dcfg.ignore_cols)
    ]
    numeric = [n for n in numeric if n not in categorical]
    missing = [n for n in [*numeric, *categorical] if n not in fields]
    if missing:
        raise FeatureError(f"column(s) {missing} are not in the input; columns: {sorted(fields)}")
    bad = [f"{n} ({fields[n].simpleString()})" for n in numeric if not isinstance(fields[n], _NUMERIC_OR_BOOL)]
    if bad:
        raise FeatureError(
            f"column(s) {bad} are neither numeric nor boolean: list them in data.categorical_cols to encode them "
            "one-hot, or leave them out of data.feature_cols"
        )
    bad = [f"{n} ({fields[n].simpleString()})" for n in categorical if not isinstance(fields[n], _CATEGORICAL)]
    if bad:
        raise FeatureError(
            f"categorical column(s) {bad} must hold strings, integers or booleans: cast them, or drop them from "
            "data.categorical_cols"
        )
    dimension = len(numeric) + len(categorical) * dcfg.hash_buckets
    if dimension > MAX_DIMENSION:
        raise FeatureError(
            f"{len(categorical)} categorical columns x data.hash_buckets={dcfg.hash_buckets} make {dimension} "
            f"features, above the {MAX_DIMENSION} an int32 index holds: lower data.hash_buckets"
        )
    if dimension == 0:
        raise FeatureError("the input has no feature columns: set data.feature_cols or data.categorical_cols")
    fill = _resolve_fill(df, fields, dcfg, numeric)
    vocabularies = (
        _vocabularies(df, categorical, dcfg.vocabulary_size) if dcfg.categorical_encoding == "vocabulary" else {}
    )
    if vocabularies:
        dimension = len(numeric) + sum(len(v) + 1 for v in vocabularies.values())
    seen = {} if vocabularies else _seen_buckets(df, categorical, dcfg.hash_buckets, dcfg.hash_seed)
    scale = {}
    if dcfg.numeric_transform == "standardize" and numeric:
        filled = [_filled(c, fill).cast("double") for c in numeric]
        aggs = [F.avg(x).alias(f"m{i}") for i, x in enumerate(filled)]
        aggs += [F.stddev_pop(x).alias(f"s{i}") for i, x in enumerate(filled)]
        row = df.agg(*aggs).first()
        assert row is not None
        for i, c in enumerate(numeric):
            mean, std = row[f"m{i}"], row[f"s{i}"]
            if mean is None:
                raise FeatureError(f"data.numeric_transform=standardize: column {c!r} holds no values")
            scale[c] = [float(mean), float(std) if std else 1.0]
    return Encoding(
        "columns",
        dimension,
        [*numeric, *categorical],
        numeric,
        categorical,
        dcfg.hash_buckets,
        dcfg.hash_seed,
        fill,
        dcfg.numeric_transform,
        scale,
        vocabularies,
        {c: category_type(fields[c]) for c in categorical},
        seen,
    )


NULL_CATEGORY = "\x00null"
"""How a null categorical value is counted and looked up in a vocabulary (a category of its own)."""
_VOCAB_INDEX = "_vocab_{}"


def _category(c: str) -> Column:
    return F.coalesce(F.col(c).cast("string"), F.lit(NULL_CATEGORY))


def _vocabularies(df: DataFrame, categorical: list[str], size: int) -> dict[str, list[str]]:
    """The ``size`` most frequent values of every categorical column (ties by value), in one distributed
    pass: (column, value) pairs counted, ranked per column, the top collected (at most size per column)."""
    from pyspark.sql.window import Window

    if not categorical:
        return {}
    pairs = F.array(*[F.struct(F.lit(j).alias("j"), _category(c).alias("v")) for j, c in enumerate(categorical)])
    counts = df.select(F.explode(pairs).alias("p")).select("p.j", "p.v").groupBy("j", "v").count()
    per_column = Window.partitionBy("j")
    rank = F.row_number().over(per_column.orderBy(F.desc("count"), F.asc("v")))
    ranked = counts.withColumn("r", rank).withColumn("rows", F.sum("count").over(per_column))
    ranked = ranked.withColumn("values", F.count(F.lit(1)).over(per_column))
    top = ranked.filter(F.col("r") <= size).select("j", "v", "r", "count", "rows", "values").collect()
    out: dict[str, list[str]] = {c: [] for c in categorical}
    covered: dict[int, int] = {}
    for row in sorted(top, key=lambda r: (r["j"], r["r"])):
        out[categorical[row["j"]]].append(row["v"])
        covered[row["j"]] = covered.get(row["j"], 0) + int(row["count"])
    for row in {r["j"]: r for r in top}.values():  # one per column: its row and value counts
        share = covered[row["j"]] / row["rows"]
        if share < VOCABULARY_MIN_COVERAGE:
            ties = " (every value is as frequent as the next: the vocabulary is the first ones by value)"
            log.warning(
                "data.vocabulary_size=%d: the vocabulary of categorical column %r covers %.1f%% of its %d rows "
                "(%d distinct values%s), below %.0f%%; every other row gets the one out-of-vocabulary index: raise "
                "data.vocabulary_size, or use data.categorical_encoding=hash for an id-like column",
                size, categorical[row["j"]], 100 * share, row["rows"], row["values"],
                ties if row["rows"] == row["values"] else "", 100 * VOCABULARY_MIN_COVERAGE,
            )  # fmt: skip
    return out


def with_vocabulary_indices(df: DataFrame, enc: Encoding) -> DataFrame:
    """``df`` with each vocabulary-encoded column's index inside its vocabulary (OOV: its length) as a column
    ``_vocab_<j>``, by a broadcast join per column (the big side keeps its partitioning and row order)."""
    if not enc.vocabularies:
        return df
    spark = df.sparkSession
    for j, c in enumerate(enc.categorical):
        words = enc.vocabularies[c]
        key, idx = f"_vocab_key_{j}", _VOCAB_INDEX.format(j)
        table = spark.createDataFrame(list(enumerate(words)), f"{idx}_i int, {key}_v string")
        df = df.withColumn(key, _category(c)).join(F.broadcast(table), F.col(key) == F.col(f"{key}_v"), "left")
        df = df.withColumn(idx, F.coalesce(F.col(f"{idx}_i"), F.lit(len(words)))).drop(key, f"{key}_v", f"{idx}_i")
    return df


def _filled(c: str, fill: dict[str, float]) -> Column:
    value = F.col(c).cast("float")
    return F.coalesce(value, F.lit(fill[c]).cast("float")) if c in fill else value


def _numeric(c: str, enc: Encoding) -> Column:
    """Numeric column ``c`` as the encoding feeds it: filled, then transformed (float)."""
    x = _filled(c, enc.fill).cast("double")
    if enc.transform == "log1p":
        x = F.when(x >= 0, F.log1p(x)).otherwise(F.lit(float("nan")))  # a negative count: an invalid row
    elif enc.transform == "standardize":
        mean, std = enc.scale[c]
        x = (x - F.lit(mean)) / F.lit(std)
    return x.cast("float")


def _resolve_fill(
    df: DataFrame, fields: dict[str, T.DataType], dcfg: DataConfig, numeric: list[str]
) -> dict[str, float]:
    """data.null_fill with every 'mean' replaced by the column's mean over the input (one pass, reading only
    those columns); a column that is not a numeric feature is refused."""
    bad = [c for c in dcfg.null_fill if c not in numeric]
    if bad:
        raise FeatureError(
            f"data.null_fill names {bad}, which are not numeric feature columns (those are {numeric}); categorical "
            "nulls are a category of their own: drop them from data.null_fill"
        )
    means = [c for c, how in dcfg.null_fill.items() if how == "mean"]
    found = df.agg(*[F.avg(F.col(c).cast("double")).alias(c) for c in means]).first() if means else None
    out = {}
    for c, how in dcfg.null_fill.items():
        value = found[c] if how == "mean" and found is not None else float(how)
        if value is None:
            raise FeatureError(f"data.null_fill[{c}]=mean: column {c!r} holds no values to average; give a constant")
        out[c] = float(value)
    return out


def _vector_dimension(df: DataFrame, name: str, dcfg: DataConfig) -> int:
    """The vector column's size, from its first non-empty row (every row is checked against it)."""
    if dcfg.dimension is not None:
        return dcfg.dimension
    size = _vector_struct(name).getField("size")
    first = df.select(F.coalesce(size, F.size(_vector_struct(name).getField("values"))).alias("n")).first()
    if first is None or first["n"] is None:
        raise FeatureError(f"data.input_url {dcfg.input_url} has no rows: the input is empty")
    return int(first["n"])


def _vector_struct(name: str) -> Column:
    """A Spark ML vector's SQL form (type 0 sparse: size, indices, values; type 1 dense: values), read in the
    JVM: a UDT cannot be cast to its SQL type, but its JSON form is exactly that struct (doubles print in
    their shortest round-tripping form, so the values come back exact)."""
    return F.from_json(F.to_json(F.struct(F.col(name).alias("v"))), _VECTOR_JSON).getField("v")


def sparse_columns(enc: Encoding) -> tuple[Column, Column, Column]:
    """(indices array<int>, values array<float>, valid boolean) of the encoding, as expressions over the input.

    Valid: indices and values of one length, every index in 0..dimension-1 and ascending, every value
    finite (a null numeric column makes its row invalid: the invalid-value policy decides)."""
    if enc.kind == "vector":
        v = _vector_struct(enc.columns[0])
        values = v.getField("values")
        dense = F.sequence(F.lit(0), F.size(values) - 1)
        # sequence(0, -1) is [0, -1]: an empty dense vector has no indices
        indices = F.when(v.getField("type") == 1, F.when(F.size(values) > 0, dense).otherwise(F.array()))
        indices = indices.otherwise(v.getField("indices")).cast("array<int>")
        size = F.coalesce(v.getField("size"), F.size(values))
        values = values.cast("array<float>")
        valid = F.col(enc.columns[0]).isNotNull() & (size == F.lit(enc.dimension)) & _checked(indices, values, enc)
        return indices, values, valid
    if enc.kind == "indices_values":
        indices = F.col(enc.columns[0]).cast("array<int>")
        values = F.col(enc.columns[1]).cast("array<float>")
        # A long index above 2^31 would wrap in the cast: check the uncast maximum too.
        in_range = F.coalesce(F.array_max(F.col(enc.columns[0])) < F.lit(enc.dimension), F.lit(True))
        return indices, values, in_range & _checked(indices, values, enc)
    n = len(enc.numeric)
    numeric_values = [_numeric(c, enc) for c in enc.numeric]
    if enc.vocabularies:  # with_vocabulary_indices added each column's index inside its vocabulary
        hashed = [F.lit(at) + F.col(_VOCAB_INDEX.format(j)) for j, at in enumerate(enc.offsets())]
    else:
        hashed = [F.lit(n + j * enc.buckets) + _bucket(c, enc.buckets, enc.seed) for j, c in enumerate(enc.categorical)]
    indices = F.array(*[F.lit(i) for i in range(n)], *hashed).cast("array<int>")
    values = F.array(*numeric_values, *[F.lit(1.0).cast("float") for _ in hashed]).cast("array<float>")
    return indices, values, finite_values(values)


def null_columns(enc: Encoding) -> Column | None:
    """For messages: the names of the numeric columns that are null (and not filled) in a row, comma-separated;
    None where the encoding has no such columns."""
    open_cols = [c for c in enc.numeric if c not in enc.fill] if enc.kind == "columns" else []
    if not open_cols:
        return None
    return F.concat_ws(", ", *[F.when(F.col(c).isNull(), F.lit(c)) for c in open_cols])


def _checked(indices: Column, values: Column, enc: Encoding) -> Column:
    lo, hi = F.array_min(indices), F.array_max(indices)
    in_range = F.coalesce((lo >= 0) & (hi < F.lit(enc.dimension)), F.lit(True))  # empty rows have no min
    ascending = (F.array_sort(indices) == indices) & (F.size(F.array_distinct(indices)) == F.size(indices))
    return (
        indices.isNotNull()
        & values.isNotNull()
        & (F.size(indices) == F.size(values))
        & F.array_contains(indices, F.lit(None).cast("int")).isNull()  # no null index (isNull: no match found)
        & in_range
        & ascending
        & finite_values(values)
    )


def invalid_reason(enc: Encoding) -> Column:
    """Why a row of ``enc``'s input is invalid, in words: the column, the offending index or value, and the fix
    (a string column; null where no rule here names the cause, e.g. a null numeric column, which the caller
    names with ``null_columns``). Put it under ``when(~valid, ...)``: its per-element lambdas then run for
    invalid rows only."""
    if enc.kind == "vector":
        name = enc.columns[0]
        v = _vector_struct(name)
        indices, values, _ = sparse_columns(enc)
        size = F.coalesce(v.getField("size"), F.size(v.getField("values")))
        wrong_size = F.concat(
            F.lit(f"its vector in column {name!r} has size "),
            size.cast("string"),
            F.lit(
                f", not the {enc.dimension} of the feature space (data.dimension, else the first row's size): give "
                "every row's vector the same size"
            ),
        )
        return (
            F.when(
                F.col(name).isNull(),
                F.lit(f"its vector column {name!r} is null (no features at all): fill it in the input"),
            )
            .when(size != F.lit(enc.dimension), wrong_size)
            .otherwise(_entry_reason(indices, values, enc.dimension, f"column {name!r}"))
        )
    if enc.kind == "indices_values":
        raw_indices, raw_values = F.col(enc.columns[0]), F.col(enc.columns[1])
        where = f"data.indices_col {enc.columns[0]!r}"
        lengths = F.concat(
            F.lit("it has "),
            F.size(raw_indices).cast("string"),
            F.lit(f" indices in {enc.columns[0]!r} but "),
            F.size(raw_values).cast("string"),
            F.lit(f" values in {enc.columns[1]!r}: each index needs exactly one value"),
        )
        return (
            F.when(raw_indices.isNull(), F.lit(f"its indices ({enc.columns[0]!r}) are null"))
            .when(raw_values.isNull(), F.lit(f"its values ({enc.columns[1]!r}) are null"))
            .when(F.size(raw_indices) != F.size(raw_values), lengths)
            .otherwise(_entry_reason(raw_indices, raw_values.cast("array<float>"), enc.dimension, where))
        )
    reasons = []
    for c in enc.numeric:
        x = _filled(c, enc.fill).cast("double")
        shown = F.col(c).cast("string")
        if enc.transform == "log1p":
            reasons.append(
                F.when(
                    x < 0,
                    F.concat(
                        F.lit(f"column {c!r} holds "),
                        shown,
                        F.lit(
                            ", below 0, and data.numeric_transform=log1p takes counts (values >= 0): fix the value, "
                            "or use data.numeric_transform=standardize or none"
                        ),
                    ),
                )
            )
        bad = F.isnan(x) | (F.abs(x) == F.lit(float("inf")))
        reasons.append(F.when(bad, F.concat(F.lit(f"column {c!r} holds "), shown, F.lit(": only finite numbers"))))
    return F.coalesce(*reasons) if reasons else F.lit(None).cast("string")


def _entry_reason(indices: Column, values: Column, dimension: int, where: str) -> Column:
    """The first broken rule among one row's (indices, values) entries, or null: a null, negative,
    out-of-range, repeated or descending index; a null, NaN or infinite value."""

    def first(flags: Column) -> Column:  # the first position whose flag is true, or null
        return F.get(F.filter(flags, lambda p: p.isNotNull()), 0)

    def at(p: Column) -> Column:
        return F.get(indices, p).cast("string")

    null_at = first(F.transform(indices, lambda x, i: F.when(x.isNull(), i)))
    negative_at = first(F.transform(indices, lambda x, i: F.when(x < 0, i)))
    beyond_at = first(F.transform(indices, lambda x, i: F.when(x >= F.lit(dimension), i)))
    order_at = first(F.transform(indices, lambda x, i: F.when((i > 0) & (x <= F.get(indices, i - 1)), i)))
    value_at = first(
        F.transform(values, lambda v, i: F.when(v.isNull() | F.isnan(v) | (F.abs(v) == F.lit(float("inf"))), i))
    )
    repeated = F.get(indices, order_at) == F.get(indices, order_at - 1)
    return (
        F.when(null_at.isNotNull(), F.lit(f"a feature index in {where} is null"))
        .when(
            negative_at.isNotNull(),
            F.concat(F.lit("feature index "), at(negative_at), F.lit(f" in {where} is negative: indices count from 0")),
        )
        .when(
            beyond_at.isNotNull(),
            F.concat(
                F.lit("feature index "),
                at(beyond_at),
                F.lit(
                    f" in {where} is outside the feature space 0..{dimension - 1} (data.dimension={dimension}): raise "
                    "data.dimension above the largest index, or fix the row"
                ),
            ),
        )
        .when(
            order_at.isNotNull() & repeated,
            F.concat(
                F.lit("feature index "),
                at(order_at),
                F.lit(f" appears twice in {where}: give each index once per row (sum the values of a repeated one)"),
            ),
        )
        .when(
            order_at.isNotNull(),
            F.concat(
                F.lit(f"its feature indices in {where} are not ascending ("),
                at(order_at - 1),
                F.lit(" before "),
                at(order_at),
                F.lit("): sort each row's indices, keeping every value with its index"),
            ),
        )
        .when(
            value_at.isNotNull(),
            F.concat(
                F.lit("the value at feature index "),
                at(value_at),
                F.lit(f" in {where} is "),
                F.coalesce(F.get(values, value_at).cast("string"), F.lit("null")),
                F.lit(": only finite numbers"),
            ),
        )
    )


def finite_values(values: Column) -> Column:
    """True where the numeric array ``values`` is not null and holds no null, NaN or infinite value (an empty
    array is fine). The one such rule: the dense layout's ``partition.valid_features`` applies it too."""
    # Built-in array functions (code-generated), not a per-element lambda: NaN sorts above every number
    # in Spark, so a NaN shows as the array's max; array_contains is null, not false, when the array
    # holds a null and no match (and NaN, the value looked for, is caught by the max).
    hi, lo = F.array_max(values), F.array_min(values)
    checks = (
        values.isNotNull()
        & F.array_contains(values, F.lit(float("nan"))).isNotNull()
        & ~F.isnan(hi)
        & (hi != F.lit(float("inf")))
        & (lo != F.lit(float("-inf")))
    )
    return F.when(F.size(values) == 0, values.isNotNull()).otherwise(checks)


def check_scoring_columns(enc: Encoding, fields: dict[str, T.DataType], where: str) -> None:
    """Scoring input holds every column the encoding reads, by name, with a usable type."""
    missing = [c for c in enc.columns if c not in fields]
    if missing:
        raise FeatureError(
            f"{where} lacks column(s) {missing} that the model's features are built from (it reads {enc.columns}); "
            f"columns: {sorted(fields)}"
        )
    if enc.kind == "vector" and not is_vector(fields[enc.columns[0]]):
        raise FeatureError(f"{where}: column {enc.columns[0]!r} must be a Spark ML vector, as in training")
    bad = [f"{c} ({fields[c].simpleString()})" for c in enc.numeric if not isinstance(fields[c], _NUMERIC_OR_BOOL)]
    bad += [f"{c} ({fields[c].simpleString()})" for c in enc.categorical if not isinstance(fields[c], _CATEGORICAL)]
    if bad:
        raise FeatureError(f"{where}: column(s) {bad} do not have the types the model was trained on")
    for c in enc.categorical:
        learned, given = enc.types.get(c), category_type(fields[c])
        if learned is not None and learned != given:
            raise FeatureError(
                f"{where}: categorical column {c!r} is {fields[c].simpleString()} ({given}), but the model learned it "
                f"as {learned}: its values would all score as unseen categories; cast {c} to {learned} as in training"
            )
    if enc.categorical and not enc.types:
        log.warning(
            "%s: the model does not record the types of its categorical columns %s (it predates them): a column "
            "of another type than in training would score every value as unseen; re-train to have them checked",
            where, enc.categorical,
        )  # fmt: skip
