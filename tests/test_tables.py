"""Real tables in (issue 16, first part): Spark ML vector columns go in, and auto mode never leaves a column
out silently (strings, a column beside the features array): it names them and the settings that use them
or leave them out on purpose; booleans are features (0/1). Real local Spark, the partition job's command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import partition as partition_job
from jobs._cli import run_cli
from sparkml_dist.errors import EXIT_USER_ERROR
from sparkml_dist.manifest import read_manifest


def _argv(root: Path, src: Path, out: str, *sets: str) -> list[str]:
    argv = ["--set", f"paths.work_dir={root}", "--set", "partition.num_shards=2", "--set", f"data.input_url={src}"]
    argv += ["--set", f"partition.output_url={root / out}"]
    for s in sets:
        argv += ["--set", s]
    return argv


def _refused(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        run_cli(partition_job.main, argv)
    err = capsys.readouterr().err
    assert done.value.code == EXIT_USER_ERROR, err
    return err


def _partitioned_features(out: Path) -> dict[int, list[float]]:
    table = pq.read_table(out, columns=["row_id", "features"])
    return dict(zip(table.column("row_id").to_pylist(), table.column("features").to_pylist(), strict=True))


def test_a_vector_assembler_output_trains_as_its_vector(spark, tmp_path: Path) -> None:
    from pyspark.ml.feature import VectorAssembler
    from pyspark.ml.functions import vector_to_array

    n = 400
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(n), np.where(np.arange(n) % 3 == 0, 0.0, rng.standard_normal(n))
    rows = [(i, float(a[i]), float(b[i]), 0.0, 0.0, 0.0, 0.0, i % 2) for i in range(n)]  # zeros: sparse rows
    schema = "row_id long, a double, b double, z0 double, z1 double, z2 double, z3 double, label long"
    df = spark.createDataFrame(rows, schema)
    inputs = ["a", "b", "z0", "z1", "z2", "z3"]
    assembled = VectorAssembler(inputCols=inputs, outputCol="features").transform(df)
    src = tmp_path / "assembled"
    assembled.select("row_id", "features", "label").write.parquet(f"file://{src}")
    expected = {
        r["row_id"]: r["v"] for r in assembled.select("row_id", vector_to_array("features").alias("v")).collect()
    }
    assert any(type(r["features"]).__name__ == "SparseVector" for r in assembled.select("features").collect())

    done = partition_job.main(_argv(tmp_path, src, "out-auto"))  # auto mode: the `features` vector
    manifest = read_manifest(f"file://{tmp_path / 'out-auto'}")
    assert manifest.feature_names == [f"features_{i}" for i in range(6)]
    assert manifest.columns == {"row_id": "row key", "features": "feature", "label": "label"}
    assert done["input_rows"] == n and done["dropped_rows"] == 0
    got = _partitioned_features(tmp_path / "out-auto" / "train") | _partitioned_features(
        tmp_path / "out-auto" / "validation"
    )
    assert got.keys() == expected.keys()
    assert all(np.allclose(got[k], expected[k], atol=1e-6) for k in got)

    # named explicitly under another name, next to other columns (left out on purpose by naming it)
    renamed = tmp_path / "renamed"
    assembled.withColumnRenamed("features", "vec").write.parquet(f"file://{renamed}")
    partition_job.main(_argv(tmp_path, renamed, "out-named", "data.features_col=vec"))
    assert read_manifest(f"file://{tmp_path / 'out-named'}").feature_names == [f"vec_{i}" for i in range(6)]


def test_auto_mode_names_every_column_it_would_leave_out(spark, tmp_path: Path, capsys) -> None:
    n = 200
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "row_id": pa.array(np.arange(n, dtype=np.int64)),
            "x": pa.array(rng.standard_normal(n)),
            "city": pa.array([f"c{i % 5}" for i in range(n)]),
            "member": pa.array([i % 2 == 0 for i in range(n)]),
            "label": pa.array(np.arange(n, dtype=np.int64) % 2),
        }
    )
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    pq.write_table(table, mixed / "part-0.parquet")
    err = _refused(_argv(tmp_path, mixed, "out-mixed"), capsys)
    # a boolean is a feature (0/1); the string is named, with the settings that use or leave it out
    assert "city (string)" in err and "member" not in err.split("would be left out")[0], err
    assert "data.feature_cols" in err and "data.categorical_cols" in err and "data.ignore_cols" in err, err
    assert not (tmp_path / "out-mixed").exists()
    partition_job.main(_argv(tmp_path, mixed, "out-x", "data.feature_cols=[x]"))  # on purpose: trains on x
    assert read_manifest(f"file://{tmp_path / 'out-x'}").feature_names == ["x"]
    partition_job.main(_argv(tmp_path, mixed, "out-ignored", "data.ignore_cols=[city]"))
    ignored = read_manifest(f"file://{tmp_path / 'out-ignored'}")
    assert ignored.feature_names == ["x", "member"] and ignored.columns["city"] == "ignored (data.ignore_cols)"
    values = pq.read_table(tmp_path / "out-ignored" / "train").column("features").to_pylist()
    assert {v[1] for v in values} == {0.0, 1.0}

    beside = tmp_path / "beside"
    beside.mkdir()
    features = pa.array([list(v) for v in rng.standard_normal((n, 3))], pa.list_(pa.float32()))
    pq.write_table(table.select(["row_id", "x", "label"]).append_column("features", features), beside / "p.parquet")
    err = _refused(_argv(tmp_path, beside, "out-beside"), capsys)
    assert "x (double)" in err and "data.features_col=features" in err, err
    partition_job.main(_argv(tmp_path, beside, "out-arr", "data.features_col=features"))
    assert len(read_manifest(f"file://{tmp_path / 'out-arr'}").feature_names) == 3
