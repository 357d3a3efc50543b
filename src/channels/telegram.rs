//! Telegram Bot API webhooks on `POST /hooks/telegram` (CHANNELS.md §5.1).
//!
//! - Authentication: `X-Telegram-Bot-Api-Secret-Token` must equal one of `secret_tokens` (the
//!   `secret_token` given to `setWebhook`; two during rotation), compared in constant time before
//!   the body is read. There is no body signature.
//! - One `Update` per request. `message` becomes a record; `edited_message` becomes a record of
//!   the same conversation (`provider_message_id` `edit:<chat>:<message_id>:<edit_date>`,
//!   metadata `edited=true`); `channel_post`, `edited_channel_post` and every other update kind
//!   are answered 200 and ignored, as are messages carrying nothing usable (stickers, service
//!   messages), so Telegram never retries them.
//! - Dedupe: `(bot_id, update_id)`, `provider_message_id` `update:<update_id>`, account `bot_id`.
//! - Content: `text` or `caption`; `photo` (largest size), `document`, `voice`, `audio`, `video`
//!   and `video_note` become attachments referenced as `tg-file:<file_id>` (fetch with the Bot
//!   API `getFile`; the bot token is never put in a record). A voice note is also `content.voice`.
//!   A shared `contact` that is the sender's own sets the customer phone.
//! - `conversation.thread_id` is the chat id. Replies 200 with an empty body once durable.

use super::{network_and_token, Allowlist, Channel, Inbound};
use crate::config::SignatureMode;
use crate::error::{Reason, Rejection};
use crate::http::{text_response, Resp};
use crate::identity::{Normalizer, RawIdentity, SocialId};
use crate::pipeline::{Pipeline, RequestCtx};
use crate::record::{Attachment, ChannelKind, Intake, Voice};
use futures_util::future::BoxFuture;
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};

pub const NAME: &str = "telegram";
pub const ROUTE: &str = "/hooks/telegram";
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// Scheme of attachment references: `tg-file:<file_id>`.
pub const FILE_PREFIX: &str = "tg-file:";

/// `[telegram]` in the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelegramConfig {
    /// `X-Telegram-Bot-Api-Secret-Token` check: enforce (403) | log_only | off.
    pub signature_mode: SignatureMode,
    /// The `secret_token` set with `setWebhook`: current first, previous during rotation.
    pub secret_tokens: Vec<String>,
    /// The bot's numeric id (the part of the bot token before `:`); scopes `update_id`s and user
    /// ids. Empty: unscoped.
    pub bot_id: String,
}

impl Default for TelegramConfig {
    fn default() -> Self {
        Self {
            signature_mode: SignatureMode::Enforce,
            secret_tokens: Vec::new(),
            bot_id: String::new(),
        }
    }
}

impl TelegramConfig {
    pub fn validate(&self) -> Result<(), String> {
        let n = self.secret_tokens.len();
        if self.signature_mode != SignatureMode::Off && !(1..=2).contains(&n) {
            return Err("telegram.secret_tokens: give one token, or two during rotation".into());
        }
        if n > 2 {
            return Err("telegram.secret_tokens: at most two".into());
        }
        for t in &self.secret_tokens {
            let ok = (1..=256).contains(&t.len())
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(
                    "telegram.secret_tokens: each is 1-256 characters of A-Z a-z 0-9 _ -".into(),
                );
            }
        }
        if self.bot_id.contains(':') {
            return Err(
                "telegram.bot_id: only the number before ':' in the bot token (never the token)"
                    .into(),
            );
        }
        if !self.bot_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err("telegram.bot_id: digits only".into());
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct Update {
    update_id: i64,
    #[serde(default)]
    message: Option<Message>,
    #[serde(default)]
    edited_message: Option<Message>,
    #[serde(default)]
    channel_post: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    edited_channel_post: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
struct User {
    id: i64,
    #[serde(default)]
    first_name: Option<String>,
    #[serde(default)]
    last_name: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    language_code: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Chat {
    id: i64,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    title: Option<String>,
}

#[derive(Debug, Deserialize)]
struct File {
    file_id: String,
    #[serde(default)]
    file_size: Option<u64>,
    #[serde(default)]
    mime_type: Option<String>,
    #[serde(default)]
    file_name: Option<String>,
    #[serde(default)]
    width: Option<u64>,
    #[serde(default)]
    height: Option<u64>,
    #[serde(default)]
    duration: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Contact {
    phone_number: String,
    #[serde(default)]
    user_id: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct ReplyTo {
    message_id: i64,
}

#[derive(Debug, Deserialize)]
struct Message {
    message_id: i64,
    #[serde(default)]
    from: Option<User>,
    #[serde(default)]
    sender_chat: Option<Chat>,
    chat: Chat,
    date: i64,
    #[serde(default)]
    edit_date: Option<i64>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    caption: Option<String>,
    #[serde(default)]
    photo: Vec<File>,
    #[serde(default)]
    document: Option<File>,
    #[serde(default)]
    voice: Option<File>,
    #[serde(default)]
    audio: Option<File>,
    #[serde(default)]
    video: Option<File>,
    #[serde(default)]
    video_note: Option<File>,
    #[serde(default)]
    contact: Option<Contact>,
    #[serde(default)]
    reply_to_message: Option<Box<ReplyTo>>,
    #[serde(default)]
    media_group_id: Option<String>,
}

pub struct Telegram {
    cfg: TelegramConfig,
    normalizer: Normalizer,
}

fn ts(secs: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(secs, 0)
}

fn file_attachment(f: &File, default_type: &str) -> Attachment {
    Attachment {
        name: f.file_name.clone(),
        content_type: Some(f.mime_type.clone().unwrap_or_else(|| default_type.into())),
        size: f.file_size,
        sha256: None,
        url: Some(format!("{FILE_PREFIX}{}", f.file_id)),
        ..Default::default()
    }
}

impl Telegram {
    pub fn new(cfg: TelegramConfig, normalizer: Normalizer) -> Result<Self, String> {
        cfg.validate()?;
        Ok(Self { cfg, normalizer })
    }

    fn account(&self) -> Option<String> {
        Some(self.cfg.bot_id.clone()).filter(|b| !b.is_empty())
    }

    /// The intake for a message or an edit; `None` when it carries nothing to record.
    fn intake(&self, update_id: i64, m: Message, edited: bool) -> Option<Intake> {
        let chat_id = m.chat.id;
        let text = m.text.or(m.caption).unwrap_or_default();
        let mut i = Intake::new(ChannelKind::Social, NAME, text);
        i.account = self.account();
        i.thread_id = Some(chat_id.to_string());
        i.provider_message_id = Some(match (edited, m.edit_date) {
            (true, Some(e)) => format!("edit:{chat_id}:{}:{e}", m.message_id),
            // An edit without edit_date (never seen): the update itself is unique.
            (true, None) => format!("edit:{chat_id}:{}:u{update_id}", m.message_id),
            (false, _) => format!("update:{update_id}"),
        });
        i.occurred_at = if edited {
            m.edit_date.and_then(ts).or_else(|| ts(m.date))
        } else {
            ts(m.date)
        };
        i.in_reply_to = m
            .reply_to_message
            .as_ref()
            .map(|r| format!("{chat_id}:{}", r.message_id));
        i.metadata.insert("update_id".into(), update_id.to_string());
        i.metadata.insert("chat_id".into(), chat_id.to_string());
        i.metadata
            .insert("message_id".into(), m.message_id.to_string());
        if let Some(k) = &m.chat.kind {
            i.metadata.insert("chat_type".into(), k.clone());
        }
        if let Some(g) = &m.media_group_id {
            i.metadata.insert("media_group_id".into(), g.clone());
        }
        if edited {
            i.metadata.insert("edited".into(), "true".into());
            if let Some(d) = ts(m.date) {
                i.metadata
                    .insert("original_date".into(), crate::record::rfc3339_ms(d));
            }
        }

        // Who: the sending user; else the chat it speaks for (anonymous admins, linked channels).
        let (sender_id, handle, name) = match (&m.from, &m.sender_chat) {
            (Some(u), _) => {
                if let Some(l) = &u.language_code {
                    i.metadata.insert("language_code".into(), l.clone());
                }
                let name = [u.first_name.as_deref(), u.last_name.as_deref()]
                    .into_iter()
                    .flatten()
                    .filter(|s| !s.trim().is_empty())
                    .collect::<Vec<_>>()
                    .join(" ");
                (
                    u.id,
                    u.username.clone(),
                    Some(name).filter(|n| !n.is_empty()),
                )
            }
            (None, Some(c)) => (c.id, c.username.clone(), c.title.clone()),
            (None, None) => (chat_id, m.chat.username.clone(), m.chat.title.clone()),
        };
        let mut identity = RawIdentity {
            name,
            social: Some(SocialId {
                platform: NAME.into(),
                account: self.account(),
                id: sender_id.to_string(),
                handle,
            }),
            ..Default::default()
        };

        // Media, as references to Telegram files.
        if let Some(p) = m.photo.iter().max_by_key(|p| {
            (
                p.width.unwrap_or(0).saturating_mul(p.height.unwrap_or(0)),
                p.file_size,
            )
        }) {
            i.attachments.push(file_attachment(p, "image/jpeg"));
        }
        if let Some(v) = &m.voice {
            let a = file_attachment(v, "audio/ogg");
            i.voice = Some(Voice {
                recording_url: a.url.clone(),
                ..Default::default()
            });
            if let Some(d) = v.duration {
                i.metadata
                    .insert("voice_duration_secs".into(), d.to_string());
            }
            i.attachments.push(a);
        }
        for (f, t) in [
            (&m.document, "application/octet-stream"),
            (&m.audio, "audio/mpeg"),
            (&m.video, "video/mp4"),
            (&m.video_note, "video/mp4"),
        ] {
            if let Some(f) = f {
                i.attachments.push(file_attachment(f, t));
            }
        }
        if let Some(c) = &m.contact {
            let own = m.from.as_ref().is_some_and(|u| c.user_id == Some(u.id));
            i.metadata
                .insert("contact".into(), if own { "own" } else { "other" }.into());
            if own {
                identity.phone = super::msisdn(&c.phone_number, &self.normalizer);
                if identity.phone.is_none() {
                    i.metadata
                        .insert("contact_phone_invalid".into(), "true".into());
                }
            } else {
                i.metadata
                    .insert("contact_phone".into(), c.phone_number.clone());
            }
            // A contact carries no text; it is kept as a vCard-typed reference so the record
            // has content.
            if i.text.trim().is_empty() && i.attachments.is_empty() {
                i.attachments.push(Attachment {
                    name: Some("contact.vcf".into()),
                    content_type: Some("text/vcard".into()),
                    ..Default::default()
                });
            }
        }
        i.identity = identity;
        if crate::record::normalize_text(&i.text).is_empty() && i.attachments.is_empty() {
            return None;
        }
        Some(i)
    }

    /// The intake an update produces, if any (`Err` for a body that is not an update).
    pub(crate) fn parse(&self, body: &[u8]) -> Result<Option<Intake>, Rejection> {
        let u: Update = serde_json::from_slice(body).map_err(|e| {
            let reason = if e.is_syntax() || e.is_eof() {
                Reason::MalformedJson
            } else {
                Reason::InvalidEvent
            };
            // serde's message names the field, never its value.
            Rejection::new(reason, format!("not a Telegram update: {e}"))
        })?;
        let kind;
        let out = if let Some(m) = u.message {
            kind = "message";
            self.intake(u.update_id, m, false)
        } else if let Some(m) = u.edited_message {
            kind = "edited_message";
            self.intake(u.update_id, m, true)
        } else {
            kind = if u.channel_post.is_some() || u.edited_channel_post.is_some() {
                "channel_post"
            } else {
                "other"
            };
            None
        };
        if out.is_none() {
            tracing::debug!(channel = NAME, kind, "update ignored");
        }
        Ok(out)
    }
}

fn ok() -> Resp {
    text_response(StatusCode::OK, "text/plain; charset=utf-8", "")
}

impl Channel for Telegram {
    fn name(&self) -> &'static str {
        NAME
    }

    fn precheck(&self, parts: &Parts, ctx: &RequestCtx) -> Result<(), Rejection> {
        if parts.method != Method::POST {
            return Err(Rejection::new(Reason::MethodNotAllowed, "use POST"));
        }
        let got = parts
            .headers
            .get(SECRET_HEADER)
            .and_then(|v| v.to_str().ok());
        network_and_token(
            self.cfg.signature_mode,
            NAME,
            &Allowlist::default(),
            ctx.peer,
            Some((&self.cfg.secret_tokens, got)),
        )?;
        super::require_content_type(&parts.headers, &["application/json"])
    }

    fn handle<'a>(
        &'a self,
        inbound: Inbound,
        pipeline: &'a Pipeline,
    ) -> BoxFuture<'a, Result<Resp, Rejection>> {
        Box::pin(async move {
            if let Some(i) = self.parse(&inbound.body)? {
                pipeline.submit(&inbound.ctx, vec![i]).await?;
            }
            Ok(ok())
        })
    }

    fn reject(&self, r: &Rejection) -> Resp {
        super::provider_json_reject(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tg(bot: &str) -> Telegram {
        Telegram::new(
            TelegramConfig {
                bot_id: bot.into(),
                secret_tokens: vec!["unit-test-secret-token".into()],
                ..Default::default()
            },
            Normalizer::new("CN"),
        )
        .unwrap()
    }

    fn one(t: &Telegram, body: &str) -> Intake {
        t.parse(body.as_bytes()).unwrap().expect("an intake")
    }

    #[test]
    fn official_example_update() {
        let t = tg("123456");
        let i = one(
            &t,
            include_str!("../../tests/fixtures/telegram/tg1_start.json"),
        );
        assert_eq!(i.channel, ChannelKind::Social);
        assert_eq!(i.provider, "telegram");
        assert_eq!(i.provider_message_id.as_deref(), Some("update:10000"));
        assert_eq!(i.account.as_deref(), Some("123456"));
        assert_eq!(i.thread_id.as_deref(), Some("1111111"));
        assert_eq!(i.text, "/start");
        let s = i.identity.social.unwrap();
        assert_eq!(s.platform, "telegram");
        assert_eq!(s.account.as_deref(), Some("123456"));
        assert_eq!(s.id, "1111111");
        assert_eq!(s.handle.as_deref(), Some("Test"));
        assert_eq!(i.identity.name.as_deref(), Some("Test Test Lastname"));
        assert_eq!(
            crate::record::rfc3339_ms(i.occurred_at.unwrap()),
            "2015-09-07T17:05:32.000Z"
        );
    }

    #[test]
    fn unicode_text_is_kept_byte_exact() {
        let t = tg("1");
        for text in [
            "家里宽带断网三天了😡，客服电话一直打不通！",
            "👨‍👩‍👧 signal 📶❌",
            "الإنترنت لا يعمل منذ يومين",
            "שלום, אין קליטה",
        ] {
            let body = serde_json::json!({"update_id": 5, "message": {"message_id": 1, "date": 1,
                "chat": {"id": 9, "type": "private"}, "from": {"id": 9, "first_name": "A"},
                "text": text}})
            .to_string();
            assert_eq!(one(&t, &body).text.as_bytes(), text.as_bytes());
        }
    }

    #[test]
    fn edits_are_updates_of_the_same_conversation() {
        let t = tg("123456");
        let i = one(
            &t,
            include_str!("../../tests/fixtures/telegram/edited.json"),
        );
        assert_eq!(
            i.provider_message_id.as_deref(),
            Some("edit:1111111:1366:1700000100")
        );
        assert_eq!(i.thread_id.as_deref(), Some("1111111"));
        assert_eq!(i.metadata["edited"], "true");
        assert_eq!(i.metadata["message_id"], "1366");
        assert_eq!(i.text, "宽带断网了，已经三天（更正：四天）");
        assert_eq!(
            crate::record::rfc3339_ms(i.occurred_at.unwrap()),
            "2023-11-14T22:15:00.000Z"
        );
    }

    #[test]
    fn channel_posts_and_other_updates_are_ignored() {
        let t = tg("1");
        for body in [
            r#"{"update_id":1,"channel_post":{"message_id":1,"date":1,"chat":{"id":-100,"type":"channel"},"text":"news"}}"#,
            r#"{"update_id":2,"edited_channel_post":{"message_id":1,"date":1,"chat":{"id":-100,"type":"channel"},"text":"news"}}"#,
            r#"{"update_id":3,"callback_query":{"id":"1","from":{"id":1,"first_name":"a"}}}"#,
            r#"{"update_id":4,"message":{"message_id":1,"date":1,"chat":{"id":1},"from":{"id":1},"sticker":{"file_id":"x"}}}"#,
            r#"{"update_id":5,"message":{"message_id":1,"date":1,"chat":{"id":1},"from":{"id":1},"text":"  "}}"#,
        ] {
            assert!(t.parse(body.as_bytes()).unwrap().is_none(), "{body}");
        }
    }

    #[test]
    fn bad_bodies_are_rejected_without_panic() {
        let t = tg("1");
        for (body, reason) in [
            ("", Reason::MalformedJson),
            ("{", Reason::MalformedJson),
            ("[]", Reason::InvalidEvent),
            (r#"{"message":{}}"#, Reason::InvalidEvent),
            (r#"{"update_id":"x"}"#, Reason::InvalidEvent),
            (
                r#"{"update_id":1,"message":{"message_id":1}}"#,
                Reason::InvalidEvent,
            ),
        ] {
            assert_eq!(
                t.parse(body.as_bytes()).unwrap_err().reason,
                reason,
                "{body}"
            );
        }
        // Extreme numbers do not overflow anything.
        let body = r#"{"update_id":9223372036854775807,"message":{"message_id":-9223372036854775808,"date":9223372036854775807,"chat":{"id":1},"from":{"id":1},"text":"x","photo":[{"file_id":"a","width":18446744073709551615,"height":18446744073709551615}]}}"#;
        let i = one(&t, body);
        assert!(i.occurred_at.is_none());
    }

    #[test]
    fn voice_photo_and_document() {
        let t = tg("1");
        let i = one(&t, include_str!("../../tests/fixtures/telegram/voice.json"));
        assert_eq!(i.text, "");
        let v = i.voice.unwrap();
        assert_eq!(
            v.recording_url.as_deref(),
            Some("tg-file:AwACAgIAAxkBAAIBVoice")
        );
        assert_eq!(i.metadata["voice_duration_secs"], "7");
        assert_eq!(i.attachments[0].content_type.as_deref(), Some("audio/ogg"));
        assert_eq!(i.attachments[0].size, Some(23456));

        let i = one(
            &t,
            include_str!("../../tests/fixtures/telegram/photo_caption.json"),
        );
        assert_eq!(i.text, "路由器指示灯一直闪红灯 🔴");
        assert_eq!(i.attachments.len(), 2);
        assert_eq!(i.attachments[0].url.as_deref(), Some("tg-file:PHOTO-LARGE"));
        assert_eq!(i.attachments[0].size, Some(98765));
        assert_eq!(i.attachments[1].url.as_deref(), Some("tg-file:DOC-1"));
        assert_eq!(i.attachments[1].name.as_deref(), Some("账单.pdf"));
        assert_eq!(
            i.attachments[1].content_type.as_deref(),
            Some("application/pdf")
        );
        assert_eq!(i.in_reply_to.as_deref(), Some("2222222:40"));
    }

    #[test]
    fn own_contact_sets_the_phone_and_others_do_not() {
        let t = tg("1");
        let i = one(
            &t,
            include_str!("../../tests/fixtures/telegram/contact_own.json"),
        );
        assert_eq!(i.identity.phone.as_deref(), Some("+8613800138000"));
        assert_eq!(i.metadata["contact"], "own");
        assert_eq!(i.attachments[0].content_type.as_deref(), Some("text/vcard"));
        let other = include_str!("../../tests/fixtures/telegram/contact_own.json")
            .replace("\"user_id\":2222222", "\"user_id\":3333333");
        let i = one(&t, &other);
        assert!(i.identity.phone.is_none());
        assert_eq!(i.metadata["contact"], "other");
    }

    #[test]
    fn anonymous_senders_fall_back_to_the_chat() {
        let t = tg("");
        let i = one(
            &t,
            r#"{"update_id":7,"message":{"message_id":3,"date":1,"chat":{"id":-200,"type":"supergroup","title":"T"},"sender_chat":{"id":-200,"type":"supergroup","title":"T"},"text":"hi"}}"#,
        );
        assert_eq!(i.identity.social.as_ref().unwrap().id, "-200");
        assert_eq!(i.account, None);
    }

    #[test]
    fn config_is_checked() {
        let bad = |c: TelegramConfig| Telegram::new(c, Normalizer::new("CN")).is_err();
        assert!(bad(TelegramConfig {
            bot_id: "123:AAHtoken".into(),
            ..Default::default()
        }));
        assert!(bad(TelegramConfig {
            secret_tokens: vec!["has space".into()],
            ..Default::default()
        }));
        assert!(bad(TelegramConfig {
            secret_tokens: vec!["a".into(), "b".into(), "c".into()],
            ..Default::default()
        }));
        assert!(bad(TelegramConfig {
            secret_tokens: vec![],
            ..Default::default()
        }));
        assert!(!bad(TelegramConfig {
            signature_mode: SignatureMode::Off,
            secret_tokens: vec![],
            ..Default::default()
        }));
    }

    #[test]
    fn secret_header_modes_and_rotation() {
        let cfg = TelegramConfig {
            secret_tokens: vec!["S3cr3t_Token-123".into(), "old_token".into()],
            ..Default::default()
        };
        let ctx = RequestCtx {
            peer: "127.0.0.1".parse().unwrap(),
            channel: NAME,
            trace_id: "t".into(),
        };
        let req = |secret: Option<&str>| {
            let mut b = hyper::Request::post(ROUTE).header("content-type", "application/json");
            if let Some(s) = secret {
                b = b.header(SECRET_HEADER, s);
            }
            b.body(()).unwrap().into_parts().0
        };
        for mode in [
            SignatureMode::Enforce,
            SignatureMode::LogOnly,
            SignatureMode::Off,
        ] {
            let t = Telegram::new(
                TelegramConfig {
                    signature_mode: mode,
                    ..cfg.clone()
                },
                Normalizer::new("CN"),
            )
            .unwrap();
            t.precheck(&req(Some("S3cr3t_Token-123")), &ctx).unwrap();
            t.precheck(&req(Some("old_token")), &ctx).unwrap();
            for bad in [req(Some("S3cr3t_Token-124")), req(None), req(Some(""))] {
                let r = t.precheck(&bad, &ctx);
                assert_eq!(r.is_err(), mode == SignatureMode::Enforce, "{mode:?}");
                if let Err(e) = r {
                    assert_eq!(super::super::provider_status(&e), StatusCode::FORBIDDEN);
                }
            }
        }
    }
}
