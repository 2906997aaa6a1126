//! The management API endpoint: which URLs fanout accepts, and why an
//! `execute-api` host needs its stage.

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
}

/// Parses a management API endpoint: any `http(s)://host[:port][/path]`
/// with no query. A custom domain mapped without a base path, or a local
/// stand-in such as serverless-offline, serves `@connections` at the root;
/// only an `{api-id}.execute-api.{region}.amazonaws.com` host always needs
/// its stage in the path.
pub fn parse_endpoint(endpoint: &str) -> Result<url::Url, BadEndpoint> {
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
    let stageless = url.path().trim_matches('/').is_empty();
    if stageless && url.host_str().is_some_and(is_execute_api_host) {
        return Err(BadEndpoint::NoStage {
            endpoint: endpoint.to_owned(),
        });
    }
    Ok(url)
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
    #[test]
    fn any_http_endpoint_is_accepted_but_an_execute_api_host_needs_its_stage() {
        for good in [
            "https://abc123.execute-api.eu-west-1.amazonaws.com/prod",
            "https://abc123.execute-api.eu-west-1.amazonaws.com/prod/",
            "http://127.0.0.1:5322/local",
            // serverless-offline serves @connections at the root.
            "http://127.0.0.1:3001",
            "http://localhost:3001/",
            // A custom domain whose API mapping has no base path, or has one.
            "https://ws.example.com",
            "https://ws.example.com/chat",
        ] {
            assert!(parse_endpoint(good).is_ok(), "{good}");
        }
        for stageless in [
            "https://abc123.execute-api.eu-west-1.amazonaws.com",
            "https://abc123.execute-api.eu-west-1.amazonaws.com/",
            "https://ABC123.Execute-Api.cn-north-1.amazonaws.com.cn",
        ] {
            let err = parse_endpoint(stageless).expect_err(stageless);
            assert!(matches!(err, BadEndpoint::NoStage { .. }), "{stageless}");
            assert!(err.to_string().contains("has no stage"), "{err}");
        }
        for bad in [
            "abc123.execute-api.eu-west-1.amazonaws.com/prod",
            "https://",
            "ftp://ws.example.com",
            "https://ws.example.com/?stage=prod",
        ] {
            let err = parse_endpoint(bad).expect_err(bad);
            assert!(matches!(err, BadEndpoint::NotAUrl { .. }), "{bad}");
        }
    }
}
