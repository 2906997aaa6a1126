use super::*;
use crate::connection::RowKey;

const CAPS: Capabilities = Capabilities {
    channels: true,
    audiences: None,
};

fn ok(body: &str) -> Job {
    parse(body, "msg-1", &CAPS).unwrap_or_else(|e| panic!("{body}: {e}"))
}

fn err(body: &str) -> JobError {
    parse(body, "msg-1", &CAPS).expect_err(body)
}

#[test]
fn a_connection_listed_twice_is_sent_to_once_in_first_listed_order() {
    let job = ok(r#"{"data":"x","connections":["b","a","b","c","a"]}"#);
    assert_eq!(
        job.target,
        Target::Connections(vec!["b".into(), "a".into(), "c".into()])
    );
}

#[test]
fn string_data_is_sent_as_its_text() {
    let job = ok(r#"{"data":"hello ☀"}"#);
    assert_eq!(job.payload, Bytes::from("hello ☀"));
    assert_eq!(job.target, Target::All);
    assert_eq!(job.id, "msg-1");
}

#[test]
fn other_json_is_sent_compact_in_its_key_order() {
    let job = ok(r#"{"id":"j", "data": { "z": [1, 2.5, true], "a": null }}"#);
    assert_eq!(job.payload, Bytes::from(r#"{"z":[1,2.5,true],"a":null}"#));
    assert_eq!(job.id, "j");
    assert_eq!(ok(r#"{"data": 42}"#).payload, Bytes::from("42"));
}

#[test]
fn base64_data_is_binary() {
    let job = ok(r#"{"data_base64":"AAEC/w=="}"#);
    assert_eq!(job.payload, Bytes::from_static(&[0, 1, 2, 255]));
    assert!(matches!(
        err(r#"{"data_base64":"***"}"#),
        JobError::BadBase64(_)
    ));
}

#[test]
fn audiences() {
    assert_eq!(
        ok(r#"{"data":"x","channel":"sports"}"#).target,
        Target::Channel("sports".into())
    );
    let job = ok(r#"{"data":"x","connections":["a","b"],"exclude":["b"]}"#);
    assert_eq!(
        job.target,
        Target::Connections(vec!["a".into(), "b".into()])
    );
    assert!(job.exclude.contains(&ConnectionId::from("b")));
    assert_eq!(
        err(r#"{"data":"x","channel":"c","connections":[]}"#),
        JobError::TwoAudiences {
            first: "channel",
            second: "connections"
        }
    );
    assert_eq!(
        err(r#"{"data":"x","channel":""}"#),
        JobError::EmptyValue { field: "channel" }
    );
    assert_eq!(
        err(r#"{"data":"x","exclude":[""]}"#),
        JobError::EmptyValue { field: "exclude" }
    );
}

fn with_users() -> Capabilities {
    Capabilities {
        channels: true,
        audiences: Some(vec!["user".into(), "tenant".into()]),
    }
}

#[test]
fn each_selector_alone_is_its_audience() {
    let caps = with_users();
    let target = |body: &str| parse(body, "m", &caps).map(|j| j.target);
    assert_eq!(target(r#"{"data":"x"}"#), Ok(Target::All));
    assert_eq!(
        target(r#"{"data":"x","channel":"a"}"#),
        Ok(Target::Channel("a".into()))
    );
    assert_eq!(
        target(r#"{"data":"x","channels":["a","b","a"]}"#),
        Ok(Target::Channels(vec!["a".into(), "b".into()])),
        "a channel named twice is one channel"
    );
    assert_eq!(
        target(r#"{"data":"x","channels":["a","a"]}"#),
        Ok(Target::Channel("a".into()))
    );
    assert_eq!(
        target(r#"{"data":"x","to":{"user":"u-42"}}"#),
        Ok(Target::Audience {
            name: "user".into(),
            values: vec!["u-42".into()]
        })
    );
    assert_eq!(
        target(r#"{"data":"x","connections":["c1"]}"#),
        Ok(Target::Connections(vec!["c1".into()]))
    );
    let job = parse(
        r#"{"data":"x","to":{"tenant":"t-1"},"exclude":["c9"]}"#,
        "m",
        &caps,
    )
    .unwrap();
    assert!(job.exclude.contains(&ConnectionId::from("c9")));
    assert_eq!(job.target.to_string(), "to tenant=t-1");
}

#[test]
fn each_pair_of_selectors_is_refused_naming_both() {
    let caps = with_users();
    let fields = [
        ("channel", r#""channel":"a""#),
        ("channels", r#""channels":["a","b"]"#),
        ("to", r#""to":{"user":"u"}"#),
        ("connections", r#""connections":["c"]"#),
    ];
    for (i, (first, a)) in fields.iter().enumerate() {
        for (second, b) in &fields[i + 1..] {
            let body = format!(r#"{{"data":"x",{a},{b}}}"#);
            let e = parse(&body, "m", &caps).expect_err(&body);
            assert_eq!(e, JobError::TwoAudiences { first, second }, "{body}");
            let text = e.to_string();
            assert!(text.contains(first) && text.contains(second), "{text}");
        }
    }
    // With `deferred`, which fanout sets alone, any selector is refused;
    // `to` goes with it only as format 2, carrying a broadcast's keys on
    // for their receipts.
    for (name, a) in fields {
        let body = format!(r#"{{"data":"x","deferred":[{{"id":"d"}}],{a}}}"#);
        let expected = match name {
            "to" => JobError::NeedsVersion {
                field: "to (beside deferred)",
                version: 2,
            },
            _ => JobError::DeferredAlone,
        };
        assert_eq!(parse(&body, "m", &caps), Err(expected), "{body}");
    }
    let carried = parse(
        r#"{"v":2,"data":"x","deferred":[{"id":"d","of":1}],"to":{"user":["u","w"]}}"#,
        "m",
        &caps,
    )
    .unwrap();
    assert!(matches!(carried.target, Target::Deferred(_)));
    let receipts = carried.receipts.unwrap();
    assert_eq!((receipts.keys.len(), receipts.of[&"d".into()]), (2, 1));
}

#[test]
fn a_list_of_keys_is_format_2_within_its_bounds_each_key_once() {
    let caps = with_users();
    let target = |body: &str| parse(body, "m", &caps).map(|j| j.target);
    assert_eq!(
        target(r#"{"v":2,"data":"x","to":{"user":["u-1","u-2","u-1"]}}"#),
        Ok(Target::Audience {
            name: "user".into(),
            values: vec!["u-1".into(), "u-2".into()]
        })
    );
    assert!(matches!(
        target(r#"{"data":"x","to":{"user":["u-1"]}}"#),
        Err(JobError::NeedsVersion { version: 2, .. })
    ));
    assert_eq!(
        target(r#"{"v":2,"data":"x","to":{"user":[]}}"#),
        Err(JobError::EmptyList { field: "to" })
    );
    let keys: Vec<String> = (0..101).map(|i| format!("u-{i}")).collect();
    let body = serde_json::json!({"v": 2, "data": "x", "to": {"user": keys}}).to_string();
    assert_eq!(target(&body), Err(JobError::TooManyKeys { count: 101 }));
    let long = "k".repeat(513);
    let body = serde_json::json!({"v": 2, "data": "x", "to": {"user": [long]}}).to_string();
    assert!(matches!(
        target(&body),
        Err(JobError::KeyTooLong {
            field: "to",
            limit: 512,
            ..
        })
    ));
    let e = parse(r#"{"v":2,"data":"x","to":{"user":[7]}}"#, "m", &caps).unwrap_err();
    assert!(e.to_string().contains("a list of keys"), "{e}");
    // A continuation keeps the list, and format 2 with it.
    let job = parse(r#"{"v":2,"data":"x","to":{"user":["a","b"]}}"#, "m", &caps).unwrap();
    let next = job.continuation(Vec::new());
    assert_eq!(next.v, Some(2));
    assert_eq!(
        serde_json::to_value(&next.to).unwrap(),
        serde_json::json!({"user": ["a", "b"]})
    );
}

#[test]
fn to_names_one_configured_audience() {
    let caps = with_users();
    let e = parse(r#"{"data":"x","to":{"team":"t"}}"#, "m", &caps).unwrap_err();
    assert_eq!(
        e,
        JobError::UnknownAudience {
            name: "team".into(),
            known: "user, tenant".into()
        }
    );
    assert!(
        e.to_string()
            .contains(&crate::limits::setting::Setting::AudienceIndexes.to_string()),
        "{e}"
    );
    assert_eq!(
        parse(r#"{"data":"x","to":{}}"#, "m", &caps),
        Err(JobError::ToNeedsOne { count: 0 })
    );
    assert_eq!(
        parse(r#"{"data":"x","to":{"user":"a","tenant":"b"}}"#, "m", &caps),
        Err(JobError::ToNeedsOne { count: 2 })
    );
    assert_eq!(
        parse(r#"{"data":"x","to":{"user":""}}"#, "m", &caps),
        Err(JobError::EmptyValue { field: "to" })
    );
    // Nothing configured: every name is unknown.
    let none = Capabilities {
        channels: true,
        audiences: Some(Vec::new()),
    };
    assert!(matches!(
        parse(r#"{"data":"x","to":{"user":"u"}}"#, "m", &none),
        Err(JobError::UnknownAudience { known, .. }) if known == "none"
    ));
    // A producer's check takes any name.
    assert!(parse(r#"{"data":"x","to":{"team":"t"}}"#, "m", &CAPS).is_ok());
}

#[test]
fn channel_lists_must_hold_channels() {
    assert_eq!(
        err(r#"{"data":"x","channels":[]}"#),
        JobError::EmptyList { field: "channels" }
    );
    assert_eq!(
        err(r#"{"data":"x","channels":["a",""]}"#),
        JobError::EmptyValue { field: "channels" }
    );
    let caps = Capabilities {
        channels: false,
        audiences: None,
    };
    assert_eq!(
        parse(r#"{"data":"x","channels":["a","b"]}"#, "m", &caps),
        Err(JobError::ChannelsUnsupported)
    );
    for body in [
        r#"{"data":"x","split":2,"channels":["a","b"]}"#,
        r#"{"data":"x","segment":{"index":0,"total":2},"to":{"user":"u"}}"#,
    ] {
        assert_eq!(err(body), JobError::SplitNeedsTable, "{body}");
    }
}

#[test]
fn channels_need_an_index() {
    let caps = Capabilities {
        channels: false,
        audiences: None,
    };
    assert_eq!(
        parse(r#"{"data":"x","channel":"c"}"#, "m", &caps),
        Err(JobError::ChannelsUnsupported)
    );
    assert!(parse(r#"{"data":"x"}"#, "m", &caps).is_ok());
}

#[test]
fn data_must_be_there_once() {
    assert_eq!(err(r#"{"channel":"c"}"#), JobError::NoData);
    assert_eq!(
        err(r#"{"data":"x","data_base64":"AA=="}"#),
        JobError::BothData
    );
    assert_eq!(err(r#"{"data":null}"#), JobError::NullData);
}

#[test]
fn malformed_bodies_name_the_field() {
    let e = err(r#"{"data":"x","chanel":"c"}"#).to_string();
    assert!(e.contains("chanel"), "{e}");
    let e = err(r#"{"data":"x","exclude":[1]}"#).to_string();
    assert!(e.contains("exclude[0]"), "{e}");
    let e = err("not json").to_string();
    assert!(e.contains("not a valid job"), "{e}");
    let e = err(r#"{"data":"x"} trailing"#).to_string();
    assert!(e.contains("trailing"), "{e}");
    assert!(matches!(err("[1,2]"), JobError::Malformed { .. }));
}

#[test]
fn the_payload_limit_is_api_gateways() {
    let at_limit = format!(r#"{{"data":"{}"}}"#, "a".repeat(MAX_PAYLOAD_BYTES));
    assert_eq!(ok(&at_limit).payload.len(), MAX_PAYLOAD_BYTES);
    let over = format!(r#"{{"data":"{}"}}"#, "a".repeat(MAX_PAYLOAD_BYTES + 1));
    assert_eq!(
        err(&over),
        JobError::TooLarge {
            size: MAX_PAYLOAD_BYTES + 1
        }
    );
}

#[test]
fn sns_notifications_are_unwrapped() {
    let inner = r#"{"data":"via sns","channel":"c"}"#;
    let envelope = serde_json::json!({
        "Type": "Notification",
        "MessageId": "sns-1",
        "TopicArn": "arn:aws:sns:us-east-1:000000000000:t",
        "Message": inner,
    })
    .to_string();
    let job = ok(&envelope);
    assert_eq!(job.id, "sns-1", "SNS's id is the broadcast key");
    assert_eq!(job.payload, Bytes::from("via sns"));
    assert_eq!(job.target, Target::Channel("c".into()));
    // A malformed inner job is reported as such.
    let bad = serde_json::json!({"Type": "Notification", "Message": "{}"}).to_string();
    assert_eq!(err(&bad), JobError::NoData);
}

#[test]
fn a_continuation_is_the_same_job_from_its_cursors() {
    use crate::store::Position;
    let resume = vec![Cursor {
        segment: 0,
        position: Some(Position::Offset(1000)),
    }];
    for body in [
        r#"{"id":"j","data":{"k":[1,2]},"channel":"c","exclude":["b","a"]}"#,
        r#"{"data_base64":"AAEC/w==","connections":["x","y"]}"#,
        r#"{"data":"x","channels":["b","a"],"exclude":["z"]}"#,
        r#"{"data":"x","to":{"user":"u-42"}}"#,
    ] {
        let job = ok(body);
        let next = serde_json::to_string(&job.continuation(resume.clone())).unwrap();
        let resumed = parse(&next, "msg-2", &CAPS).expect("a continuation parses");
        assert_eq!(resumed.payload, job.payload);
        assert_eq!(resumed.target, job.target);
        assert_eq!(resumed.exclude, job.exclude);
        assert_eq!(resumed.id, job.id, "the id carries over");
        assert_eq!(resumed.resume, Some(resume.clone()));
    }
}

#[test]
fn a_split_broadcast_becomes_one_job_per_segment() {
    let job = ok(r#"{"id":"big","data":"x","split":3,"exclude":["a"]}"#);
    assert_eq!(job.split, Some(3));
    let parts = job.split_into(3);
    assert_eq!(parts.len(), 3);
    for (n, part) in parts.iter().enumerate() {
        let body = serde_json::to_string(part).unwrap();
        let share = parse(&body, "m", &CAPS).expect("a share parses");
        assert_eq!(share.id, "big", "the broadcast key carries over");
        assert_eq!(
            share.segment,
            Some(Segment {
                index: n as u32,
                total: 3
            })
        );
        assert_eq!(share.split, None);
        assert_eq!(share.payload, job.payload);
        assert_eq!(share.exclude, job.exclude);
    }
}

#[test]
fn split_limits() {
    assert_eq!(err(r#"{"data":"x","split":0}"#), JobError::BadSplit);
    assert_eq!(err(r#"{"data":"x","split":5000}"#), JobError::BadSplit);
    assert_eq!(
        err(r#"{"data":"x","split":2,"channel":"c"}"#),
        JobError::SplitNeedsTable
    );
    assert_eq!(
        err(r#"{"data":"x","segment":{"index":2,"total":2}}"#),
        JobError::BadSegment
    );
    assert_eq!(
        err(r#"{"data":"x","segment":{"index":0,"total":2},"connections":["a"]}"#),
        JobError::SplitNeedsTable
    );
    // A share is not split again.
    let share = ok(r#"{"data":"x","split":4,"segment":{"index":0,"total":2}}"#);
    assert_eq!(share.split, None);
}

/// Each limit refuses the job with a reason naming the field, the limit
/// and the value; the value at the limit passes.
#[test]
fn jobs_past_the_limits_are_refused_naming_field_limit_and_value() {
    let channels = |n: usize| {
        let names: Vec<String> = (0..n).map(|i| format!("\"c{i}\"")).collect();
        names.join(",")
    };
    let id_at_limit = "a".repeat(1024);
    let long_id = "a".repeat(1025);
    let key_at_limit = "k".repeat(2048);
    let long_key = "k".repeat(2049);
    let payload = |bytes: usize| "p".repeat(bytes);
    let long = |field, len| JobError::KeyTooLong {
        field,
        value: format!("{}…", "k".repeat(64)),
        len,
        limit: 2048,
    };
    let bad_id = |field, id: &str, problem| JobError::BadConnectionId {
        field,
        id: id.to_owned(),
        problem,
    };
    type Case = (String, Option<JobError>, &'static [&'static str]);
    let passes = |body: String| -> Case { (body, None, &[]) };
    let id_too_long = |field: &'static str, named: &'static [&'static str]| -> Case {
        (
            format!(r#"{{"data":"x","{field}":["{long_id}"]}}"#),
            Some(bad_id(
                field,
                &format!("{}…", "a".repeat(64)),
                BadId::TooLong { len: 1025 },
            )),
            named,
        )
    };
    let cases: Vec<Case> = vec![
        (
            format!(r#"{{"data":"x","channels":[{}]}}"#, channels(101)),
            Some(JobError::TooManyChannels { count: 101 }),
            &["`channels`", "101", "100"],
        ),
        // A channel named twice counts once.
        passes(format!(
            r#"{{"data":"x","channels":[{},"c0"]}}"#,
            channels(100)
        )),
        (
            format!(r#"{{"data":"{}","split":1024}}"#, payload(16 * 1024 + 1)),
            Some(JobError::SplitTooLarge {
                split: 1024,
                payload: 16 * 1024 + 1,
            }),
            &["`split`", "1024", "16385", "16778240", "16777216"],
        ),
        passes(format!(
            r#"{{"data":"{}","split":1024}}"#,
            payload(16 * 1024)
        )),
        passes(format!(
            r#"{{"data":"{}","split":128}}"#,
            payload(128 * 1024)
        )),
        id_too_long("connections", &["`connections`", "1025", "1024"]),
        passes(format!(r#"{{"data":"x","connections":["{id_at_limit}"]}}"#)),
        id_too_long("exclude", &["`exclude`", "1025", "1024"]),
        (
            format!(r#"{{"data":"x","channel":"{long_key}"}}"#),
            Some(long("channel", 2049)),
            &["`channel`", "2049", "2048"],
        ),
        passes(format!(r#"{{"data":"x","channel":"{key_at_limit}"}}"#)),
        (
            format!(r#"{{"data":"x","channels":["a","{long_key}"]}}"#),
            Some(long("channels", 2049)),
            &["`channels`", "2049", "2048"],
        ),
        (
            format!(r#"{{"data":"x","to":{{"user":"{long_key}"}}}}"#),
            Some(long("to", 2049)),
            &["`to`", "2049", "2048"],
        ),
        (
            r#"{"data":"x","connections":["ok=","..","b"]}"#.to_owned(),
            Some(bad_id(
                "connections",
                "..",
                BadId::OutsideAlphabet { found: '.' },
            )),
            &["`connections`", "\"..\"", "'.'"],
        ),
        (
            r#"{"data":"x","connections":["a b"]}"#.to_owned(),
            Some(bad_id(
                "connections",
                "a b",
                BadId::OutsideAlphabet { found: ' ' },
            )),
            &["`connections`", "\"a b\""],
        ),
        (
            r#"{"data":"x","exclude":["a%2F"]}"#.to_owned(),
            Some(bad_id(
                "exclude",
                "a%2F",
                BadId::OutsideAlphabet { found: '%' },
            )),
            &["`exclude`", "a%2F", "'%'"],
        ),
        passes(r#"{"data":"x","connections":["L0SM9cOFvHcCIhw=","ab+c/d=="]}"#.to_owned()),
    ];
    for (body, expected, named) in cases {
        let shown: String = body.chars().take(60).collect();
        match (parse(&body, "m", &CAPS), expected) {
            (Ok(_), None) => {}
            (Err(e), Some(expected)) => {
                assert_eq!(e, expected, "{shown}");
                let text = e.to_string();
                for part in named {
                    assert!(text.contains(part), "{shown}: {part} not in {text}");
                }
                assert!(text.len() < 400, "{shown}: a long reason: {text}");
            }
            (got, expected) => panic!("{shown}: got {got:?}, expected {expected:?}"),
        }
    }
}

fn keyed(id: &str) -> Connection {
    Connection {
        id: id.into(),
        key: Some(RowKey(vec![(
            "connectionId".into(),
            crate::connection::KeyValue::S(id.into()),
        )])),
        started_ms: None,
    }
}

#[test]
fn deferred_connections_continue_with_their_keys_split_to_fit() {
    let job = ok(r#"{"id":"j","data":"hello","exclude":["z"]}"#);
    let deferred: Vec<Connection> = (0..500).map(|n| keyed(&format!("conn-{n:04}"))).collect();
    let bodies = job.deferred_continuations(&deferred, 8_000).unwrap();
    assert!(bodies.len() > 1, "split to fit");
    let mut listed = Vec::new();
    for body in &bodies {
        assert!(body.len() <= 8_000, "{}", body.len());
        let next = parse(body, "m", &CAPS).expect("a continuation parses");
        assert_eq!(next.id, "j");
        assert_eq!(next.payload, job.payload);
        assert_eq!(next.exclude, job.exclude);
        assert_eq!(next.deferrals, 1);
        let Target::Deferred(connections) = next.target else {
            panic!("{:?}", next.target)
        };
        listed.extend(connections);
    }
    assert_eq!(listed, deferred, "exactly them, keys and order kept");
    // Once more: the count goes on.
    let again = parse(&bodies[0], "m", &CAPS).unwrap();
    let next = again.deferred_continuations(&deferred[..1], 8_000).unwrap();
    assert_eq!(parse(&next[0], "m", &CAPS).unwrap().deferrals, 2);
    // An entry that cannot fit alone is an error, not a drop.
    let err = job.deferred_continuations(&deferred, 60).unwrap_err();
    assert_eq!(err.id, "conn-0000");
}

#[test]
fn deferred_connections_of_a_selected_audience_continue_as_a_job_that_parses() {
    let caps = Capabilities {
        channels: true,
        audiences: Some(vec!["user".into()]),
    };
    let deferred = vec![keyed("conn-1"), keyed("conn-2")];
    for selector in [
        r#""channel":"sports""#,
        r#""channels":["a","b"]"#,
        r#""to":{"user":"u-1"}"#,
        r#""connections":["conn-1","conn-2","conn-3"]"#,
    ] {
        let job = parse(
            &format!(r#"{{"id":"j","data":"x",{selector}}}"#),
            "m",
            &caps,
        )
        .unwrap();
        let bodies = job.deferred_continuations(&deferred, 8_000).unwrap();
        let next = parse(&bodies[0], "m", &caps).unwrap_or_else(|e| {
            panic!("{selector}: the continuation {} is refused: {e}", bodies[0])
        });
        assert_eq!(
            next.target,
            Target::Deferred(deferred.clone()),
            "{selector}"
        );
    }
}

#[test]
fn deferred_lists_come_alone() {
    assert_eq!(
        err(r#"{"data":"x","deferred":[{"id":"a"}],"channel":"c"}"#),
        JobError::DeferredAlone
    );
    assert_eq!(
        err(r#"{"data":"x","deferred":[{"id":""}]}"#),
        JobError::EmptyValue { field: "deferred" }
    );
    let one = ok(r#"{"data":"x","deferred":[{"id":"a"}],"deferrals":5}"#);
    let alone = one.for_one(&keyed("a"));
    let body = serde_json::to_string(&alone).unwrap();
    let back = parse(&body, "m", &CAPS).unwrap();
    assert_eq!(back.target, Target::Deferred(vec![keyed("a")]));
    assert_eq!(back.deferrals, 5);
}

#[test]
fn a_spec_round_trips_through_json() {
    let spec = JobSpec {
        id: Some("j".into()),
        data: Some(serde_json::json!({"k": 1})),
        channel: Some("c".into()),
        exclude: vec!["x".into()],
        ..JobSpec::default()
    };
    let body = serde_json::to_string(&spec).unwrap();
    let job = ok(&body);
    assert_eq!(job.id, "j");
    assert_eq!(job.payload, Bytes::from(r#"{"k":1}"#));
}

#[test]
fn a_job_for_a_newer_format_is_left_to_a_newer_task_even_with_fields_unknown_here() {
    let newer = parse(
        r#"{"v":3,"data":"x","latest":{"key":"score","seq":17}}"#,
        "m",
        &CAPS,
    )
    .unwrap_err();
    assert_eq!(newer, JobError::NewerFormat { version: 3 });
    assert!(newer.is_for_a_newer_task());
    // Without a newer version, an unknown field is a mistake.
    let typo = parse(r#"{"data":"x","chanel":"c"}"#, "m", &CAPS).unwrap_err();
    assert!(!typo.is_for_a_newer_task());
    assert!(matches!(typo, JobError::Malformed { .. }));
    // The current version reads as before, and hand-ons carry none.
    let job = parse(r#"{"v":1,"id":"j","data":"x"}"#, "m", &CAPS).unwrap();
    assert_eq!(job.continuation(Vec::new()).v, None);
}

#[test]
fn an_empty_id_is_refused_it_would_make_every_such_job_one_broadcast() {
    assert_eq!(
        err(r#"{"id":"","data":"x"}"#),
        JobError::EmptyValue { field: "id" }
    );
    assert_eq!(ok(r#"{"data":"x"}"#).id, "msg-1", "no id: the message id");
}

#[test]
fn the_fields_of_version_2_need_v_2_so_an_older_task_hands_them_back() {
    for body in [
        r#"{"data":"x","deliver_by":"2026-12-06T18:30:00Z"}"#,
        r#"{"v":1,"data":"x","deliver_by":1796581800000}"#,
        r#"{"cancel":"news-42"}"#,
    ] {
        let e = err(body);
        assert!(
            matches!(e, JobError::NeedsVersion { version: 2, .. }),
            "{body}: {e}"
        );
        assert!(e.to_string().contains(r#"add "v": 2"#), "{e}");
    }
    let job = ok(r#"{"v":2,"data":"x","deliver_by":"2026-12-06T19:30:00+01:00"}"#);
    assert_eq!(job.deliver_by, Some(1_796_581_800_000));
    assert_eq!(job.continuation(Vec::new()).v, Some(2));
}

#[test]
fn a_cancel_names_one_broadcast_key_and_nothing_else() {
    let read = |body: &str| read(body, "m", &CAPS);
    assert_eq!(
        read(r#"{"v":2,"cancel":"news-42"}"#),
        Ok(Order::Cancel {
            broadcast: "news-42".into()
        })
    );
    for body in [
        r#"{"v":2,"cancel":"news-42","data":"x"}"#,
        r#"{"v":2,"cancel":"news-42","id":"c-1"}"#,
        r#"{"v":2,"cancel":"news-42","channel":"c"}"#,
    ] {
        assert_eq!(read(body), Err(JobError::CancelAlone), "{body}");
    }
    assert_eq!(
        read(r#"{"v":2,"cancel":""}"#),
        Err(JobError::EmptyValue { field: "cancel" })
    );
    let long = format!(r#"{{"v":2,"cancel":"{}"}}"#, "k".repeat(3000));
    assert!(matches!(
        read(&long),
        Err(JobError::KeyTooLong {
            field: "cancel",
            ..
        })
    ));
    // A caller that wants a broadcast is told it is none.
    assert_eq!(
        err(r#"{"v":2,"cancel":"news-42"}"#),
        JobError::NotABroadcast
    );
}

#[test]
fn a_deadline_that_is_no_instant_is_refused_at_parse() {
    let e = err(r#"{"v":2,"data":"x","deliver_by":1796574600}"#);
    assert!(e.to_string().contains("not seconds"), "{e}");
    let e = err(r#"{"v":2,"data":"x","deliver_by":"next tuesday"}"#);
    assert!(matches!(e, JobError::BadDeadline { .. }), "{e}");
}

#[test]
fn latest_names_a_stream_with_a_sequence_on_one_query_and_needs_v_2() {
    let ok = ok(r#"{"v":2,"data":"x","channel":"c","latest":{"key":"k","seq":7}}"#);
    assert_eq!(
        ok.latest,
        Some(Latest {
            key: "k".into(),
            seq: 7
        })
    );
    assert_eq!(ok.continuation(Vec::new()).v, Some(2), "its hand-ons too");
    let e = err(r#"{"v":2,"data":"x","channel":"c","latest":{"key":"k"}}"#);
    assert!(e.to_string().contains("missing field `seq`"), "{e}");
    assert!(e.to_string().contains("latest"), "{e}");
    assert_eq!(
        err(r#"{"v":2,"data":"x","channel":"c","latest":{"key":"","seq":1}}"#),
        JobError::EmptyValue {
            field: "latest.key"
        }
    );
    assert!(matches!(
        err(r#"{"data":"x","channel":"c","latest":{"key":"k","seq":1}}"#),
        JobError::NeedsVersion {
            field: "latest",
            ..
        }
    ));
    for audience in [
        r#""channels":["a","b"]"#,
        r#""connections":["c1"]"#,
        r#""to":{"user":["u-1","u-2"]}"#,
        r#""split":1"#,
    ] {
        let body = format!(r#"{{"v":2,"data":"x",{audience},"latest":{{"key":"k","seq":1}}}}"#);
        let e = err(&body);
        assert!(
            matches!(e, JobError::LatestNeedsOneQuery { .. }),
            "{body}: {e}"
        );
    }
    assert_eq!(
        err(r#"{"v":2,"data":"x","split":4,"latest":{"key":"k","seq":1}}"#),
        JobError::LatestSplit
    );
}
