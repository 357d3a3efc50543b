//! The canonical complaint record (`complaint.v1`) and the `Intake` a channel hands the pipeline.
//!
//! `schema/complaint.v1.json` is the published contract; tests validate emitted records against it.
//! Within v1 only additive changes are allowed.

use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

pub const SCHEMA: &str = "complaint.v1";

/// Channel families (the record's `channel` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    Voice,
    Sms,
    Email,
    Chat,
    Social,
    Api,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Voice => "voice",
            ChannelKind::Sms => "sms",
            ChannelKind::Email => "email",
            ChannelKind::Chat => "chat",
            ChannelKind::Social => "social",
            ChannelKind::Api => "api",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Whether the gateway kept the bytes (email attachments): `false` with `omitted` saying why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<bool>,
    /// Why the bytes were not kept (`quota_message`, `quota_sender`, `quota_total`, `disk_low`,
    /// `disk_full`, `write_error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub omitted: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Voice {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digits: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speech: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recording_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcription: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
}

/// What a channel extracted from one message, before identity, dedupe and triage.
#[derive(Debug, Clone)]
pub struct Intake {
    pub channel: ChannelKind,
    /// Provider name, e.g. `api`, `twilio`, `meta.whatsapp`.
    pub provider: String,
    /// The sender's own id for this message; the provider-id dedupe key.
    pub provider_message_id: Option<String>,
    /// What scopes `provider_message_id` (Twilio account, Meta page, WeChat account, the calling
    /// system for `/v1/events`); part of the dedupe key, not of the record.
    pub account: Option<String>,
    pub identity: crate::identity::RawIdentity,
    pub thread_id: Option<String>,
    pub in_reply_to: Option<String>,
    pub subject: Option<String>,
    pub text: String,
    pub language: Option<String>,
    pub attachments: Vec<Attachment>,
    pub voice: Option<Voice>,
    pub metadata: BTreeMap<String, String>,
    /// When the provider says the message was sent (kept in metadata as `occurred_at`).
    pub occurred_at: Option<chrono::DateTime<chrono::Utc>>,
    /// A category the channel already knows (an IVR menu choice), with the rule that set it.
    pub category_hint: Option<(String, String)>,
    /// Other provider message ids this record answers for (the parts of a long SMS): their
    /// redeliveries are duplicates of this record.
    pub alias_message_ids: Vec<String>,
}

impl Intake {
    pub fn new(channel: ChannelKind, provider: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            channel,
            provider: provider.into(),
            provider_message_id: None,
            account: None,
            identity: Default::default(),
            thread_id: None,
            in_reply_to: None,
            subject: None,
            text: text.into(),
            language: None,
            attachments: Vec::new(),
            voice: None,
            metadata: BTreeMap::new(),
            occurred_at: None,
            category_hint: None,
            alias_message_ids: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SocialIdentity {
    pub platform: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub social: Option<SocialIdentity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_reply_to: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Content {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    pub attachments: Vec<Attachment>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voice: Option<Voice>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sla {
    pub first_response_due: String,
    pub resolution_due: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Triage {
    // `Cow` and `Arc` so that triage fills these without allocating: the category and severity
    // names are static and the rule ids are shared with the rule set.
    pub category: Cow<'static, str>,
    pub severity: Cow<'static, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_level: Option<u8>,
    pub sla: Sla,
    pub reasons: Vec<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComplaintRecord {
    pub schema: String,
    pub id: String,
    pub received_at: String,
    pub channel: ChannelKind,
    pub provider: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_message_id: Option<String>,
    pub customer: Customer,
    pub conversation: Conversation,
    pub content: Content,
    pub triage: Triage,
    pub dedupe_key: String,
    pub trace_id: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-22T08:15:30.123Z`.
pub fn rfc3339_ms(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Plain text for the record: trims, turns CR/LF runs and tabs into single newlines/spaces, drops
/// control characters. (HTML stripping belongs to the channels that receive HTML.)
pub fn normalize_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pending_space = false;
    let mut pending_newlines = 0u8;
    for c in s.chars() {
        match c {
            '\n' => pending_newlines = (pending_newlines + 1).min(2),
            '\r' => {}
            c if c.is_whitespace() => pending_space = true,
            c if c.is_control() => {}
            c => {
                if !out.is_empty() {
                    if pending_newlines > 0 {
                        for _ in 0..pending_newlines {
                            out.push('\n');
                        }
                    } else if pending_space {
                        out.push(' ');
                    }
                }
                pending_space = false;
                pending_newlines = 0;
                out.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_whitespace_is_normalised() {
        assert_eq!(
            normalize_text("  no   signal\r\n\r\n\r\nsince\tmorning \u{7} "),
            "no signal\n\nsince morning"
        );
        assert_eq!(normalize_text("网络  很差\n"), "网络 很差");
        assert_eq!(normalize_text(" \n "), "");
    }

    #[test]
    fn timestamps_have_milliseconds_and_z() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-22T08:15:30.123456+08:00")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(rfc3339_ms(t), "2026-11-22T00:15:30.123Z");
    }
}
