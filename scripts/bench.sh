#!/usr/bin/env bash
# fanout's benchmark, one command. Every case runs against a local sink that
# answers at once (410 for 5 % of the ids), next to wrk on the same sink in
# the same run; see BENCHMARKS.md for what each case is.
#
#   scripts/bench.sh                          the default cases, 3 runs (~8 min on a
#                                             quiet machine, ~17 at load 4-7)
#   scripts/bench.sh --runs 5 --cases process,jobs
#   scripts/bench.sh --quick                  1 run of process and jobs (~3 min)
#   scripts/bench.sh --no-build ...           use the binaries already built
#
# Cases (--cases, comma-separated; default process,jobs,engine,limiter,latency):
#   process  the `fanout` binary itself (`fanout run --exit-when-idle`, release)
#            as a process: one SQS job on moto, the audience scanned from a
#            dynalite table, gone rows deleted; rate set but not binding
#            (plain HTTP and TLS; 20,000 and 200,000 rows), binding, and
#            off (no limiter, to compare with). CPU and peak RSS are the
#            process's own (bash's `time` for the CPU, /usr/bin/time
#            exec'ing fanout for the peak RSS); what the sink, dynalite and
#            moto spent on their core during each run is recorded beside it.
#   jobs     many small broadcasts: 1,000 channel jobs of 5 connections
#            through the real worker loop (`bench jobs`, in-process queue and
#            audiences), with 0 and 10 ms added to every AWS call, at the
#            default max_concurrent_jobs and at the old default of 4; then
#            beside one 50,000-connection broadcast (rate and memory bounds).
#   engine   the engine alone in the example binary (`bench broadcast`), per
#            send path: a breakdown, not the production figure.
#   limiter  the engine at 5,000/s: the rate limiter's accuracy.
#   latency  SQS (moto) to first delivery through the worker.
#   index    a table keyed by channel, then connection id, two rows a
#            connection, read for a broadcast to everyone through the
#            connection index ($INDEX_CONNECTIONS connections, twice as many
#            rows): each connection posted to once, and peak RSS.
#   removals what removing a gone row costs (`bench removals`, dynalite): a
#            table keyed by the id (BatchWriteItem) and one keyed by user
#            (conditional DeleteItem), per row, wall and CPU.
#   split    one broadcast as 1 job and as $(nproc) split jobs, unpinned.
#   fleet    the fleet budget: 1, 2 and 4 `fanout run` processes (release)
#            on one fleet rate of 2,000/s, leases on dynalite, jobs on moto,
#            the local gateway counting POSTs per second; then one of four
#            killed with SIGKILL; then the mixed fleet: 3 processes on
#            3,000/s, one unsplit broadcast to 30,000 connections beside 20
#            small jobs a second (the `fleet` integration test, which checks
#            the targets, run on the release build), unpinned.
#   cancel   a cancel mid-way: 3 `fanout run` processes (release) at the
#            template's defaults (fleet rate 2,000/s, 64 jobs at once, run
#            records in the fleet table) share one broadcast to
#            $CANCEL_CONNECTIONS connections split into 3 segment jobs;
#            `fanout cancel` once a third is posted; the time from the
#            cancel's send to the last post at the gateway (the `fleet`
#            integration test's `a_cancel` test, which checks the 3 s target,
#            run on the release build, a case of its own so the fleet case's
#            figures stay comparable), unpinned.
#   throttle the worker against an endpoint that throttles like API Gateway
#            (a token bucket) and fails 5 % of posts: the delivery rate
#            converges to what it accepts, and a client that only answers
#            429 does not slow the others (the `missed_clients` integration
#            test on the release build, which checks the targets), unpinned.
#   latest   newer value wins: 3 `fanout run` processes (release) on one
#            fleet rate, run records in the fleet table, 64 jobs at once; a
#            producer sends an update to one stream key every 100 ms to a
#            channel of every row, with `latest` (until every connection
#            has the last update, at most 60 s after its send) and without
#            (stopped as long after the last send as the updates flowed).
#            The gateway's sink records when each connection's newest seq
#            arrived: connections ever more than 5 s without the then-newest
#            value, connections with no update, the last update's send to
#            every connection having it. LATEST_SCALE=rows:seconds:rate
#            (default 20000:30:6000); the `fleet` integration test's
#            `latest_` test on the release build, unpinned.
#
# The fleet, cancel and throttle cases set FANOUT_DEV_TIMING_TARGETS=1: their tests
# then check the tight wall-clock targets, which `cargo test` leaves to
# this benchmark (a loaded machine cannot meet them, and need not).
#
# The worker and wrk are pinned to one core, the sinks and emulators to the
# other (taskset). Raw lines go to $OUT (default target/bench/results-<time>.txt),
# the markdown summary to $SUMMARY (default the same name, .md) and stdout.
# Every process started here is stopped by its pid on exit, interrupted or not.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS="${RUNS:-3}"
BENCH_CASES="${BENCH_CASES:-process,jobs,engine,limiter,latency}"
while (($#)); do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    --cases) BENCH_CASES="$2"; shift 2 ;;
    --quick) RUNS=1; BENCH_CASES=process,jobs; shift ;;
    --no-build) NO_BUILD=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h | --help) sed -n '2,78p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
has_case() { [[ ",$BENCH_CASES," == *",$1,"* ]]; }

# process: mode:rows:rate, mode plain|tls, rate free (set, never binding),
# bound (BOUND_RATE) or off (0: no limiter, what a rate is compared with).
PROCESS_CASES="${PROCESS_CASES:-plain:20000:free plain:20000:off plain:200000:free tls:20000:free plain:20000:bound}"
FREE_RATE="${FREE_RATE:-1000000}"
BOUND_RATE="${BOUND_RATE:-5000}"
# jobs: latency_ms:max_concurrent_jobs[:huge[:durable]] (default: the
# configured default; huge: one whole-table broadcast of that many beside the
# small jobs; durable: every run recorded, as with FANOUT_CHECKPOINT_TABLE).
JOBS_CASES="${JOBS_CASES:-0:default 10:default 10:4 10:default:0:durable 10:default:50000}"
JOBS="${JOBS:-1000}"
JOBS_AUDIENCE="${JOBS_AUDIENCE:-5}"
JOBS_RATE="${JOBS_RATE:-10000}"
# engine: N:store (table: scanned from dynalite; generated: in process).
ENGINE_CASES="${ENGINE_CASES:-${CASES:-20000:table 1000000:generated}}"
PATHS="${PATHS:-lean sdk}"
ENGINE_SDK_MAX="${ENGINE_SDK_MAX:-20000}"
IN_FLIGHT="${IN_FLIGHT:-256}"
PAYLOAD_BYTES="${PAYLOAD_BYTES:-128}"
LATENCY_JOBS="${LATENCY_JOBS:-20}"
REMOVAL_ROWS="${REMOVAL_ROWS:-4000}"
INDEX_CONNECTIONS="${INDEX_CONNECTIONS:-500000}"
WRK_SECONDS="${WRK_SECONDS:-3}"
LATEST_SCALE="${LATEST_SCALE:-20000:30:6000}"
CANCEL_CONNECTIONS="${CANCEL_CONNECTIONS:-100000}"
SPLIT_JOBS="${SPLIT_JOBS:-$(nproc)}"
SPLIT_N="${SPLIT_N:-1000000}"
LIMIT_RATE="${LIMIT_RATE:-5000}"
LIMIT_SECONDS="${LIMIT_SECONDS:-10}"
WORKER_CPU="${WORKER_CPU:-0}"
SINK_CPU="${SINK_CPU:-1}"
# Ports: the sink (plain, TLS, and plain with 10 ms of delay), dynalite,
# moto, and the worker's metrics listener.
PORT="${PORT:-5790}"
TLS_PORT="${TLS_PORT:-5791}"
SLOW_PORT="${SLOW_PORT:-5792}"
DYNAMODB_PORT="${DYNAMODB_PORT:-5793}"
SQS_PORT="${SQS_PORT:-5794}"
METRICS_PORT="${METRICS_PORT:-5795}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${OUT:-$TARGET/bench/results-$(date -u +%Y%m%dT%H%M%SZ).txt}"
SUMMARY="${SUMMARY:-${OUT%.txt}.md}"
# BUILD=debug only checks the script itself: debug figures mean nothing.
BUILD="${BUILD:-release}"
BIN="$TARGET/$BUILD/examples/bench"
# FANOUT_DEV_BIN: another `fanout` to measure (e.g. a wrapper alternating two
# builds, for an A/B in one run; see BENCHMARKS.md).
FANOUT="${FANOUT_DEV_BIN:-$TARGET/$BUILD/fanout}"

# wait_port and make_test_tls; they call die, below.
# shellcheck source=scripts/local.sh
source "$ROOT/scripts/local.sh"

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
[[ -x /usr/bin/time ]] || die "/usr/bin/time not found (Debian: apt-get install time)"
command -v openssl >/dev/null || die "openssl not found (the TLS case makes a test CA with it)"

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

profile=()
[[ $BUILD == release ]] && profile=(--release)
# Two invocations: the binary alone, as CI and the Dockerfile build it (one
# invocation with the example would unify dev-dependency features, such as
# tokio's test-util, into the binary measured).
if [[ -z "${NO_BUILD:-}" ]]; then
  echo "bench: building the $BUILD fanout binary and benchmark" >&2
  (cd "$ROOT" && cargo build "${profile[@]}" --quiet -p fanout --bin fanout && cargo build "${profile[@]}" --quiet -p fanout --example bench)
  if has_case fleet || has_case cancel; then
    (cd "$ROOT" && cargo test "${profile[@]}" --quiet --no-run -p fanout --test fleet)
  fi
  if has_case throttle; then
    (cd "$ROOT" && cargo test "${profile[@]}" --quiet --no-run -p fanout --test missed_clients)
  fi
  if has_case latest; then
    (cd "$ROOT" && cargo test "${profile[@]}" --quiet --no-run -p fanout --test fleet)
  fi
fi
[[ -x $FANOUT && -x $BIN ]] || die "$FANOUT or $BIN missing: run without --no-build"

NEED_DYNALITE=0
NEED_MOTO=0
if has_case process || has_case fleet || has_case cancel || has_case latest || has_case throttle || has_case removals || has_case index || { has_case engine && [[ "$ENGINE_CASES" == *:table* ]]; }; then NEED_DYNALITE=1; fi
if has_case process || has_case fleet || has_case cancel || has_case latest || has_case throttle || has_case index || { has_case latency && ((LATENCY_JOBS > 0)); }; then NEED_MOTO=1; fi
if ((NEED_DYNALITE || NEED_MOTO)); then
  "$ROOT/scripts/emulators.sh" install
fi

mkdir -p "$(dirname "$OUT")"
WORK="$(mktemp -d "$(dirname "$OUT")/run.XXXXXX")"
ENDPOINT="http://127.0.0.1:$PORT/bench"
TLS_ENDPOINT="https://localhost:$TLS_PORT/bench"
SLOW_ENDPOINT="http://127.0.0.1:$SLOW_PORT/bench"
LUA="$WORK/post.lua"
# The same POST as the worker's: the payload to one live connection.
cat >"$LUA" <<LUA
wrk.method = "POST"
wrk.body = string.rep("x", $PAYLOAD_BYTES)
LUA

PIDS=()
stop_all() {
  # /usr/bin/time's child (fanout) outlives a killed parent: its pid is
  # collected first, by parent, while the parent still lives.
  local all=() pid child
  for pid in "${PIDS[@]}"; do
    all+=("$pid")
    for child in $(pgrep -P "$pid" 2>/dev/null); do all+=("$child"); done
  done
  for pid in "${all[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  # A worker handed SIGTERM stops within FANOUT_SHUTDOWN_GRACE, but the
  # emulators it would hand its job back to are gone: not waiting long.
  for _ in $(seq 20); do
    local alive=0
    for pid in "${all[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${all[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

"${ON_SINK[@]}" "$BIN" sink --port "$PORT" >/dev/null 2>&1 &
PIDS+=($!)
SINK_PIDS=($!)
wait_port "$PORT" "$!" sink
if has_case process && [[ "$PROCESS_CASES" == *tls:* ]]; then
  make_test_tls "$WORK" bench
  "${ON_SINK[@]}" "$BIN" sink --port "$TLS_PORT" --tls-cert "$WORK/sink.pem" \
    --tls-key "$WORK/sink.key" >/dev/null 2>&1 &
  PIDS+=($!)
  SINK_PIDS+=($!)
  wait_port "$TLS_PORT" "$!" "TLS sink"
fi
if has_case jobs; then
  "${ON_SINK[@]}" "$BIN" sink --port "$SLOW_PORT" --delay-ms 10 >/dev/null 2>&1 &
  PIDS+=($!)
  wait_port "$SLOW_PORT" "$!" "delayed sink"
fi
if ((NEED_DYNALITE)); then
  "${ON_SINK[@]}" node "$ROOT/.local/node/node_modules/dynalite/cli.js" --host 127.0.0.1 \
    --port "$DYNAMODB_PORT" --createTableMs 0 --deleteTableMs 0 >/dev/null 2>&1 &
  PIDS+=($!)
  DYNALITE_PID=$!
  wait_port "$DYNAMODB_PORT" "$!" dynalite
fi
if ((NEED_MOTO)); then
  "${ON_SINK[@]}" "$ROOT/.local/venv/bin/moto_server" -H 127.0.0.1 -p "$SQS_PORT" >/dev/null 2>&1 &
  PIDS+=($!)
  MOTO_PID=$!
  wait_port "$SQS_PORT" "$!" moto
fi
export AWS_ENDPOINT_URL_DYNAMODB="http://127.0.0.1:$DYNAMODB_PORT" \
  AWS_ENDPOINT_URL_SQS="http://127.0.0.1:$SQS_PORT" AWS_EC2_METADATA_DISABLED=true \
  AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
unset AWS_SESSION_TOKEN AWS_PROFILE

{
  echo "# machine: $(nproc) cores, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(uname -sr)"
  echo "# rustc: $(rustc --version), wrk: $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
  echo "# commit: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src examples || echo ' (modified)')"
  echo "# pinned: $([[ $PIN == 1 ]] && echo "worker+wrk cpu $WORKER_CPU, sinks+emulators cpu $SINK_CPU" || echo no)"
  echo "# build $BUILD, in flight $IN_FLIGHT, payload $PAYLOAD_BYTES B, runs $RUNS, cases $BENCH_CASES"
  echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT"

wrk_rate() { # URL → requests/s of wrk on the worker's core
  "${ON_WORKER[@]}" wrk -t1 -c"$IN_FLIGHT" -d"${WRK_SECONDS}s" -s "$LUA" "$1/@connections/conn-1" |
    awk '/^Requests\/sec:/ {print $2}'
}

# One `fanout run --exit-when-idle` on table $1 to endpoint $2 at rate $3
# (the queue and the rest from FANOUT_* in the environment); appends its
# key=value figures to $WORK/line. Not in a subshell: the process must be in
# PIDS for the trap. CPU: bash's `time` of the process (getrusage of the
# reaped child, ms resolution). Peak RSS: /usr/bin/time, which execs fanout
# straight from its own small process (the kernel carries a parent's
# high-water RSS across exec into ru_maxrss: from a big parent, the figure
# would be the parent's).
# CPU ticks (user + system) of the sinks and emulators, a "name ticks" line
# each: what the worker's peers spent on the sink's core during a run.
peer_ticks() {
  local name pid pids
  for name in sink dynalite moto; do
    local total=0
    case $name in
      sink) pids=("${SINK_PIDS[@]}") ;;
      dynalite) pids=(${DYNALITE_PID:-}) ;;
      moto) pids=(${MOTO_PID:-}) ;;
    esac
    for pid in "${pids[@]}"; do
      [[ -r /proc/$pid/stat ]] || continue
      total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
    done
    echo "$name $total"
  done
}

fanout_run() {
  local table=$1 endpoint=$2 rate=$3 log="$WORK/fanout.log" rss="$WORK/rss" cpu="$WORK/cpu" pid
  "$FANOUT" enqueue --data "$(head -c "$PAYLOAD_BYTES" /dev/zero | tr '\0' x)" --id bench \
    >/dev/null 2>"$WORK/enqueue.err" || die "enqueue failed: $(cat "$WORK/enqueue.err")"
  local TIMEFORMAT="%3U %3S %3R"
  grep -E '^cpu[0-9]+ ' /proc/stat >"$WORK/stat.before"
  peer_ticks >"$WORK/peers.before"
  {
    time {
      FANOUT_TABLE="$table" FANOUT_GATEWAY_ENDPOINT="$endpoint" FANOUT_RATE_PER_SECOND="$rate" \
        "${ON_WORKER[@]}" /usr/bin/time -f "%M" -o "$rss" "$FANOUT" run --exit-when-idle >"$log" 2>&1 &
      pid=$!
      PIDS+=("$pid")
      wait "$pid" || die "fanout run failed: $(tail -5 "$log")"
    }
  } 2>"$cpu"
  grep -E '^cpu[0-9]+ ' /proc/stat >"$WORK/stat.after"
  peer_ticks >"$WORK/peers.after"
  python3 - "$log" "$rss" "$cpu" "$WORK/stat.before" "$WORK/stat.after" "$WORKER_CPU" "$SINK_CPU" \
    "$WORK/peers.before" "$WORK/peers.after" "$(getconf CLK_TCK)" >"$WORK/line" <<'PY'
import json, sys
log, rss, cpu, before, after, worker_cpu, sink_cpu, peers_before, peers_after, hz = sys.argv[1:]


def busy(path):
    # /proc/stat per-core jiffies: busy = all but idle and iowait.
    out = {}
    for line in open(path):
        name, *ticks = line.split()
        ticks = [int(t) for t in ticks]
        out[name] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return out


b, a = busy(before), busy(after)


def steal():
    # The hypervisor's share of both cores: time this VM wanted but did not get.
    s0 = sum(int(l.split()[8]) for l in open(before))
    s1 = sum(int(l.split()[8]) for l in open(after))
    t0 = sum(sum(int(t) for t in l.split()[1:]) for l in open(before))
    t1 = sum(sum(int(t) for t in l.split()[1:]) for l in open(after))
    return (s1 - s0) / max(t1 - t0, 1)


def peers(path):
    return {name: int(ticks) for name, ticks in (l.split() for l in open(path))}


peers0, peers1 = peers(peers_before), peers(peers_after)


def share(core):
    name = f"cpu{core}"
    if name not in a:
        return 0.0
    (b0, t0), (b1, t1) = b[name], a[name]
    return (b1 - b0) / max(t1 - t0, 1)


lines = [json.loads(l) for l in open(log) if l.startswith("{")]
jobs = [l for l in lines if l.get("message") == "broadcast"]
if len(jobs) != 1 or jobs[0].get("status") != "done":
    sys.exit(f"expected one finished broadcast in {log}, got {jobs}")
j = jobs[0]
user, system, wall = (float(v) for v in open(cpu).read().split()[-3:])
posts = j["delivered"] + j["gone"] + j["failed"] + j["retries"]
secs = j["duration_ms"] / 1e3
cpu_s = user + system
print(f"posts={posts} secs={secs:.3f} posts_per_s={posts / secs:.0f} "
      f"cpu_s={cpu_s:.3f} cpu_us_per_post={cpu_s * 1e6 / posts:.2f} process_wall_s={wall:.3f} "
      f"peak_rss_mb={int(open(rss).read().split()[-1]) / 1024:.1f} delivered={j['delivered']} "
      f"gone={j['gone']} removed={j['removed']} failed={j['failed']} retries={j['retries']} "
      f"throttled={j['throttled']} worker_core_busy={share(worker_cpu):.2f} "
      f"sink_core_busy={share(sink_cpu):.2f} steal={steal():.3f} "
      + " ".join(f"{name}_cpu_s={(ticks - peers0.get(name, 0)) / int(hz):.2f}" for name, ticks in peers1.items()))
PY
}

process_cases() {
  local run=$1 case mode rows rate_kind table endpoint rate wrk_rps
  export FANOUT_QUEUE_URL FANOUT_METRICS_LISTEN="127.0.0.1:$METRICS_PORT" FANOUT_EMF_INTERVAL=0s \
    FANOUT_RECEIVE_WAIT=1s FANOUT_MAX_IN_FLIGHT="$IN_FLIGHT" FANOUT_SHUTDOWN_GRACE=1s \
    FANOUT_CONNECTED_AT_ATTRIBUTE=connectedAt
  FANOUT_QUEUE_URL=$("$BIN" prepare --queue "fanout-bench-jobs")
  for case in $PROCESS_CASES; do
    IFS=: read -r mode rows rate_kind <<<"$case"
    table="fanout-bench-$rows" endpoint=$ENDPOINT rate=$FREE_RATE wrk_rps=""
    if [[ ! -e "$WORK/table-$rows" ]]; then
      echo "bench: loading $rows rows into dynalite (not measured)" >&2
      "$BIN" prepare --table "$table" --connections "$rows"
      touch "$WORK/table-$rows"
      # dynalite's first scan of a table runs while V8 compiles its scan
      # and delete paths (0.20-0.25 of wrk where later runs reach 0.4): a
      # cost of the emulator, not of the worker. One run, not measured.
      echo "bench: warm-up broadcast on $rows rows (not measured)" >&2
      fanout_run "$table" "$ENDPOINT" "$FREE_RATE"
      "$BIN" prepare --table "$table" --connections "$rows" --only-gone
    else
      # The last broadcast deleted the gone rows.
      "$BIN" prepare --table "$table" --connections "$rows" --only-gone
    fi
    [[ $rate_kind == bound ]] && rate=$BOUND_RATE
    [[ $rate_kind == off ]] && rate=0
    if [[ $mode == tls ]]; then
      endpoint=$TLS_ENDPOINT
      export SSL_CERT_FILE="$WORK/ca.pem"
    fi
    echo "bench: run $run, fanout run, $rows rows from dynalite, $mode, rate $rate" >&2
    fanout_run "$table" "$endpoint" "$rate"
    unset SSL_CERT_FILE
    if [[ $rate_kind != bound ]]; then wrk_rps=$(wrk_rate "$endpoint"); fi
    echo "kind=process run=$run mode=$mode rows=$rows rate=$rate rate_kind=$rate_kind $(cat "$WORK/line") wrk_per_s=$wrk_rps" >>"$OUT"
  done
  unset FANOUT_QUEUE_URL FANOUT_METRICS_LISTEN FANOUT_EMF_INTERVAL FANOUT_RECEIVE_WAIT FANOUT_MAX_IN_FLIGHT \
    FANOUT_SHUTDOWN_GRACE FANOUT_CONNECTED_AT_ATTRIBUTE
}

jobs_cases() {
  local run=$1
  for case in $JOBS_CASES; do
    IFS=: read -r latency slots huge durable <<<"$case"
    huge=${huge:-0}
    local endpoint=$ENDPOINT slots_env=()
    ((latency > 0)) && endpoint=$SLOW_ENDPOINT
    [[ $slots != default ]] && slots_env=(FANOUT_MAX_CONCURRENT_JOBS="$slots")
    [[ ${durable:-} == durable ]] && slots_env+=(FANOUT_CHECKPOINT_TABLE=in-process)
    echo "bench: run $run, $JOBS jobs of $JOBS_AUDIENCE, ${latency} ms per AWS call, max_concurrent_jobs $slots, huge $huge${durable:+, runs recorded}" >&2
    local line
    line=$(env "${slots_env[@]}" FANOUT_QUEUE_URL="http://127.0.0.1:1/in-process" FANOUT_TABLE=in-process \
      FANOUT_CHANNEL_INDEX=by-channel FANOUT_GATEWAY_ENDPOINT="$endpoint" FANOUT_RATE_PER_SECOND="$JOBS_RATE" \
      "${ON_WORKER[@]}" "$BIN" jobs --jobs "$JOBS" --audience "$JOBS_AUDIENCE" --latency-ms "$latency" \
      --payload-bytes "$PAYLOAD_BYTES" --huge "$huge" 2>"$WORK/jobs.err") || die "bench jobs failed: $(tail -5 "$WORK/jobs.err")"
    echo "run=$run slots=$slots $line" >>"$OUT"
  done
}

engine_cases() {
  local run=$1
  for case in $ENGINE_CASES; do
    local n=${case%%:*} store=${case#*:}
    [[ $store == table ]] && store=dynamo
    for path in $PATHS; do
      # The SDK path is 6,000 posts/s: a 1,000,000 broadcast takes minutes.
      [[ $path == sdk ]] && ((n > ENGINE_SDK_MAX)) && continue
      echo "bench: run $run, engine only, N=$n from $store, $path" >&2
      local line wrk_rps
      line=$("${ON_WORKER[@]}" "$BIN" broadcast --path "$path" --store "$store" --connections "$n" \
        --endpoint "$ENDPOINT" --max-in-flight "$IN_FLIGHT" --payload-bytes "$PAYLOAD_BYTES")
      wrk_rps=$(wrk_rate "$ENDPOINT")
      echo "kind=broadcast run=$run $line wrk_per_s=$wrk_rps" >>"$OUT"
    done
  done
}

index_cases() {
  local run=$1 table="fanout-bench-index-$INDEX_CONNECTIONS"
  export FANOUT_QUEUE_URL FANOUT_METRICS_LISTEN="127.0.0.1:$METRICS_PORT" FANOUT_EMF_INTERVAL=0s \
    FANOUT_RECEIVE_WAIT=1s FANOUT_MAX_IN_FLIGHT="$IN_FLIGHT" FANOUT_SHUTDOWN_GRACE=1s \
    FANOUT_CONNECTED_AT_ATTRIBUTE=connectedAt FANOUT_CONNECTION_INDEX=by-connection
  FANOUT_QUEUE_URL=$("$BIN" prepare --queue "fanout-bench-jobs")
  if [[ ! -e "$WORK/index-table" ]]; then
    echo "bench: loading $INDEX_CONNECTIONS connections in two channels each into dynalite (not measured)" >&2
    "$BIN" prepare --table "$table" --connections "$INDEX_CONNECTIONS" --channels
    touch "$WORK/index-table"
  else
    "$BIN" prepare --table "$table" --connections "$INDEX_CONNECTIONS" --channels --only-gone
  fi
  echo "bench: run $run, fanout run through the connection index, $INDEX_CONNECTIONS connections" >&2
  fanout_run "$table" "$ENDPOINT" "$FREE_RATE"
  echo "kind=index run=$run connections=$INDEX_CONNECTIONS rows=$((2 * INDEX_CONNECTIONS)) $(cat "$WORK/line")" >>"$OUT"
  unset FANOUT_QUEUE_URL FANOUT_METRICS_LISTEN FANOUT_EMF_INTERVAL FANOUT_RECEIVE_WAIT FANOUT_MAX_IN_FLIGHT \
    FANOUT_SHUTDOWN_GRACE FANOUT_CONNECTED_AT_ATTRIBUTE FANOUT_CONNECTION_INDEX
}

removals_cases() {
  local run=$1 line
  echo "bench: run $run, removals of $REMOVAL_ROWS rows per layout" >&2
  "${ON_WORKER[@]}" "$BIN" removals --rows "$REMOVAL_ROWS" | while read -r line; do
    echo "run=$run $line" >>"$OUT"
  done
}

for run in $(seq "$RUNS"); do
  has_case process && process_cases "$run"
  has_case removals && removals_cases "$run"
  has_case index && index_cases "$run"
  has_case jobs && jobs_cases "$run"
  has_case engine && engine_cases "$run"
  if has_case split && ((SPLIT_JOBS > 1)); then
    # Every core: the broadcast as one job, then split into segment jobs
    # run at once (as the worker runs a split broadcast), unpinned.
    for jobs in 1 "$SPLIT_JOBS"; do
      echo "bench: run $run, N=$SPLIT_N as $jobs job(s), unpinned" >&2
      line=$("$BIN" broadcast --path lean --connections "$SPLIT_N" --jobs "$jobs" \
        --endpoint "$ENDPOINT" --max-in-flight "$IN_FLIGHT" --payload-bytes "$PAYLOAD_BYTES")
      echo "kind=split run=$run $line" >>"$OUT"
    done
  fi
  if has_case fleet; then
    echo "bench: run $run, the fleet budget: 1, 2, 4 workers, then a kill, then the mixed fleet" >&2
    fleet_ok=1
    (cd "$ROOT" && FANOUT_DEV_TIMING_TARGETS=1 FANOUT_DEV_MIXED=3000:30000 cargo test "${profile[@]}" --quiet -p fanout --test fleet workers_share -- --nocapture) \
      >"$WORK/fleet.out" 2>&1 || fleet_ok=0
    # The figures of a run that missed a target are kept, and the summary
    # says so; the run set goes on.
    grep '^kind=fleet' "$WORK/fleet.out" | sed "s/^/run=$run /" >>"$OUT"
    if ((fleet_ok == 0)); then
      echo "bench: run $run, the fleet case missed a target: $(grep -m1 -A2 'panicked' "$WORK/fleet.out")" >&2
      echo "kind=fleet_missed run=$run" >>"$OUT"
    fi
  fi
  if has_case cancel; then
    echo "bench: run $run, a cancel of a $CANCEL_CONNECTIONS-connection broadcast split over 3 workers" >&2
    cancel_ok=1
    (cd "$ROOT" && FANOUT_DEV_TIMING_TARGETS=1 FANOUT_DEV_CANCEL="$CANCEL_CONNECTIONS" cargo test "${profile[@]}" --quiet -p fanout --test fleet a_cancel -- --nocapture) \
      >"$WORK/cancel.out" 2>&1 || cancel_ok=0
    # With --nocapture a test's line may follow libtest's "test NAME ... ".
    grep -o 'kind=cancel.*' "$WORK/cancel.out" | sed "s/^/run=$run /" >>"$OUT" || true
    if ((cancel_ok == 0)); then
      echo "bench: run $run, the cancel case failed or missed its target: $(grep -m1 -A2 'panicked' "$WORK/cancel.out")" >&2
      echo "kind=cancel_missed run=$run" >>"$OUT"
    fi
  fi
  if has_case throttle; then
    echo "bench: run $run, a throttling endpoint: convergence and a slow client" >&2
    (cd "$ROOT" && FANOUT_DEV_TIMING_TARGETS=1 cargo test "${profile[@]}" --quiet -p fanout --test missed_clients -- --nocapture) \
      >"$WORK/throttle.out" 2>&1 || die "the throttle case failed: $(tail -20 "$WORK/throttle.out")"
    # With --nocapture a test's line may follow libtest's "test NAME ... ".
    grep -o 'kind=throttle.*' "$WORK/throttle.out" | sed "s/^/run=$run /" >>"$OUT"
  fi
  if has_case latest; then
    echo "bench: run $run, newer value wins ($LATEST_SCALE rows:seconds:rate), with latest and without" >&2
    latest_ok=1
    (cd "$ROOT" && FANOUT_DEV_LATEST="$LATEST_SCALE" cargo test "${profile[@]}" --quiet -p fanout --test fleet latest_ -- --nocapture) \
      >"$WORK/latest.out" 2>&1 || latest_ok=0
    # With --nocapture a test's line may follow libtest's "test NAME ... ".
    grep -o 'kind=latest.*' "$WORK/latest.out" | sed "s/^/run=$run /" >>"$OUT" || true
    # The figures of a run whose checks failed are kept, and the summary
    # says so; the run set goes on.
    if ((latest_ok == 0)); then
      echo "bench: run $run, the latest case failed: $(grep -m1 -A2 'panicked' "$WORK/latest.out")" >&2
      echo "kind=latest_failed run=$run" >>"$OUT"
    fi
  fi
  if has_case limiter; then
    echo "bench: run $run, engine only, rate limiter at $LIMIT_RATE/s" >&2
    line=$("${ON_WORKER[@]}" "$BIN" broadcast --path lean --connections $((LIMIT_RATE * LIMIT_SECONDS)) \
      --endpoint "$ENDPOINT" --max-in-flight "$IN_FLIGHT" --rate "$LIMIT_RATE")
    echo "kind=limiter run=$run rate=$LIMIT_RATE $line" >>"$OUT"
  fi
  if has_case latency && ((LATENCY_JOBS > 0)); then
    for path in lean; do
      echo "bench: run $run, SQS to first delivery, $path" >&2
      line=$("${ON_WORKER[@]}" "$BIN" latency --path "$path" --endpoint "$ENDPOINT" --jobs "$LATENCY_JOBS")
      echo "run=$run $line" >>"$OUT"
    done
  fi
done

echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT"
python3 "$ROOT/scripts/bench_summary.py" "$OUT" | tee "$SUMMARY"
echo "bench: raw results in $OUT, summary in $SUMMARY" >&2
