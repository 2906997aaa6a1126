#!/usr/bin/env bash
# Issue 5's benchmark: one broadcast per send path (sdk, lean) through the
# real engine, against a local sink that answers at once (410 for 5 % of the
# ids), and a plain HTTP load generator (wrk) on the same sink at the same
# concurrency, side by side; then the rate limiter at 5,000/s, and SQS (moto)
# to first delivery through the real worker.
#
#   scripts/bench.sh                      3 runs of every case
#   RUNS=1 CASES="20000:table" scripts/bench.sh
#
# A case is N:store. `table`: the audience is loaded into a DynamoDB table on
# dynalite first (not measured), then scanned page by page by the real
# DynamoStore during the broadcast, and gone rows are deleted with
# BatchWriteItem. `generated`: the pages are generated in process (a
# 1,000,000-row dynalite scan would measure dynalite), gone rows counted.
#
# Builds the release example `bench` (examples/bench/). The worker and wrk
# are pinned to one core, the sink and dynalite to the other (taskset);
# then, unpinned, one broadcast as 1 job and as $(nproc) split jobs at once.
# Figures: posts/s,
# CPU µs per post (getrusage of the worker over the broadcast), peak RSS
# (VmHWM), wrk's requests/s, and the ratio. Results go to stdout and, raw, to
# $OUT (default target/bench/results-<time>.txt).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS="${RUNS:-3}"
CASES="${CASES:-20000:table 20000:generated 1000000:generated}"
PATHS="${PATHS:-sdk lean}"
IN_FLIGHT="${IN_FLIGHT:-256}"
PAYLOAD_BYTES="${PAYLOAD_BYTES:-128}"
PORT="${PORT:-5390}"
DYNAMODB_PORT="${DYNAMODB_PORT:-5389}"
SQS_PORT="${SQS_PORT:-5388}"
# Jobs per run and path for SQS → first delivery (0: skip; needs moto).
LATENCY_JOBS="${LATENCY_JOBS:-20}"
WRK_SECONDS="${WRK_SECONDS:-5}"
# The multi-core case: N connections as 1 job, then as SPLIT_JOBS segment
# jobs at once, unpinned (0 or 1: skip).
SPLIT_JOBS="${SPLIT_JOBS:-$(nproc)}"
SPLIT_N="${SPLIT_N:-1000000}"
LIMIT_RATE="${LIMIT_RATE:-5000}"
LIMIT_SECONDS="${LIMIT_SECONDS:-10}"
WORKER_CPU="${WORKER_CPU:-0}"
SINK_CPU="${SINK_CPU:-1}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${OUT:-$TARGET/bench/results-$(date -u +%Y%m%dT%H%M%SZ).txt}"
# BUILD=debug only checks the script itself: debug figures mean nothing.
BUILD="${BUILD:-release}"
BIN="$TARGET/$BUILD/examples/bench"

die() {
  echo "bench: $*" >&2
  exit 1
}

if ! command -v wrk >/dev/null; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
  else
    die "wrk not found; install it (Debian: apt-get install wrk)"
  fi
fi

# Pin where taskset and a second core exist; run unpinned otherwise. A
# prefix, not a function: a background process's $! must be its own pid.
ON_WORKER=()
ON_SINK=()
PIN=0
if command -v taskset >/dev/null && (($(nproc) >= 2)); then
  PIN=1
  ON_WORKER=(taskset -c "$WORKER_CPU")
  ON_SINK=(taskset -c "$SINK_CPU")
fi

echo "bench: building the $BUILD benchmark" >&2
if [[ $BUILD == release ]]; then
  (cd "$ROOT" && cargo build --release --quiet --example bench)
else
  (cd "$ROOT" && cargo build --quiet --example bench)
fi

if [[ "$CASES" == *:table* ]] || ((LATENCY_JOBS > 0)); then
  "$ROOT/scripts/emulators.sh" install
fi

mkdir -p "$(dirname "$OUT")"
ENDPOINT="http://127.0.0.1:$PORT/bench"
LUA="$(dirname "$OUT")/post.lua"
# The same POST as the worker's: the payload to one live connection.
cat >"$LUA" <<LUA
wrk.method = "POST"
wrk.body = string.rep("x", $PAYLOAD_BYTES)
LUA

PIDS=()
trap 'for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done' EXIT
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  die "$3 did not start on port $1 (taken?)"
}
"${ON_SINK[@]}" "$BIN" sink --port "$PORT" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$PORT" "$!" sink
if [[ "$CASES" == *:table* ]]; then
  "${ON_SINK[@]}" node "$ROOT/.local/node/node_modules/dynalite/cli.js" --host 127.0.0.1 \
    --port "$DYNAMODB_PORT" --createTableMs 0 --deleteTableMs 0 >/dev/null 2>&1 &
  PIDS+=($!)
  wait_port "$DYNAMODB_PORT" "$!" dynalite
fi
if ((LATENCY_JOBS > 0)); then
  "${ON_SINK[@]}" "$ROOT/.local/venv/bin/moto_server" -H 127.0.0.1 -p "$SQS_PORT" >/dev/null 2>&1 &
  PIDS+=($!)
  wait_port "$SQS_PORT" "$!" moto
fi
export AWS_ENDPOINT_URL_DYNAMODB="http://127.0.0.1:$DYNAMODB_PORT" \
  AWS_ENDPOINT_URL_SQS="http://127.0.0.1:$SQS_PORT" AWS_EC2_METADATA_DISABLED=true

{
  echo "# machine: $(nproc) cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(uname -sr)"
  echo "# rustc: $(rustc --version), wrk: $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
  echo "# pinned: $([[ $PIN == 1 ]] && echo "worker+wrk cpu $WORKER_CPU, sink cpu $SINK_CPU" || echo no)"
  echo "# build $BUILD, in flight $IN_FLIGHT, payload $PAYLOAD_BYTES B, load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT"

for run in $(seq "$RUNS"); do
  for case in $CASES; do
    n=${case%%:*}
    store=${case#*:}
    [[ $store == table ]] && store=dynamo
    for path in $PATHS; do
      echo "bench: run $run, N=$n from $store, $path" >&2
      line=$("${ON_WORKER[@]}" "$BIN" broadcast --path "$path" --store "$store" --connections "$n" \
        --endpoint "$ENDPOINT" --max-in-flight "$IN_FLIGHT" --payload-bytes "$PAYLOAD_BYTES")
      wrk_rps=$("${ON_WORKER[@]}" wrk -t1 -c"$IN_FLIGHT" -d"${WRK_SECONDS}s" -s "$LUA" \
        "$ENDPOINT/@connections/conn-1" | awk '/^Requests\/sec:/ {print $2}')
      echo "kind=broadcast run=$run $line wrk_per_s=$wrk_rps" >>"$OUT"
    done
  done
  if ((SPLIT_JOBS > 1)); then
    # Every core: the broadcast as one job, then split into segment jobs
    # run at once (as the worker runs a split broadcast), unpinned.
    for jobs in 1 "$SPLIT_JOBS"; do
      echo "bench: run $run, N=$SPLIT_N as $jobs job(s), unpinned" >&2
      line=$("$BIN" broadcast --path lean --connections "$SPLIT_N" --jobs "$jobs" \
        --endpoint "$ENDPOINT" --max-in-flight "$IN_FLIGHT" --payload-bytes "$PAYLOAD_BYTES")
      echo "kind=split run=$run $line" >>"$OUT"
    done
  fi
  echo "bench: run $run, rate limiter at $LIMIT_RATE/s" >&2
  line=$("${ON_WORKER[@]}" "$BIN" broadcast --path lean --connections $((LIMIT_RATE * LIMIT_SECONDS)) \
    --endpoint "$ENDPOINT" --max-in-flight "$IN_FLIGHT" --rate "$LIMIT_RATE")
  echo "kind=limiter run=$run rate=$LIMIT_RATE $line" >>"$OUT"
  if ((LATENCY_JOBS > 0)); then
    for path in $PATHS; do
      echo "bench: run $run, SQS to first delivery, $path" >&2
      line=$("${ON_WORKER[@]}" "$BIN" latency --path "$path" --endpoint "$ENDPOINT" --jobs "$LATENCY_JOBS")
      echo "run=$run $line" >>"$OUT"
    done
  fi
done

python3 "$ROOT/scripts/bench_summary.py" "$OUT"
echo "bench: raw results in $OUT" >&2
