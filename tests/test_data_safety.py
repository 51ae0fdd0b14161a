"""Issue 21: a job never destroys or silently misreads a user's data. One test per class of the issue, on
real Spark, through the jobs' command-line entry (``run_cli``, in-process on the shared session): each
asserts the exit code, that the message names the bad thing, and that no input or unrelated file changed
(SHA-256 of every file under the test's root before and after). One test runs a job as a real subprocess
to see exactly what a person sees. Costs: about 4-6 min on the 2-core CI machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import compare as compare_job
from jobs import generate as generate_job
from jobs import partition as partition_job
from jobs import score as score_job
from jobs import train as train_job
from jobs._cli import emit, run_cli
from sparkml_dist import tracking
from sparkml_dist.config import GenerateConfig, load_config
from sparkml_dist.errors import EXIT_USER_ERROR
from sparkml_dist.manifest import MANIFEST_NAME, ManifestError, feature_tags, read_manifest
from sparkml_dist.models import LogisticRegression, ProbabilityModel
from sparkml_dist.partition import CorruptInputError, partition, verify_pages
from sparkml_dist.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]


def _digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (hidden ones included), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cli(main, argv: list[str], capsys) -> tuple[int, str]:
    """Run a job as its command line does; (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        run_cli(main, argv)
    err = capsys.readouterr().err
    return int(done.value.code or 0), err


def _argv(root: Path, *sets: str) -> list[str]:
    out = ["--set", f"paths.work_dir={root}", "--set", "partition.num_shards=2"]
    for s in sets:
        out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def data(spark, tmp_path_factory):
    """A small columns-layout data set (f0, f1, f2, label, row_id) and an unrelated user directory."""
    root = tmp_path_factory.mktemp("safety")
    raw = root / "raw"
    write_dataset(
        spark, GenerateConfig(output_url=f"file://{raw}", rows=600, features=3, partitions=2, seed=9, layout="columns")
    )
    mine = root / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("the user's own notes")
    (mine / "sub" / "photo.bin").write_bytes(os.urandom(512))
    return root, raw, mine


def _expect_refusal(main, argv, capsys, roots: Path | list[Path], *names: str) -> str:
    """Run the job, expect exit 2 with every one of ``names`` in its message and no file under ``roots`` changed."""
    roots = roots if isinstance(roots, list) else [roots]
    before = [_digest(r) for r in roots]
    code, err = _cli(main, argv, capsys)
    assert code == EXIT_USER_ERROR, err
    for name in names:
        assert name in err, (name, err)
    assert "Traceback" not in err
    assert [_digest(r) for r in roots] == before  # nothing read or unrelated was touched
    return err


# ------------------------------------------------------------------------- 1. outputs that destroy data


def test_outputs_that_overlap_the_input_or_hold_someone_elses_files_are_refused(spark, data, capsys, tmp_path):
    root, raw, mine = data
    link = tmp_path / "link-to-raw"
    link.symlink_to(raw, target_is_directory=True)
    cases = [
        (f"partition.output_url={raw}", "is data.input_url"),
        (f"partition.output_url={root}", "contains data.input_url"),
        (f"partition.output_url={raw}/shards", "is inside data.input_url"),
        (f"partition.output_url={link}", "is data.input_url"),  # the same directory through a symlink
        (f"partition.output_url={mine}", "no _manifest.json"),
    ]
    for out, words in cases:
        _expect_refusal(partition_job.main, _argv(root, f"data.input_url={raw}", out), capsys, root, words)
    # the same rule for every writer: generate, score (before the model is even looked up), compare
    _expect_refusal(
        generate_job.main, _argv(root, f"generate.output_url={mine}"), capsys, root, str(mine), "_truth.json"
    )
    score = _argv(root, f"score.input_url={raw}", f"score.output_url={mine}", "score.model_uri=runs:/0/model")
    _expect_refusal(score_job.main, score, capsys, root, "score.output_url", "no _score.json", "notes.txt")
    score_in = _argv(root, f"score.input_url={raw}", f"score.output_url={raw}", "score.model_uri=runs:/0/model")
    _expect_refusal(score_job.main, score_in, capsys, root, "is score.input_url")
    _expect_refusal(compare_job.main, [*_argv(root), "--out", str(mine)], capsys, root, "--out", "_compare.json")


def test_a_rerun_replaces_its_own_output_but_not_files_someone_added_to_it(spark, data, capsys, tmp_path):
    root, raw, _ = data
    out = tmp_path / "parts"
    argv = _argv(tmp_path, f"data.input_url={raw}", f"partition.output_url={out}")
    assert _cli(partition_job.main, argv, capsys)[0] == 0
    assert _cli(partition_job.main, [*argv, "--set", "partition.seed=3"], capsys)[0] == 0  # own output: replaced
    assert read_manifest(f"file://{out}").seed == 3
    (out / "train" / "keep-me.csv").write_text("a,b\n1,2\n")
    err = _expect_refusal(partition_job.main, [*argv, "--set", "partition.seed=4"], capsys, tmp_path, "keep-me.csv")
    assert "does not list" in err and read_manifest(f"file://{out}").seed == 3


# ------------------------------------------------------------------------------ 2. scoring by name


def _log_model(cfg, manifest_url: str, seed: int) -> str:
    """A logistic model logged as fit.run_training logs one: with the manifest's feature tags."""
    manifest = read_manifest(manifest_url)
    torch.manual_seed(seed)
    model = ProbabilityModel(LogisticRegression(manifest.num_features)).eval()
    run = tracking.start_run(cfg, feature_tags(manifest), kind="allreduce")
    example = np.random.default_rng(seed).standard_normal((5, manifest.num_features)).astype(np.float32)
    tracking.log_torch_model(run, model, example)
    tracking.finish_run(run)
    return run.run_id


def _rewrite(raw: Path, dst: Path, change, keep_spark_schema: bool = False) -> Path:
    """Rewrite the data set with pyarrow as another tool would (without Spark's schema in the footer,
    unless ``keep_spark_schema``: then a stale copy of it stays behind)."""
    dst.mkdir()
    for i, f in enumerate(sorted(raw.glob("*.parquet"))):
        table = pq.read_table(f)
        if not keep_spark_schema:
            table = table.replace_schema_metadata()
        pq.write_table(change(table), dst / f"part-{i}.parquet")
    return dst


def test_scoring_matches_columns_by_name_and_applies_the_invalid_value_policy(spark, data, capsys, tmp_path):
    root, raw, _ = data
    work = tmp_path
    sets = [f"paths.work_dir={work}", f"data.input_url={raw}", f"partition.output_url={work}/parts"]
    cfg = load_config(None, sets)
    partition(spark, cfg)
    run_id = _log_model(cfg, f"file://{work}/parts", seed=1)
    base = _argv(work, *sets[1:], f"score.model_uri=runs:/{run_id}/model")

    def scored(input_dir: Path, name: str, *extra: str) -> np.ndarray:
        argv = [*base, "--set", f"score.input_url={input_dir}", "--set", f"score.output_url={work}/{name}"]
        for e in extra:
            argv += ["--set", e]
        code, err = _cli(score_job.main, argv, capsys)
        assert code == 0, err
        table = pq.read_table(work / name).to_pandas().sort_values("row_id")
        return table[["prob_0", "prob_1"]].to_numpy()

    reference = scored(raw, "s-ref")
    reversed_dir = _rewrite(raw, work / "reversed", lambda t: t.select(list(reversed(t.column_names))))
    np.testing.assert_allclose(scored(reversed_dir, "s-rev"), reference, atol=1e-6)  # same predictions

    swapped = _rewrite(raw, work / "swapped", lambda t: t.rename_columns(["row_id", "f1", "f0", "f2", "label"]))
    assert not np.allclose(scored(swapped, "s-swap"), reference)  # values follow the names, not the places

    def drop_f1(t: pa.Table) -> pa.Table:
        return t.drop(["f1"]).append_column("g", pa.array(np.ones(len(t), np.float64)))

    wrong = _rewrite(raw, work / "wrong", drop_f1)
    argv = [*base, "--set", f"score.input_url={wrong}", "--set", f"score.output_url={work}/s-wrong"]
    _expect_refusal(score_job.main, argv, capsys, [raw, wrong, work / "s-ref"], "['f1']", "lacks")
    assert not (work / "s-wrong").exists()
    # the same files with Spark's old schema left in their footers: Spark would show f1 as a column of nulls
    stale = _rewrite(raw, work / "stale", drop_f1, keep_spark_schema=True)
    argv = [*base, "--set", f"score.input_url={stale}", "--set", f"score.output_url={work}/s-stale"]
    _expect_refusal(score_job.main, argv, capsys, [raw, stale], "['f1']", "org.apache.spark.sql.parquet.row.metadata")

    def poison(t: pa.Table) -> pa.Table:
        f0 = t.column("f0").to_numpy().copy()
        f0[:3] = [np.nan, np.inf, -np.inf]
        return t.set_column(t.schema.get_field_index("f0"), "f0", pa.array(f0))

    bad = _rewrite(raw, work / "bad", poison)
    # every file's first three rows are poisoned; whichever task fails first names one of them
    first_bad = [i for f in sorted(raw.glob("*.parquet")) for i in pq.read_table(f).column("row_id").to_pylist()[:3]]
    argv = [*base, "--set", f"score.input_url={bad}", "--set", f"score.output_url={work}/s-bad"]
    err = _expect_refusal(score_job.main, argv, capsys, [raw, bad], "NaN/infinite", "data.invalid_values=drop")
    assert any(f"row_id {i} " in err for i in first_bad)
    out = score_job.main([*argv, "--set", "data.invalid_values=drop"])
    assert out["dropped_rows"] == 6 and out["rows"] == 600 - 6  # three in each of the two files
    assert json.loads((work / "s-bad" / "_score.json").read_text())["dropped_rows"] == 6


# -------------------------------------------------------------------------- 3. keys, labels and paths


def _table(n: int, **cols) -> pa.Table:
    rng = np.random.default_rng(0)
    base = {"row_id": pa.array(np.arange(n, dtype=np.int64)), "a": pa.array(rng.standard_normal(n))}
    base["label"] = pa.array(np.arange(n, dtype=np.int64) % 2)
    base.update(cols)
    return pa.table(base)


def test_keys_labels_and_input_paths_are_read_as_written_or_refused(spark, capsys, tmp_path):
    n = 400
    cases = {
        "string-ids": (_table(n, row_id=pa.array([f"id{i}" for i in range(n)])), ["has type string", "row_id"]),
        "duplicate-ids": (_table(n, row_id=pa.array(np.arange(n) // 2)), ["not a unique key", "duplicate_row_ids"]),
        "null-ids": (_table(n, row_id=pa.array([None if i == 5 else i for i in range(n)], pa.int64())), ["null id"]),
        "int64-labels": (_table(n, label=pa.array(np.where(np.arange(n) == 7, 2**32 + 1, 0))), ["4294967297"]),
    }
    for name, (table, words) in cases.items():
        src = tmp_path / name
        src.mkdir()
        pq.write_table(table, src / "part-0.parquet")
        argv = _argv(tmp_path, f"data.input_url={src}", f"partition.output_url={tmp_path}/out-{name}")
        _expect_refusal(partition_job.main, argv, capsys, tmp_path, *words)
        assert not (tmp_path / f"out-{name}").exists()

    # duplicate ids re-keyed on request: every row kept, ids unique, the shuffle no longer input order
    dup = tmp_path / "duplicate-ids"
    out = partition_job.main(
        _argv(
            tmp_path,
            f"data.input_url={dup}",
            f"partition.output_url={tmp_path}/rekeyed",
            "data.duplicate_row_ids=rekey",
        )
    )
    ids = pq.read_table(tmp_path / "rekeyed", columns=["row_id"]).column("row_id").to_pylist()
    assert out["row_ids_rekeyed"] and len(ids) == n == len(set(ids))

    # Hive-style partition directories: the key is never taken as a feature implicitly
    hive = tmp_path / "hive"
    for day in (3, 4):
        (hive / f"day={day}").mkdir(parents=True)
        ids = pa.array(np.arange(n // 2, dtype=np.int64) + day * n)
        pq.write_table(_table(n // 2, row_id=ids), hive / f"day={day}" / "part-0.parquet")
    argv = _argv(tmp_path, f"data.input_url={hive}", f"partition.output_url={tmp_path}/out-hive")
    _expect_refusal(partition_job.main, argv, capsys, tmp_path, "day=", "['day']", "data.feature_cols")
    listed = partition_job.main([*argv, "--set", "data.feature_cols=[a]"])  # explicit features: no 'day'
    assert read_manifest(listed["manifest_url"].rsplit("/", 1)[0]).feature_names == ["a"]

    # one Parquet file as the input, and a path with a space, read like a directory of files
    spaced = tmp_path / "my data"
    spaced.mkdir()
    pq.write_table(_table(n), spaced / "only file.parquet")
    for src in (spaced / "only file.parquet", spaced):
        done = partition_job.main(
            _argv(tmp_path, f"data.input_url={src}", f"partition.output_url={tmp_path}/o {src.name}")
        )
        assert done["input_rows"] == n and done["dropped_rows"] == 0
        assert read_manifest(f"file://{tmp_path}/o {src.name}").input_rows == n

    # the label listed as a feature
    code, err = _cli(
        partition_job.main, _argv(tmp_path, f"data.input_url={spaced}", "data.feature_cols=[a, label]"), capsys
    )
    assert code == EXIT_USER_ERROR and "data.label_col='label' is also listed as a feature" in err


# ------------------------------------------------------------------- 4. corruption that keeps sizes


def _flip_inside_a_data_page(path: Path) -> None:
    """Flip one byte near the end of the first row group's last column chunk (inside its last data page's
    values, past every page header); the file's size and footer stay intact."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    col = meta.column(meta.num_columns - 1)
    start = col.dictionary_page_offset or col.data_page_offset
    at = start + col.total_compressed_size - 3
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))
    for crc in path.parent.glob(f".{path.name}.crc"):  # Hadoop's side checksum would catch it first
        crc.unlink()


def test_flipped_bytes_and_hand_edited_manifests_are_detected(spark, data, capsys, tmp_path):
    _, raw, _ = data
    bad_in = tmp_path / "in"
    shutil.copytree(raw, bad_in)
    victim = sorted(bad_in.glob("*.parquet"))[0]
    _flip_inside_a_data_page(victim)
    argv = _argv(tmp_path, f"data.input_url={bad_in}", f"partition.output_url={tmp_path}/out")
    _expect_refusal(partition_job.main, argv, capsys, tmp_path, victim.name, "damaged", "CRC checksum")
    assert not (tmp_path / "out").exists()

    out = tmp_path / "good"
    partition(
        spark, load_config(None, [f"data.input_url={raw}", f"partition.output_url={out}", "partition.num_shards=2"])
    )
    url = f"file://{out}"
    shard_file = sorted((out / "train" / "shard=0").glob("*.parquet"))[0]
    saved = shard_file.read_bytes()
    _flip_inside_a_data_page(shard_file)
    read_manifest(url)  # same size, same footer: what the cheap check cannot see ...
    with pytest.raises(CorruptInputError, match=rf"{shard_file.name}.*CRC checksum"):
        verify_pages(spark, read_manifest(url))  # ... the page checksums can
    shard_file.write_bytes(saved)
    verify_pages(spark, read_manifest(url))

    manifest_path = out / MANIFEST_NAME
    text = manifest_path.read_text()
    rows = read_manifest(url).train[0].rows
    manifest_path.write_text(text.replace(f'"rows": {rows},', f'"rows": {rows + 1},', 1))
    train = ["--set", f"train.manifest_url={out}", "--set", f"paths.work_dir={tmp_path}"]
    _expect_refusal(train_job.main, train, capsys, tmp_path, "does not match its own checksum", MANIFEST_NAME)

    # a manifest rewritten consistently (checksum recomputed) whose footers disagree: the footers are read
    manifest_path.write_text(text)
    m = read_manifest(url, verify=False)
    first = m.train[0]
    files = [dataclasses.replace(first.files[0], rows=first.files[0].rows + 1), *first.files[1:]]
    forged = dataclasses.replace(m, train=[dataclasses.replace(first, files=files, rows=first.rows + 1), *m.train[1:]])
    manifest_path.write_text(forged.to_json())
    with pytest.raises(ManifestError, match=r"holds \d+ rows in \d+ row groups, the manifest says"):
        read_manifest(url)


# ------------------------------------------------------------------------------ 5. readable errors


def test_a_user_error_is_a_few_lines_and_exit_2_and_the_summary_is_strict_json(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPARK_LOCAL_IP": "127.0.0.1"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.partition", "--set", f"paths.work_dir={tmp_path}",
         "--set", f"data.input_url={tmp_path}/nowhere"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-2000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and f"{tmp_path}/nowhere does not exist" in ours[0]
    assert "Traceback" not in proc.stderr and "at org.apache" not in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing written

    config = subprocess.run(
        [sys.executable, "-m", "jobs.partition", "--set", "partition.validation_fraction=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert config.returncode == EXIT_USER_ERROR and "validation_fraction=0" in config.stderr
    assert "Traceback" not in config.stderr

    emit({"val_log_loss": float("nan"), "nested": [float("inf"), 1.5]})
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "val_log_loss": None,
        "nested": [None, 1.5],
    }
