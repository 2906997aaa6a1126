#!/usr/bin/env bash
# Subscribes fanout's jobs queue to an SNS topic, so that what the topic gets
# is broadcast. fanout takes both forms: with raw message delivery (RAW=true)
# the SQS message is the job; without it SNS wraps the job in its
# notification envelope ({"Type":"Notification","Message":"<job>",…}), which
# fanout unwraps.
#
#   TOPIC_ARN=arn:aws:sns:… QUEUE_ARN=arn:aws:sqs:… RAW=true ./subscribe-queue.sh
#
# The queue's policy must let sns.amazonaws.com send from the topic: the
# template's ProducerTopicArns parameter writes that statement.
set -euo pipefail

aws sns subscribe --topic-arn "$TOPIC_ARN" --protocol sqs \
  --notification-endpoint "$QUEUE_ARN" \
  --attributes "{\"RawMessageDelivery\":\"${RAW:-true}\"}" \
  --query SubscriptionArn --output text
