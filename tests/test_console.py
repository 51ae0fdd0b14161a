"""The console of `make run`: what a person needs, without third-party deprecation noise (issue 22 section 4).

The main job runs as a user runs it (a subprocess with its own Spark, Petastorm readers in the executors'
Python workers), on a tiny input, at the default log level.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_main_job_console_has_no_deprecation_noise(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "jobs.main", "--config", "conf/local.yaml"]
    for s in (f"paths.work_dir={tmp_path / 'work'}", "generate.rows=20000", "generate.features=8",
              "train.epochs=1", "tracking.log_model=false"):  # fmt: skip
        argv += ["--set", s]
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONWARNINGS": ""}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    noise = [ln for ln in proc.stderr.splitlines() if "FutureWarning" in ln or "DeprecationWarning" in ln]
    assert not noise, f"{len(noise)} deprecation lines on the console, first: {noise[0]}"
    assert "Closing down clientserver connection" not in proc.stderr
    # what a person needs is still there: the stages, where the run is tracked, the JSON last line
    assert "partitioned into 2 shards" in proc.stderr and "MLflow run" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["train"]["run_id"]


def test_the_filter_is_petastorm_only() -> None:
    """A FutureWarning raised by any other module still shows: the filter is not a blanket one."""
    from sparkml_dist import quiet_petastorm_warnings

    with warnings.catch_warnings(record=True) as caught:
        # only the package's filters (pytest's own per-test filters, including a blanket ignore, are dropped
        # for this block; they also replaced the filter list the import installed into)
        warnings.resetwarnings()
        quiet_petastorm_warnings()
        warnings.warn("from elsewhere", FutureWarning, stacklevel=1)
        exec(
            compile("import warnings\nwarnings.warn('from petastorm', FutureWarning)", "petastorm_fake", "exec"),
            {"__name__": "petastorm.reader"},
        )
    messages = [str(w.message) for w in caught]
    assert messages == ["from elsewhere"], messages


@pytest.mark.parametrize(("argv", "frozen"), [("None", "True"), ("[]", "False")])
def test_a_job_run_as_a_program_skips_the_teardown_collection_and_one_run_in_process_does_not(argv, frozen):
    """run_cli freezes the collector right before a program exits (the teardown's collections cost ~1.1 s of
    every job's wall); a caller passing its own argv (the tests, in one process) keeps its collector."""
    code = (
        "import atexit, gc; atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); "
        f"from jobs._cli import run_cli; run_cli(lambda argv: None, {argv})"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["frozen", frozen]


def test_kill_usr1_makes_a_running_job_write_every_threads_stack_and_go_on():
    """An operator's first question about a job that seems stuck is where each thread is: SIGUSR1 answers it
    on stderr (faulthandler: also for a thread stuck in C) and the job carries on to its normal end."""
    code = (
        "import threading, time\n"
        "from jobs._cli import run_cli\n"
        "def waiting_helper(): time.sleep(4)\n"
        "def main(argv):\n"
        "    threading.Thread(target=waiting_helper, daemon=True).start()\n"
        "    print('ready', flush=True); time.sleep(3); print('done', flush=True)\n"
        "run_cli(main)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "done", err
    assert "waiting_helper" in err and "in main" in err, err  # both threads, by function
