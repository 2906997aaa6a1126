#!/usr/bin/env bash
# The test command: installs and starts the emulators on test ports (so a
# running demo on the default ports does not clash), runs every test target
# against them, and stops them however the run ends.
#
#   ./scripts/test.sh                       all tests
#   ./scripts/test.sh --test sqs_adapter    extra arguments go to `cargo test`
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export FANOUT_EMU_SQS_PORT="${FANOUT_EMU_SQS_PORT:-5330}"
export FANOUT_EMU_DYNAMODB_PORT="${FANOUT_EMU_DYNAMODB_PORT:-5331}"

./scripts/emulators.sh install
trap './scripts/emulators.sh stop' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
./scripts/emulators.sh start
eval "$(./scripts/emulators.sh env)"

cargo test --all-targets "$@"
