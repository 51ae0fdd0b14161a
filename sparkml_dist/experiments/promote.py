"""Evaluate a candidate against the champion, then register it and move the champion alias if it is better.

Two steps, two jobs, run in this order by the schedule for one ``promote.logical_date``:

evaluate  The candidate (``promote.candidate_run_id``, or the newest FINISHED run of
          ``promote.candidate_kind`` on the data of ``train.manifest_url``) and the champion
          (``models:/<promote.registered_model>@<promote.alias>``) are scored on the manifest's validation
          split by the same Spark UDF batch scoring uses; log-loss, accuracy and AUC (metrics.py; MSE,
          RMSE, MAE and R^2 for regression data) of both are logged to the date's promotion run (kind
          ``promotion``, tag ``logical_date``).
promote   Registers the candidate's model (once per training run: an existing version from that run is
          reused) and moves the alias to it when there is no champion yet, or when it beats the champion
          by more than ``promote.min_improvement`` on ``promote.metric``. The decision, its reason and the
          versions before and after are tags of the same promotion run. No Spark needed.

Reruns for the same date reuse the date's promotion run, whose ``promotion_stage`` tag is the state:
``evaluated`` (promote acts on it) or ``decided`` (promote returns the recorded decision and changes
nothing; evaluate does too for the same candidate, and evaluates a different candidate afresh).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession

from sparkml_dist.config import JobConfig
from sparkml_dist.data.manifest import Manifest, read_manifest
from sparkml_dist.errors import UserError
from sparkml_dist.experiments import tracking
from sparkml_dist.metrics import LOWER_IS_BETTER, REGRESSION, SCORES, batch_sums, scores_of, summarize
from sparkml_dist.serving.score import PROBS, ScoreError, ScoreInput, manifest_input, model_feature_names, predict

log = logging.getLogger("sparkml_dist.promote")  # its pre-move name: logging configs keep working

KIND = "promotion"
STAGE_TAG = "promotion_stage"
NO_CHAMPION = "none"


class PromotionError(UserError):
    """Evaluation or promotion cannot go ahead; the message says what to run or set."""


@dataclass(frozen=True)
class Evaluation:
    logical_date: str
    registered_model: str
    promotion_run_id: str
    candidate_run_id: str
    candidate: dict[str, float]
    champion_version: str | None
    champion_run_id: str | None
    champion: dict[str, float] | None
    rows: int
    reused: bool
    """True when this date had already decided on the same candidate: nothing was recomputed."""


@dataclass(frozen=True)
class Decision:
    logical_date: str
    registered_model: str
    alias: str
    promotion_run_id: str
    candidate_run_id: str
    candidate_version: str
    champion_before: str | None
    champion_after: str | None
    promoted: bool
    reason: str
    metric: str
    candidate_score: float
    champion_score: float | None
    reused: bool
    """True when this date's decision had already been made: the registry was not touched."""


# ------------------------------------------------------------------------------------------ evaluate


def evaluate(spark: SparkSession, cfg: JobConfig) -> Evaluation:
    """Score the candidate and the champion on the validation split; record both in the date's run."""
    date, name = _logical_date(cfg), cfg.promote.registered_model
    manifest = read_manifest(cfg.train.manifest_url)
    if cfg.promote.metric not in scores_of(manifest.num_classes):
        kind = "real-valued (regression)" if manifest.num_classes == REGRESSION else "class"
        raise PromotionError(
            f"promote.metric={cfg.promote.metric} does not score {manifest.root_url}, whose labels are {kind}: "
            f"set promote.metric to one of {', '.join(scores_of(manifest.num_classes))}"
        )
    candidate = find_candidate(cfg, manifest)
    existing = _promotion_run(cfg)
    if existing is not None:
        record = tracking.get_run_record(cfg.tracking, existing, ())
        if record.tags.get(STAGE_TAG) == "decided" and record.tags.get("candidate_run_id") == candidate:
            log.info("%s %s: already decided on candidate %s; nothing to evaluate", name, date, candidate)
            return _evaluation_from(record, reused=True)
    champion = tracking.get_alias(cfg.tracking.tracking_uri, name, cfg.promote.alias)
    inp = manifest_input(spark, manifest, "validation")
    cand_scores = evaluate_model(spark, cfg, manifest, inp, tracking.run_model_uri(candidate))
    champ_scores: dict[str, float] | None = None
    if champion is not None:
        same = champion.run_id == candidate
        champ_scores = cand_scores if same else evaluate_model(spark, cfg, manifest, inp, champion.uri)
    tags = {
        "kind": KIND,
        "registered_model": name,
        "logical_date": date,
        STAGE_TAG: "evaluated",
        "decision": "pending",  # a different candidate re-evaluated for a decided date: clear the old decision
        "decision_reason": "",
        "candidate_version": "",
        "champion_version_after": "",
        "candidate_run_id": candidate,
        "champion_version": champion.version if champion else NO_CHAMPION,
        "champion_run_id": (champion.run_id or "") if champion else "",
        # not data_fingerprint: that tag marks training runs (compare and find_candidate look them up by it)
        "eval_data_fingerprint": manifest.input_fingerprint,
        "eval_manifest_fingerprint": manifest.fingerprint,
    }
    run_cfg = dataclasses.replace(cfg.tracking, run_name=f"promotion {name} {date}")
    run = tracking.start_run(dataclasses.replace(cfg, tracking=run_cfg), tags, kind=KIND, resume_run_id=existing)
    tracking.set_tags(run, tags)
    scores = scores_of(manifest.num_classes)
    metrics = {f"candidate_{k}": cand_scores[k] for k in scores}
    metrics |= {f"champion_{k}": champ_scores[k] for k in scores} if champ_scores else {}
    tracking.log_metrics(run, {**metrics, "eval_rows": cand_scores["rows"]}, step=0)
    result = Evaluation(
        logical_date=date,
        registered_model=name,
        promotion_run_id=run.run_id,
        candidate_run_id=candidate,
        candidate=cand_scores,
        champion_version=champion.version if champion else None,
        champion_run_id=champion.run_id if champion else None,
        champion=champ_scores,
        rows=int(cand_scores["rows"]),
        reused=False,
    )
    tracking.log_dict(run, asdict(result), "evaluation.json")
    tracking.finish_run(run)
    return result


def find_candidate(cfg: JobConfig, manifest: Manifest) -> str:
    """promote.candidate_run_id, or the newest FINISHED run of promote.candidate_kind on the manifest's data."""
    if cfg.promote.candidate_run_id:
        tracking.get_run_record(cfg.tracking, cfg.promote.candidate_run_id, ())  # raises with the id if unknown
        return cfg.promote.candidate_run_id
    kind, fp = cfg.promote.candidate_kind, manifest.input_fingerprint
    found = tracking.find_runs(cfg.tracking, {"kind": kind, "data_fingerprint": fp}, finished_only=True)
    if not found:
        raise PromotionError(
            f"no FINISHED run of kind {kind!r} on the data of {manifest.root_url} (data_fingerprint {fp}) in "
            f"experiment {cfg.tracking.experiment!r}: run jobs/train.py first, or set promote.candidate_run_id"
        )
    return found[0]


def evaluate_model(
    spark: SparkSession, cfg: JobConfig, manifest: Manifest, inp: ScoreInput, model_uri: str
) -> dict[str, float]:
    """metrics.summarize of one model on ``inp`` (log_loss, accuracy, auc; mse, rmse, mae, r2 for regression)
    and rows; metrics summed per Spark partition."""
    spec = tracking.model_spec(cfg.tracking.tracking_uri, model_uri)
    names = model_feature_names(cfg, spec)
    if names is not None and names != manifest.feature_names:
        raise ScoreError(
            f"model {model_uri} takes features {names[:8]}{'...' if len(names) > 8 else ''}, but {manifest.root_url} "
            f"holds {manifest.feature_names[:8]}{'...' if manifest.num_features > 8 else ''}: evaluate it on a "
            "partition output of the data it was trained on"
        )
    if spec.num_classes != (1 if manifest.num_classes == REGRESSION else manifest.num_classes):
        what = "a value (regression)" if spec.regression else f"{spec.num_classes} classes"
        has = "real-valued labels" if manifest.num_classes == REGRESSION else f"{manifest.num_classes} classes"
        raise ScoreError(f"model {model_uri} predicts {what}, {manifest.root_url} has {has}")
    assert inp.label_col is not None
    spark.sparkContext.setJobDescription(f"evaluate {model_uri} on {inp.description}")
    scored = predict(spark, inp, spec).select(PROBS, inp.label_col)
    sums_fn = functools.partial(_partition_sums, label_col=inp.label_col, num_classes=manifest.num_classes)
    parts = scored.mapInPandas(sums_fn, "sums array<double>").collect()  # type: ignore[arg-type]
    total = np.sum([np.asarray(r["sums"]) for r in parts], axis=0)
    return summarize(total, manifest.num_classes)


def _partition_sums(batches: Iterator[pd.DataFrame], label_col: str, num_classes: int) -> Iterator[pd.DataFrame]:
    total: np.ndarray | None = None
    for batch in batches:
        if len(batch) == 0:
            continue
        sums = batch_sums(np.stack(batch[PROBS].to_numpy()), batch[label_col].to_numpy(), num_classes)
        total = sums if total is None else total + sums
    if total is not None:
        yield pd.DataFrame({"sums": [total.tolist()]})


# ------------------------------------------------------------------------------------------- promote


def promote(cfg: JobConfig) -> Decision:
    """Register the evaluated candidate and move the alias if it wins; record the decision (idempotent)."""
    date, name, alias = _logical_date(cfg), cfg.promote.registered_model, cfg.promote.alias
    uri, metric = cfg.tracking.tracking_uri, cfg.promote.metric
    run_id = _promotion_run(cfg)
    if run_id is None:
        raise PromotionError(
            f"no evaluation of {name!r} recorded for promote.logical_date={date}: run jobs/evaluate.py with the "
            "same --set promote.logical_date first"
        )
    record = tracking.get_run_record(cfg.tracking, run_id, ())
    if record.tags.get(STAGE_TAG) == "decided":
        log.info("%s %s: decision already recorded in run %s; nothing to do", name, date, run_id)
        return _decision_from(record, alias, reused=True)
    candidate = record.tags["candidate_run_id"]
    evaluated_champion = record.tags["champion_version"]
    current = tracking.get_alias(uri, name, alias)
    if (current.version if current else NO_CHAMPION) != evaluated_champion:
        raise PromotionError(
            f"{name}@{alias} is version {current.version if current else NO_CHAMPION} now, but the evaluation in run "
            f"{run_id} compared against {evaluated_champion}: re-run jobs/evaluate.py for {date}"
        )
    cand_score = record.metrics.get(f"candidate_{metric}")
    if cand_score is None:
        raise PromotionError(f"run {run_id} has no candidate_{metric} (not finite?): choose another promote.metric")
    champ_score = record.metrics.get(f"champion_{metric}") if current else None
    version = tracking.find_model_version(uri, name, candidate) or tracking.register_model(
        uri, name, candidate, tags={"source_run_id": candidate, "registered_for": date}
    )
    if current is not None and current.version == version.version:
        promoted, reason = False, f"candidate is already {alias} (version {version.version})"
    else:
        promoted, reason = decide(metric, cfg.promote.min_improvement, cand_score, champ_score)
    if promoted:
        tracking.set_alias(uri, name, alias, version.version)
    decision = Decision(
        logical_date=date,
        registered_model=name,
        alias=alias,
        promotion_run_id=run_id,
        candidate_run_id=candidate,
        candidate_version=version.version,
        champion_before=current.version if current else None,
        champion_after=version.version if promoted else (current.version if current else None),
        promoted=promoted,
        reason=reason,
        metric=metric,
        candidate_score=cand_score,
        champion_score=champ_score,
        reused=False,
    )
    tracking.set_version_tags(
        uri, version, {"promotion_date": date, "promotion_decision": "promoted" if promoted else "kept"}
    )
    run = tracking.start_run(cfg, {}, kind=KIND, resume_run_id=run_id)
    tracking.set_tags(
        run,
        {
            STAGE_TAG: "decided",
            "decision": "promoted" if promoted else "kept",
            "decision_reason": reason,
            "metric": metric,
            "min_improvement": str(cfg.promote.min_improvement),
            "candidate_version": version.version,
            "champion_version_after": decision.champion_after or NO_CHAMPION,
        },
    )
    tracking.log_metrics(run, {"promoted": float(promoted)}, step=0)
    tracking.log_dict(run, asdict(decision), "decision.json")
    tracking.finish_run(run)
    return decision


def decide(metric: str, min_improvement: float, candidate: float, champion: float | None) -> tuple[bool, str]:
    """Whether the candidate wins, and why. log_loss, mse, rmse, mae: lower is better; accuracy, auc, r2: higher."""
    if champion is None:
        return True, "first model: there is no champion yet"
    gain = champion - candidate if metric in LOWER_IS_BETTER else candidate - champion
    verdict = "beats" if gain > min_improvement else "does not beat"
    return gain > min_improvement, (
        f"candidate {metric} {candidate:.6f} {verdict} champion's {champion:.6f} by more than "
        f"min_improvement {min_improvement} (improvement {gain:+.6f})"
    )


# ------------------------------------------------------------------------------------------- helpers


def _logical_date(cfg: JobConfig) -> str:
    if not cfg.promote.logical_date:
        raise PromotionError(
            "promote.logical_date is required (one promotion per date): e.g. --set promote.logical_date=2024-01-31 "
            "(Airflow: {{ ds }})"
        )
    return cfg.promote.logical_date


def _promotion_run(cfg: JobConfig) -> str | None:
    tags = {"kind": KIND, "registered_model": cfg.promote.registered_model, "logical_date": _logical_date(cfg)}
    found = tracking.find_runs(cfg.tracking, tags)
    return found[0] if found else None


def _evaluation_from(record: tracking.RunRecord, reused: bool) -> Evaluation:
    m, t = record.metrics, record.tags
    champion = t.get("champion_version", NO_CHAMPION)

    def scores(prefix: str) -> dict[str, float]:
        known = [k for names in SCORES.values() for k in names]
        return {k: m[f"{prefix}_{k}"] for k in known if f"{prefix}_{k}" in m} | {"rows": m.get("eval_rows", 0.0)}

    return Evaluation(
        logical_date=t["logical_date"],
        registered_model=t["registered_model"],
        promotion_run_id=record.run_id,
        candidate_run_id=t["candidate_run_id"],
        candidate=scores("candidate"),
        champion_version=None if champion == NO_CHAMPION else champion,
        champion_run_id=t.get("champion_run_id") or None,
        champion=None if champion == NO_CHAMPION else scores("champion"),
        rows=int(m.get("eval_rows", 0)),
        reused=reused,
    )


def _decision_from(record: tracking.RunRecord, alias: str, reused: bool) -> Decision:
    t, m = record.tags, record.metrics
    metric = t["metric"]

    def version(key: str) -> str | None:
        return None if t.get(key, NO_CHAMPION) == NO_CHAMPION else t[key]

    return Decision(
        logical_date=t["logical_date"],
        registered_model=t["registered_model"],
        alias=alias,
        promotion_run_id=record.run_id,
        candidate_run_id=t["candidate_run_id"],
        candidate_version=t["candidate_version"],
        champion_before=version("champion_version"),
        champion_after=version("champion_version_after"),
        promoted=t["decision"] == "promoted",
        reason=t["decision_reason"],
        metric=metric,
        candidate_score=m[f"candidate_{metric}"],
        champion_score=m.get(f"champion_{metric}") if version("champion_version") else None,
        reused=reused,
    )
