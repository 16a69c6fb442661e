# Shared steps of scripts/run-local, scripts/test and .ci/run. Source it; do not run it.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# The virtual environment, installed from the hash-pinned lock (again only when the lock changed).
ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating the virtual environment (.venv)"
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  local want have
  want=$(sha256sum "$ROOT/requirements.lock" | cut -d' ' -f1)
  have=$(cat "$VENV/.lock.sha256" 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    log "installing dependencies from requirements.lock"
    if command -v uv >/dev/null 2>&1; then
      uv pip sync --quiet --require-hashes --python "$VENV/bin/python" "$ROOT/requirements.lock"
    else
      "$VENV/bin/pip" install --quiet --require-hashes --no-deps -r "$ROOT/requirements.lock"
    fi
    echo "$want" >"$VENV/.lock.sha256"
  fi
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "$what did not come up within ${seconds}s"
      return 1
    fi
    sleep 1
  done
}

# PostgreSQL and RabbitMQ on this machine (with RabbitMQ's management API): start what is down.
ensure_services() {
  if ! pg_isready -q -h 127.0.0.1; then
    log "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    wait_for 60 PostgreSQL pg_isready -q -h 127.0.0.1
  fi
  if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    log "starting RabbitMQ"
    rabbitmq-server -detached
    wait_for 120 RabbitMQ rabbitmq-diagnostics -q check_running
  fi
  # The UI and HTTP API on :15672, and the shovel behind the UI's "Move messages".
  local enabled
  enabled=$(rabbitmq-plugins list --enabled --minimal 2>/dev/null || true)
  if ! grep -qx rabbitmq_shovel_management <<<"$enabled" \
    || ! grep -qx rabbitmq_management <<<"$enabled"; then
    log "enabling the RabbitMQ management and shovel plugins"
    rabbitmq-plugins enable --quiet rabbitmq_management rabbitmq_shovel \
      rabbitmq_shovel_management >/dev/null
  fi
  if ! curl -fsu guest:guest http://127.0.0.1:15672/api/overview >/dev/null 2>&1; then
    wait_for 60 "RabbitMQ management API" curl -fsu guest:guest http://127.0.0.1:15672/api/overview
  fi
}

# Tools the tests and the local run call: Debian's prometheus package (prometheus, and promtool,
# which checks the metrics format).
ensure_tools() {
  if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    log "installing promtool (Debian package prometheus)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || {
      apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    }
  fi
}

ensure_wrk() {  # the HTTP load generator (Debian's package)
  if ! command -v wrk >/dev/null 2>&1; then
    log "installing wrk (Debian package)"
    apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq wrk >/dev/null; }
  fi
}

ensure_nginx() {  # the edge in front of the gateway (Debian's package; nginx/edge.conf)
  if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    log "installing nginx (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends nginx >/dev/null 2>&1 || {
      apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends nginx >/dev/null
    }
  fi
}

ensure_haproxy() {  # the RabbitMQ cluster's load balancer in tests/cluster (Debian's package)
  if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
    log "installing haproxy (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends haproxy >/dev/null 2>&1 || {
      apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends haproxy >/dev/null
    }
  fi
}

# The edge's limits, with the issue's defaults; each one an environment variable.
EDGE_VARIABLES='${EDGE_LISTEN} ${EDGE_UPSTREAM} ${EDGE_RUN_DIR} ${EDGE_TEMP_DIR} ${EDGE_WORKER_PROCESSES}
${EDGE_WORKER_CONNECTIONS} ${EDGE_MAX_CONNECTIONS} ${EDGE_HEADER_TIMEOUT} ${EDGE_BODY_TIMEOUT}
${EDGE_KEEPALIVE_TIMEOUT} ${EDGE_HEADER_BUFFERS} ${EDGE_MAX_BODY_SIZE}'

# render_edge_conf LISTEN UPSTREAM RUN_DIR TEMP_DIR: writes RUN_DIR/edge.conf. TEMP_DIR holds
# request bodies; nginx's workers must reach it (a folder of /tmp, say, not of a private home).
render_edge_conf() {
  mkdir -p "$3" "$4"
  EDGE_LISTEN=$1 EDGE_UPSTREAM=$2 EDGE_RUN_DIR=$3 EDGE_TEMP_DIR=$4 \
    EDGE_WORKER_PROCESSES=${EDGE_WORKER_PROCESSES:-auto} \
    EDGE_WORKER_CONNECTIONS=${EDGE_WORKER_CONNECTIONS:-4096} \
    EDGE_MAX_CONNECTIONS=${EDGE_MAX_CONNECTIONS:-1000} \
    EDGE_HEADER_TIMEOUT=${EDGE_HEADER_TIMEOUT:-10s} \
    EDGE_BODY_TIMEOUT=${EDGE_BODY_TIMEOUT:-30s} \
    EDGE_KEEPALIVE_TIMEOUT=${EDGE_KEEPALIVE_TIMEOUT:-5s} \
    EDGE_HEADER_BUFFERS=${EDGE_HEADER_BUFFERS:-2 8k} \
    EDGE_MAX_BODY_SIZE=${EDGE_MAX_BODY_SIZE:-1m} \
    envsubst "$EDGE_VARIABLES" <"$ROOT/nginx/edge.conf" >"$3/edge.conf"
}
