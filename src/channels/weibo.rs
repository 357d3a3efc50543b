//! Weibo fan service (粉丝服务平台) message push on `GET, POST /hooks/weibo` (CHANNELS.md §5.3).
//!
//! - Verification: the query carries `signature`, `timestamp`, `nonce`;
//!   `signature = hex(SHA1(concat(sort([app_secret, timestamp, nonce]))))`, checked against each
//!   configured app secret (two during rotation) before the body is read. `GET` (URL
//!   verification) answers `echostr` verbatim. The signature does not cover the body, so
//!   `allow_networks` should hold Weibo's push addresses in production.
//! - `POST` JSON `{type, receiver_id, sender_id, created_at, text, data}`. `text`, `mention`,
//!   `position`, `image` and `voice` become records; `event` (follow, unfollow, click, …) and
//!   unknown types are acknowledged and ignored.
//! - Weibo gives no message id: `provider_message_id` is `hash:<first 32 hex of
//!   SHA-256(sender_id, created_at, type, text, data)>`, scoped by `receiver_id` (metadata
//!   `provider_message_id_source=content_hash`), so its retries (3, within 5 s each) collapse.
//! - Images and voice are referenced as `weibo-file:<tovfid>` (the receiving account's file id).
//! - Replies 200 with an empty body (no passive reply) once durable.

use super::{network_and_token, Allowlist, Channel, Inbound};
use crate::config::SignatureMode;
use crate::error::{Reason, Rejection};
use crate::http::{text_response, Resp};
use crate::identity::{RawIdentity, SocialId};
use crate::pipeline::{Pipeline, RequestCtx};
use crate::record::{Attachment, ChannelKind, Intake, Voice};
use futures_util::future::BoxFuture;
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use sha2::{Digest, Sha256};

pub const NAME: &str = "weibo";
pub const ROUTE: &str = "/hooks/weibo";
/// Scheme of attachment references: `weibo-file:<fid>`.
pub const FILE_PREFIX: &str = "weibo-file:";
const MAX_DATA_FIELDS: usize = 16;

/// `[weibo]` in the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WeiboConfig {
    /// Query `signature` check (and `allow_networks`): enforce (403) | log_only | off.
    pub signature_mode: SignatureMode,
    /// The app secret (App Secret of the 粉丝服务 app): current first, previous during rotation.
    pub app_secrets: Vec<String>,
    /// Source networks allowed to push; empty: any.
    pub allow_networks: Vec<String>,
    /// POSTs whose `timestamp` (Weibo sends milliseconds) is further than this from now are
    /// refused: the signature does not cover the body, so an old signed query must not be
    /// reusable. 0: no check.
    pub timestamp_tolerance_secs: u64,
}

impl Default for WeiboConfig {
    fn default() -> Self {
        Self {
            signature_mode: SignatureMode::Enforce,
            app_secrets: Vec::new(),
            allow_networks: Vec::new(),
            timestamp_tolerance_secs: 300,
        }
    }
}

/// `hex(SHA1(sorted concat of app secret, timestamp, nonce))`.
pub fn signature(app_secret: &str, timestamp: &str, nonce: &str) -> String {
    let mut parts = [app_secret, timestamp, nonce];
    parts.sort_unstable();
    let mut h = Sha1::new();
    for p in parts {
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Whether a POST's `timestamp` (milliseconds, or seconds) is within `tolerance` of `now`.
fn fresh(query: &[(String, String)], now: i64, tolerance: u64) -> Result<(), Reason> {
    if tolerance == 0 {
        return Ok(());
    }
    let ts = super::form_get(query, "timestamp")
        .and_then(|t| t.trim().parse::<i64>().ok())
        .ok_or(Reason::StaleTimestamp)?;
    let secs = if ts > 100_000_000_000 { ts / 1000 } else { ts };
    if crate::auth::timestamp_fresh(secs, now, tolerance) {
        Ok(())
    } else {
        Err(Reason::StaleTimestamp)
    }
}

/// Checks the query's `signature` against every secret (constant-time comparisons).
fn verify_query(secrets: &[String], query: &[(String, String)]) -> Result<(), Reason> {
    let get = |k| super::form_get(query, k);
    let Some(sig) = get("signature").filter(|s| !s.is_empty()) else {
        return Err(Reason::MissingSignature);
    };
    let (Some(ts), Some(nonce)) = (get("timestamp"), get("nonce")) else {
        return Err(Reason::BadSignature);
    };
    let sig = sig.trim().to_ascii_lowercase();
    let ok = secrets.iter().fold(false, |ok, s| {
        ok | (!s.is_empty() && super::token_eq(&signature(s, ts, nonce), &sig))
    });
    if ok {
        Ok(())
    } else {
        Err(Reason::BadSignature)
    }
}

#[derive(Debug, Deserialize)]
struct Push {
    #[serde(rename = "type")]
    kind: String,
    receiver_id: serde_json::Value,
    sender_id: serde_json::Value,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    data: serde_json::Value,
}

/// A uid sent as a number or a string.
fn uid(v: &serde_json::Value, field: &str) -> Result<String, Rejection> {
    match v {
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        _ => Err(Rejection::new(
            Reason::InvalidEvent,
            format!("{field} must be a number or string"),
        )),
    }
}

fn scalar(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The dedupe id Weibo does not give: a hash of what identifies one push.
pub fn content_id(sender: &str, created_at: &str, kind: &str, text: &str, data: &str) -> String {
    let mut h = Sha256::new();
    for p in [sender, created_at, kind, text, data] {
        h.update(p.as_bytes());
        h.update([0x1f]);
    }
    format!("hash:{}", &hex::encode(h.finalize())[..32])
}

pub struct Weibo {
    cfg: WeiboConfig,
    allow: Allowlist,
}

impl Weibo {
    pub fn new(cfg: WeiboConfig, _normalizer: crate::identity::Normalizer) -> Result<Self, String> {
        let n = cfg.app_secrets.len();
        if n > 2 || (cfg.signature_mode != SignatureMode::Off && n == 0) {
            return Err("weibo.app_secrets: give one secret, or two during rotation".into());
        }
        if cfg.app_secrets.iter().any(|s| s.is_empty()) {
            return Err("weibo.app_secrets: secrets must not be empty".into());
        }
        let allow = Allowlist::parse(&cfg.allow_networks)
            .map_err(|e| format!("weibo.allow_networks: {e}"))?;
        Ok(Self { cfg, allow })
    }

    /// The intake for one push; `None` for events and types that carry no complaint.
    pub(crate) fn parse(&self, body: &[u8]) -> Result<Option<Intake>, Rejection> {
        let v: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| Rejection::new(Reason::MalformedJson, e.to_string()))?;
        if !v.is_object() {
            return Err(Rejection::new(
                Reason::InvalidEvent,
                "body must be a JSON object",
            ));
        }
        let p: Push = serde_json::from_value(v)
            .map_err(|e| Rejection::new(Reason::InvalidEvent, format!("not a Weibo push: {e}")))?;
        let kind = match p.kind.as_str() {
            k @ ("text" | "mention" | "position" | "image" | "voice") => k,
            "event" => {
                tracing::debug!(channel = NAME, "event ignored");
                return Ok(None);
            }
            _ => {
                tracing::debug!(channel = NAME, "unknown push type ignored");
                return Ok(None);
            }
        };
        let receiver = uid(&p.receiver_id, "receiver_id")?;
        let sender = uid(&p.sender_id, "sender_id")?;
        let created_at = p.created_at.unwrap_or_default();
        let text = p.text.unwrap_or_default();
        let data_json = match &p.data {
            serde_json::Value::Null => String::new(),
            d => d.to_string(),
        };
        let mut i = Intake::new(ChannelKind::Social, NAME, text.clone());
        i.provider_message_id = Some(content_id(&sender, &created_at, kind, &text, &data_json));
        i.account = Some(receiver.clone());
        i.thread_id = Some(format!("{receiver}:{sender}"));
        i.occurred_at =
            chrono::DateTime::parse_from_str(created_at.trim(), "%a %b %d %H:%M:%S %z %Y")
                .ok()
                .map(|t| t.with_timezone(&chrono::Utc));
        i.metadata.insert("weibo_type".into(), kind.into());
        i.metadata
            .insert("provider_message_id_source".into(), "content_hash".into());
        if let serde_json::Value::Object(d) = &p.data {
            for (k, v) in d.iter().take(MAX_DATA_FIELDS) {
                let key_ok = !k.is_empty()
                    && k.len() <= 32
                    && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if let (true, Some(s)) = (key_ok, scalar(v)) {
                    i.metadata.insert(format!("data.{k}"), s);
                }
            }
            if matches!(kind, "image" | "voice") {
                let fid = d.get("tovfid").or_else(|| d.get("vfid")).and_then(scalar);
                if let Some(fid) = fid.filter(|f| !f.is_empty()) {
                    let url = format!("{FILE_PREFIX}{fid}");
                    if kind == "voice" {
                        i.voice = Some(Voice {
                            recording_url: Some(url.clone()),
                            ..Default::default()
                        });
                    }
                    i.attachments.push(Attachment {
                        url: Some(url),
                        ..Default::default()
                    });
                }
            }
        }
        i.identity = RawIdentity {
            social: Some(SocialId {
                platform: NAME.into(),
                account: Some(receiver),
                id: sender,
                handle: None,
            }),
            ..Default::default()
        };
        if crate::record::normalize_text(&i.text).is_empty() && i.attachments.is_empty() {
            return Ok(None);
        }
        Ok(Some(i))
    }
}

fn empty() -> Resp {
    text_response(StatusCode::OK, "text/plain; charset=utf-8", "")
}

impl Channel for Weibo {
    fn name(&self) -> &'static str {
        NAME
    }

    fn allow(&self) -> &'static str {
        "GET, POST"
    }

    /// Source network and the query signature, before the body is read (it is not signed).
    fn precheck(&self, parts: &Parts, ctx: &RequestCtx) -> Result<(), Rejection> {
        super::get_or_post(parts, &["application/json", "text/json", "text/plain"])?;
        network_and_token(self.cfg.signature_mode, NAME, &self.allow, ctx.peer, None)?;
        let q = super::form_pairs(parts.uri.query().unwrap_or("").as_bytes());
        let outcome = verify_query(&self.cfg.app_secrets, &q).and_then(|()| {
            if parts.method == hyper::Method::POST {
                fresh(
                    &q,
                    chrono::Utc::now().timestamp(),
                    self.cfg.timestamp_tolerance_secs,
                )
            } else {
                Ok(())
            }
        });
        crate::auth::apply_mode(self.cfg.signature_mode, NAME, outcome)
    }

    fn handle<'a>(
        &'a self,
        inbound: Inbound,
        pipeline: &'a Pipeline,
    ) -> BoxFuture<'a, Result<Resp, Rejection>> {
        Box::pin(async move {
            if inbound.parts.method == Method::GET {
                let q = super::form_pairs(inbound.parts.uri.query().unwrap_or("").as_bytes());
                let echo = super::form_get(&q, "echostr")
                    .ok_or_else(|| Rejection::new(Reason::InvalidEvent, "echostr is missing"))?;
                return Ok(text_response(
                    StatusCode::OK,
                    "text/plain; charset=utf-8",
                    echo.to_string(),
                ));
            }
            if let Some(i) = self.parse(&inbound.body)? {
                pipeline.submit(&inbound.ctx, vec![i]).await?;
            }
            Ok(empty())
        })
    }

    fn reject(&self, r: &Rejection) -> Resp {
        super::provider_json_reject(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wb() -> Weibo {
        Weibo::new(
            WeiboConfig {
                app_secrets: vec!["unit-test-app-secret".into()],
                ..Default::default()
            },
            crate::identity::Normalizer::new("CN"),
        )
        .unwrap()
    }

    fn q(s: &str) -> Vec<(String, String)> {
        super::super::form_pairs(s.as_bytes())
    }

    /// CHANNELS.md §5.3 vector (doc example values, re-computed there).
    #[test]
    fn known_answer_vector() {
        assert_eq!(
            signature("xyz123xyz", "1397022061823", "57155157"),
            "90e4c22c90a58f26526c2dd5b6c56c8822edeaa1"
        );
        let secrets = vec!["new-secret".to_string(), "xyz123xyz".to_string()];
        let wb0 = "nonce=57155157&timestamp=1397022061823&echostr=dnPdpTZz85&signature=90e4c22c90a58f26526c2dd5b6c56c8822edeaa1";
        assert_eq!(verify_query(&secrets, &q(wb0)), Ok(()));
        assert_eq!(
            verify_query(
                &secrets,
                &q(&wb0
                    .to_uppercase()
                    .replace("SIGNATURE", "signature")
                    .replace("NONCE", "nonce")
                    .replace("TIMESTAMP", "timestamp"))
            ),
            Ok(())
        );
        assert_eq!(
            verify_query(&["new-secret".to_string()], &q(wb0)),
            Err(Reason::BadSignature)
        );
        assert_eq!(
            verify_query(&secrets, &q(&wb0.replace("57155157", "57155158"))),
            Err(Reason::BadSignature)
        );
        assert_eq!(
            verify_query(&secrets, &q("nonce=1&timestamp=2")),
            Err(Reason::MissingSignature)
        );
        assert_eq!(
            verify_query(
                &secrets,
                &q("signature=90e4c22c90a58f26526c2dd5b6c56c8822edeaa1")
            ),
            Err(Reason::BadSignature)
        );
    }

    #[test]
    fn wb1_text_message() {
        let i = wb()
            .parse(include_bytes!("../../tests/fixtures/weibo/text_wb1.json"))
            .unwrap()
            .unwrap();
        assert_eq!(i.channel, ChannelKind::Social);
        assert_eq!(i.provider, "weibo");
        assert_eq!(i.text, "私信或留言内容");
        assert_eq!(i.account.as_deref(), Some("1902538057"));
        assert_eq!(i.thread_id.as_deref(), Some("1902538057:2489518277"));
        let s = i.identity.social.as_ref().unwrap();
        assert_eq!(
            (s.platform.as_str(), s.id.as_str()),
            ("weibo", "2489518277")
        );
        assert_eq!(
            crate::record::rfc3339_ms(i.occurred_at.unwrap()),
            "2012-07-16T10:09:20.000Z"
        );
        let id = i.provider_message_id.unwrap();
        assert_eq!(
            id,
            content_id(
                "2489518277",
                "Mon Jul 16 18:09:20 +0800 2012",
                "text",
                "私信或留言内容",
                "{}"
            )
        );
        assert!(id.starts_with("hash:") && id.len() == 37);
        assert_eq!(i.metadata["provider_message_id_source"], "content_hash");
    }

    #[test]
    fn same_push_same_id_other_text_other_id() {
        let a = r#"{"type":"text","receiver_id":1,"sender_id":"2","created_at":"Mon Jul 16 18:09:20 +0800 2012","text":"断网","data":{"b":1,"a":2}}"#.as_bytes();
        let b = r#"{"data":{"a":2,"b":1},"text":"断网","created_at":"Mon Jul 16 18:09:20 +0800 2012","sender_id":2,"receiver_id":"1","type":"text"}"#.as_bytes();
        let c = r#"{"type":"text","receiver_id":1,"sender_id":2,"created_at":"Mon Jul 16 18:09:20 +0800 2012","text":"断网了","data":{}}"#.as_bytes();
        let id = |b: &[u8]| wb().parse(b).unwrap().unwrap().provider_message_id.unwrap();
        assert_eq!(id(a), id(b));
        assert_ne!(id(a), id(c));
    }

    #[test]
    fn unicode_is_byte_exact() {
        for text in ["家里宽带断网三天了😡", "الإنترنت لا يعمل", "👨‍👩‍👧📶"]
        {
            let body = serde_json::json!({"type":"text","receiver_id":1,"sender_id":2,
                "created_at":"Mon Jul 16 18:09:20 +0800 2012","text":text,"data":{}})
            .to_string();
            let i = wb().parse(body.as_bytes()).unwrap().unwrap();
            assert_eq!(i.text.as_bytes(), text.as_bytes());
        }
    }

    #[test]
    fn media_position_and_events() {
        let i = wb()
            .parse(include_bytes!("../../tests/fixtures/weibo/voice.json"))
            .unwrap()
            .unwrap();
        assert_eq!(
            i.attachments[0].url.as_deref(),
            Some("weibo-file:821804469")
        );
        assert_eq!(
            i.voice.unwrap().recording_url.as_deref(),
            Some("weibo-file:821804469")
        );
        let i = wb()
            .parse(include_bytes!("../../tests/fixtures/weibo/position.json"))
            .unwrap()
            .unwrap();
        assert_eq!(i.metadata["data.latitude"], "39.982525");
        assert_eq!(i.metadata["weibo_type"], "position");
        assert!(wb()
            .parse(include_bytes!(
                "../../tests/fixtures/weibo/event_follow.json"
            ))
            .unwrap()
            .is_none());
        assert!(wb()
            .parse(br#"{"type":"sticker","receiver_id":1,"sender_id":2}"#)
            .unwrap()
            .is_none());
    }

    #[test]
    fn bad_bodies_are_rejected_without_panic() {
        for (b, reason) in [
            (&b""[..], Reason::MalformedJson),
            (b"<xml/>", Reason::MalformedJson),
            (b"[]", Reason::InvalidEvent),
            (br#"{"type":"text"}"#, Reason::InvalidEvent),
            (
                br#"{"type":"text","receiver_id":null,"sender_id":2,"text":"x"}"#,
                Reason::InvalidEvent,
            ),
            (
                br#"{"type":"text","receiver_id":1,"sender_id":[],"text":"x"}"#,
                Reason::InvalidEvent,
            ),
        ] {
            assert_eq!(wb().parse(b).unwrap_err().reason, reason);
        }
        let odd = br#"{"type":"text","receiver_id":1e400,"sender_id":2,"created_at":"Fri Feb 30 99:99:99 +9999 99999","text":"x","data":[1,{"a":null}]}"#;
        let _ = wb().parse(odd);
    }

    #[test]
    fn modes_and_networks() {
        let ctx = RequestCtx {
            peer: "127.0.0.1".parse().unwrap(),
            channel: NAME,
            trace_id: "t".into(),
        };
        let get = |query: &str| {
            hyper::Request::get(format!("{ROUTE}?{query}"))
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        let good = "nonce=57155157&timestamp=1397022061823&echostr=e&signature=90e4c22c90a58f26526c2dd5b6c56c8822edeaa1";
        for mode in [
            SignatureMode::Enforce,
            SignatureMode::LogOnly,
            SignatureMode::Off,
        ] {
            let w = Weibo::new(
                WeiboConfig {
                    signature_mode: mode,
                    app_secrets: vec!["xyz123xyz".into()],
                    allow_networks: vec![],
                    timestamp_tolerance_secs: 0,
                },
                crate::identity::Normalizer::new("CN"),
            )
            .unwrap();
            w.precheck(&get(good), &ctx).unwrap();
            for bad in ["echostr=e", &good.replace("nonce=5", "nonce=6")] {
                let r = w.precheck(&get(bad), &ctx);
                assert_eq!(r.is_err(), mode == SignatureMode::Enforce);
                if let Err(e) = r {
                    assert_eq!(super::super::provider_status(&e), StatusCode::FORBIDDEN);
                }
            }
        }
        let fenced = Weibo::new(
            WeiboConfig {
                app_secrets: vec!["xyz123xyz".into()],
                allow_networks: vec!["10.0.0.0/8".into()],
                ..Default::default()
            },
            crate::identity::Normalizer::new("CN"),
        )
        .unwrap();
        assert_eq!(
            fenced.precheck(&get(good), &ctx).unwrap_err().reason,
            Reason::Forbidden
        );
        let bad_cfg =
            |c: WeiboConfig| Weibo::new(c, crate::identity::Normalizer::new("CN")).is_err();
        assert!(bad_cfg(WeiboConfig {
            app_secrets: vec![],
            ..Default::default()
        }));
        assert!(bad_cfg(WeiboConfig {
            allow_networks: vec!["nope".into()],
            ..Default::default()
        }));
    }

    #[test]
    fn old_signed_queries_cannot_be_replayed_with_new_bodies() {
        let q = |ts: &str| vec![("timestamp".to_string(), ts.to_string())];
        let now = 1_764_374_400;
        assert_eq!(fresh(&q("1764374400123"), now, 300), Ok(()));
        assert_eq!(fresh(&q("1764374400"), now, 300), Ok(()));
        assert_eq!(
            fresh(&q("1397022061823"), now, 300),
            Err(Reason::StaleTimestamp)
        );
        assert_eq!(fresh(&q("x"), now, 300), Err(Reason::StaleTimestamp));
        assert_eq!(fresh(&[], now, 300), Err(Reason::StaleTimestamp));
        assert_eq!(fresh(&q("1397022061823"), now, 0), Ok(()));
    }
}
