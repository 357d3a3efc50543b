//! Meta webhooks on `/hooks/meta` (CHANNELS.md §3): WhatsApp Cloud API, Messenger and Instagram.
//!
//! - `GET` is the subscription handshake: `hub.mode=subscribe` and `hub.verify_token` equal to
//!   `meta.verify_token` (constant time) → 200 with `hub.challenge` as `text/plain`; else 403.
//! - `POST` carries `X-Hub-Signature-256: sha256=<hex>`, HMAC-SHA256 of the **raw** body with the
//!   app secret (either of `meta.app_secrets` during rotation). Meta signs the escaped-unicode
//!   body as sent, so the bytes are verified before anything is parsed.
//! - `object = whatsapp_business_account`: every `entry[].changes[].value.messages[]` is a
//!   message (`statuses[]` are about outbound messages and are only counted).
//!   `object = page | instagram`: every `entry[].messaging[]` (and the dashboard test format
//!   `entry[].changes[]`); echoes, delivery and read receipts, reactions are only counted.
//! - The whole batch (up to `meta.max_batch` messages), ordered by provider timestamp, is made
//!   durable in one hand-off before `200 EVENT_RECEIVED`; a batch with nothing to record is 200
//!   too. Redeliveries dedupe on the wamid / mid scoped by the receiving number, page or IG
//!   account.
//!
//! Odd items never fail the batch (Meta would retry the whole of it for days): a message without
//! an id, a sender, or anything to record is skipped and counted in
//! `switchboard_social_ignored_total{channel="meta",kind=...}`.

use super::{form_get, form_pairs, provider_json_reject, Channel, Inbound};
use crate::config::SignatureMode;
use crate::error::{Reason, Rejection};
use crate::http::{text_response, Resp};
use crate::identity::{Normalizer, RawIdentity, SocialId};
use crate::pipeline::{Pipeline, RequestCtx};
use crate::record::{Attachment, ChannelKind, Intake};
use futures_util::future::BoxFuture;
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

pub const NAME: &str = "meta";
pub const ROUTE: &str = "/hooks/meta";
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// The body Meta's examples answer with; Meta only reads the status.
pub const SUCCESS: &str = "EVENT_RECEIVED";
/// Items counted but not recorded (statuses, echoes, receipts, ...), by `kind`.
pub const IGNORED_METRIC: &str = crate::telemetry::SOCIAL_IGNORED;
/// WhatsApp documents payloads up to 3 MB; refusing one would have it retried for 7 days.
const MAX_BODY: usize = 3 * 1024 * 1024;
const MAX_CHALLENGE: usize = 256;

/// `[meta]` in the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetaConfig {
    /// `X-Hub-Signature-256` check: `enforce` (403), `log_only`, `off`.
    pub signature_mode: SignatureMode,
    /// App secret(s): current first, the previous one during rotation (at most two).
    pub app_secrets: Vec<String>,
    /// The token typed into the webhook settings; the GET handshake must present it.
    pub verify_token: String,
    /// Most messages taken from one POST (Meta batches up to 1000 updates).
    pub max_batch: usize,
}

impl Default for MetaConfig {
    fn default() -> Self {
        Self {
            signature_mode: SignatureMode::Enforce,
            app_secrets: Vec::new(),
            verify_token: String::new(),
            max_batch: 1000,
        }
    }
}

pub struct Meta {
    cfg: MetaConfig,
    secrets: Vec<String>,
    normalizer: Normalizer,
}

/// Which Meta product a message came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Product {
    WhatsApp,
    Messenger,
    Instagram,
}

impl Product {
    fn provider(self) -> &'static str {
        match self {
            Product::WhatsApp => "meta.whatsapp",
            Product::Messenger => "meta.messenger",
            Product::Instagram => "meta.instagram",
        }
    }

    fn platform(self) -> &'static str {
        match self {
            Product::WhatsApp => "whatsapp",
            Product::Messenger => "messenger",
            Product::Instagram => "instagram",
        }
    }
}

/// What one POST yielded: messages to record (with their provider time in ms, for ordering)
/// and what was left out, by kind.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    items: Vec<(Option<i64>, Intake)>,
    ignored: BTreeMap<&'static str, u64>,
}

impl Batch {
    fn ignore(&mut self, kind: &'static str) {
        *self.ignored.entry(kind).or_default() += 1;
    }

    fn take(&mut self, r: Result<(Option<i64>, Intake), &'static str>) {
        match r {
            Ok(item) => self.items.push(item),
            Err(kind) => self.ignore(kind),
        }
    }

    /// Provider time first; arrival order among equal (or missing) times.
    pub(crate) fn into_ordered(mut self) -> Vec<Intake> {
        self.items.sort_by_key(|(t, _)| t.unwrap_or(i64::MAX));
        self.items.into_iter().map(|(_, i)| i).collect()
    }
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// A non-empty string field.
fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// An id that may come as a string or a number.
fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A timestamp that may come as a number or a numeric string.
fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn is_true(v: &Value) -> bool {
    matches!(v, Value::Bool(true))
}

fn at_ms(ms: Option<i64>) -> Option<chrono::DateTime<chrono::Utc>> {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
}

impl Meta {
    pub fn new(cfg: MetaConfig, normalizer: Normalizer) -> Result<Self, String> {
        if cfg.app_secrets.len() > 2 {
            return Err("meta.app_secrets: at most two (current, previous)".into());
        }
        let secrets: Vec<String> = cfg
            .app_secrets
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        if secrets.is_empty() && cfg.signature_mode != SignatureMode::Off {
            return Err(
                "meta.app_secrets: at least one app secret is needed unless signature_mode is \"off\""
                    .into(),
            );
        }
        if cfg.max_batch == 0 {
            return Err("meta.max_batch: must be at least 1".into());
        }
        Ok(Self {
            cfg,
            secrets,
            normalizer,
        })
    }

    /// The GET subscription handshake.
    fn handshake(&self, parts: &Parts) -> Result<Resp, Rejection> {
        let q = form_pairs(parts.uri.query().unwrap_or("").as_bytes());
        let mode_ok = form_get(&q, "hub.mode") == Some("subscribe");
        // An unset verify token never matches (not even an empty one).
        let token_ok = form_get(&q, "hub.verify_token").is_some_and(|t| {
            !self.cfg.verify_token.is_empty() && super::token_eq(&self.cfg.verify_token, t)
        });
        if !(mode_ok && token_ok) {
            tracing::info!(channel = NAME, mode_ok, "meta verification refused");
            return Err(Rejection::new(
                Reason::Forbidden,
                "hub.mode or hub.verify_token does not match",
            ));
        }
        let challenge = form_get(&q, "hub.challenge")
            .filter(|c| !c.is_empty() && c.len() <= MAX_CHALLENGE)
            .ok_or_else(|| {
                Rejection::new(Reason::InvalidEvent, "hub.challenge is missing or too long")
            })?;
        tracing::info!(channel = NAME, "meta webhook verified");
        let mut resp = text_response(StatusCode::OK, "text/plain", challenge.to_string());
        resp.headers_mut().insert(
            hyper::header::X_CONTENT_TYPE_OPTIONS,
            hyper::header::HeaderValue::from_static("nosniff"),
        );
        Ok(resp)
    }

    /// `X-Hub-Signature-256` over the raw body, with the channel's mode applied.
    fn verify(&self, parts: &Parts, body: &[u8]) -> Result<(), Rejection> {
        if self.cfg.signature_mode == SignatureMode::Off {
            return Ok(());
        }
        let outcome = match parts
            .headers
            .get(SIGNATURE_HEADER)
            .map(|v| v.to_str().unwrap_or(""))
        {
            None => Err(Reason::MissingSignature),
            Some(h) => match h.trim().strip_prefix("sha256=") {
                Some(hex)
                    if crate::auth::verify_hmac_sha256_hex(&self.secrets, &[body], hex)
                        .is_some() =>
                {
                    Ok(())
                }
                _ => Err(Reason::BadSignature),
            },
        };
        crate::auth::apply_mode(self.cfg.signature_mode, NAME, outcome)
    }

    /// Everything to record from a verified body.
    pub(crate) fn parse(&self, v: &Value) -> Result<Batch, Rejection> {
        let object = v
            .get("object")
            .and_then(Value::as_str)
            .ok_or_else(|| Rejection::new(Reason::InvalidEvent, "`object` is missing"))?;
        let entries = match v.get("entry") {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(a)) => a.as_slice(),
            Some(_) => {
                return Err(Rejection::new(
                    Reason::InvalidEvent,
                    "`entry` must be an array",
                ))
            }
        };
        let mut batch = Batch::default();
        let product = match object {
            "whatsapp_business_account" => Product::WhatsApp,
            "page" => Product::Messenger,
            "instagram" => Product::Instagram,
            _ => {
                // Another subscription of the same app (`user`, `permissions`, ...).
                batch.ignore("object");
                return Ok(batch);
            }
        };
        for entry in entries {
            match product {
                Product::WhatsApp => self.whatsapp_entry(entry, &mut batch),
                _ => self.messaging_entry(product, entry, &mut batch),
            }
        }
        Ok(batch)
    }

    fn whatsapp_entry(&self, entry: &Value, batch: &mut Batch) {
        let waba = id_of(&entry["id"]);
        for change in arr(&entry["changes"]) {
            let field = change.get("field").and_then(Value::as_str);
            if field.is_some_and(|f| f != "messages") {
                batch.ignore("field");
                continue;
            }
            let value = &change["value"];
            let account = id_of(&value["metadata"]["phone_number_id"]);
            let contacts = arr(&value["contacts"]);
            for _ in arr(&value["statuses"]) {
                batch.ignore("status");
            }
            for _ in arr(&value["errors"]) {
                batch.ignore("error");
            }
            for m in arr(&value["messages"]) {
                batch.take(self.whatsapp_message(m, account.as_deref(), waba.as_deref(), contacts));
            }
        }
    }

    fn whatsapp_message(
        &self,
        m: &Value,
        account: Option<&str>,
        waba: Option<&str>,
        contacts: &[Value],
    ) -> Result<(Option<i64>, Intake), &'static str> {
        let id = str_of(m, "id").ok_or("malformed")?;
        let account = account.ok_or("malformed")?;
        let from = str_of(m, "from");
        let from_user = str_of(m, "from_user_id").or_else(|| str_of(m, "user_id"));
        let contact = contacts
            .iter()
            .find(|c| {
                (from.is_some() && str_of(c, "wa_id") == from)
                    || (from_user.is_some() && str_of(c, "user_id") == from_user)
            })
            .or(match contacts {
                [only] => Some(only),
                _ => None,
            });
        let wa_id = from.or_else(|| contact.and_then(|c| str_of(c, "wa_id")));
        let bsuid = from_user.or_else(|| contact.and_then(|c| str_of(c, "user_id")));
        // `wa_id` is always international, without `+`: never read it in the default region.
        let phone = wa_id.and_then(|w| {
            let digits = w.trim_start_matches('+');
            self.normalizer.phone(&format!("+{digits}")).ok()
        });
        let social_id = bsuid.or(wa_id).ok_or("malformed")?;
        let profile = contact.map(|c| &c["profile"]).unwrap_or(&Value::Null);

        let ty = str_of(m, "type").unwrap_or("");
        let mut text = String::new();
        let mut attachments = Vec::new();
        let mut meta: BTreeMap<String, String> = BTreeMap::new();
        match ty {
            "text" => text = str_of(&m["text"], "body").unwrap_or("").to_string(),
            "image" | "audio" | "video" | "document" | "sticker" => {
                let media = &m[ty];
                text = str_of(media, "caption").unwrap_or("").to_string();
                if let Some(media_id) = id_of(&media["id"]) {
                    attachments.push(Attachment {
                        name: str_of(media, "filename").map(str::to_string),
                        content_type: str_of(media, "mime_type").map(str::to_string),
                        size: None,
                        sha256: str_of(media, "sha256").map(str::to_string),
                        // Fetched with the business token: GET /<media-id> gives a short-lived URL.
                        url: Some(format!("https://graph.facebook.com/{media_id}")),
                        ..Default::default()
                    });
                    meta.insert("media_id".into(), media_id);
                }
                if is_true(&media["voice"]) {
                    meta.insert("voice_note".into(), "true".into());
                }
            }
            "location" => {
                let loc = &m["location"];
                let lat = loc.get("latitude").and_then(Value::as_f64);
                let lon = loc.get("longitude").and_then(Value::as_f64);
                let mut lines: Vec<String> = Vec::new();
                for k in ["name", "address"] {
                    if let Some(s) = str_of(loc, k) {
                        lines.push(s.to_string());
                        meta.insert(format!("location_{k}"), s.to_string());
                    }
                }
                if let (Some(lat), Some(lon)) = (lat, lon) {
                    lines.push(format!("{lat},{lon}"));
                    meta.insert("location_latitude".into(), lat.to_string());
                    meta.insert("location_longitude".into(), lon.to_string());
                }
                text = lines.join("\n");
            }
            "interactive" => {
                let it = &m["interactive"];
                let kind = str_of(it, "type").unwrap_or("");
                let reply = &it[kind];
                match kind {
                    "button_reply" | "list_reply" => {
                        let parts: Vec<&str> = ["title", "description"]
                            .iter()
                            .filter_map(|k| str_of(reply, k))
                            .collect();
                        text = parts.join("\n");
                        if let Some(r) = str_of(reply, "id") {
                            meta.insert("reply_id".into(), r.to_string());
                        }
                    }
                    "nfm_reply" => {
                        text = str_of(reply, "body").unwrap_or("").to_string();
                        if let Some(r) = str_of(reply, "response_json") {
                            meta.insert("flow_response".into(), r.to_string());
                        }
                    }
                    _ => {}
                }
                meta.insert("interactive_type".into(), kind.to_string());
            }
            "button" => {
                text = str_of(&m["button"], "text").unwrap_or("").to_string();
                if let Some(p) = str_of(&m["button"], "payload") {
                    meta.insert("button_payload".into(), p.to_string());
                }
            }
            "contacts" => {
                let mut lines = Vec::new();
                for c in arr(&m["contacts"]) {
                    let name = str_of(&c["name"], "formatted_name").unwrap_or("");
                    let phones: Vec<&str> = arr(&c["phones"])
                        .iter()
                        .filter_map(|p| str_of(p, "phone"))
                        .collect();
                    let line = format!("{name} {}", phones.join(", "));
                    if !line.trim().is_empty() {
                        lines.push(line.trim().to_string());
                    }
                }
                text = lines.join("\n");
            }
            "reaction" => return Err("reaction"),
            "system" => return Err("system"),
            _ => return Err("unsupported"),
        }
        // The pipeline's own normalisation decides emptiness: a message it would refuse must be
        // skipped here, or it would fail every other message of the batch.
        if crate::record::normalize_text(&text).is_empty() && attachments.is_empty() {
            return Err("empty");
        }

        let mut i = Intake::new(ChannelKind::Social, Product::WhatsApp.provider(), text);
        i.provider_message_id = Some(id.to_string());
        i.account = Some(account.to_string());
        i.attachments = attachments;
        i.identity = RawIdentity {
            phone,
            social: Some(SocialId {
                platform: Product::WhatsApp.platform().into(),
                account: Some(account.to_string()),
                id: social_id.to_string(),
                handle: str_of(profile, "username").map(str::to_string),
            }),
            name: str_of(profile, "name").map(str::to_string),
            ..Default::default()
        };
        i.in_reply_to = str_of(&m["context"], "id").map(str::to_string);
        if is_true(&m["context"]["forwarded"]) || is_true(&m["context"]["frequently_forwarded"]) {
            meta.insert("forwarded".into(), "true".into());
        }
        meta.insert("message_type".into(), ty.to_string());
        if let Some(w) = waba {
            meta.insert("waba_id".into(), w.to_string());
        }
        i.metadata = meta;
        let ts = int_of(&m["timestamp"]).and_then(|s| s.checked_mul(1000));
        i.occurred_at = at_ms(ts);
        Ok((ts, i))
    }

    fn messaging_entry(&self, product: Product, entry: &Value, batch: &mut Batch) {
        let entry_id = id_of(&entry["id"]);
        let entry_time = int_of(&entry["time"]);
        for ev in arr(&entry["messaging"]) {
            batch.take(self.messaging_event(product, ev, entry_id.as_deref(), entry_time));
        }
        // The App Dashboard's "Test" button sends the `changes[]` shape.
        for change in arr(&entry["changes"]) {
            match change.get("field").and_then(Value::as_str) {
                Some("messages") => batch.take(self.messaging_event(
                    product,
                    &change["value"],
                    entry_id.as_deref(),
                    entry_time,
                )),
                _ => batch.ignore("field"),
            }
        }
        // Handover protocol: another app owns the thread; that app answers.
        for _ in arr(&entry["standby"]) {
            batch.ignore("standby");
        }
    }

    fn messaging_event(
        &self,
        product: Product,
        ev: &Value,
        entry_id: Option<&str>,
        entry_time: Option<i64>,
    ) -> Result<(Option<i64>, Intake), &'static str> {
        let (mid, text, msg) = if let Some(msg) = ev.get("message").filter(|m| m.is_object()) {
            if is_true(&msg["is_echo"]) {
                return Err("echo");
            }
            if is_true(&msg["is_deleted"]) {
                return Err("deleted");
            }
            if is_true(&msg["is_unsupported"]) {
                return Err("unsupported");
            }
            let mid = str_of(msg, "mid").ok_or("malformed")?;
            (
                Some(mid),
                msg.get("text").and_then(Value::as_str).unwrap_or(""),
                Some(msg),
            )
        } else if let Some(pb) = ev.get("postback").filter(|m| m.is_object()) {
            (
                str_of(pb, "mid"),
                str_of(pb, "title").unwrap_or(""),
                Some(pb),
            )
        } else {
            return Err(if ev.get("delivery").is_some() {
                "delivery"
            } else if ev.get("read").is_some() {
                "read"
            } else if ev.get("reaction").is_some() {
                "reaction"
            } else {
                "other"
            });
        };
        let msg = msg.unwrap_or(&Value::Null);
        let sender = id_of(&ev["sender"]["id"]).ok_or("malformed")?;
        let account = id_of(&ev["recipient"]["id"])
            .or_else(|| entry_id.map(str::to_string))
            .ok_or("malformed")?;

        let mut attachments = Vec::new();
        let mut types = Vec::new();
        for a in arr(&msg["attachments"]) {
            let ty = str_of(a, "type").unwrap_or("unknown");
            types.push(ty);
            if let Some(url) = str_of(&a["payload"], "url") {
                attachments.push(Attachment {
                    name: str_of(&a["payload"], "title").map(str::to_string),
                    url: Some(url.to_string()),
                    ..Default::default()
                });
            }
        }
        // The pipeline's own normalisation decides emptiness: a message it would refuse must be
        // skipped here, or it would fail every other message of the batch.
        if crate::record::normalize_text(text).is_empty() && attachments.is_empty() {
            return Err("empty");
        }

        let mut i = Intake::new(ChannelKind::Social, product.provider(), text);
        // A postback without a mid still collapses Meta's retries: sender, time and payload.
        i.provider_message_id = mid.map(str::to_string).or_else(|| {
            let payload = msg.get("payload").map(Value::to_string).unwrap_or_default();
            let ts = ev
                .get("timestamp")
                .map(Value::to_string)
                .unwrap_or_default();
            let h =
                crate::dedupe::hash_key(&[sender.as_bytes(), ts.as_bytes(), payload.as_bytes()]);
            Some(format!("postback:{h:032x}"))
        });
        i.account = Some(account.clone());
        i.attachments = attachments;
        i.identity = RawIdentity {
            social: Some(SocialId {
                platform: product.platform().into(),
                account: Some(account),
                id: sender,
                handle: None,
            }),
            ..Default::default()
        };
        i.in_reply_to = str_of(&msg["reply_to"], "mid").map(str::to_string);
        if !types.is_empty() {
            i.metadata
                .insert("attachment_types".into(), types.join(","));
        }
        if let Some(p) = str_of(&msg["quick_reply"], "payload") {
            i.metadata.insert("quick_reply_payload".into(), p.into());
        }
        if ev.get("postback").is_some() {
            i.metadata.insert("message_type".into(), "postback".into());
            if let Some(p) = str_of(msg, "payload") {
                i.metadata.insert("postback_payload".into(), p.into());
            }
        }
        let ts = int_of(&ev["timestamp"]).or(entry_time);
        i.occurred_at = at_ms(ts);
        Ok((ts, i))
    }

    /// The messages of a verified body, in provider-time order, and what was left out.
    fn intakes(
        &self,
        body: &[u8],
    ) -> Result<(Vec<Intake>, BTreeMap<&'static str, u64>), Rejection> {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| Rejection::new(Reason::MalformedJson, e.to_string()))?;
        let mut batch = self.parse(&v)?;
        let n = batch.items.len();
        if n > self.cfg.max_batch {
            return Err(Rejection::new(
                Reason::BatchTooLarge,
                format!("{n} messages; at most {} per delivery", self.cfg.max_batch),
            ));
        }
        let ignored = std::mem::take(&mut batch.ignored);
        Ok((batch.into_ordered(), ignored))
    }

    async fn receive(&self, inbound: Inbound, pipeline: &Pipeline) -> Result<Resp, Rejection> {
        self.verify(&inbound.parts, &inbound.body)?;
        let (intakes, ignored) = self.intakes(&inbound.body)?;
        for (kind, n) in &ignored {
            metrics::counter!(IGNORED_METRIC, "channel" => NAME, "kind" => *kind).increment(*n);
        }
        tracing::debug!(
            channel = NAME,
            messages = intakes.len(),
            ignored = ignored.values().sum::<u64>(),
            "meta delivery"
        );
        if !intakes.is_empty() {
            pipeline.submit(&inbound.ctx, intakes).await?;
        }
        Ok(text_response(StatusCode::OK, "text/plain", SUCCESS))
    }
}

impl Channel for Meta {
    fn name(&self) -> &'static str {
        NAME
    }

    fn allow(&self) -> &'static str {
        "GET, POST"
    }

    fn max_body(&self) -> Option<usize> {
        Some(MAX_BODY)
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
                return self.handshake(&inbound.parts);
            }
            self.receive(inbound, pipeline).await
        })
    }

    /// 403 for a failed signature or verify token, `Retry-After` with a 503.
    fn reject(&self, r: &Rejection) -> Resp {
        provider_json_reject(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "test_app_secret";
    const M1: &str = include_str!("../../tests/fixtures/meta/whatsapp_text_m1.json");
    const M2: &str = include_str!("../../tests/fixtures/meta/messenger_text.json");
    const M3: &str = include_str!("../../tests/fixtures/meta/instagram_text.json");

    fn meta_with(f: impl FnOnce(&mut MetaConfig)) -> Meta {
        let mut cfg = MetaConfig {
            app_secrets: vec![SECRET.into()],
            verify_token: "meatyhamhock".into(),
            ..Default::default()
        };
        f(&mut cfg);
        Meta::new(cfg, Normalizer::new("CN")).unwrap()
    }

    fn meta() -> Meta {
        meta_with(|_| {})
    }

    fn post(sig: Option<&str>) -> Parts {
        let mut b = hyper::Request::builder()
            .method("POST")
            .uri(ROUTE)
            .header("content-type", "application/json");
        if let Some(s) = sig {
            b = b.header(SIGNATURE_HEADER, s);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn get(query: &str) -> Parts {
        hyper::Request::builder()
            .method("GET")
            .uri(format!("{ROUTE}?{query}"))
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn parse(m: &Meta, body: &str) -> (Vec<Intake>, BTreeMap<&'static str, u64>) {
        m.intakes(body.as_bytes()).unwrap()
    }

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/tests/fixtures/meta/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn signature_known_answers_and_failures() {
        // CHANNELS.md §3.6 M1–M4, computed with Python's hmac over the exact bytes.
        assert_eq!(M1.len(), 499);
        let m1 = "ded1d1d9621cffa39832ccf2b330fa476b4dc8ec2a5d102e1e554312b3f21d42";
        assert_eq!(crate::auth::sign_hex(SECRET, &[M1.as_bytes()]), m1);
        assert_eq!(
            crate::auth::sign_hex(SECRET, &[M2.as_bytes()]),
            "0c9b5fc144122e88931b8e9561fb9c9c4d513fc0725c936aeec868151bb46182"
        );
        assert_eq!(
            crate::auth::sign_hex(SECRET, &[M3.as_bytes()]),
            "b5208ebf54a82f0cb8ad27bf222790087154b043f1cdb728feedac0b5f8061a3"
        );
        // The unicode-escape trap: the escapes are hashed as sent, never the decoded text.
        let m4 = r#"{"text":"\u00e4\u00f6\u00e5"}"#;
        assert_eq!(m4.len(), 29);
        let m4_sig = "02331cadf5416e9e5dc4ecf73b5c9b7aa6577a90b90fbb6bad6e9a35d8a8f6a9";
        assert_eq!(crate::auth::sign_hex(SECRET, &[m4.as_bytes()]), m4_sig);

        let m = meta();
        m.verify(&post(Some(&format!("sha256={m1}"))), M1.as_bytes())
            .unwrap();
        m.verify(&post(Some(&format!("sha256={m4_sig}"))), m4.as_bytes())
            .unwrap();
        let decoded = r#"{"text":"äöå"}"#;
        let e = m
            .verify(&post(Some(&format!("sha256={m4_sig}"))), decoded.as_bytes())
            .unwrap_err();
        assert_eq!(e.reason, Reason::BadSignature);
        assert_eq!(super::super::provider_status(&e), StatusCode::FORBIDDEN);

        // Same JSON, re-encoded (pretty-printed): the old signature no longer holds; a signature
        // over the new bytes does.
        let pretty =
            serde_json::to_string_pretty(&serde_json::from_str::<Value>(M1).unwrap()).unwrap();
        let e = m
            .verify(&post(Some(&format!("sha256={m1}"))), pretty.as_bytes())
            .unwrap_err();
        assert_eq!(e.reason, Reason::BadSignature);
        let pretty_sig = crate::auth::sign_hex(SECRET, &[pretty.as_bytes()]);
        m.verify(
            &post(Some(&format!("sha256={pretty_sig}"))),
            pretty.as_bytes(),
        )
        .unwrap();

        // Without the prefix, with the legacy sha1 prefix, missing, or another app's secret.
        for bad in [m1.to_string(), format!("sha1={m1}"), "sha256=".into()] {
            let e = m.verify(&post(Some(&bad)), M1.as_bytes()).unwrap_err();
            assert_eq!(e.reason, Reason::BadSignature, "{bad}");
        }
        let e = m.verify(&post(None), M1.as_bytes()).unwrap_err();
        assert_eq!(e.reason, Reason::MissingSignature);
        let other = crate::auth::sign_hex("another_app", &[M1.as_bytes()]);
        assert!(m
            .verify(&post(Some(&format!("sha256={other}"))), M1.as_bytes())
            .is_err());

        // Rotation: the previous secret still verifies.
        let rotated = meta_with(|c| c.app_secrets = vec!["new_secret".into(), SECRET.into()]);
        rotated
            .verify(&post(Some(&format!("sha256={m1}"))), M1.as_bytes())
            .unwrap();

        // log_only lets it through, off does not look.
        let lo = meta_with(|c| c.signature_mode = SignatureMode::LogOnly);
        lo.verify(&post(Some("sha256=00")), M1.as_bytes()).unwrap();
        let off = meta_with(|c| {
            c.signature_mode = SignatureMode::Off;
            c.app_secrets = vec![];
        });
        off.verify(&post(None), M1.as_bytes()).unwrap();
    }

    #[test]
    fn config_is_checked() {
        let n = || Normalizer::new("CN");
        let no_secret = MetaConfig {
            app_secrets: vec![String::new()],
            ..Default::default()
        };
        assert!(Meta::new(no_secret, n()).is_err());
        let three = MetaConfig {
            app_secrets: vec!["a".into(), "b".into(), "c".into()],
            ..Default::default()
        };
        assert!(Meta::new(three, n()).is_err());
        let zero = MetaConfig {
            max_batch: 0,
            ..Default::default()
        };
        assert!(Meta::new(zero, n()).is_err());
        let d = MetaConfig::default();
        assert_eq!(d.max_batch, 1000);
        assert_eq!(d.signature_mode, SignatureMode::Enforce);
        // No secret by default: the route is not mounted (app.rs) and Meta::new refuses it.
        assert!(d.app_secrets.is_empty());
        assert!(Meta::new(d, n()).is_err());
    }

    #[test]
    fn handshake_echoes_the_challenge_only_for_the_token() {
        let m = meta();
        let r = m
            .handshake(&get(
                "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=meatyhamhock",
            ))
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "text/plain");
        for q in [
            "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=meatyhamhocks",
            "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=",
            "hub.mode=subscribe&hub.challenge=1158201444",
            "hub.challenge=1158201444&hub.verify_token=meatyhamhock",
            "hub.mode=unsubscribe&hub.challenge=1158201444&hub.verify_token=meatyhamhock",
            "",
        ] {
            let e = m.handshake(&get(q)).unwrap_err();
            assert_eq!(
                super::super::provider_status(&e),
                StatusCode::FORBIDDEN,
                "{q}"
            );
        }
        let e = m
            .handshake(&get("hub.mode=subscribe&hub.verify_token=meatyhamhock"))
            .unwrap_err();
        assert_eq!(e.reason, Reason::InvalidEvent);
        // An unset token refuses everyone, the empty token included.
        let unset = meta_with(|c| c.verify_token = String::new());
        assert!(unset
            .handshake(&get("hub.mode=subscribe&hub.challenge=1&hub.verify_token="))
            .is_err());
    }

    #[test]
    fn whatsapp_text_m1() {
        let (v, ignored) = parse(&meta(), M1);
        assert!(ignored.is_empty());
        assert_eq!(v.len(), 1);
        let i = &v[0];
        assert_eq!(i.channel, ChannelKind::Social);
        assert_eq!(i.provider, "meta.whatsapp");
        assert_eq!(
            i.provider_message_id.as_deref(),
            Some("wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=")
        );
        assert_eq!(i.account.as_deref(), Some("106540352242922"));
        assert_eq!(i.text, "Does it come in another color?");
        // International without `+`, even though 165… is also a Chinese mobile prefix.
        assert_eq!(i.identity.phone.as_deref(), Some("+16505551234"));
        assert_eq!(i.identity.name.as_deref(), Some("Sheena Nelson"));
        let s = i.identity.social.as_ref().unwrap();
        assert_eq!(
            (s.platform.as_str(), s.account.as_deref(), s.id.as_str()),
            ("whatsapp", Some("106540352242922"), "16505551234")
        );
        assert_eq!(
            crate::record::rfc3339_ms(i.occurred_at.unwrap()),
            "2025-06-08T20:59:43.000Z"
        );
        assert_eq!(i.metadata["waba_id"], "102290129340398");
        assert_eq!(i.metadata["message_type"], "text");
    }

    #[test]
    fn whatsapp_chinese_text_is_decoded_from_escapes_byte_exact() {
        let body = fixture("whatsapp_text_zh.json");
        assert!(body.is_ascii(), "sent escaped, as Meta does");
        let (v, _) = parse(&meta(), &body);
        assert_eq!(v[0].text, "家里宽带断网三天了😡，客服电话一直打不通！");
        assert_eq!(v[0].identity.phone.as_deref(), Some("+8613800138000"));
        assert_eq!(v[0].identity.name.as_deref(), Some("王小明"));
        assert_eq!(v[0].account.as_deref(), Some("310000000000001"));
    }

    #[test]
    fn whatsapp_image_is_an_attachment_with_its_media_id() {
        let (v, _) = parse(&meta(), &fixture("whatsapp_image.json"));
        let i = &v[0];
        assert_eq!(i.text, "路由器一直红灯");
        assert_eq!(i.metadata["media_id"], "1471350733630522");
        assert_eq!(i.metadata["message_type"], "image");
        assert_eq!(
            i.attachments,
            vec![Attachment {
                name: None,
                content_type: Some("image/jpeg".into()),
                size: None,
                sha256: Some("tmCr8d9uH5kH3p5VY9vW8cM1ZbqD2o8xQm3j0g0Lr9k=".into()),
                url: Some("https://graph.facebook.com/1471350733630522".into()),
                ..Default::default()
            }]
        );
        // Media without a caption is still a complaint (a photo of the bill).
        let doc = r#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{"metadata":{"phone_number_id":"9"},"messages":[{"from":"8613800138000","id":"wamid.d","timestamp":"1","type":"document","document":{"id":"77","filename":"账单.pdf","mime_type":"application/pdf"}}]}}]}]}"#;
        let (v, _) = parse(&meta(), doc);
        assert_eq!(v[0].text, "");
        assert_eq!(v[0].attachments[0].name.as_deref(), Some("账单.pdf"));
    }

    #[test]
    fn whatsapp_statuses_are_counted_not_recorded() {
        let (v, ignored) = parse(&meta(), &fixture("whatsapp_statuses.json"));
        assert!(v.is_empty());
        assert_eq!(ignored["status"], 2);
    }

    #[test]
    fn multi_entry_batch_is_ordered_by_provider_time() {
        let (v, ignored) = parse(&meta(), &fixture("whatsapp_batch_multi_entry.json"));
        assert_eq!(ignored["status"], 1);
        let ids: Vec<&str> = v
            .iter()
            .map(|i| i.provider_message_id.as_deref().unwrap())
            .collect();
        assert_eq!(
            ids,
            [
                "wamid.batch.0001",
                "wamid.batch.0002",
                "wamid.batch.0003",
                "wamid.batch.0004"
            ]
        );
        // Button reply, answering an outbound message.
        assert_eq!(v[0].text, "网络问题");
        assert_eq!(v[0].metadata["reply_id"], "complain_network");
        assert_eq!(v[0].in_reply_to.as_deref(), Some("wamid.outbound.0001"));
        assert_eq!(v[0].identity.phone.as_deref(), Some("+8613700137000"));
        // A username user: no phone, the BSUID scoped to the receiving number.
        assert_eq!(v[1].text, "Family plan 👨‍👩‍👧 billed twice");
        assert!(v[1].identity.phone.is_none());
        let s = v[1].identity.social.as_ref().unwrap();
        assert_eq!(s.id, "US.13491208655302741918");
        assert_eq!(s.account.as_deref(), Some("310000000000002"));
        assert_eq!(s.handle.as_deref(), Some("sam.k"));
        assert_eq!(v[1].account.as_deref(), Some("310000000000002"));
        // Arabic (RTL mark kept) with emoji.
        assert_eq!(v[2].text, "\u{200f}الإنترنت لا يعمل منذ يومين 📶❌");
        assert_eq!(v[2].identity.phone.as_deref(), Some("+971501234567"));
        assert_eq!(v[2].identity.name.as_deref(), Some("أحمد"));
        // Location.
        assert_eq!(v[3].text, "天安门营业厅\n北京市东城区\n39.9087,116.3975");
        assert_eq!(v[3].metadata["location_latitude"], "39.9087");
    }

    #[test]
    fn messenger_text_echo_and_receipts() {
        let (v, ignored) = parse(&meta(), M2);
        assert!(ignored.is_empty());
        let i = &v[0];
        assert_eq!(i.provider, "meta.messenger");
        assert_eq!(
            i.provider_message_id.as_deref(),
            Some("mid.1457764197618:41d102a3e1ae206a38")
        );
        assert_eq!(i.account.as_deref(), Some("1234567890123456"));
        assert_eq!(i.text, "hello, world!");
        assert!(i.identity.phone.is_none());
        let s = i.identity.social.as_ref().unwrap();
        assert_eq!(
            (s.platform.as_str(), s.account.as_deref(), s.id.as_str()),
            ("messenger", Some("1234567890123456"), "2345678901234567")
        );
        assert_eq!(
            crate::record::rfc3339_ms(i.occurred_at.unwrap()),
            "2016-03-12T06:29:57.627Z"
        );

        let (v, ignored) = parse(&meta(), &fixture("messenger_echo.json"));
        assert!(v.is_empty());
        assert_eq!(
            ignored,
            BTreeMap::from([("delivery", 1), ("echo", 1), ("read", 1)])
        );
    }

    #[test]
    fn messenger_attachments_postbacks_and_replies() {
        let body = r#"{"object":"page","entry":[{"id":"P","time":5,"messaging":[
            {"sender":{"id":"U"},"recipient":{"id":"P"},"timestamp":3,"message":{"mid":"m1","attachments":[{"type":"image","payload":{"url":"https://cdn.example/x.jpg"}}],"reply_to":{"mid":"m0"}}},
            {"sender":{"id":"U"},"recipient":{"id":"P"},"timestamp":2,"postback":{"mid":"m2","title":"投诉","payload":"COMPLAIN"}},
            {"sender":{"id":"U"},"recipient":{"id":"P"},"timestamp":1,"message":{"mid":"m3","text":"hi","quick_reply":{"payload":"NET"}}},
            {"sender":{"id":"U"},"recipient":{"id":"P"},"timestamp":4,"reaction":{"mid":"m0","action":"react","emoji":"😡"}},
            {"sender":{"id":"U"},"recipient":{"id":"P"},"timestamp":4,"message":{"mid":"m4","is_deleted":true}},
            {"sender":{"id":"U"},"recipient":{"id":"P"},"timestamp":4,"message":{"mid":"m5"}}
        ]}]}"#;
        let (v, ignored) = parse(&meta(), body);
        let ids: Vec<&str> = v
            .iter()
            .map(|i| i.provider_message_id.as_deref().unwrap())
            .collect();
        assert_eq!(ids, ["m3", "m2", "m1"]);
        assert_eq!(v[0].metadata["quick_reply_payload"], "NET");
        assert_eq!(v[1].text, "投诉");
        assert_eq!(v[1].metadata["postback_payload"], "COMPLAIN");
        assert_eq!(v[2].text, "");
        assert_eq!(
            v[2].attachments[0].url.as_deref(),
            Some("https://cdn.example/x.jpg")
        );
        assert_eq!(v[2].metadata["attachment_types"], "image");
        assert_eq!(v[2].in_reply_to.as_deref(), Some("m0"));
        assert_eq!(
            ignored,
            BTreeMap::from([("deleted", 1), ("empty", 1), ("reaction", 1)])
        );
    }

    #[test]
    fn instagram_messaging_and_dashboard_test_shape() {
        let (v, _) = parse(&meta(), M3);
        let i = &v[0];
        assert_eq!(i.provider, "meta.instagram");
        assert_eq!(i.text, "My SIM stopped working");
        assert_eq!(i.account.as_deref(), Some("17841400000000001"));
        let s = i.identity.social.as_ref().unwrap();
        assert_eq!(
            (s.platform.as_str(), s.id.as_str()),
            ("instagram", "1122334455667788")
        );
        let test = r#"{"object":"instagram","entry":[{"id":"17841400000000001","time":1,"changes":[{"field":"messages","value":{"sender":{"id":"12334"},"recipient":{"id":"23245"},"timestamp":"1527459824","message":{"mid":"random_mid","text":"random_text"}}},{"field":"comments","value":{}}]}]}"#;
        let (v, ignored) = parse(&meta(), test);
        assert_eq!(v[0].text, "random_text");
        assert_eq!(v[0].account.as_deref(), Some("23245"));
        assert_eq!(ignored["field"], 1);
        let echo = r#"{"object":"instagram","entry":[{"id":"1","messaging":[{"sender":{"id":"1"},"recipient":{"id":"2"},"timestamp":1,"message":{"mid":"e","text":"we replied","is_echo":true}}]}]}"#;
        let (v, ignored) = parse(&meta(), echo);
        assert!(v.is_empty());
        assert_eq!(ignored["echo"], 1);
    }

    fn whatsapp_batch(n: usize) -> String {
        let messages: Vec<Value> = (0..n)
            .map(|k| {
                serde_json::json!({
                    "from": format!("86138{:08}", k),
                    "id": format!("wamid.bulk.{k:04}"),
                    "timestamp": (1_767_225_600 + (n - k)).to_string(),
                    "type": "text",
                    "text": {"body": format!("第{k}条：信号差 📶")},
                })
            })
            .collect();
        serde_json::json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [
            {"field": "messages", "value": {"metadata": {"phone_number_id": "9"}, "messages": messages}}]}]})
        .to_string()
    }

    #[test]
    fn a_batch_of_1000_is_taken_and_1001_refused() {
        let m = meta();
        let (v, _) = parse(&m, &whatsapp_batch(1000));
        assert_eq!(v.len(), 1000);
        // Later in the array, earlier in time: the order is reversed.
        assert_eq!(v[0].provider_message_id.as_deref(), Some("wamid.bulk.0999"));
        assert_eq!(v[999].text, "第0条：信号差 📶");
        let e = m.intakes(whatsapp_batch(1001).as_bytes()).unwrap_err();
        assert_eq!(e.reason, Reason::BatchTooLarge);
    }

    #[test]
    fn bad_bodies_are_400_and_odd_items_never_panic() {
        let m = meta();
        let e = m.intakes(b"{not json").unwrap_err();
        assert_eq!(e.reason, Reason::MalformedJson);
        assert_eq!(e.reason.status(), StatusCode::BAD_REQUEST);
        for body in [
            "[]",
            "1",
            r#"{"entry":[]}"#,
            r#"{"object":"page","entry":{}}"#,
        ] {
            let e = m.intakes(body.as_bytes()).unwrap_err();
            assert_eq!(e.reason, Reason::InvalidEvent, "{body}");
        }
        let (v, ignored) = parse(&m, r#"{"object":"permissions","entry":[{}]}"#);
        assert!(v.is_empty());
        assert_eq!(ignored["object"], 1);

        let odd = [
            r#"{"object":"whatsapp_business_account"}"#,
            r#"{"object":"whatsapp_business_account","entry":[null,1,"x",{"changes":null},{"changes":[null,{"value":null},{"value":{"messages":[null,1,{}]}}]}]}"#,
            r#"{"object":"whatsapp_business_account","entry":[{"changes":[{"value":{"metadata":{"phone_number_id":9},"contacts":[{},{}],"messages":[{"id":"a","type":"text","text":{"body":"x"}},{"id":"b","from":"x","timestamp":"99999999999999999","type":"text","text":{"body":"z"}},{"id":"i","from":"1","type":"text","text":"not an object"},{"id":"c","from":"1","type":"image","image":{}},{"id":"d","from":"1","type":"location","location":{"latitude":"x"}},{"id":"e","from":"1","type":"interactive","interactive":{"type":"list_reply","list_reply":null}},{"id":"f","from":"1","type":"reaction"},{"id":"g","from":"1","type":"unknown"},{"id":"h","from":"","user_id":"","type":"text","text":{"body":"y"}}]}}]}]}"#,
            r#"{"object":"page","entry":[{"messaging":[null,{},{"message":null},{"message":{"mid":1}},{"message":{"mid":"m","text":5},"sender":{"id":1}},{"postback":{},"sender":{"id":"u"},"recipient":{"id":"p"}},{"sender":{"id":"u"},"recipient":{"id":"p"},"timestamp":-9223372036854775808,"message":{"mid":"z","text":"t"}}]}]}"#,
        ];
        for body in odd {
            let (v, _) = parse(&m, body);
            for i in &v {
                assert!(!i.text.is_empty() || !i.attachments.is_empty(), "{body}");
                assert!(i.identity.social.is_some());
            }
        }
        // A huge timestamp never overflows; an unknown sender on WhatsApp is skipped.
        let (v, ignored) = parse(&m, odd[2]);
        let ids: Vec<_> = v
            .iter()
            .map(|i| i.provider_message_id.clone().unwrap())
            .collect();
        assert_eq!(ids, ["b"].map(String::from).to_vec(), "{ignored:?}");
        assert!(v[0].occurred_at.is_none());
    }

    #[test]
    fn errors_answer_as_meta_expects() {
        let m = meta();
        let busy = Rejection::new(Reason::SinkUnavailable, "down")
            .retry_after(std::time::Duration::from_secs(7));
        let r = m.reject(&busy);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], "7");
        let r = m.reject(&Rejection::unauthorized(Reason::BadSignature));
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let r = m.reject(&Rejection::new(Reason::MalformedJson, "x"));
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let put = hyper::Request::builder()
            .method("PUT")
            .uri(ROUTE)
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let ctx = RequestCtx {
            peer: "127.0.0.1".parse().unwrap(),
            channel: NAME,
            trace_id: String::new(),
        };
        assert_eq!(
            m.precheck(&put, &ctx).unwrap_err().reason,
            Reason::MethodNotAllowed
        );
        m.precheck(&post(None), &ctx).unwrap();
        m.precheck(&get(""), &ctx).unwrap();
    }
}
