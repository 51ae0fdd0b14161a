#!/usr/bin/env bash
# Airflow in its own venv. Airflow 3's dependency tree (SQLAlchemy 2, FastAPI, pydantic, pyarrow >= 18 through
# the Spark provider's pyspark-client) cannot share .venv with the project's pinned stack (pyarrow 14,
# pyspark 3.5), and it does not need to: the DAG only runs the project venv's spark-submit.
#
#   scripts/setup_airflow.sh venv [VENV]   create VENV (default .venv-airflow) with the pinned Airflow + Spark provider
#   scripts/setup_airflow.sh home          initialise $AIRFLOW_HOME: airflow.cfg (sqlite, dags folder = airflow_dags/,
#                                          no examples), `airflow db migrate`, and the Spark connection
#                                          $SPARK_CONN_ID (default spark_local) with master $SPARK_MASTER
#                                          (default local[2]; e.g. spark://127.0.0.1:7077 for `make cluster-up`)
#
# Every package is pinned in scripts/airflow-constraints.txt (a pip freeze of the two pins below). To move to
# a new Airflow: bump the pins, create a fresh venv without -c, run the tests, `pip freeze` into that file.
set -euo pipefail

AIRFLOW_VERSION=3.3.2
SPARK_PROVIDER_VERSION=6.3.4
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"

make_venv() {
  local venv="${1:-$REPO/.venv-airflow}"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet -c "$REPO/scripts/airflow-constraints.txt" \
    "apache-airflow==$AIRFLOW_VERSION" "apache-airflow-providers-apache-spark==$SPARK_PROVIDER_VERSION"
  "$venv/bin/airflow" version
}

init_home() {
  : "${AIRFLOW_HOME:?set AIRFLOW_HOME (make airflow-setup uses work/airflow)}"
  local venv="${AIRFLOW_VENV:-$REPO/.venv-airflow}"
  local conn="${SPARK_CONN_ID:-spark_local}" master="${SPARK_MASTER:-local[2]}"
  mkdir -p "$AIRFLOW_HOME"
  # Only what differs from Airflow's defaults; everything else keeps its default value.
  cat > "$AIRFLOW_HOME/airflow.cfg" <<EOF
[core]
dags_folder = $REPO/airflow_dags
load_examples = False
[database]
sql_alchemy_conn = sqlite:///$AIRFLOW_HOME/airflow.db
[logging]
base_log_folder = $AIRFLOW_HOME/logs
EOF
  "$venv/bin/airflow" db migrate >/dev/null
  "$venv/bin/airflow" connections delete "$conn" >/dev/null 2>&1 || true
  # conn-type spark with the whole master URL as host: the provider passes it to --master unchanged.
  "$venv/bin/airflow" connections add "$conn" --conn-type spark --conn-host "$master" >/dev/null
  echo "AIRFLOW_HOME=$AIRFLOW_HOME ready: connection $conn -> --master $master"
}

case "${1:-}" in
  venv) make_venv "${2:-}" ;;
  home) init_home ;;
  *) echo "usage: $0 venv [VENV] | home   (see the header of this script)" >&2; exit 2 ;;
esac
