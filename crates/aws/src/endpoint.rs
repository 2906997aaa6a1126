//! The management API endpoint: which URLs fanout accepts, why an
//! `execute-api` host needs its stage, and where plain HTTP is safe.

use std::net::IpAddr;

/// Whether a plain `http://` endpoint may name a host that is not loopback.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PlainHttp {
    /// Only `127.0.0.0/8`, `::1` and `localhost`: a local stand-in.
    #[default]
    LoopbackOnly,
    /// Any host: the operator said the network on the way is trusted.
    Allowed,
}

/// A management API endpoint that cannot be right.
#[derive(Debug, thiserror::Error)]
pub enum BadEndpoint {
    /// Not `http(s)://host[:port][/path]`.
    #[error(
        "the API Gateway endpoint {endpoint:?} is not an http(s) URL with a host and no query, \
         like https://{{api-id}}.execute-api.{{region}}.amazonaws.com/{{stage}}, \
         https://ws.example.com (a custom domain) or http://127.0.0.1:3001 (a local stand-in)"
    )]
    NotAUrl { endpoint: String },
    /// An `execute-api` host without its stage: the mistake AWS answers
    /// with a misleading 403 on every send.
    #[error(
        "the API Gateway endpoint {endpoint:?} has no stage: an execute-api endpoint needs one, \
         like https://{{api-id}}.execute-api.{{region}}.amazonaws.com/{{stage}} \
         (without it every send fails with 403)"
    )]
    NoStage { endpoint: String },
    /// `http://` to a host that is not loopback, not allowed by the
    /// operator: anything on the path could answer 410 for every
    /// connection, and fanout would remove their rows.
    #[error(
        "the API Gateway endpoint {endpoint:?} is plain http:// to {host}, which is not loopback: \
         anything on the way could read the posts and answer 410 for every connection. \
         Use https://, or set gateway_allow_plain_http (FANOUT_GATEWAY_ALLOW_PLAIN_HTTP=true) \
         if that network is trusted"
    )]
    PlainHttp { endpoint: String, host: String },
}

/// Parses a management API endpoint: any `http(s)://host[:port][/path]`
/// with no query, `http://` only to a loopback host unless `plain_http`
/// allows any. A custom domain mapped without a base path, or a local
/// stand-in such as serverless-offline, serves `@connections` at the root;
/// only an `{api-id}.execute-api.{region}.amazonaws.com` host always needs
/// its stage in the path.
pub fn parse_endpoint(endpoint: &str, plain_http: PlainHttp) -> Result<url::Url, BadEndpoint> {
    let not_a_url = || BadEndpoint::NotAUrl {
        endpoint: endpoint.to_owned(),
    };
    let url = url::Url::parse(endpoint).map_err(|_| not_a_url())?;
    let usable = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some_and(|h| !h.is_empty())
        && url.query().is_none();
    if !usable {
        return Err(not_a_url());
    }
    if url.scheme() == "http" && plain_http == PlainHttp::LoopbackOnly && !is_loopback(&url) {
        return Err(BadEndpoint::PlainHttp {
            endpoint: endpoint.to_owned(),
            host: url.host_str().unwrap_or_default().to_owned(),
        });
    }
    let stageless = url.path().trim_matches('/').is_empty();
    if stageless && url.host_str().is_some_and(is_execute_api_host) {
        return Err(BadEndpoint::NoStage {
            endpoint: endpoint.to_owned(),
        });
    }
    Ok(url)
}

/// Whether the URL's host is this machine: `127.0.0.0/8`, `::1` (or an
/// IPv4-mapped loopback address), or `localhost`.
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).to_canonical().is_loopback(),
        Some(url::Host::Domain(name)) => {
            name.trim_end_matches('.').eq_ignore_ascii_case("localhost")
        }
        None => false,
    }
}

/// Whether `host` is an API's default `execute-api` domain (any AWS
/// partition: `amazonaws.com`, `amazonaws.com.cn`).
fn is_execute_api_host(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    labels.len() >= 5 && labels[1] == "execute-api" && labels[3] == "amazonaws"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts each of `urls` under `plain`.
    fn all_accepted(urls: &[&str], plain: PlainHttp) {
        for url in urls {
            assert!(parse_endpoint(url, plain).is_ok(), "{url}");
        }
    }

    /// Refuses each of `urls` under `plain` with an error that `is_why`
    /// accepts, and returns the errors.
    fn all_refused(
        urls: &[&str],
        plain: PlainHttp,
        is_why: fn(&BadEndpoint) -> bool,
    ) -> Vec<BadEndpoint> {
        let refused = |url: &&str| {
            let err = parse_endpoint(url, plain).expect_err(url);
            assert!(is_why(&err), "{url}: {err:?}");
            err
        };
        urls.iter().map(refused).collect()
    }

    #[test]
    fn any_http_endpoint_is_accepted_but_an_execute_api_host_needs_its_stage() {
        let good = [
            "https://abc123.execute-api.eu-west-1.amazonaws.com/prod",
            "https://abc123.execute-api.eu-west-1.amazonaws.com/prod/",
            "http://127.0.0.1:5322/local",
            // serverless-offline serves @connections at the root.
            "http://127.0.0.1:3001",
            "http://localhost:3001/",
            // A custom domain whose API mapping has no base path, or has one.
            "https://ws.example.com",
            "https://ws.example.com/chat",
        ];
        all_accepted(&good, PlainHttp::LoopbackOnly);
        let stageless = [
            "https://abc123.execute-api.eu-west-1.amazonaws.com",
            "https://abc123.execute-api.eu-west-1.amazonaws.com/",
            "https://ABC123.Execute-Api.cn-north-1.amazonaws.com.cn",
        ];
        let no_stage = |e: &BadEndpoint| matches!(e, BadEndpoint::NoStage { .. });
        for err in all_refused(&stageless, PlainHttp::Allowed, no_stage) {
            assert!(err.to_string().contains("has no stage"), "{err}");
        }
        let not_urls = [
            "abc123.execute-api.eu-west-1.amazonaws.com/prod",
            "https://",
            "ftp://ws.example.com",
            "https://ws.example.com/?stage=prod",
        ];
        let not_a_url = |e: &BadEndpoint| matches!(e, BadEndpoint::NotAUrl { .. });
        all_refused(&not_urls, PlainHttp::Allowed, not_a_url);
    }

    #[test]
    fn plain_http_is_refused_for_a_host_that_is_not_loopback() {
        let remote = [
            "http://ws.example.com/prod",
            "http://10.0.0.5:8080/prod",
            "http://abc123.execute-api.eu-west-1.amazonaws.com/prod",
            "http://[2001:db8::1]/prod",
            "http://0.0.0.0:3001",
            "http://localhost.example.com/prod",
            "http://128.0.0.1/prod",
        ];
        let plain_http = |e: &BadEndpoint| matches!(e, BadEndpoint::PlainHttp { .. });
        let refused = all_refused(&remote, PlainHttp::LoopbackOnly, plain_http);
        for (remote, err) in remote.into_iter().zip(refused) {
            let text = err.to_string();
            assert!(text.contains("gateway_allow_plain_http"), "{text}");
            assert!(text.contains("FANOUT_GATEWAY_ALLOW_PLAIN_HTTP"), "{text}");
            all_accepted(&[remote], PlainHttp::Allowed);
            // TLS needs no permission.
            let tls = remote.replacen("http://", "https://", 1);
            all_accepted(&[&tls], PlainHttp::LoopbackOnly);
        }
        let local = [
            "http://127.0.0.1:3001",
            "http://127.8.9.10:3001/local",
            "http://[::1]:3001/local",
            "http://[::ffff:127.0.0.1]:3001/local",
            "http://localhost:3001",
            "http://LOCALHOST.:3001/local",
        ];
        all_accepted(&local, PlainHttp::LoopbackOnly);
    }
}
