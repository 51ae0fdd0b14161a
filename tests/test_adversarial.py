"""An adversarial sweep, counted (issue 19 section 7): every case must end in under 30 s with an error that
names the problem, and publish nothing (no manifest, no half-written output beside the target).

Two families: every config field of every section set to a value of the wrong type (parsed, so no Spark:
milliseconds each), and hostile input tables through the real partition job on local Spark (NaN, inf and
null in features and labels, wrong types, empty files, duplicate row ids, a hand-edited manifest, ...).
The README's reliability section reports the count and the slowest case, measured by this file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparkml_dist.config import ConfigError, JobConfig, load_config
from sparkml_dist.errors import UserError
from sparkml_dist.manifest import MANIFEST_NAME, ManifestError, read_manifest
from sparkml_dist.partition import partition

QUICK_S = 30.0


def _wrong_value(tp: Any) -> str | None:
    """A --set value of the wrong type for a field of type ``tp`` (None: the field takes anything)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _wrong_value(inner[0]) if len(inner) == 1 else "{a: [1]}"
    if origin is Literal:
        return "not-one-of-the-choices"
    if origin is list:
        return "{a: 1}"
    if origin is dict:
        return "[1, 2]"
    if tp is bool:
        return "maybe"
    if tp in (int, float):
        return "twelve"
    if tp is str:
        return "[1, 2]"
    return None


def _config_cases() -> list[tuple[str, str]]:
    cases = []
    for section in dataclasses.fields(JobConfig):
        cls = typing.get_type_hints(JobConfig)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            wrong = _wrong_value(hints[f.name])
            if wrong is not None:
                cases.append((f"{section.name}.{f.name}", wrong))
    return cases


CONFIG_CASES = _config_cases()


@pytest.mark.parametrize(("key", "value"), CONFIG_CASES, ids=[k for k, _ in CONFIG_CASES])
def test_every_config_field_with_a_wrong_type_is_refused_naming_it(key, value):
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={value}"])
    assert key in str(err.value), str(err.value)
    assert time.monotonic() - t0 < QUICK_S


ROWS = 200


def _table(**changes: Any) -> pa.Table:
    rng = np.random.default_rng(3)
    cols: dict[str, Any] = {
        "row_id": pa.array(np.arange(ROWS, dtype=np.int64)),
        "f0": pa.array(rng.normal(size=ROWS).astype(np.float32)),
        "f1": pa.array(rng.normal(size=ROWS).astype(np.float32)),
        "label": pa.array((np.arange(ROWS) % 2).astype(np.int32)),
    }
    cols.update(changes)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def _with(col: str, index: int, value: Any, dtype: Any = None) -> pa.Array:
    base = _table().column(col).to_pylist()
    base[index] = value
    return pa.array(base, type=dtype or _table().schema.field(col).type)


# (id, files to write: name -> table or raw bytes, extra --set values, what the error must name)
DATA_CASES: list[tuple[str, dict[str, Any], tuple[str, ...], str]] = [
    ("nan-feature", {"a.parquet": _table(f0=_with("f0", 7, math.nan))}, (), r"f0|NaN|finite"),
    ("inf-feature", {"a.parquet": _table(f1=_with("f1", 9, math.inf))}, (), r"f1|inf|finite"),
    ("null-feature", {"a.parquet": _table(f0=_with("f0", 3, None))}, (), r"f0|null"),
    ("null-label", {"a.parquet": _table(label=_with("label", 5, None))}, (), r"label|null"),
    ("negative-label", {"a.parquet": _table(label=_with("label", 5, -1))}, (), r"label|-1|class"),
    ("label-out-of-range", {"a.parquet": _table(label=_with("label", 5, 7))}, (), r"label|7|num_classes"),
    ("float-label", {"a.parquet": _table(label=pa.array(np.full(ROWS, 0.5)))}, (), r"label.*double|integer"),
    ("string-label", {"a.parquet": _table(label=pa.array(["yes"] * ROWS))}, (), r"label.*string|integer"),
    ("nan-label-regression", {"a.parquet": _table(label=pa.array([math.nan] + [1.0] * (ROWS - 1)))},
     ("data.task=regression",), r"label|NaN|finite"),
    ("string-feature", {"a.parquet": _table(f1=pa.array(["x"] * ROWS))}, (), r"f1|string"),
    ("string-row-id", {"a.parquet": _table(row_id=pa.array([str(i) for i in range(ROWS)]))}, (), r"row_id"),
    ("duplicate-row-ids", {"a.parquet": _table(row_id=pa.array(np.zeros(ROWS, dtype=np.int64)))}, (),
     r"duplicate|row_id"),
    ("no-label-column", {"a.parquet": _table(label=None)}, (), r"label"),
    ("empty-file", {"a.parquet": b""}, (), r"a\.parquet"),
    ("not-parquet", {"a.parquet": b"PAR1 this is not parquet"}, (), r"a\.parquet"),
    ("stray-csv", {"a.parquet": _table(), "b.csv": b"x,y\n1,2\n"}, (), r"b\.csv"),
    ("no-rows", {"a.parquet": _table().slice(0, 0)}, (), r"empty|no rows|0 rows|rows"),
    ("schema-drift", {"a.parquet": _table(), "b.parquet": _table(f1=pa.array(["x"] * ROWS))}, (), r"f1|b\.parquet"),
    ("empty-directory", {}, (), r"empty|no data files"),
    ("unknown-ignore-col", {"a.parquet": _table()}, ("data.ignore_cols=[nope]",), r"nope"),
    ("missing-feature-col", {"a.parquet": _table()}, ("data.feature_cols=[f0, f9]",), r"f9"),
    ("too-many-shards", {"a.parquet": _table()}, ("partition.num_shards=500",), r"shard|num_shards"),
]  # fmt: skip


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("adversarial")


def _partition_refused(spark, case, files, sets) -> tuple[pytest.ExceptionInfo, float]:
    """Write ``files`` (bytes, or Arrow tables as Parquet) under ``case``/raw and partition them into ``case``/out,
    which must raise a UserError; returns it and the seconds it took."""
    raw, out = case / "raw", case / "out"
    raw.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (raw / name).write_bytes(content)
        else:
            pq.write_table(content, raw / name)
    cfg = load_config(None, [f"paths.work_dir={case}", f"data.input_url=file://{raw}",
                             f"partition.output_url=file://{out}", "partition.num_shards=2", *sets])  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        partition(spark, cfg)
    return err, time.monotonic() - t0


@pytest.mark.parametrize(("files", "sets", "names"), [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_hostile_input_tables_fail_fast_naming_the_problem_and_publish_nothing(spark, sweep_dir, request, files,
                                                                               sets, names):  # fmt: skip
    case = sweep_dir / request.node.callspec.id
    err, elapsed = _partition_refused(spark, case, files, sets)
    out = case / "out"
    assert re.search(names, str(err.value), re.IGNORECASE), str(err.value)
    assert elapsed < QUICK_S, elapsed
    assert not out.exists(), sorted(p.name for p in case.iterdir())
    assert not [p.name for p in case.iterdir() if p.name.startswith("out.")], "a half-written sibling was left"


def test_a_hand_edited_manifest_is_refused_and_not_trained_on(spark, sweep_dir):
    raw, out = sweep_dir / "edited" / "raw", sweep_dir / "edited" / "out"
    raw.mkdir(parents=True)
    pq.write_table(_table(), raw / "a.parquet")
    partition(spark, load_config(None, [f"paths.work_dir={sweep_dir / 'edited'}", f"data.input_url=file://{raw}",
                                        f"partition.output_url=file://{out}", "partition.num_shards=2"]))  # fmt: skip
    path = Path(out) / MANIFEST_NAME
    body = json.loads(path.read_text())
    body["input_rows"] += 1  # a plausible edit
    path.write_text(json.dumps(body))
    t0 = time.monotonic()
    with pytest.raises(ManifestError, match="checksum"):
        read_manifest(f"file://{out}")
    assert time.monotonic() - t0 < QUICK_S


def test_a_file_rewritten_behind_its_hadoop_checksum_is_named_with_its_crc_file(spark, sweep_dir):
    """Noticed while testing fingerprints: a Parquet file rewritten in place by another tool, its Hadoop
    ``.crc`` side file left as it was, failed with Spark's raw ChecksumException."""
    from sparkml_dist.config import GenerateConfig
    from sparkml_dist.synthetic import write_dataset

    raw, out = sweep_dir / "crc" / "raw", sweep_dir / "crc" / "out"
    write_dataset(spark, GenerateConfig(output_url=f"file://{raw}", rows=400, features=3, partitions=1, seed=2))
    victim = sorted(raw.glob("part-*.parquet"))[0]
    pq.write_table(pq.read_table(victim).slice(1), victim)  # another tool rewrites it; the .crc stays
    cfg = load_config(None, [f"paths.work_dir={sweep_dir / 'crc'}", f"data.input_url=file://{raw}",
                             f"partition.output_url=file://{out}"])  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(UserError, match=rf"{victim.name} .*does not match its Hadoop checksum file .*\.crc"):
        partition(spark, cfg)
    assert time.monotonic() - t0 < QUICK_S and not out.exists()


# ------------------------------------------------------------------------------------------------------------
# Issue 32 (data safety, round 3), items 1-5, 7 and part of 12: config files, config values, concurrent
# writers and scoring categories the model never learned. Each case ends in a one-line error (or warning) that
# names the bad value and the fix, and publishes nothing.

ISSUE_32_CONFIG_CASES: list[tuple[str, str | None, tuple[str, ...], str]] = [
    ("yaml-duplicate-section", "train:\n  epochs: 2\ndata:\n  num_classes: 3\ntrain:\n  lr: 0.1\n", (),
     r"cfg\.yaml:5: key 'train' is given twice in one mapping \(lines 1 and 5\).*merge them"),
    ("yaml-duplicate-key", "train:\n  epochs: 2\n  epochs: 3\n", (), r"key 'epochs' is given twice.*lines 2 and 3"),
    ("yaml-tab", "train:\n\tepochs: 2\n", (), r"cfg\.yaml:2:1: a tab character.*replace it with spaces"),
    ("yaml-null-in-map", "data:\n  null_fill: {i1: }\n", (), r"data\.null_fill\[i1\] has no value"),
    ("config-is-a-directory", "DIR", (), r"is a directory, not a config file: give one of its files.*cfg\.yaml"),
    ("set-duplicate-key", None, ("spark.conf={a: '1', a: '2'}",), r"key 'a' is given twice"),
    ("work-dir-root", None, ("paths.work_dir=/",), r"paths\.work_dir='/' is the filesystem root"),
    ("work-dir-root-dotdot", None, ("paths.work_dir=/tmp/..",), r"filesystem root"),
    ("work-dir-empty", None, ("paths.work_dir=",), r"paths\.work_dir is empty"),
    ("work-dir-unset-variable", None, ("paths.work_dir=$SPARKML_DIST_NOT_SET_32/w",),
     r"uses \$SPARKML_DIST_NOT_SET_32, which is not set"),
    ("url-unset-variable", None, ("data.input_url=${SPARKML_DIST_NOT_SET_32}/raw",),
     r"data\.input_url=.*SPARKML_DIST_NOT_SET_32, which is not set"),
    ("experiment-100k-chars", None, ("tracking.experiment=" + "x" * 100_000,),
     r"tracking\.experiment=.*\(100000 characters\).*1 to 256"),
    ("max-unseen-fraction-above-1", None, ("score.max_unseen_fraction=1.5",), r"score\.max_unseen_fraction"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "sets", "names"), [c[1:] for c in ISSUE_32_CONFIG_CASES], ids=[c[0] for c in ISSUE_32_CONFIG_CASES]
)
def test_bad_config_files_and_values_are_one_line_naming_file_line_or_key(tmp_path, monkeypatch, text, sets, names):
    monkeypatch.delenv("SPARKML_DIST_NOT_SET_32", raising=False)
    path: Path | None = None
    if text is not None:
        (tmp_path / "cfg.yaml").write_text("train:\n  epochs: 1\n" if text == "DIR" else text)
        path = tmp_path if text == "DIR" else tmp_path / "cfg.yaml"
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_config(path, list(sets))
    assert re.search(names, str(err.value)), str(err.value)
    assert "\n" not in str(err.value) and time.monotonic() - t0 < QUICK_S


ISSUE_32_DATA_CASES: list[tuple[str, dict[str, Any], tuple[str, ...], str]] = [
    ("int64-label-above-2-32", {"a.parquet": _table(label=pa.array(np.where(np.arange(ROWS) == 7, 2**32 + 1, 1)))},
     (), r"4294967297 is no class id .*map the labels to 0\.\.K-1"),
    ("negative-labels-minus-one", {"a.parquet": _table(label=pa.array(np.where(np.arange(ROWS) % 2, 1, -1)))}, (),
     r"class ids start at 0.*-1/\+1 to 0/1"),
    ("output-is-root", {"a.parquet": _table()}, ("partition.output_url=file:///",), r"root"),
]  # fmt: skip


@pytest.mark.parametrize(("files", "sets", "names"), [c[1:] for c in ISSUE_32_DATA_CASES],
                         ids=[c[0] for c in ISSUE_32_DATA_CASES])  # fmt: skip
def test_issue_32_hostile_tables_fail_naming_the_fix_and_publish_nothing(spark, sweep_dir, request, files, sets, names):
    test_hostile_input_tables_fail_fast_naming_the_problem_and_publish_nothing(
        spark, sweep_dir, request, files, sets, names
    )


def _partition_sets(root: Path) -> list[str]:
    raw = root / "raw"
    if not raw.exists():
        raw.mkdir(parents=True)
        pq.write_table(_table(), raw / "a.parquet")
    return [f"paths.work_dir={root}", f"data.input_url=file://{raw}", f"partition.output_url=file://{root / 'out'}",
            "partition.num_shards=2"]  # fmt: skip


def test_a_second_partition_job_on_the_same_output_fails_naming_the_first_which_completes(
    spark, sweep_dir, monkeypatch
):
    """Two real partition jobs at once on one output_url (threads of one driver, the real Spark session): the
    second is refused naming the first's pid and host while the first holds the lock; the first publishes a
    complete output that verifies, and no lock or temporary sibling is left."""
    from sparkml_dist import storage
    from sparkml_dist.storage import OutputLockedError

    root = sweep_dir / "concurrent"
    sets = _partition_sets(root)
    first_publishing, second_done = threading.Event(), threading.Event()
    real_publish = storage.publish

    def held_publish(*args: Any) -> None:  # the first job waits here, lock held, until the second has run
        first_publishing.set()
        assert second_done.wait(QUICK_S), "the second job never finished"
        real_publish(*args)

    monkeypatch.setattr(storage, "publish", held_publish)
    outcome: dict[str, Any] = {}

    def first() -> None:
        try:
            outcome["first"] = partition(spark, load_config(None, sets))
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            outcome["first"] = exc
            first_publishing.set()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert first_publishing.wait(120), "the first job never reached its publish"
        t0 = time.monotonic()
        with pytest.raises(OutputLockedError) as err:
            partition(spark, load_config(None, [*sets, "partition.seed=8"]))
        assert time.monotonic() - t0 < QUICK_S
    finally:
        second_done.set()
        thread.join(120)
    text = str(err.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in text and "out.lock" in text, text
    assert not isinstance(outcome["first"], BaseException), outcome["first"]
    manifest = read_manifest(f"file://{root / 'out'}")  # complete, every file as listed
    assert manifest.input_rows == ROWS and manifest.config["partition"]["seed"] == 7
    assert sorted(p.name for p in root.iterdir()) == ["out", "raw"]


def test_a_lock_left_by_a_dead_job_is_taken_over_and_one_from_another_host_is_refused(spark, sweep_dir, caplog):
    from sparkml_dist.storage import OutputLockedError

    root = sweep_dir / "stale-lock"
    sets = _partition_sets(root)
    lock = root / "out.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(
        json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "2026-12-05T10:00:00+00:00"})
    )
    with caplog.at_level("WARNING", logger="sparkml_dist.storage"):
        partition(spark, load_config(None, sets))
    assert "taking over the lock of a job that is gone" in caplog.text and not lock.exists()
    read_manifest(f"file://{root / 'out'}")

    foreign = {"pid": 1, "host": "another-host.example", "since": "2026-12-05T10:00:00+00:00"}
    lock.write_text(json.dumps(foreign))
    before = {p.name: p.stat().st_mtime_ns for p in (root / "out").rglob("*")}
    t0 = time.monotonic()
    with pytest.raises(OutputLockedError, match=r"pid 1 on another-host\.example.*if that job is no longer running, "
                                                r"delete .*out\.lock"):  # fmt: skip
        partition(spark, load_config(None, [*sets, "partition.seed=9"]))
    assert time.monotonic() - t0 < QUICK_S
    assert json.loads(lock.read_text()) == foreign  # not ours to remove
    assert {p.name: p.stat().st_mtime_ns for p in (root / "out").rglob("*")} == before


@pytest.fixture(scope="module")
def categorical_models(spark, sweep_dir):
    """A model per categorical encoding, trained (in-process ranks) on a string column c1 of four values."""
    from sparkml_dist.fit import run_training

    models = {}
    rng = np.random.default_rng(5)
    c1 = np.array(["a", "b", "c", "d"])[rng.integers(0, 4, 400)]
    x = rng.normal(size=400)
    table = pa.table({"row_id": np.arange(400), "c1": c1, "x": x, "label": ((c1 == "a") | (x > 1)).astype(np.int32)})
    for encoding in ("vocabulary", "hash"):
        root = sweep_dir / f"model-{encoding}"
        (root / "raw").mkdir(parents=True)
        pq.write_table(table, root / "raw" / "a.parquet")
        sets = [f"paths.work_dir={root}", f"data.input_url=file://{root / 'raw'}",
                f"partition.output_url=file://{root / 'parts'}", f"train.manifest_url=file://{root / 'parts'}",
                "data.categorical_cols=[c1]", f"data.categorical_encoding={encoding}", "data.hash_buckets=64",
                "partition.num_shards=2", "train.batch_size=32", "train.epochs=1", "launch.backend=in_process",
                "tracking.system_metrics_s=0"]  # fmt: skip
        partition(spark, load_config(None, sets))
        models[encoding] = (root, sets, run_training(spark, load_config(None, sets)).model_uri)
    return models


def _score_table(root: Path, name: str, c1: pa.Array) -> Path:
    n = len(c1)
    path = root / name
    path.mkdir()
    pq.write_table(pa.table({"row_id": np.arange(n), "c1": c1, "x": np.zeros(n), "label": np.zeros(n, np.int32)}),
                   path / "a.parquet")  # fmt: skip
    return path


def _score_sets(model: tuple[Path, list[str], str], src: Path, out: Path, *extra: str) -> list[str]:
    root, sets, uri = model
    return [*sets, f"score.model_uri={uri}", f"score.input_url=file://{src}", f"score.output_url=file://{out}", *extra]


ISSUE_32_SCORE_CASES = [
    ("categorical-int-for-string", "vocabulary", pa.array(np.arange(50, dtype=np.int64)), (),
     r"categorical column 'c1' is bigint \(integer\), but the model learned it as string.*cast c1 to string"),
    ("categorical-int-for-string-hash", "hash", pa.array(np.arange(50, dtype=np.int64)), (),
     r"categorical column 'c1' is bigint.*learned it as string"),
    ("all-categories-unseen-fail", "vocabulary", pa.array([f"new-{i}" for i in range(50)]), ("score.unseen=fail",),
     r"categorical column\(s\) 'c1' \(50 of 50 rows, 100\.0%\) hold values the model never saw.*"
     r"score\.max_unseen_fraction=0\.5.*nothing was published"),
    ("most-categories-unseen-fail-at-0.2", "vocabulary", pa.array(["a"] * 35 + ["zz"] * 15),
     ("score.unseen=fail", "score.max_unseen_fraction=0.2"), r"'c1' \(15 of 50 rows, 30\.0%\)"),
]  # fmt: skip


@pytest.mark.parametrize(("encoding", "c1", "sets", "names"), [c[1:] for c in ISSUE_32_SCORE_CASES],
                         ids=[c[0] for c in ISSUE_32_SCORE_CASES])  # fmt: skip
def test_scoring_categories_the_model_did_not_learn_fails_naming_the_column_and_publishes_nothing(
    spark, categorical_models, request, encoding, c1, sets, names
):
    from sparkml_dist.score import ScoreError, score

    model = categorical_models[encoding]
    case = model[0] / request.node.callspec.id
    case.mkdir()
    src, out = _score_table(case, "in", c1), case / "out"
    cfg = load_config(None, _score_sets(model, src, out, *sets))
    t0 = time.monotonic()
    with pytest.raises(ScoreError) as err:
        score(spark, cfg)
    assert re.search(names, str(err.value)), str(err.value)
    assert time.monotonic() - t0 < QUICK_S
    assert sorted(p.name for p in case.iterdir()) == ["in"], "something was published or left beside the output"


def test_unseen_categories_are_counted_per_column_in_the_summary_and_mlflow(spark, categorical_models, caplog):
    """Vocabulary: values outside it. Hash: values whose bucket no training row hit (a new value that shares a
    seen bucket cannot be told from a seen one: it is not counted)."""
    from mlflow.tracking import MlflowClient
    from pyspark.sql import functions as F

    from sparkml_dist.score import score

    new = [f"new-{i}" for i in range(40)]
    for encoding in ("vocabulary", "hash"):
        model = categorical_models[encoding]
        case = model[0] / "counted"
        case.mkdir()
        src, out = _score_table(case, "in", pa.array(["a"] * 10 + new)), case / "out"
        cfg = load_config(None, _score_sets(model, src, out))
        with caplog.at_level("WARNING", logger="sparkml_dist.score"):
            result = score(spark, cfg)
        if encoding == "vocabulary":
            expected = 40
        else:  # the buckets of the training values a..d, by the same hash Spark computes
            bucket = F.pmod(F.xxhash64(F.col("c1"), F.lit("c1"), F.lit(0)), F.lit(64))
            seen = {r[0] for r in spark.createDataFrame([(v,) for v in "abcd"], "c1 string").select(bucket).collect()}
            hits = spark.createDataFrame([(v,) for v in new], "c1 string").select(bucket).collect()
            expected = sum(r[0] not in seen for r in hits)
            assert 0 < expected < 40  # the check means something: some new values share a seen bucket
        assert result.rows == 50 and result.unseen_rows == {"c1": expected}, result
        assert result.unseen_fraction == {"c1": expected / 50}
        assert json.loads((out / "_score.json").read_text())["unseen_rows"] == {"c1": expected}
        metrics = MlflowClient(cfg.tracking.tracking_uri).get_run(result.mlflow_run_id).data.metrics
        assert metrics["score/unseen_fraction_c1"] == pytest.approx(expected / 50), metrics
        assert metrics["score/rows"] == 50
        assert ("above score.max_unseen_fraction=0.5" in caplog.text) == (expected > 25)
        caplog.clear()


def test_a_model_that_predates_recorded_types_still_scores_with_a_warning(caplog):
    from pyspark.sql import types as T

    from sparkml_dist.features import Encoding, check_scoring_columns

    old = Encoding("columns", 65, ["c1"], [], ["c1"], 64, 0)  # as stored before types were recorded
    with caplog.at_level("WARNING", logger="sparkml_dist.features"):
        check_scoring_columns(old, {"c1": T.LongType()}, "score.input_url x")
    assert "does not record the types of its categorical columns ['c1']" in caplog.text
    assert old.unseen_columns() == {}  # no recorded buckets: not counted


def test_a_vocabulary_over_all_unique_values_is_a_warning_naming_its_coverage(spark, caplog):
    from sparkml_dist.features import _vocabularies

    df = spark.createDataFrame([(f"id-{i:04d}", i % 3) for i in range(300)], "user string, kind int")
    with caplog.at_level("WARNING", logger="sparkml_dist.features"):
        vocab = _vocabularies(df, ["user", "kind"], 10)
    assert vocab["user"] == [f"id-{i:04d}" for i in range(10)] and sorted(vocab["kind"]) == ["0", "1", "2"]
    assert re.search(r"column 'user' covers 3\.3% of its 300 rows \(300 distinct values \(every value is as "
                     r"frequent as the next.*data\.categorical_encoding=hash", caplog.text), caplog.text  # fmt: skip
    assert "'kind'" not in caplog.text


def test_more_parameter_server_shards_than_parameters_is_said(caplog):
    from sparkml_dist.config import CommConfig
    from sparkml_dist.ps.driver import plan_shards

    with caplog.at_level("WARNING", logger="sparkml_dist.ps.driver"):
        ranges = plan_shards(9, CommConfig(ps_shards=64))
    assert len(ranges) == 9
    assert "comm.ps_shards=64 asks for more server shards than the model has parameters (9)" in caplog.text


def test_set_merges_a_map_into_the_files_map_and_a_null_removes_a_key():
    conf_file = Path(__file__).resolve().parents[1] / "conf" / "local.yaml"
    base = load_config(conf_file).spark.conf
    merged = load_config(conf_file, ["spark.conf={spark.driver.memory: 1g, spark.x.y: z}"]).spark.conf
    assert merged == {**base, "spark.driver.memory": "1g", "spark.x.y": "z"}  # bindAddress, host ... kept
    removed = load_config(conf_file, ["spark.conf={spark.driver.host: ~}"]).spark.conf
    assert removed == {k: v for k, v in base.items() if k != "spark.driver.host"}
    listed = load_config(None, ["data.feature_cols=[a, b]", "data.feature_cols=[c]"]).data.feature_cols
    assert listed == ["c"]  # lists replace


def test_work_dir_and_plain_paths_expand_home_and_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SPARKML_DIST_DATA_32", str(tmp_path / "data"))
    cfg = load_config(None, ["paths.work_dir=~/w", "data.input_url=${SPARKML_DIST_DATA_32}/raw"])
    assert cfg.paths.work_dir == str(tmp_path / "w")
    assert cfg.partition.output_url == f"file://{tmp_path / 'w'}/data/partitioned"
    assert cfg.data.input_url == f"file://{tmp_path / 'data'}/raw"
    assert load_config(None, ["paths.work_dir=$SPARKML_DIST_DATA_32/w"]).paths.work_dir == str(tmp_path / "data/w")


# ------------------------------------------------------------------------------------------------------------
# Issue 32, items 6, 9, 10 and 11: a feature space too wide for a rank's memory, sparse rows whose indices are
# wrong (each cause named, not "a NaN/infinite feature"), LIBSVM lines Spark's reader chokes on (file and line
# number instead of a hundred lines of Java) and an output nobody can write. One line each, nothing published.


def _libsvm(*extra: str) -> bytes:
    good = [f"{i % 2} {1 + i % 5}:1.0 {7 + i % 3}:2.5" for i in range(ROWS)]
    return ("\n".join([*good, *extra]) + "\n").encode()


def _sparse(indices: list[int], values: list[float] | None = None, index_type: Any = None) -> pa.Table:
    """A table of indices/values columns whose row 7 holds ``indices`` (and ``values``); every other row is fine."""
    idx, val = [[1, 3]] * ROWS, [[1.0, 2.0]] * ROWS
    idx[7], val[7] = indices, values if values is not None else [1.0] * len(indices)
    return _table(f0=None, f1=None, idx=pa.array(idx, pa.list_(index_type or pa.int32())),
                  val=pa.array(val, pa.list_(pa.float32())))  # fmt: skip


SPARSE = ("data.indices_col=idx", "data.values_col=val", "data.dimension=10")
LIBSVM = ("data.input_format=libsvm",)
TOO_WIDE = r"2,147,483,648 parameters .*32\.0 GiB per rank.*train\.max_model_gib=2.*data\.dimension.*data\.hash_buckets"
_COUNTS = pa.array(np.where(np.arange(ROWS) == 7, -2.0, np.arange(ROWS, dtype=float)))

ISSUE_32B_DATA_CASES: list[tuple[str, dict[str, Any], tuple[str, ...], str]] = [
    ("libsvm-index-2-31", {"a.txt": _libsvm("1 2147483647:1.0")}, LIBSVM, TOO_WIDE),
    ("indices-dimension-2-31", {"a.parquet": _sparse([1, 3])}, (*SPARSE[:2], "data.dimension=2147483647"), TOO_WIDE),
    ("mlp-on-20m-features", {"a.parquet": _sparse([1, 3])}, (*SPARSE[:2], "data.dimension=20000000", "train.model=mlp"),
     r"train\.model=mlp would hold 1,280,002,[0-9,]+ parameters.*GiB per rank"),
    ("sparse-index-out-of-range", {"a.parquet": _sparse([1, 30])}, SPARSE,
     r"row_id 7 is invalid: feature index 30 in data\.indices_col 'idx' is outside the feature space 0\.\.9 "
     r"\(data\.dimension=10\): raise data\.dimension"),
    ("sparse-index-above-int32", {"a.parquet": _sparse([1, 2**31 + 5], index_type=pa.int64())}, SPARSE,
     r"row_id 7 is invalid: feature index 2147483653 .*outside the feature space"),
    ("sparse-index-negative", {"a.parquet": _sparse([-1, 3])}, SPARSE,
     r"row_id 7 is invalid: feature index -1 in data\.indices_col 'idx' is negative"),
    ("sparse-indices-unsorted", {"a.parquet": _sparse([3, 1])}, SPARSE,
     r"row_id 7 is invalid: its feature indices .* are not ascending \(3 before 1\): sort"),
    ("sparse-index-duplicate", {"a.parquet": _sparse([3, 3])}, SPARSE,
     r"row_id 7 is invalid: feature index 3 appears twice"),
    ("sparse-value-nan", {"a.parquet": _sparse([1, 3], [1.0, math.nan])}, SPARSE,
     r"row_id 7 is invalid: the value at feature index 3 .* is NaN"),
    ("sparse-lengths-differ", {"a.parquet": _sparse([1, 3, 5], [1.0, 2.0])}, SPARSE,
     r"row_id 7 is invalid: it has 3 indices in 'idx' but 2 values in 'val'"),
    ("log1p-of-a-negative-count", {"a.parquet": _table(f0=_COUNTS, f1=None, c1=pa.array(["a", "b"] * (ROWS // 2)))},
     ("data.categorical_cols=[c1]", "data.numeric_transform=log1p"),
     r"row_id 7 is invalid: column 'f0' holds -2\.0, below 0, and data\.numeric_transform=log1p"),
    ("libsvm-dimension-too-small", {"a.txt": _libsvm()}, (*LIBSVM, "data.dimension=5"),
     r"a\.txt line 1 .*feature index 7 \(one-based\) is beyond data\.dimension=5: raise data\.dimension to at least 7"),
    ("libsvm-value-not-a-number", {"a.txt": _libsvm("1 3:x")}, LIBSVM,
     r"a\.txt line 201 \('1 3:x'\): the value of '3:x' is not a number"),
    ("libsvm-value-not-a-number-dimension-set", {"a.txt": _libsvm("1 3:x")}, (*LIBSVM, "data.dimension=20"),
     r"a\.txt line 201 \('1 3:x'\)"),
    ("libsvm-no-colon", {"a.txt": _libsvm("1 3;1.0")}, LIBSVM, r"a\.txt line 201 .*'3;1\.0' is not index:value"),
    ("libsvm-label-not-a-number", {"a.txt": _libsvm("yes 3:1.0")}, LIBSVM,
     r"a\.txt line 201 .*the label 'yes' is not a number"),
    ("libsvm-zero-based-index", {"a.txt": _libsvm("1 0:1.0 2:1.0")}, LIBSVM,
     r"a\.txt line 201 .*index 0 in '0:1\.0' is below 1: LIBSVM indices are one-based"),
    ("libsvm-descending-indices", {"a.txt": _libsvm("1 5:1.0 3:1.0")}, LIBSVM,
     r"a\.txt line 201 .*index 3 follows index 5"),
    ("output-under-proc", {"a.parquet": _table()}, ("partition.output_url=file:///proc/sparkml-dist-out",),
     r"partition\.output_url=file:///proc/sparkml-dist-out: cannot create .*directory you can write"),
]  # fmt: skip


@pytest.mark.parametrize(("files", "sets", "names"), [c[1:] for c in ISSUE_32B_DATA_CASES],
                         ids=[c[0] for c in ISSUE_32B_DATA_CASES])  # fmt: skip
def test_issue_32_wide_spaces_bad_indices_and_libsvm_lines_are_one_line_naming_the_fix(
    spark, sweep_dir, request, files, sets, names
):
    case = sweep_dir / request.node.callspec.id
    err, elapsed = _partition_refused(spark, case, files, sets)
    assert elapsed < QUICK_S
    text = str(err.value)
    assert re.search(names, text), text
    assert "\n" not in text and "Exception" not in text and " at org." not in text, text  # one line, no Java
    assert sorted(p.name for p in case.iterdir()) == ["raw"], "something was published or left beside the output"
