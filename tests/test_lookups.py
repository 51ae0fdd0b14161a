"""A failed lookup is never read as "nothing there" (issue 19 section 4).

Real MLflow stores: a sqlite store whose registry tables are broken, and an http store nobody listens on.
"Does not exist" (a real answer) gives None or a "does not exist" error; any other failure gives a
TrackingError that says the store did not answer, so promotion can never take an unreadable champion for
"no champion yet" and promote the candidate as the first model.
"""

from __future__ import annotations

import socket
import sqlite3
import time
from pathlib import Path

import pytest

from sparkml_dist import tracking
from sparkml_dist.config import TrackingConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def store(tmp_path: Path) -> str:
    """A sqlite store with one registered model 'm' (no versions, no aliases)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).create_registered_model("m")
    return uri


def test_missing_model_or_alias_is_none(store: str) -> None:
    assert tracking.get_alias(store, "m", "champion") is None  # the model exists, the alias does not
    assert tracking.get_alias(store, "nobody", "champion") is None  # no such model


def test_a_broken_registry_is_not_no_champion(store: str) -> None:
    db = store[len("sqlite:///") :]
    with sqlite3.connect(db) as con:
        con.execute("DROP TABLE registered_model_aliases")
    with pytest.raises(tracking.TrackingError) as err:
        tracking.get_alias(store, "m", "champion")
    text = str(err.value)
    assert "did not answer" in text and "not 'not found'" in text and store in text, text


def test_an_unreachable_server_fails_fast_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingError) as alias_err:
        tracking.get_alias(uri, "m", "champion")
    cfg = TrackingConfig(tracking_uri=uri)
    with pytest.raises(tracking.TrackingError) as run_err:
        tracking.get_run_record(cfg, "0123456789abcdef0123456789abcdef", ())
    assert time.monotonic() - t0 < 60
    for err in (alias_err, run_err):
        assert "did not answer" in str(err.value) and uri in str(err.value), str(err.value)
        assert "does not exist" not in str(err.value)


def test_a_missing_run_still_says_does_not_exist(store: str) -> None:
    with pytest.raises(tracking.TrackingError, match="does not exist"):
        tracking.get_run_record(TrackingConfig(tracking_uri=store), "0123456789abcdef0123456789abcdef", ())
