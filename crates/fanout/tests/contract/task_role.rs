//! The template's task role against the code: every AWS operation `fanout
//! run` can call, found in the adapters' sources, must be granted by the
//! task role of `config/cloudformation.yaml` on the resource the call acts
//! on, and the role must grant no wildcard.
//!
//! The operations are read from the sources, not listed by hand: a new SDK
//! call in an adapter, or a new file calling an SDK client, fails this test
//! until the operation is mapped to its IAM action and resource here and
//! granted in the template. No local emulator enforces IAM on these
//! resources (moto checks SQS queue ARNs, but DynamoDB only by action, and
//! not execute-api or ECS at all), so the check is static.
//!
//! `fanout redrive` (receives from and deletes in the dead-letter queue) and
//! `fanout enqueue` (a producer's tool) are run by operators and producers
//! with their own credentials; the task role is for the worker alone.
//!
//! Needs Python 3 with PyYAML (the emulators' venv has it) to read the
//! template's short-form intrinsic functions.

use std::collections::BTreeSet;
use std::process::Command;

use std::path::PathBuf;

use serde_json::Value;

use crate::sources::{production_source, root, rust_files};

/// What a call acts on, as the template names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Resource {
    JobsQueue,
    DeadLetterQueue,
    Table,
    TableIndexes,
    FleetTable,
    ConnectionsPost,
    ClusterTasks,
    /// The optional report destinations: granted only when given.
    ReportQueue,
    ReportTopic,
}

/// What an adapter's SDK client calls: its service and, where one service
/// serves several of the template's resources (two DynamoDB tables), which.
#[derive(Clone, Copy, Debug)]
enum Peer {
    Sqs,
    ConnectionsTable,
    FleetTable,
    /// The checkpoint table: the template's is the fleet table.
    CheckpointTable,
    ApiGateway,
    /// The report destinations: an SQS queue and an SNS topic.
    Reports,
}

/// The files (or folders, ending in `/`) that call an SDK client, and what
/// that client calls.
const ADAPTERS: &[(&str, Peer)] = &[
    ("crates/aws/src/sqs.rs", Peer::Sqs),
    ("crates/aws/src/dynamo/", Peer::ConnectionsTable),
    ("crates/aws/src/clock.rs", Peer::ConnectionsTable),
    ("crates/aws/src/fleet.rs", Peer::FleetTable),
    // The key check of the fleet and checkpoint tables, which the template
    // makes one table: its grants are the fleet table's.
    ("crates/aws/src/pk_sk.rs", Peer::FleetTable),
    ("crates/aws/src/runs.rs", Peer::CheckpointTable),
    ("crates/aws/src/runs/", Peer::CheckpointTable),
    ("crates/aws/src/apigw.rs", Peer::ApiGateway),
    ("crates/aws/src/reports.rs", Peer::Reports),
];

/// Files that name SDK types without calling AWS for the worker: client
/// construction, and the classification of DynamoDB's errors.
const NOT_ADAPTERS: &[&str] = &[
    "crates/aws/src/clients.rs",
    "crates/aws/src/dynamo_errors.rs",
];

/// The sources of the crates the `fanout` binary is built from (the
/// development tools in `crates/dev` are a separate binary).
const BINARY_SOURCES: &[&str] = &["crates/core/src", "crates/aws/src", "crates/fanout/src"];

/// An SDK operation of the worker: the IAM action that authorises it and
/// the resources it is called on. `None`: not mapped yet.
fn grant_for(peer: Peer, operation: &str) -> Option<(&'static str, &'static [Resource])> {
    use Peer::{ApiGateway, ConnectionsTable, Sqs};
    use Resource::*;
    Some(match (peer, operation) {
        (Sqs, "receive_message") => ("sqs:ReceiveMessage", &[JobsQueue]),
        (Sqs, "change_message_visibility" | "change_message_visibility_batch") => {
            ("sqs:ChangeMessageVisibility", &[JobsQueue])
        }
        // The batch is authorised by the single-message action.
        (Sqs, "delete_message" | "delete_message_batch") => ("sqs:DeleteMessage", &[JobsQueue]),
        (Sqs, "get_queue_attributes") => ("sqs:GetQueueAttributes", &[JobsQueue]),
        // Continuations and split segments go to the jobs queue, bad jobs to
        // the dead-letter queue.
        (Sqs, "send_message" | "send_message_batch") => {
            ("sqs:SendMessage", &[JobsQueue, DeadLetterQueue])
        }
        (ConnectionsTable, "describe_table") => ("dynamodb:DescribeTable", &[Table]),
        (ConnectionsTable, "scan") => ("dynamodb:Scan", &[Table]),
        // The connections table is queried on its channel and audience
        // indexes, and on itself when it is keyed channel + connection id.
        (ConnectionsTable, "query") => ("dynamodb:Query", &[Table, TableIndexes]),
        (ConnectionsTable, "batch_write_item") => ("dynamodb:BatchWriteItem", &[Table]),
        // Rows certainly gone by age, each deleted on a condition.
        (ConnectionsTable, "delete_item") => ("dynamodb:DeleteItem", &[Table]),
        // The fleet table is queried on its own key (every lease under one
        // partition).
        (Peer::FleetTable, "describe_table") => ("dynamodb:DescribeTable", &[FleetTable]),
        (Peer::FleetTable, "query") => ("dynamodb:Query", &[FleetTable]),
        (Peer::FleetTable, "put_item") => ("dynamodb:PutItem", &[FleetTable]),
        (Peer::FleetTable, "delete_item") => ("dynamodb:DeleteItem", &[FleetTable]),
        (Peer::CheckpointTable, "describe_table") => ("dynamodb:DescribeTable", &[FleetTable]),
        // A broadcast's pieces are added up in one record.
        (Peer::CheckpointTable, "update_item") => ("dynamodb:UpdateItem", &[FleetTable]),
        (Peer::CheckpointTable, "get_item") => ("dynamodb:GetItem", &[FleetTable]),
        (Peer::CheckpointTable, "put_item") => ("dynamodb:PutItem", &[FleetTable]),
        (ApiGateway, "post_to_connection") => ("execute-api:ManageConnections", &[ConnectionsPost]),
        (Peer::Reports, "send_message") => ("sqs:SendMessage", &[ReportQueue]),
        (Peer::Reports, "publish") => ("sns:Publish", &[ReportTopic]),
        _ => return None,
    })
}

/// The `x` of every `client.x()` / `client\n.x()` in `source`.
fn client_calls(source: &str) -> BTreeSet<String> {
    let mut calls = BTreeSet::new();
    let mut rest = source;
    while let Some(at) = rest.find("client") {
        rest = &rest[at + "client".len()..];
        let after = rest.trim_start();
        let Some(after) = after.strip_prefix('.') else {
            continue;
        };
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if !name.is_empty() && after[name.len()..].starts_with("()") {
            calls.insert(name);
        }
    }
    calls
}

/// Every (IAM action, resource) the worker needs, from the sources.
fn required() -> BTreeSet<(String, Resource)> {
    let mut files = Vec::new();
    for dir in BINARY_SOURCES {
        rust_files(&root().join(dir), &mut files);
    }
    let mut required = BTreeSet::new();
    let mut unmapped = Vec::new();
    let mut adapters_calling = BTreeSet::new();
    for file in &files {
        let relative = file.strip_prefix(root()).unwrap().to_str().unwrap();
        let source = production_source(file);
        let adapter = ADAPTERS.iter().find(|(path, _)| {
            *path == relative || (path.ends_with('/') && relative.starts_with(path))
        });
        let Some(adapter @ (_, peer)) = adapter else {
            let exempt = NOT_ADAPTERS.iter().any(|p| relative.starts_with(p));
            // An exempt file that started to call AWS would go unchecked.
            assert!(
                !exempt || !source.contains("aws_sdk_") || client_calls(&source).is_empty(),
                "{relative} calls AWS: move it from NOT_ADAPTERS to ADAPTERS"
            );
            assert!(
                exempt || !source.contains("aws_sdk_"),
                "{relative} uses an AWS SDK client: add it to ADAPTERS (and its calls to grant_for)"
            );
            continue;
        };
        let calls = client_calls(&source);
        assert!(
            !calls.is_empty() || adapter.0.ends_with('/'),
            "no SDK call found in {relative}"
        );
        if !calls.is_empty() {
            adapters_calling.insert(adapter.0);
        }
        for call in calls {
            match grant_for(*peer, &call) {
                Some((action, resources)) => {
                    for resource in resources {
                        required.insert((action.to_owned(), *resource));
                    }
                }
                None => unmapped.push(format!("{peer:?} {call} ({relative})")),
            }
        }
    }
    for (path, _) in ADAPTERS {
        assert!(
            adapters_calling.contains(path),
            "no SDK call found in {path}"
        );
    }
    assert!(
        unmapped.is_empty(),
        "SDK calls with no IAM mapping: {unmapped:?}; map them in grant_for and grant them in the template's task role"
    );
    // The lean send path POSTs to @connections itself, and scale-in
    // protection goes through the ECS agent, which acts with the task role.
    let lean = std::fs::read_to_string(root().join("crates/aws/src/lean.rs")).unwrap();
    if lean.contains("@connections") {
        required.insert((
            "execute-api:ManageConnections".into(),
            Resource::ConnectionsPost,
        ));
    }
    let ecs = std::fs::read_to_string(root().join("crates/fanout/src/ecs.rs")).unwrap();
    if ecs.contains("task-protection/v1/state") {
        required.insert(("ecs:UpdateTaskProtection".into(), Resource::ClusterTasks));
    }
    required
}

/// The template as JSON, short-form tags kept as `{"!Tag": value}`.
fn template() -> Value {
    let venv = root().join(".local/venv/bin/python");
    let python = if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    };
    let script = r#"
import json, sys, yaml
class Loader(yaml.SafeLoader): pass
def tagged(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode): value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode): value = loader.construct_sequence(node, deep=True)
    else: value = loader.construct_mapping(node, deep=True)
    return {"!" + suffix: value}
Loader.add_multi_constructor("!", tagged)
print(json.dumps(yaml.load(open(sys.argv[1]), Loader=Loader)))
"#;
    let output = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(root().join("config/cloudformation.yaml"))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}; it needs PyYAML", python.display()));
    assert!(
        output.status.success(),
        "reading the template: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The template resource a policy's `Resource` entry names.
fn resource_of(value: &Value) -> Resource {
    if let Some(reference) = value.get("!Ref").and_then(Value::as_str) {
        return match reference {
            "ReportQueueArn" => Resource::ReportQueue,
            "ReportTopicArn" => Resource::ReportTopic,
            other => panic!("an unexpected resource {other}"),
        };
    }
    if let Some(att) = value.get("!GetAtt").and_then(Value::as_str) {
        return match att {
            "JobsQueue.Arn" => Resource::JobsQueue,
            "DeadLetterQueue.Arn" => Resource::DeadLetterQueue,
            "FleetTable.Arn" => Resource::FleetTable,
            other => panic!("an unexpected resource {other}"),
        };
    }
    let sub = value.get("!Sub").expect("a resource is !GetAtt or !Sub");
    let text = sub
        .as_str()
        .or_else(|| sub.get(0).and_then(Value::as_str))
        .unwrap();
    assert!(!text.contains('*') || text.ends_with("/*"), "{text}");
    if text.ends_with(":table/${Table}") {
        Resource::Table
    } else if text.ends_with(":table/${Table}/index/*") {
        Resource::TableIndexes
    } else if text.ends_with(":${Api}/${WebSocketStage}/POST/@connections/*") {
        // The given API, or the stack's own (CreateWebSocketApi).
        let api = &sub[1]["Api"];
        assert_eq!(
            api,
            &serde_json::json!({"!If": ["CreateWebSocket", {"!Ref": "WebSocketApi"}, {"!Ref": "WebSocketApiId"}]}),
            "{text}"
        );
        Resource::ConnectionsPost
    } else if text.ends_with(":task/${Cluster}/*") {
        Resource::ClusterTasks
    } else {
        panic!("an unexpected resource {text}")
    }
}

fn one_or_many(value: &Value) -> Vec<&Value> {
    match value {
        Value::Array(items) => items.iter().collect(),
        one => vec![one],
    }
}

/// A statement granted under a condition (`!If [Cond, statement,
/// !Ref AWS::NoValue]`) as the statement and its condition; a plain one as
/// itself.
fn conditional(statement: &Value) -> (Option<&str>, &Value) {
    let Some(branches) = statement.get("!If").and_then(Value::as_array) else {
        return (None, statement);
    };
    let [condition, granted, otherwise] = &branches[..] else {
        panic!("an !If needs three parts: {statement}")
    };
    assert_eq!(
        otherwise,
        &serde_json::json!({"!Ref": "AWS::NoValue"}),
        "a conditional grant grants nothing otherwise"
    );
    (condition.as_str(), granted)
}

/// Every (IAM action, resource) the task role allows, and the condition
/// each conditional grant is under.
fn granted(template: &Value) -> BTreeSet<(String, Resource)> {
    granted_with_conditions(template)
        .into_iter()
        .map(|(action, resource, _)| (action, resource))
        .collect()
}

fn granted_with_conditions(template: &Value) -> BTreeSet<(String, Resource, Option<String>)> {
    let role = &template["Resources"]["TaskRole"]["Properties"];
    let mut granted = BTreeSet::new();
    for policy in role["Policies"].as_array().unwrap() {
        for statement in policy["PolicyDocument"]["Statement"].as_array().unwrap() {
            let (condition, statement) = conditional(statement);
            assert_eq!(statement["Effect"], "Allow", "{statement}");
            assert!(statement.get("NotAction").is_none() && statement.get("NotResource").is_none());
            for action in one_or_many(&statement["Action"]) {
                let action = action.as_str().unwrap();
                assert!(!action.contains('*'), "a wildcard action {action}");
                for resource in one_or_many(&statement["Resource"]) {
                    assert_ne!(resource, "*", "{action} on every resource");
                    granted.insert((
                        action.to_owned(),
                        resource_of(resource),
                        condition.map(str::to_owned),
                    ));
                }
            }
        }
    }
    assert!(
        role.get("ManagedPolicyArns").is_none(),
        "a managed policy grants more than the worker needs"
    );
    granted
}

#[test]
fn the_task_role_grants_every_call_of_the_worker_on_its_resource() {
    let required = required();
    let granted = granted(&template());
    let missing: Vec<_> = required.difference(&granted).collect();
    assert!(missing.is_empty(), "the task role lacks {missing:?}");
    // Least privilege: nothing the worker does not call, except the queue
    // attributes (read to learn a queue's settings).
    let extra: Vec<_> = granted
        .difference(&required)
        .filter(|(action, _)| action != "sqs:GetQueueAttributes")
        .collect();
    assert!(
        extra.is_empty(),
        "the task role grants more than needed: {extra:?}"
    );
}

#[test]
fn the_report_destinations_are_granted_only_when_given() {
    let template = template();
    let granted = granted_with_conditions(&template);
    let condition_of = |resource| {
        let found: Vec<_> = granted.iter().filter(|g| g.1 == resource).collect();
        let [(_, _, condition)] = &found[..] else {
            panic!("one grant on {resource:?}: {found:?}")
        };
        condition.clone()
    };
    assert_eq!(
        condition_of(Resource::ReportQueue).as_deref(),
        Some("HasReportQueue")
    );
    assert_eq!(
        condition_of(Resource::ReportTopic).as_deref(),
        Some("HasReportTopic")
    );
    // Each condition is that its parameter is not empty.
    for (condition, parameter) in [
        ("HasReportQueue", "ReportQueueArn"),
        ("HasReportTopic", "ReportTopicArn"),
    ] {
        assert_eq!(
            template["Conditions"][condition],
            serde_json::json!({"!Not": [{"!Equals": [{"!Ref": parameter}, ""]}]}),
            "{condition}"
        );
        assert_eq!(template["Parameters"][parameter]["Default"], "");
    }
    // Nothing else is conditional.
    assert!(
        granted
            .iter()
            .all(|g| g.2.is_none() || matches!(g.1, Resource::ReportQueue | Resource::ReportTopic)),
        "{granted:?}"
    );
}

#[test]
fn calls_are_found_across_lines() {
    let source =
        "let x = self\n    .client\n    .send_message()\n    .queue_url(u);\nclient.scan()";
    let calls: Vec<_> = client_calls(source).into_iter().collect();
    assert_eq!(calls, ["scan", "send_message"]);
}
