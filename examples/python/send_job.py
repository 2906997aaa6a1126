"""Sends one broadcast job to fanout's jobs queue with boto3.

    FANOUT_QUEUE_URL=https://sqs.… python send_job.py 'hello' [channel]

The producer's role needs sqs:SendMessage on the queue (docs/producers.md).
"""

import json
import os
import sys
import uuid

import boto3


def main():
    text = sys.argv[1] if len(sys.argv) > 1 else "hello"
    job = {
        # The idempotency key: one per broadcast. A retry of this same
        # broadcast keeps it; a new broadcast never reuses it.
        "id": f"greeting-{uuid.uuid4()}",
        "data": text,
    }
    if len(sys.argv) > 2:
        job["channel"] = sys.argv[2]
    sent = boto3.client("sqs").send_message(
        QueueUrl=os.environ["FANOUT_QUEUE_URL"], MessageBody=json.dumps(job)
    )
    print(job["id"], sent["MessageId"])


if __name__ == "__main__":
    main()
