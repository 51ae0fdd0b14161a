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
import re
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


@pytest.mark.parametrize(("files", "sets", "names"), [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_hostile_input_tables_fail_fast_naming_the_problem_and_publish_nothing(spark, sweep_dir, request, files,
                                                                               sets, names):  # fmt: skip
    case = sweep_dir / request.node.callspec.id
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
    elapsed = time.monotonic() - t0
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
