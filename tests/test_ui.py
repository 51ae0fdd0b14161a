"""End to end through the jobs (generate -> partition -> train -> evaluate -> promote), then a real
`mlflow server` on 127.0.0.1 and the project's sqlite store: its REST API finds what the jobs recorded."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest

from jobs import evaluate as evaluate_job
from jobs import main as main_job
from jobs import promote as promote_job
from sparkml_dist.config import ConfigError, load_config
from sparkml_dist.ui import running_server, server_command


def _get(url: str, path: str, **query: str) -> dict:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}", timeout=30) as resp:
        return json.loads(resp.read())


def _post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_the_server_serves_the_jobs_runs_metrics_artifacts_and_registered_model(spark, tmp_path):
    sets = [
        f"paths.work_dir={tmp_path}",
        "generate.rows=4000",
        "generate.features=4",
        "partition.row_group_mb=0.05",
        "train.epochs=2",
        "train.batch_size=64",
        "promote.logical_date=2024-03-01",
    ]
    argv = [a for s in sets for a in ("--set", s)]
    trained = main_job.main(argv)["train"]
    evaluate_job.main(argv)
    decision = promote_job.main(argv)
    assert decision["promoted"]
    cfg = load_config("conf/local.yaml", sets)

    with running_server(cfg.tracking, timeout_s=180, log_path=tmp_path / "server.log") as url:
        exp = _get(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="sparkml-dist")["experiment"]
        assert exp["artifact_location"] == cfg.tracking.artifact_url
        runs = _post(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        kinds = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"]["tags"]}["kind"] for r in runs}
        assert kinds[trained["run_id"]] == "allreduce" and kinds[decision["promotion_run_id"]] == "promotion"
        history = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=trained["run_id"], metric_key="val/log_loss")
        assert [m["step"] for m in history["metrics"]] == [1, 2]
        assert history["metrics"][-1]["value"] == pytest.approx(trained["final"]["val_log_loss"])
        model = _get(url, "/api/2.0/mlflow/registered-models/get", name="sparkml-dist")["registered_model"]
        assert {"alias": "champion", "version": "1"} in model["aliases"]
        champion = _get(url, "/api/2.0/mlflow/registered-models/alias", name="sparkml-dist", alias="champion")
        assert champion["model_version"]["run_id"] == trained["run_id"]
        # artifacts are served from the runs' own (file://) artifact location
        png = urllib.request.urlopen(
            f"{url}/get-artifact?path=loss_curve.png&run_uuid={trained['run_id']}", timeout=30
        ).read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        page = urllib.request.urlopen(url, timeout=30).read()
        assert b"<html" in page.lower()


def test_a_tracking_server_uri_is_not_served_again():
    cfg = load_config(None, ["tracking.tracking_uri=http://127.0.0.1:5000"]).tracking
    with pytest.raises(ConfigError, match="open it in a browser"):
        server_command(cfg, 5001)
    local = load_config("conf/local.yaml", []).tracking
    cmd = server_command(local, 5001)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--backend-store-uri") + 1] == local.tracking_uri
