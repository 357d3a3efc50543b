//! X (Twitter) Account Activity API webhooks on `GET, POST /hooks/x` (CHANNELS.md §5.2).
//!
//! - CRC: `GET ?crc_token=…` answers `{"response_token":"sha256=<Base64(HMAC-SHA256(consumer
//!   secret, crc_token))>"}` with the current (first) consumer secret.
//! - Events: `x-twitter-webhooks-signature: sha256=<Base64(HMAC-SHA256(consumer secret, raw
//!   body))>`, checked against each configured secret (two during rotation) before parsing.
//! - Every `message_create` in `direct_message_events[]` becomes a record, except the account's
//!   own outbound DMs (`sender_id == for_user_id`). Other event arrays (tweets, likes, follows,
//!   typing, read receipts) are acknowledged and ignored.
//! - Dedupe on the event `id`, scoped by `for_user_id`. `thread_id` is the one-to-one DM
//!   conversation id `<lower id>-<higher id>`. Handles and names come from `users`.
//! - X waits about 3 s for the 200 and retries up to 3 times within ~5 min.

use super::{Channel, Inbound};
use crate::config::SignatureMode;
use crate::error::{Reason, Rejection};
use crate::http::{json_response, text_response, Resp};
use crate::identity::{RawIdentity, SocialId};
use crate::pipeline::{Pipeline, RequestCtx};
use crate::record::{Attachment, ChannelKind, Intake};
use base64::Engine;
use futures_util::future::BoxFuture;
use hmac::{Hmac, Mac};
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::HashMap;

pub const NAME: &str = "x";
pub const ROUTE: &str = "/hooks/x";
pub const SIGNATURE_HEADER: &str = "x-twitter-webhooks-signature";
const MAX_EVENTS: usize = 1000;

/// `[x]` in the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct XConfig {
    /// `x-twitter-webhooks-signature` check: enforce (403) | log_only | off.
    pub signature_mode: SignatureMode,
    /// The app's consumer (API key) secret: current first (it answers the CRC), previous during
    /// rotation.
    pub consumer_secrets: Vec<String>,
}

impl Default for XConfig {
    fn default() -> Self {
        Self {
            signature_mode: SignatureMode::Enforce,
            consumer_secrets: Vec::new(),
        }
    }
}

impl XConfig {
    pub fn validate(&self) -> Result<(), String> {
        let n = self.consumer_secrets.len();
        if n > 2 || (self.signature_mode != SignatureMode::Off && n == 0) {
            return Err("x.consumer_secrets: give one secret, or two during rotation".into());
        }
        if self.consumer_secrets.iter().any(|s| s.is_empty()) {
            return Err("x.consumer_secrets: secrets must not be empty".into());
        }
        Ok(())
    }
}

fn mac(secret: &str, data: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    m.update(data);
    m
}

/// `sha256=` + Base64(HMAC-SHA256(secret, data)): the CRC answer and the signature header value.
pub fn sign(secret: &str, data: &[u8]) -> String {
    let d = mac(secret, data).finalize().into_bytes();
    format!(
        "sha256={}",
        base64::engine::general_purpose::STANDARD.encode(d)
    )
}

/// Whether a `crc_token` looks like X's (a short base64-ish string). Anything else is refused:
/// the CRC answer is an HMAC of the token under the same secret as POST signatures, so answering
/// for arbitrary text would sign any body an attacker chose (a JSON body can never pass this).
pub fn crc_token_shape_ok(token: &str) -> bool {
    (1..=128).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'_' | b'-'))
}

/// The CRC response body.
pub fn crc_response(secret: &str, crc_token: &str) -> String {
    serde_json::json!({ "response_token": sign(secret, crc_token.as_bytes()) }).to_string()
}

/// Checks a `sha256=<base64>` header against every secret, in constant time per comparison.
pub fn verify(secrets: &[String], body: &[u8], header: &str) -> bool {
    let Some(b64) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(b64) else {
        return false;
    };
    secrets.iter().fold(false, |ok, s| {
        ok | (!s.is_empty() && mac(s, body).verify_slice(&sig).is_ok())
    })
}

#[derive(Debug, Deserialize)]
struct Activity {
    #[serde(default)]
    for_user_id: Option<String>,
    #[serde(default)]
    direct_message_events: Vec<serde_json::Value>,
    #[serde(default)]
    users: HashMap<String, XUser>,
}

#[derive(Debug, Default, Deserialize)]
struct XUser {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    screen_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct DmEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    created_timestamp: Option<String>,
    #[serde(default)]
    message_create: Option<MessageCreate>,
}

#[derive(Debug, Deserialize)]
struct MessageCreate {
    #[serde(default)]
    target: Option<Target>,
    sender_id: String,
    #[serde(default)]
    source_app_id: Option<String>,
    #[serde(default)]
    message_data: MessageData,
}

#[derive(Debug, Deserialize)]
struct Target {
    recipient_id: String,
}

#[derive(Debug, Default, Deserialize)]
struct MessageData {
    #[serde(default)]
    text: String,
    #[serde(default)]
    attachment: Option<DmAttachment>,
}

#[derive(Debug, Deserialize)]
struct DmAttachment {
    #[serde(default)]
    media: Option<Media>,
}

#[derive(Debug, Deserialize)]
struct Media {
    #[serde(default)]
    id_str: Option<String>,
    #[serde(default)]
    media_url_https: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

pub struct X {
    cfg: XConfig,
}

fn bad(n: usize, msg: impl std::fmt::Display) -> Rejection {
    Rejection::new(
        Reason::InvalidEvent,
        format!("direct_message_events[{n}]: {msg}"),
    )
}

/// The one-to-one DM conversation id X uses: the two user ids, lower first.
fn conversation_id(a: &str, b: &str) -> String {
    let key = |s: &str| (s.len(), s.to_string());
    if key(a) <= key(b) {
        format!("{a}-{b}")
    } else {
        format!("{b}-{a}")
    }
}

impl X {
    pub fn new(cfg: XConfig, _normalizer: crate::identity::Normalizer) -> Result<Self, String> {
        cfg.validate()?;
        Ok(Self { cfg })
    }

    fn check(&self, parts: &Parts, body: &[u8]) -> Result<(), Rejection> {
        let outcome = match parts
            .headers
            .get(SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            None => Err(Reason::MissingSignature),
            Some(h) if verify(&self.cfg.consumer_secrets, body, h) => Ok(()),
            Some(_) => Err(Reason::BadSignature),
        };
        crate::auth::apply_mode(self.cfg.signature_mode, NAME, outcome)
    }

    /// The DMs of one activity POST, in array order, without the account's own.
    pub(crate) fn parse(&self, body: &[u8]) -> Result<Vec<Intake>, Rejection> {
        let v: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| Rejection::new(Reason::MalformedJson, e.to_string()))?;
        if !v.is_object() {
            return Err(Rejection::new(
                Reason::InvalidEvent,
                "body must be a JSON object",
            ));
        }
        let a: Activity = serde_json::from_value(v).map_err(|e| {
            Rejection::new(
                Reason::InvalidEvent,
                format!("not an Account Activity event: {e}"),
            )
        })?;
        if a.direct_message_events.is_empty() {
            return Ok(Vec::new());
        }
        if a.direct_message_events.len() > MAX_EVENTS {
            return Err(Rejection::new(
                Reason::BatchTooLarge,
                format!("at most {MAX_EVENTS} events per request"),
            ));
        }
        let for_user = a
            .for_user_id
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Rejection::new(Reason::InvalidEvent, "for_user_id is missing"))?;
        let mut out = Vec::new();
        let mut own = 0usize;
        for (n, v) in a.direct_message_events.into_iter().enumerate() {
            let e: DmEvent = serde_json::from_value(v).map_err(|e| bad(n, e))?;
            if e.kind != "message_create" {
                continue;
            }
            let id =
                e.id.filter(|s| !s.is_empty())
                    .ok_or_else(|| bad(n, "id is missing"))?;
            let mc = e
                .message_create
                .ok_or_else(|| bad(n, "message_create is missing"))?;
            if mc.sender_id.is_empty() {
                return Err(bad(n, "sender_id is missing"));
            }
            if mc.sender_id == for_user {
                own += 1;
                continue;
            }
            let mut i = Intake::new(ChannelKind::Social, NAME, mc.message_data.text);
            i.provider_message_id = Some(id);
            i.account = Some(for_user.clone());
            i.thread_id = Some(conversation_id(&for_user, &mc.sender_id));
            i.occurred_at = e
                .created_timestamp
                .as_deref()
                .and_then(|t| t.trim().parse::<i64>().ok())
                .and_then(chrono::DateTime::from_timestamp_millis);
            if let Some(t) = mc.target {
                i.metadata.insert("recipient_id".into(), t.recipient_id);
            }
            if let Some(app) = mc.source_app_id {
                i.metadata.insert("source_app_id".into(), app);
            }
            if let Some(m) = mc.message_data.attachment.and_then(|a| a.media) {
                if let Some(k) = &m.kind {
                    i.metadata.insert("media_type".into(), k.clone());
                }
                let content_type = match m.kind.as_deref() {
                    Some("photo") => Some("image/jpeg".to_string()),
                    Some("video") => Some("video/mp4".to_string()),
                    Some("animated_gif") => Some("video/mp4".to_string()),
                    _ => None,
                };
                if let Some(url) = m
                    .media_url_https
                    .or(m.id_str.map(|id| format!("x-media:{id}")))
                {
                    i.attachments.push(Attachment {
                        content_type,
                        url: Some(url),
                        ..Default::default()
                    });
                }
            }
            let user = a.users.get(&mc.sender_id);
            i.identity = RawIdentity {
                name: user.and_then(|u| u.name.clone()),
                social: Some(SocialId {
                    platform: NAME.into(),
                    account: Some(for_user.clone()),
                    id: mc.sender_id,
                    handle: user.and_then(|u| u.screen_name.clone()),
                }),
                ..Default::default()
            };
            if crate::record::normalize_text(&i.text).is_empty() && i.attachments.is_empty() {
                continue;
            }
            out.push(i);
        }
        if own > 0 {
            tracing::debug!(channel = NAME, own, "own outbound DMs ignored");
        }
        Ok(out)
    }
}

impl Channel for X {
    fn name(&self) -> &'static str {
        NAME
    }

    fn allow(&self) -> &'static str {
        "GET, POST"
    }

    fn precheck(&self, parts: &Parts, _ctx: &RequestCtx) -> Result<(), Rejection> {
        super::get_or_post(parts, &["application/json"])
    }

    fn handle<'a>(
        &'a self,
        inbound: Inbound,
        pipeline: &'a Pipeline,
    ) -> BoxFuture<'a, Result<Resp, Rejection>> {
        Box::pin(async move {
            if inbound.parts.method == Method::GET {
                let q = super::form_pairs(inbound.parts.uri.query().unwrap_or("").as_bytes());
                let token = super::form_get(&q, "crc_token")
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| Rejection::new(Reason::InvalidEvent, "crc_token is missing"))?;
                if !crc_token_shape_ok(token) {
                    return Err(Rejection::new(
                        Reason::InvalidEvent,
                        "crc_token must be 1-128 characters of A-Z a-z 0-9 + / = _ -",
                    ));
                }
                // With signature_mode = "off" the route may run without a secret; a CRC then
                // has nothing to answer with. That is configuration, not a server fault.
                let secret = self.cfg.consumer_secrets.first().ok_or_else(|| {
                    Rejection::new(
                        Reason::NotFound,
                        "CRC checks need x.consumer_secrets; none is configured",
                    )
                })?;
                return Ok(json_response(StatusCode::OK, crc_response(secret, token)));
            }
            self.check(&inbound.parts, &inbound.body)?;
            let intakes = self.parse(&inbound.body)?;
            if !intakes.is_empty() {
                pipeline.submit(&inbound.ctx, intakes).await?;
            }
            Ok(text_response(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                "",
            ))
        })
    }

    fn reject(&self, r: &Rejection) -> Resp {
        super::provider_json_reject(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "z3ZX4v7mAAUGykl3EcmkqbartmuW8VFOOzCloLx9Q45P0hLrFu";

    fn x() -> X {
        X::new(
            XConfig {
                consumer_secrets: vec![SECRET.into()],
                ..Default::default()
            },
            crate::identity::Normalizer::new("CN"),
        )
        .unwrap()
    }

    /// CHANNELS.md X0 (the jcipriano gist vector) and X1 (computed there).
    #[test]
    fn known_answer_vectors() {
        assert_eq!(
            crc_response(SECRET, "9b4507b3-9040-4669-9ca3-6b94edb50553"),
            r#"{"response_token":"sha256=Cytd4Sq+NvEcV3MMrXxWJGJx5A+y/lXzzU2Maartkx8="}"#
        );
        let body = include_bytes!("../../tests/fixtures/x/dm_x1.json");
        let sig = "sha256=G2bUGiFy7cbMVIEgVAUw6eirgeqyenZxllvwY48Vm3c=";
        assert_eq!(sign(SECRET, body), sig);
        let secrets = vec![SECRET.to_string()];
        assert!(verify(&secrets, body, sig));
        let two = vec!["new-secret".to_string(), SECRET.to_string()];
        assert!(verify(&two, body, sig));
        assert!(!verify(&["new-secret".to_string()], body, sig));
        let mut tampered = body.to_vec();
        tampered[10] ^= 1;
        assert!(!verify(&secrets, &tampered, sig));
        for h in [
            "G2bUGiFy7cbMVIEgVAUw6eirgeqyenZxllvwY48Vm3c=",
            "sha1=G2bUGiFy7cbMVIEgVAUw6eirgeqyenZxllvwY48Vm3c=",
            "sha256=not base64!",
            "sha256=",
            "",
        ] {
            assert!(!verify(&secrets, body, h), "{h}");
        }
    }

    #[test]
    fn x1_dm_maps_to_a_social_intake() {
        let v = x()
            .parse(include_bytes!("../../tests/fixtures/x/dm_x1.json"))
            .unwrap();
        assert_eq!(v.len(), 1);
        let i = &v[0];
        assert_eq!(i.provider, "x");
        assert_eq!(i.provider_message_id.as_deref(), Some("954491830116155396"));
        assert_eq!(i.account.as_deref(), Some("4337869213"));
        assert_eq!(i.text, "Hello World!");
        assert_eq!(i.thread_id.as_deref(), Some("3001969357-4337869213"));
        let s = i.identity.social.as_ref().unwrap();
        assert_eq!((s.platform.as_str(), s.id.as_str()), ("x", "3001969357"));
        assert_eq!(s.account.as_deref(), Some("4337869213"));
        assert_eq!(
            crate::record::rfc3339_ms(i.occurred_at.unwrap()),
            "2018-01-19T23:12:40.557Z"
        );
    }

    #[test]
    fn batches_skip_own_messages_and_other_events() {
        let v = x()
            .parse(include_bytes!("../../tests/fixtures/x/dm_batch.json"))
            .unwrap();
        let texts: Vec<&str> = v.iter().map(|i| i.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "家里宽带断网三天了😡",
                "الإنترنت لا يعمل منذ يومين",
                "Billing is wrong again 💸 https://t.co/abc123"
            ]
        );
        assert_eq!(
            v[0].identity.social.as_ref().unwrap().handle.as_deref(),
            Some("zhang_wei")
        );
        assert_eq!(v[0].identity.name.as_deref(), Some("张伟"));
        assert_eq!(
            v[2].attachments[0].url.as_deref(),
            Some("https://ton.twitter.com/1.1/ton/data/dm/1111/2222/abc.jpg")
        );
        assert_eq!(
            v[2].attachments[0].content_type.as_deref(),
            Some("image/jpeg")
        );
        // Only likes/follows: nothing to record.
        let other = br#"{"for_user_id":"1","favorite_events":[{"id":"x"}]}"#;
        assert!(x().parse(other).unwrap().is_empty());
    }

    #[test]
    fn malformed_bodies_are_rejected_without_panic() {
        for (body, reason) in [
            (&b""[..], Reason::MalformedJson),
            (b"{", Reason::MalformedJson),
            (b"[]", Reason::InvalidEvent),
            (
                br#"{"direct_message_events":[{"type":"message_create","id":"1","message_create":{"sender_id":"2"}}]}"#,
                Reason::InvalidEvent,
            ),
            (
                br#"{"for_user_id":"1","direct_message_events":[{"type":"message_create","message_create":{"sender_id":"2"}}]}"#,
                Reason::InvalidEvent,
            ),
            (
                br#"{"for_user_id":"1","direct_message_events":[7]}"#,
                Reason::InvalidEvent,
            ),
        ] {
            assert_eq!(x().parse(body).unwrap_err().reason, reason);
        }
        let odd = br#"{"for_user_id":"1","direct_message_events":[{"type":"message_create","id":"1","created_timestamp":"99999999999999999999","message_create":{"sender_id":"2","message_data":{"text":"x"}}}]}"#;
        assert!(x().parse(odd).unwrap()[0].occurred_at.is_none());
    }

    #[test]
    fn signature_modes() {
        let body = br#"{"for_user_id":"1"}"#;
        let parts = |sig: Option<&str>| {
            let mut b = hyper::Request::post(ROUTE).header("content-type", "application/json");
            if let Some(s) = sig {
                b = b.header(SIGNATURE_HEADER, s);
            }
            b.body(()).unwrap().into_parts().0
        };
        let good = sign(SECRET, body);
        for mode in [
            SignatureMode::Enforce,
            SignatureMode::LogOnly,
            SignatureMode::Off,
        ] {
            let x = X::new(
                XConfig {
                    signature_mode: mode,
                    consumer_secrets: vec!["next".into(), SECRET.into()],
                },
                crate::identity::Normalizer::new("CN"),
            )
            .unwrap();
            x.check(&parts(Some(&good)), body).unwrap();
            for p in [parts(None), parts(Some("sha256=AAAA"))] {
                let r = x.check(&p, body);
                assert_eq!(r.is_err(), mode == SignatureMode::Enforce);
                if let Err(e) = r {
                    assert_eq!(super::super::provider_status(&e), StatusCode::FORBIDDEN);
                }
            }
        }
        assert!(X::new(
            XConfig {
                consumer_secrets: vec![],
                ..Default::default()
            },
            crate::identity::Normalizer::new("CN")
        )
        .is_err());
    }

    #[test]
    fn conversation_ids_order_numerically() {
        assert_eq!(conversation_id("10", "9"), "9-10");
        assert_eq!(
            conversation_id("4337869213", "3001969357"),
            "3001969357-4337869213"
        );
    }

    #[test]
    fn the_crc_endpoint_cannot_be_used_to_sign_a_body() {
        assert!(crc_token_shape_ok("aGVsbG8gd29ybGQ="));
        assert!(!crc_token_shape_ok(
            r#"{"for_user_id":"1","direct_message_events":[]}"#
        ));
        assert!(!crc_token_shape_ok(""));
        assert!(!crc_token_shape_ok(&"a".repeat(129)));
    }
}
