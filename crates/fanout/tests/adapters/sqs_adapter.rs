//! `SqsQueue` against the SQS emulator (moto): receive, visibility, batch
//! delete, dead letters with their reason, and the error mapping.

use fanout_testkit::support;

use std::time::{Duration, Instant};

use fanout_aws::{REASON_ATTRIBUTE, SOURCE_MESSAGE_ATTRIBUTE, SqsQueue};
use fanout_core::queue::{DeadLettered, JobQueue, Message, QueueError, Receipt, SendOptions};
use support::{QueueSpec, TestQueue, counts, create_queue, create_queue_with_dlq, receive_all};

const WAIT: Duration = Duration::from_secs(1);
/// How long a received message stays hidden, as the worker asks.
const VISIBILITY: Duration = Duration::from_secs(30);

async fn adapter(url: &str, dead_letter_url: Option<String>) -> SqsQueue {
    let config = support::sdk_config().await;
    adapter_with(&config, url, dead_letter_url, WAIT)
}

/// The adapter on `url` as `fanout run` builds it, its long poll `wait`.
fn adapter_with(
    config: &aws_config::SdkConfig,
    url: &str,
    dead_letter_url: Option<String>,
    wait: Duration,
) -> SqsQueue {
    SqsQueue::new(
        fanout_aws::clients::sqs_client(config, wait),
        url,
        dead_letter_url,
        wait,
    )
}

/// A new queue (its default visibility timeout `visibility_seconds`, if
/// given), and the adapter on it.
async fn fresh(
    name: &str,
    visibility_seconds: Option<u32>,
) -> (aws_sdk_sqs::Client, TestQueue, SqsQueue) {
    let sqs = support::sqs().await;
    let spec = QueueSpec {
        visibility_seconds,
        ..QueueSpec::default()
    };
    let q = create_queue(&sqs, name, &spec).await;
    let queue = adapter(&q.url, None).await;
    (sqs, q, queue)
}

/// Whether a receive brings nothing.
async fn nothing_visible(queue: &SqsQueue) -> bool {
    queue
        .receive(10, VISIBILITY)
        .await
        .expect("receive")
        .is_empty()
}

/// A new queue (FIFO if asked) with its dead-letter queue, and the adapter
/// on both.
async fn with_dead_letters(
    name: &str,
    fifo: bool,
) -> (aws_sdk_sqs::Client, TestQueue, TestQueue, SqsQueue) {
    let sqs = support::sqs().await;
    let (q, dlq) = create_queue_with_dlq(&sqs, name, fifo, None).await;
    let queue = adapter(&q.url, Some(dlq.url.clone())).await;
    (sqs, q, dlq, queue)
}

/// Receives until `n` messages arrived (moto may split a batch).
/// Sends one job and receives it back.
async fn send_and_receive(queue: &SqsQueue) -> Message {
    queue
        .send("job", &SendOptions::default())
        .await
        .expect("send");
    receive_n(queue, 1).await.remove(0)
}

async fn receive_n(queue: &SqsQueue, n: usize) -> Vec<Message> {
    let mut messages = Vec::new();
    for _ in 0..10 {
        if messages.len() >= n {
            break;
        }
        messages.extend(queue.receive(10, VISIBILITY).await.expect("receive"));
    }
    assert_eq!(messages.len(), n, "received {messages:?}");
    messages
}

#[tokio::test]
async fn sent_jobs_are_received_and_deleted_in_one_batch() {
    let (sqs, q, queue) = fresh("jobs", None).await;

    let mut sent = Vec::new();
    for i in 0..3 {
        let id = queue
            .send(&format!("job {i}"), &SendOptions::default())
            .await
            .expect("send");
        sent.push(id);
    }
    let messages = receive_n(&queue, 3).await;
    let mut bodies: Vec<_> = messages.iter().map(|m| m.body.clone()).collect();
    bodies.sort();
    assert_eq!(bodies, ["job 0", "job 1", "job 2"]);
    let mut ids: Vec<_> = messages.iter().map(|m| m.id.clone()).collect();
    ids.sort();
    sent.sort();
    assert_eq!(ids, sent);
    assert!(messages.iter().all(|m| m.receive_count == 1));

    let receipts: Vec<Receipt> = messages.iter().map(|m| m.receipt.clone()).collect();
    let failed = queue.delete(&receipts).await.expect("delete");
    assert!(failed.is_empty(), "failed: {failed:?}");
    assert_eq!(counts(&sqs, &q.url).await, (0, 0));
}

#[tokio::test]
async fn an_empty_queue_answers_with_no_messages() {
    let (_sqs, _q, queue) = fresh("empty", None).await;
    assert!(nothing_visible(&queue).await);
}

#[tokio::test]
async fn visibility_hides_a_message_and_a_zero_timeout_releases_it() {
    let (sqs, q, queue) = fresh("visibility", Some(1)).await;
    let first = send_and_receive(&queue).await;
    // A heartbeat well past the queue's 1 s default keeps it hidden.
    queue
        .set_visibility(&first.receipt, Duration::from_secs(60))
        .await
        .expect("heartbeat");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(counts(&sqs, &q.url).await, (0, 1));
    assert!(nothing_visible(&queue).await);

    // Release: visible at once, and the receive count goes up.
    queue
        .set_visibility(&first.receipt, Duration::ZERO)
        .await
        .expect("release");
    let second = receive_n(&queue, 1).await.remove(0);
    assert_eq!(second.id, first.id);
    assert_eq!(second.receive_count, 2);
}

#[tokio::test]
async fn a_failed_delete_entry_comes_back_as_its_receipt() {
    let (sqs, q, queue) = fresh("partial-delete", None).await;
    let message = send_and_receive(&queue).await;

    let bogus = Receipt("not-a-receipt-handle".to_owned());
    let failed = queue
        .delete(&[message.receipt.clone(), bogus.clone()])
        .await
        .expect("delete");
    assert_eq!(failed, [bogus]);
    assert_eq!(counts(&sqs, &q.url).await, (0, 0));
}

#[tokio::test]
async fn a_stale_receipt_is_reported_as_such() {
    let (_sqs, _q, queue) = fresh("stale", None).await;
    let err = queue
        .set_visibility(
            &Receipt("not-a-receipt-handle".to_owned()),
            Duration::from_secs(30),
        )
        .await
        .expect_err("a bogus receipt must fail");
    assert!(matches!(err, QueueError::StaleReceipt), "{err:?}");
}

#[tokio::test]
async fn dead_letters_carry_the_body_and_the_reason() {
    let (sqs, _q, dlq, queue) = with_dead_letters("dl", false).await;
    queue
        .send(r#"{"payload":"poison"}"#, &SendOptions::default())
        .await
        .expect("send");
    let message = receive_n(&queue, 1).await.remove(0);

    let reason = format!("payload too large: {}", "é".repeat(5000));
    let outcome = queue
        .dead_letter(&message, &reason)
        .await
        .expect("dead letter");
    assert_eq!(outcome, DeadLettered::Sent);

    let letters = receive_all(&sqs, &dlq.url).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.body, message.body);
    assert_eq!(letter.attributes[SOURCE_MESSAGE_ATTRIBUTE], message.id);
    let stored = &letter.attributes[REASON_ATTRIBUTE];
    assert!(reason.starts_with(stored.as_str()));
    assert!(stored.starts_with("payload too large: é"));
    assert!(stored.chars().count() < reason.chars().count());
}

#[tokio::test]
async fn fifo_dead_letters_and_sends_carry_group_and_deduplication_ids() {
    let (sqs, _q, dlq, queue) = with_dead_letters("fifo", true).await;
    let options = SendOptions {
        group_id: Some("channel-7".to_owned()),
        deduplication_id: Some("job-7".to_owned()),
        ..SendOptions::default()
    };
    queue.send("job 7", &options).await.expect("fifo send");
    let message = receive_n(&queue, 1).await.remove(0);
    assert_eq!(message.body, "job 7");

    queue
        .dead_letter(&message, "bad job")
        .await
        .expect("dead letter");
    // The same job dead-lettered again (its delete failed) is deduplicated.
    queue
        .dead_letter(&message, "bad job")
        .await
        .expect("dead letter twice");
    let letters = receive_all(&sqs, &dlq.url).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].attributes[REASON_ATTRIBUTE], "bad job");
    assert_eq!(letters[0].system["MessageGroupId"], message.id);
}

#[tokio::test]
async fn without_a_dead_letter_queue_nothing_is_sent() {
    let (_sqs, _q, queue) = fresh("no-dlq", None).await;
    let message = send_and_receive(&queue).await;
    let outcome = queue.dead_letter(&message, "bad").await.expect("no-op");
    assert_eq!(outcome, DeadLettered::NotConfigured);
}

#[tokio::test]
async fn a_missing_queue_is_named() {
    let sqs = support::sqs().await;
    // A real queue's URL with another name: same account and host.
    let q = create_queue(&sqs, "exists", &QueueSpec::default()).await;
    let missing = format!("{}-missing", q.url);
    let queue = adapter(&missing, None).await;
    let err = queue
        .receive(1, VISIBILITY)
        .await
        .expect_err("no such queue");
    match err {
        QueueError::NoSuchQueue { url } => assert_eq!(url, missing),
        other => panic!("expected NoSuchQueue, got {other:?}"),
    }
    let err = queue
        .send("job", &SendOptions::default())
        .await
        .expect_err("no such queue");
    assert!(matches!(err, QueueError::NoSuchQueue { .. }), "{err:?}");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_unavailable_quickly() {
    let config = support::unreachable_config().await;
    let queue = adapter_with(&config, "http://127.0.0.1:1/000000000000/jobs", None, WAIT);
    let started = Instant::now();
    let err = queue
        .receive(1, VISIBILITY)
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, QueueError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() < support::UNREACHABLE_WITHIN,
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_long_poll_past_the_sdk_stall_grace_period_returns_empty() {
    // The SDK's stalled-stream protection has a 5 s grace period; a long
    // poll that waits longer must still end as an empty receive.
    let sqs = support::sqs().await;
    let q = create_queue(&sqs, "long-poll", &QueueSpec::default()).await;
    let wait = Duration::from_secs(6);
    let config = support::sdk_config().await;
    let queue = adapter_with(&config, &q.url, None, wait);
    let started = Instant::now();
    let messages = queue
        .receive(10, VISIBILITY)
        .await
        .expect("an empty long poll");
    assert!(messages.is_empty());
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Sends `body` straight through the SDK, as a producer would, with string
/// attributes `names[i] = values[i]`, a binary one and a trace header.
async fn produce(sqs: &aws_sdk_sqs::Client, url: &str, body: &str, attributes: &[(&str, &str)]) {
    use aws_sdk_sqs::types::{
        MessageAttributeValue, MessageSystemAttributeNameForSends, MessageSystemAttributeValue,
    };
    let mut request = sqs
        .send_message()
        .queue_url(url)
        .message_body(body)
        .message_system_attributes(
            MessageSystemAttributeNameForSends::AwsTraceHeader,
            MessageSystemAttributeValue::builder()
                .data_type("String")
                .string_value(TRACE)
                .build()
                .expect("a trace header"),
        );
    for (name, value) in attributes {
        let value = if *name == "blob" {
            MessageAttributeValue::builder()
                .data_type("Binary")
                .binary_value(aws_sdk_sqs::primitives::Blob::new(value.as_bytes()))
        } else {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(*value)
        };
        request = request.message_attributes(*name, value.build().expect("an attribute"));
    }
    request.send().await.expect("produce");
}

const TRACE: &str = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";

/// Every message attribute of the messages on `url` (binary ones as text),
/// and each message's AWSTraceHeader.
async fn attributes_on(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
) -> Vec<(std::collections::BTreeMap<String, String>, Option<String>)> {
    support::receive_all(sqs, url)
        .await
        .into_iter()
        .map(|m| {
            let trace = m.system.get("AWSTraceHeader").cloned();
            (m.attributes.into_iter().collect(), trace)
        })
        .collect()
}

#[tokio::test]
async fn the_first_visibility_window_is_the_workers_not_the_queues() {
    // The queue's own default is 1 s; the worker asks for 60 s.
    let (sqs, q, queue) = fresh("first-window", Some(1)).await;
    queue
        .send("job", &SendOptions::default())
        .await
        .expect("send");
    let received = queue
        .receive(10, Duration::from_secs(60))
        .await
        .expect("receive");
    assert_eq!(received.len(), 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        counts(&sqs, &q.url).await,
        (0, 1),
        "still hidden after the queue's default window"
    );
}

#[tokio::test]
async fn dead_letters_keep_the_producers_attributes_beside_the_reason() {
    let (sqs, q, dlq, queue) = with_dead_letters("dl-attrs", false).await;
    produce(
        &sqs,
        &q.url,
        "{not json",
        &[("tenant", "acme"), ("blob", "raw bytes")],
    )
    .await;
    let message = receive_n(&queue, 1).await.remove(0);
    queue
        .dead_letter(&message, "not a valid job")
        .await
        .expect("dead letter");

    let letters = attributes_on(&sqs, &dlq.url).await;
    assert_eq!(letters.len(), 1);
    let (attributes, trace) = &letters[0];
    assert_eq!(attributes[REASON_ATTRIBUTE], "not a valid job");
    assert_eq!(attributes[SOURCE_MESSAGE_ATTRIBUTE], message.id);
    assert_eq!(attributes["tenant"], "acme");
    assert_eq!(attributes["blob"], "raw bytes");
    assert_eq!(trace.as_deref(), Some(TRACE));
}

#[tokio::test]
async fn a_redriven_job_keeps_the_producers_attributes_but_not_fanouts() {
    let (sqs, q, dlq, queue) = with_dead_letters("redrive-attrs", false).await;
    produce(&sqs, &q.url, "{not json", &[("tenant", "acme")]).await;
    let message = receive_n(&queue, 1).await.remove(0);
    queue
        .dead_letter(&message, "bad")
        .await
        .expect("dead letter");
    queue.delete(&[message.receipt]).await.expect("delete");

    let dead_letters = adapter(&dlq.url, None).await;
    let done = fanout_core::queue::redrive(&dead_letters, &queue, 10, None)
        .await
        .expect("redrive");
    assert_eq!(done.moved, 1);
    let jobs = attributes_on(&sqs, &q.url).await;
    assert_eq!(jobs.len(), 1);
    let (attributes, trace) = &jobs[0];
    assert_eq!(
        attributes.keys().collect::<Vec<_>>(),
        ["tenant"],
        "fanout's own attributes are stripped"
    );
    assert_eq!(trace.as_deref(), Some(TRACE));
}

#[tokio::test]
async fn a_dead_letter_of_a_message_with_ten_attributes_stays_within_sqss_ten() {
    // moto does not enforce the limit (SQS does): count what was sent.
    let (sqs, q, dlq, queue) = with_dead_letters("dl-ten", false).await;
    let names: Vec<String> = (0..10).map(|n| format!("a{n}")).collect();
    let attributes: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    produce(&sqs, &q.url, "{not json", &attributes).await;
    let message = receive_n(&queue, 1).await.remove(0);
    assert_eq!(message.attributes.len(), 10);
    queue
        .dead_letter(&message, "not a valid job")
        .await
        .expect("dead letter");
    let letters = attributes_on(&sqs, &dlq.url).await;
    let (attributes, trace) = &letters[0];
    assert_eq!(attributes.len(), 10, "{attributes:?}");
    assert_eq!(
        attributes[REASON_ATTRIBUTE],
        format!(
            "not a valid job [source message {}] [no room for message attributes: a9]",
            message.id
        )
    );
    assert!(attributes.contains_key("a8") && !attributes.contains_key("a9"));
    assert_eq!(
        trace.as_deref(),
        Some(TRACE),
        "system attributes do not count"
    );
}
