//! The lean send path against a server that is not hyper, Python's
//! `http.server` (keep-alive HTTP/1.1, a listen backlog of 5, and over TLS
//! a handshake in its accept loop), and against one that is (hyper's HTTP/1
//! server, as the benchmark's sink runs it); plain and over HTTPS with a CA
//! made for the test and trusted through `SSL_CERT_FILE`, as an operator
//! would give one. Each case sends at 1,000/s with 256 in flight through
//! both paths and prints their posts/s (`-- --nocapture`).
//!
//! Needs `python3` and the `openssl` CLI.

use std::io::{BufRead, BufReader};
use std::num::NonZeroU32;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fanout_aws::ApiGatewaySender;
use fanout_aws::LeanSender;
use fanout_aws::SelectedSender;
use fanout_core::budget::{RateSettings, SendBudget};
use fanout_core::connection::ConnectionId;
use fanout_core::gateway::{Gateway, PostOutcome};
use fanout_testkit::support;
use futures::StreamExt;

const RATE: u32 = 1_000;
const IN_FLIGHT: usize = 256;
const POSTS: usize = 2_000;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Python's server, killed by its PID on drop.
struct PythonSink {
    child: Child,
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl PythonSink {
    fn start(tls: Option<&Pki>) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/http_sink.py");
        let mut command = Command::new("python3");
        command.arg(script);
        if let Some(pki) = tls {
            command.arg(&pki.server_cert).arg(&pki.server_key);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("the sink says its port").unwrap();
        let port = first
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {first:?}"));
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line == "CONN" {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self {
            child,
            port,
            connections,
        }
    }
}

/// hyper's HTTP/1 server on 127.0.0.1, in this process: 200 with an empty
/// body for every request, the body read first, as API Gateway answers a
/// delivered post. Stops with the test's runtime.
struct HyperSink {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl HyperSink {
    async fn start(tls: Option<&Pki>) -> Self {
        use http_body_util::{BodyExt, Full};

        let acceptor = tls.map(Pki::acceptor);
        let (listener, addr) = support::loopback_listener().await;
        let port = addr.port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |request: hyper::Request<hyper::body::Incoming>| async {
                            let _ = request.into_body().collect().await;
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::new(),
                            )))
                        },
                    );
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let io = hyper_util::rt::TokioIo::new(stream);
                                let _ = http.serve_connection(io, service).await;
                            }
                        }
                        None => {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = http.serve_connection(io, service).await;
                        }
                    }
                });
            }
        });
        Self { port, connections }
    }
}

impl Drop for PythonSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

use fanout_testkit::pki::Pki;

/// One set per test process: `SSL_CERT_FILE` is read when a client loads
/// its roots, and names the CA for every test here.
fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let pki = fanout_testkit::pki::make(
            &Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("lean-peers-{}", std::process::id())),
        );
        // SAFETY: set once, before any client of this process loads roots;
        // every test here trusts the same CA.
        unsafe { std::env::set_var("SSL_CERT_FILE", &pki.ca) };
        pki
    })
}

async fn sender(lean: bool, endpoint: &str) -> SelectedSender {
    let config = support::test_config_loader().load().await;
    if lean {
        SelectedSender::Lean(LeanSender::new(&config, endpoint, TIMEOUT, IN_FLIGHT).unwrap())
    } else {
        SelectedSender::Sdk(ApiGatewaySender::new(
            fanout_aws::clients::apigw_client(&config, endpoint, TIMEOUT).unwrap(),
        ))
    }
}

/// One run of `POSTS` posts through one path at `RATE`, `IN_FLIGHT` at once.
#[derive(Debug)]
struct Run {
    /// Delivered posts per second.
    rate: f64,
    failed: usize,
    first_failure: Option<PostOutcome>,
}

async fn run(lean: bool, endpoint: &str) -> Run {
    let sender = sender(lean, endpoint).await;
    let burst = NonZeroU32::new(RATE / 100)
        .unwrap()
        .max(NonZeroU32::new(50).unwrap());
    let budget = SendBudget::new(
        Some(RateSettings {
            per_second: NonZeroU32::new(RATE).unwrap(),
            burst,
            adaptive: false,
        }),
        IN_FLIGHT,
    );
    let payload = Bytes::from_static(br#"{"message":"hello"}"#);
    let start = Instant::now();
    let outcomes: Vec<PostOutcome> = futures::stream::iter(0..POSTS)
        .map(|n| {
            let (sender, budget, payload) = (&sender, &budget, payload.clone());
            async move {
                let _permit = budget.acquire().await;
                sender
                    .post(&ConnectionId::from(format!("c{n}")), payload)
                    .await
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let elapsed = start.elapsed().as_secs_f64();
    let mut failures = outcomes
        .into_iter()
        .filter(|o| !matches!(o, PostOutcome::Delivered));
    let first_failure = failures.next();
    let failed = failures.count() + usize::from(first_failure.is_some());
    Run {
        rate: (POSTS - failed) as f64 / elapsed,
        failed,
        first_failure,
    }
}

/// Both paths, three runs each, alternating; the best of each, as delivered
/// posts/s (Python's single accept loop, with the TLS handshake in it, can
/// stall a run on a busy machine, on either path). The lean path's best run
/// delivers every post.
fn best(runs: &[Run]) -> &Run {
    runs.iter()
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
        .expect("three runs")
}

/// `connections`: the peer's count of connections accepted.
async fn compare(port: u16, tls: bool, connections: &AtomicUsize, what: &str) {
    let scheme = if tls { "https" } else { "http" };
    let endpoint = &format!("{scheme}://127.0.0.1:{port}/prod");
    let (mut lean, mut sdk) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let before = connections.load(Ordering::Relaxed);
        lean.push(run(true, endpoint).await);
        let opened = connections.load(Ordering::Relaxed) - before;
        assert!(opened <= IN_FLIGHT, "lean opened {opened} connections");
        sdk.push(run(false, endpoint).await);
    }
    let rates = |runs: &[Run]| runs.iter().map(|r| r.rate.round()).collect::<Vec<_>>();
    println!(
        "{what}: lean {:?} posts/s, SDK {:?} posts/s",
        rates(&lean),
        rates(&sdk)
    );
    let (lean_best, sdk_best) = (best(&lean), best(&sdk));
    assert_eq!(
        lean_best.failed, 0,
        "{what}: first failure {:?}",
        lean_best.first_failure
    );
    assert!(
        lean_best.rate >= 0.9 * sdk_best.rate,
        "{what}: lean {lean:?} against SDK {sdk:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_keeps_up_with_the_sdk_against_pythons_http_server() {
    pki();
    let sink = PythonSink::start(None);
    compare(sink.port, false, &sink.connections, "plain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_keeps_up_with_the_sdk_over_tls_with_a_ca_from_ssl_cert_file() {
    let pki = pki();
    let sink = PythonSink::start(Some(pki));
    compare(sink.port, true, &sink.connections, "TLS").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_keeps_up_with_the_sdk_against_hyper() {
    pki();
    let sink = HyperSink::start(None).await;
    compare(sink.port, false, &sink.connections, "hyper, plain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_keeps_up_with_the_sdk_against_hyper_over_tls() {
    let pki = pki();
    let sink = HyperSink::start(Some(pki)).await;
    compare(sink.port, true, &sink.connections, "hyper, TLS").await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let pki = pki();
    let untrusted = Pki {
        ca: pki.ca.clone(),
        server_cert: pki.untrusted_cert.clone(),
        server_key: pki.server_key.clone(),
        untrusted_cert: pki.untrusted_cert.clone(),
    };
    for (server, delivered) in [(pki, true), (&untrusted, false)] {
        let sink = PythonSink::start(Some(server));
        let endpoint = format!("https://127.0.0.1:{}/prod", sink.port);
        let outcome = sender(true, &endpoint)
            .await
            .post(&ConnectionId::from("a"), Bytes::from_static(b"x"))
            .await;
        match outcome {
            PostOutcome::Delivered => assert!(delivered, "an untrusted certificate was accepted"),
            PostOutcome::Transient(e) => {
                assert!(!delivered, "{e}");
                assert!(e.contains("certificate"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
}
