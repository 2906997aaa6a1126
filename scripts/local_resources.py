#!/usr/bin/env python3
"""The queues and the connections table a local fanout runs against.

Creates, on the emulators named by the AWS_* variables (see
`scripts/emulators.sh env`), a jobs queue with its dead-letter queue
(redrive after 3 receives), a reports queue, and a connections table keyed
by `connectionId` with the `by-channel` and `by-user` indexes the template
makes. As a command it prints the settings as `export` lines:

    .local/venv/bin/python scripts/local_resources.py PREFIX TABLE
"""

import json
import sys


def create(prefix, table):
    """Creates the resources; returns the FANOUT_* settings naming them."""
    import boto3  # the venv's, installed by scripts/emulators.sh

    sqs = boto3.client("sqs")
    dlq = sqs.create_queue(QueueName=f"{prefix}-jobs-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(
        QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    jobs = sqs.create_queue(QueueName=f"{prefix}-jobs", Attributes={
        "VisibilityTimeout": "30",
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"}),
    })["QueueUrl"]
    reports = sqs.create_queue(QueueName=f"{prefix}-reports")["QueueUrl"]
    index = lambda name, attribute: {  # noqa: E731
        "IndexName": name,
        "KeySchema": [{"AttributeName": attribute, "KeyType": "HASH"}],
        "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": ["connectedAt"]},
    }
    ddb = boto3.client("dynamodb")
    ddb.create_table(
        TableName=table,
        AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"}
                              for a in ("connectionId", "channel", "userId")],
        KeySchema=[{"AttributeName": "connectionId", "KeyType": "HASH"}],
        GlobalSecondaryIndexes=[index("by-channel", "channel"), index("by-user", "userId")],
        BillingMode="PAY_PER_REQUEST",
    )
    ddb.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 0.2})
    return {
        "FANOUT_QUEUE_URL": jobs,
        "FANOUT_DEAD_LETTER_QUEUE_URL": dlq,
        "FANOUT_REPORT_QUEUE_URL": reports,
        "FANOUT_TABLE": table,
    }


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    for name, value in create(sys.argv[1], sys.argv[2]).items():
        print(f"export {name}={value}")
