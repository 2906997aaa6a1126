//! What an HTTP status from `@connections` means for the engine: the one
//! table both send paths (`apigw` on the SDK, `lean` on hyper) answer by.
//!
//! The status decides, not the `x-amzn-ErrorType` header: API Gateway (and
//! proxies in front of it) sometimes answer a bare 410 without one.

use super::PostOutcome;

/// The outcome of an answer with HTTP `status`. `detail` describes the
/// answer for logs and job reports; it is only called on failures.
pub fn outcome(status: u16, detail: impl FnOnce() -> String) -> PostOutcome {
    match status {
        // API Gateway took the message: retrying would deliver it twice.
        200..=299 => PostOutcome::Delivered,
        410 => PostOutcome::Gone,
        429 => PostOutcome::Throttled,
        403 => forbidden(detail()),
        413 => PostOutcome::PayloadTooLarge,
        400..=499 => PostOutcome::Rejected(detail()),
        // 5xx, and 1xx/3xx that @connections never sends on purpose.
        _ => PostOutcome::Transient(detail()),
    }
}

/// A 403, with what usually causes it: the stage missing from the endpoint
/// or a role without `execute-api:ManageConnections`.
pub fn forbidden(detail: String) -> PostOutcome {
    PostOutcome::Forbidden(format!(
        "{detail}; check that the endpoint includes the stage \
         (https://{{api-id}}.execute-api.{{region}}.amazonaws.com/{{stage}}) and that the \
         role may execute-api:ManageConnections on it"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail() -> String {
        "HTTP answer".to_owned()
    }

    #[test]
    fn every_status_class_has_its_outcome() {
        let rows = [
            (200, PostOutcome::Delivered),
            (204, PostOutcome::Delivered),
            (410, PostOutcome::Gone),
            (429, PostOutcome::Throttled),
            (413, PostOutcome::PayloadTooLarge),
            (400, PostOutcome::Rejected(detail())),
            (404, PostOutcome::Rejected(detail())),
            (500, PostOutcome::Transient(detail())),
            (502, PostOutcome::Transient(detail())),
            (503, PostOutcome::Transient(detail())),
            (504, PostOutcome::Transient(detail())),
            (302, PostOutcome::Transient(detail())),
        ];
        for (status, expected) in rows {
            assert_eq!(outcome(status, detail), expected, "{status}");
        }
    }

    #[test]
    fn forbidden_names_the_usual_causes() {
        let PostOutcome::Forbidden(message) = outcome(403, detail) else {
            panic!("403 must be Forbidden");
        };
        assert!(message.starts_with("HTTP answer; "), "{message}");
        assert!(message.contains("stage"), "{message}");
        assert!(
            message.contains("execute-api:ManageConnections"),
            "{message}"
        );
    }

    #[test]
    fn success_does_not_describe() {
        let outcome = outcome(200, || panic!("no detail for a delivery"));
        assert_eq!(outcome, PostOutcome::Delivered);
    }
}
