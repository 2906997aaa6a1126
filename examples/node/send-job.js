// Sends one broadcast job to fanout's jobs queue with the AWS SDK for
// JavaScript v3 (npm install @aws-sdk/client-sqs).
//
//   FANOUT_QUEUE_URL=https://sqs.… node send-job.js 'hello' [channel]
//
// The producer's role needs sqs:SendMessage on the queue (docs/producers.md).
const { randomUUID } = require("node:crypto");
const { SQSClient, SendMessageCommand } = require("@aws-sdk/client-sqs");

async function main() {
  const [text = "hello", channel] = process.argv.slice(2);
  const job = {
    // The idempotency key: one per broadcast. A retry of this same
    // broadcast keeps it; a new broadcast never reuses it.
    id: `greeting-${randomUUID()}`,
    data: text,
    ...(channel && { channel }),
  };
  const sqs = new SQSClient({});
  const sent = await sqs.send(
    new SendMessageCommand({
      QueueUrl: process.env.FANOUT_QUEUE_URL,
      MessageBody: JSON.stringify(job),
    }),
  );
  console.log(`${job.id} ${sent.MessageId}`);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
