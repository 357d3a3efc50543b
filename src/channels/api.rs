//! `POST /v1/events`: signed JSON from the operator's own systems (app, terminals, shops, CRM,
//! IVR platforms without a provider format).
//!
//! Signature: `X-Switchboard-Signature: v1=<hex>` where hex is HMAC-SHA256(secret,
//! `<X-Switchboard-Timestamp> + "." + <raw body>`), timestamp in unix seconds within
//! `api.timestamp_tolerance_secs` (both directions). Several `v1=` values may be sent, comma
//! separated; any match passes. Two secrets are accepted during rotation.
//!
//! Body: one event object, or an array of them (at most `api.max_batch`). The schema is in the
//! README and `docs/openapi.yaml`. Unknown fields are rejected so a typo does not lose data.

use crate::auth;
use crate::config::ApiChannelConfig;
use crate::error::{Reason, Rejection};
use crate::http::{json_response, Resp};
use crate::identity::{RawIdentity, SocialId};
use crate::pipeline::{Accepted, Pipeline, RequestCtx};
use crate::record::{Attachment, ChannelKind, Intake};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use hyper::http::request::Parts;
use hyper::StatusCode;
use serde::Deserialize;
use std::collections::BTreeMap;

pub const NAME: &str = "api";
pub const TIMESTAMP_HEADER: &str = "x-switchboard-timestamp";
pub const SIGNATURE_HEADER: &str = "x-switchboard-signature";

const MAX_ID: usize = 200;
const MAX_SHORT: usize = 256;
const MAX_METADATA: usize = 64;
const MAX_METADATA_VALUE: usize = 1024;
const MAX_ATTACHMENTS: usize = 50;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// The sending system's id for this event; redeliveries with the same id are duplicates.
    pub event_id: String,
    /// The sending system (`crm`, `app`, `ivr-platform`...); scopes `event_id`. Default `api`.
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub occurred_at: Option<DateTime<Utc>>,
    pub customer: EventCustomer,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub language: Option<String>,
    #[serde(default)]
    pub thread_id: Option<String>,
    #[serde(default)]
    pub in_reply_to: Option<String>,
    #[serde(default)]
    pub attachments: Vec<EventAttachment>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EventCustomer {
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub social: Option<EventSocial>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSocial {
    pub platform: String,
    #[serde(default)]
    pub account: Option<String>,
    pub id: String,
    #[serde(default)]
    pub handle: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventAttachment {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub sha256: Option<String>,
    pub url: String,
}

pub struct ApiChannel {
    cfg: ApiChannelConfig,
}

fn invalid(msg: impl Into<String>) -> Rejection {
    Rejection::new(Reason::InvalidEvent, msg)
}

fn check_len(field: &str, v: Option<&str>, max: usize) -> Result<(), Rejection> {
    match v {
        Some(s) if s.chars().count() > max => {
            Err(invalid(format!("{field}: longer than {max} characters")))
        }
        _ => Ok(()),
    }
}

impl ApiChannel {
    pub fn new(cfg: ApiChannelConfig) -> Self {
        Self { cfg }
    }

    /// Verifies, parses and submits; answers 202 with the record id(s).
    pub async fn process(
        &self,
        parts: &Parts,
        body: Bytes,
        pipeline: &Pipeline,
        ctx: &RequestCtx,
    ) -> Result<Resp, Rejection> {
        self.verify(parts, &body)?;
        let (events, batch) = self.parse(&body)?;
        let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
        let intakes = events
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                to_intake(e).map_err(|r| {
                    if batch {
                        Rejection::new(r.reason, format!("[{i}] {}", r.message))
                    } else {
                        r
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let accepted = pipeline.submit(ctx, intakes).await?;
        let item = |(event_id, a): (&String, &Accepted)| serde_json::json!({ "event_id": event_id, "id": a.id.to_string(), "duplicate": a.duplicate });
        let body = if batch {
            serde_json::json!({ "results": ids.iter().zip(&accepted).map(item).collect::<Vec<_>>() })
        } else {
            item((&ids[0], &accepted[0]))
        };
        Ok(json_response(StatusCode::ACCEPTED, body.to_string()))
    }

    /// Content type must be JSON (checked before the body is read).
    pub fn check_content_type(headers: &hyper::HeaderMap) -> Result<(), Rejection> {
        super::require_content_type(headers, &["application/json"])
    }

    fn verify(&self, parts: &Parts, body: &[u8]) -> Result<(), Rejection> {
        if self.cfg.signature_mode == crate::config::SignatureMode::Off {
            return Ok(());
        }
        let outcome = (|| {
            let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
            let (Some(ts), Some(sig)) = (header(TIMESTAMP_HEADER), header(SIGNATURE_HEADER)) else {
                return Err(Reason::MissingSignature);
            };
            let ts_num: i64 = ts.trim().parse().map_err(|_| Reason::BadSignature)?;
            if !auth::timestamp_fresh(
                ts_num,
                Utc::now().timestamp(),
                self.cfg.timestamp_tolerance_secs,
            ) {
                return Err(Reason::StaleTimestamp);
            }
            let ts = ts.trim();
            let matched = sig
                .split(',')
                .filter_map(|p| p.trim().strip_prefix("v1="))
                .find_map(|hex| {
                    auth::verify_hmac_sha256_hex(
                        &self.cfg.secrets,
                        &[ts.as_bytes(), b".", body],
                        hex,
                    )
                });
            match matched {
                Some(i) => {
                    if i > 0 {
                        tracing::info!(channel = NAME, "request signed with the previous secret");
                    }
                    Ok(())
                }
                None => Err(Reason::BadSignature),
            }
        })();
        auth::apply_mode(self.cfg.signature_mode, NAME, outcome)
    }

    /// One event or an array of them. Syntax errors are `malformed_json`; well-formed JSON that is
    /// not an event is `invalid_event`, with the path of the offending field.
    pub(crate) fn parse(&self, body: &[u8]) -> Result<(Vec<Event>, bool), Rejection> {
        let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
        let classify = |e: serde_path_to_error::Error<serde_json::Error>| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let reason = match inner.classify() {
                serde_json::error::Category::Data => Reason::InvalidEvent,
                _ => Reason::MalformedJson,
            };
            let msg = if reason == Reason::InvalidEvent && path != "." {
                format!("{path}: {inner}")
            } else {
                inner.to_string()
            };
            Rejection::new(reason, msg)
        };
        match first {
            Some(b'[') => {
                let mut de = serde_json::Deserializer::from_slice(body);
                let events: Vec<Event> =
                    serde_path_to_error::deserialize(&mut de).map_err(classify)?;
                de.end()
                    .map_err(|e| Rejection::new(Reason::MalformedJson, e.to_string()))?;
                if events.is_empty() {
                    return Err(invalid("batch is empty"));
                }
                if events.len() > self.cfg.max_batch {
                    return Err(Rejection::new(
                        Reason::BatchTooLarge,
                        format!(
                            "batch has {} events; at most {} per request",
                            events.len(),
                            self.cfg.max_batch
                        ),
                    ));
                }
                Ok((events, true))
            }
            Some(b'{') => {
                let mut de = serde_json::Deserializer::from_slice(body);
                let event: Event = serde_path_to_error::deserialize(&mut de).map_err(classify)?;
                de.end()
                    .map_err(|e| Rejection::new(Reason::MalformedJson, e.to_string()))?;
                Ok((vec![event], false))
            }
            _ => Err(Rejection::new(
                Reason::MalformedJson,
                "body must be a JSON object (one event) or array (a batch)",
            )),
        }
    }
}

impl super::Channel for ApiChannel {
    fn name(&self) -> &'static str {
        NAME
    }

    fn precheck(&self, parts: &Parts, _ctx: &RequestCtx) -> Result<(), Rejection> {
        if parts.method != hyper::Method::POST {
            return Err(Rejection::new(Reason::MethodNotAllowed, "use POST"));
        }
        Self::check_content_type(&parts.headers)
    }

    fn handle<'a>(
        &'a self,
        inbound: super::Inbound,
        pipeline: &'a Pipeline,
    ) -> futures_util::future::BoxFuture<'a, Result<Resp, Rejection>> {
        Box::pin(async move {
            self.process(&inbound.parts, inbound.body, pipeline, &inbound.ctx)
                .await
        })
    }
}

pub(crate) fn to_intake(e: Event) -> Result<Intake, Rejection> {
    if e.event_id.trim().is_empty() {
        return Err(invalid("event_id: must not be empty"));
    }
    check_len("event_id", Some(&e.event_id), MAX_ID)?;
    let source = e.source.unwrap_or_else(|| "api".into());
    if source.is_empty()
        || source.len() > 64
        || !source
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(invalid(
            "source: 1-64 characters of a-z, 0-9, '.', '_', '-'",
        ));
    }
    for (field, v) in [
        ("subject", e.subject.as_deref()),
        ("language", e.language.as_deref()),
        ("thread_id", e.thread_id.as_deref()),
        ("in_reply_to", e.in_reply_to.as_deref()),
        ("customer.name", e.customer.name.as_deref()),
        ("customer.id", e.customer.id.as_deref()),
    ] {
        check_len(field, v, MAX_SHORT)?;
    }
    if e.metadata.len() > MAX_METADATA {
        return Err(invalid(format!(
            "metadata: more than {MAX_METADATA} entries"
        )));
    }
    for (k, v) in &e.metadata {
        if k.is_empty() || k.len() > 64 {
            return Err(invalid("metadata: keys need 1-64 characters"));
        }
        if v.chars().count() > MAX_METADATA_VALUE {
            return Err(invalid(format!(
                "metadata.{k}: longer than {MAX_METADATA_VALUE} characters"
            )));
        }
    }
    if e.attachments.len() > MAX_ATTACHMENTS {
        return Err(invalid(format!("attachments: more than {MAX_ATTACHMENTS}")));
    }
    let mut metadata = e.metadata;
    metadata.insert("source".into(), source.clone());
    let mut intake = Intake::new(ChannelKind::Api, NAME, e.text);
    intake.provider_message_id = Some(e.event_id);
    intake.account = Some(source);
    intake.occurred_at = e.occurred_at;
    intake.subject = e.subject;
    intake.language = e.language;
    intake.thread_id = e.thread_id;
    intake.in_reply_to = e.in_reply_to;
    intake.metadata = metadata;
    intake.attachments = e
        .attachments
        .into_iter()
        .map(|a| Attachment {
            name: a.name,
            content_type: a.content_type,
            size: a.size,
            sha256: a.sha256,
            url: Some(a.url),
            ..Default::default()
        })
        .collect();
    intake.identity = RawIdentity {
        phone: e.customer.phone,
        email: e.customer.email,
        customer_id: e.customer.id,
        name: e.customer.name,
        social: e.customer.social.map(|s| SocialId {
            platform: s.platform,
            account: s.account,
            id: s.id,
            handle: s.handle,
        }),
    };
    Ok(intake)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SignatureMode;

    fn channel(mode: SignatureMode) -> ApiChannel {
        ApiChannel::new(ApiChannelConfig {
            signature_mode: mode,
            secrets: vec!["test-secret-0000001".into(), "old-secret-00000002".into()],
            timestamp_tolerance_secs: 300,
            max_batch: 3,
        })
    }

    fn parts(headers: &[(&str, String)]) -> Parts {
        let mut b = hyper::Request::builder().method("POST").uri("/v1/events");
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn signed(secret: &str, ts: i64, body: &[u8]) -> Parts {
        let sig = auth::sign_hex(secret, &[ts.to_string().as_bytes(), b".", body]);
        parts(&[
            (TIMESTAMP_HEADER, ts.to_string()),
            (SIGNATURE_HEADER, format!("v1={sig}")),
            ("content-type", "application/json".into()),
        ])
    }

    #[test]
    fn signatures_enforced_with_rotation_and_window() {
        let c = channel(SignatureMode::Enforce);
        let body = br#"{"event_id":"1"}"#;
        let now = Utc::now().timestamp();
        c.verify(&signed("test-secret-0000001", now, body), body)
            .unwrap();
        c.verify(&signed("old-secret-00000002", now, body), body)
            .unwrap();
        let e = c
            .verify(&signed("wrong-secret-000000", now, body), body)
            .unwrap_err();
        assert_eq!(e.reason, Reason::BadSignature);
        let e = c
            .verify(&signed("test-secret-0000001", now - 301, body), body)
            .unwrap_err();
        assert_eq!(e.reason, Reason::StaleTimestamp);
        let e = c
            .verify(&signed("test-secret-0000001", now + 301, body), body)
            .unwrap_err();
        assert_eq!(e.reason, Reason::StaleTimestamp);
        let e = c.verify(&parts(&[]), body).unwrap_err();
        assert_eq!(e.reason, Reason::MissingSignature);
        // Tampered body.
        let p = signed("test-secret-0000001", now, body);
        assert!(c.verify(&p, br#"{"event_id":"2"}"#).is_err());
        // Several v1 values: any may match.
        let good = auth::sign_hex(
            "test-secret-0000001",
            &[now.to_string().as_bytes(), b".", body],
        );
        let p = parts(&[
            (TIMESTAMP_HEADER, now.to_string()),
            (SIGNATURE_HEADER, format!("v1=00ff, v1={good}")),
        ]);
        c.verify(&p, body).unwrap();
        channel(SignatureMode::LogOnly)
            .verify(&parts(&[]), body)
            .unwrap();
        channel(SignatureMode::Off)
            .verify(&parts(&[]), body)
            .unwrap();
    }

    #[test]
    fn parse_single_batch_and_errors() {
        let c = channel(SignatureMode::Off);
        let one = br#"{"event_id":"e1","customer":{"phone":"13800138000"},"text":"hi"}"#;
        let (ev, batch) = c.parse(one).unwrap();
        assert_eq!((ev.len(), batch), (1, false));
        let many = format!(
            "[{},{}]",
            std::str::from_utf8(one).unwrap(),
            std::str::from_utf8(one).unwrap()
        );
        let (ev, batch) = c.parse(many.as_bytes()).unwrap();
        assert_eq!((ev.len(), batch), (2, true));

        let e = c.parse(b"{\"event_id\": ").unwrap_err();
        assert_eq!(e.reason, Reason::MalformedJson);
        let e = c.parse(b"\"just a string\"").unwrap_err();
        assert_eq!(e.reason, Reason::MalformedJson);
        let e = c
            .parse(br#"{"event_id":"e1","customer":{"phone":"1"},"txet":"typo"}"#)
            .unwrap_err();
        assert_eq!(e.reason, Reason::InvalidEvent);
        assert!(e.message.contains("txet"), "{}", e.message);
        let e = c.parse(br#"{"event_id":5,"customer":{}}"#).unwrap_err();
        assert_eq!(e.reason, Reason::InvalidEvent);
        assert!(e.message.starts_with("event_id"), "{}", e.message);
        let e = c.parse(b"[]").unwrap_err();
        assert_eq!(e.reason, Reason::InvalidEvent);
        let four = format!("[{0},{0},{0},{0}]", std::str::from_utf8(one).unwrap());
        assert_eq!(
            c.parse(four.as_bytes()).unwrap_err().reason,
            Reason::BatchTooLarge
        );
        let e = c
            .parse(br#"{"event_id":"a","customer":{}} trailing"#)
            .unwrap_err();
        assert_eq!(e.reason, Reason::MalformedJson);
    }

    #[test]
    fn intake_scopes_event_id_by_source() {
        let ev: Event = serde_json::from_str(
            r#"{"event_id":"e1","source":"crm","customer":{"email":"A@b.cn"},"text":"t","metadata":{"area":"sz"}}"#,
        )
        .unwrap();
        let i = to_intake(ev).unwrap();
        assert_eq!(i.account.as_deref(), Some("crm"));
        assert_eq!(i.provider, "api");
        assert_eq!(i.metadata.get("source").map(String::as_str), Some("crm"));
        let bad: Event =
            serde_json::from_str(r#"{"event_id":"e1","source":"c r m","customer":{}}"#).unwrap();
        assert!(to_intake(bad).is_err());
    }

    fn hdrs(h: &[(&str, String)]) -> hyper::HeaderMap {
        parts(h).headers
    }

    #[test]
    fn content_type_must_be_json() {
        ApiChannel::check_content_type(&hdrs(&[(
            "content-type",
            "application/json; charset=utf-8".into(),
        )]))
        .unwrap();
        let e = ApiChannel::check_content_type(&hdrs(&[("content-type", "text/plain".into())]))
            .unwrap_err();
        assert_eq!(e.reason, Reason::UnsupportedMediaType);
        assert!(ApiChannel::check_content_type(&hdrs(&[])).is_err());
    }
}
