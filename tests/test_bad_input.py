"""Bad input and bad setup: a clear error naming the value and the fix, within 30 s, no complete-looking
output, earlier good output untouched. docs/bad-input.md lists every case and the test that covers it
(rows already covered in test_partition/test_loader/test_launch/test_train are not repeated here).
Costs: about 60 s on the 2-core CI machine (one small good partition output, then fast failures).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparkml_dist.config import GenerateConfig, SparkConfig, load_config
from sparkml_dist.fit import run_training
from sparkml_dist.manifest import MANIFEST_NAME, ManifestError, read_manifest
from sparkml_dist.partition import PartitionError, partition
from sparkml_dist.session import build_spark_session
from sparkml_dist.synthetic import write_dataset
from sparkml_dist.tracking import TrackingError

QUICK_S = 30


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def good(spark, tmp_path_factory):
    """A good input and a good partition output written from it, to be left untouched by bad runs."""
    root = tmp_path_factory.mktemp("bad-input")
    raw = root / "raw"
    write_dataset(spark, GenerateConfig(output_url=f"file://{raw}", rows=800, features=3, partitions=2, seed=5))
    sets = [f"paths.work_dir={root}", f"data.input_url=file://{raw}", f"partition.output_url={root}/out"]
    partition(spark, load_config(None, sets))
    return root, raw, sets


def _copy_input(raw: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in raw.glob("*.parquet"):
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _corrupt(raw: Path, dst: Path) -> str:
    d = _copy_input(raw, dst)
    (d / "part-99999-corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    return "part-99999-corrupt.parquet is not a readable Parquet file"


def _drift(raw: Path, dst: Path) -> str:
    d = _copy_input(raw, dst)
    table = pq.read_table(next(raw.glob("*.parquet")))
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(["x"] * len(table)))
    pq.write_table(table, d / "part-99999-drift.parquet")
    return "schema drift in data.input_url: part-99999-drift.parquet differs"


@pytest.mark.parametrize("make", [_corrupt, _drift], ids=["corrupt-parquet", "schema-drift"])
def test_bad_input_files_are_named_before_any_job_and_good_output_is_untouched(spark, good, tmp_path, make):
    root, raw, sets = good
    before = _snapshot(root / "out")
    expected = make(raw, tmp_path / "in")
    started = time.monotonic()
    with pytest.raises(PartitionError) as err:
        partition(spark, load_config(None, [*sets, f"data.input_url=file://{tmp_path}/in"]))
    assert expected in str(err.value) and "move it out of data.input_url" in str(err.value)
    assert time.monotonic() - started < QUICK_S
    assert _snapshot(root / "out") == before
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("out")) == ["out"]


def test_too_few_row_groups_per_shard_is_refused_and_good_output_is_untouched(spark, good):
    root, _, sets = good
    before = _snapshot(root / "out")
    with pytest.raises(PartitionError, match=r"fewer row groups than partition.min_row_groups=500.*row_group_mb"):
        partition(spark, load_config(None, [*sets, "partition.min_row_groups=500"]))
    assert _snapshot(root / "out") == before
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("out")) == ["out"]


def test_manifest_whose_file_changed_size_is_refused(spark, good, tmp_path):
    root, raw, sets = good
    out = tmp_path / "changed"
    partition(spark, load_config(None, [*sets, f"partition.output_url={out}"]))
    victim = next((out / "train" / "shard=0").glob("*.parquet"))
    victim.write_bytes(victim.read_bytes() + b"appended")
    with pytest.raises(ManifestError, match=r"has \d+ bytes, the manifest says \d+.*re-run jobs/partition.py"):
        read_manifest(f"file://{out}")


def test_unreachable_mlflow_fails_before_training_quickly(spark, good):
    root, _, sets = good
    port = _free_port()
    cfg = load_config(
        None,
        [
            *sets,
            f"train.manifest_url={root}/out",
            "train.batch_size=64",
            f"tracking.tracking_uri=http://127.0.0.1:{port}",
        ],
    )
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"tracking.tracking_uri='http://127.0.0.1:{port}' is unreachable"):
        run_training(spark, cfg)
    assert time.monotonic() - started < QUICK_S
    assert not (root / "runs").exists()  # no run directory, no checkpoint: nothing started


def test_wrong_spark_master_fails_fast():
    port = _free_port()
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"spark://127.0.0.1:{port}.*no standalone master answered"):
        build_spark_session(SparkConfig(master=f"spark://127.0.0.1:{port}"))
    with pytest.raises(ValueError, match=r"'sprak://x:7077' is not a Spark master URL: use local\[N\]"):
        build_spark_session(SparkConfig(master="sprak://x:7077"))
    assert time.monotonic() - started < QUICK_S


def test_no_manifest_is_left_by_any_failed_partition(good):
    root, _, _ = good
    # every failure above went through the same atomic writer: only the good output has a manifest
    assert [p.parent.name for p in root.rglob(MANIFEST_NAME)] == ["out"]
