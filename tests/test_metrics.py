"""Metric sums: additive across workers, and the scores they give (regression here; classification is
checked against whole-model predictions in the trainer and promotion tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparkml_dist.metrics import REGRESSION, batch_sums, empty_sums, primary_metric, scores_of, summarize
from sparkml_dist.models import LinearRegression, check_model_for_data, loss_fn, prediction_model
from sparkml_dist.promote import decide


def test_regression_sums_add_up_across_workers_to_mse_rmse_mae_and_r2():
    rng = np.random.default_rng(0)
    y = rng.normal(2.0, 3.0, size=1000)
    pred = (y + rng.normal(0.0, 1.0, size=1000))[:, None]
    parts = [batch_sums(pred[i : i + 300], y[i : i + 300], REGRESSION) for i in range(0, 1000, 300)]
    scores = summarize(sum(parts, empty_sums(REGRESSION)), REGRESSION)
    err = pred[:, 0] - y
    assert scores["mse"] == pytest.approx(np.mean(err**2))
    assert scores["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)))
    assert scores["mae"] == pytest.approx(np.mean(np.abs(err)))
    assert scores["r2"] == pytest.approx(1 - np.sum(err**2) / np.sum((y - y.mean()) ** 2))
    assert scores["rows"] == 1000
    assert primary_metric(REGRESSION) == "mse" and primary_metric(2) == "log_loss"
    assert set(scores) - {"rows"} == set(scores_of(REGRESSION))


def test_regression_loss_is_squared_error_and_the_logged_model_returns_values():
    model = LinearRegression(3)
    x, y = torch.randn(8, 3), torch.randn(8)
    expected = torch.mean((model(x)[:, 0] - y) ** 2)
    assert torch.allclose(loss_fn(model(x), y), expected)
    served = prediction_model(model, REGRESSION)(x.double())
    assert served.shape == (8, 1) and torch.allclose(served, model(x))


def test_models_that_cannot_fit_the_labels_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="real-valued labels.*use train.model=linear"):
        check_model_for_data("softmax", REGRESSION)
    with pytest.raises(ValueError, match="use train.model=logistic.*data.task=regression"):
        check_model_for_data("linear", 2)
    check_model_for_data("mlp", REGRESSION)
    check_model_for_data("linear", REGRESSION)


def test_promotion_direction_follows_the_metric():
    assert decide("rmse", 0.0, 0.9, 1.0)[0] and not decide("rmse", 0.0, 1.1, 1.0)[0]
    assert decide("r2", 0.0, 0.8, 0.7)[0] and not decide("r2", 0.0, 0.6, 0.7)[0]


def test_mlflow_metric_names_are_sectioned_so_losses_lead_the_run_page():
    from sparkml_dist.metric_names import mlflow_key

    expected = {
        "train_loss": "train/loss",
        "val_log_loss": "val/log_loss",
        "val_auc": "val/auc",
        "lr": "train/lr",
        "epoch_s": "system/time/epoch_s",
        "comm_s": "system/time/comm_s",  # a duration, though it names communication
        "rows_per_s": "system/time/rows_per_s",
        "comm_bytes_per_step": "system/comm/bytes_per_step",
        "ring_bytes_per_rank_per_step": "system/comm/ring_bytes_per_rank_per_step",
        "staleness_mean/worker1": "system/comm/staleness_mean/worker1",
        "resumed_from_epoch": "system/run/resumed_from_epoch",
        "candidate_log_loss": "candidate/log_loss",
        "final_val_log_loss": "final/val_log_loss",
        "system/rank0/cpu_utilization_percentage": "system/rank0/cpu_utilization_percentage",
        "something_new": "system/run/something_new",
    }
    assert {k: mlflow_key(k) for k in expected} == expected
    # idempotent: a name already sectioned is logged as it is
    assert all(mlflow_key(v) == v for v in expected.values())
    # and back: a run read from MLflow has its metrics under the code's flat names again
    from sparkml_dist.metric_names import flat_key

    assert {v: flat_key(v) for v in expected.values()} == {v: k for k, v in expected.items()}
    for name in ("aggregate_bytes", "comm_s", "bound_wait_s", "ps_pull_bytes_per_step", "final_train_log_loss"):
        assert flat_key(mlflow_key(name)) == name
