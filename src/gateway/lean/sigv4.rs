//! SigV4 for the lean send path: credentials from the SDK's own provider,
//! kept until shortly before they expire, the payload's hash computed once
//! per broadcast rather than once per send, and the signing key derived once
//! per day and credentials rather than once per send.
//!
//! `aws-sigv4`'s `sign` derives the key (four HMACs) and builds a general
//! canonical request for every call, about a tenth of a send's CPU. A
//! PostToConnection request is always the same shape (POST, no query, the
//! `host` header alone), so its canonical request is written here directly,
//! with the SDK's own path encoding, and signed with `aws-sigv4`'s
//! `calculate_signature`. Paths that SigV4 would normalise (dot segments,
//! `//`) go through `aws-sigv4`'s `sign` instead. Tests check both against
//! `sign` byte for byte.
//!
//! The SDK caches identities in its client's orchestrator, not in the
//! provider: calling an ECS or IMDS provider directly would fetch credentials
//! over HTTP on every send, so this module caches them itself.

use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_http::label::{EncodingStrategy, fmt_string};
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_types::date_time::{DateTime, Format};
use bytes::Bytes;
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
    /// The last second signed in, and its `x-amz-date`.
    amz_date: Mutex<Option<(u64, String)>>,
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
            amz_date: Mutex::new(None),
        }
    }

    /// Adds `x-amz-date`, `authorization` (and `x-amz-security-token` for
    /// temporary credentials) to `request`. `uri` is the request's absolute
    /// URI as text (the caller has it already; rendering it again costs an
    /// allocation per send); a `host` header, if set, must be its authority.
    pub async fn sign<B>(
        &self,
        request: &mut http::Request<B>,
        uri: &str,
        payload: &Bytes,
    ) -> Result<(), SignError> {
        let identity = self.credentials.identity().await?;
        let hash = self.payload_hash(payload);
        let now = SystemTime::now();
        let path = request.uri().path();
        let normalised = path.contains('.') || path.contains("//");
        if let (false, Some(credentials)) = (normalised, identity.data::<Credentials>()) {
            return self.sign_post(request, credentials, &hash, now);
        }
        self.sign_general(request, uri, &identity, hash, now)
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

    /// SigV4's `20261127T221500Z` for `secs` since the epoch, formatted once
    /// per second.
    fn amz_date(&self, secs: u64) -> Result<String, SignError> {
        let mut last = self.amz_date.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, text)) = last.as_ref()
            && *at == secs
        {
            return Ok(text.clone());
        }
        // RFC 3339 `2026-11-27T22:15:00Z` → `20261127T221500Z`.
        let text: String = DateTime::from_secs(secs as i64)
            .fmt(Format::DateTime)
            .map_err(|e| SignError::Signing(e.to_string()))?
            .chars()
            .filter(|c| *c != '-' && *c != ':')
            .collect();
        *last = Some((secs, text.clone()));
        Ok(text)
    }

    /// The signature `sign_general` would compute for a POST without query
    /// whose only header is `host`, with the day's cached signing key.
    fn sign_post<B>(
        &self,
        request: &mut http::Request<B>,
        credentials: &Credentials,
        payload_hash: &str,
        now: SystemTime,
    ) -> Result<(), SignError> {
        let bad = |what: &str| SignError::Signing(what.to_owned());
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| bad("the clock is before 1970"))?
            .as_secs();
        let amz_date = self.amz_date(secs)?;
        let date = amz_date.get(..8).ok_or_else(|| bad("a malformed date"))?;
        let host = request
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or_else(|| bad("no host header"))?;
        let token = credentials.session_token();
        let signed_headers = if token.is_some() {
            "host;x-amz-date;x-amz-security-token"
        } else {
            "host;x-amz-date"
        };

        let mut canonical = String::with_capacity(320 + token.map_or(0, str::len));
        let path = fmt_string(request.uri().path(), EncodingStrategy::Greedy);
        let _ = write!(
            canonical,
            "{}\n{path}\n\nhost:{host}\nx-amz-date:{amz_date}\n",
            request.method()
        );
        if let Some(token) = token {
            let _ = writeln!(canonical, "x-amz-security-token:{token}");
        }
        let _ = write!(canonical, "\n{signed_headers}\n{payload_hash}");
        let scope = format!("{date}/{}/{SIGNING_NAME}/aws4_request", self.region);
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let signature = {
            let mut cached = self
                .signing_key
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let stale = cached.as_ref().is_none_or(|k| {
                k.date != date
                    || k.access_key_id != credentials.access_key_id()
                    || k.secret_access_key != credentials.secret_access_key()
            });
            if stale {
                *cached = Some(SigningKey {
                    date: date.to_owned(),
                    access_key_id: credentials.access_key_id().to_owned(),
                    secret_access_key: credentials.secret_access_key().to_owned(),
                    key: v4::generate_signing_key(
                        credentials.secret_access_key(),
                        now,
                        &self.region,
                        SIGNING_NAME,
                    )
                    .as_ref()
                    .to_vec(),
                });
            }
            let key = cached
                .as_ref()
                .map(|k| k.key.as_slice())
                .unwrap_or_default();
            v4::calculate_signature(key, string_to_sign.as_bytes())
        };
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            credentials.access_key_id()
        );

        let value =
            |text: &str| HeaderValue::from_str(text).map_err(|e| SignError::Signing(e.to_string()));
        let mut token_value = token.map(value).transpose()?;
        if let Some(token_value) = token_value.as_mut() {
            token_value.set_sensitive(true);
        }
        let mut authorization = value(&authorization)?;
        authorization.set_sensitive(true);
        let amz_date = value(&amz_date)?;
        let headers = request.headers_mut();
        headers.insert(X_AMZ_DATE, amz_date);
        if let Some(token_value) = token_value {
            headers.insert(X_AMZ_SECURITY_TOKEN, token_value);
        }
        headers.insert(AUTHORIZATION, authorization);
        Ok(())
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

    const URI: &str = "https://abc.execute-api.eu-west-1.amazonaws.com/prod/@connections/a%3D";

    fn request() -> http::Request<()> {
        http::Request::post(URI)
            .header("host", "abc.execute-api.eu-west-1.amazonaws.com")
            .body(())
            .unwrap()
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
            let mut request = request();
            signer.sign(&mut request, URI, &payload).await.unwrap();
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
            let mut request = request();
            signer.sign(&mut request, URI, &payload).await.unwrap();
            let auth = header(&request, "authorization");
            assert!(auth.contains(&format!("Credential=AKID{n}/")), "{auth}");
        }
        assert_eq!(provider.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_valid_credentials_and_backs_off() {
        let (signer, provider) = signer(Some(REFRESH_BEFORE_EXPIRY / 2));
        let payload = Bytes::from_static(b"hello");
        signer.sign(&mut request(), URI, &payload).await.unwrap();
        provider.fail.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            let mut request = request();
            signer.sign(&mut request, URI, &payload).await.unwrap();
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
            .sign(&mut request(), URI, &Bytes::from_static(b"x"))
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
        let endpoint = "https://abc.execute-api.eu-west-1.amazonaws.com";
        let ids = [
            "L0SM9cOFvHcCIhw%3D",
            "a%2Fb%2Bc",
            "conn-1",
            "x~y_z-0",
            "%C3%A9t%C3%A9",
        ];
        let times = [1_764_281_700, 1_764_287_999, 1_764_288_000]
            .map(|secs| UNIX_EPOCH + Duration::from_secs(secs));
        let hash = hex::encode(Sha256::digest(b"payload"));
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
                            .sign_post(&mut fast, &credentials, &hash, now)
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
        let uri = "https://abc.example/prod/@connections/a.b";
        let mut request = http::Request::post(uri)
            .header("host", "abc.example")
            .body(())
            .unwrap();
        signer
            .sign(&mut request, uri, &Bytes::from_static(b"x"))
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
