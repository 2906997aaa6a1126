//! Every PostToConnection answer the engine must tell apart, produced by a
//! real HTTP server and read by both send paths: the SDK client (SDK retries
//! off), the reference, and the lean signed hyper path.
//!
//! Each row gets its own server on 127.0.0.1 that answers every request the
//! same way and records what it saw, so the test also pins the request: one
//! per send, the `/{stage}/@connections/{id}` path with the id
//! percent-encoded, and a SigV4 signature for `execute-api` that verifies
//! against what arrived on the wire (recomputed with `aws-sigv4`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_apigatewaymanagement::config::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use fanout_aws::ApiGatewaySender;
use fanout_aws::LeanSender;
use fanout_aws::SelectedSender;
use fanout_core::connection::ConnectionId;
use fanout_core::gateway::{Gateway, PostOutcome};

const STAGE: &str = "test-stage";
const CONNECTION_ID: &str = "L0SM9cOFvHcCIhw=";
const ENCODED_PATH: &str = "/test-stage/@connections/L0SM9cOFvHcCIhw%3D";
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
const REGION: &str = "us-east-1";
/// Temporary credentials, as an ECS task role gives: the session token must
/// travel and be signed.
const SESSION_TOKEN: &str = "test-session-token";

/// What a row's server answers.
#[derive(Clone)]
struct Answer {
    status: u16,
    error_type: Option<&'static str>,
    body: &'static str,
    /// Held back this long before answering.
    delay: Duration,
}

const fn answer(status: u16, error_type: Option<&'static str>, body: &'static str) -> Answer {
    Answer {
        status,
        error_type,
        body,
        delay: Duration::ZERO,
    }
}

/// What the server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Clone)]
struct Server {
    answer: Answer,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn respond(State(server): State<Server>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .expect("read the request body");
    server.seen.lock().expect("seen lock").push(Seen {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        headers: parts.headers,
        body,
    });
    tokio::time::sleep(server.answer.delay).await;
    let mut response = Response::builder()
        .status(StatusCode::from_u16(server.answer.status).expect("valid status"))
        .header("x-amzn-RequestId", "test-request");
    if let Some(error_type) = server.answer.error_type {
        response = response
            .header("x-amzn-ErrorType", error_type)
            .header("content-type", "application/json");
    }
    response
        .body(Body::from(server.answer.body))
        .expect("valid response")
}

/// Starts a server answering `answer`; returns its endpoint and request log.
async fn serve(answer: Answer) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let app = Router::new().fallback(respond).with_state(Server {
        answer,
        seen: seen.clone(),
    });
    let addr = crate::serve_on_loopback(app).await;
    (format!("http://{addr}/{STAGE}"), seen)
}

/// An endpoint on a port nothing listens on.
async fn closed_endpoint() -> String {
    let addr = crate::closed_port().await;
    format!("http://{addr}/{STAGE}")
}

fn credentials() -> Credentials {
    Credentials::new(
        "test",
        "test",
        Some(SESSION_TOKEN.to_owned()),
        None,
        "classify-test",
    )
}

/// The two send paths, each as main builds it.
#[derive(Clone, Copy, Debug)]
enum Path {
    Sdk,
    Lean,
}

const PATHS: [Path; 2] = [Path::Sdk, Path::Lean];

async fn sender(path: Path, endpoint: &str) -> SelectedSender {
    let config = fanout_aws::clients::config_loader()
        .region(REGION)
        .credentials_provider(credentials())
        .load()
        .await;
    match path {
        Path::Sdk => {
            let client = fanout_aws::clients::apigw_client(&config, endpoint, ATTEMPT_TIMEOUT)
                .expect("a valid test endpoint");
            SelectedSender::Sdk(ApiGatewaySender::new(client))
        }
        Path::Lean => SelectedSender::Lean(
            LeanSender::new(&config, endpoint, ATTEMPT_TIMEOUT, 8).expect("a valid test endpoint"),
        ),
    }
}

/// Recomputes the SigV4 signature of a request as the server saw it, from
/// the headers it names as signed, and compares.
fn verify_signature(request: &Seen) -> Result<(), String> {
    let header = |name: &str| {
        request
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| format!("no {name} header"))
    };
    let authorization = header("authorization")?;
    let field = |key: &str| {
        authorization
            .split([' ', ','])
            .find_map(|part| part.strip_prefix(key))
            .ok_or_else(|| format!("no {key} in {authorization:?}"))
    };
    let signed_headers = field("SignedHeaders=")?;
    let signature = field("Signature=")?;
    for required in ["host", "x-amz-date", "x-amz-security-token"] {
        if !signed_headers.split(';').any(|h| h == required) {
            return Err(format!("{required} is not signed: {signed_headers}"));
        }
    }
    if header("x-amz-security-token")? != SESSION_TOKEN {
        return Err("the session token did not travel".into());
    }
    let time = parse_amz_date(header("x-amz-date")?)?;
    let uri = format!("http://{}{}", header("host")?, request.path);
    let mut headers = Vec::new();
    for name in signed_headers.split(';') {
        headers.push((name, header(name)?));
    }
    let identity = Identity::from(credentials());
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(REGION)
        .name("execute-api")
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let signable = SignableRequest::new(
        request.method.as_str(),
        uri,
        headers.into_iter(),
        SignableBody::Bytes(&request.body),
    )
    .map_err(|e| e.to_string())?;
    let (_, expected) = sign(signable, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    if expected == signature {
        Ok(())
    } else {
        Err(format!(
            "signature {signature} does not verify (expected {expected})"
        ))
    }
}

/// `20261127T211500Z` as a time.
fn parse_amz_date(text: &str) -> Result<SystemTime, String> {
    let bad = || format!("bad x-amz-date {text:?}");
    let digits = |range: std::ops::Range<usize>| -> Result<i64, String> {
        text.get(range).and_then(|d| d.parse().ok()).ok_or_else(bad)
    };
    if text.len() != 16 || &text[8..9] != "T" || !text.ends_with('Z') {
        return Err(bad());
    }
    let (y, m, d) = (digits(0..4)?, digits(4..6)?, digits(6..8)?);
    let (hh, mm, ss) = (digits(9..11)?, digits(11..13)?, digits(13..15)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).map_err(|_| bad())?))
}

fn gone_json() -> &'static str {
    r#"{"message":"Gone"}"#
}

#[derive(Debug, PartialEq)]
enum Expect {
    Delivered,
    Gone,
    Throttled,
    PayloadTooLarge,
    Forbidden,
    Rejected,
    Transient,
}

fn kind(outcome: &PostOutcome) -> Expect {
    match outcome {
        PostOutcome::Delivered => Expect::Delivered,
        PostOutcome::Gone => Expect::Gone,
        PostOutcome::Throttled => Expect::Throttled,
        PostOutcome::PayloadTooLarge => Expect::PayloadTooLarge,
        PostOutcome::Forbidden(_) => Expect::Forbidden,
        PostOutcome::Rejected(_) => Expect::Rejected,
        PostOutcome::Transient(_) => Expect::Transient,
    }
}

#[tokio::test]
async fn every_answer_is_classified_after_exactly_one_request() {
    let rows: Vec<(&str, Answer, Expect)> = vec![
        ("200", answer(200, None, ""), Expect::Delivered),
        (
            "410 GoneException",
            answer(410, Some("GoneException"), gone_json()),
            Expect::Gone,
        ),
        ("bare 410", answer(410, None, ""), Expect::Gone),
        (
            "410 non-JSON body",
            answer(410, None, "<html>gone</html>"),
            Expect::Gone,
        ),
        (
            "413 PayloadTooLargeException",
            answer(
                413,
                Some("PayloadTooLargeException"),
                r#"{"message":"Message too long"}"#,
            ),
            Expect::PayloadTooLarge,
        ),
        (
            "429 LimitExceededException",
            answer(
                429,
                Some("LimitExceededException"),
                r#"{"message":"Rate exceeded"}"#,
            ),
            Expect::Throttled,
        ),
        (
            "403 ForbiddenException",
            answer(
                403,
                Some("ForbiddenException"),
                r#"{"message":"Forbidden"}"#,
            ),
            Expect::Forbidden,
        ),
        ("500", answer(500, None, ""), Expect::Transient),
        ("502", answer(502, None, "Bad Gateway"), Expect::Transient),
        (
            "503",
            answer(
                503,
                Some("ServiceUnavailableException"),
                r#"{"message":"unavailable"}"#,
            ),
            Expect::Transient,
        ),
        (
            "400 BadRequestException",
            answer(
                400,
                Some("BadRequestException"),
                r#"{"message":"Invalid connectionId"}"#,
            ),
            Expect::Rejected,
        ),
        (
            "slower than the attempt timeout",
            Answer {
                delay: ATTEMPT_TIMEOUT * 4,
                ..answer(200, None, "")
            },
            Expect::Transient,
        ),
    ];

    let payload = Bytes::from_static(br#"{"hello":"world"}"#);
    let id = ConnectionId::from(CONNECTION_ID);
    let mut failures = Vec::new();
    for path in PATHS {
        for (row, answer, expected) in &rows {
            let name = format!("{path:?} {row}");
            let (endpoint, seen) = serve(answer.clone()).await;
            let outcome = sender(path, &endpoint)
                .await
                .post(&id, payload.clone())
                .await;
            if kind(&outcome) != *expected {
                failures.push(format!("{name}: expected {expected:?}, got {outcome:?}"));
            }
            let seen = seen.lock().expect("seen lock").clone();
            if seen.len() != 1 {
                failures.push(format!(
                    "{name}: the server saw {} requests, not 1 (SDK retries must be off)",
                    seen.len()
                ));
                continue;
            }
            let request = &seen[0];
            assert_eq!(request.method, Method::POST, "{name}");
            assert_eq!(request.path, ENCODED_PATH, "{name}");
            assert_eq!(request.body, payload, "{name}");
            let authorization = request
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            assert!(
                authorization.starts_with("AWS4-HMAC-SHA256 Credential=test/")
                    && authorization.contains("/us-east-1/execute-api/aws4_request"),
                "{name}: not SigV4 for execute-api: {authorization:?}"
            );
            if let Err(e) = verify_signature(request) {
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn a_refused_connection_is_transient() {
    for path in PATHS {
        let endpoint = closed_endpoint().await;
        let outcome = sender(path, &endpoint)
            .await
            .post(&ConnectionId::from(CONNECTION_ID), Bytes::from_static(b"x"))
            .await;
        assert!(
            matches!(outcome, PostOutcome::Transient(_)),
            "{path:?}: expected Transient, got {outcome:?}"
        );
    }
}

#[tokio::test]
async fn forbidden_says_what_to_check() {
    for path in PATHS {
        let (endpoint, _seen) = serve(answer(
            403,
            Some("ForbiddenException"),
            r#"{"message":"Forbidden"}"#,
        ))
        .await;
        let outcome = sender(path, &endpoint)
            .await
            .post(&ConnectionId::from(CONNECTION_ID), Bytes::from_static(b"x"))
            .await;
        let PostOutcome::Forbidden(message) = outcome else {
            panic!("{path:?}: expected Forbidden, got {outcome:?}");
        };
        assert!(message.contains("stage"), "{path:?}: {message}");
        assert!(
            message.contains("(ForbiddenException: Forbidden)"),
            "{path:?}: {message}"
        );
        assert!(
            message.contains("execute-api:ManageConnections"),
            "{path:?}: {message}"
        );
    }
}
