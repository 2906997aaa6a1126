#!/usr/bin/env bash
# The dependency policy (deny.toml): licenses, bans and sources of every crate
# in Cargo.lock, checked with a pinned cargo-deny. Installs it into
# .local/cargo-deny on first use (`cargo install --locked`, a release build:
# 5 min 31 s wall and 297 s of CPU on a busy two-core machine) and skips the
# install when that version is already there; the check itself takes 2 s.
#
#   scripts/deny.sh            install if needed, then check
#   scripts/deny.sh install    install only
#
# Advisories are not checked: that needs the RustSec database, fetched from
# GitHub at check time, which CI machines here cannot reach. Run
# `cargo deny check advisories` where the network allows it.
set -euo pipefail

CARGO_DENY_VERSION=0.20.2

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$ROOT/.local/cargo-deny"
BIN="$PREFIX/bin/cargo-deny"

install() {
  if [[ -x "$BIN" && "$("$BIN" --version 2>/dev/null)" == "cargo-deny $CARGO_DENY_VERSION" ]]; then
    return
  fi
  echo "deny: installing cargo-deny $CARGO_DENY_VERSION into $PREFIX (a release build, several minutes)" >&2
  cargo install --locked --quiet --root "$PREFIX" "cargo-deny@$CARGO_DENY_VERSION"
}

install
[[ "${1:-}" == install ]] && exit 0
cd "$ROOT"
"$BIN" --manifest-path Cargo.toml check --hide-inclusion-graph licenses bans sources
