"""Issue 32 (data safety, round 3), items 6, 10 and 11, the cases the counted sweep in test_adversarial.py
cannot write with pyarrow alone: Spark ML vector columns (a null vector in one row, a vector 2^31 wide), a
model refused at training start, an output whose parent is immutable, and the LIBSVM line rules themselves.
Each refusal is one line naming the value and the fix, within 30 s, with nothing published.
Costs: about 30 s on the 2-core CI machine."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sparkml_dist.config import load_config
from sparkml_dist.errors import UserError
from sparkml_dist.partition import partition

QUICK_S = 30
ROWS = 60


def _vector_input(spark, root: Path, make_vector) -> Path:
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import types as T

    schema = T.StructType(
        [
            T.StructField("row_id", T.LongType()),
            T.StructField("features", VectorUDT()),
            T.StructField("label", T.IntegerType()),
        ]
    )
    rows = [(i, make_vector(i), i % 2) for i in range(ROWS)]
    raw = root / "raw"
    spark.createDataFrame(rows, schema).coalesce(1).write.parquet(str(raw))
    return raw


def _refused(spark, root: Path, raw: Path, *sets: str) -> str:
    out = root / "out"
    cfg = load_config(None, [f"paths.work_dir={root}", f"data.input_url=file://{raw}",
                             f"partition.output_url=file://{out}", "partition.num_shards=2", *sets])  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        partition(spark, cfg)
    assert time.monotonic() - t0 < QUICK_S
    assert sorted(p.name for p in root.iterdir()) == ["raw"], "something was published or left beside the output"
    text = str(err.value)
    assert "\n" not in text and "Exception" not in text, text
    return text


@pytest.mark.parametrize("layout", ["array", "sparse"])
def test_a_null_vector_in_one_row_is_named_by_row_id_not_a_java_stack(spark, tmp_path, layout):
    from pyspark.ml.linalg import Vectors

    raw = _vector_input(spark, tmp_path, lambda i: None if i == 7 else Vectors.sparse(10, [1, 3], [1.0, 2.0]))
    text = _refused(spark, tmp_path, raw, f"partition.feature_layout={layout}")
    assert "row_id 7 is invalid: its " in text and "'features' is null (no features at all)" in text, text
    assert "data.invalid_values=drop" in text


def test_a_vector_2_31_wide_is_refused_with_the_memory_it_would_take(spark, tmp_path):
    from pyspark.ml.linalg import Vectors

    raw = _vector_input(spark, tmp_path, lambda i: Vectors.sparse(2**31 - 1, [1, 2**31 - 2], [1.0, 2.0]))
    text = _refused(spark, tmp_path, raw, "partition.feature_layout=sparse")
    assert "2,147,483,648 parameters" in text and "32.0 GiB per rank" in text and "data.dimension" in text, text


def test_training_refuses_a_model_too_big_for_a_rank_before_any_run_or_task(spark, tmp_path):
    """A partition output made with the bound off (train.max_model_gib=0) is still checked when training starts:
    the model is counted on torch's meta device, nothing is allocated, no run is created."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparkml_dist.fit import run_training
    from sparkml_dist.model_size import ModelSizeError

    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"row_id": pa.array(range(ROWS), pa.int64()), "idx": [[1, 5]] * ROWS,
                             "val": [[1.0, 2.0]] * ROWS, "label": pa.array([i % 2 for i in range(ROWS)], pa.int32())}),
                   raw / "a.parquet")  # fmt: skip
    sets = [f"paths.work_dir={tmp_path}", f"data.input_url=file://{raw}", f"partition.output_url={tmp_path}/out",
            f"train.manifest_url={tmp_path}/out", "data.indices_col=idx", "data.values_col=val",
            "data.dimension=1000000000", "train.batch_size=8", "tracking.system_metrics_s=0"]  # fmt: skip
    partition(spark, load_config(None, [*sets, "train.max_model_gib=0"]))
    t0 = time.monotonic()
    with pytest.raises(ModelSizeError, match=r"1,000,000,001 parameters \(feature dimension 1,000,000,000 of file://"
                                             r".*14\.9 GiB per rank.*train\.max_model_gib=2"):  # fmt: skip
        run_training(spark, load_config(None, sets))
    assert time.monotonic() - t0 < QUICK_S
    assert not (tmp_path / "runs").exists()  # no run directory: nothing started


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
def test_an_output_whose_parent_is_immutable_is_refused_before_any_spark_job(spark, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw, parent = tmp_path / "raw", tmp_path / "locked"
    raw.mkdir()
    parent.mkdir()
    labels = pa.array([i % 2 for i in range(ROWS)], pa.int32())
    pq.write_table(pa.table({"row_id": pa.array(range(ROWS), pa.int64()), "f0": [0.5] * ROWS, "label": labels}),
                   raw / "a.parquet")  # fmt: skip
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem or user cannot set the immutable attribute")
    try:
        cfg = load_config(None, [f"paths.work_dir={tmp_path}", f"data.input_url=file://{raw}",
                                 f"partition.output_url=file://{parent / 'out'}"])  # fmt: skip
        jobs_before = len(spark.sparkContext.statusTracker().getJobIdsForGroup(None))
        t0 = time.monotonic()
        with pytest.raises(UserError, match=rf"partition\.output_url=file://{parent}/out: cannot create .*"
                                            r"\(Operation not permitted\).*directory you can write"):  # fmt: skip
            partition(spark, cfg)
        assert time.monotonic() - t0 < QUICK_S
        assert len(spark.sparkContext.statusTracker().getJobIdsForGroup(None)) == jobs_before  # no Spark job ran
        assert list(parent.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)


def test_libsvm_lines_are_judged_by_sparks_rules():
    from sparkml_dist.libsvm import line_error

    for good in ("1 1:0.5 3:2", "0", "-1.5e3 2:NaN 7:+Infinity", "1 3:1.0d  4:2", "1 2:0x1p3"):
        assert line_error(good, None) is None, good
    for bad, why in [
        ("1\t3:1.0", "label"),  # Spark splits on spaces only
        ("1 3:", "not index:value"),
        ("1 a:1", "not a 32-bit integer"),
        ("1 2147483648:1", "not a 32-bit integer"),
        ("1 3::1", "not a number"),
        ("1 0:1", "below 1"),
        ("1 3:1 3:2", "follows index 3"),
    ]:
        assert why in (line_error(bad, None) or ""), (bad, line_error(bad, None))
    assert "raise data.dimension to at least 9" in (line_error("1 9:1", 8) or "")
