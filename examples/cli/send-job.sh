#!/usr/bin/env bash
# Sends one broadcast job to fanout's jobs queue with the AWS CLI.
#
#   FANOUT_QUEUE_URL=https://sqs.… ./send-job.sh 'hello' [channel]
#
# The caller needs sqs:SendMessage on the queue (docs/producers.md).
set -euo pipefail

# A JSON string of $1 (jq -Rs . does it too, where jq is installed).
json_string() {
  local s="${1//\\/\\\\}"
  s="${s//\"/\\\"}"
  s="${s//$'\n'/\\n}"
  printf '"%s"' "${s//$'\t'/\\t}"
}

# The idempotency key: one per broadcast (a retry of the same broadcast keeps it).
id="greeting-$(date +%s)-$RANDOM$RANDOM"
job="{\"id\":\"$id\",\"data\":$(json_string "${1:-hello}")"
[[ -n "${2:-}" ]] && job+=",\"channel\":$(json_string "$2")"
job+="}"
# AWS CLI v1 ignores AWS_ENDPOINT_URL_SQS (it pins SQS's own endpoint names),
# so a local emulator's endpoint is passed on; unset, nothing is added.
aws sqs send-message ${AWS_ENDPOINT_URL_SQS:+--endpoint-url "$AWS_ENDPOINT_URL_SQS"} \
  --queue-url "$FANOUT_QUEUE_URL" --message-body "$job" \
  --query MessageId --output text
