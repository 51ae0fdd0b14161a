"""Real Horovod ranks in a real Spark barrier stage on local Spark, fed by Petastorm, tracked in MLflow."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparkml_dist import checkpoint
from sparkml_dist.config import load_config
from sparkml_dist.fit import run_training
from sparkml_dist.loader import build_loader_spec, iterate_batches, read_all
from sparkml_dist.manifest import ManifestError, read_manifest
from sparkml_dist.models import build_model, loss_fn
from sparkml_dist.partition import partition
from sparkml_dist.synthetic import read_truth, write_dataset

FEATURES = 8
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


def _cfg(work, *sets: str):
    return load_config(
        None,
        [
            f"paths.work_dir={work}",
            "generate.rows=24000",
            f"generate.features={FEATURES}",
            "generate.partitions=2",
            "generate.layout=array",
            "partition.num_shards=2",
            "partition.row_group_mb=0.05",
            "train.batch_size=128",
            "train.epochs=2",
            "launch.start_timeout_s=60",
            "launch.collective_timeout_s=60",
            "launch.job_timeout_s=300",
            *sets,
        ],
    )


@pytest.fixture(scope="module")
def data(spark, work):
    cfg = _cfg(work)
    write_dataset(spark, cfg.generate)
    partition(spark, cfg)
    return cfg


def _final_state(cfg, result) -> dict[str, torch.Tensor]:
    state = checkpoint.load_latest(f"{cfg.train.runs_url}/{result.run_id}/checkpoints")
    assert state is not None
    return state["model"]


@pytest.mark.parametrize("passes", [1, 2])
def test_two_ranks_equal_one_process_sgd_on_the_union_of_their_batches(spark, work, data, passes):
    steps = 6
    cfg = _cfg(
        work,
        "train.optimizer=sgd",
        "train.lr=0.5",
        "train.shuffle=false",
        "train.epochs=1",
        f"train.max_steps_per_epoch={steps}",
        f"train.backward_passes_per_step={passes}",
        "tracking.log_model=false",
    )
    result = run_training(spark, cfg)
    distributed = _final_state(cfg, result)

    manifest = read_manifest(cfg.train.manifest_url)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.train, manifest.num_features, manifest.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    batches = []
    for rank in range(2):
        spec = dataclasses.replace(build_loader_spec(manifest, rank, 2, cfg.train, split="train"), steps=steps)
        with iterate_batches(spec, 0) as it:
            batches.append(list(it))
    for step in range(0, steps, passes):
        # one optimizer step = the mean loss over every rank's micro-batches of this step
        group = [batches[r][step + i] for r in range(2) for i in range(passes)]
        x = torch.cat([g[0] for g in group])
        y = torch.cat([g[1] for g in group])
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(distributed[name], value, atol=1e-5, rtol=1e-5)


def test_converges_to_the_true_model_and_mlflow_holds_the_run(spark, work, data):
    import mlflow

    cfg = _cfg(work, "train.optimizer=adam", "train.lr=0.05", "train.epochs=4")
    result = run_training(spark, cfg)
    manifest = read_manifest(cfg.train.manifest_url)
    spec = build_loader_spec(manifest, 0, 1, cfg.train, split="validation")
    x, y = read_all(spec)
    truth = read_truth(spark, cfg.data.input_url).log_loss(x, y)
    assert result.final["val_log_loss"] <= truth * 1.02, (result.final, truth)
    assert result.epochs == 4 and result.world_size == 2

    client = mlflow.tracking.MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.05" and run.data.params["partition.num_shards"] == "2"
    assert run.data.tags["world_size"] == "2" and run.data.tags["manifest_fingerprint"] == manifest.fingerprint
    assert run.data.tags["spark_app_id"] == spark.sparkContext.applicationId
    # MLflow-native lineage: the partition output as the run's dataset, and the standard Source/User/commit tags
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == manifest.fingerprint and inp.dataset.source_type == "local"
    assert json.loads(inp.dataset.source)["uri"] == f"{manifest.root_url.rstrip('/')}/_manifest.json"
    profile = json.loads(inp.dataset.profile)
    assert profile["train_rows"] == [s.rows for s in manifest.train] and profile["num_features"] == FEATURES
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert run.data.tags["mlflow.source.type"] == "JOB" and run.data.tags["mlflow.source.name"]
    assert "mlflow.user" in run.data.tags
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the model-training view
    assert len(run.data.tags.get("mlflow.source.git.commit", "x" * 40)) == 40  # present in a git checkout
    history = client.get_metric_history(result.run_id, "val/log_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    logged = set(run.data.metrics)
    assert {"train/loss", "train/lr", "val/auc", "val/accuracy"} <= logged
    assert {"system/time/rows_per_s", "system/time/comm_s", "system/time/data_wait_s", "system/run/attempt"} <= logged
    assert {"system/comm/bytes_per_step", "system/comm/ring_bytes_per_rank_per_step"} <= logged
    # the Model metrics tab holds what the model learned, in two sections that open on the loss curves;
    # timings, traffic and restarts sit beside the host samples on the System metrics tab (system/...)
    sections = {k.split("/")[0] for k in logged}
    assert sections == {"train", "val", "system"}, sorted(logged)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"loss_curve.png", "config.yaml", "history.json"} <= artifacts
    model = mlflow.pyfunc.load_model(result.model_uri)
    probs = np.asarray(model.predict(x[:50]))
    assert probs.shape == (50, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert ((probs[:, 1] > 0.5) == y[:50]).mean() > 0.7
    # the logged model loads where sparkml_dist is not importable: MLflow 3 saves a torch.export program
    # (data/model.pt2), which holds the computation itself, not references to our classes
    blocked = (
        "import json, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
        f"sys.path[:] = [p for p in sys.path if p not in ('', {str(REPO)!r})]\n"
        "try:\n    import sparkml_dist\nexcept ModuleNotFoundError:\n    pass\n"
        "else:\n    sys.exit('sparkml_dist is still importable: the check proves nothing')\n"
        "import mlflow, numpy as np\n"
        f"mlflow.set_tracking_uri({cfg.tracking.tracking_uri!r})\n"
        f"model = mlflow.pyfunc.load_model({result.model_uri!r})\n"
        f"out = model.predict(np.asarray({x[:5].tolist()!r}, dtype=np.float32))\n"
        "print(json.dumps(np.asarray(out).tolist()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", blocked], cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(json.loads(proc.stdout.strip().splitlines()[-1]), probs[:5], atol=1e-6)


def test_fp16_compression_still_converges(spark, work, data):
    cfg = _cfg(work, "train.fp16_allreduce=true", "train.lr=0.05", "train.epochs=3", "tracking.log_model=false")
    result = run_training(spark, cfg)
    manifest = read_manifest(cfg.train.manifest_url)
    x, y = read_all(build_loader_spec(manifest, 0, 1, cfg.train, split="validation"))
    truth = read_truth(spark, cfg.data.input_url).log_loss(x, y)
    assert result.final["val_log_loss"] <= truth * 1.05


def test_resume_after_an_interruption_ends_with_the_same_parameters(spark, work, data):
    import mlflow

    sets = ("train.optimizer=adam", "train.lr=0.02", "train.max_steps_per_epoch=20", "tracking.log_model=false")
    straight = run_training(spark, _cfg(work, *sets, "train.epochs=3"))
    first = run_training(spark, _cfg(work, *sets, "train.epochs=1"))
    resumed_cfg = _cfg(work, *sets, "train.epochs=3", f"train.resume_run_id={first.run_id}")
    resumed = run_training(spark, resumed_cfg)
    assert resumed.run_id == first.run_id and resumed.resumed_from_epoch == 1 and resumed.epochs == 3
    client = mlflow.tracking.MlflowClient(resumed_cfg.tracking.tracking_uri)
    digests = [[i.dataset.digest for i in client.get_run(r).inputs.dataset_inputs] for r in (straight.run_id,
                                                                                          resumed.run_id)]  # fmt: skip
    assert digests[0] == digests[1] and len(digests[1]) == 1  # same data, same digest; a resume adds nothing
    a = _final_state(resumed_cfg, straight)
    b = _final_state(resumed_cfg, resumed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-6)


def test_mid_epoch_evaluations_are_logged_at_their_steps_and_leave_training_unchanged(spark, work, data):
    """train.eval_every_steps=6 with 20 steps an epoch: evaluations after steps 6, 12 and 18 of each epoch
    (the epoch's end evaluates anyway), logged at their global steps with the training seconds so far; the
    parameters are those of a run without them; compare reads time to target to the first one that reached it."""
    from sparkml_dist.compare import HISTORY_KEYS, summarize_run
    from sparkml_dist.experiments import tracking

    sets = ("train.optimizer=adam", "train.lr=0.02", "train.max_steps_per_epoch=20", "tracking.log_model=false")
    plain = run_training(spark, _cfg(work, *sets))
    cfg = _cfg(work, *sets, "train.eval_every_steps=6")
    evaluated = run_training(spark, cfg)
    a, b = _final_state(cfg, plain), _final_state(cfg, evaluated)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-6)
    assert evaluated.final["val_log_loss"] == pytest.approx(plain.final["val_log_loss"], abs=1e-6)
    # the evaluations' collectives are not training's traffic
    assert evaluated.final["comm_bytes_per_step"] == plain.final["comm_bytes_per_step"]
    assert evaluated.final["comm_rounds"] == plain.final["comm_rounds"]
    keys = (*HISTORY_KEYS, "step_val_auc", "step_epoch", "mid_epoch_eval_s")
    record = tracking.get_run_record(cfg.tracking, evaluated.run_id, keys)

    def history(key: str) -> dict[int, float]:
        return dict(record.histories[key])

    losses, elapsed = history("step_val_log_loss"), history("step_elapsed_s")
    assert sorted(losses) == sorted(elapsed) == [6, 12, 18, 26, 32, 38]
    assert set(history("step_val_auc")) == set(losses) and history("step_epoch") == {6: 1, 12: 1, 18: 1, 26: 2,
                                                                                      32: 2, 38: 2}  # fmt: skip
    epochs = history("elapsed_s")
    times = [elapsed[6], elapsed[12], elapsed[18], epochs[1], elapsed[26], elapsed[32], elapsed[38], epochs[2]]
    assert times == sorted(times) and times[0] > 0  # one clock: training seconds, the evaluations included
    assert history("mid_epoch_eval_s")[1] > 0
    first = losses[6]
    reached = [s for s in sorted(losses) if losses[s] <= first]
    assert summarize_run(record, first).time_to_target_s == pytest.approx(elapsed[reached[0]])
    assert summarize_run(record, min(losses.values()) - 1).time_to_target_s is None


def test_unequal_shards_run_equal_steps_without_hanging(spark, work, data):
    cfg = _cfg(
        work,
        "partition.mode=random_sample",
        "partition.sample_fraction=0.3",
        f"partition.output_url={work}/unequal",
        f"train.manifest_url={work}/unequal",
        "train.epochs=1",
        "tracking.log_model=false",
    )
    partition(spark, cfg)
    manifest = read_manifest(cfg.train.manifest_url)
    rows = [s.rows for s in manifest.train]
    assert rows[0] != rows[1]
    batch = next(b for b in range(16, 200) if rows[0] // b != rows[1] // b)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
    started = time.monotonic()
    result = run_training(spark, cfg)
    assert time.monotonic() - started < 240
    assert result.final["epoch"] == 1
    history = checkpoint.load_latest(f"{cfg.train.runs_url}/{result.run_id}/checkpoints")["history"]
    # every rank ran min(rows)//batch steps: the global row count says so
    assert history[-1]["rows_per_s"] * history[-1]["epoch_s"] == pytest.approx(2 * batch * (min(rows) // batch))


def test_preflight_errors_are_clear_and_quick(spark, work, data):
    started = time.monotonic()
    with pytest.raises(ManifestError, match="not a partition output"):
        run_training(spark, _cfg(work, f"train.manifest_url={work}"))
    cfg = _cfg(work, "partition.num_shards=3", f"partition.output_url={work}/three", f"train.manifest_url={work}/three")
    partition(spark, cfg)
    t0 = time.monotonic()
    with pytest.raises(Exception, match=r"3") as err:
        run_training(spark, cfg)
    assert "slot" in str(err.value).lower() or "concurrent" in str(err.value).lower()
    assert time.monotonic() - t0 < 30
    assert time.monotonic() - started < 120


def test_main_job_runs_end_to_end_and_prints_json(spark, tmp_path, capsys, caplog):
    import json

    from jobs import main as main_job

    caplog.set_level("INFO", logger="jobs.main")
    out = main_job.main(
        [
            "--config",
            "conf/local.yaml",
            "--set",
            f"paths.work_dir={tmp_path}",
            "--set",
            "generate.rows=6000",
            "--set",
            "generate.features=4",
            "--set",
            "partition.row_group_mb=0.05",
            "--set",
            "train.epochs=1",
            "--set",
            "train.batch_size=64",
        ]
    )
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["train"]["run_id"] == out["train"]["run_id"]
    assert "make mlflow-ui" in caplog.text  # where to look, said through logging (the console shows it bare)
    assert out["partition"]["train_rows"] and out["train"]["model_uri"]


def test_a_rerun_names_the_unfinished_run_and_the_flag_that_resumes_it(spark, work, data, caplog):
    """A killed driver leaves its run RUNNING; rerunning the same command (no run key) says which flag resumes
    it instead of silently starting over."""
    from sparkml_dist import tracking
    from sparkml_dist.fit import TRAIN_FINGERPRINT_TAG, train_fingerprint

    sets = ("train.epochs=1", "train.max_steps_per_epoch=5", "tracking.log_model=false", "train.lr=0.031")
    cfg = _cfg(work, *sets)
    fingerprint = train_fingerprint(cfg, read_manifest(cfg.train.manifest_url).fingerprint)
    orphan = tracking.start_run(cfg, {TRAIN_FINGERPRINT_TAG: fingerprint}, kind="allreduce")  # never finished
    with caplog.at_level("WARNING", logger="sparkml_dist.fit"):
        fresh = run_training(spark, cfg)
    assert fresh.run_id != orphan.run_id
    said = [r.getMessage() for r in caplog.records if "did not finish" in r.getMessage()]
    assert len(said) == 1 and f"--set train.resume_run_id={orphan.run_id}" in said[0], caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sparkml_dist.fit"):  # other settings: not the same training
        run_training(spark, _cfg(work, *sets[:-1], "train.lr=0.032"))
    assert not [r for r in caplog.records if "did not finish" in r.getMessage()]
