#!/usr/bin/env bash
# Publishes one broadcast job to an SNS topic the jobs queue is subscribed to
# (subscribe-queue.sh).
#
#   TOPIC_ARN=arn:aws:sns:… ./publish-job.sh 'plain text'
#
# The caller needs sns:Publish on the topic (docs/producers.md).
set -euo pipefail

text="$1"
[[ "$text" =~ [\"\\[:cntrl:]] ]] && { echo "publish-job.sh: plain text only here" >&2; exit 2; }
# With an id, the broadcast's idempotency key is the job's; without one, it is
# the notification's MessageId, which SNS keeps across its own retries.
aws sns publish --topic-arn "$TOPIC_ARN" \
  --message "{\"id\":\"news-$(date +%s)-$RANDOM$RANDOM\",\"data\":\"$text\"}" \
  --query MessageId --output text
