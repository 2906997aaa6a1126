#!/usr/bin/env bash
# Local AWS emulators for development and tests: moto (SQS, SNS) and dynalite
# (DynamoDB), installed into .local/ and bound to 127.0.0.1; serverless-offline
# (a local API Gateway WebSocket stand-in, stage-less) for the peer tests.
#
#   scripts/emulators.sh install   pinned versions into .local/venv, .local/node, .local/node-sls
#                                  and .local/node-producers
#   scripts/emulators.sh start     both servers on FANOUT_DEV_EMU_SQS_PORT / FANOUT_DEV_EMU_DYNAMODB_PORT
#   scripts/emulators.sh stop      the servers started for those ports (by their pid files)
#   scripts/emulators.sh env       export lines pointing the AWS SDK at them
set -euo pipefail

MOTO_VERSION=5.2.5
# The Velocity engine the WebSocket request templates are rendered with in
# the tests (crates/fanout/tests/websocket_stack.rs, scripts/ws_templates.py).
AIRSPEED_VERSION=0.7.1
DYNALITE_VERSION=4.0.0
# serverless-offline 14 needs serverless 4, whose npm package downloads the
# framework at run time and needs a login; 13.x runs under serverless 3.
SERVERLESS_VERSION=3.40.0
SERVERLESS_OFFLINE_VERSION=13.9.0
# The producers under examples/ and the job schema's validator
# (crates/fanout/tests/producers.rs, contract/job_schema.rs): the AWS CLI v1 and boto3
# of one botocore release, Python's jsonschema, the AWS SDK for JavaScript v3.
PRODUCER_PIP=(awscli==1.46.3 boto3==1.44.3 jsonschema==4.23.0)
AWS_SDK_JS_VERSION=3.1178.0

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="$ROOT/.local"
VENV="$LOCAL/venv"
NODE_PREFIX="$LOCAL/node"
SLS_PREFIX="$LOCAL/node-sls"
PRODUCERS_PREFIX="$LOCAL/node-producers"
SQS_PORT="${FANOUT_DEV_EMU_SQS_PORT:-5320}"
DYNAMODB_PORT="${FANOUT_DEV_EMU_DYNAMODB_PORT:-5321}"
RUN="$LOCAL/run/$SQS_PORT-$DYNAMODB_PORT"
READY_SECONDS=20

die() {
  echo "emulators: $*" >&2
  exit 1
}

install() {
  # The TLS tests (tests/lean_peers.rs) make a test CA with the openssl CLI;
  # a bare machine may lack it, and as root (CI) it is one package away.
  if ! command -v openssl >/dev/null; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
      (apt-get update -qq && apt-get install -y -qq openssl) >/dev/null || die "cannot install openssl"
    else
      die "openssl not found; install it (the TLS tests make a test CA with it)"
    fi
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV" || die "python3 -m venv failed; install python3-venv"
  fi
  # pip's own check makes a repeated install quick, but skipping it is quicker.
  if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(any(m.version(p) != v for p, v in (a.split('==') for a in sys.argv[1:])))" \
    "moto==$MOTO_VERSION" "${PRODUCER_PIP[@]}" 2>/dev/null \
    || [[ ! -x "$VENV/bin/moto_server" ]]; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
      "moto[sqs,dynamodb,sns,events]==$MOTO_VERSION" flask flask-cors "${PRODUCER_PIP[@]}"
  fi
  if [[ "$(node_version "$PRODUCERS_PREFIX" @aws-sdk/client-sqs)" != "$AWS_SDK_JS_VERSION" ]]; then
    mkdir -p "$PRODUCERS_PREFIX"
    npm install --silent --no-audit --no-fund --prefix "$PRODUCERS_PREFIX" "@aws-sdk/client-sqs@$AWS_SDK_JS_VERSION"
  fi
  if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('airspeed') != '$AIRSPEED_VERSION')" 2>/dev/null; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "airspeed==$AIRSPEED_VERSION"
  fi
  if [[ "$(node -p "try{require('$NODE_PREFIX/node_modules/dynalite/package.json').version}catch(e){''}" 2>/dev/null)" != "$DYNALITE_VERSION" ]]; then
    command -v npm >/dev/null || die "npm not found; install nodejs and npm"
    mkdir -p "$NODE_PREFIX"
    npm install --silent --no-audit --no-fund --prefix "$NODE_PREFIX" "dynalite@$DYNALITE_VERSION"
  fi
  if [[ "$(node_version "$SLS_PREFIX" serverless)" != "$SERVERLESS_VERSION" \
    || "$(node_version "$SLS_PREFIX" serverless-offline)" != "$SERVERLESS_OFFLINE_VERSION" ]]; then
    command -v npm >/dev/null || die "npm not found; install nodejs and npm"
    mkdir -p "$SLS_PREFIX"
    npm install --silent --no-audit --no-fund --prefix "$SLS_PREFIX" \
      "serverless@$SERVERLESS_VERSION" "serverless-offline@$SERVERLESS_OFFLINE_VERSION"
  fi
}

# The installed version of an npm package under a prefix, or nothing.
node_version() {
  node -p "try{require('$1/node_modules/$2/package.json').version}catch(e){''}" 2>/dev/null
}

port_taken() {
  # bash's /dev/tcp connects: success means something already listens.
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

answers() {
  local port="$1"
  curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$port/" 2>/dev/null || port_taken "$port"
}

running() {
  local pidfile="$RUN/$1.pid"
  [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

start() {
  [[ -x "$VENV/bin/moto_server" && -f "$NODE_PREFIX/node_modules/dynalite/cli.js" ]] \
    || die "not installed; run: $0 install"
  if running sqs && running dynamodb; then
    echo "emulators: already running on $SQS_PORT/$DYNAMODB_PORT (state in $RUN)"
    return
  fi
  # Half a pair (one server died) is restarted whole.
  stop
  local port
  for port in "$SQS_PORT" "$DYNAMODB_PORT"; do
    if port_taken "$port"; then
      die "port $port on 127.0.0.1 is taken by another process; stop it or set FANOUT_DEV_EMU_SQS_PORT / FANOUT_DEV_EMU_DYNAMODB_PORT"
    fi
  done
  mkdir -p "$RUN"
  "$VENV/bin/moto_server" -H 127.0.0.1 -p "$SQS_PORT" >"$RUN/sqs.log" 2>&1 &
  echo $! >"$RUN/sqs.pid"
  node "$NODE_PREFIX/node_modules/dynalite/cli.js" --host 127.0.0.1 --port "$DYNAMODB_PORT" \
    --createTableMs 0 --deleteTableMs 0 >"$RUN/dynamodb.log" 2>&1 &
  echo $! >"$RUN/dynamodb.pid"

  local deadline=$((SECONDS + READY_SECONDS)) name
  for name in sqs dynamodb; do
    port="$SQS_PORT"
    [[ "$name" == dynamodb ]] && port="$DYNAMODB_PORT"
    until answers "$port"; do
      if ! running "$name" || ((SECONDS >= deadline)); then
        echo "emulators: $name did not come up on 127.0.0.1:$port; its log ends with:" >&2
        tail -n 20 "$RUN/$name.log" >&2 || true
        stop
        exit 1
      fi
      sleep 0.2
    done
  done
  echo "emulators: SQS on 127.0.0.1:$SQS_PORT, DynamoDB on 127.0.0.1:$DYNAMODB_PORT (state in $RUN)"
}

stop() {
  local name pidfile pid
  for name in sqs dynamodb; do
    pidfile="$RUN/$name.pid"
    [[ -f "$pidfile" ]] || continue
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

env_lines() {
  cat <<ENV
export AWS_ENDPOINT_URL_SQS=http://127.0.0.1:$SQS_PORT
export AWS_ENDPOINT_URL_DYNAMODB=http://127.0.0.1:$DYNAMODB_PORT
export AWS_ENDPOINT_URL_SNS=http://127.0.0.1:$SQS_PORT
export AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_EC2_METADATA_DISABLED=true
ENV
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  env) env_lines ;;
  *) die "usage: $0 install|start|stop|env" ;;
esac
