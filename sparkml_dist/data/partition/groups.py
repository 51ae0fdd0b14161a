"""Feature groups (``partition.feature_groups``, for feature-parallel training): which features each group
holds, by name (dense) or as index ranges (sparse).
"""

from __future__ import annotations

import hashlib

from sparkml_dist.config import PartitionConfig
from sparkml_dist.data.partition.common import PartitionError


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
