//! SigV4 for the lean send path: credentials from the SDK's own provider,
//! kept until shortly before they expire, and everything the signatures of
//! one second share (payload hash, date, scope, the keyed HMAC, header
//! values) prepared once, so a send hashes only its own path.
//!
//! `aws-sigv4`'s `sign` derives the key (four HMACs) and builds a general
//! canonical request for every call, formatting and allocating as it goes:
//! more CPU than the rest of a send. A PostToConnection request is always
//! the same shape (POST, no query, the `host` header alone), so its
//! canonical request is hashed here directly, with the SDK's own path
//! encoding, and signed with the same HMAC-SHA256. Paths that SigV4 would
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
use aws_smithy_http::label::{EncodingStrategy, fmt_string};
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_types::date_time::{DateTime, Format};
use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use http::Uri;
use http::header::{AUTHORIZATION, HOST, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use super::error_chain;

/// API Gateway's signing name for `@connections`.
const SIGNING_NAME: &str = "execute-api";

/// Credentials are replaced this long before they expire, so a send signed
/// with them does not arrive after expiry (ECS task role credentials are
/// rotated well before this window).
const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);

/// After a failed refresh while the old credentials still hold, the next
/// refresh is tried no sooner than this, so a provider outage is not hit by
/// every send.
const RETRY_REFRESH_AFTER: Duration = Duration::from_secs(10);

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

/// Signs PostToConnection requests for one region.
#[derive(Debug)]
pub struct Signer {
    credentials: CredentialsCache,
    region: String,
    /// The last payload and its SHA-256 in hex. Holding the `Bytes` keeps its
    /// buffer alive, so a payload at the same address and length is this
    /// very payload (`Bytes` are immutable), never a new one reusing freed
    /// memory.
    payload_hash: Mutex<Option<(Bytes, String)>>,
    /// The signing key of the current day and credentials.
    signing_key: Mutex<Option<SigningKey>>,
    /// What the signatures of the current second share.
    prepared: Mutex<Option<Arc<Prepared>>>,
}

/// Everything a PostToConnection signature shares with the others of the
/// same second, credentials, payload and host: only the path differs from
/// one send to the next, so a send hashes its path between two prepared
/// byte strings and writes nothing else.
struct Prepared {
    secs: u64,
    /// Held, so that an identity or payload at the same address is this
    /// very one (see `payload_hash`).
    identity: Identity,
    payload: Bytes,
    host: HeaderValue,
    amz_date: HeaderValue,
    token: Option<HeaderValue>,
    /// The canonical request after the path: empty query, headers, signed
    /// header names, payload hash.
    canonical_tail: Vec<u8>,
    /// The string to sign before the canonical request's hash.
    string_to_sign_head: Vec<u8>,
    /// HMAC keyed with the day's signing key, ready for the string to sign.
    mac: Hmac<Sha256>,
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

#[derive(Debug)]
struct SigningKey {
    /// `YYYYMMDD` (UTC), part of the credential scope.
    date: String,
    access_key_id: String,
    secret_access_key: String,
    key: Vec<u8>,
}

const X_AMZ_DATE: HeaderName = HeaderName::from_static("x-amz-date");
const X_AMZ_SECURITY_TOKEN: HeaderName = HeaderName::from_static("x-amz-security-token");

impl Signer {
    pub fn new(provider: SharedCredentialsProvider, region: String) -> Self {
        Self {
            credentials: CredentialsCache::new(provider),
            region,
            payload_hash: Mutex::new(None),
            signing_key: Mutex::new(None),
            prepared: Mutex::new(None),
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

        let mut canonical = Sha256::new();
        canonical.update(request.method().as_str());
        canonical.update(b"\n");
        canonical.update(fmt_string(request.uri().path(), EncodingStrategy::Greedy));
        canonical.update(&prepared.canonical_tail);
        let mut canonical_hash = [0u8; 64];
        hex_into(&canonical.finalize(), &mut canonical_hash);

        let mut mac = prepared.mac.clone();
        mac.update(&prepared.string_to_sign_head);
        mac.update(&canonical_hash);
        let mut signature = [0u8; 64];
        hex_into(&mac.finalize().into_bytes(), &mut signature);

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
        Ok(())
    }

    /// The current [`Prepared`], made anew when the second, the
    /// credentials, the payload or the host changed.
    fn prepared(
        &self,
        secs: u64,
        identity: &Identity,
        payload: &Bytes,
        host: &HeaderValue,
    ) -> Result<Arc<Prepared>, SignError> {
        let mut current = self.prepared.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(prepared) = current.as_ref()
            && prepared.secs == secs
            && same_identity(&prepared.identity, identity)
            && prepared.payload.as_ptr() == payload.as_ptr()
            && prepared.payload.len() == payload.len()
            && prepared.host == host
        {
            return Ok(prepared.clone());
        }
        let prepared = Arc::new(self.prepare(secs, identity, payload, host)?);
        *current = Some(prepared.clone());
        Ok(prepared)
    }

    fn prepare(
        &self,
        secs: u64,
        identity: &Identity,
        payload: &Bytes,
        host: &HeaderValue,
    ) -> Result<Prepared, SignError> {
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
        let _ = write!(
            canonical_tail,
            "\n{signed_headers}\n{}",
            self.payload_hash(payload)
        );
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
        Ok(Prepared {
            secs,
            identity: identity.clone(),
            payload: payload.clone(),
            host: host.clone(),
            amz_date: value(&amz_date)?,
            token,
            canonical_tail: canonical_tail.into_bytes(),
            string_to_sign_head: format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n").into_bytes(),
            mac: Hmac::<Sha256>::new_from_slice(&key).map_err(|e| bad(&e.to_string()))?,
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
        let mut last = self
            .payload_hash
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((bytes, hash)) = last.as_ref()
            && bytes.as_ptr() == payload.as_ptr()
            && bytes.len() == payload.len()
        {
            return hash.clone();
        }
        let hash = hex::encode(Sha256::digest(payload));
        *last = Some((payload.clone(), hash.clone()));
        hash
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

/// Credentials from the provider, reused until [`REFRESH_BEFORE_EXPIRY`]
/// before they expire.
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
    identity: Identity,
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

    async fn identity(&self) -> Result<Identity, SignError> {
        if let Some(identity) = self.fresh(SystemTime::now()) {
            return Ok(identity);
        }
        // Boxed: refreshing is rare, and the provider's future would make
        // every send's bigger.
        Box::pin(self.refresh()).await
    }

    async fn refresh(&self) -> Result<Identity, SignError> {
        let _refreshing = self.refresh.lock().await;
        let now = SystemTime::now();
        // Another send may have refreshed while this one waited.
        if let Some(identity) = self.fresh(now) {
            return Ok(identity);
        }
        match self.provider.provide_credentials().await {
            Ok(credentials) => {
                let refresh_at = credentials
                    .expiry()
                    .map(|expiry| expiry - REFRESH_BEFORE_EXPIRY);
                let identity = Identity::from(credentials);
                self.store(Some(Cached {
                    identity: identity.clone(),
                    refresh_at,
                }));
                Ok(identity)
            }
            Err(err) => {
                let still_valid = self.cached().filter(|cached| {
                    cached
                        .identity
                        .expiration()
                        .is_none_or(|expiry| expiry > now)
                });
                if let Some(mut cached) = still_valid {
                    tracing::warn!(error = %error_chain(&err), "credentials refresh failed; the current ones still hold");
                    cached.refresh_at = Some(now + RETRY_REFRESH_AFTER);
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

    fn fresh(&self, now: SystemTime) -> Option<Identity> {
        self.cached()
            .filter(|cached| cached.refresh_at.is_none_or(|at| now < at))
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

    /// Hands out credentials expiring `lifetime` from now, or fails, and
    /// counts the calls.
    #[derive(Debug)]
    struct Provider {
        lifetime: Option<Duration>,
        fail: std::sync::atomic::AtomicBool,
        calls: Arc<AtomicUsize>,
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
            let expiry = self.lifetime.map(|l| SystemTime::now() + l);
            future::ProvideCredentials::ready(Ok(Credentials::new(
                format!("AKID{n}"),
                "secret",
                Some("token".into()),
                expiry,
                "test",
            )))
        }
    }

    fn signer(lifetime: Option<Duration>) -> (Signer, Arc<Provider>) {
        let provider = Arc::new(Provider {
            lifetime,
            fail: false.into(),
            calls: Arc::new(AtomicUsize::new(0)),
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

    #[tokio::test]
    async fn credentials_near_expiry_are_replaced() {
        // Inside the refresh window from the start: every send refreshes.
        let (signer, provider) = signer(Some(REFRESH_BEFORE_EXPIRY / 2));
        let payload = Bytes::from_static(b"hello");
        for n in 0..3 {
            let request = signed(&signer, &payload).await;
            let auth = header(&request, "authorization");
            assert!(auth.contains(&format!("Credential=AKID{n}/")), "{auth}");
        }
        assert_eq!(provider.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_valid_credentials_and_backs_off() {
        let (signer, provider) = signer(Some(REFRESH_BEFORE_EXPIRY / 2));
        let payload = Bytes::from_static(b"hello");
        signed(&signer, &payload).await;
        provider.fail.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            let request = signed(&signer, &payload).await;
            assert!(header(&request, "authorization").contains("Credential=AKID0/"));
        }
        // One failed refresh, then the retry waits.
        assert_eq!(provider.calls.load(Ordering::SeqCst), 2);
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
}
