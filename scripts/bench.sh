#!/usr/bin/env bash
# Issue 5's benchmark: one broadcast per send path (sdk, lean) through the
# real engine, against a local sink that answers at once (410 for 5 % of the
# ids), and a plain HTTP load generator (wrk) on the same sink at the same
# concurrency, side by side; then the rate limiter at 5,000/s.
#
#   scripts/bench.sh                 3 runs of N = 20,000 and 1,000,000
#   RUNS=1 SIZES=20000 scripts/bench.sh
#
# Builds the release example `bench` (examples/bench/). The worker and wrk
# are pinned to one core, the sink to the other (taskset). Figures: posts/s,
# CPU µs per post (getrusage of the worker over the broadcast), peak RSS
# (VmHWM), wrk's requests/s, and the ratio. Results go to stdout and, raw, to
# $OUT (default target/bench/results-<time>.txt).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS="${RUNS:-3}"
SIZES="${SIZES:-20000 1000000}"
PATHS="${PATHS:-sdk lean}"
IN_FLIGHT="${IN_FLIGHT:-256}"
PAYLOAD_BYTES="${PAYLOAD_BYTES:-128}"
PORT="${PORT:-5390}"
WRK_SECONDS="${WRK_SECONDS:-5}"
LIMIT_RATE="${LIMIT_RATE:-5000}"
LIMIT_SECONDS="${LIMIT_SECONDS:-10}"
WORKER_CPU="${WORKER_CPU:-0}"
SINK_CPU="${SINK_CPU:-1}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${OUT:-$TARGET/bench/results-$(date -u +%Y%m%dT%H%M%SZ).txt}"
BIN="$TARGET/release/examples/bench"

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

# Pin where taskset and a second core exist; run unpinned otherwise.
PIN=0
if command -v taskset >/dev/null && (($(nproc) >= 2)); then
  PIN=1
fi
pin() {
  local cpu=$1
  shift
  if ((PIN)); then taskset -c "$cpu" "$@"; else "$@"; fi
}

echo "bench: building the release benchmark" >&2
(cd "$ROOT" && cargo build --release --quiet --example bench)

mkdir -p "$(dirname "$OUT")"
ENDPOINT="http://127.0.0.1:$PORT/bench"
LUA="$(dirname "$OUT")/post.lua"
# The same POST as the worker's: the payload to one live connection.
cat >"$LUA" <<LUA
wrk.method = "POST"
wrk.body = string.rep("x", $PAYLOAD_BYTES)
LUA

pin "$SINK_CPU" "$BIN" sink --port "$PORT" 2>/dev/null &
SINK_PID=$!
trap 'kill "$SINK_PID" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done
kill -0 "$SINK_PID" 2>/dev/null || die "the sink did not start (port $PORT taken?)"

{
  echo "# machine: $(nproc) cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(uname -sr)"
  echo "# rustc: $(rustc --version), wrk: $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
  echo "# pinned: $([[ $PIN == 1 ]] && echo "worker+wrk cpu $WORKER_CPU, sink cpu $SINK_CPU" || echo no)"
  echo "# in flight $IN_FLIGHT, payload $PAYLOAD_BYTES B, load average: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT"

for run in $(seq "$RUNS"); do
  for n in $SIZES; do
    for path in $PATHS; do
      echo "bench: run $run, N=$n, $path" >&2
      line=$(pin "$WORKER_CPU" "$BIN" broadcast --path "$path" --connections "$n" \
        --endpoint "$ENDPOINT" --max-in-flight "$IN_FLIGHT" --payload-bytes "$PAYLOAD_BYTES")
      wrk_rps=$(pin "$WORKER_CPU" wrk -t1 -c"$IN_FLIGHT" -d"${WRK_SECONDS}s" -s "$LUA" \
        "$ENDPOINT/@connections/conn-1" | awk '/^Requests\/sec:/ {print $2}')
      echo "kind=broadcast run=$run $line wrk_per_s=$wrk_rps" >>"$OUT"
    done
  done
  echo "bench: run $run, rate limiter at $LIMIT_RATE/s" >&2
  line=$(pin "$WORKER_CPU" "$BIN" broadcast --path lean --connections $((LIMIT_RATE * LIMIT_SECONDS)) \
    --endpoint "$ENDPOINT" --max-in-flight "$IN_FLIGHT" --rate "$LIMIT_RATE")
  echo "kind=limiter run=$run rate=$LIMIT_RATE $line" >>"$OUT"
done

python3 "$ROOT/scripts/bench_summary.py" "$OUT"
echo "bench: raw results in $OUT" >&2
