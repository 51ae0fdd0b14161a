"""The partition manifest: the small value object every later stage reads instead of a directory scan.

Pure Python (no pyspark, no torch): executors, the loader and the baselines all read it. An output
directory without ``_manifest.json`` is not a valid partition output and is refused.

What ``read_manifest`` verifies (cheaply: the manifest, a listing and every file's footer, no data pages):
the manifest's own SHA-256 (a hand edit of any field, e.g. a row count, is refused), that every listed
file exists with its recorded size, and that every file's footer holds the recorded rows and row groups.
Values inside data pages are covered by Parquet's page CRCs, which our writers set and Spark verifies
when it reads (see ``partition.READ_VERIFY``); pyarrow 14, and so Petastorm, does not verify them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from sparkml_dist.errors import UserError

log = logging.getLogger("sparkml_dist.manifest")  # its pre-move name: logging configs keep working

MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 2
"""2: the manifest carries its own checksum (1 did not; such outputs are re-partitioned, never trusted)."""
CHECKSUM_KEY = "checksum"


class ManifestError(UserError):
    """The partition output is missing, incomplete or changed since it was written."""


@dataclass(frozen=True)
class FileEntry:
    path: str
    """Relative to the manifest's directory."""
    bytes: int
    rows: int
    row_groups: int


@dataclass(frozen=True)
class ShardEntry:
    name: str
    """Directory relative to the root, e.g. 'train/shard=0' or 'validation'."""
    rows: int
    bytes: int
    files: list[FileEntry]

    @property
    def row_groups(self) -> int:
        return sum(f.row_groups for f in self.files)


@dataclass(frozen=True)
class FeatureGroup:
    group: int
    features: list[str]
    """Input feature names in this group, in order."""
    shards: list[ShardEntry]
    """The group's data for each sample shard (same rows, same order as the sample shard)."""
    sparse_index: list[int] | None = None
    """Sparse layout: the global feature indices the group holds, as [stride, offset, width]: the indices
    offset, offset + stride, ..., offset + (width - 1) x stride, global index i at local index
    (i - offset) / stride. Contiguous groups have stride 1 (an index range); hashed groups stride M (index i
    goes to group i mod M). ``features`` is then empty: a sparse space has no per-index names."""

    @property
    def num_features(self) -> int:
        return self.sparse_index[2] if self.sparse_index is not None else len(self.features)

    def global_indices(self) -> range:
        """The sparse group's global feature indices, in local order."""
        if self.sparse_index is None:
            raise ValueError("global_indices is for sparse feature groups")
        stride, offset, width = self.sparse_index
        return range(offset, offset + stride * width, stride)


@dataclass(frozen=True)
class SparseLayout:
    """The 'sparse' feature layout: per row, the feature indices (list<int>, ascending, each in
    0..dimension-1) and their values (list<float>, same length), never densified on the way."""

    dimension: int
    """Width of the feature space the indices live in (the model's input width)."""
    indices_col: str = "indices"
    values_col: str = "values"
    encoding: dict[str, Any] = field(default_factory=dict)
    """How the input's columns became the feature space (``features.Encoding.to_dict``): scoring applies
    exactly the same mapping."""


@dataclass(frozen=True)
class Manifest:
    root_url: str
    mode: str
    seed: int
    input_url: str
    input_fingerprint: str
    input_rows: int
    dropped_rows: int
    num_classes: int
    label_col: str
    row_id_col: str
    features_col: str | None
    """Name of the array column holding the features in the output ('array' layout), else None."""
    feature_names: list[str]
    """The feature names in model order (for the 'columns' layout, also the column names); for the sparse
    layout the input columns the feature space was built from, in order."""
    train: list[ShardEntry]
    validation: ShardEntry
    feature_groups: list[FeatureGroup] = field(default_factory=list)
    schema: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION
    columns: dict[str, str] = field(default_factory=dict)
    """Every input column and what became of it (label, row key, feature, categorical, ignored, not used)."""
    sparse: SparseLayout | None = None
    """Set for the sparse layout (``partition.feature_layout=sparse``): then ``features_col`` is None and the
    shards hold ``sparse.indices_col`` and ``sparse.values_col`` instead of feature columns."""
    input_files: list[list] = field(default_factory=list)
    """[relative path, size, mtime, content digest] of every input file (``fingerprint.FileDigest``): what
    ``input_fingerprint`` was computed from, and what a re-run reuses for files that did not change."""

    @property
    def num_shards(self) -> int:
        return len(self.train)

    @property
    def num_features(self) -> int:
        """The model's input width: the sparse layout's dimension, else the number of feature names."""
        return self.sparse.dimension if self.sparse is not None else len(self.feature_names)

    @property
    def fingerprint(self) -> str:
        """Identifies this partition output: input fingerprint + partition settings + file list."""
        body = json.dumps(
            [self.input_fingerprint, self.mode, self.seed, [asdict(s) for s in self.train]], sort_keys=True
        )
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def shard_url(self, shard: ShardEntry) -> str:
        return f"{self.root_url.rstrip('/')}/{shard.name}"

    def file_urls(self, shard: ShardEntry) -> list[str]:
        return [f"{self.root_url.rstrip('/')}/{f.path}" for f in shard.files]

    def to_json(self) -> str:
        body = asdict(self)
        return json.dumps({**body, CHECKSUM_KEY: _checksum(body)}, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, root_url: str | None = None) -> Manifest:
        """Parse a manifest and check its checksum; ``root_url`` (where it was read) replaces the recorded one."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ManifestError(f"the manifest is not valid JSON ({exc}): re-run jobs/partition.py") from exc
        if not isinstance(raw, dict) or raw.get("version") != MANIFEST_VERSION:
            version = raw.get("version") if isinstance(raw, dict) else None
            raise ManifestError(
                f"manifest version {version} is not {MANIFEST_VERSION} (it predates manifest checksums): "
                "re-run jobs/partition.py"
            )
        recorded = raw.pop(CHECKSUM_KEY, None)
        if recorded != _checksum(raw):
            raise ManifestError(
                f"{MANIFEST_NAME} of {root_url or raw.get('root_url')} does not match its own checksum (recorded "
                f"{recorded!r}): it was edited or damaged after partition wrote it; re-run jobs/partition.py"
            )

        def shard(d: dict[str, Any]) -> ShardEntry:
            return ShardEntry(d["name"], d["rows"], d["bytes"], [FileEntry(**f) for f in d["files"]])

        raw["train"] = [shard(s) for s in raw["train"]]
        raw["validation"] = shard(raw["validation"])
        raw["feature_groups"] = [
            FeatureGroup(g["group"], g["features"], [shard(s) for s in g["shards"]], g.get("sparse_index"))
            for g in raw["feature_groups"]
        ]
        if raw.get("sparse") is not None:
            raw["sparse"] = SparseLayout(**raw["sparse"])
        if root_url is not None:
            raw["root_url"] = root_url
        return cls(**raw)

    def all_shards(self) -> list[ShardEntry]:
        return [*self.train, self.validation] + [s for g in self.feature_groups for s in g.shards]


def _checksum(body: dict[str, Any]) -> str:
    """SHA-256 of the manifest's fields (less root_url, which follows the directory if it is moved)."""
    canonical = json.dumps({k: v for k, v in body.items() if k != "root_url"}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def manifest_files(text: str) -> set[str] | None:
    """Relative paths of the files a manifest (any version) lists; None if ``text`` is not a manifest.
    (``outputs.OutputKind.owned`` of the partition output: what a re-run may replace.)"""
    try:
        raw = json.loads(text)
        shards = [*raw["train"], raw["validation"]] + [s for g in raw.get("feature_groups", []) for s in g["shards"]]
        return {str(f["path"]) for s in shards for f in s["files"]}
    except (ValueError, KeyError, TypeError):
        return None


def feature_names_digest(names: list[str]) -> str:
    """Identifies an ordered feature list (for a run tag that fits whatever the number of features)."""
    return hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]


FEATURE_NAMES_TAG = "feature_names"
"""Run tag: the model's input feature names in order, as JSON (only when it fits an MLflow tag)."""
FEATURE_DIGEST_TAG = "feature_names_digest"
"""Run tag: ``feature_names_digest`` of the model's input feature names in order."""
MANIFEST_URL_TAG = "manifest_url"
"""Run tag: the partition output the model was trained on."""
_MAX_TAG_CHARS = 5000


def feature_tags(manifest: Manifest) -> dict[str, str]:
    """Run tags that let scoring pick a model's input columns by name (the training job sets them)."""
    tags = {
        FEATURE_DIGEST_TAG: feature_names_digest(manifest.feature_names),
        MANIFEST_URL_TAG: manifest.root_url,
    }
    names = json.dumps(manifest.feature_names)
    if len(names) <= _MAX_TAG_CHARS:
        tags[FEATURE_NAMES_TAG] = names
    return tags


_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3"}
"""Hadoop's names for S3 (what Spark writes in URLs) -> pyarrow's."""
_BUCKET_SCHEMES = ("s3", "gs", "gcs")
"""Object stores whose pyarrow path is ``bucket/key``."""
_HOST_SCHEMES = ("hdfs",)
"""Filesystems whose pyarrow path is the URL's path (``/a/b``); the authority names the namenode."""


def arrow_fs(url: str) -> tuple[Any, str]:
    """pyarrow filesystem and path for ``url``: local paths, ``file:``, ``hdfs://``, ``s3://`` (``s3a://``,
    ``s3n://``), ``gs://``; any other scheme through ``FileSystem.from_uri``. Unlike ``from_uri`` it takes paths
    with spaces and other characters a URI must escape (``file:///data/my set``). The one URL -> filesystem
    helper of the project (manifest checks, the Arrow reader): one filesystem per scheme and authority is built
    and reused, since building an S3 filesystem resolves the bucket's region over the network."""
    from pyarrow import fs as pafs

    url = url.rstrip("/") or url
    if url.startswith("file://"):
        return pafs.LocalFileSystem(), url[len("file://") :] or "/"
    if url.startswith("file:"):
        return pafs.LocalFileSystem(), url[len("file:") :]
    if "://" not in url:
        return pafs.LocalFileSystem(), url
    scheme, rest = url.split("://", 1)
    scheme = _SCHEME_ALIASES.get(scheme.lower(), scheme.lower())
    authority, _, path = rest.partition("/")
    if "?" in rest:  # options in the URL (region=, endpoint_override= ...): pyarrow reads them
        return pafs.FileSystem.from_uri(f"{scheme}://{quote(rest, safe='/:@?&=%+,;~')}")
    if scheme in _BUCKET_SCHEMES:
        return _filesystem(scheme, authority), unquote(f"{authority}/{path}".rstrip("/"))
    if scheme in _HOST_SCHEMES:
        return _filesystem(scheme, authority), unquote(f"/{path}")
    return pafs.FileSystem.from_uri(f"{scheme}://{quote(rest, safe='/:@?&=%+,;~')}")


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, authority: str) -> Any:
    """The pyarrow filesystem of ``scheme://authority`` (built once per process)."""
    from pyarrow import fs as pafs

    return pafs.FileSystem.from_uri(f"{scheme}://{quote(authority, safe=':@')}/")[0]


def read_manifest(root_url: str, verify: bool = True) -> Manifest:
    """Load and (by default) verify a partition output's manifest with pyarrow's filesystem layer.

    The manifest's checksum is always checked. Verification also checks that every listed file still
    exists with the recorded size and that its footer holds the recorded rows and row groups, so a
    manifest whose files were deleted, rewritten or swapped since is refused instead of silently
    training on other data.
    """
    from pyarrow import fs as pafs

    root_url = root_url.rstrip("/")
    filesystem, root = arrow_fs(root_url)
    info = filesystem.get_file_info(f"{root}/{MANIFEST_NAME}")
    if info.type == pafs.FileType.NotFound:
        what = filesystem.get_file_info(root).type
        hint = (
            "it does not exist"
            if what == pafs.FileType.NotFound
            else "it has no _manifest.json, so it is not a complete partition output"
        )
        raise ManifestError(f"{root_url} is not a partition output: {hint}. Run jobs/partition.py first.")
    with filesystem.open_input_stream(f"{root}/{MANIFEST_NAME}") as f:
        manifest = Manifest.from_json(f.read().decode("utf-8"), root_url=root_url)
    if verify:
        verify_files(manifest)
    return manifest


def verify_files(manifest: Manifest, footers: bool = True) -> None:
    """Every listed file exists with its recorded size and (``footers``) its footer's rows and row groups."""
    from pyarrow import fs as pafs

    filesystem, root = arrow_fs(manifest.root_url)
    shards = manifest.all_shards()
    for s in shards:
        if s.rows != sum(f.rows for f in s.files) or s.bytes != sum(f.bytes for f in s.files):
            raise ManifestError(f"{manifest.root_url}: shard {s.name} totals disagree with its files; re-run partition")
    entries = [f for s in shards for f in s.files]
    infos = filesystem.get_file_info([f"{root}/{f.path}" for f in entries])
    for entry, info in zip(entries, infos, strict=True):
        if info.type == pafs.FileType.NotFound:
            raise ManifestError(
                f"{manifest.root_url}: file {entry.path} listed in the manifest is missing; "
                "the output was changed after it was written: re-run jobs/partition.py"
            )
        if info.size != entry.bytes:
            raise ManifestError(
                f"{manifest.root_url}: file {entry.path} has {info.size} bytes, the manifest says {entry.bytes}; "
                "the output was changed after it was written: re-run jobs/partition.py"
            )
    if footers:
        verify_footers(manifest, filesystem, root, entries)


def verify_footers(manifest: Manifest, filesystem: Any, root: str, entries: list[FileEntry]) -> None:
    """Read every file's Parquet footer (in threads, no data) and compare rows and row groups."""
    import pyarrow.parquet as pq

    def footer(entry: FileEntry) -> tuple[int, int] | str:
        try:
            with filesystem.open_input_file(f"{root}/{entry.path}") as f:
                meta = pq.ParquetFile(f).metadata
                return meta.num_rows, meta.num_row_groups
        except Exception as exc:  # noqa: BLE001 (ArrowInvalid, OSError ...: all mean the footer is unreadable)
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=16) as pool:
        found = list(pool.map(footer, entries))
    for entry, got in zip(entries, found, strict=True):
        if isinstance(got, str):
            raise ManifestError(
                f"{manifest.root_url}: file {entry.path} has an unreadable Parquet footer ({got[:200]}); "
                "the output was damaged after it was written: re-run jobs/partition.py"
            )
        if got != (entry.rows, entry.row_groups):
            raise ManifestError(
                f"{manifest.root_url}: file {entry.path} holds {got[0]} rows in {got[1]} row groups, the manifest "
                f"says {entry.rows} in {entry.row_groups}; the output was changed after it was written: "
                "re-run jobs/partition.py"
            )
