#!/usr/bin/env bash
# The whole of fanout on one machine, in one command, without an AWS account:
#
#   ./scripts/demo.sh
#
# Installs the emulators on first use (moto for SQS, dynalite for DynamoDB),
# starts them and `fanout-dev gateway` on 127.0.0.1, creates the jobs queue, its
# dead-letter queue and the connections table, opens 1,000 real WebSocket
# clients (300 in the channel "news"), drops 100 of them without a goodbye
# (their rows go stale, as when API Gateway's $disconnect is lost), enqueues
# three broadcasts (everyone; the channel; one over 128 KiB), runs the worker
# until the queue is empty, and prints what each broadcast came to. Everything
# it started is stopped by PID when it ends, also when interrupted.
#
# Ports: FANOUT_DEV_EMU_SQS_PORT (5320), FANOUT_DEV_EMU_DYNAMODB_PORT (5321),
# FANOUT_DEV_DEMO_GATEWAY_PORT (8080).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export FANOUT_DEV_EMU_SQS_PORT="${FANOUT_DEV_EMU_SQS_PORT:-5320}"
export FANOUT_DEV_EMU_DYNAMODB_PORT="${FANOUT_DEV_EMU_DYNAMODB_PORT:-5321}"
GATEWAY_PORT="${FANOUT_DEV_DEMO_GATEWAY_PORT:-8080}"
STAGE=demo
TABLE=connections
CHANNEL=news
PLAIN_CLIENTS=700
CHANNEL_CLIENTS=300
DROPPED=100
# Clients of one user (several tabs and phones): a "to" audience.
USER=u-42
USER_CLIENTS=3
# A user with no connection: the user broadcast names both, and its report
# says which was not reached (a producer sends that one a push instead).
OFFLINE_USER=u-99
# Rows of connections that started three hours ago: past API Gateway's two
# hours, so certainly gone; removed without a post.
EXPIRED=50
WORK="$ROOT/.local/demo"
PYTHON="$ROOT/.local/venv/bin/python"

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }
# shellcheck source=scripts/local.sh
source "$ROOT/scripts/local.sh"

PIDS=()
EMULATORS_STARTED=
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if ((${#PIDS[@]})); then
    say "stopping what the demo started"
    stop_pids "${PIDS[@]}"
  fi
  [[ -n "$EMULATORS_STARTED" ]] && ./scripts/emulators.sh stop || true
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "building fanout (debug; the first build takes a few minutes)"
cargo build --quiet --bin fanout --bin fanout-dev
FANOUT="${CARGO_TARGET_DIR:-$ROOT/target}/debug/fanout"
DEV="${CARGO_TARGET_DIR:-$ROOT/target}/debug/fanout-dev"
[[ -x "$FANOUT" ]] || die "no binary at $FANOUT"

say "installing the emulators if needed (moto $(grep -m1 MOTO_VERSION= scripts/emulators.sh | cut -d= -f2), dynalite $(grep -m1 DYNALITE_VERSION= scripts/emulators.sh | cut -d= -f2))"
./scripts/emulators.sh install
(exec 3<>"/dev/tcp/127.0.0.1/$GATEWAY_PORT") 2>/dev/null \
  && die "port $GATEWAY_PORT is taken; set FANOUT_DEV_DEMO_GATEWAY_PORT"
EMULATORS_STARTED=1
./scripts/emulators.sh start
eval "$(./scripts/emulators.sh env)"
export AWS_DEFAULT_REGION="$AWS_REGION" # boto3 reads this one
rm -rf "$WORK"
mkdir -p "$WORK"

say "creating the queue, its dead-letter queue and the table (with a channel index)"
"$PYTHON" scripts/local_resources.py fanout-demo "$TABLE" >"$WORK/setup.env"
source "$WORK/setup.env"
export FANOUT_CHANNEL_INDEX=by-channel
# The gateway writes each connection's start here, as a $connect handler
# copying requestContext.connectedAt would.
export FANOUT_CONNECTED_AT_ATTRIBUTE=connectedAt
# The stand-in completes $connect at once, so a connection is established
# within a second of its start: a first 410 from a client dropped seconds ago
# is posted to again after 3 s, not after API Gateway's two minutes.
export FANOUT_CONNECT_WINDOW="${FANOUT_CONNECT_WINDOW:-3s}"
# "to": {"user": …} reads the by-user index.
export FANOUT_AUDIENCE_INDEXES="user=by-user:userId"
export FANOUT_GATEWAY_ENDPOINT="http://127.0.0.1:$GATEWAY_PORT/$STAGE"
export FANOUT_RATE_PER_SECOND="${FANOUT_RATE_PER_SECOND:-2000}"
# A short long-poll, so `--exit-when-idle` notices the empty queue quickly.
export FANOUT_RECEIVE_WAIT="${FANOUT_RECEIVE_WAIT:-2s}"
# Any free port: the demo does not read the worker's metrics.
export FANOUT_METRICS_LISTEN="${FANOUT_METRICS_LISTEN:-127.0.0.1:0}"
echo "jobs queue $FANOUT_QUEUE_URL"
echo "dead letters $FANOUT_DEAD_LETTER_QUEUE_URL"

say "starting the local API Gateway (ws://127.0.0.1:$GATEWAY_PORT/$STAGE, --keep-stale)"
"$DEV" gateway --listen "127.0.0.1:$GATEWAY_PORT" --stage "$STAGE" --table "$TABLE" \
  --keep-stale >"$WORK/gateway.log" 2>&1 &
PIDS+=($!)
wait_for "the gateway" 20 curl -sf -o /dev/null "http://127.0.0.1:$GATEWAY_PORT/$STAGE/@stats"

say "opening $((PLAIN_CLIENTS + CHANNEL_CLIENTS + USER_CLIENTS)) WebSocket clients ($CHANNEL_CLIENTS in channel '$CHANNEL', $USER_CLIENTS of user '$USER'); dropping $DROPPED without a goodbye"
"$DEV" clients --url "ws://127.0.0.1:$GATEWAY_PORT/$STAGE" --count "$PLAIN_CLIENTS" \
  --drop "$DROPPED" --expect-frames 1 --ready-file "$WORK/plain.ready" \
  --summary-file "$WORK/plain.summary.json" >"$WORK/plain.log" 2>&1 &
PIDS+=($!)
"$DEV" clients --url "ws://127.0.0.1:$GATEWAY_PORT/$STAGE" --count "$CHANNEL_CLIENTS" \
  --channel "$CHANNEL" --expect-frames 2 --ready-file "$WORK/channel.ready" \
  --summary-file "$WORK/channel.summary.json" >"$WORK/channel.log" 2>&1 &
PIDS+=($!)
"$DEV" clients --url "ws://127.0.0.1:$GATEWAY_PORT/$STAGE" --count "$USER_CLIENTS" \
  --expect-frames 2 --ready-file "$WORK/user.ready" \
  --summary-file "$WORK/user.summary.json" >"$WORK/user.log" 2>&1 &
PIDS+=($!)
CLIENT_PIDS=("${PIDS[@]: -3}")
wait_for "the clients to connect" 60 test -f "$WORK/plain.ready" -a -f "$WORK/channel.ready" -a -f "$WORK/user.ready"
# A user's devices: the $connect handler would write the user's id with the
# row; here it goes on the rows of the first few clients.
"$PYTHON" - "$TABLE" "$WORK/user.ready" "$USER" "$USER_CLIENTS" <<'PY'
import json, sys, boto3
table, ready, user, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ids = json.load(open(ready))["live"][:n]
ddb = boto3.client("dynamodb")
for cid in ids:
    ddb.update_item(TableName=table, Key={"connectionId": {"S": cid}},
                    UpdateExpression="SET userId = :u", ExpressionAttributeValues={":u": {"S": user}})
print(f"user {user}: {len(ids)} connections")
PY
"$PYTHON" - "$TABLE" "$EXPIRED" <<'PY'
import sys, time, boto3
table, n = sys.argv[1], int(sys.argv[2])
three_hours_ago = int(time.time() * 1000) - 3 * 3600 * 1000
ddb = boto3.client("dynamodb")
for start in range(0, n, 25):
    ddb.batch_write_item(RequestItems={table: [
        {"PutRequest": {"Item": {"connectionId": {"S": f"expired-{i:03}"},
                                 "connectedAt": {"N": str(three_hours_ago)}}}}
        for i in range(start, min(n, start + 25))]})
PY
ROWS_BEFORE="$("$PYTHON" -c "import boto3; print(boto3.client('dynamodb').scan(TableName='$TABLE', Select='COUNT')['Count'])")"
echo "table rows: $ROWS_BEFORE ($DROPPED of them stale, $EXPIRED of connections that started 3 h ago)"

say "enqueueing four broadcasts: everyone, channel '$CHANNEL', users '$USER' and '$OFFLINE_USER', and one over 128 KiB"
head -c 140000 /dev/zero | tr '\0' 'x' >"$WORK/oversize.txt"
EVERYONE_ID="$("$FANOUT" enqueue --data "hello, everyone")"
CHANNEL_ID="$("$FANOUT" enqueue --data "news for the news channel" --channel "$CHANNEL")"
USER_ID="$("$FANOUT" enqueue --data "a note for $USER" --to "user=$USER" --to "user=$OFFLINE_USER")"
OVERSIZE_ID="$("$FANOUT" enqueue --unchecked --file "$WORK/oversize.txt")"
printf '%s\n' "everyone $EVERYONE_ID" "channel $CHANNEL_ID" "user $USER_ID" "oversize $OVERSIZE_ID" >"$WORK/jobs.txt"

say "running the worker until the queue is empty"
started=$SECONDS
# In the background and waited for, so an interrupt is acted on at once
# (bash defers traps while a foreground child runs).
"$FANOUT" run --exit-when-idle >"$WORK/worker.log" 2>&1 &
WORKER=$!
PIDS+=("$WORKER")
wait "$WORKER" \
  || { tail -n 20 "$WORK/worker.log" >&2; die "the worker failed (log: $WORK/worker.log)"; }
echo "worker done in $((SECONDS - started)) s"

say "closing the clients and collecting what they received"
sleep 0.5
for pid in "${CLIENT_PIDS[@]}"; do
  kill -INT "$pid" 2>/dev/null || true
done
wait_for "the clients' summaries" 30 test -f "$WORK/plain.summary.json" -a -f "$WORK/channel.summary.json" -a -f "$WORK/user.summary.json"

say "report"
"$PYTHON" - "$WORK" "$TABLE" "$FANOUT_DEAD_LETTER_QUEUE_URL" "$ROWS_BEFORE" \
  "$((PLAIN_CLIENTS - DROPPED))" "$CHANNEL_CLIENTS" "$EXPIRED" "$USER" "$USER_CLIENTS" \
  "$FANOUT_REPORT_QUEUE_URL" "$OFFLINE_USER" <<'PY'
import json, sys, boto3
work, table, dlq, rows_before, plain_live, channel_live, expired, user, user_clients, report_queue, offline = sys.argv[1:12]
plain_live, channel_live, expired, user_clients = int(plain_live), int(channel_live), int(expired), int(user_clients)
jobs = dict(line.split() for line in open(f"{work}/jobs.txt"))
names = {v: k for k, v in jobs.items()}
reports = {}
for line in open(f"{work}/worker.log"):
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    if entry.get("message") == "broadcast" and entry.get("job_id") in names:
        reports[names[entry["job_id"]]] = entry
print(f"{'broadcast':<10} {'audience':>8} {'delivered':>9} {'gone':>5} {'expired':>7} {'removed':>7} {'failed':>6} {'wall':>8}")
for name in ("everyone", "channel", "user"):
    r = reports.get(name)
    if r is None:
        print(f"{name:<10} (no report in the worker log)")
        continue
    print(f"{name:<10} {r.get('audience', '?'):>8} {r.get('delivered', '?'):>9} {r.get('gone', '?'):>5} {r.get('expired', '?'):>7} "
          f"{r.get('removed', '?'):>7} {r.get('failed', '?'):>6} {r.get('duration_ms', '?'):>6}ms")

plain = json.load(open(f"{work}/plain.summary.json"))
channel = json.load(open(f"{work}/channel.summary.json"))
users = json.load(open(f"{work}/user.summary.json"))
def got(summary, text):
    return next((p["clients"] for p in summary["payloads"] if p["preview"] == text), 0)
checks = [
    ("every live client got 'hello, everyone' once",
     got(plain, "hello, everyone") == plain_live and got(channel, "hello, everyone") == channel_live
     and got(users, "hello, everyone") == user_clients),
    (f"only the {channel_live} channel clients got the channel message",
     got(channel, "news for the news channel") == channel_live and got(plain, "news for the news channel") == 0),
    ("no client got anything twice",
     all(s["clients_with_duplicates"] == 0 for s in (plain, channel, users))),
    ("each live client got exactly its messages", all(s.get("ok") is True for s in (plain, channel, users))),
    (f"the {expired} rows of 3 h ago were removed without a post",
     reports.get("everyone", {}).get("expired") == expired),
    (f"only the {user_clients} connections of user {user} got its note",
     got(users, f"a note for {user}") == user_clients
     and got(plain, f"a note for {user}") == 0 and got(channel, f"a note for {user}") == 0),
]
rows_after = boto3.client("dynamodb").scan(TableName=table, Select="COUNT")["Count"]
print(f"\ntable rows: {rows_before} before, {rows_after} after (gone and expired rows removed: {int(rows_before) - rows_after})")
for text, ok in checks:
    print(f"  [{'ok' if ok else 'FAILED'}] {text}")

sqs = boto3.client("sqs")
dead = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10, MessageAttributeNames=["All"],
                           WaitTimeSeconds=1).get("Messages", [])
print(f"\ndead-letter queue: {len(dead)} message(s)")
for m in dead:
    reason = m.get("MessageAttributes", {}).get("fanout.reason", {}).get("StringValue", "(no reason attribute)")
    print(f"  {len(m['Body'])} bytes, reason: {reason}")
sqs_reports = []
while True:
    batch = sqs.receive_message(QueueUrl=report_queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
    if not batch:
        break
    sqs_reports.extend(json.loads(m["Body"]) for m in batch)
print(f"\nbroadcast reports on the report queue (FANOUT_REPORT_QUEUE_URL): {len(sqs_reports)}")
print(f"  {'broadcast':<10} {'status':<14} {'final':<6} {'audience':>8} {'delivered':>9} {'gone':>5} {'expired':>7} {'removed':>7}")
for r in sorted(sqs_reports, key=lambda r: names.get(r["id"], r["id"])):
    print(f"  {names.get(r['id'], r['id'])[:10]:<10} {r['status']:<14} {str(r['final']).lower():<6} {r['audience']:>8} "
          f"{r['delivered']:>9} {r['gone']:>5} {r['expired']:>7} {r['removed']:>7}")
by_name = {names.get(r["id"]): r for r in sqs_reports}
report_ok = (len(sqs_reports) == 4
             and all(by_name.get(n, {}).get("status") == "done" for n in ("everyone", "channel", "user"))
             and by_name.get("oversize", {}).get("status") == "dead_lettered"
             and all(r["final"] for r in sqs_reports)
             and by_name["everyone"]["delivered"] == reports["everyone"]["delivered"])
print(f"  [{'ok' if report_ok else 'FAILED'}] one final report per broadcast, its counts those of the worker's log")
notes = by_name.get("user", {})
print(f"\nthe user broadcast named {user} and {offline}: reached {notes.get('reached')}, unreached {notes.get('unreached')}")
for nobody in notes.get("unreached") or []:
    print(f"  a producer falls back to a push notification for {nobody}")
receipts_ok = notes.get("reached") == 1 and notes.get("unreached") == [offline]
print(f"  [{'ok' if receipts_ok else 'FAILED'}] {user} reached, {offline} (no connection) unreached")
sys.exit(0 if all(ok for _, ok in checks) and len(dead) == 1 and report_ok and receipts_ok else 1)
PY
echo
echo "logs and summaries: $WORK"
