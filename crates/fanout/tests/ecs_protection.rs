//! Task scale-in protection against a local stand-in for the ECS agent: an
//! axum server on 127.0.0.1 that records every PUT body it receives and
//! answers as scripted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::put;
use fanout::ecs::{EcsError, TaskProtection};
use fanout_core::telemetry::Metrics;
use fanout_testkit::support::loopback_listener;
use serde_json::{Value, json};

/// What the stand-in saw and how it answers next.
#[derive(Default)]
struct Agent {
    bodies: Vec<Value>,
    /// Status and body of the next answers; 200 with a protection object
    /// once the script runs out.
    script: Vec<(StatusCode, &'static str)>,
}

type Shared = Arc<Mutex<Agent>>;

async fn state_handler(State(agent): State<Shared>, body: String) -> (StatusCode, String) {
    let mut agent = agent.lock().expect("agent lock");
    let parsed: Value = serde_json::from_str(&body).expect("the client sends JSON");
    let enabled = parsed["ProtectionEnabled"].as_bool().unwrap_or(false);
    agent.bodies.push(parsed);
    if agent.script.is_empty() {
        let answer = json!({ "protection": {
            "ExpirationDate": "2026-11-27T23:00:00Z",
            "ProtectionEnabled": enabled,
            "TaskArn": "arn:aws:ecs:us-east-1:123456789012:task/fanout/abc",
        }});
        (StatusCode::OK, answer.to_string())
    } else {
        let (status, body) = agent.script.remove(0);
        (status, body.to_owned())
    }
}

/// Starts the stand-in; returns the value ECS would put in ECS_AGENT_URI.
async fn start_agent(agent: Shared) -> String {
    let app = Router::new()
        .route("/api/task-1/task-protection/v1/state", put(state_handler))
        .with_state(agent);
    let (listener, addr) = loopback_listener().await;
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/api/task-1")
}

fn bodies(agent: &Shared) -> Vec<Value> {
    agent.lock().expect("agent lock").bodies.clone()
}

#[tokio::test]
async fn calls_the_agent_only_when_the_state_changes() {
    let agent = Shared::default();
    let uri = start_agent(agent.clone()).await;
    let protection = TaskProtection::new(&uri, 30).expect("valid agent uri");

    assert!(protection.try_set(true).await.expect("agent accepts"));
    assert!(!protection.try_set(true).await.expect("nothing to do"));
    protection.set(true).await;
    assert!(protection.try_set(false).await.expect("agent accepts"));
    protection.set(false).await;

    assert_eq!(
        bodies(&agent),
        vec![
            json!({ "ProtectionEnabled": true, "ExpiresInMinutes": 30 }),
            json!({ "ProtectionEnabled": false }),
        ]
    );
}

#[tokio::test]
async fn a_refusal_is_reported_and_the_next_call_tries_again() {
    let agent = Shared::default();
    agent.lock().expect("agent lock").script = vec![
        (
            StatusCode::OK,
            r#"{"failure":{"Arn":"arn:x","Reason":"TASK_NOT_VALID"}}"#,
        ),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"error":{"Code":"ServerException","Message":"boom"}}"#,
        ),
    ];
    let uri = start_agent(agent.clone()).await;
    let protection = TaskProtection::new(&uri, 60).expect("valid agent uri");

    let refused = protection.try_set(true).await;
    assert!(
        matches!(refused, Err(EcsError::Refused { status: 200, .. })),
        "{refused:?}"
    );
    // `set` logs the 500 and returns; it never fails the caller.
    protection.set(true).await;
    // The script is spent: the agent accepts, and only now does the state
    // stick.
    assert!(protection.try_set(true).await.expect("agent accepts"));
    assert!(!protection.try_set(true).await.expect("nothing to do"));
    assert_eq!(bodies(&agent).len(), 3);
}

#[tokio::test]
async fn an_unreachable_agent_is_an_error_not_a_hang() {
    // Bind and drop: nothing listens on this port any more.
    let port = loopback_listener().await.1.port();
    let protection =
        TaskProtection::new(&format!("http://127.0.0.1:{port}/api/t"), 10).expect("valid uri");
    let result = protection.try_set(true).await;
    assert!(
        matches!(result, Err(EcsError::Unreachable(_))),
        "{result:?}"
    );
    protection.set(false).await;
}

#[tokio::test]
async fn watch_follows_the_jobs_in_flight() {
    let agent = Shared::default();
    let uri = start_agent(agent.clone()).await;
    let protection = Arc::new(TaskProtection::new(&uri, 15).expect("valid agent uri"));
    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(protection.clone().watch(
        metrics.clone(),
        Duration::from_millis(10),
        async {
            let _ = stopped.await;
        },
    ));

    // Idle: one call to turn protection off (the state starts unknown).
    wait_for_calls(&agent, 1).await;
    Metrics::incr(&metrics.jobs_in_flight);
    wait_for_calls(&agent, 2).await;
    metrics
        .jobs_in_flight
        .store(0, std::sync::atomic::Ordering::Relaxed);
    wait_for_calls(&agent, 3).await;
    stop.send(()).expect("watcher running");
    watcher.await.expect("watcher ends on shutdown");

    assert_eq!(
        bodies(&agent),
        vec![
            json!({ "ProtectionEnabled": false }),
            json!({ "ProtectionEnabled": true, "ExpiresInMinutes": 15 }),
            json!({ "ProtectionEnabled": false }),
        ]
    );
}

/// Waits (bounded) until the agent has seen `n` calls; the count, not the
/// time it took, is what the test checks.
async fn wait_for_calls(agent: &Shared, n: usize) {
    for _ in 0..500 {
        if bodies(agent).len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the agent saw {:?}, wanted {n} calls", bodies(agent));
}

#[test]
fn from_env_is_none_outside_ecs_and_some_inside() {
    // The only test in this binary that touches the environment, so no
    // other thread reads it meanwhile.
    unsafe { std::env::remove_var(fanout::ecs::AGENT_URI_VAR) };
    assert!(TaskProtection::from_env(60).is_none());
    unsafe { std::env::set_var(fanout::ecs::AGENT_URI_VAR, "http://169.254.170.2/api/t") };
    assert!(TaskProtection::from_env(60).is_some());
    // A malformed value is logged and treated as unset, never fatal.
    unsafe { std::env::set_var(fanout::ecs::AGENT_URI_VAR, "ftp://nope") };
    assert!(TaskProtection::from_env(60).is_none());
    unsafe { std::env::remove_var(fanout::ecs::AGENT_URI_VAR) };
}
