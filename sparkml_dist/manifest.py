"""The partition manifest: the small value object every later stage reads instead of a directory scan.

Pure Python (no pyspark, no torch): executors, the loader and the baselines all read it. An output
directory without ``_manifest.json`` is not a valid partition output and is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from sparkml_dist.errors import UserError

MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 1


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
    """The feature names in model order (for the 'columns' layout, also the column names)."""
    train: list[ShardEntry]
    validation: ShardEntry
    feature_groups: list[FeatureGroup] = field(default_factory=list)
    schema: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @property
    def num_shards(self) -> int:
        return len(self.train)

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

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
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, root_url: str | None = None) -> Manifest:
        raw = json.loads(text)
        if raw.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"manifest version {raw.get('version')} is not {MANIFEST_VERSION}: re-run partition")

        def shard(d: dict[str, Any]) -> ShardEntry:
            return ShardEntry(d["name"], d["rows"], d["bytes"], [FileEntry(**f) for f in d["files"]])

        raw["train"] = [shard(s) for s in raw["train"]]
        raw["validation"] = shard(raw["validation"])
        raw["feature_groups"] = [
            FeatureGroup(g["group"], g["features"], [shard(s) for s in g["shards"]]) for g in raw["feature_groups"]
        ]
        if root_url is not None:
            raw["root_url"] = root_url
        return cls(**raw)


def read_manifest(root_url: str, verify: bool = True) -> Manifest:
    """Load and (by default) verify a partition output's manifest with pyarrow's filesystem layer.

    Verification checks that every listed file still exists with the recorded size, so a manifest whose
    files were deleted or rewritten since is refused instead of silently training on other data.
    """
    from pyarrow import fs as pafs

    root_url = root_url.rstrip("/")
    filesystem, root = pafs.FileSystem.from_uri(root_url)
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


def verify_files(manifest: Manifest) -> None:
    from pyarrow import fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(manifest.root_url)
    shards = [*manifest.train, manifest.validation] + [s for g in manifest.feature_groups for s in g.shards]
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
