"""The input pass: list and check the input files (footers, schema drift, stale Spark schema keys), read
Parquet or LIBSVM, fingerprint the content, check the label and row key, and build the features: ``_Input``.
Also ``_clean_error``, which turns a Spark failure of any pass into the user's error it carries.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkml_dist.config import DataConfig, PartitionConfig
from sparkml_dist.data.features import (
    INDICES,
    VALUES,
    FeatureError,
    build_encoding,
    invalid_reason,
    is_sparse_input,
    null_columns,
    sparse_columns,
    with_vocabulary_indices,
)
from sparkml_dist.data.fingerprint import FileDigest, file_digests, fingerprint
from sparkml_dist.data.libsvm import bad_line_message, find_bad_line, is_parse_failure
from sparkml_dist.data.manifest import Manifest, arrow_fs
from sparkml_dist.data.partition.columns import (
    _array_source,
    _check_nothing_left_out,
    _check_partition_columns,
    _dense_reason,
    _label_reason,
    _vector_column,
    column_roles,
    feature_expr,
    summarize_roles,
)
from sparkml_dist.data.partition.common import (
    _INTEGRAL,
    _NULLS,
    _NUMERIC,
    _WHY,
    FEATURES_COL,
    PartitionError,
    _Input,
    corrupt_file_error,
)
from sparkml_dist.data.partition.invalid import clean_invalid_row_error, valid_features
from sparkml_dist.data.storage import READ_VERIFY, HadoopFS
from sparkml_dist.errors import UserError

log = logging.getLogger("sparkml_dist.partition")  # one logger for the job, as before the split


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
