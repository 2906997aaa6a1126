//! Both send paths end to end against the local API Gateway stand-in (which
//! checks SigV4 for execute-api), real WebSocket clients and the DynamoDB
//! emulator: single posts, and whole broadcasts through the engine with the
//! real DynamoStore, gone rows removed.
//!
//! Needs `AWS_ENDPOINT_URL_DYNAMODB` (dynalite): `./scripts/test.sh` sets it.

use fanout_testkit::local_support;
use fanout_testkit::support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanout_aws::ApiGatewaySender;
use fanout_aws::LeanSender;
use fanout_aws::SelectedSender;
use fanout_aws::{DynamoStore, TableSettings};
use fanout_core::Backoff;
use fanout_core::budget::SendBudget;
use fanout_core::connection::ConnectionId;
use fanout_core::engine::{Engine, EngineSettings};
use fanout_core::gateway::{Gateway, PostOutcome};
use fanout_core::job::{Job, Target};
use fanout_core::telemetry::Metrics;
use local_support::{Socket, TestGateway, next_frame};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug)]
enum Path {
    Sdk,
    Lean,
}

async fn sender(path: Path, gw: &TestGateway) -> SelectedSender {
    let config = support::test_config_loader().load().await;
    let endpoint = format!("http://{}/{}", gw.addr, gw.stage);
    match path {
        Path::Sdk => SelectedSender::Sdk(ApiGatewaySender::new(
            fanout_aws::clients::apigw_client(&config, &endpoint, TIMEOUT).expect("endpoint"),
        )),
        Path::Lean => SelectedSender::Lean(
            LeanSender::new(&config, &endpoint, TIMEOUT, 16).expect("endpoint"),
        ),
    }
}

#[tokio::test]
async fn lean_posts_text_and_binary_to_any_id_and_learns_gone() {
    let gw = TestGateway::start(|_| {}).await;
    let lean = sender(Path::Lean, &gw).await;
    // Ids may hold '+', '/' and '=': twenty clients make it near certain
    // that their percent-encoding (and its signature) is exercised.
    for n in 0..20 {
        let (mut socket, id) = gw.connect(None).await;
        let id = ConnectionId::from(id);
        let text = format!("héllo {n}");
        let outcome = lean.post(&id, Bytes::from(text.clone())).await;
        assert_eq!(outcome, PostOutcome::Delivered, "{id}");
        assert_eq!(next_frame(&mut socket).await, Message::text(text));
        let binary = Bytes::from(vec![0xff, 0x00, n as u8, 0xfe]);
        assert_eq!(lean.post(&id, binary.clone()).await, PostOutcome::Delivered);
        assert_eq!(
            next_frame(&mut socket).await,
            Message::binary(binary.to_vec())
        );
    }
    let unknown = ConnectionId::from("L0SM9cOFvHcCIhw=");
    assert_eq!(
        lean.post(&unknown, Bytes::from_static(b"x")).await,
        PostOutcome::Gone
    );
    let too_large = Bytes::from(vec![b'x'; 128 * 1024 + 1]);
    let (_socket, id) = gw.connect(None).await;
    assert_eq!(
        lean.post(&ConnectionId::from(id), too_large).await,
        PostOutcome::PayloadTooLarge
    );
}

/// Opens `live + dead` clients; closes the dead ones (their rows stay, as
/// with a lost `$disconnect`). Returns the live sockets with their ids, and
/// the dead ids.
async fn audience(
    gw: &TestGateway,
    live: usize,
    dead: usize,
) -> (Vec<(Socket, String)>, Vec<String>) {
    let mut sockets = Vec::new();
    for _ in 0..live {
        sockets.push(gw.connect(None).await);
    }
    let mut gone = Vec::new();
    for _ in 0..dead {
        let (mut socket, id) = gw.connect(None).await;
        socket.close(None).await.expect("close");
        gone.push(id);
    }
    (sockets, gone)
}

#[tokio::test]
async fn a_broadcast_reaches_every_live_client_and_removes_the_gone_rows_on_both_paths() {
    for path in [Path::Sdk, Path::Lean] {
        let gw = TestGateway::start(|a| a.keep_stale = true).await;
        let (mut live, gone) = audience(&gw, 12, 4).await;
        // The closed sockets must be gone at the gateway before the
        // broadcast, or they would count as delivered.
        let probe = sender(path, &gw).await;
        for id in &gone {
            local_support::eventually("a closed socket answers 410", || async {
                probe
                    .post(&ConnectionId::from(id.as_str()), Bytes::from_static(b"p"))
                    .await
                    == PostOutcome::Gone
            })
            .await;
        }

        let store = DynamoStore::connect(
            gw.dynamo.clone(),
            TableSettings {
                table: gw.table.clone(),
                key_attribute: "connectionId".into(),
                channel_index: None,
                channel_attribute: "channel".into(),
                audiences: Vec::new(),
                connection_index: None,
                page_size: 5,
                expiry: None,
            },
        )
        .await
        .expect("the gateway's table");
        let engine = Engine::new(
            Arc::new(store),
            Arc::new(sender(path, &gw).await),
            Arc::new(SendBudget::new(None, 8)),
            EngineSettings {
                send_backoff: Backoff {
                    base: Duration::from_millis(10),
                    max: Duration::from_millis(100),
                    max_attempts: 3,
                },
                throttle_deadline: Duration::from_secs(60),
                deferred_passes: 3,
                pass_pause: Duration::from_millis(100),
                max_in_flight: 8,
                scan_segments: 1,
                progress_interval: Duration::from_secs(3600),
                // The stand-in completes `$connect` at once.
                connect_window: Duration::from_millis(200),
            },
            Arc::new(Metrics::default()),
        );
        let job = Job::new("e2e", Bytes::from_static(b"to everyone"), Target::All);
        let (report, result) = engine.run(&job, &CancellationToken::new()).await;
        result.unwrap_or_else(|e| panic!("{path:?}: {e}"));
        // Read without a start, a gone connection may still be connecting:
        // its row goes on a second 410, after the connect window.
        assert_eq!(
            (
                report.delivered,
                report.gone,
                report.rechecking,
                report.failed
            ),
            (12, 4, 4, 0),
            "{path:?}: {report:?}"
        );
        for (socket, id) in &mut live {
            assert_eq!(
                next_frame(socket).await,
                Message::text("to everyone"),
                "{path:?}: {id}"
            );
        }
        for id in &gone {
            local_support::eventually("a gone row goes on its recheck", || async {
                gw.row(id).await.is_none()
            })
            .await;
        }
        for (_, id) in &live {
            assert!(
                gw.row(id).await.is_some(),
                "{path:?}: the row of live {id} went"
            );
        }
        for (mut socket, _) in live {
            let _ = socket.close(None).await;
        }
    }
}
