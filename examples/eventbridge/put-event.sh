#!/usr/bin/env bash
# Puts one event whose detail is a broadcast job on the default event bus;
# the rule of route-to-queue.sh sends the job to fanout's jobs queue.
#
#   ./put-event.sh 'plain text'
#
# The caller needs events:PutEvents on the bus (docs/producers.md).
set -euo pipefail

text="$1"
[[ "$text" =~ [\"\\[:cntrl:]] ]] && { echo "put-event.sh: plain text only here" >&2; exit 2; }
job="{\"id\":\"event-$(date +%s)-$RANDOM$RANDOM\",\"data\":\"$text\"}"
aws events put-events --entries "[{
  \"Source\": \"my.app\",
  \"DetailType\": \"broadcast\",
  \"Detail\": $(printf '%s' "$job" | sed 's/["\\]/\\&/g; s/.*/"&"/')
}]" --query 'Entries[0].EventId' --output text
