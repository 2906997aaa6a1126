//! No live client misses a broadcast under throttling and 5xx, and the
//! adaptive rate converges: the `fanout` binary against moto, dynalite and an
//! `@connections` endpoint in this test that throttles like API Gateway (a
//! token bucket at a steady rate with a burst, answering 429
//! `LimitExceededException` when empty), fails a share of requests with 500
//! at random, answers 410 for gone connections, and records every delivery.
//!
//! The throughput targets (the others at 90 % of the ceiling past a slow
//! client, the delivery rate at 90 % of what the endpoint accepts) depend
//! on real time and on the machine: `scripts/bench.sh --cases throttle`
//! checks them on the release build with the machine to itself
//! ([`support::timing_targets`]). Under `cargo test` these tests check
//! what holds anywhere: every live client reached exactly once, gone rows
//! removed, and a throttled share far from runaway; they print the figures.

use fanout_testkit::support;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use support::worker::{Run, finish, start};

/// Held by each test: rate figures need the machine to themselves, not
/// shared with another test's worker.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The endpoint's steady rate and burst, as in the missed-clients report.
const ACCEPTED_PER_SECOND: u32 = 3000;
const BURST: u32 = 1500;

/// An `@connections` endpoint with API Gateway's answers and injected faults.
struct Peer {
    /// API Gateway's account throttle is a token bucket: governor's GCRA is
    /// one, refilled at a steady rate.
    bucket: DefaultDirectRateLimiter,
    /// Share of requests answered 500, at random.
    fail_share: f64,
    gone: HashSet<String>,
    /// Ids that always answer 429 (a client whose buffer is full).
    full: HashSet<String>,
    deliveries: Mutex<HashMap<String, u32>>,
    posts: AtomicU64,
    throttled: AtomicU64,
    /// When posts came: the first and the last.
    first_post: Mutex<Option<Instant>>,
    last_delivery: Mutex<Option<Instant>>,
}

impl Peer {
    fn new(rate: u32, burst: u32, fail_share: f64, gone: HashSet<String>) -> Self {
        let rate = NonZeroU32::new(rate).expect("a rate");
        let burst = NonZeroU32::new(burst).expect("a burst");
        Self {
            bucket: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
            fail_share,
            gone,
            full: HashSet::new(),
            deliveries: Mutex::new(HashMap::new()),
            posts: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            first_post: Mutex::new(None),
            last_delivery: Mutex::new(None),
        }
    }

    fn answer(&self, id: &str) -> Response {
        let now = Instant::now();
        self.posts.fetch_add(1, Ordering::Relaxed);
        self.first_post.lock().unwrap().get_or_insert(now);
        if self.bucket.check().is_err() || self.full.contains(id) {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            return aws_error(StatusCode::TOO_MANY_REQUESTS, "LimitExceededException");
        }
        if rand::random::<f64>() < self.fail_share {
            return aws_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerErrorException",
            );
        }
        if self.gone.contains(id) {
            return aws_error(StatusCode::GONE, "GoneException");
        }
        *self
            .deliveries
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default() += 1;
        *self.last_delivery.lock().unwrap() = Some(now);
        StatusCode::OK.into_response()
    }

    /// Seconds from the first post to the last delivery (retries of
    /// connections that were not delivered come later, and are no part of
    /// the delivery rate).
    fn span(&self) -> f64 {
        let first = self.first_post.lock().unwrap().expect("posts came");
        let last = self.last_delivery.lock().unwrap().expect("deliveries came");
        last.duration_since(first).as_secs_f64()
    }
}

fn aws_error(status: StatusCode, kind: &'static str) -> Response {
    (
        status,
        [
            ("x-amzn-ErrorType", kind),
            ("content-type", "application/json"),
        ],
        format!(r#"{{"message":"{kind}"}}"#),
    )
        .into_response()
}

async fn post(State(peer): State<Arc<Peer>>, Path(id): Path<String>) -> Response {
    peer.answer(&id)
}

/// Serves `peer` on a free loopback port until the test ends.
async fn serve(peer: Arc<Peer>) -> SocketAddr {
    let app = axum::Router::new()
        .route("/test/@connections/{id}", axum::routing::post(post))
        .with_state(peer);
    let (listener, addr) = support::loopback_listener().await;
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

struct Outcome {
    run: Run,
    rows: BTreeSet<String>,
    queue: (u64, u64),
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
}

/// The sender's own limits set far above any endpoint's: only the
/// endpoint's throttle, through the adaptive rate, paces it.
const UNLIMITED_SENDER: &[(&str, &str)] = &[
    ("FANOUT_RATE_PER_SECOND", "100000"),
    ("FANOUT_MAX_IN_FLIGHT", "128"),
];

/// A table with rows for `ids`, one job, then `fanout run --exit-when-idle`
/// with `env` against `peer`, served for the test.
async fn broadcast(
    peer: &Arc<Peer>,
    ids: &[String],
    job_id: &str,
    env: &[(&str, &str)],
) -> Outcome {
    let body = format!(r#"{{"id":"{job_id}","data":"news"}}"#);
    let job = support::one_job("missed", ids, &body).await;
    let addr = serve(peer.clone()).await;
    let endpoint = format!("http://{addr}/test");
    let child = start(support::worker::command(
        &["run", "--exit-when-idle"],
        &job.queue.url,
        &job.dlq.url,
        &job.table,
        [("FANOUT_GATEWAY_ENDPOINT", endpoint.as_str())]
            .into_iter()
            .chain(env.iter().copied()),
    ));
    let run = finish(child, Duration::from_secs(300)).await;
    assert!(run.status.success(), "{}", run.stdout);
    let counts = support::counts(&job.sqs, &job.queue.url).await;
    let rows = support::remaining_ids(&job.dynamo, &job.table).await;
    Outcome {
        run,
        rows,
        queue: counts,
        sqs: job.sqs,
        queue_url: job.queue.url,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_throttle_and_random_500s_no_live_client_misses_the_broadcast() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let ids = support::ids("c", 6000);
    let gone: HashSet<String> = ids.iter().step_by(10).cloned().collect();
    let live: BTreeSet<String> = ids
        .iter()
        .filter(|id| !gone.contains(*id))
        .cloned()
        .collect();
    let peer = Arc::new(Peer::new(ACCEPTED_PER_SECOND, BURST, 0.05, gone));
    let out = broadcast(&peer, &ids, "storm", UNLIMITED_SENDER).await;

    let deliveries = peer.deliveries.lock().unwrap().clone();
    let reached: BTreeSet<String> = deliveries.keys().cloned().collect();
    let missed: Vec<_> = live.difference(&reached).collect();
    let twice: Vec<_> = deliveries.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missed.is_empty(),
        "{} live missed: {missed:?}",
        missed.len()
    );
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    assert_eq!(out.rows, live, "gone rows left, or live rows removed");
    assert_eq!(out.queue, (0, 0), "the queue is empty");
    let report = out.run.report("storm");
    assert_eq!(report["status"], "done", "{}", out.run.stdout);
    assert_eq!(report["delivered"], live.len());
    // A debug build may not reach this throttle, so the rate targets are
    // checked by the scaled-down test below; the figures are printed.
    rate_figures(&peer, live.len());
}

/// The same shape of throttle scaled down five times (600/s, burst 300):
/// the debug build on a shared test machine cannot always send 3,000/s, and
/// a sender that cannot reach the throttle proves nothing about converging
/// to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adaptive_rate_converges_on_what_the_endpoint_accepts() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let accepted = ACCEPTED_PER_SECOND / 5;
    // Ten seconds at the accepted rate: the throttled share is mostly a
    // fixed cost paid at the first 429s (below), which a shorter broadcast
    // weighs more heavily.
    let ids = support::ids("r", 6000);
    let peer = Arc::new(Peer::new(accepted, BURST / 5, 0.0, HashSet::new()));
    let out = broadcast(&peer, &ids, "converge", UNLIMITED_SENDER).await;
    assert_eq!(out.run.report("converge")["delivered"], ids.len());
    let (throttled, rate) = rate_figures(&peer, ids.len());
    println!(
        "kind=throttle case=converge accepted_per_s={accepted} rate_per_s={rate:.0} \
         throttled_share={throttled:.4}"
    );
    // Nearly all the throttled posts come at the first 429s, when the posts
    // in flight meet the empty bucket: a fixed cost. The budget's own tests
    // check 5 % on the paused clock; a sender that ignored 429s would see
    // most of its posts throttled, which no machine excuses.
    assert!(
        throttled <= 0.25,
        "{:.1} % of posts throttled",
        throttled * 100.0
    );
    if support::timing_targets() {
        assert!(
            throttled <= 0.1,
            "{:.1} % of posts throttled",
            throttled * 100.0
        );
        assert!(
            rate >= 0.9 * f64::from(accepted),
            "delivered at {rate:.0}/s, under 90 % of {accepted}/s"
        );
    }
}

/// Posts, throttled posts and the delivery rate, printed; returns the
/// throttled share and the rate.
fn rate_figures(peer: &Peer, delivered: usize) -> (f64, f64) {
    let posts = peer.posts.load(Ordering::Relaxed);
    let throttled = peer.throttled.load(Ordering::Relaxed);
    let rate = delivered as f64 / peer.span();
    eprintln!(
        "posts {posts}, throttled {throttled} ({:.2} %), delivery rate {rate:.0}/s over {:.2} s",
        100.0 * throttled as f64 / posts as f64,
        peer.span()
    );
    (throttled as f64 / posts as f64, rate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_that_always_answers_429_slows_no_one_and_is_handed_on() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let ids = support::ids("s", 3000);
    let slow = ids[1500].clone();
    let mut peer = Peer::new(1_000_000, 1_000_000, 0.0, HashSet::new());
    peer.full.insert(slow.clone());
    let peer = Arc::new(peer);
    // Under what a debug build sends here, so the ceiling, not the machine,
    // sets the pace.
    let ceiling = 800.0;
    let out = broadcast(
        &peer,
        &ids,
        "slow-client",
        &[
            ("FANOUT_RATE_PER_SECOND", "800"),
            ("FANOUT_THROTTLE_DEADLINE", "2s"),
            ("FANOUT_DEFERRED_PASSES", "1"),
            ("FANOUT_SEND_RETRY_MAX", "500ms"),
            // The continuation's delay: longer than the run goes on after
            // the job (a receive or two), so it is still delayed when the
            // run has ended.
            ("FANOUT_JOB_RETRY_BASE", "5s"),
        ],
    )
    .await;
    let deliveries = peer.deliveries.lock().unwrap().clone();
    assert_eq!(deliveries.len(), ids.len() - 1);
    assert!(!deliveries.contains_key(&slow));
    let report = out.run.report("slow-client");
    assert_eq!(report["deferred"], 1, "{}", out.run.stdout);
    assert_eq!(report["status"], "deferred");
    assert!(
        out.run.stdout.contains("\"deferred_to\":\"continuation\""),
        "{}",
        out.run.stdout
    );
    // The continuation was sent with a delay: hidden at first, then on the
    // queue, listing that one connection with its row key.
    assert_eq!(out.queue, (0, 0), "delayed");
    let mut waiting = Vec::new();
    // Each empty receive waits 1 s: within 20 s of the run's end.
    for _ in 0..20 {
        waiting = support::receive_all(&out.sqs, &out.queue_url).await;
        if !waiting.is_empty() {
            break;
        }
    }
    let [continuation] = &waiting[..] else {
        panic!("{} messages", waiting.len())
    };
    let body: serde_json::Value = serde_json::from_str(&continuation.body).expect("json");
    assert_eq!(body["id"], "slow-client");
    assert_eq!(body["deferrals"], 1);
    assert_eq!(body["deferred"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["deferred"][0]["id"], slow.as_str());
    assert!(body["deferred"][0]["key"].is_array(), "{body}");
    // The rest ran at the full rate: the span of the other clients'
    // deliveries is that of the ceiling, within 10 %. On a loaded machine,
    // at least not held up for the slow one's throttle deadline (2 s of the
    // 3.75 s the others take at the ceiling).
    let rate = (ids.len() - 1) as f64 / peer.span();
    println!("kind=throttle case=slow_client ceiling_per_s={ceiling} rate_per_s={rate:.0}");
    assert!(
        rate <= 1.25 * ceiling,
        "the others were sent at {rate:.0}/s"
    );
    if support::timing_targets() {
        assert!(rate >= 0.9 * ceiling, "the others were sent at {rate:.0}/s");
    }
}
