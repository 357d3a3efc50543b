//! The one error type at the edge, and its one mapping to HTTP status codes, JSON bodies and the
//! rejection counter. Channels and the pipeline return `Rejection`s; only `http` turns them into
//! responses.

use hyper::StatusCode;
use std::time::Duration;

/// Why a request was not accepted. `code()` is the stable machine-readable name that appears in
/// the JSON body and as the `reason` label of `switchboard_rejections_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    NotFound,
    MethodNotAllowed,
    UnsupportedMediaType,
    BodyTooLarge,
    BodyTimeout,
    BatchTooLarge,
    MalformedJson,
    InvalidEvent,
    MissingSignature,
    BadSignature,
    StaleTimestamp,
    /// The source network is not allowed for this channel.
    Forbidden,
    RateLimited {
        scope: &'static str,
    },
    SinkUnavailable,
    Overloaded,
    Internal,
}

impl Reason {
    pub fn code(&self) -> &'static str {
        match self {
            Reason::NotFound => "not_found",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::UnsupportedMediaType => "unsupported_media_type",
            Reason::BodyTooLarge => "body_too_large",
            Reason::BodyTimeout => "body_timeout",
            Reason::BatchTooLarge => "batch_too_large",
            Reason::MalformedJson => "malformed_json",
            Reason::InvalidEvent => "invalid_event",
            Reason::MissingSignature => "missing_signature",
            Reason::BadSignature => "bad_signature",
            Reason::StaleTimestamp => "stale_timestamp",
            Reason::Forbidden => "forbidden",
            Reason::RateLimited { .. } => "rate_limited",
            Reason::SinkUnavailable => "sink_unavailable",
            Reason::Overloaded => "overloaded",
            Reason::Internal => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Reason::NotFound => StatusCode::NOT_FOUND,
            Reason::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Reason::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Reason::BodyTooLarge | Reason::BatchTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Reason::MalformedJson | Reason::InvalidEvent => StatusCode::BAD_REQUEST,
            Reason::MissingSignature | Reason::BadSignature | Reason::StaleTimestamp => {
                StatusCode::UNAUTHORIZED
            }
            Reason::Forbidden => StatusCode::FORBIDDEN,
            Reason::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Reason::SinkUnavailable | Reason::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Reason::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A rejected request: the reason, a message safe to show the sender (never personal data, never
/// which part of a signature check failed), and for 429/503 how long the sender should wait.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub reason: Reason,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl Rejection {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    /// Signature failures all answer alike so a prober learns nothing about which check failed;
    /// the precise reason still goes to the counter and the log.
    pub fn unauthorized(reason: Reason) -> Self {
        Self::new(reason, "request authentication failed")
    }

    /// `Retry-After` in whole seconds, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|d| d.as_millis().div_ceil(1000).max(1) as u64)
    }

    pub fn body_json(&self) -> String {
        serde_json::json!({ "error": self.reason.code(), "message": self.message }).to_string()
    }

    /// Counts the rejection. Labels are a fixed vocabulary: channel name and reason code.
    pub fn count(&self, channel: &'static str) {
        metrics::counter!(
            crate::telemetry::REJECTIONS,
            "channel" => channel,
            "reason" => self.reason.code()
        )
        .increment(1);
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.code(), self.message)
    }
}

impl std::error::Error for Rejection {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_maps_to_a_client_or_server_error() {
        let all = [
            Reason::NotFound,
            Reason::MethodNotAllowed,
            Reason::UnsupportedMediaType,
            Reason::BodyTooLarge,
            Reason::BodyTimeout,
            Reason::BatchTooLarge,
            Reason::MalformedJson,
            Reason::InvalidEvent,
            Reason::MissingSignature,
            Reason::BadSignature,
            Reason::StaleTimestamp,
            Reason::Forbidden,
            Reason::RateLimited { scope: "source" },
            Reason::SinkUnavailable,
            Reason::Overloaded,
            Reason::Internal,
        ];
        for r in all {
            assert!(r.status().is_client_error() || r.status().is_server_error());
            assert!(r.code().chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let r =
            Rejection::new(Reason::SinkUnavailable, "x").retry_after(Duration::from_millis(1200));
        assert_eq!(r.retry_after_secs(), Some(2));
        let r = Rejection::new(Reason::SinkUnavailable, "x").retry_after(Duration::from_millis(1));
        assert_eq!(r.retry_after_secs(), Some(1));
    }

    #[test]
    fn body_is_typed_json() {
        let r = Rejection::new(Reason::MalformedJson, "expected value at line 1 column 2");
        let v: serde_json::Value = serde_json::from_str(&r.body_json()).unwrap();
        assert_eq!(v["error"], "malformed_json");
        assert_eq!(v["message"], "expected value at line 1 column 2");
    }
}
