#!/usr/bin/env bash
# The test command: installs and starts the emulators on test ports (so a
# running demo on the default ports does not clash), runs every test target
# against them, and stops them however the run ends.
#
#   ./scripts/test.sh                       all tests
#   ./scripts/test.sh --test sqs_adapter    extra arguments go to `cargo test`;
#                                           a target selector runs only that target
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

# With a target selector (`--test NAME`, `--lib`, …) run just that; cargo
# would otherwise run every target alongside it.
all_targets=(--all-targets)
for arg in "$@"; do
  case "$arg" in
    --test | --test=* | --lib | --bin | --bin=* | --bins | --tests | --doc | --examples | --benches)
      all_targets=()
      ;;
  esac
done
cargo test "${all_targets[@]}" "$@"
