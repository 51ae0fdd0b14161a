"""What a metric is called in MLflow: sections by prefix, so the run page reads well.

The code keeps flat names (``train_loss``, ``val_log_loss``, ``epoch_s``: the history dicts, checkpoints, job
summaries and plots use them). At the MLflow boundary each name gets a section prefix; MLflow's run page draws
one section per prefix and orders the sections by plain string comparison (measured on MLflow 3.17: ``1_x``,
``Loss``, ``comm``, ``time``, ``train``, ``val``), and it shows every ``system/...`` name on the System metrics
tab instead of Model metrics. So what the model learned goes under ``train/`` and ``val/`` (the Model metrics
tab then opens on the loss curves: ``train`` < ``val``, nothing sorts before them), and how the system ran goes
beside the per-rank host samples on the System metrics tab: ``system/time/`` (durations and throughput),
``system/comm/`` (traffic, staleness), ``system/run/`` (attempts, resumes). Promotion runs get
``candidate/``, ``champion/`` and ``promotion/``; baselines their ``final/`` scores; scoring runs ``score/``
(rows, unseen categories per column). The mapping (an exact
table, then prefixes, then patterns; the first that matches wins) is applied only by ``tracking``: names are
sectioned when logged, and a run read back has its metrics under the flat names again (``flat_key``), so
code never spells an MLflow name.
"""

from __future__ import annotations

import re

TIME, COMM, RUN = "system/time/", "system/comm/", "system/run/"
SECTIONED = re.compile(r"^(system|train|val|final|candidate|champion|promotion|score)/")
"""Names that already carry a section (the per-rank host samples ``system/rank0/...``): logged as they are."""
EXACT: dict[str, str] = {
    "lr": "train/lr",
    "steps_per_epoch": "train/steps_per_epoch",
    "rows_per_s": TIME + "rows_per_s",
    "comm_bytes_per_step": COMM + "bytes_per_step",
    "comm_wire_bytes_per_rank_per_step": COMM + "wire_bytes_per_rank_per_step",
    "comm_rounds": COMM + "rounds",
    **{k: RUN + k for k in ("attempt", "restart_attempt", "resumed_from_epoch", "resumed_from_step")},
    **{k: "promotion/" + k for k in ("promoted", "eval_rows")},
}
PREFIXES: tuple[tuple[str, str], ...] = (
    ("train_", "train/"),
    ("val_", "val/"),
    ("step_val_", "val_steps/"),  # mid-epoch evaluations (train.eval_every_steps), at global steps, not epochs
    ("final_", "final/"),
    ("candidate_", "candidate/"),
    ("champion_", "champion/"),
    ("score_", "score/"),
)
"""(flat prefix, section): the prefix is replaced by the section (``val_auc`` -> ``val/auc``)."""
PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"_s$"), TIME),  # every duration: epoch_s, comm_s, bound_wait_s, load_s ...
    (re.compile(r"bytes|staleness|rounds|^ps_|^comm_"), COMM),
)
"""(pattern, section): the section goes in front of the whole name (``epoch_s`` -> ``system/time/epoch_s``)."""
FALLBACK = RUN
"""The section of a name no rule knows (so every metric sits in a section and none falls among the losses)."""
_INVERSE = {v: k for k, v in EXACT.items()}


def mlflow_key(name: str) -> str:
    """The name ``name`` is logged under in MLflow: ``train_loss`` -> ``train/loss``, ``val_auc`` ->
    ``val/auc``, ``epoch_s`` -> ``system/time/epoch_s``, ``comm_bytes_per_step`` -> ``system/comm/bytes_per_step``.
    Rules in order: already sectioned, the exact table, the prefixes, the patterns, the fallback."""
    if SECTIONED.match(name):
        return name
    if name in EXACT:
        return EXACT[name]
    for prefix, section in PREFIXES:
        if name.startswith(prefix):
            return section + name[len(prefix) :]
    for pattern, section in PATTERNS:
        if pattern.search(name):
            return section + name
    return FALLBACK + name


def flat_key(key: str) -> str:
    """The flat name a logged MLflow name came from (``mlflow_key``'s inverse; a name it cannot have made,
    such as ``system/rank0/cpu_utilization_percentage``, is its own flat name)."""
    if key in _INVERSE:
        return _INVERSE[key]
    candidates = [p + key[len(s) :] for p, s in PREFIXES if key.startswith(s)]
    candidates += [key[len(s) :] for s in (TIME, COMM, RUN) if key.startswith(s)]
    return next((c for c in candidates if mlflow_key(c) == key), key)
