//! A report destination that keeps, refuses or never answers what it is sent.

use super::*;

/// A report destination that keeps what it is sent, or fails, or never
/// answers.
#[derive(Default)]
pub struct FakeReports {
    pub bodies: Mutex<Vec<String>>,
    fail: bool,
    hang: bool,
}

impl FakeReports {
    /// Refuses every report.
    pub fn failing() -> Self {
        Self {
            fail: true,
            ..Self::default()
        }
    }

    /// Never answers.
    pub fn hanging() -> Self {
        Self {
            hang: true,
            ..Self::default()
        }
    }

    /// The reports taken, in order.
    pub fn reports(&self) -> Vec<BroadcastReport> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|body| serde_json::from_str(body).expect("a report"))
            .collect()
    }
}

impl ReportSink for FakeReports {
    fn destination(&self) -> &str {
        "fake"
    }

    fn send<'a>(&'a self, body: &'a str) -> BoxFuture<'a, Result<(), ReportError>> {
        Box::pin(async move {
            if self.hang {
                std::future::pending::<()>().await;
            }
            if self.fail {
                return Err(ReportError::Unavailable("the fake refuses".into()));
            }
            self.bodies.lock().unwrap().push(body.to_owned());
            Ok(())
        })
    }
}
