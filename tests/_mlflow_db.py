"""Reading a work dir's MLflow sqlite store directly, while a job that writes it is still running (the
tests that kill drivers or stop the tracking server watch it without an MLflow client of their own)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sparkml_dist.metric_names import mlflow_key


def epochs_logged(db: Path, run_key: str | None = None, since_ms: int = 0) -> int:
    """The highest epoch whose validation loss is in ``db`` for runs started after ``since_ms`` (and tagged
    ``run_key``, when given); 0 until there is one, or while the store cannot be read."""
    if not db.exists():
        return 0
    query = (
        "select max(m.step) from metrics m join runs r on r.run_uuid = m.run_uuid where m.key = ? and r.start_time > ?"
    )
    args: list = [mlflow_key("val_log_loss"), since_ms]
    if run_key is not None:
        query += (
            " and exists (select 1 from tags t where t.run_uuid = m.run_uuid and t.key = 'run_key' and t.value = ?)"
        )
        args.append(run_key)
    try:
        with sqlite3.connect(db, timeout=1) as con:
            row = con.execute(query, args).fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0] or 0)
