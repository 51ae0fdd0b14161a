#!/usr/bin/env bash
# Reproduce the MLflow UI screenshots in docs/: a small generate -> partition -> train -> evaluate -> promote
# run in its own work dir, the MLflow server on it (127.0.0.1 only), and headless Chromium screenshots of the
# training run's page (overview with its dataset, model metrics in their sections, system metrics per rank)
# and of the registered model's page. Needs Debian's chromium (apt-get install -y chromium); Playwright goes
# into .venv-docs on first use. Docs only, not CI.
#
#   scripts/screenshot_ui.sh [WORK_DIR=work/ui-demo] [OUT_DIR=docs]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-work/ui-demo}
OUT=${2:-docs}
PY=.venv/bin/python
export SPARK_LOCAL_IP=127.0.0.1 PYSPARK_PYTHON=$PWD/$PY PYSPARK_DRIVER_PYTHON=$PWD/$PY
SETS=(--set "paths.work_dir=$WORK" --set generate.rows=20000 --set generate.features=8
      --set partition.row_group_mb=0.2 --set train.epochs=5 --set train.batch_size=128
      --set tracking.run_name=ui-demo --set promote.logical_date=2024-01-31 --set tracking.system_metrics_s=1)

summary=$($PY -m jobs.main --config conf/local.yaml "${SETS[@]}" | tail -n 1)
$PY -m jobs.evaluate --config conf/local.yaml "${SETS[@]}" | tail -n 1
$PY -m jobs.promote --config conf/local.yaml "${SETS[@]}" | tail -n 1
read -r EXP RUN < <(echo "$summary" | $PY -c 'import json,sys; t=json.load(sys.stdin)["train"]; print(t["experiment_id"], t["run_id"])')

PORT=$($PY -c 'from sparkml_dist.experiments.ui import free_port; print(free_port())')
setsid $PY -m sparkml_dist.experiments.ui --config conf/local.yaml "${SETS[@]}" --port "$PORT" >"$WORK/ui.log" 2>&1 &
SERVER=$!
trap 'kill -TERM -- -$SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat "$WORK/ui.log"; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "server did not answer in 180 s" >&2; exit 1; }

MODEL=$($PY -c 'from sparkml_dist.config import load_config; print(load_config("conf/local.yaml").promote.registered_model)')
# the pages are driven by Playwright (its own venv, docs only) in Debian's chromium
[ -x .venv-docs/bin/python ] || { python3 -m venv .venv-docs && .venv-docs/bin/pip install -q 'playwright==1.*'; }
.venv-docs/bin/python scripts/shoot_pages.py "http://127.0.0.1:$PORT" "$OUT" \
  "mlflow-ui-run.png=experiments/$EXP/runs/$RUN" \
  "mlflow-ui-metrics.png=experiments/$EXP/runs/$RUN/model-metrics" \
  "mlflow-ui-system-metrics.png=experiments/$EXP/runs/$RUN/system-metrics" \
  "mlflow-ui-registry.png=models/$MODEL"
