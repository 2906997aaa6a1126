//! From a message body to a [`Job`]: the SNS envelope unwrapped, a newer
//! format handed back before its fields are read, the JSON read into a
//! [`JobSpec`] naming the offending field, then [`validate`]d.

use serde::Deserialize;

use super::wire::{JOB_FORMAT_VERSION, JobSpec};
use super::{Capabilities, Job, JobError, Order, validate};

/// An SNS notification, as SNS delivers to SQS without raw message delivery.
#[derive(Deserialize)]
struct SnsEnvelope {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "Message")]
    message: String,
    /// The broadcast key of a notification without an `id`: SNS keeps it
    /// across its own redeliveries, which come with new SQS message ids.
    #[serde(rename = "MessageId", default)]
    message_id: Option<String>,
}

/// The format version a body names, read before its fields are checked: a
/// newer body may carry fields this build refuses as unknown.
fn newer_format(body: &str) -> Option<u64> {
    if !body.contains("\"v\"") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    let version = value.get("v")?.as_u64()?;
    (version > u64::from(JOB_FORMAT_VERSION)).then_some(version)
}

/// Parses a message body that must be a broadcast (a job, or an SNS
/// notification wrapping one); a cancel is refused.
pub fn parse(body: &str, message_id: &str, caps: &Capabilities) -> Result<Job, JobError> {
    read(body, message_id, caps)?.into_job()
}

/// Reads a message body (a job, or an SNS notification wrapping one): a
/// broadcast or a cancel.
pub fn read(body: &str, message_id: &str, caps: &Capabilities) -> Result<Order, JobError> {
    let unwrapped;
    let mut message_id = message_id;
    let sns_id;
    let body = match serde_json::from_str::<SnsEnvelope>(body) {
        Ok(envelope) if envelope.kind == "Notification" => {
            unwrapped = envelope.message;
            if let Some(id) = envelope.message_id.filter(|id| !id.is_empty()) {
                sns_id = id;
                message_id = &sns_id;
            }
            unwrapped.as_str()
        }
        _ => body,
    };
    if let Some(version) = newer_format(body) {
        return Err(JobError::NewerFormat { version });
    }
    let mut de = serde_json::Deserializer::from_str(body);
    let spec: JobSpec = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        JobError::Malformed {
            path: if path == "." { "body".to_owned() } else { path },
            reason: e.into_inner().to_string(),
        }
    })?;
    de.end().map_err(|e| JobError::Malformed {
        path: "body".to_owned(),
        reason: e.to_string(),
    })?;
    validate(spec, message_id, caps)
}
