#!/usr/bin/env bash
# Builds fanout's container image from the Dockerfile as users build it, and
# runs it the way the ECS task runs it. No container registry and no Docker
# daemon are needed: podman from Debian's packages builds against two local
# stand-ins for the base images, tagged with exactly the names the Dockerfile
# pulls (docs/image.md says what they hold and how they differ).
#
#   scripts/image.sh           setup, bases, build, run (what CI runs)
#   scripts/image.sh setup     podman, buildah, runc, debootstrap and the drop-in
#   scripts/image.sh bases     the two stand-in base images (kept if present)
#   scripts/image.sh build     podman build of the Dockerfile
#   scripts/image.sh run       the image, run as the task runs it, against the emulators
#
# FANOUT_DEV_IMAGE names the image (fanout:local). Every build runs under nice.
# If the builder cannot run, this fails: it never skips.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

IMAGE="${FANOUT_DEV_IMAGE:-fanout:local}"
RUST_VERSION="$(sed -n 's/^ARG RUST_VERSION=//p' Dockerfile)"
BUILD_BASE="docker.io/library/rust:${RUST_VERSION}-slim-bookworm"
RUNTIME_BASE="gcr.io/distroless/cc-debian12:nonroot"
DROP_IN=/etc/containers/containers.conf.d/fanout-ci.conf
HOST_CA=/etc/ssl/certs/ca-certificates.crt
WORK="$ROOT/.local/image"
# distroless's cc-debian12 package list (its BUILD files), merged /usr.
RUNTIME_PACKAGES=(base-files netbase tzdata ca-certificates libc6 libssl3 libgomp1 libstdc++6
  libgcc-s1 gcc-12-base)

say() { printf '\n==> image: %s\n' "$*"; }
die() {
  echo "image: $*" >&2
  exit 1
}
# shellcheck source=scripts/local.sh
source "$ROOT/scripts/local.sh"

setup() {
  local missing=() tool
  for tool in podman buildah runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null \
      || die "missing ${missing[*]}; install them (Debian: apt-get install podman buildah runc debootstrap)"
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap >/dev/null
  fi
  # Containers here cannot raise rlimits above the shell's, and crun refuses
  # the hybrid cgroup v1/v2 layout: both are set once, in a drop-in.
  local nofile
  nofile="$(ulimit -Hn)"
  [[ "$nofile" == unlimited || "$nofile" -gt 20000 ]] && nofile=20000
  local want
  want="$(
    cat <<CONF
# Written by fanout's scripts/image.sh (docs/image.md).
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]

[engine]
runtime = "runc"
CONF
  )"
  if [[ "$(cat "$DROP_IN" 2>/dev/null)" != "$want" ]]; then
    [[ -w "$(dirname "$DROP_IN")" || $(id -u) -eq 0 ]] || die "cannot write $DROP_IN; run as root"
    mkdir -p "$(dirname "$DROP_IN")"
    printf '%s\n' "$want" >"$DROP_IN"
  fi
  podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' >/dev/null \
    || die "podman cannot run here (podman info failed)"
}

has_image() {
  podman image exists "$1"
}

# The build image: a Debian bookworm root with gcc and libc6-dev, and the
# host's Rust toolchain where the official image keeps it. Debian's own
# rustc (1.63) is too old for this code.
build_base() {
  local sysroot host_version root
  sysroot="$(rustc --print sysroot)" || die "no rustc on the host to copy into $BUILD_BASE"
  host_version="$(rustc --version | awk '{print $2}')"
  [[ "$host_version" == "$RUST_VERSION" || "$host_version" == "$RUST_VERSION".* ]] \
    || die "the host's rustc is $host_version; the Dockerfile's RUST_VERSION is $RUST_VERSION"
  root="$WORK/rust-root"
  rm -rf "$root"
  mkdir -p "$root"
  say "making $BUILD_BASE (debootstrap bookworm, the host's rustc $host_version)"
  debootstrap --variant=minbase --include=ca-certificates,gcc,libc6-dev bookworm "$root" \
    http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || {
      tail -n 20 "$WORK/debootstrap.log" >&2
      die "debootstrap failed (log: $WORK/debootstrap.log)"
    }
  local toolchain="$root/usr/local/rustup/toolchains/$host_version-x86_64-unknown-linux-gnu"
  mkdir -p "$toolchain" "$root/usr/local/cargo/bin"
  # The compiler, cargo and the standard library; the docs stay behind.
  cp -a "$sysroot/bin" "$sysroot/lib" "$toolchain/"
  [[ -d "$sysroot/libexec" ]] && cp -a "$sysroot/libexec" "$toolchain/"
  printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\n' \
    "$host_version-x86_64-unknown-linux-gnu" >"$root/usr/local/rustup/settings.toml"
  local rustup tool
  rustup="$(command -v rustup)" || die "no rustup on the host"
  cp "$rustup" "$root/usr/local/cargo/bin/rustup"
  for tool in cargo rustc rustdoc; do
    ln -s rustup "$root/usr/local/cargo/bin/$tool"
  done
  rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
  tar -C "$root" -c . | podman import --quiet \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "ENV RUST_VERSION=$host_version" \
    - "$BUILD_BASE" >/dev/null
  rm -rf "$root"
}

# The runtime image: distroless's own packages, unpacked into a merged-/usr
# root, the CA bundle, passwd and group with nonroot (65532), /tmp 1777.
# No shell, no package manager.
runtime_base() {
  local root="$WORK/distroless-root" debs="$WORK/distroless-debs" deb
  rm -rf "$root" "$debs"
  mkdir -p "$root"/usr/{bin,lib,lib64,sbin} "$debs"
  say "making $RUNTIME_BASE (${RUNTIME_PACKAGES[*]})"
  for dir in bin lib lib64 sbin; do
    ln -s "usr/$dir" "$root/$dir"
  done
  (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "${RUNTIME_PACKAGES[@]}" >/dev/null) \
    || die "apt-get download of the runtime packages failed"
  for deb in "$debs"/*.deb; do
    dpkg-deb --fsys-tarfile "$deb" | tar -C "$root" -x --keep-directory-symlink
  done
  mkdir -p "$root/etc/ssl/certs" "$root/home/nonroot" "$root/tmp"
  cat "$root"/usr/share/ca-certificates/mozilla/*.crt >"$root/etc/ssl/certs/ca-certificates.crt"
  cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
  cat >"$root/etc/group" <<'GROUP'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
GROUP
  chown 65532:65532 "$root/home/nonroot"
  chmod 1777 "$root/tmp"
  rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/lintian"
  tar -C "$root" -c . | podman import --quiet \
    --change 'USER 65532' \
    --change 'WORKDIR /home/nonroot' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    - "$RUNTIME_BASE" >/dev/null
  rm -rf "$root" "$debs"
}

bases() {
  mkdir -p "$WORK"
  if has_image "$BUILD_BASE"; then
    echo "image: $BUILD_BASE is present"
  else
    build_base
  fi
  if has_image "$RUNTIME_BASE"; then
    echo "image: $RUNTIME_BASE is present"
  else
    runtime_base
  fi
}

build() {
  has_image "$BUILD_BASE" && has_image "$RUNTIME_BASE" || die "no base images; run: $0 bases"
  local revision started
  revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  say "podman build -t $IMAGE (revision $revision)"
  started=$SECONDS
  # --format docker keeps the HEALTHCHECK (OCI drops it). The host's CA
  # bundle is mounted for the RUN steps only (cargo's downloads pass a
  # re-signing proxy here); it never enters a layer.
  local ca=()
  [[ -f "$HOST_CA" ]] && ca=(--volume "$HOST_CA:$HOST_CA:ro")
  nice -n 10 podman build --pull=never --network host --format docker "${ca[@]}" \
    --build-arg "REVISION=$revision" -t "$IMAGE" . \
    || die "podman build failed"
  echo "image: built $IMAGE in $((SECONDS - started)) s"
  podman image inspect "$IMAGE" --format 'image: {{.Id}} {{.Size}} bytes, healthcheck {{.Config.Healthcheck.Test}}'
}

# The run's own processes and container, stopped by pid and name however
# the run ends.
PIDS=()
CONTAINER=
EMULATORS_STARTED=
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n "$CONTAINER" ]]; then
    podman rm -f -t 2 "$CONTAINER" >/dev/null 2>&1 || true
  fi
  stop_pids "${PIDS[@]}"
  if [[ -n "$EMULATORS_STARTED" ]]; then
    ./scripts/emulators.sh stop || true
  fi
  exit "$status"
}

# Runs the image the way the task definition runs it: read-only root,
# user 65532, on the host network (where the emulators listen).
container() {
  podman run --rm --read-only --user 65532:65532 --network host --no-healthcheck "$@"
}

run_image() {
  has_image "$IMAGE" || die "no image $IMAGE; run: $0 build"
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local run="$WORK/run" status
  rm -rf "$run"
  mkdir -p "$run"

  say "fanout --help"
  container "$IMAGE" --help >"$run/help.txt" || die "--help failed"
  grep -q 'check-config' "$run/help.txt" || die "--help does not list check-config"
  echo "ok: --help lists $(grep -cE '^  [a-z-]+ ' "$run/help.txt") commands"

  say "fanout --version names the commit"
  container "$IMAGE" --version >"$run/version.txt" || die "--version failed"
  if git rev-parse HEAD >/dev/null 2>&1; then
    grep -qE '^fanout [0-9][^ ]* \(commit [0-9a-f]{12}\)$' "$run/version.txt" \
      || die "--version does not name the commit: $(cat "$run/version.txt")"
  fi
  echo "ok: $(cat "$run/version.txt")"

  say "fanout check-config with a bad value (exit 2, one line)"
  status=0
  container -e FANOUT_RATE_PER_SECOND=fast "$IMAGE" check-config >"$run/check.out" 2>"$run/check.err" \
    || status=$?
  [[ $status -eq 2 ]] || die "check-config with a bad value exited $status, not 2: $(cat "$run/check.err")"
  [[ $(wc -l <"$run/check.err") -eq 1 && ! -s "$run/check.out" ]] \
    || die "check-config's error is not one line: $(cat "$run/check.out" "$run/check.err")"
  grep -q FANOUT_RATE_PER_SECOND "$run/check.err" || die "check-config's error does not name the variable"
  echo "ok: exit 2: $(cat "$run/check.err")"

  # The local gateway and clients come from the workspace's fanout-dev
  # (not in the image): the debug build CI's tests already made.
  local dev="${CARGO_TARGET_DIR:-$ROOT/target}/debug/fanout-dev"
  if [[ ! -x "$dev" ]]; then
    say "building fanout-dev (debug) for the local gateway and clients"
    nice -n 10 cargo build --quiet --bin fanout-dev
  fi

  local sqs_port=5360 candidate
  for candidate in $(seq 5360 2 5388); do
    if port_free "$candidate" && port_free "$((candidate + 1))"; then
      sqs_port=$candidate
      break
    fi
  done
  export FANOUT_DEV_EMU_SQS_PORT=$sqs_port FANOUT_DEV_EMU_DYNAMODB_PORT=$((sqs_port + 1))
  local gateway_port=8090 metrics_port=9190
  while ! port_free "$gateway_port"; do gateway_port=$((gateway_port + 1)); done
  while ! port_free "$metrics_port"; do metrics_port=$((metrics_port + 1)); done
  ./scripts/emulators.sh install
  EMULATORS_STARTED=1
  ./scripts/emulators.sh start
  eval "$(./scripts/emulators.sh env)"
  export AWS_DEFAULT_REGION="$AWS_REGION"
  local python="$ROOT/.local/venv/bin/python" table=image-connections stage=image
  local live=300 dropped=30 channel=news channel_clients=50

  say "queue, dead-letter queue and table on the emulators; the local gateway on :$gateway_port"
  "$python" scripts/local_resources.py fanout-image "$table" >"$run/setup.env"
  # shellcheck disable=SC1091
  source "$run/setup.env"
  "$dev" gateway --listen "127.0.0.1:$gateway_port" --stage "$stage" --table "$table" \
    --keep-stale >"$run/gateway.log" 2>&1 &
  PIDS+=($!)
  wait_for "the gateway" 20 curl -sf -o /dev/null "http://127.0.0.1:$gateway_port/$stage/@stats"
  "$dev" clients --url "ws://127.0.0.1:$gateway_port/$stage" --count "$((live + dropped))" \
    --drop "$dropped" --expect-frames 1 --ready-file "$run/plain.ready" \
    --summary-file "$run/plain.summary.json" >"$run/plain.log" 2>&1 &
  PIDS+=($!)
  local plain_pid=$!
  "$dev" clients --url "ws://127.0.0.1:$gateway_port/$stage" --count "$channel_clients" \
    --channel "$channel" --expect-frames 2 --ready-file "$run/channel.ready" \
    --summary-file "$run/channel.summary.json" >"$run/channel.log" 2>&1 &
  PIDS+=($!)
  local channel_pid=$!
  wait_for "the clients" 60 test -f "$run/plain.ready" -a -f "$run/channel.ready"
  # The dropped clients close right after the ready file: let them go.
  sleep 1

  # The worker's settings, the endpoints local.
  local env=(
    -e AWS_REGION -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_EC2_METADATA_DISABLED
    -e AWS_ENDPOINT_URL_SQS -e AWS_ENDPOINT_URL_DYNAMODB
    -e FANOUT_QUEUE_URL -e FANOUT_DEAD_LETTER_QUEUE_URL
    -e "FANOUT_TABLE=$table" -e FANOUT_CHANNEL_INDEX=by-channel
    -e "FANOUT_GATEWAY_ENDPOINT=http://127.0.0.1:$gateway_port/$stage"
    -e "FANOUT_METRICS_LISTEN=127.0.0.1:$metrics_port"
    -e FANOUT_RATE_PER_SECOND=100 -e FANOUT_RECEIVE_WAIT=2s -e FANOUT_EMF_INTERVAL=1s
    # The local gateway completes $connect at once: a dropped client's row
    # goes on its recheck seconds later, not after API Gateway's 2 min.
    -e FANOUT_CONNECT_WINDOW=2s
    -e RUST_LOG=info
  )

  say "enqueueing with the image: everyone, channel '$channel', and a bad job"
  container "${env[@]}" "$IMAGE" enqueue --data "hello from the image" >"$run/everyone.id"
  container "${env[@]}" "$IMAGE" enqueue --data "news from the image" --channel "$channel" >"$run/channel.id"
  "$python" -c "import boto3, os; boto3.client('sqs').send_message(QueueUrl=os.environ['FANOUT_QUEUE_URL'], MessageBody='not a job')"

  say "fanout run --exit-when-idle (read-only, user 65532, host network)"
  CONTAINER="fanout-image-run-$$"
  local started=$SECONDS
  podman run -d --name "$CONTAINER" --read-only --user 65532:65532 --network host --no-healthcheck \
    "${env[@]}" "$IMAGE" run --exit-when-idle >/dev/null
  local pid cgroup_dir="" peak_rss=0 peak_cgroup=0 healthy="" value line file
  pid="$(podman inspect --format '{{.State.Pid}}' "$CONTAINER")"
  # The container's memory cgroup (v2, or v1's memory controller), for its
  # high-water mark beside the process's own (VmHWM).
  if [[ -r "/proc/$pid/cgroup" ]]; then
    while IFS= read -r line; do
      case "$line" in
        0::*) [[ -f "/sys/fs/cgroup${line#0::}/memory.peak" ]] && cgroup_dir="/sys/fs/cgroup${line#0::}" ;;
        *:memory:*) cgroup_dir="/sys/fs/cgroup/memory${line##*:memory:}" ;;
      esac
    done <"/proc/$pid/cgroup"
  fi
  while [[ "$(podman inspect --format '{{.State.Running}}' "$CONTAINER" 2>/dev/null)" == true ]]; do
    value="$(awk '/^VmHWM:/ {print $2 * 1024}' "/proc/$pid/status" 2>/dev/null || true)"
    if [[ -n "$value" ]] && ((value > peak_rss)); then peak_rss=$value; fi
    for file in memory.peak memory.max_usage_in_bytes; do
      if [[ -n "$cgroup_dir" && -r "$cgroup_dir/$file" ]]; then
        value="$(cat "$cgroup_dir/$file" 2>/dev/null || echo 0)"
        if ((value > peak_cgroup)); then peak_cgroup=$value; fi
      fi
    done
    # The health check as the task definition states it: CMD /fanout health.
    if [[ -z "$healthy" ]] && podman exec "$CONTAINER" /fanout health >"$run/health.out" 2>&1; then
      healthy="$((SECONDS - started)) s after the start"
    fi
    sleep 0.2
  done
  status="$(podman wait "$CONTAINER")"
  podman logs "$CONTAINER" >"$run/worker.log" 2>&1
  podman rm "$CONTAINER" >/dev/null
  CONTAINER=
  if [[ "$status" != 0 ]]; then
    tail -n 20 "$run/worker.log" >&2
    die "the worker exited $status (log: $run/worker.log)"
  fi
  echo "worker: exit 0 after $((SECONDS - started)) s"
  [[ -n "$healthy" ]] || die "the health check never passed while the worker ran: $(cat "$run/health.out")"
  echo "ok: /fanout health passed in the running container, $healthy"

  kill -INT "$plain_pid" "$channel_pid" 2>/dev/null || true
  wait_for "the clients' summaries" 30 test -f "$run/plain.summary.json" -a -f "$run/channel.summary.json"

  "$python" - "$run" "$table" "$live" "$channel_clients" <<'PYTHON' || die "the run's checks failed (files: $run)"
import json, os, sys, boto3
run, table, live, channel_clients = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
plain = json.load(open(f"{run}/plain.summary.json"))
channel = json.load(open(f"{run}/channel.summary.json"))
def got(summary, text):
    return next((p["clients"] for p in summary["payloads"] if p["preview"] == text), 0)
rows = boto3.client("dynamodb").scan(TableName=table, Select="COUNT")["Count"]
dead = boto3.client("sqs").receive_message(QueueUrl=os.environ["FANOUT_DEAD_LETTER_QUEUE_URL"],
                                           MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
checks = [
    (f"all {live + channel_clients} live clients got the broadcast once",
     got(plain, "hello from the image") == live and got(channel, "hello from the image") == channel_clients),
    (f"the {channel_clients} channel clients alone got the channel's",
     got(channel, "news from the image") == channel_clients and got(plain, "news from the image") == 0),
    ("no client got anything twice", all(s["clients_with_duplicates"] == 0 for s in (plain, channel))),
    (f"the gone connections' rows were removed ({rows} rows left)", rows == live + channel_clients),
    ("the bad job was dead-lettered", [m["Body"] for m in dead] == ["not a job"]),
]
for text, ok in checks:
    print(f"  [{'ok' if ok else 'FAILED'}] {text}")
sys.exit(0 if all(ok for _, ok in checks) else 1)
PYTHON
  grep -q '"_aws"' "$run/worker.log" || die "the worker printed no EMF line"
  local cgroup_note=""
  ((peak_cgroup > 0)) && cgroup_note=", $((peak_cgroup / 1024 / 1024)) MiB in its memory cgroup"
  echo "peak memory: $((peak_rss / 1024)) KiB resident (VmHWM)$cgroup_note"
  printf '%s %s\n' "$peak_rss" "$peak_cgroup" >"$run/peak_memory_bytes"
  say "the image runs as the task runs it"
}

case "${1:-all}" in
  setup) setup ;;
  bases) setup && bases ;;
  build) setup && build ;;
  run) setup && run_image ;;
  all) setup && bases && build && run_image ;;
  *) die "usage: $0 [setup|bases|build|run]" ;;
esac
