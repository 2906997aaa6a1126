//! [`Gateway`] on a lean signed path: `POST {endpoint}/@connections/{id}`
//! over keep-alive HTTP/1.1 connections ([`pool`]), signed with `aws-sigv4`
//! and the SDK's own credentials provider ([`sigv4`]).
//!
//! Most of the CPU of the SDK's PostToConnection is its orchestrator
//! (interceptors, config bags, retry and identity layers) and a payload copy
//! per call (BENCHMARKS.md has the figures). This path keeps the wire format and
//! the signature the SDK would produce, with none of that: the payload is one
//! shared `Bytes` buffer, what the signatures of one second share is computed
//! once, credentials are cached until shortly before they expire, and each
//! send drives its own connection. The answers are classified by the same
//! table as the SDK path ([`super::status`]).

mod flatten;
mod pool;
mod sigv4;

use std::sync::Arc;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_credential_types::provider::SharedCredentialsProvider;
use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::{Method, Uri};
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use fanout_core::connection::ConnectionId;
use fanout_core::gateway::{Gateway, PostOutcome, status};
use pool::Pool;
use sigv4::{SignError, Signer};

use crate::clients::CONNECT_TIMEOUT;
use crate::endpoint::PlainHttp;
use crate::trust::{BadCaFile, GatewayTrust, PrivateCa};

/// Idle pooled connections are closed after this. API Gateway closes idle
/// keep-alive connections on its own after about a minute or more; closing
/// first avoids sending on a connection the other side is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// An error answer's body is read up to this for the report; @connections
/// error bodies are a short JSON message.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// Characters kept as they are in a path label, as the SDK encodes it
/// (RFC 3986 unreserved): connection ids such as `L0SM9cOFvHcCIhw=` have
/// their `=` (and any `/` or `+`) percent-encoded.
const LABEL: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, thiserror::Error)]
pub enum LeanError {
    #[error(transparent)]
    BadEndpoint(#[from] crate::endpoint::BadEndpoint),
    #[error("no AWS region for signing; set AWS_REGION")]
    NoRegion,
    #[error(
        "no AWS credentials provider in the SDK config; load it with fanout_aws::clients::load_sdk_config"
    )]
    NoCredentialsProvider,
    #[error("no trusted root certificates for HTTPS ({0}); install the ca-certificates package")]
    NoRootCertificates(String),
    #[error("the TLS setup failed: {0}")]
    Tls(String),
    #[error(transparent)]
    BadCaFile(#[from] BadCaFile),
}

/// The parts of the endpoint every request is built from.
#[derive(Debug)]
struct Endpoint {
    /// `https://host[:port]`, the port only when it is not the default.
    origin: Uri,
    /// `/stage` (or deeper), without a trailing slash.
    base_path: String,
    /// The `host` header value, as SigV4 signs it: the default port left out.
    host: HeaderValue,
}

impl Endpoint {
    fn parse(endpoint: &str, plain_http: PlainHttp) -> Result<Self, LeanError> {
        let bad = || crate::endpoint::BadEndpoint::NotAUrl {
            endpoint: endpoint.to_owned(),
        };
        let url = crate::endpoint::parse_endpoint(endpoint, plain_http)?;
        let host = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => return Err(bad().into()),
        };
        Ok(Self {
            origin: format!("{}://{host}", url.scheme())
                .parse()
                .map_err(|_| bad())?,
            base_path: url.path().trim_end_matches('/').to_owned(),
            host: HeaderValue::from_str(&host).map_err(|_| bad())?,
        })
    }

    fn is_https(&self) -> bool {
        self.origin.scheme() == Some(&http::uri::Scheme::HTTPS)
    }

    /// The path of one connection's `@connections` resource: the request
    /// target, in origin form. Built to its exact length: the URI takes the
    /// string's buffer as it is, where a spare byte would cost it another
    /// allocation.
    fn connection_path(&self, id: &ConnectionId) -> String {
        const RESOURCE: &str = "/@connections/";
        let id = utf8_percent_encode(id.as_str(), LABEL);
        let length =
            self.base_path.len() + RESOURCE.len() + id.clone().map(str::len).sum::<usize>();
        let mut path = String::with_capacity(length);
        path.push_str(&self.base_path);
        path.push_str(RESOURCE);
        path.extend(id);
        path
    }
}

/// Sends with a signed POST over pooled keep-alive connections. Cheap to share:
/// clone the `Arc` it is usually held in.
#[derive(Clone, Debug)]
pub struct LeanSender {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: Pool,
    endpoint: Endpoint,
    signer: Signer,
    /// One attempt, from the first byte sent to the last byte of the answer.
    attempt_timeout: Duration,
}

impl LeanSender {
    /// A sender with the region and credentials provider of `config` (as
    /// loaded by [`crate::clients::load_sdk_config`], so ECS task role and other
    /// temporary credentials are refreshed). `endpoint` includes the stage.
    /// `max_in_flight` sizes the pool of idle keep-alive connections.
    /// Plain HTTP only to a loopback host, the system's roots only.
    pub fn new(
        config: &SdkConfig,
        endpoint: &str,
        attempt_timeout: Duration,
        max_in_flight: usize,
    ) -> Result<Self, LeanError> {
        Self::trusting(
            config,
            endpoint,
            &GatewayTrust::default(),
            attempt_timeout,
            max_in_flight,
        )
    }

    /// As [`LeanSender::new`], reaching the endpoint as `trust` allows.
    pub fn trusting(
        config: &SdkConfig,
        endpoint: &str,
        trust: &GatewayTrust,
        attempt_timeout: Duration,
        max_in_flight: usize,
    ) -> Result<Self, LeanError> {
        let region = config.region().ok_or(LeanError::NoRegion)?.to_string();
        let provider = config
            .credentials_provider()
            .ok_or(LeanError::NoCredentialsProvider)?;
        Self::with_credentials(
            provider,
            region,
            endpoint,
            trust,
            attempt_timeout,
            max_in_flight,
        )
    }

    /// As [`LeanSender::trusting`], with an explicit credentials provider
    /// and region.
    pub fn with_credentials(
        provider: SharedCredentialsProvider,
        region: String,
        endpoint: &str,
        trust: &GatewayTrust,
        attempt_timeout: Duration,
        max_in_flight: usize,
    ) -> Result<Self, LeanError> {
        let plain_http = if trust.allow_plain_http {
            PlainHttp::Allowed
        } else {
            PlainHttp::LoopbackOnly
        };
        let endpoint = Endpoint::parse(endpoint, plain_http)?;
        let ca = trust.ca_file.as_deref().map(PrivateCa::load).transpose()?;
        let pool = Pool::new(
            connector(endpoint.is_https(), ca.as_ref())?,
            endpoint.origin.clone(),
            max_in_flight,
            POOL_IDLE_TIMEOUT,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                endpoint,
                signer: Signer::new(provider, region),
                attempt_timeout,
            }),
        })
    }
}

/// TCP with `TCP_NODELAY`, then TLS by rustls with ring and the system's
/// roots (plus a private CA's, for this client alone); HTTP/1.1 only (one
/// request per connection at a time, as API Gateway serves them).
fn connector(
    https: bool,
    ca: Option<&PrivateCa>,
) -> Result<HttpsConnector<HttpConnector>, LeanError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| LeanError::Tls(e.to_string()))?;
    let tls = if https {
        let roots = crate::trust::gateway_roots(ca);
        if roots.is_empty() {
            return Err(LeanError::NoRootCertificates(
                "none found in the system's store".into(),
            ));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        // Plain HTTP (a local endpoint) needs no roots; a container without
        // CA certificates must still be able to use one.
        builder
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
    };

    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    Ok(HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp))
}

impl Gateway for LeanSender {
    async fn post(&self, id: &ConnectionId, payload: Bytes) -> PostOutcome {
        let inner = &self.inner;
        match tokio::time::timeout(inner.attempt_timeout, inner.attempt(id, payload)).await {
            Ok(outcome) => outcome,
            Err(_) => PostOutcome::Transient(format!(
                "PostToConnection timed out after {:?}",
                inner.attempt_timeout
            )),
        }
    }
}

impl Inner {
    async fn attempt(&self, id: &ConnectionId, payload: Bytes) -> PostOutcome {
        let path = self.endpoint.connection_path(id);
        let uri = match Uri::try_from(path) {
            Ok(uri) => uri,
            Err(e) => {
                return PostOutcome::Rejected(format!(
                    "connection id {id:?} does not make a valid request URI: {e}"
                ));
            }
        };
        // A clone of `Bytes` shares the buffer: no copy per connection.
        let mut request = http::Request::new(Full::new(payload.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        *headers = self.pool.header_map();
        headers.insert(HOST, self.endpoint.host.clone());
        if let Err(e) = self
            .signer
            .sign(&mut request, &self.endpoint.origin, &payload)
            .await
        {
            return match e {
                SignError::NoCredentials(_) => status::forbidden(e.to_string()),
                SignError::Provider(_) => PostOutcome::Transient(e.to_string()),
                SignError::Signing(_) => PostOutcome::Rejected(e.to_string()),
            };
        }

        let answer = match self.pool.send(request, MAX_ERROR_BODY).await {
            Ok(answer) => answer,
            Err(e) => return PostOutcome::Transient(format!("PostToConnection failed: {e}")),
        };
        let code = answer.status.as_u16();
        let outcome = status::outcome(code, || {
            let error_type = answer
                .headers
                .get("x-amzn-errortype")
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(':').next().unwrap_or(v));
            describe_answer(code, error_type, &answer.body)
        });
        self.pool.recycle(answer.headers);
        outcome
    }
}

/// "API Gateway answered HTTP 403 (ForbiddenException: Forbidden)", as the
/// SDK path words it.
fn describe_answer(code: u16, error_type: Option<&str>, body: &[u8]) -> String {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("message")
                .or_else(|| v.get("Message"))
                .and_then(|m| m.as_str().map(str::to_owned))
        });
    format!(
        "API Gateway answered HTTP {code} ({}: {})",
        error_type.unwrap_or("no error code"),
        message.as_deref().unwrap_or("no message")
    )
}

/// The error and its sources on one line.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_keep_their_stage_and_drop_default_ports() {
        let e = Endpoint::parse(
            "https://abc.execute-api.eu-west-1.amazonaws.com:443/prod/",
            PlainHttp::LoopbackOnly,
        )
        .unwrap();
        assert_eq!(e.origin, "https://abc.execute-api.eu-west-1.amazonaws.com/");
        assert_eq!(e.base_path, "/prod");
        assert_eq!(e.host, "abc.execute-api.eu-west-1.amazonaws.com");
        assert!(e.is_https());

        let e = Endpoint::parse("http://127.0.0.1:5322/local", PlainHttp::LoopbackOnly).unwrap();
        assert_eq!(e.origin, "http://127.0.0.1:5322/");
        assert_eq!(e.host, "127.0.0.1:5322");
        assert!(!e.is_https());
    }

    #[test]
    fn endpoints_without_a_stage_or_scheme_are_refused() {
        for bad in [
            "https://abc.execute-api.eu-west-1.amazonaws.com",
            "https://abc.execute-api.eu-west-1.amazonaws.com/",
            "abc.execute-api.eu-west-1.amazonaws.com/prod",
            "ftp://abc/prod",
            "https://abc/prod?x=1",
        ] {
            assert!(Endpoint::parse(bad, PlainHttp::Allowed).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_are_percent_encoded_as_path_labels() {
        let e = Endpoint::parse("https://abc.example/prod", PlainHttp::LoopbackOnly).unwrap();
        assert_eq!(
            e.connection_path(&ConnectionId::from("L0SM9cOFvHcCIhw=")),
            "/prod/@connections/L0SM9cOFvHcCIhw%3D"
        );
        assert_eq!(
            e.connection_path(&ConnectionId::from("a/b+c d-e_f.g~h")),
            "/prod/@connections/a%2Fb%2Bc%20d-e_f.g~h"
        );
        let path = e.connection_path(&ConnectionId::from("é=1"));
        assert_eq!(path, "/prod/@connections/%C3%A9%3D1");
        assert_eq!(path.capacity(), path.len());
    }

    #[test]
    fn error_answers_are_described_like_the_sdk_path() {
        assert_eq!(
            describe_answer(
                403,
                Some("ForbiddenException"),
                br#"{"message":"Forbidden"}"#
            ),
            "API Gateway answered HTTP 403 (ForbiddenException: Forbidden)"
        );
        assert_eq!(
            describe_answer(502, None, b"<html>Bad Gateway</html>"),
            "API Gateway answered HTTP 502 (no error code: no message)"
        );
    }

    /// No secret in the `Debug` of the sender or of the selected path, once
    /// the signer has cached credentials, a signing key and a signature's
    /// parts: the secret key, the session token and the derived key (valid
    /// for a day) stay out.
    #[tokio::test]
    async fn debug_output_of_the_senders_holds_no_secret() {
        use aws_credential_types::Credentials;
        use aws_sigv4::sign::v4;

        const SECRET: &str = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY";
        const TOKEN: &str = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN";
        let provider = SharedCredentialsProvider::new(Credentials::new(
            "AKIDEXAMPLE",
            SECRET,
            Some(TOKEN.into()),
            None,
            "test",
        ));
        // Nothing listens on port 1: the post is signed, then fails to
        // connect.
        let sender = LeanSender::with_credentials(
            provider,
            "eu-west-1".into(),
            "http://127.0.0.1:1/prod",
            &GatewayTrust::default(),
            Duration::from_secs(2),
            4,
        )
        .unwrap();
        let outcome = sender
            .post(&ConnectionId::from("a"), Bytes::from_static(b"hello"))
            .await;
        assert!(matches!(outcome, PostOutcome::Transient(_)), "{outcome:?}");
        let selected = crate::select::SelectedSender::Lean(sender.clone());
        let text = format!("{sender:?} {sender:#?} {selected:?} {selected:#?}");

        let key = v4::generate_signing_key(
            SECRET,
            std::time::SystemTime::now(),
            "eu-west-1",
            "execute-api",
        );
        let key = key.as_ref();
        let bytes = format!("{:?}", &key[..4]);
        for shown in [
            SECRET.to_owned(),
            TOKEN.to_owned(),
            hex::encode(key),
            bytes.trim_matches(['[', ']']).to_owned(),
        ] {
            assert!(!text.contains(&shown), "{shown} in {text}");
        }
    }
}
