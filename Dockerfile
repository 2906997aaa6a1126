# fanout's container image: a release build of the `fanout` binary on
# distroless (glibc, CA certificates, no shell), running as a non-root user.
#
# The build command below is the one CI runs (`cargo build --release --locked
# -p fanout --bin fanout`, see docs/deploy.md): no Docker engine runs in CI, so what CI
# compiles is what this image ships.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when a
# manifest or Cargo.lock changes, not on every source edit. Stub crates stand
# in for the sources (every workspace member must exist for Cargo to load the
# workspace); their artefacts are removed so the real build cannot reuse them.
COPY Cargo.toml Cargo.lock ./
COPY crates/core/Cargo.toml crates/core/
COPY crates/aws/Cargo.toml crates/aws/
COPY crates/fanout/Cargo.toml crates/fanout/
COPY crates/dev/Cargo.toml crates/dev/
RUN for crate in core aws fanout dev; do \
        mkdir -p "crates/$crate/src" && touch "crates/$crate/src/lib.rs"; \
    done \
    && echo 'fn main() {}' > crates/fanout/src/main.rs \
    && echo 'fn main() {}' > crates/dev/src/main.rs \
    && cargo build --release --locked -p fanout --bin fanout \
    && rm -rf crates/*/src target/release/fanout target/release/deps/fanout* \
        target/release/deps/libfanout* target/release/.fingerprint/fanout*

# config/default.toml is compiled into the binary. Only the `fanout`
# package is built: the development tools (crates/dev) never reach the image.
COPY config ./config
COPY crates ./crates
# Line tables and symbols are for local profiling; the image drops them to
# stay small (measured in docs/deploy.md).
RUN cargo build --release --locked -p fanout --bin fanout \
    && strip target/release/fanout \
    && cp target/release/fanout /fanout

# cc: glibc and libgcc for the Rust binary, CA certificates for TLS to AWS.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /fanout /fanout
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
