"""DataFrame -> sample shards, validation split and feature groups, described by one manifest.

Scales the way Spark scales: no collect() of data, no single-partition sort or window. The permutation
for shuffle-split is "random bucket, then random order inside the bucket": every row gets a seeded
64-bit hash key; bucket = key mod B. One cheap pass counts rows per bucket (only the row id and label
are read); the main pass shuffles rows to their bucket's partition, sorts each partition by (bucket,
key), and the row's index in its sorted partition plus per-bucket offsets gives its global position in
the permutation. Position -> validation (the first n_val) or shard (t mod K), so
shard sizes differ by at most one row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from pyspark import StorageLevel
from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkml_dist.config import DataConfig, JobConfig, PartitionConfig
from sparkml_dist.errors import UserError
from sparkml_dist.features import (
    INDICES,
    VALUES,
    Encoding,
    FeatureError,
    build_encoding,
    finite_values,
    invalid_reason,
    is_feature_array,
    is_sparse_input,
    is_vector,
    null_columns,
    sparse_columns,
    with_vocabulary_indices,
)
from sparkml_dist.fingerprint import FileDigest, file_digests, fingerprint
from sparkml_dist.libsvm import bad_line_message, find_bad_line, is_parse_failure
from sparkml_dist.manifest import (
    MANIFEST_NAME,
    FeatureGroup,
    FileEntry,
    Manifest,
    ManifestError,
    ShardEntry,
    SparseLayout,
    arrow_fs,
    manifest_files,
    verify_files,
)
from sparkml_dist.metrics import REGRESSION
from sparkml_dist.model_size import ModelSizeError, check_model_size, estimate_parameters
from sparkml_dist.outputs import OutputKind, check_output
from sparkml_dist.storage import READ_VERIFY, WRITE_CHECKSUMS, HadoopFS, atomic_output, output_lock

log = logging.getLogger(__name__)

PARTITION_OUTPUT = OutputKind("partition", MANIFEST_NAME, manifest_files)
SHARD_COL = "shard"
FEATURES_COL = "features"
BUCKET_BYTES = 256 * 1024 * 1024
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
class PartitionResult:
    manifest_url: str
    mode: str
    input_rows: int
    train_rows: list[int]
    validation_rows: int
    dropped_rows: int
    feature_groups: int
    skipped: bool
    seconds: float
    row_ids_rekeyed: bool = False
    """True when the input's row ids had duplicates or nulls and data.duplicate_row_ids=rekey numbered the rows."""
    fingerprint_s: float = 0.0
    """Of ``seconds``: reading the input to fingerprint its content (0 when every file's digest was reused)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))


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


def partition(spark: SparkSession, cfg: JobConfig) -> PartitionResult:
    """Run the partition job described by ``cfg.data`` and ``cfg.partition``; publish atomically.

    The output's lock (``storage.output_lock``) is held from the first look at the output to the publish, so a
    second job on the same ``partition.output_url`` fails at once, naming this one, and cannot delete its work."""
    with output_lock(spark, cfg.partition.output_url, "partition.output_url"):
        return _partition(spark, cfg)


def _partition(spark: SparkSession, cfg: JobConfig) -> PartitionResult:
    started = time.monotonic()
    pcfg, dcfg = cfg.partition, cfg.data
    out_url = pcfg.output_url.rstrip("/")
    fs = HadoopFS(spark, out_url)
    inputs = {"data.input_url": dcfg.input_url}
    check_output(fs, out_url, PARTITION_OUTPUT, "partition.output_url", inputs)
    existing = _existing_manifest(fs, out_url)
    same_input = existing is not None and existing.input_url.rstrip("/") == dcfg.input_url.rstrip("/")
    known = {} if pcfg.rehash or not same_input else _recorded_digests(existing)
    inp = _read_input(spark, dcfg, pcfg, known)
    _check_model_fits(cfg, inp)
    settings = {"data": asdict(dcfg), "partition": asdict(pcfg)}
    settings["partition"].pop("output_url")
    settings["partition"].pop("rehash")  # how the fingerprint was read, not what the output is
    if existing and existing.input_fingerprint == inp.fingerprint and existing.config == settings:
        try:
            verify_files(existing)
            return _result(existing, skipped=True, started=started, fingerprint_s=inp.fingerprint_s)
        except ManifestError as exc:  # our own output, damaged since: write it again
            log.warning("re-partitioning: the earlier output no longer matches its manifest (%s)", exc)

    spark.sparkContext.setJobDescription("partition: count rows per bucket and check labels")
    rekeyed = False
    try:
        assigned, stats = _assign(inp, dcfg, pcfg)
    except _DuplicateRowIds as dup:
        rekeyed = True
        log.warning("data.duplicate_row_ids=rekey: %s; numbering the rows anew", dup.detail)
        inp = dataclasses.replace(
            inp, df=inp.df.withColumn("row_id", F.monotonically_increasing_id()), ids_from_input=False
        )
        assigned, stats = _assign(inp, dcfg, pcfg)
    except Exception as exc:
        raise _clean_error(exc, spark, dcfg) from exc

    sparse_groups = _sparse_groups(inp.encoding.dimension, pcfg) if inp.encoding is not None else None
    groups = [[] for _ in sparse_groups] if sparse_groups is not None else _feature_groups(inp.feature_names, pcfg)
    if groups:
        assigned = assigned.persist(StorageLevel.MEMORY_AND_DISK)
    block_bytes = str(int(pcfg.row_group_mb * 1024 * 1024))
    try:
        with atomic_output(spark, out_url, PARTITION_OUTPUT, "partition.output_url", inputs) as tmp:
            spark.sparkContext.setJobDescription(f"partition: write {pcfg.num_shards} shards + validation")
            _write(_layout(assigned, inp, None, pcfg), f"{tmp}/train", block_bytes, pcfg.num_shards)
            if fs.exists(f"{tmp}/train/{SHARD_COL}=-1"):
                fs.rename(f"{tmp}/train/{SHARD_COL}=-1", f"{tmp}/validation")
            else:  # validation_fraction 0 (or tiny data): an empty split, still a directory
                fs.mkdirs(f"{tmp}/validation")
            for g, names in enumerate(groups):
                spark.sparkContext.setJobDescription(f"partition: write feature group {g}")
                if sparse_groups is not None:
                    sub = _sparse_group_layout(assigned, *sparse_groups[g]).filter(F.col(SHARD_COL) >= 0)
                else:
                    sub = _layout(assigned, inp, names, pcfg).filter(F.col(SHARD_COL) >= 0)
                _write(sub, f"{tmp}/features/group={g}", block_bytes, pcfg.num_shards)
            manifest = _build_manifest(
                fs, tmp, out_url, inp, groups, stats["input_rows"], stats["dropped_rows"], settings, cfg, sparse_groups
            )
            _check_row_groups(manifest, pcfg)
            _check_split(manifest, stats["rows"], pcfg)
            fs.write_text(f"{tmp}/{MANIFEST_NAME}", manifest.to_json())
    except Exception as exc:
        raise _clean_error(exc, spark, dcfg) from exc
    finally:
        if groups:
            assigned.unpersist()
    result = _result(manifest, skipped=False, started=started, fingerprint_s=inp.fingerprint_s)
    return dataclasses.replace(result, row_ids_rekeyed=rekeyed)


def _check_model_fits(cfg: JobConfig, inp: _Input) -> None:
    """Refuse a feature space whose model would not fit a rank (``train.max_model_gib``), estimated from the
    config's train section before any pass over the rows."""
    width = inp.encoding.dimension if inp.encoding is not None else len(inp.feature_names)
    regression = cfg.data.task == "regression"
    outputs = 1 if regression or cfg.data.num_classes == 2 else cfg.data.num_classes
    params = estimate_parameters(cfg.train, width, outputs)
    what = f"feature dimension {width:,}, {outputs} output(s)"
    try:
        check_model_size(cfg.train, params, what)
    except ModelSizeError as exc:
        raise PartitionError(f"{exc}. Nothing was written") from None


def _assign(inp: _Input, dcfg: DataConfig, pcfg: PartitionConfig) -> tuple[DataFrame, dict[str, int]]:
    """Count (and check) the rows, then give each its shard (-1: validation)."""
    keyed = inp.df.withColumn(_KEY, F.xxhash64(F.col("row_id"), F.lit(pcfg.seed)))
    return _MODES[pcfg.mode](keyed, dcfg, pcfg, inp)


# ------------------------------------------------------------------------------------------- reading


def list_input(spark: SparkSession, input_url: str, key: str = "data.input_url") -> list[tuple[str, int, int]]:
    """(URL, size, mtime) of every file Spark reads at ``input_url`` (a directory or one file), sorted.

    Every one must be Parquet: Spark reads any visible file whatever its name, so a stray CSV or a
    half-copied file is named here instead of failing (or being misread) inside a task."""
    fs = HadoopFS(spark, input_url)
    url = input_url.rstrip("/")
    if not fs.exists(url):
        raise PartitionError(f"{key} {url} does not exist (run jobs/generate.py, or fix the path)")
    if fs.is_file(url):
        return [(url, *fs.file_status(url))]
    files = [(f"{url}/{p}", size, mtime) for p, size, mtime in fs.list_files(url)]
    if not files:
        raise PartitionError(f"{key} {url} holds no data files (only hidden ones, if any): the input is empty")
    return files


_Read = tuple[DataFrame, list[tuple[str, int, int]], list[str]]
"""A read input: the DataFrame, its files (URL, size, mtime) and the columns the files hold."""


def read_parquet_checked(spark: SparkSession, url: str, key: str = "data.input_url") -> _Read:
    """Read a Parquet data set after checking every file's footer: (DataFrame with page-CRC verification
    on, the files, the columns the files hold). Columns Spark shows that neither the files nor Hive-style
    directory names hold are refused: they come from a stale ``org.apache.spark.sql.parquet.row.metadata``
    footer key (a file rewritten by another tool that kept Spark's old schema) and would read as nulls."""
    url = url.rstrip("/")
    files = list_input(spark, url, key)
    file_columns = _check_input_files(url, [u for u, _, _ in files], key)
    try:
        df = spark.read.options(**READ_VERIFY).parquet(url)
    except AnalysisException as exc:
        raise PartitionError(f"cannot read Parquet at {key} {url}: {exc}") from exc
    except Exception as exc:  # a file that fails its checksum while Spark reads the footers
        clean = corrupt_file_error(exc, key)
        if clean is None:
            raise
        raise clean from exc
    dir_keys = {part.split("=", 1)[0] for u, _, _ in files for part in u[len(url) + 1 :].split("/")[:-1] if "=" in part}
    phantom = [f.name for f in df.schema.fields if f.name not in file_columns and f.name not in dir_keys]
    if phantom:
        raise PartitionError(
            f"{key} {url}: Spark's schema for these files lists column(s) {phantom} that the files do not hold (a "
            "stale 'org.apache.spark.sql.parquet.row.metadata' footer key from an earlier write); they would read "
            "as nulls. Rewrite the files without that key (e.g. pyarrow: table.replace_schema_metadata())"
        )
    return df, files, file_columns


def _read_libsvm(spark: SparkSession, url: str, dcfg: DataConfig) -> _Read:
    """LIBSVM text through Spark's own source: a double ``label`` and a sparse ``features`` vector per line."""
    files = list_input(spark, url)
    reader = spark.read.format("libsvm")
    if dcfg.dimension is not None:
        reader = reader.option("numFeatures", str(dcfg.dimension))
    try:
        df = reader.load(url)  # without data.dimension Spark parses every line here, for the largest index
    except Exception as exc:
        located = _libsvm_error(exc, spark, dcfg)
        if located is not None:
            raise located from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PartitionError(f"cannot read data.input_url {url} as LIBSVM (data.input_format=libsvm): {first}") from exc
    if dcfg.label_col != "label":
        raise PartitionError(
            f"data.label_col={dcfg.label_col!r}: LIBSVM input has its label in column 'label'; "
            "leave data.label_col unset"
        )
    return df, files, list(df.columns)


def _recorded_digests(manifest: Manifest | None) -> dict[str, FileDigest]:
    """The content digests an earlier partition recorded, by relative path (none from a damaged record)."""
    try:
        return {d.path: d for d in map(FileDigest.from_list, manifest.input_files if manifest else [])}
    except (TypeError, ValueError):
        return {}


def _read_input(
    spark: SparkSession, dcfg: DataConfig, pcfg: PartitionConfig, known: dict[str, FileDigest] | None = None
) -> _Input:
    url = dcfg.input_url.rstrip("/")
    libsvm = dcfg.input_format == "libsvm"
    df, files, file_columns = _read_libsvm(spark, url, dcfg) if libsvm else read_parquet_checked(spark, url)
    t0 = time.monotonic()
    try:
        digests, read = file_digests(spark, url, files, "text" if libsvm else "parquet", known)
    except Exception as exc:  # the first full read of the data: a damaged page shows here
        raise _clean_error(exc) from exc
    fingerprint_s = round(time.monotonic() - t0, 3) if read else 0.0
    fields = {f.name: f.dataType for f in df.schema.fields}
    unknown = [c for c in dcfg.ignore_cols if c not in fields]
    if unknown:
        raise PartitionError(f"data.ignore_cols lists {unknown}, which the input lacks; columns: {sorted(fields)}")
    if dcfg.label_col not in fields:
        raise PartitionError(
            f"label column data.label_col={dcfg.label_col!r} is not in the input; columns: {sorted(fields)}"
        )
    label_type = fields[dcfg.label_col]
    regression = dcfg.task == "regression"
    if regression and not isinstance(label_type, _NUMERIC):
        raise PartitionError(
            f"label column {dcfg.label_col!r} has type {label_type.simpleString()}; data.task=regression needs "
            "a numeric label"
        )
    if not regression and not isinstance(label_type, _INTEGRAL) and not libsvm:
        hint = " (real-valued labels: set data.task=regression)" if isinstance(label_type, _NUMERIC) else ""
        raise PartitionError(
            f"label column {dcfg.label_col!r} has type {label_type.simpleString()}; "
            f"it must hold integer class ids 0..num_classes-1{hint}"
        )
    ids_from_input = dcfg.row_id_col in fields
    if ids_from_input and not isinstance(fields[dcfg.row_id_col], _INTEGRAL):
        raise PartitionError(
            f"row key column data.row_id_col={dcfg.row_id_col!r} has type "
            f"{fields[dcfg.row_id_col].simpleString()}; it must hold integers (one distinct id per row): cast it "
            "to a long in the input, or set data.row_id_col to a name the input lacks to have rows numbered"
        )
    encoding = None
    if pcfg.feature_layout == "sparse" or is_sparse_input(dcfg):
        if pcfg.feature_layout == "columns":
            raise PartitionError(
                "partition.feature_layout=columns cannot hold sparse input (LIBSVM, data.indices_col or "
                "data.categorical_cols): set partition.feature_layout=sparse"
            )
        try:
            encoding = build_encoding(df, fields, dcfg, _vector_column(fields, dcfg))
        except FeatureError as exc:
            raise PartitionError(str(exc)) from exc
        df = with_vocabulary_indices(df, encoding)
        indices, values, valid_x = sparse_columns(encoding)
        why_x = invalid_reason(encoding)
        names = encoding.columns
        feature_cols = [indices.alias(INDICES), values.alias(VALUES)]
        nulls = null_columns(encoding)
        if nulls is not None:  # which column was null, for the fail message
            feature_cols.append(nulls.alias(_NULLS))
    elif dcfg.null_fill:
        raise PartitionError(
            "data.null_fill is applied in the sparse layout (stored there, so scoring fills alike): set "
            "partition.feature_layout=sparse, or clean the nulls in the input"
        )
    else:
        features, names = feature_expr(df, fields, dcfg)
        valid_x = valid_features(features, len(names))
        why_x = _dense_reason(features, len(names), _array_source(fields, dcfg))
        feature_cols = [features.alias(FEATURES_COL)]
    _check_partition_columns(url, fields, file_columns, names, dcfg)
    _check_nothing_left_out(fields, file_columns, names, dcfg)
    row_id = F.col(dcfg.row_id_col).cast("long") if ids_from_input else F.monotonically_increasing_id()
    # Class ids stay 64-bit until the range check has passed; only then are they written as int.
    label = F.col(dcfg.label_col).cast("double" if regression else "long")
    if libsvm and not regression:  # LIBSVM labels are doubles: a class id must be a whole number
        raw = F.col(dcfg.label_col)
        label = F.when(raw == F.floor(raw), raw.cast("long")).otherwise(F.lit(None).cast("long"))
    finite_label = (~F.isnan(label) & (F.abs(label) != F.lit(float("inf")))) if regression else F.lit(True)
    valid = label.isNotNull() & finite_label & valid_x
    why = F.when(valid, F.lit(None)).otherwise(F.coalesce(why_x, _label_reason(dcfg, label, libsvm)))
    out = df.select(row_id.alias("row_id"), *feature_cols, label.alias("label"), valid.alias("_valid"), why.alias(_WHY))
    # the input columns the features came from: a features array/vector column, or the named columns
    sources = [n for n in names if n in fields] or [dcfg.features_col or FEATURES_COL]
    roles = column_roles(file_columns, sources, encoding, dcfg, ids_from_input)
    log.info("input columns: %s", summarize_roles(roles))
    bytes_in = sum(f[1] for f in files)
    return _Input(out, names, fingerprint(digests), bytes_in, ids_from_input, encoding, roles, digests, fingerprint_s)


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


def _check_input_files(input_url: str, urls: list[str], key: str = "data.input_url") -> list[str]:
    """Read every input file's footer (in parallel, no data): a corrupt or truncated file, or one whose
    columns differ from the first file's (schema drift), is named before any Spark job starts.
    Returns the files' column names."""
    import pyarrow.parquet as pq

    filesystem, _ = arrow_fs(input_url)

    def columns(file_url: str) -> list[tuple[str, str]] | str:
        try:
            with filesystem.open_input_file(arrow_fs(file_url)[1]) as f:
                return [(c.name, str(c.type)) for c in pq.ParquetFile(f).schema_arrow]
        except Exception as exc:  # noqa: BLE001 (pyarrow raises ArrowInvalid, OSError ...: all mean unreadable)
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=16) as pool:
        found = list(pool.map(columns, urls))
    for file_url, cols in zip(urls, found, strict=True):
        if isinstance(cols, str):
            raise PartitionError(
                f"input file {file_url} is not a readable Parquet file ({cols[:300]}): "
                f"rewrite it or move it out of {key} (every visible file there is read as Parquet; "
                "names starting with _ or . are skipped)"
            )
    first = found[0]
    root = input_url.rstrip("/")
    for file_url, cols in zip(urls, found, strict=True):
        if cols != first:
            a, b = dict(first), dict(cols)  # type: ignore[arg-type]
            diff = sorted(
                f"{n}: {a.get(n, 'missing')} vs {b.get(n, 'missing')}" for n in set(a) | set(b) if a.get(n) != b.get(n)
            )
            raise PartitionError(
                f"schema drift in {key}: {file_url[len(root) + 1 :]} differs from "
                f"{urls[0][len(root) + 1 :]} ({'; '.join(diff)}): rewrite "
                f"it with the same columns and types, or move it out of {key}"
            )
    assert not isinstance(first, str)  # every unreadable file was named above
    return [name for name, _ in first]


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


def valid_features(features: Column, n: int) -> Column:
    """True where the array<float> ``features`` has ``n`` elements, none null, NaN or infinite (partition and
    score apply the same rule)."""
    return features.isNotNull() & (F.size(features) == F.lit(n)) & finite_values(features)


# --------------------------------------------------------------------------------------- assignment


def _checked_counts(
    keyed: DataFrame, dcfg: DataConfig, by_bucket: int, ids_from_input: bool
) -> tuple[dict[int, int], dict[str, int]]:
    """One pass over row_id, label (and, to drop invalid rows, the features): rows per bucket + checks.

    The input's row ids are checked in the same pass: nulls by a count, duplicates by a distinct count
    per bucket (equal ids share a hash key and so a bucket; the pass shuffles only (bucket, id) pairs).
    """
    df = keyed
    if dcfg.invalid_values == "drop":
        df = df.filter(F.col("_valid"))
    aggs = [F.count(F.lit(1)).alias("n"), F.min("label").alias("lo"), F.max("label").alias("hi")]
    if ids_from_input:
        aggs += [F.count("row_id").alias("ids"), F.countDistinct("row_id").alias("distinct_ids")]
    agg = df.groupBy(_bucket_of(by_bucket).alias(_BUCKET)).agg(*aggs).collect()
    counts = {int(r[_BUCKET]): int(r["n"]) for r in agg}
    total = sum(counts.values())
    if ids_from_input:
        nulls = total - sum(int(r["ids"]) for r in agg)
        repeats = sum(int(r["ids"]) - int(r["distinct_ids"]) for r in agg)
        if nulls or repeats:
            _report_bad_ids(df, dcfg, nulls, repeats, total)
    labels = [(r["lo"], r["hi"]) for r in agg if r["lo"] is not None]
    if labels and dcfg.task == "classification":
        lo, hi = min(x[0] for x in labels), max(x[1] for x in labels)
        if lo < 0 or hi >= dcfg.num_classes:
            raise PartitionError(
                f"labels range from {lo} to {hi}, outside the declared classes 0..{dcfg.num_classes - 1}: "
                + _label_fix(lo, hi)
            )
    dropped = 0
    if dcfg.invalid_values == "drop":
        dropped = keyed.filter(~F.col("_valid")).count()
    if total == 0:
        raise PartitionError(f"data.input_url {dcfg.input_url} has no usable rows: the input is empty")
    return counts, {"input_rows": total + dropped, "dropped_rows": dropped, "rows": total}


MAX_SUGGESTED_CLASSES = 100_000
"""Above this many classes a label range is taken for ids or codes, not class ids: the message does not
suggest data.num_classes (a softmax that wide over mostly empty classes is never what was meant)."""


def _label_fix(lo: int, hi: int) -> str:
    """What to do about labels ``lo..hi`` outside the declared classes."""
    if lo < 0:
        return "class ids start at 0, so map the labels to 0..K-1 (e.g. -1/+1 to 0/1), or set data.task=regression"
    if hi + 1 > MAX_SUGGESTED_CLASSES:
        return (
            f"{hi} is no class id (more than {MAX_SUGGESTED_CLASSES} classes): map the labels to 0..K-1 (e.g. with "
            "Spark ML's StringIndexer), or set data.task=regression for a numeric target"
        )
    return f"set data.num_classes={hi + 1} or fix the labels"


def _report_bad_ids(df: DataFrame, dcfg: DataConfig, nulls: int, repeats: int, total: int) -> None:
    """Null or repeated row ids: with them the seeded shuffle degenerates (equal keys keep input order)."""
    examples = []
    if repeats:
        dup = df.groupBy("row_id").count().where(F.col("count") > 1).orderBy("row_id").limit(3).collect()
        examples = [f"{r['row_id']} ({r['count']} rows)" for r in dup]
    what = "; ".join(
        x
        for x in (
            f"{nulls} of {total} rows have a null id" if nulls else "",
            f"{repeats} rows repeat an id (e.g. {', '.join(examples)})" if repeats else "",
        )
        if x
    )
    if dcfg.duplicate_row_ids == "rekey":
        raise _DuplicateRowIds(f"row key column {dcfg.row_id_col!r}: {what}")
    raise PartitionError(
        f"row key column data.row_id_col={dcfg.row_id_col!r} is not a unique key: {what}. Fix the ids, or set "
        "data.duplicate_row_ids=rekey to number the rows anew (the input's ids are then not kept)"
    )


def _num_buckets(pcfg: PartitionConfig, input_bytes: int) -> int:
    """Buckets of about BUCKET_BYTES of input each (the unit one task sorts), at least 2K; a power of 2
    so that the bucket is the top bits of the row's hash key."""
    wanted = pcfg.buckets or max(2 * pcfg.num_shards, math.ceil(input_bytes / BUCKET_BYTES))
    return 1 << max(1, math.ceil(math.log2(wanted)))


def _bucket_of(b: int) -> Column:
    """The top log2(b) bits of the hash key: sorting keys as unsigned numbers sorts by bucket first."""
    return F.shiftrightunsigned(F.col(_KEY), 64 - (b.bit_length() - 1))


def _fail_invalid(df: DataFrame, dcfg: DataConfig) -> DataFrame:
    """Rows with NaN/inf/missing features or a null label: fail the write (policy fail) or drop them."""
    detail = F.col(_NULLS) if _NULLS in df.columns else None
    reason = F.col(_WHY) if _WHY in df.columns else None
    checked = apply_invalid_policy(
        df, F.col("_valid"), "row_id", dcfg.invalid_values, "a null (or, for regression, NaN/infinite) label", detail,
        reason,
    )  # fmt: skip
    return checked.drop(_NULLS, _WHY)  # read by the filter above; not carried through the shuffle


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


def _validation_rows(n: int, pcfg: PartitionConfig) -> int:
    """The exact size of the validation split of ``n`` rows; refuse an empty split or too few training rows."""
    n_val = int(round(n * pcfg.validation_fraction))
    if n_val == 0:
        raise PartitionError(
            f"partition.validation_fraction={pcfg.validation_fraction} of {n} rows leaves the validation split "
            "empty: raise partition.validation_fraction or use more data"
        )
    if n - n_val < pcfg.num_shards:
        raise PartitionError(
            f"partition.num_shards={pcfg.num_shards} is larger than the {n - n_val} training rows: "
            "lower num_shards or use more data"
        )
    return n_val


def _shuffle_split(
    keyed: DataFrame, dcfg: DataConfig, pcfg: PartitionConfig, inp: _Input
) -> tuple[DataFrame, dict[str, int]]:
    b = _num_buckets(pcfg, inp.input_bytes)
    counts, stats = _checked_counts(keyed, dcfg, b, inp.ids_from_input)
    n = stats["rows"]
    n_val = _validation_rows(n, pcfg)
    offsets, acc = {}, 0
    for bucket in range(b):
        offsets[bucket] = acc
        acc += counts.get(bucket, 0)
    # Bucket b goes to partition pmod(hash(b), b_count), as repartition(n, col) places it; inside a
    # partition rows are sorted by (bucket, key), so a row's index in its partition minus the number of
    # rows of lower buckets in the same partition is its rank inside its bucket. This avoids a window,
    # which would buffer (and spill) every bucket.
    spark = keyed.sparkSession
    placement = (
        spark.range(b).select(F.col("id").alias(_BUCKET), F.pmod(F.hash(F.col("id")), F.lit(b)).alias("p")).collect()
    )
    before: dict[int, int] = {}
    shift = {}
    for row in sorted(placement, key=lambda r: r[_BUCKET]):
        bucket, part = int(row[_BUCKET]), int(row["p"])
        shift[bucket] = offsets[bucket] - before.get(part, 0)
        before[part] = before.get(part, 0) + counts.get(bucket, 0)
    df = _fail_invalid(keyed, dcfg).withColumn(_BUCKET, _bucket_of(b))
    # One 64-bit sort key whose order is (bucket, key): Spark sorts it by prefix alone, where a leading
    # bucket column would make nearly every comparison a full-row compare. row_id only breaks hash ties.
    df = df.repartition(b, _BUCKET).sortWithinPartitions(_unsigned_key(), "row_id")
    df = df.withColumn(_POS, _literal_map(shift)[F.col(_BUCKET)] + _index_in_partition())
    shard = F.when(F.col(_POS) < n_val, F.lit(-1)).otherwise(F.pmod(F.col(_POS) - n_val, F.lit(pcfg.num_shards)))
    return df.withColumn(SHARD_COL, shard.cast("int")), stats


def _stratified_split(
    keyed: DataFrame, dcfg: DataConfig, pcfg: PartitionConfig, inp: _Input
) -> tuple[DataFrame, dict[str, int]]:
    """Deal each input task's rows to the validation split and the shards, without a network shuffle.

    Inside each input partition the rows are put in a seeded random order by a local sort on the same
    64-bit key shuffle_split uses; the partition's first rows (its share of the validation split, the
    shares apportioned exactly on the driver) go to validation, the rest take consecutive global training
    positions t, and t mod K is the shard. So the validation split has exactly round(n * fraction) rows,
    shard sizes differ by at most one row, every input partition is spread over the shards in proportion
    (a stratified sample), and the result is a pure function of (input files, their split into tasks,
    seed). What it gives up against shuffle_split: the order inside a shard (and which rows share a shard)
    depends on how Spark splits the input into tasks (``spark.sql.files.maxPartitionBytes``, the files),
    and each task writes its own file per shard, so there are (input tasks) x (K + 1) files.
    """
    _, stats = _checked_counts(keyed, dcfg, _num_buckets(pcfg, inp.input_bytes), inp.ids_from_input)
    n = stats["rows"]
    n_val = _validation_rows(n, pcfg)
    df = _fail_invalid(keyed, dcfg)
    # Under invalid_values=fail an invalid row fails the write below, so counting needs no feature column
    # (Parquet answers from its footers); under drop the count is of the rows kept.
    counted = df if dcfg.invalid_values == "drop" else keyed
    per_task = counted.groupBy(F.spark_partition_id().alias("p")).agg(F.count(F.lit(1)).alias("n")).collect()
    counts = {int(r["p"]): int(r["n"]) for r in per_task}
    if sum(counts.values()) != n:  # the same rows read twice must count the same
        raise PartitionError(
            f"data.input_url {dcfg.input_url} changed while it was being partitioned ({n} rows, then "
            f"{sum(counts.values())}): partition it again once it is complete"
        )
    val_share = _apportion(counts, n_val)
    shift, trained = {}, 0
    for p in sorted(counts):
        shift[p] = trained - val_share[p]  # training position = index in the task + shift
        trained += counts[p] - val_share[p]
    df = df.sortWithinPartitions(_unsigned_key(), "row_id")
    task = F.shiftright(F.monotonically_increasing_id(), 33)  # no shuffle since the read: the input task
    index = _index_in_partition()
    shard = F.when(index < _literal_map(val_share)[task], F.lit(-1)).otherwise(
        F.pmod(index + _literal_map(shift)[task], F.lit(pcfg.num_shards))
    )
    return df.withColumn(SHARD_COL, shard.cast("int")), stats


def _unsigned_key() -> Column:
    """The row's 64-bit hash key with its sign bit flipped, so Spark's signed sort orders it as unsigned."""
    return F.col(_KEY).bitwiseXOR(F.lit(-(2**63)))


def _index_in_partition() -> Column:
    """The row's index in its (sorted) partition: monotonically_increasing_id's low 33 bits."""
    return F.monotonically_increasing_id().bitwiseAND(F.lit((1 << 33) - 1))


def _literal_map(d: dict[int, int]) -> Column:
    """``d`` as a literal Spark map column (Spark folds it to one constant)."""
    return F.create_map(*[x for k, v in d.items() for x in (F.lit(k), F.lit(v))])


def _apportion(counts: dict[int, int], total: int) -> dict[int, int]:
    """Split ``total`` over the keys in proportion to ``counts`` (largest remainder, ties by key): exact
    integers that sum to ``total``, each within one of its exact share."""
    n = sum(counts.values())
    share = {k: c * total // n for k, c in counts.items()}
    left = total - sum(share.values())
    by_remainder = sorted(counts, key=lambda k: (-(counts[k] * total % n), k))
    for k in by_remainder[:left]:
        share[k] += 1
    return share


def _random_sample(
    keyed: DataFrame, dcfg: DataConfig, pcfg: PartitionConfig, inp: _Input
) -> tuple[DataFrame, dict[str, int]]:
    """Validation by a seeded hash; then each shard an independent seeded sample of the other rows.

    Per row and shard, a uniform u from a hash of (row_id, seed, shard) decides how often the row lands in
    the shard: Bernoulli(fraction) without replacement, Poisson(fraction) with replacement (inverse CDF).
    One pass over the input writes all K shards (rows are exploded into their shards).
    """
    _, stats = _checked_counts(keyed, dcfg, 2, inp.ids_from_input)
    df = _fail_invalid(keyed, dcfg)
    is_val = _uniform(F.col("row_id"), pcfg.seed, -1) < F.lit(pcfg.validation_fraction)
    reps = []
    for k in range(pcfg.num_shards):
        u = _uniform(F.col("row_id"), pcfg.seed, k)
        if pcfg.with_replacement:
            count = _poisson_from_uniform(u, pcfg.sample_fraction)
        else:
            count = F.when(u < F.lit(pcfg.sample_fraction), F.lit(1)).otherwise(F.lit(0))
        reps.append(F.array_repeat(F.lit(k), count))
    shards = F.when(is_val, F.array(F.lit(-1))).otherwise(F.flatten(F.array(*reps)))
    return df.withColumn(SHARD_COL, F.explode(shards)), stats


_MODES = {"shuffle_split": _shuffle_split, "stratified_split": _stratified_split, "random_sample": _random_sample}
"""partition.mode -> how rows get their shard (-1: validation); each returns (assigned rows, counts)."""


def _uniform(row_id: Column, seed: int, salt: int) -> Column:
    h = F.xxhash64(row_id, F.lit(seed), F.lit(salt))
    return F.pmod(h, F.lit(1 << 53)).cast("double") / F.lit(float(1 << 53))


def _poisson_from_uniform(u: Column, lam: float) -> Column:
    """Inverse-CDF Poisson(lam) draw from a uniform column (exact up to a 1e-12 tail)."""
    expr, cdf, p, k = F.lit(0), 0.0, math.exp(-lam), 0
    thresholds = []
    while cdf < 1 - 1e-12 and k < 200:
        cdf += p
        thresholds.append(cdf)
        k += 1
        p *= lam / k
    expr = F.lit(len(thresholds))
    for i in reversed(range(len(thresholds))):
        expr = F.when(u < F.lit(thresholds[i]), F.lit(i)).otherwise(expr)
    return expr


def _feature_groups(names: list[str], pcfg: PartitionConfig) -> list[list[str]]:
    m = pcfg.feature_groups
    if m == 0:
        return []
    if m > len(names):
        raise PartitionError(f"partition.feature_groups={m} is more than the {len(names)} features")
    if pcfg.feature_grouping == "explicit":
        groups = [list(g) for g in pcfg.explicit_groups or []]
        flat = [n for g in groups for n in g]
        if len(groups) != m or sorted(flat) != sorted(names) or len(set(flat)) != len(flat):
            raise PartitionError(
                f"partition.explicit_groups must be {m} lists that cover every feature exactly once; features: {names}"
            )
        return groups
    if pcfg.feature_grouping == "hashed":
        buckets: list[list[str]] = [[] for _ in range(m)]
        for n in names:
            buckets[int(hashlib.md5(n.encode()).hexdigest(), 16) % m].append(n)
        if any(not b for b in buckets):
            raise PartitionError("hashed feature grouping left a group empty: use fewer groups or contiguous")
        return buckets
    size, extra = divmod(len(names), m)
    groups, start = [], 0
    for g in range(m):
        end = start + size + (1 if g < extra else 0)
        groups.append(names[start:end])
        start = end
    return groups


# ------------------------------------------------------------------------------------------- writing


def _sparse_groups(dimension: int, pcfg: PartitionConfig) -> list[list[int]] | None:
    """The sparse layout's feature groups as [stride, offset, width] (``FeatureGroup.sparse_index``):
    contiguous index ranges, or hashed as index mod M; None without feature groups."""
    m = pcfg.feature_groups
    if m == 0:
        return None
    if m > dimension:
        raise PartitionError(f"partition.feature_groups={m} is more than the {dimension} features")
    if pcfg.feature_grouping == "explicit":
        raise PartitionError(
            "partition.feature_grouping=explicit names features, which a sparse space does not have: use "
            "contiguous (index ranges) or hashed (index mod M)"
        )
    if pcfg.feature_grouping == "hashed":
        return [[m, g, (dimension - g + m - 1) // m] for g in range(m)]
    size, extra = divmod(dimension, m)
    out, start = [], 0
    for g in range(m):
        width = size + (1 if g < extra else 0)
        out.append([1, start, width])
        start += width
    return out


def _sparse_group_layout(df: DataFrame, stride: int, offset: int, width: int) -> DataFrame:
    """row_id, the group's entries (local indices, ascending like the global ones), label and shard."""
    pairs = F.arrays_zip(F.col(INDICES).alias("i"), F.col(VALUES).alias("v"))
    if stride == 1:
        kept = F.filter(pairs, lambda e: (e["i"] >= offset) & (e["i"] < offset + width))
    else:
        kept = F.filter(pairs, lambda e: F.pmod(e["i"], F.lit(stride)) == offset)
    local = F.transform(kept, lambda e: ((e["i"] - offset) / stride).cast("int"))  # exact: ints below 2^31
    label = F.col("label") if dict(df.dtypes)["label"] == "double" else F.col("label").cast("int").alias("label")
    values = F.transform(kept, lambda e: e["v"])
    return df.select("row_id", local.alias(INDICES), values.alias(VALUES), label, SHARD_COL)


def _layout(df: DataFrame, inp: _Input, subset: list[str] | None, pcfg: PartitionConfig) -> DataFrame:
    """Select row_id, the (subset of) features in the configured layout, label and shard."""
    names = inp.feature_names
    idx = [names.index(n) for n in (subset if subset is not None else names)]
    if inp.encoding is not None:
        feats = [F.col(INDICES), F.col(VALUES)]
    elif pcfg.feature_layout == "array":
        feats = [(_pick(idx) if subset is not None else F.col(FEATURES_COL)).alias(FEATURES_COL)]
    else:
        feats = [F.col(FEATURES_COL)[i].alias(names[i]) for i in idx]
    # Classification labels passed the 0..num_classes-1 check as 64-bit values, so int cannot wrap here.
    label = F.col("label") if dict(df.dtypes)["label"] == "double" else F.col("label").cast("int").alias("label")
    return df.select("row_id", *feats, label, SHARD_COL)


def _pick(idx: list[int]) -> Column:
    """features[idx] as one array expression. ``array(features[i] for i in idx)`` would generate code that
    grows with the group (Spark's codegen runs out of heap near 10k elements); a slice, or a ``transform``
    over a constant index array, stays one small expression whatever the width."""
    features = F.col(FEATURES_COL)
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return F.slice(features, idx[0] + 1, len(idx))
    return F.transform(F.lit(idx), lambda i: features[i])


def _write(df: DataFrame, url: str, block_bytes: str, shards: int) -> None:
    """Write partitioned by shard, in the rows' current order: one open writer per shard instead of the
    sort by shard a partitioned write otherwise adds. That order (by permutation position) is identical
    for every feature group written from the same data, so group files line up row by row."""
    spark = df.sparkSession
    saved = {k: spark.conf.get(k, None) for k in _WRITE_CONF}
    spark.conf.set("spark.sql.optimizer.plannedWrite.enabled", "false")
    spark.conf.set("spark.sql.maxConcurrentOutputFileWriters", str(shards + 2))
    try:
        _write_parquet(df, url, block_bytes)
    finally:
        for k, v in saved.items():
            spark.conf.unset(k) if v is None else spark.conf.set(k, v)


_WRITE_CONF = ("spark.sql.optimizer.plannedWrite.enabled", "spark.sql.maxConcurrentOutputFileWriters")


def _write_parquet(df: DataFrame, url: str, block_bytes: str) -> None:
    (
        df.write.mode("errorifexists")
        .options(**WRITE_CHECKSUMS)
        .option("parquet.block.size", block_bytes)
        .option("compression", "snappy")
        .partitionBy(SHARD_COL)
        .parquet(url)
    )


def _existing_manifest(fs: HadoopFS, out_url: str) -> Manifest | None:
    url = f"{out_url}/{MANIFEST_NAME}"
    if not fs.exists(url):
        return None
    try:
        return Manifest.from_json(fs.read_text(url), root_url=out_url)
    except (ManifestError, ValueError, KeyError, TypeError):
        return None


def _build_manifest(
    fs: HadoopFS,
    tmp: str,
    out_url: str,
    inp: _Input,
    groups: list[list[str]],
    input_rows: int,
    dropped: int,
    settings: dict,
    cfg: JobConfig,
    sparse_groups: list[list[int]] | None = None,
) -> Manifest:
    pcfg = cfg.partition
    listing = fs.list_files(tmp, suffix=".parquet")
    footers = _read_footers([f"{tmp}/{p}" for p, _, _ in listing])

    def shard(prefix: str) -> ShardEntry:
        files = [
            FileEntry(p, size, *footers[i]) for i, (p, size, _) in enumerate(listing) if p.startswith(prefix + "/")
        ]
        return ShardEntry(prefix, sum(f.rows for f in files), sum(f.bytes for f in files), files)

    train = [shard(f"train/{SHARD_COL}={k}") for k in range(pcfg.num_shards)]
    empty = [s.name for s in train if s.rows == 0]
    if empty:
        raise PartitionError(f"shard(s) {empty} are empty: lower partition.num_shards or raise sample_fraction")
    if shard("validation").rows == 0:
        raise PartitionError(
            f"the validation split is empty (partition.validation_fraction={pcfg.validation_fraction}): raise "
            "partition.validation_fraction or use more data"
        )
    feature_groups = [
        FeatureGroup(
            g,
            names,
            [shard(f"features/group={g}/{SHARD_COL}={k}") for k in range(pcfg.num_shards)],
            sparse_groups[g] if sparse_groups is not None else None,
        )
        for g, names in enumerate(groups)
    ]
    regression = cfg.data.task == "regression"
    schema = {"row_id": "long", "label": "double" if regression else "int"}
    sparse = None
    if inp.encoding is not None:
        schema.update({INDICES: f"array<int>[<{inp.encoding.dimension}]", VALUES: "array<float>"})
        sparse = SparseLayout(inp.encoding.dimension, INDICES, VALUES, inp.encoding.to_dict())
    elif pcfg.feature_layout == "array":
        schema[FEATURES_COL] = f"array<float>[{len(inp.feature_names)}]"
    else:
        schema.update({n: "float" for n in inp.feature_names})
    return Manifest(
        root_url=out_url,
        mode=pcfg.mode,
        seed=pcfg.seed,
        input_url=cfg.data.input_url,
        input_fingerprint=inp.fingerprint,
        input_files=[d.to_list() for d in inp.digests],
        input_rows=input_rows,
        dropped_rows=dropped,
        num_classes=REGRESSION if regression else cfg.data.num_classes,
        label_col="label",
        row_id_col="row_id",
        features_col=FEATURES_COL if pcfg.feature_layout == "array" and sparse is None else None,
        feature_names=inp.feature_names,
        train=train,
        validation=shard("validation"),
        feature_groups=feature_groups,
        schema=schema,
        config=settings,
        sparse=sparse,
        columns=inp.columns,
    )


def _read_footers(urls: list[str]) -> list[tuple[int, int]]:
    """(rows, row groups) of each Parquet file, read from the footers in parallel threads."""
    import pyarrow.parquet as pq

    if not urls:
        return []
    filesystem, _ = arrow_fs(urls[0])

    def footer(url: str) -> tuple[int, int]:
        _, path = arrow_fs(url)
        with filesystem.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            return meta.num_rows, meta.num_row_groups

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(footer, urls))


def verify_pages(spark: SparkSession, manifest: Manifest) -> None:
    """Read every data page of a partition output with page-CRC verification on: one full pass over the
    shards (the footers and sizes ``read_manifest`` checks cost nothing by comparison). Petastorm reads
    through pyarrow 14, which cannot verify page checksums, so this is how a flipped byte inside a shard is
    caught before training. Raises CorruptInputError naming the file."""
    spark.sparkContext.setJobDescription(f"verify page checksums of {manifest.root_url}")
    for shard in manifest.all_shards():  # one read per shard directory: their layouts differ
        if not shard.files:
            continue
        try:
            df = spark.read.options(**READ_VERIFY).parquet(*manifest.file_urls(shard))
            # A hash of every column reads and decodes every page (a count would read the footers only).
            df.select(F.sum(F.xxhash64(*df.columns))).collect()
        except Exception as exc:
            raise corrupt_file_error(exc, manifest.root_url) or exc from exc


def _check_split(manifest: Manifest, rows: int, pcfg: PartitionConfig) -> None:
    """What was written is what the split promises, counted from the files' footers: every row once, the
    exact validation size, shard sizes within one row. A miss means the input changed while it was read
    (or Spark read it differently twice); nothing is published then."""
    if pcfg.mode == "random_sample":
        return
    n_val = _validation_rows(rows, pcfg)
    sizes = [s.rows for s in manifest.train]
    if manifest.validation.rows != n_val or sum(sizes) != rows - n_val or max(sizes) - min(sizes) > 1:
        raise PartitionError(
            f"partition.mode={pcfg.mode} wrote {manifest.validation.rows} validation rows and shards of {sizes} "
            f"rows from {rows} counted input rows (expected {n_val} and {rows - n_val} within one row): "
            f"data.input_url {manifest.input_url} changed while it was partitioned; partition it again once it "
            "is complete. Nothing was published"
        )


def _check_row_groups(manifest: Manifest, pcfg: PartitionConfig) -> None:
    few = [(s.name, s.row_groups) for s in manifest.train if s.row_groups < pcfg.min_row_groups]
    if few:
        raise PartitionError(
            f"shards {few} have fewer row groups than partition.min_row_groups={pcfg.min_row_groups}: "
            "lower partition.row_group_mb or partition.num_shards"
        )


def _result(m: Manifest, skipped: bool, started: float, fingerprint_s: float) -> PartitionResult:
    return PartitionResult(
        manifest_url=f"{m.root_url}/{MANIFEST_NAME}",
        mode=m.mode,
        input_rows=m.input_rows,
        train_rows=[s.rows for s in m.train],
        validation_rows=m.validation.rows,
        dropped_rows=m.dropped_rows,
        feature_groups=len(m.feature_groups),
        skipped=skipped,
        seconds=round(time.monotonic() - started, 3),
        fingerprint_s=fingerprint_s,
    )


_CORRUPT = (
    "could not verify page integrity",
    "CRC checksum verification failed",
    "Encountered error while reading file",
)
_READ_FILE = re.compile(r"(?:reading file|Encountered error while reading file) (\S+?)\.?(?:\s|$)")


def _clean_error(exc: Exception, spark: SparkSession | None = None, dcfg: DataConfig | None = None) -> Exception:
    """Turn a Spark task failure caused by raise_error into the PartitionError it carries, a page that
    failed its checksum (or could not be decoded) into a CorruptInputError naming the file, and (given the
    session and data config of a LIBSVM input) a line Spark's LIBSVM reader choked on into one naming it."""
    if isinstance(exc, UserError | FileExistsError):
        return exc
    located = _libsvm_error(exc, spark, dcfg) if spark is not None and dcfg is not None else None
    return located or clean_invalid_row_error(exc) or corrupt_file_error(exc, "data.input_url") or exc


def _libsvm_error(exc: BaseException, spark: SparkSession, dcfg: DataConfig) -> PartitionError | None:
    """For LIBSVM input whose reader failed on a line (a Java stack without file or line): the first such line,
    found by scanning the input files with the reader's rules (only now, on this failure path)."""
    if dcfg.input_format != "libsvm" or not is_parse_failure(str(exc)):
        return None
    urls = [u for u, _, _ in list_input(spark, dcfg.input_url.rstrip("/"))]
    found = find_bad_line(urls, dcfg.dimension)
    return PartitionError(bad_line_message(found)) if found is not None else None


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
