//! Email: raw MIME (from the SMTP listener or an inbound-parse webhook) to an `Intake`.
//!
//! mail-parser (with `full_encoding`, so GBK/GB18030/Big5/ISO-2022-JP decode instead of turning
//! into replacement characters) does the parsing; we add what it lacks: a cap on MIME nesting
//! depth and part count, attachment bytes written to the attachment store within its quotas (the
//! record keeps name, type, size, sha256 and a reference, or `stored: false` and why the bytes
//! were omitted), HTML-only mail converted to text, threading headers to
//! conversation fields, and RFC 3834 auto-submitted detection (recorded, flagged, never
//! auto-acknowledged). Dedupe: intake address + Message-ID, else a hash of the content.

use crate::error::{Reason, Rejection};
use crate::record::{Attachment, ChannelKind, Intake};
use mail_parser::{Address, HeaderValue, Message, MessageParser, MimeHeaders, PartType};
use sha2::{Digest, Sha256};
use std::sync::Arc;

use crate::attachments::{AttachmentStore, MessageBudget};

pub const NAME: &str = "email";

/// What the envelope says (SMTP MAIL FROM / RCPT TO, or the webhook's envelope fields).
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    pub mail_from: String,
    /// The intake address this copy was delivered to.
    pub rcpt_to: String,
}

/// The parsed mail: the intake, plus what the acknowledgement needs.
#[derive(Debug, Clone)]
pub struct ParsedMail {
    pub intake: Intake,
    /// Why this mail must never be auto-acknowledged (auto-reply, bounce, list), if it must not.
    pub auto_submitted: Option<String>,
    /// Where a reply goes (Reply-To, else From), lowercased.
    pub reply_address: Option<String>,
    pub message_id: Option<String>,
    pub references: Vec<String>,
    pub subject: Option<String>,
}

#[derive(Debug, Clone)]
pub struct EmailParser {
    pub max_depth: usize,
    pub max_parts: usize,
    /// Where attachment bytes go (within its quotas); `None`: metadata only.
    pub store: Option<Arc<AttachmentStore>>,
}

/// Something the identity stage accepts as an address. Anything else (a broken header, an
/// address a strict check refuses) is ignored and the next source used, so no complaint mail
/// is refused over its sender's address.
fn plausible_address(a: &str) -> bool {
    !a.contains(['<', '>', ',', ';', '"']) && crate::identity::normalize_email(a).is_ok()
}

fn address_of(a: Option<&Address<'_>>) -> Option<(Option<String>, String)> {
    let first = a?.first()?;
    let addr = first.address()?.trim().to_lowercase();
    if !plausible_address(&addr) {
        return None;
    }
    Some((
        first
            .name()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty()),
        addr,
    ))
}

fn text_list(v: &HeaderValue<'_>) -> Vec<String> {
    match v {
        HeaderValue::Text(t) => vec![t.to_string()],
        HeaderValue::TextList(l) => l.iter().map(|t| t.to_string()).collect(),
        _ => Vec::new(),
    }
}

/// MIME depth of the message (nested multiparts and attached messages), iteratively: a hostile
/// message cannot recurse us off the stack.
fn depth(msg: &Message<'_>) -> usize {
    let mut max = 0;
    let mut stack: Vec<(&Message<'_>, u32, usize)> = vec![(msg, 0, 1)];
    while let Some((m, part, d)) = stack.pop() {
        max = max.max(d);
        let Some(p) = m.parts.get(part as usize) else {
            continue;
        };
        match &p.body {
            PartType::Multipart(children) => {
                for c in children {
                    stack.push((m, *c, d + 1));
                }
            }
            PartType::Message(inner) => stack.push((inner, 0, d + 1)),
            _ => {}
        }
    }
    max
}

fn total_parts(msg: &Message<'_>) -> usize {
    let mut n = 0;
    let mut stack = vec![msg];
    while let Some(m) = stack.pop() {
        n += m.parts.len();
        for p in &m.parts {
            if let PartType::Message(inner) = &p.body {
                stack.push(inner);
            }
        }
    }
    n
}

/// RFC 3834 and de-facto signals that a mail was sent by a machine.
pub fn auto_submitted(msg: &Message<'_>, envelope: &Envelope) -> Option<String> {
    let header = |name: &str| msg.header_raw(name).map(|v| v.trim().to_ascii_lowercase());
    if let Some(v) = header("Auto-Submitted") {
        if !v.is_empty() && v != "no" {
            return Some(format!(
                "auto-submitted:{}",
                v.split(';').next().unwrap_or("").trim()
            ));
        }
    }
    let return_path = msg.header_raw("Return-Path").map(str::trim);
    if return_path == Some("<>") || (envelope.mail_from.is_empty() && !envelope.rcpt_to.is_empty())
    {
        return Some("null-sender".into());
    }
    if msg.content_type().is_some_and(|ct| {
        ct.ctype().eq_ignore_ascii_case("multipart")
            && ct
                .subtype()
                .is_some_and(|s| s.eq_ignore_ascii_case("report"))
    }) {
        return Some("multipart-report".into());
    }
    if let Some(p) = header("Precedence") {
        if matches!(p.as_str(), "bulk" | "list" | "junk" | "auto_reply") {
            return Some(format!("precedence:{p}"));
        }
    }
    if header("X-Autoreply").is_some() || header("X-Autorespond").is_some() {
        return Some("x-autoreply".into());
    }
    if header("X-Loop").is_some() {
        return Some("x-loop".into());
    }
    if msg.header_raw("List-Id").is_some() || msg.header_raw("List-Unsubscribe").is_some() {
        return Some("mailing-list".into());
    }
    None
}

impl EmailParser {
    /// Parses `raw` into an intake. Attachment bytes are written to the store here; one that
    /// is not stored (a quota, a full disk) leaves the mail recorded with `stored: false`.
    pub fn parse(&self, raw: &[u8], envelope: &Envelope) -> Result<ParsedMail, Rejection> {
        let msg = MessageParser::default()
            .parse(raw)
            .ok_or_else(|| Rejection::new(Reason::InvalidEvent, "not an RFC 5322 message"))?;
        let parts = total_parts(&msg);
        if parts > self.max_parts {
            return Err(Rejection::new(
                Reason::BodyTooLarge,
                format!("message has {parts} MIME parts; at most {}", self.max_parts),
            ));
        }
        let d = depth(&msg);
        if d > self.max_depth {
            return Err(Rejection::new(
                Reason::BodyTooLarge,
                format!("MIME nesting {d} levels deep; at most {}", self.max_depth),
            ));
        }

        let from = address_of(msg.from()).or_else(|| address_of(msg.sender()));
        let reply_to = address_of(msg.reply_to());
        let envelope_from =
            Some(envelope.mail_from.trim().to_lowercase()).filter(|s| s.contains('@'));
        let sender_email = from.as_ref().map(|(_, a)| a.clone()).or(envelope_from);
        let subject = msg
            .subject()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        let text = match msg.body_text(0) {
            Some(t) => t.into_owned(),
            None => msg
                .body_html(0)
                .map(|h| mail_parser::decoders::html::html_to_text(&h))
                .unwrap_or_default(),
        };
        let message_id = msg
            .message_id()
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty());
        let in_reply_to = text_list(msg.in_reply_to()).into_iter().next();
        let references = text_list(msg.references());

        // A complaint written only in the subject line is still a complaint.
        let text = if text.trim().is_empty() {
            subject.clone().unwrap_or_default()
        } else {
            text
        };
        let mut intake = Intake::new(ChannelKind::Email, NAME, text);
        intake.subject = subject.clone();
        intake.identity.email = sender_email;
        intake.identity.name = from.as_ref().and_then(|(n, _)| n.clone());
        intake.account = Some(envelope.rcpt_to.trim().to_lowercase());
        intake.provider_message_id = Some(match &message_id {
            Some(m) => m.clone(),
            // No Message-ID: the content decides (re-sent copies collapse, new mail does not).
            None => {
                let mut h = Sha256::new();
                for name in ["Date", "From", "Subject"] {
                    h.update(msg.header_raw(name).unwrap_or("").as_bytes());
                    h.update([0]);
                }
                h.update(msg.body_text(0).unwrap_or_default().as_bytes());
                format!("sha256:{}", hex::encode(h.finalize()))
            }
        });
        if intake.identity.email.is_none() {
            // No usable sender address at all: the message itself is the identity.
            intake.identity.social = Some(crate::identity::SocialId {
                platform: "email".into(),
                account: Some(envelope.rcpt_to.trim().to_lowercase()).filter(|a| !a.is_empty()),
                id: intake.provider_message_id.clone().unwrap_or_default(),
                handle: None,
            });
        }
        intake.in_reply_to = in_reply_to.clone();
        // A thread is named by its root: the first reference, else what this replies to, else itself.
        intake.thread_id = references
            .first()
            .cloned()
            .or(in_reply_to)
            .or_else(|| message_id.clone());
        intake.occurred_at = msg
            .date()
            .and_then(|d| chrono::DateTime::parse_from_rfc3339(&d.to_rfc3339()).ok())
            .map(|d| d.with_timezone(&chrono::Utc));
        intake.metadata.insert(
            "intake_address".into(),
            envelope.rcpt_to.trim().to_lowercase(),
        );
        let auto = auto_submitted(&msg, envelope);
        if let Some(a) = &auto {
            intake.metadata.insert("auto_submitted".into(), a.clone());
        }
        if let Some((_, r)) = &reply_to {
            intake.metadata.insert("reply_to".into(), r.clone());
        }
        // Per-sender quota: the sender's address (From, else the envelope sender).
        let sender = intake
            .identity
            .email
            .clone()
            .unwrap_or_else(|| envelope.mail_from.trim().to_lowercase());
        let mut budget = MessageBudget::default();
        for part in msg.attachments() {
            let bytes = part.contents();
            let sha = hex::encode(Sha256::digest(bytes));
            let (url, stored, omitted) = match &self.store {
                None => (None, None, None),
                Some(store) => match store.put(&sender, &mut budget, &sha, bytes) {
                    Ok(url) => (Some(url), Some(true), None),
                    Err(why) => (None, Some(false), Some(why.code().to_string())),
                },
            };
            intake.attachments.push(Attachment {
                name: part.attachment_name().map(str::to_string),
                content_type: part.content_type().map(|ct| match ct.subtype() {
                    Some(s) => format!("{}/{}", ct.ctype(), s),
                    None => ct.ctype().to_string(),
                }),
                size: Some(bytes.len() as u64),
                sha256: Some(sha),
                url,
                stored,
                omitted,
            });
        }
        let reply_address = reply_to
            .map(|(_, a)| a)
            .or_else(|| intake.identity.email.clone());
        Ok(ParsedMail {
            intake,
            auto_submitted: auto,
            reply_address,
            message_id,
            references,
            subject,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser(dir: Option<std::path::PathBuf>) -> EmailParser {
        EmailParser {
            max_depth: 10,
            max_parts: 100,
            store: dir.map(|d| {
                AttachmentStore::open(
                    d,
                    "attachment:".into(),
                    crate::attachments::StoreLimits::from_config(&Default::default()),
                )
            }),
        }
    }

    fn env() -> Envelope {
        Envelope {
            mail_from: "li.na@example.com".into(),
            rcpt_to: "Complaints@Operator.example".into(),
        }
    }

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/email/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn chinese_charsets_and_encoded_words_decode() {
        for (file, subject, text) in [
            ("gbk.eml", "宽带断网投诉", "我家宽带从昨天开始断网"),
            ("gb18030.eml", "话费争议", "本月话费多扣了五十元"),
            ("big5.eml", "網路斷線", "網路從昨天開始斷線"),
            (
                "iso2022jp.eml",
                "回線の不具合",
                "インターネットが繋がりません",
            ),
        ] {
            let m = parser(None).parse(&fixture(file), &env()).unwrap();
            assert_eq!(m.subject.as_deref(), Some(subject), "{file}");
            assert!(m.intake.text.contains(text), "{file}: {}", m.intake.text);
        }
    }

    #[test]
    fn html_only_threading_and_identity() {
        let m = parser(None)
            .parse(&fixture("html_only_reply.eml"), &env())
            .unwrap();
        assert!(
            m.intake.text.contains("Still no dial tone"),
            "{}",
            m.intake.text
        );
        assert!(!m.intake.text.contains("<p>"));
        assert_eq!(
            m.intake.identity.email.as_deref(),
            Some("alice@example.org")
        );
        assert_eq!(m.intake.identity.name.as_deref(), Some("Alice Zhang"));
        assert_eq!(
            m.message_id.as_deref(),
            Some("20240520101503.1234@example.org")
        );
        assert_eq!(
            m.intake.in_reply_to.as_deref(),
            Some("ticket-12345@support.example.com")
        );
        assert_eq!(
            m.intake.thread_id.as_deref(),
            Some("ticket-12345@support.example.com")
        );
        assert_eq!(
            m.reply_address.as_deref(),
            Some("alice.replies@example.org")
        );
        assert_eq!(
            m.intake.account.as_deref(),
            Some("complaints@operator.example")
        );
        assert!(m.auto_submitted.is_none());
    }

    #[test]
    fn attachments_are_stored_by_hash() {
        let dir = tempfile::tempdir().unwrap();
        let m = parser(Some(dir.path().to_path_buf()))
            .parse(&fixture("attachments.eml"), &env())
            .unwrap();
        assert_eq!(m.intake.attachments.len(), 2);
        let a = &m.intake.attachments[0];
        assert_eq!(a.name.as_deref(), Some("bill.pdf"));
        assert_eq!(a.content_type.as_deref(), Some("application/pdf"));
        let sha = a.sha256.clone().unwrap();
        let stored = std::fs::read(dir.path().join(&sha)).unwrap();
        assert_eq!(stored.len() as u64, a.size.unwrap());
        assert_eq!(hex::encode(Sha256::digest(&stored)), sha);
        assert_eq!(a.url.as_deref(), Some(format!("attachment:{sha}").as_str()));
        assert_eq!(
            m.intake.attachments[1].name.as_deref(),
            Some("信号截图.png")
        );
    }

    #[test]
    fn auto_submitted_mail_is_flagged() {
        for (file, why) in [
            ("auto_reply.eml", "auto-submitted:auto-replied"),
            ("bounce.eml", "null-sender"),
            ("bulk.eml", "precedence:bulk"),
        ] {
            let m = parser(None).parse(&fixture(file), &env()).unwrap();
            assert_eq!(m.auto_submitted.as_deref(), Some(why), "{file}");
            assert_eq!(m.intake.metadata["auto_submitted"], why);
        }
    }

    #[test]
    fn nesting_and_part_caps_hold() {
        let nested = fixture("nested.eml");
        assert!(parser(None).parse(&nested, &env()).is_ok());
        let tight = EmailParser {
            max_depth: 2,
            ..parser(None)
        };
        let e = tight.parse(&nested, &env()).unwrap_err();
        assert!(e.message.contains("nesting"), "{}", e.message);
        let few = EmailParser {
            max_parts: 2,
            ..parser(None)
        };
        assert!(few
            .parse(&nested, &env())
            .unwrap_err()
            .message
            .contains("parts"));
    }

    #[test]
    fn no_message_id_falls_back_to_a_content_hash() {
        let raw =
            b"From: a@b.cn\r\nSubject: x\r\nDate: Mon, 20 May 2024 10:00:00 +0800\r\n\r\nbody\r\n";
        let a = parser(None).parse(raw, &env()).unwrap();
        let b = parser(None).parse(raw, &env()).unwrap();
        assert!(a
            .intake
            .provider_message_id
            .as_deref()
            .unwrap()
            .starts_with("sha256:"));
        assert_eq!(a.intake.provider_message_id, b.intake.provider_message_id);
        let malformed =
            b"From: <<<broken\r\nSubject: =?GBK?B?broken?=\r\nX: \xff\xfe\r\n\r\ntext\r\n";
        let m = parser(None).parse(malformed, &env()).unwrap();
        assert_eq!(m.intake.text.trim(), "text");
        assert_eq!(
            m.intake.identity.email.as_deref(),
            Some("li.na@example.com"),
            "envelope sender as fallback"
        );
    }
}
