#!/usr/bin/env bash
# Sends one broadcast job to a FIFO jobs queue (FifoJobsQueue=true) with the
# AWS CLI. Jobs of one message group are broadcast in order, so the group is
# the channel: a channel's messages arrive in the order sent, other channels
# do not wait for them.
#
#   FANOUT_QUEUE_URL=https://sqs.….fifo ./send-job.sh channel 'text'
#
# The caller needs sqs:SendMessage on the queue (docs/producers.md).
set -euo pipefail

channel="$1"
text="$2"
[[ "$channel$text" =~ [\"\\[:cntrl:]] ]] && { echo "send-job.sh: plain text only here" >&2; exit 2; }
# The job's id is its idempotency key, and the deduplication id too: SQS
# drops a retry with the same id within 5 minutes, fanout within its
# idempotency window (24 h).
id="$channel-$(date +%s)-$RANDOM$RANDOM"
# AWS CLI v1 ignores AWS_ENDPOINT_URL_SQS (it pins SQS's own endpoint names),
# so a local emulator's endpoint is passed on; unset, nothing is added.
aws sqs send-message ${AWS_ENDPOINT_URL_SQS:+--endpoint-url "$AWS_ENDPOINT_URL_SQS"} \
  --queue-url "$FANOUT_QUEUE_URL" \
  --message-body "{\"id\":\"$id\",\"channel\":\"$channel\",\"data\":\"$text\"}" \
  --message-group-id "$channel" --message-deduplication-id "$id" \
  --query MessageId --output text
