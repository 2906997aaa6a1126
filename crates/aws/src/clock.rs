//! AWS's clock, as the `Date` header of a DynamoDB answer gives it, compared
//! with this worker's: the age rule of [`fanout_core::connection::expiry`] trusts the
//! worker's clock only while the two agree within a minute, and job
//! deadlines (`deliver_by`) are read against AWS's time.
//!
//! An interceptor on a client of its own reads the header of every answer;
//! the check is a DescribeTable on the connections table, a call the worker
//! already makes (and is granted) at startup.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use aws_sdk_dynamodb::primitives::{DateTime, DateTimeFormat};

use fanout_core::connection::expiry::{AwsClock, ClockVerdict, ExpiryRule};

/// The last `Date` an answer carried, with this worker's time when it came.
type Reading = Arc<Mutex<Option<(SystemTime, SystemTime)>>>;

#[derive(Debug, Default)]
struct ServerDate {
    last: Reading,
}

impl Intercept for ServerDate {
    fn name(&self) -> &'static str {
        "ServerDate"
    }

    fn read_after_transmit(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let local = SystemTime::now();
        let server = context
            .response()
            .headers()
            .get("date")
            .and_then(|text| DateTime::from_str(text, DateTimeFormat::HttpDate).ok())
            .and_then(|date| SystemTime::try_from(date).ok());
        if let Some(server) = server {
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some((server, local));
        }
        Ok(())
    }
}

/// Compares the clocks on demand.
#[derive(Clone, Debug)]
pub struct ClockCheck {
    client: Client,
    table: String,
    last: Reading,
}

impl ClockCheck {
    /// A check on `table`, through a client of its own that reads the
    /// header.
    pub fn new(sdk: &aws_config::SdkConfig, table: &str) -> Self {
        let last = Reading::default();
        let config = aws_sdk_dynamodb::config::Builder::from(sdk)
            .interceptor(ServerDate { last: last.clone() })
            .build();
        Self {
            client: Client::from_conf(config),
            table: table.to_owned(),
            last,
        }
    }

    /// Asks DynamoDB for the time, keeps it in `clock` and applies the
    /// comparison to `rule`; `None` (both left as they were) when no answer
    /// with a date came.
    pub async fn run(&self, clock: &AwsClock, rule: Option<&ExpiryRule>) -> Option<ClockVerdict> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // An error answer carries a Date too: the outcome does not matter.
        let _ = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await;
        let reading = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        match reading {
            Some((server, local)) => {
                clock.measured(server, local);
                Some(rule.map_or(ClockVerdict::Agrees, |rule| rule.clock(server, local)))
            }
            None => {
                tracing::warn!(
                    table = %self.table,
                    "no DynamoDB answer with a Date header; the clock is not checked this time"
                );
                None
            }
        }
    }
}
