//! How the gateway client reaches its endpoint, on both send paths: a
//! private CA given with `gateway_ca_file` is trusted by the gateway client
//! alone (the AWS clients keep the system's roots), every connect and TLS
//! handshake gives up within the connect timeout, and plain HTTP to a host
//! that is not loopback is refused at startup unless allowed.
//!
//! Nothing here sets `SSL_CERT_FILE`. Needs the `openssl` CLI.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fanout_aws::clients::CONNECT_TIMEOUT;
use fanout_aws::{GatewayTrust, SdkConfig, SelectedSender, SendPath, SendSettings};
use fanout_core::connection::ConnectionId;
use fanout_core::gateway::{Gateway, PostOutcome};
use fanout_testkit::support;
use fanout_testkit::support::loopback_listener;

/// Longer than any bound under test: a send that takes this long hung.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

use fanout_testkit::pki::Pki;

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        fanout_testkit::pki::make(
            &Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("gateway-trust-{}", std::process::id())),
        )
    })
}

/// hyper's HTTP/1 server over TLS with the test CA's certificate, answering
/// 200 to every request; its port.
async fn tls_sink(pki: &Pki) -> u16 {
    use http_body_util::{BodyExt, Full};

    let acceptor = pki.acceptor();
    let (listener, addr) = loopback_listener().await;
    let port = addr.port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    |request: hyper::Request<hyper::body::Incoming>| async {
                        let _ = request.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::new(),
                        )))
                    },
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    port
}

/// A listener that accepts every connection and never says a word: a TLS
/// handshake with it never ends. Its port.
async fn silent_peer() -> u16 {
    let (listener, addr) = loopback_listener().await;
    let port = addr.port();
    let held = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            held.lock().unwrap().push(socket);
        }
    });
    port
}

/// The SDK config every client is built from, as the binary loads it, with
/// a fixed region and credentials; `endpoint` for SQS and DynamoDB.
async fn sdk_config(endpoint: Option<&str>) -> SdkConfig {
    let mut loader = support::test_config_loader();
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

async fn sender(path: SendPath, endpoint: &str, trust: GatewayTrust) -> SelectedSender {
    let settings = SendSettings {
        path,
        endpoint: endpoint.to_owned(),
        attempt_timeout: ATTEMPT_TIMEOUT,
        max_in_flight: 4,
        trust,
    };
    SelectedSender::build(&sdk_config(None).await, &settings).expect("a valid endpoint")
}

async fn post(sender: &SelectedSender) -> PostOutcome {
    sender
        .post(
            &ConnectionId::from("L0SM9cOFvHcCIhw="),
            Bytes::from_static(b"hello"),
        )
        .await
}

#[tokio::test]
async fn a_private_ca_in_gateway_ca_file_is_trusted_by_the_gateway_alone() {
    let pki = pki();
    let port = tls_sink(pki).await;
    let endpoint = format!("https://127.0.0.1:{port}/prod");
    for path in [SendPath::Lean, SendPath::Sdk] {
        let system_only = post(&sender(path, &endpoint, GatewayTrust::default()).await).await;
        assert!(
            !matches!(system_only, PostOutcome::Delivered),
            "{path:?}: the test CA is not a system root, yet {system_only:?}"
        );
        let with_ca = GatewayTrust {
            allow_plain_http: false,
            ca_file: Some(pki.ca.clone()),
        };
        let outcome = post(&sender(path, &endpoint, with_ca).await).await;
        assert_eq!(outcome, PostOutcome::Delivered, "{path:?}");
    }

    // The AWS clients, built while the gateway trusts the CA, do not: the
    // same endpoint fails their TLS handshake.
    let config = sdk_config(Some(&format!("https://127.0.0.1:{port}"))).await;
    let dynamodb = fanout_aws::clients::dynamodb_client(&config);
    let untrusted = |what: &str, err: &dyn std::error::Error| {
        let text = format!(
            "{}",
            aws_smithy_types::error::display::DisplayErrorContext(err)
        );
        assert!(
            text.contains("certificate") || text.contains("UnknownIssuer"),
            "{what}: {text}"
        );
    };
    untrusted(
        "DynamoDB",
        &dynamodb.list_tables().send().await.unwrap_err(),
    );
    let sqs = fanout_aws::clients::sqs_client(&config, Duration::from_secs(1));
    untrusted("SQS", &sqs.list_queues().send().await.unwrap_err());
}

#[tokio::test]
async fn a_tls_handshake_that_never_answers_fails_within_the_connect_timeout() {
    let port = silent_peer().await;
    let endpoint = format!("https://127.0.0.1:{port}/prod");
    let bound = CONNECT_TIMEOUT + Duration::from_secs(2);
    for path in [SendPath::Lean, SendPath::Sdk] {
        let sender = sender(path, &endpoint, GatewayTrust::default()).await;
        let started = Instant::now();
        let outcome = tokio::time::timeout(bound, post(&sender))
            .await
            .unwrap_or_else(|_| panic!("{path:?}: the send still hangs after {bound:?}"));
        assert!(
            matches!(outcome, PostOutcome::Transient(_)),
            "{path:?}: {outcome:?}"
        );
        assert!(
            started.elapsed() < bound,
            "{path:?}: {:?}",
            started.elapsed()
        );
    }

    // The AWS clients: each attempt's connect is bounded the same way, so
    // their standard retries end well before one 30 s attempt would.
    let config = sdk_config(Some(&format!("https://127.0.0.1:{port}"))).await;
    let dynamodb = fanout_aws::clients::dynamodb_client(&config);
    let sqs = fanout_aws::clients::sqs_client(&config, Duration::from_secs(20));
    let started = Instant::now();
    let (tables, queues) = tokio::join!(
        async { dynamodb.list_tables().send().await.map(drop) },
        async { sqs.list_queues().send().await.map(drop) },
    );
    let elapsed = started.elapsed();
    for (what, result) in [
        ("DynamoDB", tables.map_err(|e| e.to_string())),
        ("SQS", queues.map_err(|e| e.to_string())),
    ] {
        assert!(result.is_err(), "{what} answered through a silent peer");
    }
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
}

/// `fanout check-config` with `vars` on top of a queue URL and a table.
fn check_config(vars: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fanout"));
    command
        .arg("check-config")
        .env("FANOUT_QUEUE_URL", "http://127.0.0.1:9/000000000000/jobs")
        .env("FANOUT_TABLE", "connections");
    for (name, value) in vars {
        command.env(name, value);
    }
    command.output().expect("the fanout binary runs")
}

#[test]
fn plain_http_beyond_loopback_and_a_bad_ca_file_stop_check_config() {
    let remote = "http://10.1.2.3:8080/prod";
    let output = check_config(&[("FANOUT_GATEWAY_ENDPOINT", remote)]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("gateway_endpoint"), "{stderr}");
    assert!(
        stderr.contains("FANOUT_GATEWAY_ALLOW_PLAIN_HTTP"),
        "{stderr}"
    );

    let output = check_config(&[
        ("FANOUT_GATEWAY_ENDPOINT", remote),
        ("FANOUT_GATEWAY_ALLOW_PLAIN_HTTP", "true"),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(shown.contains("gateway_allow_plain_http = true"), "{shown}");

    for local in ["http://127.0.0.1:3001", "http://localhost:3001/local"] {
        let output = check_config(&[("FANOUT_GATEWAY_ENDPOINT", local)]);
        assert!(output.status.success(), "{local}");
    }

    let output = check_config(&[
        ("FANOUT_GATEWAY_ENDPOINT", "https://ws.example.com"),
        ("FANOUT_GATEWAY_CA_FILE", "/nonexistent/ca.pem"),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("gateway_ca_file"), "{stderr}");

    let output = check_config(&[
        ("FANOUT_GATEWAY_ENDPOINT", "https://ws.example.com"),
        ("FANOUT_GATEWAY_CA_FILE", pki().ca.to_str().unwrap()),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
