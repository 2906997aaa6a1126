#!/usr/bin/env bash
# Repeatable counts of what `fanout run --exit-when-idle` costs per post, as
# the benchmark's `process` case runs it (one SQS job on moto, the audience
# scanned from a dynalite table, 5 % of ids gone, 256 in flight), beside the
# timings scripts/bench.sh gives: counts a loaded machine does not change.
#
#   scripts/cpu-counts.sh                          plain and TLS, 20,000 rows, every tool
#   scripts/cpu-counts.sh --modes tls --tools callgrind --keep /tmp/counts
#   FANOUT_DEV_BIN=/path/to/other/fanout scripts/cpu-counts.sh --no-build
#
# Tools (--tools, space-separated; default "callgrind strace heaptrack"):
#   callgrind  instructions of fanout's process alone (valgrind; its threads
#              are serialised, so the run is slow and its timing meaningless)
#   strace     system calls of every thread (strace -c -f): writes, reads,
#              epoll waits, futex, all
#   heaptrack  calls to allocation functions (malloc, realloc, ...)
#   perf       (not in the default set) a sampled profile (perf record -g,
#              the CPU clock): the share of fanout's samples in the kernel,
#              a proportion, not a count; perf report reads the kept file
# Every count covers the whole process, start-up and the idle poll at the
# end included, divided by the posts of its one broadcast. --keep DIR keeps
# the tools' raw output (callgrind_annotate, heaptrack_print read it).
#
# As in scripts/bench.sh, fanout (and the tool around it) runs on core
# $WORKER_CPU, so its runtime has one worker thread, as a task with one vCPU
# would; the sinks and emulators on core $SINK_CPU (taskset, with 2 cores or
# more). Ports 5890-5894 on 127.0.0.1 (COUNT_PORT_BASE); every process
# started here is stopped by its pid on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROWS=20000
MODES="plain tls"
TOOLS="callgrind strace heaptrack"
KEEP=""
while (($#)); do
  case "$1" in
    --rows) ROWS="$2"; shift 2 ;;
    --modes) MODES="$2"; shift 2 ;;
    --tools) TOOLS="$2"; shift 2 ;;
    --keep) KEEP="$2"; shift 2 ;;
    --no-build) NO_BUILD=1; shift ;;
    -h | --help) sed -n '2,28p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "cpu-counts: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET/release/examples/bench"
FANOUT="${FANOUT_DEV_BIN:-$TARGET/release/fanout}"
BASE="${COUNT_PORT_BASE:-5890}"
PORT=$BASE TLS_PORT=$((BASE + 1)) DYNAMODB_PORT=$((BASE + 2)) SQS_PORT=$((BASE + 3))
METRICS_PORT=$((BASE + 4))
PAYLOAD_BYTES=128
WORKER_CPU="${WORKER_CPU:-0}"
SINK_CPU="${SINK_CPU:-1}"
ON_WORKER=()
ON_SINK=()
if command -v taskset >/dev/null && (($(nproc) >= 2)); then
  ON_WORKER=(taskset -c "$WORKER_CPU")
  ON_SINK=(taskset -c "$SINK_CPU")
fi

# port_free, wait_port, make_test_tls and stop_pids; they call die, below.
# shellcheck source=scripts/local.sh
source "$ROOT/scripts/local.sh"

die() {
  echo "cpu-counts: $*" >&2
  exit 1
}
for tool in $TOOLS; do
  case $tool in
    callgrind) command -v valgrind >/dev/null || die "valgrind not found (Debian: apt-get install valgrind)" ;;
    strace) command -v strace >/dev/null || die "strace not found (Debian: apt-get install strace)" ;;
    heaptrack) command -v heaptrack_print >/dev/null || die "heaptrack not found (Debian: apt-get install heaptrack)" ;;
    perf) command -v perf >/dev/null || die "perf not found (Debian: apt-get install linux-perf)" ;;
    *) die "unknown tool $tool" ;;
  esac
done
command -v openssl >/dev/null || die "openssl not found (the TLS case makes a test CA with it)"

if [[ -z "${NO_BUILD:-}" ]]; then
  echo "cpu-counts: building the release fanout binary and benchmark" >&2
  (cd "$ROOT" && cargo build --release --quiet -p fanout --bin fanout &&
    cargo build --release --quiet -p fanout --example bench)
fi
[[ -x $FANOUT && -x $BIN ]] || die "$FANOUT or $BIN missing: run without --no-build"
"$ROOT/scripts/emulators.sh" install

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cpu-counts.XXXXXX")"
PIDS=()
stop_all() {
  stop_pids "${PIDS[@]}"
  rm -rf "$WORK"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# A port that answers already is someone else's: waiting for ours on it
# would measure theirs.
for port in "$PORT" "$TLS_PORT" "$DYNAMODB_PORT" "$SQS_PORT" "$METRICS_PORT"; do
  port_free "$port" || die "port $port is taken (set COUNT_PORT_BASE)"
done

# A test CA and a certificate for localhost, for this run only; fanout
# trusts the CA through SSL_CERT_FILE, as in scripts/bench.sh.
make_test_tls "$WORK" counts

"${ON_SINK[@]}" "$BIN" sink --port "$PORT" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$PORT" "$!" sink
"${ON_SINK[@]}" "$BIN" sink --port "$TLS_PORT" --tls-cert "$WORK/sink.pem" --tls-key "$WORK/sink.key" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$TLS_PORT" "$!" "TLS sink"
"${ON_SINK[@]}" node "$ROOT/.local/node/node_modules/dynalite/cli.js" --host 127.0.0.1 --port "$DYNAMODB_PORT" \
  --createTableMs 0 --deleteTableMs 0 >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$DYNAMODB_PORT" "$!" dynalite
"${ON_SINK[@]}" "$ROOT/.local/venv/bin/moto_server" -H 127.0.0.1 -p "$SQS_PORT" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$SQS_PORT" "$!" moto

export AWS_ENDPOINT_URL_DYNAMODB="http://127.0.0.1:$DYNAMODB_PORT" \
  AWS_ENDPOINT_URL_SQS="http://127.0.0.1:$SQS_PORT" AWS_EC2_METADATA_DISABLED=true \
  AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
  FANOUT_METRICS_LISTEN="127.0.0.1:$METRICS_PORT" FANOUT_EMF_INTERVAL=0s FANOUT_RECEIVE_WAIT=1s \
  FANOUT_MAX_IN_FLIGHT=256 FANOUT_SHUTDOWN_GRACE=1s FANOUT_CONNECTED_AT_ATTRIBUTE=connectedAt \
  FANOUT_RATE_PER_SECOND=1000000 FANOUT_TABLE="fanout-counts-$ROWS"
unset AWS_SESSION_TOKEN AWS_PROFILE
FANOUT_QUEUE_URL=$("$BIN" prepare --queue fanout-counts-jobs)
export FANOUT_QUEUE_URL
"$BIN" prepare --table "$FANOUT_TABLE" --connections "$ROWS"

# One broadcast by `fanout run` under "$@" (a tool's command line, or
# nothing), to endpoint $1; its posts in $POSTS. Not in a subshell: the
# process must be in PIDS for the trap.
counted_run() {
  local endpoint=$1 pid
  shift
  "$BIN" prepare --table "$FANOUT_TABLE" --connections "$ROWS" --only-gone
  "$FANOUT" enqueue --data "$(head -c "$PAYLOAD_BYTES" /dev/zero | tr '\0' x)" --id counts \
    >/dev/null 2>"$WORK/enqueue.err" || die "enqueue failed: $(cat "$WORK/enqueue.err")"
  FANOUT_GATEWAY_ENDPOINT="$endpoint" "${ON_WORKER[@]}" "$@" "$FANOUT" run --exit-when-idle >"$WORK/fanout.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait "$pid" || die "fanout run failed: $(tail -5 "$WORK/fanout.log")"
  POSTS=$(python3 - "$WORK/fanout.log" <<'PY'
import json, sys
jobs = [j for j in (json.loads(l) for l in open(sys.argv[1]) if l.startswith("{"))
        if j.get("message") == "broadcast"]
if len(jobs) != 1 or jobs[0].get("status") != "done":
    sys.exit(f"expected one finished broadcast, got {jobs}")
j = jobs[0]
print(j["delivered"] + j["gone"] + j["failed"] + j["retries"])
PY
  )
}

# dynalite's first scan runs while V8 compiles it: one run, not counted.
counted_run "http://127.0.0.1:$PORT/bench"

per_post() { python3 -c "import sys; print(f'{int(sys.argv[1]) / int(sys.argv[2]):.1f}')" "$1" "$2"; }

for mode in $MODES; do
  endpoint="http://127.0.0.1:$PORT/bench"
  if [[ $mode == tls ]]; then
    endpoint="https://localhost:$TLS_PORT/bench"
    export SSL_CERT_FILE="$WORK/ca.pem"
  fi
  for tool in $TOOLS; do
    out="$WORK/$mode.$tool"
    case $tool in
      callgrind)
        counted_run "$endpoint" valgrind --tool=callgrind --callgrind-out-file="$out" -q
        posts=$POSTS
        ir=$(sed -n 's/^summary: *//p' "$out" | cut -d' ' -f1)
        echo "mode=$mode rows=$ROWS posts=$posts instructions=$ir instructions_per_post=$(per_post "$ir" "$posts")"
        ;;
      strace)
        counted_run "$endpoint" strace -f -c -o "$out"
        posts=$POSTS
        python3 - "$out" "$posts" "$mode" "$ROWS" <<'PY'
import sys
path, posts, mode, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
calls = {}
for line in open(path):
    f = line.split()
    # % time, seconds, usecs/call, calls, [errors], syscall
    if len(f) >= 5 and f[3].isdigit() and not line.startswith("100.00"):
        calls[f[-1]] = int(f[3])
group = {
    "writes": ("write", "writev", "sendto", "sendmsg"),
    "reads": ("read", "readv", "recvfrom", "recvmsg"),
    "epoll_waits": ("epoll_wait", "epoll_pwait", "epoll_pwait2"),
    "futex": ("futex",),
}
parts = [f"{k}_per_post={sum(calls.get(n, 0) for n in v) / posts:.2f}" for k, v in group.items()]
print(f"mode={mode} rows={rows} posts={posts} syscalls_per_post={sum(calls.values()) / posts:.2f} "
      + " ".join(parts))
PY
        ;;
      heaptrack)
        counted_run "$endpoint" heaptrack -o "$out"
        posts=$POSTS
        allocs=$(heaptrack_print -f "$out".*zst -p 0 -a 0 -T 0 -l 0 2>/dev/null |
          sed -n 's/^calls to allocation functions: \([0-9]*\).*/\1/p')
        echo "mode=$mode rows=$ROWS posts=$posts allocations=$allocs allocations_per_post=$(per_post "$allocs" "$posts")"
        ;;
      perf)
        counted_run "$endpoint" perf record -q -g -e cpu-clock -o "$out"
        kernel=$(perf report -i "$out" --stdio --sort dso --no-children -g none 2>/dev/null |
          awk '/\[kernel\.kallsyms\]/ && !seen {gsub("%", "", $1); print $1; seen = 1}')
        echo "mode=$mode rows=$ROWS posts=$POSTS kernel_share_pct=${kernel:-0}"
        ;;
    esac
  done
  unset SSL_CERT_FILE
done
if [[ -n $KEEP ]]; then
  mkdir -p "$KEEP"
  cp "$WORK"/{plain,tls}.* "$KEEP"/ 2>/dev/null || true
fi
