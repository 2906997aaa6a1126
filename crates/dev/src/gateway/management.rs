//! The `@connections` management API, answering as API Gateway does:
//! status, `x-amzn-ErrorType` and JSON body, so the SDK's own client parses
//! every answer into its typed errors and outputs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::ws::{Message, Utf8Bytes};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::App;
use super::faults::{PostResult, SinkGroup, StatsSnapshot};
use super::registry::Refused;
use super::seqs::SeqSnapshot;

pub use fanout_core::limits::MAX_PAYLOAD_BYTES;

/// `POST /{stage}/@connections/{id}`: deliver the body as one frame.
pub async fn post(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = app.stats.start_post();
    let result = post_outcome(&app, &id, &headers, body).await;
    app.stats.record(result);
    match result {
        PostResult::Delivered => StatusCode::OK.into_response(),
        PostResult::Gone => gone(),
        PostResult::Throttled => aws_error(
            StatusCode::TOO_MANY_REQUESTS,
            "LimitExceededException",
            "Too Many Requests",
        ),
        PostResult::Failed => aws_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerErrorException",
            "Internal server error (injected by --fail-percent)",
        ),
        PostResult::TooLarge => aws_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLargeException",
            "Message too long: the limit is 131072 bytes",
        ),
        PostResult::Forbidden => forbidden(),
    }
}

async fn post_outcome(app: &App, id: &str, headers: &HeaderMap, body: Bytes) -> PostResult {
    if !signed_for_execute_api(headers) {
        return PostResult::Forbidden;
    }
    if app.faults.latency() > Duration::ZERO {
        tokio::time::sleep(app.faults.latency()).await;
    }
    if app.faults.throttled() {
        return PostResult::Throttled;
    }
    if body.len() > MAX_PAYLOAD_BYTES {
        return PostResult::TooLarge;
    }
    if app.faults.fails() {
        return PostResult::Failed;
    }
    match app.registry.deliver(id, frame(body.clone())) {
        Ok(()) => PostResult::Delivered,
        Err(Refused::Gone) if app.sink.is_some() => {
            let now = super::registry::now_ms();
            if let Some(sink) = &app.sink {
                let mut entry = sink.entry(id.to_owned()).or_insert((0, now));
                entry.0 += 1;
            }
            if let Some(seqs) = &app.sink_seqs {
                seqs.record(id, &body, now);
            }
            PostResult::Delivered
        }
        Err(Refused::Gone) => PostResult::Gone,
        Err(Refused::BufferFull) => PostResult::Throttled,
    }
}

/// Text when the body is UTF-8, else binary, as API Gateway decides.
fn frame(body: Bytes) -> Message {
    match Utf8Bytes::try_from(body.clone()) {
        Ok(text) => Message::Text(text),
        Err(_) => Message::Binary(body),
    }
}

/// `GET /{stage}/@connections/{id}`. The wire names are camelCase, as the
/// service sends them (the SDK's model calls them `ConnectedAt`, …).
pub async fn get(State(app): State<Arc<App>>, Path(id): Path<String>, _: Signed) -> Response {
    let details = app.registry.inspect(&id, |c| {
        serde_json::json!({
            "connectedAt": iso8601(c.connected_at_ms),
            "lastActiveAt": iso8601(c.last_active_ms.load(Ordering::Relaxed)),
            "identity": {
                "sourceIp": c.source_ip.to_string(),
                "userAgent": c.user_agent,
            },
        })
    });
    match details {
        Some(details) => Json(details).into_response(),
        None => gone(),
    }
}

/// `DELETE /{stage}/@connections/{id}`: close the socket.
pub async fn delete(State(app): State<Arc<App>>, Path(id): Path<String>, _: Signed) -> Response {
    if app.registry.remove(&id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        gone()
    }
}

/// `GET /{stage}/@stats`: counters for tests and demos (not an AWS API).
pub async fn stats(State(app): State<Arc<App>>) -> Json<StatsSnapshot> {
    let mut snapshot = app.stats.snapshot(app.registry.len());
    if let Some(sink) = &app.sink {
        snapshot.sink_ids = sink.len() as u64;
        snapshot.sink_duplicates = sink.iter().map(|n| u64::from(n.0.saturating_sub(1))).sum();
        snapshot.sink_groups = sink_groups(sink.iter().map(|e| (e.key().clone(), e.value().1)));
    }
    if let Some(seqs) = &app.sink_seqs {
        let summary = seqs.summary();
        snapshot.sink_seq_ids = summary.ids;
        snapshot.sink_seq_newest = summary.newest;
        snapshot.sink_seq_holding_newest = summary.holding_newest;
    }
    Json(snapshot)
}

/// `GET /{stage}/@stats/seqs`: per sink id, when its newest `seq` rose
/// (empty without `--sink`). Megabytes for a long stream to a large
/// audience: read once, at the end of a measurement.
pub async fn seqs(State(app): State<Arc<App>>) -> Json<SeqSnapshot> {
    Json(
        app.sink_seqs
            .as_ref()
            .map(|seqs| seqs.snapshot())
            .unwrap_or_default(),
    )
}

/// The sink's ids grouped by what comes before their last `-` (`c-00017`
/// is in `c`), each group with when its first and its last id were first
/// delivered to: one broadcast's span, or one job's first delivery, when
/// each uses its own prefix.
fn sink_groups(firsts: impl Iterator<Item = (String, u64)>) -> Vec<SinkGroup> {
    let mut groups: std::collections::BTreeMap<String, SinkGroup> = Default::default();
    for (id, first_ms) in firsts {
        let prefix = id.rsplit_once('-').map_or(id.as_str(), |(p, _)| p);
        let group = groups.entry(prefix.to_owned()).or_insert(SinkGroup {
            prefix: prefix.to_owned(),
            ids: 0,
            first_ms,
            last_ms: first_ms,
        });
        group.ids += 1;
        group.first_ms = group.first_ms.min(first_ms);
        group.last_ms = group.last_ms.max(first_ms);
    }
    groups.into_values().collect()
}

/// A request signed for `execute-api`, as API Gateway requires of the
/// management API; any other is answered 403. (A post checks for itself, so
/// that its stats count the refusal.)
pub struct Signed;

impl<S: Send + Sync> FromRequestParts<S> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        if signed_for_execute_api(&parts.headers) {
            Ok(Self)
        } else {
            Err(forbidden())
        }
    }
}

/// Whether the request carries a SigV4 `Authorization` header scoped to
/// `execute-api`. The signature itself is not checked: the stand-in only
/// catches clients that do not sign, or sign for the wrong service.
fn signed_for_execute_api(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("AWS4-HMAC-SHA256 ") && v.contains("/execute-api/aws4_request")
        })
}

fn gone() -> Response {
    aws_error(StatusCode::GONE, "GoneException", "The connection is gone")
}

fn forbidden() -> Response {
    aws_error(
        StatusCode::FORBIDDEN,
        "ForbiddenException",
        "Forbidden: sign the request with SigV4 for the execute-api service",
    )
}

/// An error answer as API Gateway shapes it: the SDK picks the error type
/// from `x-amzn-ErrorType`.
fn aws_error(status: StatusCode, kind: &'static str, message: &str) -> Response {
    let mut response = (status, Json(serde_json::json!({ "message": message }))).into_response();
    response
        .headers_mut()
        .insert("x-amzn-ErrorType", HeaderValue::from_static(kind));
    response
}

/// ISO-8601 with milliseconds in UTC, the shape the SDK parses.
fn iso8601(epoch_ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(epoch_ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn only_sigv4_for_execute_api_is_accepted() {
        let good = "AWS4-HMAC-SHA256 Credential=test/20261127/us-east-1/execute-api/aws4_request, \
                    SignedHeaders=host;x-amz-date, Signature=abc";
        assert!(signed_for_execute_api(&with_auth(good)));
        let other_service =
            "AWS4-HMAC-SHA256 Credential=test/20261127/us-east-1/dynamodb/aws4_request";
        assert!(!signed_for_execute_api(&with_auth(other_service)));
        assert!(!signed_for_execute_api(&with_auth(
            "Bearer x/execute-api/aws4_request"
        )));
        assert!(!signed_for_execute_api(&HeaderMap::new()));
    }

    #[test]
    fn utf8_is_text_anything_else_binary() {
        assert_eq!(frame(Bytes::from_static(b"hello")), Message::text("hello"));
        let binary = Bytes::from_static(&[0xff, 0x00, 0xfe]);
        assert_eq!(frame(binary.clone()), Message::Binary(binary));
    }

    #[test]
    fn timestamps_are_iso8601_utc_with_millis() {
        assert_eq!(iso8601(1_764_277_390_123), "2025-11-27T21:03:10.123Z");
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn errors_carry_the_type_header_and_a_json_message() {
        let response = gone();
        assert_eq!(response.status(), StatusCode::GONE);
        assert_eq!(response.headers()["x-amzn-ErrorType"], "GoneException");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }
}
