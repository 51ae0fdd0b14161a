"""One typed configuration for every job: nested frozen dataclasses loaded from YAML plus overrides.

Precedence: ``--set section.key=value`` > the YAML file > the defaults below. Unknown keys and values of
the wrong type are rejected with a message naming the key and listing the valid ones.

Paths: any ``*_url`` may be written as a plain path (relative paths resolve against ``paths.work_dir``'s
parent, i.e. the working directory) and is turned into a ``file://`` URL with an absolute path; URLs with
another scheme (hdfs://, s3a://, ...) pass through. ``{work_dir}`` inside a string is replaced by
``paths.work_dir``. ``paths.work_dir`` and plain-path ``*_url`` values have ``~`` and ``$VARS`` expanded
(an unset variable is refused by name, not left in the path).

Maps (``spark.conf``, ``data.null_fill``): ``--set section.key={k: v}`` merges into the file's map key by
key, and ``{k: null}`` removes ``k``; every other value (lists included) replaces. A YAML file with a key
given twice in one mapping is refused, naming the key and both lines.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from sparkml_dist.errors import UserError


class ConfigError(UserError):
    """A config value or key is wrong; the message names it and says what is valid."""


def to_url(path_or_url: str) -> str:
    """Return ``path_or_url`` as a URL: plain paths become absolute ``file://`` URLs."""
    if "://" in path_or_url:
        return path_or_url
    return "file://" + os.path.abspath(path_or_url)


def url_to_path(url: str) -> Path:
    """Local path of a ``file://`` URL; raises for other schemes."""
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    if "://" not in url:
        return Path(url).absolute()
    raise ConfigError(f"{url!r} is not a local file:// URL; this operation needs local files")


@dataclass(frozen=True)
class PathsConfig:
    work_dir: str = "work"
    """Root for everything the embedded default writes (data, shards, runs, MLflow db). ``~`` and ``$VARS``
    are expanded (an unset variable is an error naming it); empty and the filesystem root ``/`` are refused."""


@dataclass(frozen=True)
class SparkConfig:
    master: str = "local[2]"
    """Spark master URL. Ignored under spark-submit, which sets its own."""
    app_name: str = "sparkml-dist"
    """Spark application name."""
    log_level: str = "WARN"
    """Driver log level (ERROR, WARN, INFO, DEBUG)."""
    conf: dict[str, str] = field(default_factory=dict)
    """Extra Spark conf, e.g. {"spark.sql.shuffle.partitions": "8"}."""

    def __post_init__(self) -> None:
        _check_choice("spark.log_level", self.log_level, ("ERROR", "WARN", "INFO", "DEBUG"))


@dataclass(frozen=True)
class GenerateConfig:
    output_url: str = "{work_dir}/data/raw"
    """Where the synthetic Parquet data set is written."""
    rows: int = 100_000
    """Number of rows."""
    features: int = 16
    """Number of dense numeric features."""
    task: Literal["classification", "regression"] = "classification"
    """classification: class labels from a logistic/softmax model; regression: a float label
    x.w + b + Gaussian noise (noise_std), for train.model=linear."""
    classes: int = 2
    """classification only: 2 for binary logistic data, >2 for softmax (multi-class) data."""
    positive_fraction: float = 0.5
    """Binary only: target share of label 1 (class balance), reached by shifting the intercept."""
    label_noise: float = 0.0
    """classification only: share of labels replaced by a uniformly random class after sampling."""
    noise_std: float = 0.5
    """regression only: standard deviation of the Gaussian label noise (the best reachable MSE is its square)."""
    weight_scale: float = 1.0
    """Standard deviation of the true weights (larger = more separable)."""
    seed: int = 42
    """Seed for the true model and every row (rows are deterministic for a seed)."""
    partitions: int = 8
    """Number of Spark partitions (= output files)."""
    layout: Literal["columns", "array", "criteo"] = "array"
    """'array': one fixed-length float array column `features`; 'columns': f0..f{n-1} scalar columns;
    'criteo': Criteo-like binary click data, 13 count-like double columns i1..i13 (nullable, see null_fraction)
    and 26 Zipf-distributed hex-string categorical columns c1..c26 (see zipf_exponent, max_cardinality).
    With 'criteo', `features` is ignored (the 39 columns are fixed) and only task=classification with
    classes=2 is accepted; positive_fraction, label_noise, weight_scale and seed apply as for the others."""
    null_fraction: float = 0.0
    """layout=criteo only: share of nulls in each numeric column i1..i13 (each cell independently, seeded), in
    [0, 1). Categorical columns have no nulls."""
    zipf_exponent: float = 1.1
    """layout=criteo only: exponent s > 1 of the Zipf law of every categorical column, P(rank k) ~ k^-s over its
    cardinality (larger = heavier head)."""
    max_cardinality: int = 10_000_000
    """layout=criteo only: cap on the per-column cardinalities of c1..c26, which are log-spaced from 10 to
    10,000,000 (at most 2^32, the number of 8-hex-char tokens)."""

    def __post_init__(self) -> None:
        _check_positive("generate.rows", self.rows)
        _check_positive("generate.features", self.features)
        _check_positive("generate.partitions", self.partitions)
        if self.classes < 2:
            raise ConfigError(f"generate.classes must be >= 2, got {self.classes}")
        _check_fraction("generate.positive_fraction", self.positive_fraction, open_interval=True)
        _check_fraction("generate.label_noise", self.label_noise)
        if self.noise_std < 0:
            raise ConfigError(f"generate.noise_std must be >= 0, got {self.noise_std}")
        _check_fraction("generate.null_fraction", self.null_fraction, allow_one=False)
        if not self.zipf_exponent > 1:
            raise ConfigError(
                f"generate.zipf_exponent must be > 1 (a Zipf law with s <= 1 has no finite head), "
                f"got {self.zipf_exponent}"
            )
        _check_positive("generate.max_cardinality", self.max_cardinality)
        if self.max_cardinality > 2**32:
            raise ConfigError(
                f"generate.max_cardinality must be <= 2^32 (8 hex chars per category), got {self.max_cardinality}"
            )
        if self.layout == "criteo" and self.task != "classification":
            raise ConfigError(
                f"generate.layout=criteo makes binary click labels only; got generate.task={self.task!r}: "
                "set generate.task=classification, or use generate.layout=array or columns for regression"
            )
        if self.layout == "criteo" and self.classes != 2:
            raise ConfigError(
                f"generate.layout=criteo makes binary click labels only; got generate.classes={self.classes}: "
                "set generate.classes=2, or use generate.layout=array or columns for multi-class data"
            )


MAX_VOCABULARY_ENTRIES = 200_000
"""Categorical vocabularies are stored inline (manifest, model metadata): their total size is capped."""


@dataclass(frozen=True)
class DataConfig:
    input_url: str = "{work_dir}/data/raw"
    """Parquet input of the partition job (with scheme, or a plain path)."""
    label_col: str = "label"
    """Label column: integer class ids 0..num_classes-1, or any numeric value with task=regression."""
    task: Literal["classification", "regression"] = "classification"
    """classification: class labels (num_classes of them); regression: real-valued labels, written as
    double; the manifest then records num_classes=0 and the models are linear or mlp."""
    features_col: str | None = None
    """Name of a fixed-length numeric array column, or a Spark ML vector column (dense or sparse: densified,
    at most 65,536 values, unless partition.feature_layout=sparse keeps it sparse), holding the features; set
    this OR feature_cols. The input's other columns
    (besides label and row id) are then left out on purpose."""
    feature_cols: list[str] | None = None
    """Scalar numeric feature columns. None with features_col None (auto): a `features` array/vector column
    if there is one, else every numeric column except the label and row_id; auto refuses an input with
    columns it would leave out (strings, booleans, a column beside the features array), naming them."""
    num_classes: int = 2
    """classification only: declared number of classes; labels outside 0..num_classes-1 are rejected."""
    row_id_col: str = "row_id"
    """Stable row key. Used when present in the input, else assigned by the partition job."""
    invalid_values: Literal["fail", "drop"] = "fail"
    """NaN/inf/null features or a null label: 'fail' the job, or 'drop' the rows and count them. Partition and
    score both apply it."""
    input_format: Literal["parquet", "libsvm"] = "parquet"
    """parquet; or libsvm: text files in the LIBSVM format, read with Spark's own libsvm source (label and a
    sparse vector per line; data.dimension sets its width, else Spark finds the largest index in a pass).
    Row ids are assigned (the format has none) and the layout is sparse."""
    categorical_cols: list[str] | None = None
    """String/integer/boolean columns encoded one-hot by the hashing trick, each in its own range of
    data.hash_buckets indices after the numeric features; implies the sparse layout. A null is a category."""
    hash_buckets: int = 1 << 16
    """Buckets (indices) per categorical column: collisions inside a column merge categories."""
    categorical_encoding: Literal["hash", "vocabulary"] = "hash"
    """hash: the hashing trick (data.hash_buckets per column, no pass over the data); vocabulary: the
    data.vocabulary_size most frequent values of each column (counted in one distributed pass, ties by value)
    get their own index, every other value (and any value first seen at scoring) one out-of-vocabulary index."""
    vocabulary_size: int = 1000
    """categorical_encoding=vocabulary: values kept per column (the vocabularies travel with the manifest and
    the model, so at most 200,000 over all columns: hash beyond that)."""
    hash_seed: int = 0
    """Seed of the categorical hash (stored with the manifest and the model, so scoring hashes alike)."""
    indices_col: str | None = None
    """An input array<int|long> column of per-row feature indices (ascending), with data.values_col and
    data.dimension: the input is already sparse. Implies the sparse layout."""
    values_col: str | None = None
    """The array<number> column of values for data.indices_col (default 'values')."""
    dimension: int | None = None
    """Width of the sparse feature space (one more than the largest index): needed with data.indices_col; for
    a vector column or libsvm input it overrides (and checks) the width found in the data."""
    ignore_cols: list[str] = field(default_factory=list)
    """Input columns left out on purpose: auto mode does not refuse them, and the manifest records them as
    ignored. Naming a column the input lacks, or one that is also the label, row key or a feature, is an error."""
    null_fill: dict[str, str] = field(default_factory=dict)
    """Per numeric column, what replaces a null: 'mean' (the column's mean over the input, computed in one
    pass and stored) or a constant, e.g. {i1: mean, i2: 0}. Columns not listed follow data.invalid_values
    (fail naming the column and row id, or drop and count). Sparse layout (the stored value is applied again
    at scoring); categorical nulls are a category of their own and need no fill."""
    numeric_transform: Literal["none", "log1p", "standardize"] = "none"
    """Sparse layout, numeric table columns: 'log1p' (log(1 + x), for counts: a negative value makes its row
    invalid), or 'standardize' ((x - mean) / std over the input, computed in one pass and stored, so scoring
    transforms alike). Applied after data.null_fill."""
    duplicate_row_ids: Literal["fail", "rekey"] = "fail"
    """The input's row_id_col holds a null or repeated id (found in the partition job's counting pass):
    'fail' naming examples, or 'rekey': number the rows anew (the input's ids are not kept; the new ids
    depend on the input files, so re-runs on the same files agree)."""

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(f"data.num_classes must be >= 2, got {self.num_classes}")
        if self.features_col is not None and self.feature_cols is not None:
            raise ConfigError("set data.features_col or data.feature_cols, not both")
        if self.label_col in (self.feature_cols or []) or self.label_col == self.features_col:
            raise ConfigError(
                f"data.label_col={self.label_col!r} is also listed as a feature (data.feature_cols / "
                "data.features_col): the model would see the answer. Remove it from the features"
            )
        if self.hash_buckets < 1:
            raise ConfigError(f"data.hash_buckets must be >= 1, got {self.hash_buckets}")
        if self.vocabulary_size < 1:
            raise ConfigError(f"data.vocabulary_size must be >= 1, got {self.vocabulary_size}")
        total = self.vocabulary_size * len(self.categorical_cols or [])
        if self.categorical_encoding == "vocabulary" and total > MAX_VOCABULARY_ENTRIES:
            raise ConfigError(
                f"data.vocabulary_size={self.vocabulary_size} x {len(self.categorical_cols or [])} categorical columns "
                f"= {total} entries, above the {MAX_VOCABULARY_ENTRIES} stored with the manifest and the model: lower "
                "data.vocabulary_size, or use data.categorical_encoding=hash"
            )
        if self.dimension is not None and self.dimension < 1:
            raise ConfigError(f"data.dimension must be >= 1, got {self.dimension}")
        if self.indices_col is not None and (self.features_col is not None or self.categorical_cols):
            raise ConfigError(
                "data.indices_col names an already-sparse input: set it OR data.features_col / data.categorical_cols"
            )
        clash = [
            c
            for c in self.ignore_cols
            if c in (self.label_col, *(self.feature_cols or []), *(self.categorical_cols or []))
        ]
        if clash:
            raise ConfigError(f"data.ignore_cols lists {clash}, which are also the label or features: list them once")
        for column, fill in self.null_fill.items():
            if fill != "mean" and not _is_number(fill):
                raise ConfigError(
                    f"data.null_fill[{column}]={fill!r}: use 'mean' or a number (the value that replaces a null)"
                )
        if self.values_col is not None and self.indices_col is None:
            raise ConfigError("data.values_col needs data.indices_col (the indices those values belong to)")
        if self.label_col in (self.categorical_cols or []):
            raise ConfigError(
                f"data.label_col={self.label_col!r} is also in data.categorical_cols: the model would see the answer"
            )
        if self.feature_cols is not None and len(set(self.feature_cols)) != len(self.feature_cols):
            twice = sorted({c for c in self.feature_cols if self.feature_cols.count(c) > 1})
            raise ConfigError(f"data.feature_cols lists {twice} more than once: list each feature once")


@dataclass(frozen=True)
class PartitionConfig:
    output_url: str = "{work_dir}/data/partitioned"
    """Output directory: shards, validation, feature groups and _manifest.json."""
    mode: Literal["shuffle_split", "stratified_split", "random_sample"] = "shuffle_split"
    """shuffle_split: one seeded global permutation cut into equal shards; stratified_split: the same sizes,
    each input task dealing its rows to the shards without a network shuffle (faster; which rows share a
    shard depends on how Spark splits the input); random_sample: independent samples."""
    num_shards: int = 2
    """K sample shards, one per Horovod rank."""
    validation_fraction: float = 0.1
    """Share of rows held out as the validation split."""
    sample_fraction: float = 0.5
    """random_sample only: expected shard size as a share of the training rows."""
    with_replacement: bool = False
    """random_sample only: draw with replacement (a row may appear several times in one shard)."""
    feature_groups: int = 0
    """M > 0 also writes the features split into M column groups aligned by row_id."""
    feature_grouping: Literal["contiguous", "hashed", "explicit"] = "contiguous"
    """How features are assigned to groups."""
    explicit_groups: list[list[str]] | None = None
    """feature_grouping=explicit: the feature names of each group."""
    feature_layout: Literal["array", "columns", "sparse"] = "array"
    """Layout of features in the output: one float32 array column (streams fastest), scalar columns, or
    sparse (per row an ascending list of feature indices and one of values, never densified: a Spark ML
    vector column stays sparse; LIBSVM, data.indices_col and data.categorical_cols input always use it)."""
    row_group_mb: float = 8.0
    """Parquet row-group size in MB (Petastorm reads one row group at a time)."""
    min_row_groups: int = 1
    """Refuse a shard with fewer row groups than this (a reader needs at least one per worker)."""
    buckets: int = 0
    """Shuffle buckets for the permutation (rounded up to a power of 2); 0 = automatic: about 256 MB of
    input each, at least 2*num_shards."""
    seed: int = 7
    """Seed of the permutation and samples."""
    rehash: bool = False
    """Read every input file to fingerprint it, even those whose size and modification time match the
    manifest's record (``fingerprint.py``: by default those keep their recorded content digest)."""

    def __post_init__(self) -> None:
        _check_positive("partition.num_shards", self.num_shards)
        _check_fraction("partition.validation_fraction", self.validation_fraction, allow_one=False)
        if self.validation_fraction == 0:
            raise ConfigError(
                "partition.validation_fraction=0 leaves no validation split, and training and promotion report "
                "their metrics on it: set it above 0, e.g. partition.validation_fraction=0.1"
            )
        if not 0.0 < self.sample_fraction <= (10.0 if self.with_replacement else 1.0):
            raise ConfigError(
                f"partition.sample_fraction must be in (0, 1] (or (0, 10] with replacement), got {self.sample_fraction}"
            )
        if self.feature_groups < 0:
            raise ConfigError(f"partition.feature_groups must be >= 0, got {self.feature_groups}")
        if self.feature_grouping == "explicit" and self.feature_groups and not self.explicit_groups:
            raise ConfigError("partition.feature_grouping=explicit needs partition.explicit_groups")
        if self.row_group_mb <= 0:
            raise ConfigError(f"partition.row_group_mb must be > 0, got {self.row_group_mb}")
        _check_positive("partition.min_row_groups", self.min_row_groups)


@dataclass(frozen=True)
class TrainConfig:
    manifest_url: str = "{work_dir}/data/partitioned"
    """Partition output (with _manifest.json) to train on."""
    model: str = "logistic"
    """logistic | softmax | linear (least squares, regression data) | mlp | a user nn.Module given as
    'package.module:ClassName'."""
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 32])
    """mlp only: hidden layer widths."""
    activation: Literal["relu", "tanh", "gelu"] = "relu"
    """mlp only: activation."""
    dropout: float = 0.0
    """mlp only: dropout after each hidden layer."""
    optimizer: str = "adam"
    """A registered optimizer: sgd, adam, adamw, or a row-sparse one for wide sparse models
    (``sparkml_dist/training/sparse_optim.py``: each updates only the weight rows a step touched): lazy_adam, adagrad,
    ftrl (FTRL-Proximal, hyper-parameters ftrl_*)."""
    lr: float = 0.01
    """Learning rate (before optional scaling by world size)."""
    momentum: float = 0.0
    """sgd only."""
    weight_decay: float = 0.0
    """L2 penalty / AdamW decoupled decay."""
    ftrl_alpha: float | None = None
    """ftrl only: alpha of the per-coordinate rate alpha / (beta + sqrt(n)); > 0. Unset: train.lr (with its
    world-size scaling and warm-up)."""
    ftrl_beta: float = 1.0
    """ftrl only: beta of the per-coordinate rate (smooths the first steps of a coordinate); >= 0."""
    ftrl_l1: float = 0.0
    """ftrl only: L1 strength; a coordinate whose |z| stays at or below it is exactly zero. >= 0."""
    ftrl_l2: float = 0.0
    """ftrl only: L2 strength inside the proximal step (use it, not train.weight_decay, with ftrl). >= 0."""
    batch_size: int = 512
    """Rows per step per rank (global batch = batch_size x world size)."""
    epochs: int = 3
    """Passes over the shards."""
    max_steps_per_epoch: int = 0
    """0 = as many as the smallest shard allows; >0 caps it (tests, quick runs)."""
    seed: int = 0
    """Seed of model init, shuffling and dropout."""
    shuffle: bool = True
    """Shuffle row groups and rows (through a buffer) each epoch, seeded by (seed, epoch, rank)."""
    shuffle_buffer_rows: int = 20_000
    """Rows held in the shuffle buffer per rank."""
    reader: Literal["auto", "petastorm", "arrow"] = "auto"
    """How a rank reads its shard (``sparkml_dist/training/readers``). petastorm: Petastorm 0.12.1's reader (the
    default where it imports: pyarrow < 15). arrow: the project's own reader on pyarrow.parquet/pyarrow.fs,
    which runs on any pyarrow >= 14 and yields the same batches bit for bit for the same seed. auto: petastorm
    where it imports (and is < 0.13), else arrow (logged with the reason). With either, every row group a rank
    reads is checked against the manifest's row counts (a lost one fails the run naming the shard)."""
    cache: Literal["auto", "off", "memory"] = "auto"
    """Keep the rank's decoded training shard in memory after its first read (``readers/cache.py``): later
    epochs read no file, in the same seeded order, so the same batches. auto: when it fits
    train.cache_max_mb, else stream (logged); memory: fail when it does not fit; off: stream every epoch."""
    sparse_gradients: Literal["auto", "on", "off"] = "auto"
    """Row-sparse gradients for the wide first layer of a model on sparse-layout data (``comm/rows.py``): its
    backward keeps only the rows a batch touched, and the ranks exchange only those rows (exact, any
    optimizer; a row-sparse one - lazy_adam, adagrad, ftrl - then updates only them). With
    comm.strategy=parameter_server a worker pulls only the parameters its batch reads and pushes only their
    gradient; the servers keep the optimizer state. auto: on for a model with a SparseLinear on sparse data
    with comm.strategy allreduce, local_sgd or parameter_server and comm.compression none or nonzero, else off
    (logged); on: the same, refused where it does not apply; off: dense gradients."""
    cache_max_mb: float = 0.0
    """Bound of the shard cache per rank in MB; 0 = a quarter of the host's available memory, split over the
    ranks on that host."""
    reader_workers: int = 2
    """Reader threads per rank decoding row groups in parallel (>= 1). The batch stream is the same
    for any count (row groups are reordered as ventilated); memory grows by about one row group per worker."""
    fp16_allreduce: bool = False
    """Deprecated spelling of comm.compression=fp16 (kept so existing configs run unchanged)."""
    backward_passes_per_step: int = 1
    """Gradient accumulation: local backward passes per allreduce + optimizer step."""
    scale_lr_by_world_size: bool = False
    """Multiply lr by world size (with warm-up), the usual rule for a larger global batch."""
    warmup_epochs: float = 0.0
    """Linear warm-up from lr to the scaled lr over this many epochs."""
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this value; 0 = off."""
    runs_url: str = "{work_dir}/runs"
    """Per-run directories (checkpoints) live below this."""
    checkpoint: bool = True
    """Rank 0 writes a checkpoint after every epoch; a retried or re-run job resumes from it."""
    checkpoint_every_steps: int = 100
    """Also checkpoint every N batches inside an epoch, with the exact data position (epoch, step), every
    rank's RNG and partial loss, so a lost rank costs about N steps and the resumed run ends with the same
    parameters. 0: epoch ends only. Measured on the default problem (3 ms steps): 1.2% of step time at
    100, 5.7% at 50, 25% at 10 (bench/checkpoint.py). Taken after an optimizer step at which every rank holds the same
    parameters (with local_sgd: the next parameter average at or after the N-th batch)."""
    eval_every_steps: int = 0
    """Also evaluate on the validation split every N batches inside an epoch (0: at epoch ends only). Each such
    evaluation is logged at its global step as ``step_val_<metric>`` with ``step_elapsed_s`` (training seconds
    so far, the evaluations included), so a run's time to a target (``jobs.compare``, the benchmarks) is read
    to the evaluation that reached it rather than to the epoch's end; the epoch's own metrics are unchanged.
    Taken after an optimizer step at which every rank holds the same parameters (with local_sgd: the next
    parameter average at or after the N-th batch). Ring strategies only: comm.strategy=parameter_server
    evaluates the servers' snapshot at each epoch's end. Costs one forward pass over a rank's validation rows
    each time: on bench/sparse.py's table ~50 ms for 100k rows a rank, under 1% of the 200 steps between two
    evaluations at N=200 (measured 2026-12-06)."""
    resume_run_id: str | None = None
    """Resume this MLflow run id from its latest checkpoint."""
    verify_pages: bool = False
    """Before training, read every shard once with Parquet page-checksum verification (one full pass): the
    only check that catches a flipped byte inside a data page, since the ranks read through pyarrow 14,
    which cannot verify page checksums. Footers and row counts are checked on every run regardless."""
    mode: str = "data_parallel"
    """A registered training mode. data_parallel: one rank per sample shard, full model everywhere,
    gradients combined by comm.strategy. feature_parallel: one rank per feature group
    (partition.feature_groups), each holding only its weight block; partial outputs allreduced.
    Generalized linear models only: logistic, softmax, linear."""
    max_model_gib: float = 2.0
    """The most memory, in GiB, one rank's model may take: parameters x 4 bytes x (weights, gradient and the
    optimizer's state copies: 2 for adam/adamw, 1 for sgd with momentum). Checked from the feature dimension
    when partitioning and again before training starts, so a 2^31-wide LIBSVM space is refused with the figure
    instead of failing a rank's allocation. 0 = no limit."""

    def __post_init__(self) -> None:
        if self.max_model_gib < 0:
            raise ConfigError(f"train.max_model_gib must be >= 0 (0: no limit), got {self.max_model_gib}")
        if self.mode == "feature_parallel":
            _check_feature_parallel(self)
        _check_positive("train.batch_size", self.batch_size)
        _check_positive("train.epochs", self.epochs)
        _check_positive("train.backward_passes_per_step", self.backward_passes_per_step)
        if self.checkpoint_every_steps < 0:
            raise ConfigError(
                f"train.checkpoint_every_steps must be >= 0 (0: epoch ends only), got {self.checkpoint_every_steps}"
            )
        if self.eval_every_steps < 0:
            raise ConfigError(
                f"train.eval_every_steps must be >= 0 (0: at epoch ends only), got {self.eval_every_steps}"
            )
        _check_positive("train.reader_workers", self.reader_workers)
        if self.cache_max_mb < 0:
            raise ConfigError(f"train.cache_max_mb must be >= 0 (0 = derived from the host), got {self.cache_max_mb}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        _check_ftrl(self)
        _check_fraction("train.dropout", self.dropout, allow_one=False)
        if self.max_steps_per_epoch < 0:
            raise ConfigError(f"train.max_steps_per_epoch must be >= 0, got {self.max_steps_per_epoch}")


def _check_ftrl(cfg: TrainConfig) -> None:
    if cfg.ftrl_alpha is not None and not cfg.ftrl_alpha > 0:
        raise ConfigError(f"train.ftrl_alpha must be > 0 (or unset to use train.lr), got {cfg.ftrl_alpha}")
    for key in ("ftrl_beta", "ftrl_l1", "ftrl_l2"):
        value = getattr(cfg, key)
        if not value >= 0:  # also refuses NaN
            raise ConfigError(f"train.{key} must be >= 0, got {value}: set train.{key}=0 to turn it off")
    if cfg.optimizer == "ftrl" and cfg.weight_decay:
        raise ConfigError(
            f"train.weight_decay={cfg.weight_decay} does not apply to train.optimizer=ftrl: set train.ftrl_l2 "
            "(its L2 strength) instead and train.weight_decay=0"
        )


def _check_feature_parallel(cfg: TrainConfig) -> None:
    if cfg.model not in ("logistic", "softmax", "linear"):
        raise ConfigError(
            f"train.mode=feature_parallel splits a linear model's weights by feature: train.model must be "
            f"logistic, softmax or linear, got {cfg.model!r} (use train.mode=data_parallel for it)"
        )
    unsupported = {
        "fp16_allreduce": cfg.fp16_allreduce,  # logits, not gradients, are reduced; fp16 would bias them
        "scale_lr_by_world_size": cfg.scale_lr_by_world_size,  # the global batch does not grow with ranks
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(
            f"train.{bad[0]}=true does not apply to train.mode=feature_parallel (every rank sees the same "
            f"batch): set train.{bad[0]}=false"
        )


@dataclass(frozen=True)
class LaunchConfig:
    backend: Literal["barrier", "in_process"] = "barrier"
    """barrier: one Spark barrier stage, a Horovod rank per task. in_process: the ranks run as threads of
    the driver with in-memory collectives (rank.run_in_process): the same loop without Spark tasks or
    Horovod, for fast tests and debugging; no retries, stall detection or fault injection."""
    collectives: Literal["horovod", "torch"] = "horovod"
    """barrier backend: the engine the ranks' collectives run on. horovod: Horovod 0.28.1's ring AllReduce
    (Gloo on CPU, NCCL on GPU), the default. torch: a torch.distributed process group (gloo on CPU, nccl on
    GPU), initialized from the same guarded rendezvous; needs no Horovod."""
    start_timeout_s: float = 120.0
    """Seconds every rank may take to reach the rendezvous and finish initializing its collectives."""
    collective_timeout_s: float = 300.0
    """Seconds a single collective may wait for the other ranks (Gloo timeout)."""
    job_timeout_s: float = 0.0
    """Cancel the whole training stage after this many seconds. 0 = derived from the data (``launch.
    job_deadline``): start_timeout_s + epochs x max(collective_timeout_s, rows a rank reads per epoch /
    min_rows_per_s), so it grows linearly with the rows per rank and is finite for any input."""
    min_rows_per_s: float = 50.0
    """For the derived job_timeout_s: the slowest rate (rows a rank trains and validates per second) that
    still counts as progress. 50 is far below any rate measured here (1e4-1e6): a deadline, not a target."""
    use_gpu: bool = False
    """Use the task's GPU (from Spark task resources) and NCCL instead of Gloo on CPU."""
    device_check: bool = False
    """Tests: every tensor that reaches the model must have gone through the rank's device placement
    (device.Placement), so a path that would break on a GPU fails on a CPU too."""
    nic: str = ""
    """Network interface for Gloo; empty = the one that holds the task's address (lo for 127.0.0.1)."""
    small_allreduce_bytes: int = 262144
    """collectives=torch on gloo: an allreduce whose gathered size (its bytes x the ranks) is at most this goes
    as one allgather and a sum in rank order on every rank: K-1 ring steps instead of gloo's ring allreduce's
    2(K-1), for the small, latency-bound vectors of small models (measured, 2 ranks on 2 cores, 2026-12-07: a
    520-byte allreduce 0.85 ms, the same allgather 0.41 ms; the two cross near 1 MB). 0: always gloo's
    allreduce. Every rank sums the same rows in the same order: the result is bit-identical on every rank."""
    # --- reliability (issue 6): retries, stall detection, fault injection for drills
    max_attempts: int = 0
    """Attempts of the training stage when a rank's process is lost or stalls (each resumes from the latest
    checkpoint); a Python exception raised by a rank is not retried. 0 = Spark's task retry budget:
    F of a local[N,F] master, spark.task.maxFailures elsewhere (1 for a plain local[N])."""
    stall_timeout_s: float = 120.0
    """Fail (and retry) the stage when a rank sent no heartbeat for this many seconds; 0 = off."""
    fault_kind: Literal["none", "kill", "stop", "hang", "slow"] = "none"
    """Tests and drills only: on attempt 0, rank fault_rank SIGKILLs (kill) or SIGSTOPs (stop) itself at
    fault_step, or hangs there alive (hang: sleeps, heart beating, never reaching the next collective);
    slow: from fault_step on, it sleeps fault_delay_s before every step (a straggler)."""
    fault_delay_s: float = 0.0
    """fault_kind=slow only: seconds the slow rank sleeps before each step."""
    fault_rank: int = 1
    """Rank that fault_kind hits."""
    fault_step: int = 0
    """Global optimizer step (epoch * steps_per_epoch + step) at which the fault hits."""

    def __post_init__(self) -> None:
        for key in ("start_timeout_s", "collective_timeout_s", "min_rows_per_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"launch.{key} must be > 0, got {getattr(self, key)}")
        if self.job_timeout_s < 0:
            raise ConfigError(
                f"launch.job_timeout_s must be >= 0 (0 = derived from the data), got {self.job_timeout_s}"
            )
        if self.fault_delay_s < 0:
            raise ConfigError(f"launch.fault_delay_s must be >= 0, got {self.fault_delay_s}")
        if self.small_allreduce_bytes < 0:
            raise ConfigError(
                f"launch.small_allreduce_bytes must be >= 0 (0 = always the engine's allreduce), got "
                f"{self.small_allreduce_bytes}"
            )
        if self.max_attempts < 0 or self.stall_timeout_s < 0 or self.fault_step < 0 or self.fault_rank < 0:
            raise ConfigError(
                "launch.max_attempts, launch.stall_timeout_s, launch.fault_step and launch.fault_rank must be "
                f">= 0, got {self.max_attempts}, {self.stall_timeout_s}, {self.fault_step}, {self.fault_rank}"
            )


PS_STRATEGY = "parameter_server"
"""comm.strategy of the parameter-server topology (sparkml_dist/ps): not a ``comm.STRATEGIES`` entry, because
its workers run outside the Horovod ring's loop."""


@dataclass(frozen=True)
class CommConfig:
    """How the ranks communicate (data_parallel mode): see sparkml_dist/comm and the README's
    "How workers communicate"."""

    strategy: str = "allreduce"
    """A registered strategy: allreduce (gradients averaged every step, bulk-synchronous), local_sgd
    (local_steps optimizer steps per rank, then the parameters are averaged) or parameter_server (workers
    pull parameters from server processes and push gradients, at comm.pace; see sparkml_dist/ps)."""
    compression: str = "none"
    """What is sent, a registered compressor: none (fp32), fp16 (half precision), topk (the topk_ratio
    largest-magnitude entries of each tensor, with their indices), nonzero (exactly the non-zero entries
    with their indices: exact, and small for models on sparse input, whose first-layer gradient is zero
    outside the features a batch touched)."""
    topk_ratio: float = 0.01
    """topk only: share of each tensor's entries sent per round (at least one)."""
    error_feedback: bool = True
    """topk only: keep what was not sent in a per-rank residual added to the next round's vector."""
    local_steps: int = 8
    """local_sgd only: optimizer steps between parameter averages (k)."""
    warmup_steps: int = 0
    """local_sgd only: the first w optimizer steps are fully synchronous (post-local SGD)."""
    average_optimizer_state: bool = False
    """local_sgd only: also average the optimizer's state tensors (momentum, Adam moments) at each round."""
    pace: Literal["ssp", "async"] = "ssp"
    """parameter_server only. ssp: a worker whose clock (pushes so far) is more than comm.staleness ahead of
    the slowest worker waits for it (staleness 0 is bulk-synchronous: the K gradients of a clock are applied
    as one step of their mean, exactly synchronous SGD). async: every push is applied as it arrives and no
    worker ever waits for another."""
    staleness: int = 2
    """parameter_server, pace=ssp: the bound s, in clocks (steps)."""
    ps_shards: int = 0
    """parameter_server: server processes, each holding a contiguous slice of the flat parameter vector;
    0 = as many as comm.ps_shard_max_params requires (at least 1)."""
    ps_shard_max_params: int = 4_000_000
    """parameter_server: most parameters one server shard holds when comm.ps_shards=0 (16 MB of float32)."""
    ps_checkpoint_s: float = 30.0
    """parameter_server: each shard writes its state (slice, optimizer, clocks) at least this often and at
    every epoch boundary, so a rerun of a lost run resumes from there."""
    ps_timeout_s: float = 300.0
    """parameter_server: the longest a worker waits for a server reply (a pull held back by the staleness
    bound included) and a server holds a pull back before it names the slowest worker as lost."""

    def __post_init__(self) -> None:
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ConfigError(f"comm.topk_ratio must be in (0, 1], got {self.topk_ratio}")
        _check_positive("comm.local_steps", self.local_steps)
        if self.warmup_steps < 0:
            raise ConfigError(f"comm.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.staleness < 0 or self.ps_shards < 0:
            raise ConfigError(f"comm.staleness and comm.ps_shards must be >= 0, got {self.staleness}, {self.ps_shards}")
        for key in ("ps_shard_max_params", "ps_checkpoint_s", "ps_timeout_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"comm.{key} must be > 0, got {getattr(self, key)}")


MAX_EXPERIMENT_NAME = 256
"""Longest experiment name MLflow's SQL stores hold (their ``experiments.name`` column)."""


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = "sqlite:///{work_dir}/mlflow.db"
    """MLflow tracking URI (sqlite file, http://host:port, databricks, ...)."""
    artifact_url: str = "{work_dir}/mlartifacts"
    """Artifact root for new experiments."""
    experiment: str = "sparkml-dist"
    """MLflow experiment name: 1 to 256 characters (the longest MLflow's SQL stores hold)."""
    run_name: str | None = None
    """Run name; None = generated."""
    log_model: bool = True
    """Log the final model with mlflow.pytorch.log_model."""
    system_metrics_s: float = 10.0
    """Every rank samples its host's CPU, memory, disk and network (and GPU where present) at this interval
    into the training run as MLflow system metrics named system/rank<r>/..., so a slow rank shows in the UI.
    0 turns them off."""
    run_key: str | None = None
    """Idempotency key, e.g. a schedule's logical date: runs are tagged run_key=<key>, and a new run of a kind
    replaces (deletes) the experiment's earlier runs of that kind with the same key, so reruns never pile up.
    Training reuses instead: a FINISHED run on the same manifest is returned as is, an unfinished one resumed."""

    outage_wait_s: float = 600.0
    """A training run never waits on an unreachable tracking server: its metrics are kept in a spool beside
    its checkpoints and delivered when the server is back (``sparkml_dist/experiments/spool``). At the end of the
    run it waits this many seconds for the server, then fails saying where the metrics and the model are."""

    def __post_init__(self) -> None:
        if not self.experiment.strip() or len(self.experiment) > MAX_EXPERIMENT_NAME:
            shown = self.experiment if len(self.experiment) <= 40 else f"{self.experiment[:40]}..."
            raise ConfigError(
                f"tracking.experiment={shown!r} ({len(self.experiment)} characters): MLflow stores experiment "
                f"names of 1 to {MAX_EXPERIMENT_NAME} characters; choose a name in that range"
            )
        if self.outage_wait_s < 0:
            raise ConfigError(f"tracking.outage_wait_s must be >= 0, got {self.outage_wait_s}")
        if self.system_metrics_s < 0:
            raise ConfigError(f"tracking.system_metrics_s must be >= 0 (0: off), got {self.system_metrics_s}")
        if self.run_key is not None and not _SAFE_TAG.match(self.run_key):
            raise ConfigError(
                f"tracking.run_key={self.run_key!r}: use 1-64 letters, digits and _ . : + - (starting with a "
                "letter or digit), e.g. tracking.run_key=2024-01-31"
            )


BASELINE_KINDS = ("gd", "sgd", "averaging", "mllib_lr", "mllib_mlp")


@dataclass(frozen=True)
class BaselineConfig:
    kinds: list[str] = field(default_factory=lambda: ["gd", "sgd", "averaging", "mllib_lr", "mllib_mlp"])
    """Baselines to run, each as its own MLflow run: gd, sgd, averaging, mllib_lr, mllib_mlp."""
    max_iterations: int = 100
    """Iterations per baseline (MapReduce rounds for gd/sgd/averaging; L-BFGS maxIter for mllib_*)."""
    gd_lr: float = 4.0
    """gd: step size; halved whenever a step raised the objective. 4 = 1/L for standardized features."""
    sgd_lr: float = 4.0
    """sgd: initial step size, decayed as sgd_lr / sqrt(iteration) (as spark.mllib's GradientDescent)."""
    batch_fraction: float = 0.1
    """sgd: share of each partition's rows sampled per iteration."""
    local_epochs: int = 1
    """averaging: passes of local SGD over a partition's rows per round."""
    local_lr: float = 0.1
    """averaging: local SGD step size, decayed as local_lr / sqrt(round)."""
    local_batch_size: int = 32
    """averaging: rows per local SGD step."""
    reg_param: float = 0.0
    """L2 penalty 0.5 * reg_param * ||W||^2 on the weights (not the bias), for every kind."""
    partitions_per_shard: int = 1
    """Spark partitions (tasks) per shard and for the validation split: 1 mirrors one Horovod rank per shard;
    more spreads a shard over more cores (a one-off shuffle when the data are read)."""
    tree_depth: int = 2
    """Depth of treeAggregate (and MLlib's aggregationDepth)."""
    eval_every: int = 1
    """gd/sgd/averaging: evaluate on the validation split every this many iterations (and at the end)."""
    target_log_loss: float = 0.0
    """Stop once the validation log-loss is at or below this and record the time to reach it; 0 = off."""
    time_cap_s: float = 0.0
    """gd/sgd/averaging: stop after this many seconds; 0 = no cap."""
    mlp_hidden_sizes: list[int] = field(default_factory=lambda: [64, 32])
    """mllib_mlp: hidden layer widths (as train.hidden_sizes)."""
    mllib_tol: float = 1e-6
    """mllib_*: L-BFGS convergence tolerance."""
    seed: int = 0
    """Seed of the sgd samples, the averaging shuffles and the MLP's initial weights."""

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in BASELINE_KINDS]
        if unknown or not self.kinds or len(set(self.kinds)) != len(self.kinds):
            what = f"unknown kind(s) {unknown}" if unknown else f"got {self.kinds!r}"
            raise ConfigError(
                f"baselines.kinds: {what}; give one or more distinct kinds from {', '.join(BASELINE_KINDS)}"
            )
        counts = ("max_iterations", "local_epochs", "local_batch_size", "partitions_per_shard", "tree_depth")
        for key in (*counts, "eval_every"):
            _check_positive(f"baselines.{key}", getattr(self, key))
        for key in ("gd_lr", "sgd_lr", "local_lr", "mllib_tol"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"baselines.{key} must be > 0, got {getattr(self, key)}")
        for key in ("reg_param", "target_log_loss", "time_cap_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"baselines.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 < self.batch_fraction <= 1.0:
            raise ConfigError(f"baselines.batch_fraction must be in (0, 1], got {self.batch_fraction}")
        if any(h < 1 for h in self.mlp_hidden_sizes):
            raise ConfigError(f"baselines.mlp_hidden_sizes must be positive widths, got {self.mlp_hidden_sizes}")


@dataclass(frozen=True)
class ScoreConfig:
    model_uri: str | None = None
    """Model to score with: runs:/<run id>/model, models:/<name>@<alias>, models:/<name>/<version>;
    None = models:/<promote.registered_model>@<promote.alias> (the current champion)."""
    input_url: str = "{work_dir}/data/raw"
    """Parquet to score: a data set (features as data.features_col / data.feature_cols pick them, as the
    partition job does) or a partition output (its _manifest.json says which files and features)."""
    split: Literal["all", "train", "validation"] = "all"
    """Partition output only: score every shard, the train shards or the validation split."""
    output_url: str = "{work_dir}/data/scores"
    """Predictions (row key, predicted class, prob_0..prob_{C-1}); replaced atomically on every run."""
    keep_cols: list[str] = field(default_factory=list)
    """Input columns copied into the output beside the row key, e.g. [label]."""
    max_unseen_fraction: float = 0.5
    """Sparse models with categorical columns: per column, the share of scored rows whose value the model
    never saw in training (outside its vocabulary; for hash encoding, in a bucket no training row hit, where
    the model records them) above which score.unseen acts. The counts are in the job's summary and
    ``_score.json`` (``unseen``) and in the score run's MLflow metrics, whatever the threshold."""
    unseen: Literal["warn", "fail"] = "warn"
    """Above score.max_unseen_fraction: warn naming the column, or fail before any prediction is published."""

    def __post_init__(self) -> None:
        _check_fraction("score.max_unseen_fraction", self.max_unseen_fraction)
        if self.model_uri is not None and not self.model_uri.startswith(("runs:/", "models:/")):
            raise ConfigError(
                f"score.model_uri={self.model_uri!r} must be runs:/<run id>/model, models:/<name>@<alias> "
                "or models:/<name>/<version>"
            )


PROMOTE_METRICS = ("log_loss", "accuracy", "auc", "mse", "rmse", "mae", "r2")
_SAFE_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+\-]{0,63}$")


@dataclass(frozen=True)
class PromoteConfig:
    registered_model: str = "sparkml-dist"
    """Name of the model in the MLflow Model Registry."""
    alias: str = "champion"
    """Alias that marks the model in production; moved only by a better candidate."""
    metric: Literal["log_loss", "accuracy", "auc", "mse", "rmse", "mae", "r2"] = "log_loss"
    """Score that decides, on the validation split of train.manifest_url: log_loss, accuracy or auc for
    classification, mse, rmse, mae or r2 for regression (log_loss, mse, rmse, mae: lower is better)."""
    min_improvement: float = 0.0
    """The candidate must beat the champion by more than this (absolute, in the metric's units)."""
    candidate_run_id: str | None = None
    """Candidate training run; None = the newest FINISHED run of candidate_kind on the manifest's data."""
    candidate_kind: str = "allreduce"
    """Run kind (tag) a candidate is looked up by when candidate_run_id is None."""
    logical_date: str | None = None
    """The schedule's logical date (Airflow's {{ ds }}): one promotion run and decision per date and model;
    a rerun for the same date reuses them. Required by jobs/evaluate.py and jobs/promote.py."""

    def __post_init__(self) -> None:
        if self.min_improvement < 0:
            raise ConfigError(f"promote.min_improvement must be >= 0, got {self.min_improvement}")
        for key in ("registered_model", "alias", "logical_date", "candidate_run_id"):
            value = getattr(self, key)
            if value is not None and not _SAFE_TAG.match(value):
                raise ConfigError(
                    f"promote.{key}={value!r}: use 1-64 letters, digits and _ . : + - (starting with a letter "
                    "or digit), e.g. promote.logical_date=2024-01-31"
                )


@dataclass(frozen=True)
class JobConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dump(self) -> str:
        """The resolved config as YAML (what was actually used)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, str]:
        """section.key -> value as strings (for MLflow params)."""
        out: dict[str, str] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value if isinstance(value, str) else json.dumps(value)
        return out


# --------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Build a JobConfig from defaults, a YAML file and ``section.key=value`` overrides."""
    raw: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.epochs=5")
        section, _, name = key.partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        try:
            parsed = _parse_value(value)
        except _DuplicateKeyError as exc:
            raise ConfigError(f"--set {item!r}: key {exc.key!r} is given twice; give it once") from None
        raw[section][name] = _override(raw[section].get(name), parsed)
    cfg = _build(JobConfig, raw, "")
    return check_config(_resolve_paths(cfg))


def check_config(cfg: JobConfig) -> JobConfig:
    """Checks across sections and against the registries (models, optimizers, modes, strategies,
    compressors), so a wrong name fails here, listing the registered ones, before any Spark task starts."""
    from sparkml_dist import registry

    tc, comm = cfg.train, cfg.comm
    if tc.fp16_allreduce:
        if comm.compression not in ("none", "fp16"):
            raise ConfigError(
                f"train.fp16_allreduce=true and comm.compression={comm.compression} contradict each other: "
                "drop train.fp16_allreduce (comm.compression=fp16 is its new spelling)"
            )
        cfg = dataclasses.replace(cfg, comm=dataclasses.replace(comm, compression="fp16"))
        comm = cfg.comm
    names = {"modes": tc.mode, "optimizers": tc.optimizer, "compressors": comm.compression}
    if comm.strategy != PS_STRATEGY:  # a topology of its own (sparkml_dist/ps), not a strategy of the ring loop
        names["strategies"] = comm.strategy
    if ":" not in tc.model:  # 'package.module:ClassName' is imported where the model is built
        names["models"] = tc.model
    for table, name in names.items():
        try:
            registry.load(table).get(name)
        except registry.UnknownNameError as exc:
            extra = f", or the topology {PS_STRATEGY}" if table == "strategies" else ""
            raise ConfigError(f"{exc}{extra}") from None
    if tc.sparse_gradients == "on":
        _check_sparse_gradients(tc, comm)
    if tc.eval_every_steps and comm.strategy == PS_STRATEGY:
        raise ConfigError(
            f"train.eval_every_steps={tc.eval_every_steps} evaluates inside the ranks' loop; "
            f"comm.strategy={PS_STRATEGY} evaluates the servers' snapshot at each epoch's end: set "
            "train.eval_every_steps=0, or use comm.strategy=allreduce or local_sgd"
        )
    if tc.mode == "feature_parallel" and (comm.strategy, comm.compression) != ("allreduce", "none"):
        raise ConfigError(
            f"train.mode=feature_parallel allreduces partial outputs every step, not gradients: comm.strategy="
            f"{comm.strategy} and comm.compression={comm.compression} do not apply; use comm.strategy=allreduce "
            "comm.compression=none, or train.mode=data_parallel"
        )
    return cfg


SPARSE_GRADIENT_STRATEGIES = ("allreduce", "local_sgd", "parameter_server")
"""Strategies that exchange row-sparse gradients (``train.sparse_gradients``)."""
SPARSE_GRADIENT_COMPRESSIONS = ("none", "nonzero")
"""Compressors that combine with row-sparse gradients: exact and stateless (the rows bypass them)."""


def _check_sparse_gradients(tc: TrainConfig, comm: CommConfig) -> None:
    """``train.sparse_gradients=on`` where it cannot apply is refused here, before any Spark job."""
    if tc.mode != "data_parallel":
        raise ConfigError(
            f"train.sparse_gradients=on applies to train.mode=data_parallel, not {tc.mode}: set "
            "train.sparse_gradients=auto or off"
        )
    if comm.strategy not in SPARSE_GRADIENT_STRATEGIES:
        raise ConfigError(
            f"train.sparse_gradients=on is exchanged by comm.strategy={' or '.join(SPARSE_GRADIENT_STRATEGIES)}, "
            f"not {comm.strategy}: set train.sparse_gradients=auto or off"
        )
    if comm.compression not in SPARSE_GRADIENT_COMPRESSIONS:
        raise ConfigError(
            f"train.sparse_gradients=on sends the touched rows exactly; comm.compression={comm.compression} "
            f"would compress the rest lossily: use comm.compression=none or nonzero, or "
            "train.sparse_gradients=off"
        )


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping gives the same key twice (YAML itself would keep the last one without a word)."""

    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark) -> None:
        super().__init__(f"key {key!r} given twice")
        self.key, self.first, self.second = key, first, second


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping is an error, not the last one wins."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base': keys after it may override the base's
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark)
        except TypeError:  # an unhashable key: construct_mapping names it
            continue
        if first is not key_node.start_mark:
            raise _DuplicateKeyError(key, first, key_node.start_mark)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)  # type: ignore[arg-type]


def _read_yaml(p: Path) -> dict[str, Any]:
    """The config file's sections; every way it can be wrong is one line naming the file (and line) and the fix."""
    if p.is_dir():
        found = sorted(x.name for x in p.glob("*.yaml"))[:5]
        hint = f": give one of its files, e.g. {p / found[0]}" if found else ": give a YAML file"
        raise ConfigError(f"--config {str(p)!r} is a directory, not a config file{hint}")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found (try conf/local.yaml)")
    try:
        with p.open(encoding="utf-8") as fh:
            loaded = yaml.load(fh, Loader=_StrictLoader) or {}  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKeyError as exc:
        raise ConfigError(
            f"{p}:{exc.second.line + 1}: key {exc.key!r} is given twice in one mapping (lines {exc.first.line + 1} "
            f"and {exc.second.line + 1}); YAML would keep only the last: merge them into one"
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        if "'\\t'" in str(exc.problem):
            raise ConfigError(
                f"{where}: a tab character; YAML indents with spaces only: replace it with spaces"
            ) from None
        raise ConfigError(f"{where}: not valid YAML ({exc.problem}): fix that line") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML ({exc})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(p)!r} must be a mapping of sections")
    return loaded


def _parse_value(value: str) -> Any:
    """A ``--set`` value as YAML (numbers, lists, booleans); text that is not YAML, e.g. ``{work_dir}/x``, as is."""
    if value == "":
        return ""
    try:
        return yaml.load(value, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKeyError:
        raise
    except yaml.YAMLError:
        return value


def _override(current: Any, new: Any) -> Any:
    """What ``--set`` makes of a value: a map merges into the file's map key by key (a null value removes that
    key), so ``--set 'spark.conf={k: v}'`` keeps the file's other Spark settings; anything else replaces."""
    if not (isinstance(current, dict) and isinstance(new, dict)):
        if isinstance(new, dict):  # nothing to merge into: a null still means "not set"
            return {k: v for k, v in new.items() if v is not None}
        return new
    merged = dict(current)
    for key, value in new.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _expand_path(key: str, value: str) -> str:
    """``~`` and ``$VAR`` / ``${VAR}`` expanded in a plain path; an unset variable or unknown user is refused."""
    unset = [a or b for a, b in _VAR.findall(value) if (a or b) not in os.environ]
    if unset:
        raise ConfigError(
            f"{key}={value!r} uses ${unset[0]}, which is not set in the environment: export it, or write the path out"
        )
    expanded = os.path.expanduser(os.path.expandvars(value))
    if expanded.startswith("~"):
        raise ConfigError(f"{key}={value!r}: {expanded.split('/')[0]!r} is not a user on this machine")
    return expanded


def _resolve_work_dir(value: str) -> str:
    if not value.strip():
        raise ConfigError(
            "paths.work_dir is empty, which would put every output in the current directory: set it to a "
            "directory of its own, e.g. paths.work_dir=work"
        )
    work_dir = os.path.abspath(_expand_path("paths.work_dir", value))
    if os.path.realpath(work_dir) == "/":
        raise ConfigError(
            f"paths.work_dir={value!r} is the filesystem root: outputs would be written to /data, /runs, ...; "
            "set it to a directory of its own, e.g. paths.work_dir=work"
        )
    return work_dir


def _resolve_paths(cfg: JobConfig) -> JobConfig:
    work_dir = _resolve_work_dir(cfg.paths.work_dir)

    def fix(section: str, obj: Any) -> Any:
        changes = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, str) and "{work_dir}" in value:
                value = value.replace("{work_dir}", work_dir)
                changes[f.name] = value
            if f.name.endswith("_url") and isinstance(value, str) and value:
                if "://" not in value and ("$" in value or value.startswith("~")):
                    value = _expand_path(f"{section}.{f.name}", value)
                changes[f.name] = to_url(value)
        return dataclasses.replace(obj, **changes) if changes else obj

    sections = {f.name: fix(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    sections["paths"] = dataclasses.replace(cfg.paths, work_dir=work_dir)
    return dataclasses.replace(cfg, **sections)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        label = f"section {where!r}" if where else "the config"
        raise ConfigError(f"unknown key(s) {unknown} in {label}; valid keys: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], raw[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a __post_init__ check
        raise ConfigError(str(exc)) from exc


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and _YAML_BOOL_WORDS[value] in choices:
            value = _YAML_BOOL_WORDS[value]  # YAML 1.1 reads on/off (and yes/no) as booleans
        _check_choice(key, value, choices)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        empty = [k for k, v in value.items() if v is None]
        if empty:  # str(None) would become the text 'None'
            raise ConfigError(f"{key}[{empty[0]}] has no value: give one, or leave the key out")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot in the mantissa) as text; everyone means the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, datetime.date):  # YAML reads 2024-01-31 as a date; a logical date is a string
            return value.isoformat()
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")
"""A number in exponent notation, as YAML 1.1 (PyYAML) leaves it a string: 1e-4, 5E3, 1.0e5."""


_YAML_BOOL_WORDS = {True: "on", False: "off"}
"""A choice spelled on/off arrives from YAML 1.1 (PyYAML) as a boolean: ``train.cache=off`` is the word."""


def _check_choice(key: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _check_positive(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key} must be >= 1, got {value}")


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_fraction(key: str, value: float, open_interval: bool = False, allow_one: bool = True) -> None:
    lo_ok = value > 0 if open_interval else value >= 0
    hi_ok = value < 1 if (open_interval or not allow_one) else value <= 1
    if not (lo_ok and hi_ok):
        interval = "(0, 1)" if open_interval else ("[0, 1)" if not allow_one else "[0, 1]")
        raise ConfigError(f"{key} must be in {interval}, got {value}")
