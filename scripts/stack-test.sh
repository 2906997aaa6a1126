#!/usr/bin/env bash
# The stack as deployed: creates config/cloudformation.yaml on moto's
# CloudFormation and runs the worker with the task definition it made
# (scripts/stack_test.py says what is checked). The worker runs from the
# image (scripts/image.sh) when it is there, else from the debug binary.
#
#   scripts/stack-test.sh                 image if present, else the binary
#   FANOUT_DEV_STACK_WORKER=binary scripts/stack-test.sh
#
# Installs moto with the CloudFormation extras into .local/venv-stack (its
# own venv: the emulators' .local/venv stays as scripts/emulators.sh makes it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MOTO_VERSION=5.2.5
VENV="$ROOT/.local/venv-stack"
WORK="$ROOT/.local/stack"
IMAGE="${FANOUT_DEV_IMAGE:-fanout:local}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
PIN="moto[server,cloudformation,sqs,dynamodb,ecs,iam,logs,sns,cloudwatch,applicationautoscaling]==$MOTO_VERSION"

die() {
  echo "stack-test: $*" >&2
  exit 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV" || die "python3 -m venv failed; install python3-venv"
fi
if [[ "$(cat "$VENV/.pin" 2>/dev/null)" != "$PIN" ]]; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$PIN" flask flask-cors
  printf '%s\n' "$PIN" >"$VENV/.pin"
fi

worker=(--image "$IMAGE")
if [[ "${FANOUT_DEV_STACK_WORKER:-}" == binary ]] || ! command -v podman >/dev/null \
  || ! podman image exists "$IMAGE" 2>/dev/null; then
  worker=(--binary "$TARGET/debug/fanout")
fi
if [[ ! -x "$TARGET/debug/fanout-dev" || ( "${worker[0]}" == --binary && ! -x "$TARGET/debug/fanout" ) ]]; then
  nice -n 10 cargo build --quiet --bin fanout --bin fanout-dev
fi

# shellcheck source=scripts/local.sh
source "$ROOT/scripts/local.sh"
port=5401
while ! port_free "$port"; do port=$((port + 1)); done

rm -rf "$WORK"
mkdir -p "$WORK"
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$WORK/moto.log" 2>&1 &
MOTO=$!
trap 'kill "$MOTO" 2>/dev/null || true; wait "$MOTO" 2>/dev/null || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for _ in $(seq 100); do
  port_free "$port" || break
  kill -0 "$MOTO" 2>/dev/null || die "moto did not start: $(tail -n 5 "$WORK/moto.log")"
  sleep 0.1
done

"$VENV/bin/python" scripts/stack_test.py --moto "http://127.0.0.1:$port" "${worker[@]}" \
  --dev "$TARGET/debug/fanout-dev" --work "$WORK"
