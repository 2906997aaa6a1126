#!/usr/bin/env bash
# The test command: installs and starts the emulators on test ports (5330/5331
# by default, so a running demo on 5320/5321 does not clash), runs every test
# target against them, and stops them however the run ends.
#
#   ./scripts/test.sh                       all tests
#   ./scripts/test.sh --test pipeline       extra arguments go to `cargo test`;
#                                           a target selector runs only that target
#   ./scripts/test.sh --test adapters sqs_adapter::   one file of a layer's binary
#   ./scripts/test.sh -p fanout-core --lib  one package's unit tests
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# shellcheck source=scripts/local.sh
source "$ROOT/scripts/local.sh"
# Ports given by the caller are used as they are (and refused if taken).
# Otherwise the first free pair from 5330/5331 up, so several checkouts on
# one machine can test at once.
if [[ -z "${FANOUT_DEV_EMU_SQS_PORT:-}" && -z "${FANOUT_DEV_EMU_DYNAMODB_PORT:-}" ]]; then
  FANOUT_DEV_EMU_SQS_PORT=5330
  for candidate in $(seq 5330 2 5358); do
    if port_free "$candidate" && port_free "$((candidate + 1))"; then
      FANOUT_DEV_EMU_SQS_PORT="$candidate"
      break
    fi
  done
  FANOUT_DEV_EMU_DYNAMODB_PORT="$((FANOUT_DEV_EMU_SQS_PORT + 1))"
fi
export FANOUT_DEV_EMU_SQS_PORT="${FANOUT_DEV_EMU_SQS_PORT:-5330}"
export FANOUT_DEV_EMU_DYNAMODB_PORT="${FANOUT_DEV_EMU_DYNAMODB_PORT:-5331}"

./scripts/emulators.sh install
trap './scripts/emulators.sh stop' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
./scripts/emulators.sh start
eval "$(./scripts/emulators.sh env)"

# With a target selector (`--test NAME`, `--lib`, …) run just that; cargo
# would otherwise run every target alongside it. With a package (`-p NAME`)
# run that package's: `--workspace` would add every other one.
all_targets=(--all-targets)
workspace=(--workspace)
for arg in "$@"; do
  case "$arg" in
    --test | --test=* | --lib | --bin | --bin=* | --bins | --tests | --doc | --examples | --benches)
      all_targets=()
      ;;
    -p | -p?* | --package | --package=*)
      workspace=()
      ;;
  esac
done
cargo test "${workspace[@]}" "${all_targets[@]}" "$@"
