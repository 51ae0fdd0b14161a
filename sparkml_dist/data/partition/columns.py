"""Columns -> roles: which input columns are the features (dense: one array<float> expression; the sparse
layout is ``sparkml_dist.data.features``), the label's and the dense features' invalid-row reasons, the checks that
no column is used or left out by accident, and the per-column roles the manifest records.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkml_dist.config import DataConfig
from sparkml_dist.data.features import Encoding, is_feature_array, is_vector
from sparkml_dist.data.partition.common import _NUMERIC, FEATURES_COL, MAX_DENSE_WIDTH, PartitionError


def _label_reason(dcfg: DataConfig, label: Column, libsvm: bool) -> Column:
    """Why a row's label makes it invalid, in words (null when the label is fine)."""
    raw = F.col(dcfg.label_col)
    why = F.when(raw.isNull(), F.lit(f"its label ({dcfg.label_col!r}) is null"))
    if dcfg.task == "regression":
        return why.when(
            F.isnan(label) | (F.abs(label) == F.lit(float("inf"))),
            F.concat(F.lit(f"its label ({dcfg.label_col!r}) is "), raw.cast("string"), F.lit(": only finite numbers")),
        )
    if libsvm:
        return why.when(
            label.isNull(),
            F.concat(
                F.lit("its LIBSVM label "),
                raw.cast("string"),
                F.lit(
                    " is not a whole number: classification labels are class ids 0..data.num_classes-1 (set "
                    "data.task=regression for real-valued labels)"
                ),
            ),
        )
    return why


def _array_source(fields: dict[str, T.DataType], dcfg: DataConfig) -> str | None:
    """The array or vector column the dense features come from (as ``feature_expr`` picks it); None: scalar
    columns."""
    if dcfg.features_col is not None:
        return dcfg.features_col
    return FEATURES_COL if dcfg.feature_cols is None and is_feature_array(fields.get(FEATURES_COL)) else None


def _dense_reason(features: Column, n: int, source: str | None) -> Column:
    """Why a row's dense features are invalid, where it is one thing: a null vector or array, or one of another
    length (NaN, infinite and null values keep the general message)."""
    if source is None:
        return F.lit(None).cast("string")
    return F.when(
        features.isNull(), F.lit(f"its features column {source!r} is null (no features at all): fill it in the input")
    ).when(
        F.size(features) != F.lit(n),
        F.concat(
            F.lit(f"its features column {source!r} holds "),
            F.size(features).cast("string"),
            F.lit(f" values, not the {n} of the first row: give every row the same number of features"),
        ),
    )


def column_roles(
    file_columns: list[str], names: list[str], enc: Encoding | None, dcfg: DataConfig, ids_from_input: bool
) -> dict[str, str]:
    """What became of each input column: the manifest records it and the job prints it."""
    roles = {}
    categorical = set(enc.categorical) if enc is not None else set()
    for c in file_columns:
        if c == dcfg.label_col:
            roles[c] = "label"
        elif c == dcfg.row_id_col and ids_from_input:
            roles[c] = "row key"
        elif c in categorical and enc is not None and enc.vocabularies:
            roles[c] = f"categorical feature (vocabulary of {len(enc.vocabularies[c])} + out-of-vocabulary)"
        elif c in categorical:
            roles[c] = f"categorical feature (hashed one-hot, {enc.buckets if enc else 0} buckets)"
        elif c in names and enc is not None and enc.kind == "vector":
            roles[c] = f"features (vector, dimension {enc.dimension}, kept sparse)"
        elif c in names:
            filled = enc is not None and c in enc.fill
            roles[c] = f"feature (null -> {enc.fill[c]:g})" if enc is not None and filled else "feature"
        elif c in dcfg.ignore_cols:
            roles[c] = "ignored (data.ignore_cols)"
        else:
            roles[c] = "not used (the features were named in the config)"
    return roles


def summarize_roles(roles: dict[str, str]) -> str:
    """'label: label; feature: a, b; ...' with long lists shortened."""
    by_role: dict[str, list[str]] = {}
    for c, role in roles.items():
        by_role.setdefault(role, []).append(c)
    parts = []
    for role, cols in by_role.items():
        shown = ", ".join(cols[:6]) + (f" ... ({len(cols)} columns)" if len(cols) > 6 else "")
        parts.append(f"{role}: {shown}")
    return "; ".join(parts)


def _vector_column(fields: dict[str, T.DataType], dcfg: DataConfig) -> str | None:
    """The Spark ML vector column the sparse layout reads: data.features_col, or in auto mode a vector
    column called ``features`` (what LIBSVM and VectorAssembler write); None: table columns."""
    name = dcfg.features_col
    if name is None:
        auto = dcfg.feature_cols is None and dcfg.indices_col is None and not dcfg.categorical_cols
        return FEATURES_COL if auto and FEATURES_COL in fields and is_vector(fields[FEATURES_COL]) else None
    if name not in fields:
        raise PartitionError(
            f"features column data.features_col={name!r} is not in the input; columns: {sorted(fields)}"
        )
    if not is_vector(fields[name]):
        raise PartitionError(
            f"features column {name!r} has type {fields[name].simpleString()}; the sparse layout reads a Spark ML "
            "vector column (or data.indices_col/values_col): use partition.feature_layout=array for a numeric array"
        )
    return name


def _check_partition_columns(
    url: str, fields: dict[str, T.DataType], file_columns: list[str], names: list[str], dcfg: DataConfig
) -> None:
    """Hive-style directories (``day=3/``) become columns Spark adds from the path, not from the files.
    Such a column is used only where data.feature_cols names it; implicitly (as a feature picked because
    it is numeric, or as the label or row key) it is refused: a directory name is not data."""
    from_dirs = [n for n in fields if n not in file_columns]
    explicit = set(dcfg.feature_cols or [])
    used = {dcfg.label_col, dcfg.row_id_col, *names}
    bad = [n for n in from_dirs if n in used and n not in explicit]
    if bad:
        raise PartitionError(
            f"data.input_url {url} has Hive-style partition directories ({', '.join(f'{n}=...' for n in bad)}/): "
            f"Spark turns them into column(s) {bad} that are not in the Parquet files, and they would be read as "
            f"{'the label or row key' if set(bad) & {dcfg.label_col, dcfg.row_id_col} else 'features'}. "
            "List the features in data.feature_cols (include such a column there to use it as a feature), or point "
            "data.input_url at the files"
        )


def feature_expr(df: DataFrame, fields: dict[str, T.DataType], dcfg: DataConfig) -> tuple[Column, list[str]]:
    """The features as one array<float> expression and their names, picked as ``data.features_col`` /
    ``data.feature_cols`` say (the partition job and the scoring job both use it, so a model sees the
    order it was trained on). An array of numbers or a Spark ML vector (dense or sparse, densified here)
    holds all features; otherwise scalar numeric columns. Raises PartitionError naming a missing or
    non-numeric column."""
    if dcfg.features_col is not None or (dcfg.feature_cols is None and is_feature_array(fields.get(FEATURES_COL))):
        name = dcfg.features_col or FEATURES_COL
        if name not in fields:
            raise PartitionError(
                f"features column data.features_col={name!r} is not in the input; columns: {sorted(fields)}"
            )
        dtype = fields[name]
        if is_vector(dtype):
            from pyspark.ml.functions import vector_to_array

            # a null vector would fail the conversion (a Java stack trace); as a null array it is an invalid row
            column = F.when(F.col(name).isNotNull(), vector_to_array(F.col(name), "float32"))
        elif isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, _NUMERIC):
            column = F.col(name).cast("array<float>")
        else:
            raise PartitionError(
                f"features column {name!r} has type {dtype.simpleString()}; it must be an array of numbers or a "
                "Spark ML vector"
            )
        first = df.select(F.size(column).alias("n")).where(F.col("n") > 0).first()
        if first is None:
            raise PartitionError(f"data.input_url {dcfg.input_url} has no rows: the input is empty")
        if first["n"] > MAX_DENSE_WIDTH:
            raise PartitionError(
                f"features column {name!r} holds {first['n']} values per row; above {MAX_DENSE_WIDTH} the dense "
                "layout would not fit: set partition.feature_layout=sparse to keep it sparse (indices and values per "
                "row, never densified)"
            )
        return column, [f"{name}_{i}" for i in range(first["n"])]
    names = dcfg.feature_cols or [
        n
        for n, t in fields.items()
        if isinstance(t, (*_NUMERIC, T.BooleanType)) and n not in (dcfg.label_col, dcfg.row_id_col, *dcfg.ignore_cols)
    ]
    missing = [n for n in names if n not in fields]
    if missing:
        raise PartitionError(
            f"feature column(s) {missing} from data.feature_cols are not in the input; columns: {sorted(fields)}"
        )
    bad = [f"{n} ({fields[n].simpleString()})" for n in names if not isinstance(fields[n], (*_NUMERIC, T.BooleanType))]
    if bad:
        raise PartitionError(
            f"feature column(s) {bad} are not numeric: drop them from data.feature_cols, cast them, or list "
            "categorical ones in data.categorical_cols (one-hot by hashing, sparse layout)"
        )
    if not names:
        raise PartitionError("the input has no numeric feature columns: set data.feature_cols or data.features_col")
    return F.array(*[F.col(n).cast("float") for n in names]), names


def _check_nothing_left_out(
    fields: dict[str, T.DataType], file_columns: list[str], names: list[str], dcfg: DataConfig
) -> None:
    """In auto mode (neither data.features_col nor data.feature_cols set), refuse a column that would be left
    out silently: a string, boolean, date or map column beside numeric features, or any column beside a
    features array. Naming the features is how a user says "leave the rest out"."""
    if dcfg.features_col is not None or dcfg.feature_cols is not None or dcfg.indices_col is not None:
        return
    used = {dcfg.label_col, dcfg.row_id_col, *names, *dcfg.ignore_cols}
    if is_feature_array(fields.get(FEATURES_COL)):  # auto mode took the `features` array / vector
        used.add(FEATURES_COL)
    left = [f"{n} ({fields[n].simpleString()})" for n in file_columns if n in fields and n not in used]
    if left:
        how = (
            "data.features_col=features (to train on the features array alone)"
            if FEATURES_COL in used
            else f"data.feature_cols to the columns to train on, e.g. {names[:4]}"
        )
        raise PartitionError(
            f"column(s) {left} would be left out of training silently (not numeric, or beside the features "
            f"array): set {how}, which leaves the others out on purpose, list them in data.ignore_cols, cast them "
            "to numbers, or list categorical ones in data.categorical_cols (one-hot by hashing, sparse layout)"
        )
