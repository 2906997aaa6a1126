#!/usr/bin/env bash
# An EventBridge rule whose target is fanout's jobs queue: events with
# source "my.app" and detail-type "broadcast" carry a job as their detail,
# and the target sends only the detail, so the SQS message is the job.
#
#   QUEUE_ARN=arn:aws:sqs:… ./route-to-queue.sh
#
# The input transformer below maps $.detail to the whole message; InputPath
# "$.detail" does the same on AWS. Without either, the target sends the whole
# event (version, id, source, …), which fanout refuses as a job with unknown
# fields. The queue's policy must let events.amazonaws.com send from the
# rule: the template's ProducerRuleArns parameter writes that statement.
set -euo pipefail

rule="${RULE_NAME:-fanout-broadcasts}"
aws events put-rule --name "$rule" \
  --event-pattern '{"source":["my.app"],"detail-type":["broadcast"]}' \
  --query RuleArn --output text
aws events put-targets --rule "$rule" --targets "[{
  \"Id\": \"fanout-jobs\",
  \"Arn\": \"$QUEUE_ARN\",
  \"InputTransformer\": {\"InputPathsMap\": {\"job\": \"\$.detail\"}, \"InputTemplate\": \"<job>\"}
}]" >/dev/null
