# fanout's container image: a release build of the `fanout` binary on
# distroless (glibc, CA certificates, no shell), running as a non-root user.
#
# CI builds this file as it is, with podman, against local stand-ins for the
# two base images (scripts/image.sh, docs/image.md), then runs the image the
# way the task definition runs it.

ARG RUST_VERSION=1.95

# The workspace's manifests alone, every member's, whatever the members are:
# the dependency layer below is rebuilt only when one of them or Cargo.lock
# changes, not on every source edit.
FROM rust:${RUST_VERSION}-slim-bookworm AS manifests
WORKDIR /src
COPY crates ./crates
RUN find crates -type f ! -name Cargo.toml -delete \
    && find crates -depth -type d -empty -delete

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer. A stub library and a stub binary
# stand in for each member's sources (Cargo loads every member of the
# workspace, and `--bin fanout` needs its binary target); the stubs'
# artefacts are removed so the real build cannot reuse them.
COPY Cargo.toml Cargo.lock ./
COPY --from=manifests /src/crates ./crates
RUN for manifest in crates/*/Cargo.toml; do \
        dir="${manifest%/Cargo.toml}"; \
        mkdir -p "$dir/src" && touch "$dir/src/lib.rs" \
            && echo 'fn main() {}' > "$dir/src/main.rs"; \
    done \
    && cargo build --release --locked -p fanout --bin fanout \
    && for manifest in crates/*/Cargo.toml; do \
        name="$(sed -n '/^name *=/{s/^name *= *"\(.*\)"/\1/p;q;}' "$manifest")"; \
        crate="$(sed -n '/^name *=/{s/^name *= *"\(.*\)"/\1/;y/-/_/;p;q;}' "$manifest")"; \
        rm -rf "target/release/.fingerprint/$name-"* "target/release/deps/$crate-"* \
            "target/release/deps/lib$crate-"* "target/release/$name"; \
    done \
    && rm -rf crates

# config/default.toml is compiled into the binary. Only the `fanout`
# package is built: the development tools (crates/dev) never reach the image.
COPY config ./config
COPY crates ./crates
# The commit built (scripts/image.sh passes `git rev-parse HEAD`), for
# `fanout --version`: the build context has no .git for build.rs to read.
ARG REVISION=unknown
# Line tables and symbols are for local profiling; the image drops them to
# stay small (measured in docs/deploy.md).
RUN FANOUT_DEV_COMMIT="$REVISION" cargo build --release --locked -p fanout --bin fanout \
    && strip target/release/fanout \
    && cp target/release/fanout /fanout

# cc: glibc and libgcc for the Rust binary, CA certificates for TLS to AWS.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /fanout /fanout
# The same commit as a label; declared again here (an ARG ends with its
# stage), last, so it changes no layer of this stage.
ARG REVISION=unknown
LABEL org.opencontainers.image.revision=$REVISION \
      org.opencontainers.image.title=fanout
# 65532 is distroless's `nonroot`; numeric so ECS and Kubernetes can verify
# runAsNonRoot.
USER 65532:65532
# The worker stops receiving on SIGTERM, lets running jobs finish within
# shutdown_grace and hands the rest back to the queue.
STOPSIGNAL SIGTERM
# `fanout health` asks the worker's own /healthz (127.0.0.1:9102): no curl
# in distroless.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/fanout", "health"]
ENTRYPOINT ["/fanout"]
CMD ["run"]
