//! The job schema (`docs/job.schema.json`) against the parser, both ways: the
//! job examples in the docs, the valid corpus (`tests/jobs/valid/`) and the
//! jobs fanout itself hands on pass the schema and `fanout_core::job::parse`;
//! the invalid corpus (`tests/jobs/invalid/`) fails both. What a schema
//! cannot check is listed in docs/jobs.md and checked here on the parser
//! alone, with the schema shown to accept it, so the list stays true.
//!
//! The schema is checked with Python's `jsonschema` (a validator this
//! project did not write), pinned and installed into `.local/venv` by
//! `scripts/emulators.sh install`, which `./scripts/test.sh` runs.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use fanout_core::connection::{Connection, KeyValue, RowKey};
use fanout_core::job::{self, Capabilities, JobError, JobSpec};
use fanout_core::store::{Cursor, Position};

use crate::sources::root;

/// A producer's check: any named audience, channels allowed.
const PRODUCER: Capabilities = Capabilities {
    channels: true,
    audiences: None,
};

/// What the schema says of one body.
#[derive(Debug, serde::Deserialize)]
struct Verdict {
    /// `None` when the worker's schema (the root) accepts it.
    job: Option<String>,
    /// `None` when `$defs/producerJob` accepts it.
    producer: Option<String>,
}

/// Runs the schema over `bodies` in one Python process.
fn schema(bodies: &[String]) -> Vec<Verdict> {
    let python = root().join(".local/venv/bin/python");
    assert!(
        python.exists(),
        "{} not found: run ./scripts/test.sh (or ./scripts/emulators.sh install), which installs jsonschema",
        python.display()
    );
    let mut child = Command::new(&python)
        .arg(root().join("crates/fanout/tests/jobs/validate.py"))
        .arg(root().join("docs/job.schema.json"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the schema validator");
    let mut input = String::new();
    for body in bodies {
        input.push_str(&serde_json::to_string(body).unwrap());
        input.push('\n');
    }
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let output = child.wait_with_output().expect("run the schema validator");
    writer.join().unwrap().expect("write the bodies");
    assert!(
        output.status.success(),
        "the validator failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let verdicts: Vec<Verdict> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a verdict"))
        .collect();
    assert_eq!(verdicts.len(), bodies.len(), "one verdict per body");
    verdicts
}

/// What the worker reads a body as: a broadcast or a cancel.
fn parse(body: &str) -> Result<job::Order, JobError> {
    job::read(body, "message-1", &PRODUCER)
}

/// A body that must be a broadcast.
fn broadcast(body: &str) -> Result<job::Job, JobError> {
    job::parse(body, "message-1", &PRODUCER)
}

/// `(file name, body)` of every file in `tests/jobs/{dir}`.
fn corpus(dir: &str) -> Vec<(String, String)> {
    let path = root().join("crates/fanout/tests/jobs").join(dir);
    let mut files: Vec<(String, String)> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let body = std::fs::read_to_string(&p).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), body)
        })
        .collect();
    files.sort();
    assert!(files.len() >= 20, "the {dir} corpus is there");
    files
}

/// Every job in the docs' `json` blocks: a block, or each line of it, that
/// is an object with `data` or `data_base64`, or an SNS notification.
fn doc_examples() -> Vec<(String, String)> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut examples = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let mut block: Option<(usize, String)> = None;
        for (n, line) in text.lines().enumerate() {
            match (&mut block, line.trim()) {
                (None, "```json") => block = Some((n + 1, String::new())),
                (Some((start, body)), "```") => {
                    let candidates: Vec<String> =
                        if serde_json::from_str::<serde_json::Value>(body).is_ok() {
                            vec![body.clone()]
                        } else {
                            body.lines().map(str::to_owned).collect()
                        };
                    for candidate in candidates {
                        let Ok(serde_json::Value::Object(fields)) =
                            serde_json::from_str::<serde_json::Value>(&candidate)
                        else {
                            continue;
                        };
                        if fields.contains_key("data")
                            || fields.contains_key("data_base64")
                            || fields.get("Type").is_some_and(|t| t == "Notification")
                        {
                            examples.push((format!("{name}:{start}"), candidate));
                        }
                    }
                    block = None;
                }
                (Some((_, body)), _) => {
                    body.push_str(line);
                    body.push('\n');
                }
                (None, _) => {}
            }
        }
    }
    examples
}

#[test]
fn the_docs_examples_and_the_valid_corpus_pass_the_schema_and_the_parser() {
    let examples = doc_examples();
    assert!(
        examples.len() >= 10,
        "the job examples of README.md and docs/jobs.md are found: {examples:?}"
    );
    let valid = corpus("valid");
    let bodies: Vec<String> = examples
        .iter()
        .chain(&valid)
        .map(|(_, b)| b.clone())
        .collect();
    let verdicts = schema(&bodies);
    let mut failures = Vec::new();
    for ((name, body), verdict) in examples.iter().chain(&valid).zip(&verdicts) {
        if let Err(e) = parse(body) {
            failures.push(format!("{name}: the parser refuses it: {e}"));
        }
        if let Some(e) = &verdict.job {
            failures.push(format!("{name}: the schema refuses it: {e}"));
        }
    }
    // A producer's example is a producer's job: no hand-on fields.
    for ((name, _), verdict) in examples.iter().zip(&verdicts) {
        if let Some(e) = &verdict.producer {
            failures.push(format!("{name}: not a producer's job: {e}"));
        }
    }
    for ((name, _), verdict) in valid.iter().zip(&verdicts[examples.len()..]) {
        let hand_on = name.starts_with("handon-");
        if hand_on == verdict.producer.is_none() {
            failures.push(format!(
                "{name}: producerJob says {:?}; hand-on fields are fanout's alone",
                verdict.producer
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn the_invalid_corpus_fails_the_schema_and_the_parser() {
    let invalid = corpus("invalid");
    let bodies: Vec<String> = invalid.iter().map(|(_, b)| b.clone()).collect();
    let verdicts = schema(&bodies);
    let mut failures = Vec::new();
    for ((name, body), verdict) in invalid.iter().zip(&verdicts) {
        if let Ok(job) = parse(body) {
            failures.push(format!("{name}: the parser accepts it: {job:?}"));
        }
        if verdict.job.is_none() {
            failures.push(format!("{name}: the schema accepts it"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn an_sns_notification_carries_a_job_the_schema_checks() {
    let envelope = |message: &str| {
        serde_json::json!({
            "Type": "Notification",
            "MessageId": "0f0f0f0f-0000-0000-0000-000000000000",
            "TopicArn": "arn:aws:sns:us-east-1:000000000000:broadcasts",
            "Message": message,
        })
        .to_string()
    };
    let mut bodies = Vec::new();
    let mut expect = Vec::new();
    for (dir, ok) in [("valid", true), ("invalid", false)] {
        for (name, body) in corpus(dir) {
            bodies.push(envelope(body.trim_end()));
            expect.push((name, ok));
        }
    }
    let verdicts = schema(&bodies);
    for ((body, (name, ok)), verdict) in bodies.iter().zip(&expect).zip(&verdicts) {
        assert_eq!(parse(body).is_ok(), *ok, "{name} in an envelope, parser");
        assert_eq!(verdict.job.is_none(), *ok, "{name} in an envelope, schema");
    }
    // Without an id, the envelope's MessageId is the broadcast key.
    let job = broadcast(&envelope(r#"{"data":"x"}"#)).unwrap();
    assert_eq!(job.id, "0f0f0f0f-0000-0000-0000-000000000000");
}

/// The jobs fanout writes back on the queue (continuations with each kind of
/// cursor, deferred connections with each key type, segments, a connection
/// deferred too often) pass the schema's root, not `producerJob`, and parse
/// back.
#[test]
fn what_fanout_hands_on_passes_the_schema() {
    let job = |body: &str| broadcast(body).unwrap();
    let key = |pairs: Vec<(&str, KeyValue)>| {
        RowKey(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    };
    let row = key(vec![
        ("channel", KeyValue::S("sports".into())),
        ("connectionId", KeyValue::S("abc=".into())),
    ]);
    let cursors = vec![
        Cursor {
            segment: 0,
            position: Some(Position::Key(row.clone())),
        },
        Cursor {
            segment: 1,
            position: Some(Position::Offset(7)),
        },
        Cursor {
            segment: 2,
            position: Some(Position::After {
                after: "L0SM9cOFvHcCIhw=".into(),
            }),
        },
        Cursor {
            segment: 3,
            position: None,
        },
    ];
    let binary = job(r#"{"id":"b","data_base64":"AAEC/w==","channel":"sports"}"#);
    let deferred = vec![
        Connection::new("c1", Some(row)),
        Connection::new(
            "c2",
            Some(key(vec![
                ("shard", KeyValue::N("7".into())),
                ("blob", KeyValue::B(vec![0, 255])),
            ])),
        ),
        Connection::new("c3", None),
    ];
    let mut specs: Vec<JobSpec> = vec![
        binary.continuation(cursors.clone()),
        job(r#"{"id":"l","data":"x","connections":["a","b"],"exclude":["c"]}"#)
            .continuation(cursors.clone()),
        job(r#"{"id":"t","data":{"n":1},"to":{"user":"u-42"}}"#).continuation(cursors.clone()),
        job(r#"{"data":"x","channels":["a","b"]}"#).continuation(cursors),
        binary.for_one(&deferred[1]),
    ];
    specs.extend(job(r#"{"id":"s","data":"x","split":3}"#).split_into(3));
    let mut bodies: Vec<String> = specs
        .iter()
        .map(|s| serde_json::to_string(s).unwrap())
        .collect();
    // The deferred connections of a whole-table broadcast. (Those of a
    // channel broadcast are handed on with the channel beside `deferred`,
    // which the parser refuses as well as the schema.)
    bodies.extend(
        job(r#"{"id":"w","data_base64":"AAEC/w==","exclude":["z"]}"#)
            .deferred_continuations(&deferred, 200)
            .expect("each fits"),
    );
    assert!(
        bodies.len() > specs.len() + 1,
        "the deferred ones take several parts"
    );
    let verdicts = schema(&bodies);
    for (body, verdict) in bodies.iter().zip(&verdicts) {
        assert_eq!(verdict.job, None, "{body}");
        assert!(verdict.producer.is_some(), "hand-on fields in {body}");
        let again = broadcast(body).unwrap_or_else(|e| panic!("{body}: {e}"));
        assert!(!again.id.is_empty(), "{body}");
    }
}

/// The schema names exactly the fields `JobSpec` has: a field added to the
/// parser must be added to the schema, in its part.
#[test]
fn the_schema_has_every_field_of_the_parser_in_its_part() {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("docs/job.schema.json")).unwrap(),
    )
    .unwrap();
    let names = |part: &str| -> BTreeSet<String> {
        schema["$defs"][part]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("$defs/{part}/properties"))
            .keys()
            .cloned()
            .collect()
    };
    let producer = names("producerFields");
    let hand_on = names("handOnFields");
    assert!(producer.is_disjoint(&hand_on));
    let producer_job: BTreeSet<String> = schema["$defs"]["producerJob"]["propertyNames"]["enum"]
        .as_array()
        .expect("$defs/producerJob/propertyNames/enum")
        .iter()
        .map(|name| name.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        producer_job, producer,
        "producerJob takes the producer fields"
    );
    // Every field set, so serialisation skips none.
    let full = JobSpec {
        v: Some(1),
        id: Some("i".into()),
        data: Some("x".into()),
        data_base64: Some(String::new()),
        channel: Some("c".into()),
        channels: Some(vec!["c".into()]),
        to: Some([("user".to_owned(), job::AudienceKeys::One("u".to_owned()))].into()),
        connections: Some(vec!["a".into()]),
        exclude: vec!["b".into()],
        split: Some(2),
        segment: Some(job::Segment { index: 0, total: 2 }),
        resume: Some(Vec::new()),
        deferred: Some(Vec::new()),
        deferrals: 1,
        continuation: 1,
        part: 1,
        deliver_by: Some(1_796_581_800_000_i64.into()),
        cancel: Some("c".into()),
        latest: Some(job::LatestSpec {
            key: "k".into(),
            seq: 1,
        }),
        wrap: true,
    };
    let fields: BTreeSet<String> = serde_json::to_value(&full)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let documented: BTreeSet<String> = producer.union(&hand_on).cloned().collect();
    assert_eq!(fields, documented);
    let written_by_fanout = BTreeSet::from(
        [
            "segment",
            "resume",
            "deferred",
            "deferrals",
            "continuation",
            "part",
            "wrap",
        ]
        .map(String::from),
    );
    assert_eq!(
        hand_on, written_by_fanout,
        "the fields fanout writes on its hand-ons"
    );
}

/// What the schema cannot check, as docs/jobs.md lists it: each body here
/// passes the schema and is refused by the parser.
#[test]
fn what_the_schema_cannot_check_is_refused_by_the_parser() {
    let big = "a".repeat(job::MAX_PAYLOAD_BYTES + 1);
    let cases: Vec<(&str, String, Capabilities)> = vec![
        (
            "a payload over 131,072 bytes (text)",
            serde_json::json!({ "data": big }).to_string(),
            PRODUCER,
        ),
        (
            "a payload over 131,072 bytes (characters of several bytes)",
            serde_json::json!({ "data": "☀".repeat(job::MAX_PAYLOAD_BYTES / 3 + 1) }).to_string(),
            PRODUCER,
        ),
        (
            "a payload over 131,072 bytes (compact JSON)",
            serde_json::json!({ "data": { "text": "a".repeat(job::MAX_PAYLOAD_BYTES) } })
                .to_string(),
            PRODUCER,
        ),
        (
            "a payload over 131,072 bytes (base64)",
            serde_json::json!({ "data_base64": base64_of_len(job::MAX_PAYLOAD_BYTES + 1) })
                .to_string(),
            PRODUCER,
        ),
        (
            "split × payload over 16 MiB",
            serde_json::json!({ "data": "a".repeat(16 * 1024 + 1), "split": 1024 }).to_string(),
            PRODUCER,
        ),
        (
            "a channel of 2,048 characters but more bytes",
            serde_json::json!({ "data": "x", "channel": "é".repeat(1025) }).to_string(),
            PRODUCER,
        ),
        (
            "a `to` value of 2,048 characters but more bytes",
            serde_json::json!({ "data": "x", "to": { "user": "é".repeat(1025) } }).to_string(),
            PRODUCER,
        ),
        (
            "more than 100 channels once repeats are dropped",
            serde_json::json!({
                "data": "x",
                "channels": (0..101).map(|i| format!("c{i}")).collect::<Vec<_>>(),
            })
            .to_string(),
            PRODUCER,
        ),
        (
            "a segment whose index is not below its total",
            r#"{"data":"x","segment":{"index":5,"total":5}}"#.to_owned(),
            PRODUCER,
        ),
        (
            "an integer written with a fraction",
            r#"{"data":"x","split":2.0}"#.to_owned(),
            PRODUCER,
        ),
        (
            "a deliver_by on a day its month does not have",
            r#"{"v":2,"data":"x","deliver_by":"2026-02-30T12:00:00Z"}"#.to_owned(),
            PRODUCER,
        ),
        (
            "more than 100 keys in a `to` list once repeats are dropped",
            serde_json::json!({
                "v": 2,
                "data": "x",
                "to": { "user": (0..101).map(|i| format!("u-{i}")).collect::<Vec<_>>() },
            })
            .to_string(),
            PRODUCER,
        ),
        (
            "a `to` list key of 512 characters but more bytes",
            serde_json::json!({ "v": 2, "data": "x", "to": { "user": ["é".repeat(257)] } })
                .to_string(),
            PRODUCER,
        ),
        (
            "a cancel key over 2,000 bytes",
            serde_json::json!({ "v": 2, "cancel": "k".repeat(2001) }).to_string(),
            PRODUCER,
        ),
        (
            "a field named twice",
            r#"{"data":"x","data":"y"}"#.to_owned(),
            PRODUCER,
        ),
        (
            "a string with a lone surrogate escape",
            r#"{"data":"\ud800"}"#.to_owned(),
            PRODUCER,
        ),
        (
            "a channel where the deployment has no channel index",
            r#"{"data":"x","channel":"c"}"#.to_owned(),
            Capabilities {
                channels: false,
                audiences: None,
            },
        ),
        (
            "a named audience the deployment does not configure",
            r#"{"data":"x","to":{"team":"t"}}"#.to_owned(),
            Capabilities {
                channels: true,
                audiences: Some(vec!["user".into()]),
            },
        ),
    ];
    let bodies: Vec<String> = cases.iter().map(|(_, b, _)| b.clone()).collect();
    let verdicts = schema(&bodies);
    for ((what, body, caps), verdict) in cases.iter().zip(&verdicts) {
        assert_eq!(verdict.job, None, "{what}: the schema accepts it");
        let refused = job::read(body, "message-1", caps);
        assert!(refused.is_err(), "{what}: the parser refuses it");
    }
    // At the limits, the parser accepts what the schema does.
    let at_limit = [
        serde_json::json!({ "data": "a".repeat(job::MAX_PAYLOAD_BYTES) }),
        serde_json::json!({ "data_base64": base64_of_len(job::MAX_PAYLOAD_BYTES) }),
        serde_json::json!({ "data": "a".repeat(16 * 1024), "split": 1024 }),
        serde_json::json!({ "data": "x", "channel": "é".repeat(1024) }),
        serde_json::json!({
            "data": "x",
            "channels": (0..150).map(|i| format!("c{}", i % 100)).collect::<Vec<_>>(),
        }),
    ]
    .map(|v| v.to_string());
    let verdicts = schema(&at_limit);
    for (body, verdict) in at_limit.iter().zip(&verdicts) {
        assert_eq!(verdict.job, None);
        let start: String = body.chars().take(80).collect();
        assert!(parse(body).is_ok(), "{start}");
    }
}

/// Canonical base64 of `len` zero bytes.
fn base64_of_len(len: usize) -> String {
    let mut text = "A".repeat(len / 3 * 4);
    match len % 3 {
        1 => text.push_str("AA=="),
        2 => text.push_str("AAA="),
        _ => {}
    }
    text
}
