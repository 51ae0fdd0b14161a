"""DataFrame -> sample shards, validation split and feature groups, described by one manifest.

The partition job (``partition``), one module per pass, each importing only the ones above it:

- ``common``: the errors, the working column names and the read input (``_Input``) every pass shares;
- ``invalid``: the invalid-row rule and ``data.invalid_values`` policy (the scoring job applies them too);
- ``columns``: which input columns are the label, the features and the row key (and the checks that none is
  used or left out by accident);
- ``read``: the input pass: files checked, Parquet or LIBSVM read, content fingerprinted, features built;
- ``assign``: the counting pass and each row's shard (-1: validation), per ``partition.mode``;
- ``groups``: the feature groups of feature-parallel training;
- ``write``: the shards and groups written as Parquet, and the manifest from their footers;
- ``checks``: what was written against what the split promises, and ``verify_pages``;
- ``job``: the passes in order, under the output's lock, published atomically.

This module re-exports the job's public names (and the few others the scoring job, the estimator and the
tests import from here), so ``from sparkml_dist.data.partition import partition`` reads as before the split.
"""

from sparkml_dist.data.features import is_feature_array, is_vector
from sparkml_dist.data.partition.assign import BUCKET_BYTES, MAX_SUGGESTED_CLASSES, _apportion
from sparkml_dist.data.partition.checks import verify_pages
from sparkml_dist.data.partition.columns import column_roles, feature_expr, summarize_roles
from sparkml_dist.data.partition.common import (
    FEATURES_COL,
    MAX_DENSE_WIDTH,
    SHARD_COL,
    CorruptInputError,
    PartitionError,
    corrupt_file_error,
)
from sparkml_dist.data.partition.invalid import apply_invalid_policy, clean_invalid_row_error, valid_features
from sparkml_dist.data.partition.job import PARTITION_OUTPUT, PartitionResult, partition
from sparkml_dist.data.partition.read import list_input, read_parquet_checked

__all__ = [
    "BUCKET_BYTES",
    "FEATURES_COL",
    "MAX_DENSE_WIDTH",
    "MAX_SUGGESTED_CLASSES",
    "PARTITION_OUTPUT",
    "SHARD_COL",
    "CorruptInputError",
    "PartitionError",
    "PartitionResult",
    "_apportion",
    "apply_invalid_policy",
    "clean_invalid_row_error",
    "column_roles",
    "corrupt_file_error",
    "feature_expr",
    "is_feature_array",
    "is_vector",
    "list_input",
    "partition",
    "read_parquet_checked",
    "summarize_roles",
    "valid_features",
    "verify_pages",
]
