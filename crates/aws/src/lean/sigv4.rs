//! SigV4 for the lean send path: credentials from the SDK's own provider,
//! kept for half their remaining lifetime (and at least 10 s), and everything the signatures of
//! one second share (payload hash, date, scope, the keyed HMAC, header
//! values) prepared once, so a send hashes only its own path.
//!
//! `aws-sigv4`'s `sign` derives the key (four HMACs) and builds a general
//! canonical request for every call, formatting and allocating as it goes:
//! more CPU than the rest of a send. A PostToConnection request is always
//! the same shape (POST, no query, the `host` header alone), so its
//! canonical request is hashed here directly, with the SDK's own path
//! encoding, and signed with the same HMAC-SHA256, both ring's: its
//! assembly uses SHA-NI where the CPU has it and AVX otherwise, where the
//! `sha2` crate falls back to plain Rust (many EC2 and Fargate hosts lack
//! SHA-NI). Paths that SigV4 would
//! normalise (dot segments, `//`) go through `aws-sigv4`'s `sign` instead.
//! Tests check both against `sign` byte for byte.
//!
//! The SDK caches identities in its client's orchestrator, not in the
//! provider: calling an ECS or IMDS provider directly would fetch credentials
//! over HTTP on every send, so this module caches them itself.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_types::date_time::{DateTime, Format};
use bytes::{Bytes, BytesMut};
use http::Uri;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, HOST, HeaderName, HeaderValue};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use ring::{digest, hmac};
use sha2::{Digest, Sha256};

use super::error_chain;

/// API Gateway's signing name for `@connections`.
const SIGNING_NAME: &str = "execute-api";

/// What SigV4 percent-encodes in a canonical path, as the SDK does it
/// (`aws_smithy_http::label::fmt_string` with its greedy strategy: all but
/// the unreserved characters and `/`). Fed to the hash chunk by chunk, the
/// encoded path is never built as a string; a test checks every character
/// against the SDK's.
const GREEDY: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b':')
    .add(b',')
    .add(b'?')
    .add(b'#')
    .add(b'[')
    .add(b']')
    .add(b'{')
    .add(b'}')
    .add(b'|')
    .add(b'@')
    .add(b'!')
    .add(b'$')
    .add(b'&')
    .add(b'\'')
    .add(b'(')
    .add(b')')
    .add(b'*')
    .add(b'+')
    .add(b';')
    .add(b'=')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'"')
    .add(b'^')
    .add(b'`')
    .add(b'\\');

/// Credentials are fetched again no sooner than this after the last fetch,
/// whatever their lifetime: on ECS the agent's credentials endpoint is
/// rate-limited, and a provider that hands out credentials about to expire
/// must not be called for every send. After a failed refresh, while the old
/// credentials still hold, the next one is tried no sooner than this either.
const MIN_FETCH_INTERVAL: Duration = Duration::from_secs(10);

/// When credentials fetched at `now` and expiring at `expiry` are replaced:
/// at half their remaining lifetime, as the SDK's identity cache does for
/// short-lived ones, so that they are replaced well before they expire
/// however long they live (70 s from a rotating endpoint, hours on ECS), and
/// no sooner than [`MIN_FETCH_INTERVAL`].
fn refresh_time(now: SystemTime, expiry: SystemTime) -> SystemTime {
    let remaining = expiry.duration_since(now).unwrap_or_default();
    now + (remaining / 2).max(MIN_FETCH_INTERVAL)
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(
        "no AWS credentials for signing PostToConnection ({0}); give the task a role or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    )]
    NoCredentials(String),
    #[error("the credentials provider failed ({0}); it is retried on the next send")]
    Provider(String),
    #[error("could not sign the request ({0}); the connection id or endpoint is not a valid URI")]
    Signing(String),
}

/// Payloads whose hash is kept at most: more than the jobs a worker runs at
/// once. Past it the oldest is dropped (and hashed again if it comes back).
const MAX_PAYLOADS: usize = 256;

/// Signs PostToConnection requests for one region.
pub struct Signer {
    credentials: CredentialsCache,
    region: String,
    /// The payloads of the jobs being sent, each hashed once. Concurrent
    /// jobs interleave their sends, so one entry would be re-hashed (up to
    /// 128 KiB) on almost every send.
    payloads: Mutex<Vec<Payload>>,
    /// The signing key of the current day and credentials.
    signing_key: Mutex<Option<SigningKey>>,
    /// Payloads hashed so far, to test that a payload is hashed once.
    #[cfg(test)]
    hashed: std::sync::atomic::AtomicUsize,
}

/// One payload, its SHA-256 in hex, and its signatures' shared parts.
/// Holding the `Bytes` keeps its buffer alive, so a payload at the same
/// address and length is this very payload (`Bytes` are immutable), never a
/// new one reusing freed memory; once this is its only holder, its job has
/// ended and the entry can go.
struct Payload {
    bytes: Bytes,
    hash: String,
    /// What the signatures of the current second share, for this payload.
    prepared: Option<Arc<Prepared>>,
}

/// Everything a PostToConnection signature shares with the others of the
/// same second, credentials, payload and host: only the path differs from
/// one send to the next, so a send hashes its path between two prepared
/// byte strings and writes nothing else.
struct Prepared {
    secs: u64,
    /// Held, so that an identity at the same address is this very one
    /// (see [`Payload`]).
    identity: Identity,
    host: HeaderValue,
    amz_date: HeaderValue,
    token: Option<HeaderValue>,
    /// The payload's length: hyper would otherwise format a new header
    /// value for every request.
    content_length: HeaderValue,
    /// The canonical request after the path: empty query, headers, signed
    /// header names, payload hash.
    canonical_tail: Vec<u8>,
    /// HMAC keyed with the day's signing key that has taken in the string
    /// to sign before the canonical request's hash (its first block
    /// compressed once, not once a send).
    mac: hmac::Context,
    /// The `authorization` value before the signature.
    authorization_head: Vec<u8>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("secs", &self.secs)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let payloads = self
            .payloads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("Signer")
            .field("credentials", &self.credentials)
            .field("region", &self.region)
            .field("payloads", &payloads)
            .finish_non_exhaustive()
    }
}

/// Its `Debug` shows the date and the key id alone: the secret, and the
/// derived key (valid for the whole day), stay out of logs.
struct SigningKey {
    /// `YYYYMMDD` (UTC), part of the credential scope.
    date: String,
    access_key_id: String,
    secret_access_key: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("date", &self.date)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

const X_AMZ_DATE: HeaderName = HeaderName::from_static("x-amz-date");
const X_AMZ_SECURITY_TOKEN: HeaderName = HeaderName::from_static("x-amz-security-token");

impl Signer {
    pub fn new(provider: SharedCredentialsProvider, region: String) -> Self {
        Self {
            credentials: CredentialsCache::new(provider),
            region,
            payloads: Mutex::new(Vec::new()),
            signing_key: Mutex::new(None),
            #[cfg(test)]
            hashed: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Adds `x-amz-date`, `authorization` (and `x-amz-security-token` for
    /// temporary credentials) to `request`, whose URI may be in origin form
    /// (a path): `origin` (`scheme://authority`) completes it. The `host`
    /// header must be set, to the origin's authority.
    pub async fn sign<B>(
        &self,
        request: &mut http::Request<B>,
        origin: &Uri,
        payload: &Bytes,
    ) -> Result<(), SignError> {
        let identity = self.credentials.identity().await?;
        let now = SystemTime::now();
        let path = request.uri().path();
        let normalised = path.contains('.') || path.contains("//");
        if !normalised && identity.data::<Credentials>().is_some() {
            return self.sign_post(request, &identity, payload, now);
        }
        let hash = self.payload_hash(payload);
        let uri = format!(
            "{}://{}{}",
            origin.scheme_str().unwrap_or("https"),
            origin.authority().map_or("", |a| a.as_str()),
            request.uri().path_and_query().map_or("/", |p| p.as_str())
        );
        self.sign_general(request, &uri, &identity, hash, now)
    }

    /// `aws-sigv4`'s own signing, for any request.
    fn sign_general<B>(
        &self,
        request: &mut http::Request<B>,
        uri: &str,
        identity: &Identity,
        hash: String,
        now: SystemTime,
    ) -> Result<(), SignError> {
        let params = v4::SigningParams::builder()
            .identity(identity)
            .region(&self.region)
            .name(SIGNING_NAME)
            .time(now)
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| SignError::Signing(e.to_string()))?
            .into();
        let headers = request
            .headers()
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
        let signable = SignableRequest::new(
            request.method().as_str(),
            uri,
            headers,
            SignableBody::Precomputed(hash),
        )
        .map_err(|e| SignError::Signing(e.to_string()))?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| SignError::Signing(e.to_string()))?
            .into_parts();
        instructions.apply_to_request_http1x(request);
        Ok(())
    }

    /// SigV4's `20261127T221500Z` for `secs` since the epoch.
    fn amz_date(secs: u64) -> Result<String, SignError> {
        // RFC 3339 `2026-11-27T22:15:00Z` → `20261127T221500Z`.
        Ok(DateTime::from_secs(secs as i64)
            .fmt(Format::DateTime)
            .map_err(|e| SignError::Signing(e.to_string()))?
            .chars()
            .filter(|c| *c != '-' && *c != ':')
            .collect())
    }

    /// The signature `sign_general` would compute for a POST without query
    /// whose only header is `host`, from the second's [`Prepared`] parts.
    fn sign_post<B>(
        &self,
        request: &mut http::Request<B>,
        identity: &Identity,
        payload: &Bytes,
        now: SystemTime,
    ) -> Result<(), SignError> {
        let bad = |what: &str| SignError::Signing(what.to_owned());
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| bad("the clock is before 1970"))?
            .as_secs();
        let host = request
            .headers()
            .get(HOST)
            .ok_or_else(|| bad("no host header"))?;
        let prepared = self.prepared(secs, identity, payload, host)?;

        let mut canonical = digest::Context::new(&digest::SHA256);
        canonical.update(request.method().as_str().as_bytes());
        canonical.update(b"\n");
        for chunk in utf8_percent_encode(request.uri().path(), GREEDY) {
            canonical.update(chunk.as_bytes());
        }
        canonical.update(&prepared.canonical_tail);
        let mut canonical_hash = [0u8; 64];
        hex_into(canonical.finish().as_ref(), &mut canonical_hash);

        let mut mac = prepared.mac.clone();
        mac.update(&canonical_hash);
        let mut signature = [0u8; 64];
        hex_into(mac.sign().as_ref(), &mut signature);

        let mut authorization =
            BytesMut::with_capacity(prepared.authorization_head.len() + signature.len());
        authorization.extend_from_slice(&prepared.authorization_head);
        authorization.extend_from_slice(&signature);
        let mut authorization = HeaderValue::from_maybe_shared(authorization.freeze())
            .map_err(|e| SignError::Signing(e.to_string()))?;
        authorization.set_sensitive(true);

        let headers = request.headers_mut();
        headers.insert(X_AMZ_DATE, prepared.amz_date.clone());
        if let Some(token) = &prepared.token {
            headers.insert(X_AMZ_SECURITY_TOKEN, token.clone());
        }
        headers.insert(AUTHORIZATION, authorization);
        headers.insert(CONTENT_LENGTH, prepared.content_length.clone());
        Ok(())
    }

    /// The current [`Prepared`] of `payload`, made anew when the second,
    /// the credentials or the host changed.
    fn prepared(
        &self,
        secs: u64,
        identity: &Identity,
        payload: &Bytes,
        host: &HeaderValue,
    ) -> Result<Arc<Prepared>, SignError> {
        self.with_payload(payload, |entry| {
            if let Some(prepared) = entry.prepared.as_ref()
                && prepared.secs == secs
                && same_identity(&prepared.identity, identity)
                && prepared.host == host
            {
                return Ok(prepared.clone());
            }
            let prepared = Arc::new(self.prepare(secs, identity, entry, host)?);
            entry.prepared = Some(prepared.clone());
            Ok(prepared)
        })
    }

    fn prepare(
        &self,
        secs: u64,
        identity: &Identity,
        payload: &Payload,
        host: &HeaderValue,
    ) -> Result<Prepared, SignError> {
        let payload_hash = &payload.hash;
        let bad = |what: &str| SignError::Signing(what.to_owned());
        let credentials = identity
            .data::<Credentials>()
            .ok_or_else(|| bad("the identity holds no AWS credentials"))?;
        let amz_date = Self::amz_date(secs)?;
        let date = amz_date.get(..8).ok_or_else(|| bad("a malformed date"))?;
        let host_text = host
            .to_str()
            .map_err(|_| bad("a host header that is not text"))?;
        let token = credentials.session_token();
        let signed_headers = if token.is_some() {
            "host;x-amz-date;x-amz-security-token"
        } else {
            "host;x-amz-date"
        };
        let mut canonical_tail = format!("\n\nhost:{host_text}\nx-amz-date:{amz_date}\n");
        if let Some(token) = token {
            let _ = writeln!(canonical_tail, "x-amz-security-token:{token}");
        }
        let _ = write!(canonical_tail, "\n{signed_headers}\n{payload_hash}");
        let scope = format!("{date}/{}/{SIGNING_NAME}/aws4_request", self.region);
        let key = self.signing_key(date, credentials, UNIX_EPOCH + Duration::from_secs(secs));
        let value =
            |text: &str| HeaderValue::from_str(text).map_err(|e| SignError::Signing(e.to_string()));
        let token = token
            .map(|token| {
                let mut value = value(token)?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        let mut mac = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &key));
        mac.update(format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n").as_bytes());
        Ok(Prepared {
            secs,
            identity: identity.clone(),
            host: host.clone(),
            amz_date: value(&amz_date)?,
            token,
            content_length: HeaderValue::from(payload.bytes.len()),
            canonical_tail: canonical_tail.into_bytes(),
            mac,
            authorization_head: format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature=",
                credentials.access_key_id()
            )
            .into_bytes(),
        })
    }

    /// The signing key of `date` (`YYYYMMDD`) for `credentials`, derived
    /// once per day and credentials.
    fn signing_key(&self, date: &str, credentials: &Credentials, time: SystemTime) -> Vec<u8> {
        let mut cached = self
            .signing_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(key) = cached.as_ref()
            && key.date == date
            && key.access_key_id == credentials.access_key_id()
            && key.secret_access_key == credentials.secret_access_key()
        {
            return key.key.clone();
        }
        let key = v4::generate_signing_key(
            credentials.secret_access_key(),
            time,
            &self.region,
            SIGNING_NAME,
        )
        .as_ref()
        .to_vec();
        *cached = Some(SigningKey {
            date: date.to_owned(),
            access_key_id: credentials.access_key_id().to_owned(),
            secret_access_key: credentials.secret_access_key().to_owned(),
            key: key.clone(),
        });
        key
    }

    fn payload_hash(&self, payload: &Bytes) -> String {
        self.with_payload(payload, |entry| entry.hash.clone())
    }

    /// Runs `f` on the entry of `payload`, hashing it if it is new.
    fn with_payload<T>(&self, payload: &Bytes, f: impl FnOnce(&mut Payload) -> T) -> T {
        let mut payloads = self.payloads.lock().unwrap_or_else(PoisonError::into_inner);
        let found = payloads
            .iter()
            .position(|p| p.bytes.as_ptr() == payload.as_ptr() && p.bytes.len() == payload.len());
        let index = match found {
            Some(index) => index,
            None => {
                // Payloads of jobs that have ended: only this cache holds
                // them.
                payloads.retain(|p| !p.bytes.is_unique());
                if payloads.len() >= MAX_PAYLOADS {
                    payloads.remove(0);
                }
                #[cfg(test)]
                self.hashed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                payloads.push(Payload {
                    bytes: payload.clone(),
                    hash: hex::encode(Sha256::digest(payload)),
                    prepared: None,
                });
                payloads.len() - 1
            }
        };
        f(&mut payloads[index])
    }
}

/// Whether two identities are the same one: the cache hands out clones of
/// one `Identity` until it refreshes, and a held clone keeps the address
/// from being reused.
fn same_identity(a: &Identity, b: &Identity) -> bool {
    match (a.data::<Credentials>(), b.data::<Credentials>()) {
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

/// Lower-case hex of `bytes` into `out`, twice as long.
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    // Both lengths are fixed by the caller (a SHA-256 and its 64 digits).
    let _ = hex::encode_to_slice(bytes, out);
}

/// Credentials from the provider, reused until [`refresh_time`].
#[derive(Debug)]
struct CredentialsCache {
    provider: SharedCredentialsProvider,
    current: RwLock<Option<Cached>>,
    /// One refresh at a time: the sends that find the credentials stale
    /// wait for it instead of all calling the provider.
    refresh: tokio::sync::Mutex<()>,
}

#[derive(Clone, Debug)]
struct Cached {
    /// Shared: cloning an `Identity` clones its property map, an
    /// allocation a send.
    identity: Arc<Identity>,
    /// When they were fetched: the next fetch waits [`MIN_FETCH_INTERVAL`].
    fetched_at: SystemTime,
    refresh_at: Option<SystemTime>,
}

impl CredentialsCache {
    fn new(provider: SharedCredentialsProvider) -> Self {
        Self {
            provider,
            current: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    async fn identity(&self) -> Result<Arc<Identity>, SignError> {
        self.identity_at(SystemTime::now()).await
    }

    /// The identity to sign with at `now` (a parameter, so tests can move
    /// through the credentials' lifetime).
    async fn identity_at(&self, now: SystemTime) -> Result<Arc<Identity>, SignError> {
        if let Some(identity) = self.fresh(now) {
            return Ok(identity);
        }
        // Boxed: refreshing is rare, and the provider's future would make
        // every send's bigger.
        Box::pin(self.refresh(now)).await
    }

    async fn refresh(&self, now: SystemTime) -> Result<Arc<Identity>, SignError> {
        let _refreshing = self.refresh.lock().await;
        // Another send may have refreshed while this one waited.
        if let Some(identity) = self.fresh(now) {
            return Ok(identity);
        }
        let cached = self.cached();
        if let Some(cached) = &cached
            && now < cached.fetched_at + MIN_FETCH_INTERVAL
        {
            // Expired within the interval: the provider hands out
            // credentials that live under 10 s. Asking again at once would
            // be asking for every send.
            return Err(SignError::Provider(format!(
                "the credentials expired less than {MIN_FETCH_INTERVAL:?} after they were fetched; they are fetched again after that"
            )));
        }
        match self.provider.provide_credentials().await {
            Ok(credentials) => {
                let refresh_at = credentials.expiry().map(|expiry| refresh_time(now, expiry));
                let identity = Arc::new(Identity::from(credentials));
                self.store(Some(Cached {
                    identity: identity.clone(),
                    fetched_at: now,
                    refresh_at,
                }));
                Ok(identity)
            }
            Err(err) => {
                let still_valid = cached.filter(|cached| {
                    cached
                        .identity
                        .expiration()
                        .is_none_or(|expiry| expiry > now)
                });
                if let Some(mut cached) = still_valid {
                    tracing::warn!(error = %error_chain(&err), "credentials refresh failed; the current ones still hold");
                    cached.refresh_at = Some(now + MIN_FETCH_INTERVAL);
                    cached.fetched_at = now;
                    self.store(Some(cached.clone()));
                    return Ok(cached.identity);
                }
                Err(match err {
                    CredentialsError::CredentialsNotLoaded(_)
                    | CredentialsError::InvalidConfiguration(_) => {
                        SignError::NoCredentials(error_chain(&err))
                    }
                    _ => SignError::Provider(error_chain(&err)),
                })
            }
        }
    }

    /// The cached identity, unless it is due for a refresh or has expired.
    fn fresh(&self, now: SystemTime) -> Option<Arc<Identity>> {
        self.cached()
            .filter(|cached| {
                cached.refresh_at.is_none_or(|at| now < at)
                    && cached.identity.expiration().is_none_or(|at| now < at)
            })
            .map(|cached| cached.identity)
    }

    fn cached(&self) -> Option<Cached> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn store(&self, cached: Option<Cached>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = cached;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use aws_credential_types::Credentials;
    use aws_credential_types::provider::future;

    use super::*;

    /// Hands out credentials expiring `lifetime` after its clock (the
    /// test's time), or fails, and counts the calls.
    #[derive(Debug)]
    struct Provider {
        lifetime: Option<Duration>,
        fail: std::sync::atomic::AtomicBool,
        calls: Arc<AtomicUsize>,
        clock: Mutex<SystemTime>,
    }

    impl ProvideCredentials for Provider {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                return future::ProvideCredentials::ready(Err(CredentialsError::provider_error(
                    "provider down",
                )));
            }
            let now = *self.clock.lock().unwrap();
            let expiry = self.lifetime.map(|l| now + l);
            future::ProvideCredentials::ready(Ok(Credentials::new(
                format!("AKID{n}"),
                "secret",
                Some("token".into()),
                expiry,
                "test",
            )))
        }
    }

    impl Provider {
        /// The identity `signer` signs with at `at`, the provider's clock
        /// set to it.
        async fn identity_at(
            &self,
            signer: &Signer,
            at: SystemTime,
        ) -> Result<Arc<Identity>, SignError> {
            *self.clock.lock().unwrap() = at;
            signer.credentials.identity_at(at).await
        }
    }

    fn signer(lifetime: Option<Duration>) -> (Signer, Arc<Provider>) {
        let provider = Arc::new(Provider {
            lifetime,
            fail: false.into(),
            calls: Arc::new(AtomicUsize::new(0)),
            clock: Mutex::new(SystemTime::now()),
        });
        let shared = SharedCredentialsProvider::new(ProviderRef(provider.clone()));
        (Signer::new(shared, "eu-west-1".into()), provider)
    }

    #[derive(Debug)]
    struct ProviderRef(Arc<Provider>);

    impl ProvideCredentials for ProviderRef {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            self.0.provide_credentials()
        }
    }

    const ORIGIN: &str = "https://abc.execute-api.eu-west-1.amazonaws.com";

    fn origin() -> Uri {
        ORIGIN.parse().unwrap()
    }

    fn request() -> http::Request<()> {
        http::Request::post("/prod/@connections/a%3D")
            .header("host", "abc.execute-api.eu-west-1.amazonaws.com")
            .body(())
            .unwrap()
    }

    /// A PostToConnection request signed by `signer`, which must succeed.
    async fn signed(signer: &Signer, payload: &Bytes) -> http::Request<()> {
        let mut request = request();
        signer.sign(&mut request, &origin(), payload).await.unwrap();
        request
    }

    fn header<'a>(request: &'a http::Request<()>, name: &str) -> &'a str {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn long_lived_credentials_are_fetched_once() {
        let (signer, provider) = signer(Some(Duration::from_secs(3600)));
        let payload = Bytes::from_static(b"hello");
        for _ in 0..5 {
            let request = signed(&signer, &payload).await;
            let auth = header(&request, "authorization");
            assert!(
                auth.starts_with("AWS4-HMAC-SHA256 Credential=AKID0/")
                    && auth.contains("/eu-west-1/execute-api/aws4_request")
                    && auth.contains("SignedHeaders=host;x-amz-date;x-amz-security-token"),
                "{auth}"
            );
            assert_eq!(header(&request, "x-amz-security-token"), "token");
            assert!(!header(&request, "x-amz-date").is_empty());
        }
        assert_eq!(provider.calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn credentials_are_replaced_at_half_their_remaining_lifetime_and_not_within_10_s() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_764_281_700);
        let secs = Duration::from_secs;
        for (lifetime, after) in [
            (secs(70), secs(35)),
            (secs(3600), secs(1800)),
            (secs(6 * 3600), secs(3 * 3600)),
            (secs(15), MIN_FETCH_INTERVAL),
            (Duration::ZERO, MIN_FETCH_INTERVAL),
        ] {
            assert_eq!(refresh_time(t0, t0 + lifetime), t0 + after, "{lifetime:?}");
        }
        // Expired on arrival (a skewed clock).
        assert_eq!(refresh_time(t0, t0 - secs(5)), t0 + MIN_FETCH_INTERVAL);
    }

    /// Credentials that live 70 s (as a rotating endpoint hands them out):
    /// 20 sends a second for five minutes fetch them about once per 35 s,
    /// every send signs with credentials valid at that time, and each
    /// rotation's new key is used from the send that fetched it.
    #[tokio::test]
    async fn short_lived_credentials_are_fetched_once_per_half_lifetime_not_per_send() {
        let lifetime = Duration::from_secs(70);
        let (signer, provider) = signer(Some(lifetime));
        let t0 = SystemTime::now();
        let mut keys = Vec::new();
        for tick in 0..20 * 300 {
            let at = t0 + Duration::from_millis(50) * tick;
            let identity = provider.identity_at(&signer, at).await.unwrap();
            let expiry = identity.expiration().unwrap();
            assert!(
                at < expiry,
                "signed at {at:?} with credentials expired at {expiry:?}"
            );
            let key = identity
                .data::<Credentials>()
                .unwrap()
                .access_key_id()
                .to_owned();
            if keys.last() != Some(&key) {
                keys.push(key);
            }
        }
        let calls = provider.calls.load(Ordering::SeqCst);
        // 300 s / 35 s, plus the first fetch.
        assert!((8..=10).contains(&calls), "{calls} fetches");
        let expected: Vec<String> = (0..calls).map(|n| format!("AKID{n}")).collect();
        assert_eq!(keys, expected, "each new key used once fetched");
    }

    /// Credentials that live under 10 s are still fetched at most once per
    /// 10 s; between their expiry and the next fetch, signing fails rather
    /// than sign with an expired key.
    #[tokio::test]
    async fn credentials_are_never_fetched_more_than_once_per_10_s() {
        let (signer, provider) = signer(Some(Duration::from_secs(4)));
        let t0 = SystemTime::now();
        for tick in 0..600 {
            let at = t0 + Duration::from_millis(100) * tick;
            match provider.identity_at(&signer, at).await {
                Ok(identity) => assert!(at < identity.expiration().unwrap()),
                Err(e) => assert!(matches!(e, SignError::Provider(_)), "{e}"),
            }
        }
        assert_eq!(
            provider.calls.load(Ordering::SeqCst),
            6,
            "one per 10 s of 60 s"
        );
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_valid_credentials_and_backs_off() {
        let (signer, provider) = signer(Some(Duration::from_secs(70)));
        let t0 = SystemTime::now();
        provider.identity_at(&signer, t0).await.unwrap();
        provider.fail.store(true, Ordering::SeqCst);
        // Due at 35 s: that refresh fails, the next is tried 10 s later.
        for secs in [35, 36, 40, 44] {
            let at = t0 + Duration::from_secs(secs);
            let identity = provider.identity_at(&signer, at).await.unwrap();
            assert_eq!(
                identity.data::<Credentials>().unwrap().access_key_id(),
                "AKID0"
            );
        }
        assert_eq!(provider.calls.load(Ordering::SeqCst), 2);
        provider
            .identity_at(&signer, t0 + Duration::from_secs(45))
            .await
            .unwrap();
        assert_eq!(provider.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_provider_failure_without_credentials_fails_the_signing() {
        let (signer, provider) = signer(None);
        provider.fail.store(true, Ordering::SeqCst);
        let err = signer
            .sign(&mut request(), &origin(), &Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(matches!(err, SignError::Provider(_)), "{err}");
        assert!(err.to_string().contains("provider down"), "{err}");
    }

    /// The shortcut and `aws-sigv4`'s `sign` agree byte for byte, with and
    /// without a session token, for ids the SDK would percent-encode, across
    /// a day boundary and with another secret.
    #[test]
    fn the_post_shortcut_signs_exactly_as_aws_sigv4() {
        let (signer, _) = signer(None);
        let endpoint = ORIGIN;
        let ids = [
            "L0SM9cOFvHcCIhw%3D",
            "a%2Fb%2Bc",
            "conn-1",
            "x~y_z-0",
            "%C3%A9t%C3%A9",
        ];
        let times = [1_764_281_700, 1_764_287_999, 1_764_288_000]
            .map(|secs| UNIX_EPOCH + Duration::from_secs(secs));
        let payload = Bytes::from_static(b"payload");
        let hash = hex::encode(Sha256::digest(&payload));
        for token in [None, Some("IQoJb3JpZ2luX2VjEJr//token+/=")] {
            for secret in ["secret", "another/secret+"] {
                let credentials =
                    Credentials::new("AKIDEXAMPLE", secret, token.map(str::to_owned), None, "t");
                let identity = Identity::from(credentials.clone());
                for id in ids {
                    for now in times {
                        let uri = format!("{endpoint}/prod/@connections/{id}");
                        let build = || {
                            http::Request::post(uri.as_str())
                                .header("host", "abc.execute-api.eu-west-1.amazonaws.com")
                                .body(())
                                .unwrap()
                        };
                        let mut fast = build();
                        signer
                            .sign_post(&mut fast, &identity, &payload, now)
                            .unwrap();
                        let mut general = build();
                        signer
                            .sign_general(&mut general, &uri, &identity, hash.clone(), now)
                            .unwrap();
                        for name in ["authorization", "x-amz-date", "x-amz-security-token"] {
                            assert_eq!(
                                fast.headers().get(name),
                                general.headers().get(name),
                                "{name} for {id} at {now:?} with token {token:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The canonical path is encoded as the SDK encodes it, for every
    /// ASCII character and for characters beyond.
    #[test]
    fn the_path_is_encoded_as_the_sdk_encodes_it() {
        use aws_smithy_http::label::{EncodingStrategy, fmt_string};
        let ascii: String = (0u8..128).map(char::from).collect();
        for path in [
            ascii.as_str(),
            "/prod/@connections/L0SM9cOFvHcCIhw%3D",
            "/é t/ü€😀",
        ] {
            assert_eq!(
                utf8_percent_encode(path, GREEDY).to_string(),
                fmt_string(path, EncodingStrategy::Greedy),
                "{path:?}"
            );
        }
    }

    #[tokio::test]
    async fn paths_sigv4_normalises_take_the_general_signer() {
        let (signer, _) = signer(Some(Duration::from_secs(3600)));
        let mut request = http::Request::post("/prod/@connections/a.b")
            .header("host", "abc.example")
            .body(())
            .unwrap();
        signer
            .sign(
                &mut request,
                &"https://abc.example".parse().unwrap(),
                &Bytes::from_static(b"x"),
            )
            .await
            .unwrap();
        assert!(header(&request, "authorization").contains("Credential=AKID0/"));
    }

    #[test]
    fn the_payload_hash_is_right_for_every_buffer() {
        let (signer, _) = signer(None);
        let a = Bytes::from(b"payload".to_vec());
        let hash = signer.payload_hash(&a);
        assert_eq!(hash, hex::encode(Sha256::digest(b"payload")));
        assert_eq!(signer.payload_hash(&a.clone()), hash);
        // Same content, another buffer: hashed again, same answer.
        let b = Bytes::from(b"payload".to_vec());
        assert_eq!(signer.payload_hash(&b), hash);
        // Another content at the cache's place.
        let c = Bytes::from(b"other".to_vec());
        assert_eq!(
            signer.payload_hash(&c),
            hex::encode(Sha256::digest(b"other"))
        );
    }

    #[tokio::test]
    async fn concurrent_jobs_hash_each_payload_once() {
        let (signer, _) = signer(Some(Duration::from_secs(3600)));
        let signer = Arc::new(signer);
        // Four jobs' payloads, as big as API Gateway takes, their sends
        // interleaved as the engine interleaves them.
        let payloads: Vec<Bytes> = (0..4u8).map(|n| Bytes::from(vec![n; 128 * 1024])).collect();
        let jobs = payloads.iter().cloned().map(|payload| {
            let signer = signer.clone();
            tokio::spawn(async move {
                for _ in 0..25 {
                    signed(&signer, &payload).await;
                    tokio::task::yield_now().await;
                }
            })
        });
        for job in futures::future::join_all(jobs).await {
            job.unwrap();
        }
        assert_eq!(signer.hashed.load(Ordering::Relaxed), payloads.len());
        // And each signature carries its own payload's hash.
        for payload in &payloads {
            let mut general = request();
            let uri = format!("{ORIGIN}/prod/@connections/a%3D");
            let identity = signer.credentials.identity().await.unwrap();
            let now = SystemTime::now();
            let hash = hex::encode(Sha256::digest(payload));
            signer
                .sign_general(&mut general, &uri, &identity, hash, now)
                .unwrap();
            let mut fast = request();
            signer
                .sign_post(&mut fast, &identity, payload, now)
                .unwrap();
            assert_eq!(
                fast.headers().get("authorization"),
                general.headers().get("authorization")
            );
        }
    }

    /// No secret in any `Debug`: not the secret key, the session token or
    /// the derived signing key, once all of them are cached.
    #[tokio::test]
    async fn debug_output_holds_no_secret() {
        let (signer, _) = signer(Some(Duration::from_secs(3600)));
        let payload = Bytes::from_static(b"hello");
        signed(&signer, &payload).await;
        let text = format!("{signer:?} {signer:#?}");
        assert_no_secret(&text, "secret", "token");
    }

    /// Panics if `text` shows `secret`, `token`, or the signing key derived
    /// from `secret` today (as hex or as a byte list).
    fn assert_no_secret(text: &str, secret: &str, token: &str) {
        let key = v4::generate_signing_key(secret, SystemTime::now(), "eu-west-1", SIGNING_NAME);
        let key = key.as_ref();
        let bytes = format!("{:?}", &key[..4]);
        for shown in [
            format!("\"{secret}\""),
            format!("\"{token}\""),
            hex::encode(key),
            bytes.trim_matches(['[', ']']).to_owned(),
        ] {
            assert!(!text.contains(&shown), "{shown} in {text}");
        }
    }

    #[tokio::test]
    async fn an_ended_jobs_payload_leaves_the_cache() {
        let (signer, _) = signer(Some(Duration::from_secs(3600)));
        let held = Bytes::from(b"still sending".to_vec());
        signed(&signer, &held).await;
        signed(&signer, &Bytes::from(b"ended".to_vec())).await;
        // The second payload's job is gone (nothing else holds it).
        signed(&signer, &Bytes::from(b"new".to_vec())).await;
        let kept: Vec<Bytes> = signer
            .payloads
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.bytes.clone())
            .collect();
        assert_eq!(kept, [held, Bytes::from_static(b"new")]);
    }
}
