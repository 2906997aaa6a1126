//! The lean send path with short-lived credentials from a container
//! credentials endpoint, through the SDK's own provider chain
//! (`AWS_CONTAINER_CREDENTIALS_FULL_URI` at a 127.0.0.1 stand-in, which the
//! SDK accepts for plain HTTP as it accepts ECS's and EKS's addresses).
//! Each fetch hands out a new key that expires `LIFETIME` later. A local
//! endpoint checks every POST's signature against the key it names, and
//! that the key was valid when the request was signed.
//!
//! One test in this binary: it sets the process's credential variables.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_types::date_time::{DateTime, Format};
use bytes::Bytes;
use fanout_aws::LeanSender;
use fanout_core::connection::ConnectionId;
use fanout_core::gateway::{Gateway, PostOutcome};
use fanout_testkit::support::loopback_listener;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Shorter than the 70 s of the case this guards, so that the test sees
/// rotations in half a minute; the schedule is the same (half the
/// remaining lifetime, at least 10 s).
const LIFETIME: Duration = Duration::from_secs(24);
const RUN: Duration = Duration::from_secs(28);
const POSTS_PER_SECOND: u64 = 20;

/// A key the credentials endpoint handed out.
#[derive(Clone, Debug)]
struct Issued {
    secret: String,
    token: String,
    issued: SystemTime,
    expiry: SystemTime,
}

type Keys = Arc<Mutex<HashMap<String, Issued>>>;

/// Reads one request off `socket`: head lines and body; `None` at the end.
async fn read_request(socket: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(Vec<String>, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let lines: Vec<String> = head.lines().map(str::to_owned).collect();
            let length: usize = lines
                .iter()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let body = buf[end + 4..end + 4 + length].to_vec();
                buf.drain(..end + 4 + length);
                return Some((lines, body));
            }
        }
        let mut chunk = [0u8; 8192];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn header<'a>(lines: &'a [String], name: &str) -> Option<&'a str> {
    lines.iter().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The container credentials stand-in: a new key per call.
async fn credentials_endpoint(keys: Keys) -> String {
    let (listener, addr) = loopback_listener().await;
    let url = format!("http://{addr}/v2/credentials/task");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let keys = keys.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while read_request(&mut socket, &mut buf).await.is_some() {
                    let issued = SystemTime::now();
                    let expiry = issued + LIFETIME;
                    let body = {
                        let mut keys = keys.lock().unwrap();
                        let n = keys.len();
                        let key = format!("ASIAROTATING{n:04}");
                        let entry = Issued {
                            secret: format!("secret-{n}"),
                            token: format!("token-{n}"),
                            issued,
                            expiry,
                        };
                        let body = serde_json::json!({
                            "AccessKeyId": key,
                            "SecretAccessKey": entry.secret,
                            "Token": entry.token,
                            "Expiration": DateTime::from(expiry).fmt(Format::DateTime).unwrap(),
                        })
                        .to_string();
                        keys.insert(key, entry);
                        body
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if socket.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// What the @connections stand-in found wrong, one line per request.
type Problems = Arc<Mutex<Vec<String>>>;

/// Checks one signed POST; `Err` says what is wrong with it.
fn verify(lines: &[String], body: &[u8], host: &str, keys: &Keys) -> Result<(), String> {
    let path = lines[0].split(' ').nth(1).ok_or("no path")?;
    let authorization = header(lines, "authorization").ok_or("unsigned")?;
    let amz_date = header(lines, "x-amz-date").ok_or("no x-amz-date")?;
    let key = authorization
        .split("Credential=")
        .nth(1)
        .and_then(|c| c.split('/').next())
        .ok_or("no credential")?;
    let issued = keys
        .lock()
        .unwrap()
        .get(key)
        .cloned()
        .ok_or(format!("unknown key {key}"))?;
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &amz_date[..4],
        &amz_date[4..6],
        &amz_date[6..8],
        &amz_date[9..11],
        &amz_date[11..13],
        &amz_date[13..15]
    );
    let signed_at =
        SystemTime::try_from(DateTime::from_str(&rfc3339, Format::DateTime).unwrap()).unwrap();
    // x-amz-date has whole seconds.
    let issued_second =
        SystemTime::try_from(DateTime::from_secs(DateTime::from(issued.issued).secs())).unwrap();
    if signed_at < issued_second || signed_at >= issued.expiry {
        return Err(format!(
            "{key} signed at {amz_date}, valid {:?}..{:?}",
            issued.issued, issued.expiry
        ));
    }
    if header(lines, "x-amz-security-token") != Some(issued.token.as_str()) {
        return Err(format!("{key} with another session token"));
    }
    let identity = Identity::from(Credentials::new(
        key,
        &issued.secret,
        Some(issued.token.clone()),
        None,
        "t",
    ));
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region("eu-west-1")
        .name("execute-api")
        .time(signed_at)
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let uri = format!("http://{host}{path}");
    let signable = SignableRequest::new(
        "POST",
        &uri,
        [("host", host)].into_iter(),
        SignableBody::Bytes(body),
    )
    .unwrap();
    let (_, expected) = sign(signable, &params).unwrap().into_parts();
    let got = authorization
        .rsplit("Signature=")
        .next()
        .unwrap_or_default();
    if got != expected {
        return Err(format!("{key}: signature {got} is not {expected}"));
    }
    Ok(())
}

/// The @connections stand-in: 200 for a request that verifies, 403 else.
async fn connections_endpoint(keys: Keys, problems: Problems) -> String {
    let (listener, addr) = loopback_listener().await;
    let host = addr.to_string();
    let endpoint = format!("http://{host}/prod");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (keys, problems, host) = (keys.clone(), problems.clone(), host.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((lines, body)) = read_request(&mut socket, &mut buf).await {
                    let status = match verify(&lines, &body, &host, &keys) {
                        Ok(()) => "200 OK",
                        Err(problem) => {
                            problems.lock().unwrap().push(problem);
                            "403 Forbidden"
                        }
                    };
                    let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                    if socket.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    endpoint
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_container_credentials_are_fetched_about_once_per_half_lifetime() {
    let keys = Keys::default();
    let problems = Problems::default();
    let credentials_url = credentials_endpoint(keys.clone()).await;
    let endpoint = connections_endpoint(keys.clone(), problems.clone()).await;

    // SAFETY: the only test of this binary, before any thread reads them.
    unsafe {
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        ] {
            std::env::remove_var(var);
        }
        std::env::set_var("AWS_CONTAINER_CREDENTIALS_FULL_URI", &credentials_url);
        std::env::set_var("AWS_REGION", "eu-west-1");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::set_var("AWS_CONFIG_FILE", "/nonexistent/fanout-test-config");
        std::env::set_var(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/fanout-test-credentials",
        );
    }
    let config = fanout_aws::clients::load_sdk_config().await;
    let sender = LeanSender::new(&config, &endpoint, Duration::from_secs(5), 16).unwrap();

    let payload = Bytes::from_static(br#"{"message":"hello"}"#);
    let start = std::time::Instant::now();
    let mut interval = tokio::time::interval(Duration::from_millis(1000 / POSTS_PER_SECOND));
    let mut posts = 0;
    while start.elapsed() < RUN {
        interval.tick().await;
        let outcome = sender
            .post(&ConnectionId::from(format!("c{posts}")), payload.clone())
            .await;
        assert!(
            matches!(outcome, PostOutcome::Delivered),
            "post {posts}: {outcome:?}; {:?}",
            problems.lock().unwrap()
        );
        posts += 1;
    }
    let problems = problems.lock().unwrap().clone();
    assert!(problems.is_empty(), "{problems:?}");
    let fetches = keys.lock().unwrap().len();
    println!("{posts} posts over {RUN:?}, {fetches} credential fetches");
    // At 0, 12 and 24 s: rotations happened, and never one per send or per
    // 10 s.
    let most = (RUN.as_secs() / 10 + 1) as usize;
    assert!(
        (2..=most).contains(&fetches),
        "{fetches} fetches for {posts} posts"
    );
}
