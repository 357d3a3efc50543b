//! WeChat Official Account (微信公众号) server callbacks on `GET, POST /hooks/wechat`
//! (CHANNELS.md §4).
//!
//! - `GET ?signature&timestamp&nonce&echostr`: URL verification (接入验证). `signature` =
//!   hex(SHA1(concat(sort([token, timestamp, nonce])))); on a match `echostr` is echoed as
//!   text/plain. The WeCom-style variant (`msg_signature` over an encrypted `echostr`) is
//!   answered with the decrypted `echostr` when AES keys are configured.
//! - `POST` with an XML body (`text/xml`): one message or event per request. Plaintext mode is
//!   signed by `signature` (query only: the body is **not** covered, so plaintext relies on TLS
//!   and MsgId dedupe). Compatible and safe mode carry `<Encrypt>` and
//!   `msg_signature` = hex(SHA1(concat(sort([token, timestamp, nonce, Encrypt])))), which does
//!   cover the (encrypted) body; it is verified, then the payload is decrypted with
//!   AES-256-CBC (key = Base64(EncodingAESKey + "="), IV = key[0..16], PKCS#7 to 32 bytes,
//!   plaintext = random(16) ‖ len (u32 BE) ‖ XML ‖ AppID) and its AppID checked.
//! - Messages (text, image, voice, video, shortvideo, location, link) become `social` records
//!   (provider `wechat`, account = `ToUserName`, customer = the OpenID scoped to the account).
//!   Dedupe on `MsgId` (WeChat retries 3 times at 5 s intervals with the same MsgId).
//!   Events (subscribe, unsubscribe, SCAN, LOCATION, CLICK, VIEW, …) and unknown message types
//!   carry no complaint: they are acknowledged with `success` and counted
//!   (`switchboard_social_ignored_total{channel="wechat",kind}`), not recorded.
//! - Reply: `success` once the record is durable; or, with `wechat.passive_reply` set, a passive
//!   text reply carrying the record reference (encrypted when the request was). Errors answer
//!   with a short text body (never `success`), so WeChat retries what may succeed later (503).

use super::{provider_status, reference, token_eq, Channel, Inbound};
use crate::config::SignatureMode;
use crate::error::{Reason, Rejection};
use crate::http::{text_response, Resp};
use crate::identity::{RawIdentity, SocialId};
use crate::pipeline::{Pipeline, RequestCtx};
use crate::record::{Attachment, ChannelKind, Intake, Voice};
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use futures_util::future::BoxFuture;
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use quick_xml::events::Event;
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

pub const NAME: &str = "wechat";
pub const ROUTE: &str = "/hooks/wechat";
/// Messages and events acknowledged without a record, by kind (fixed vocabulary).
pub const IGNORED: &str = crate::telemetry::SOCIAL_IGNORED;
pub const SUCCESS: &str = "success";

/// WeChat pushes are a few KB at most (encrypted ones about 4/3 of that).
const MAX_BODY: usize = 64 * 1024;
const MAX_FIELDS: usize = 64;
const MAX_DEPTH: usize = 8;
const MAX_ID_LEN: usize = 128;
const MAX_ECHOSTR: usize = 1024;
/// Passive replies longer than 2048 bytes are refused by WeChat (CHANNELS.md §4.3).
const MAX_REPLY_TEMPLATE: usize = 1900;

/// WeChat's Base64 (EncodingAESKey + "=", `Encrypt`): standard alphabet, but its SDKs accept
/// non-zero trailing bits (e.g. an EncodingAESKey ending in `G`), so we do too.
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;
type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;

/// Message encryption set in the OA console (消息加解密方式).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Encryption {
    /// 明文模式: plaintext XML, `signature` only.
    #[default]
    Plain,
    /// 兼容模式: plaintext fields and `<Encrypt>`; encrypted ones are verified and decrypted,
    /// plaintext ones accepted on `signature`.
    Compatible,
    /// 安全模式: only `<Encrypt>` with `msg_signature` is accepted.
    Safe,
}

/// `[wechat]` in the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WechatConfig {
    /// `enforce` (403 on failure), `log_only`, `off`.
    pub signature_mode: SignatureMode,
    /// The OA token (3–32 letters or digits); a second one during rotation. Empty: the channel
    /// answers 404 (unless `signature_mode = "off"` and `encryption = "plain"`).
    pub tokens: Vec<String>,
    /// The OA AppID (`wx…`), checked inside every decrypted message.
    pub app_id: String,
    /// EncodingAESKey (43 characters); a second one during rotation.
    pub encoding_aes_keys: Vec<String>,
    pub encryption: Encryption,
    /// Passive text reply with `{ref}` (the record reference); empty: reply `success`.
    pub passive_reply: String,
    /// Reject signed requests whose `timestamp` is further than this from now (0: no check).
    pub timestamp_tolerance_secs: u64,
}

impl Default for WechatConfig {
    fn default() -> Self {
        Self {
            signature_mode: SignatureMode::Enforce,
            tokens: Vec::new(),
            app_id: String::new(),
            encoding_aes_keys: Vec::new(),
            encryption: Encryption::Plain,
            passive_reply: String::new(),
            timestamp_tolerance_secs: 300,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Signatures

/// hex(SHA1(concat(sort(parts)))): `signature` over (token, timestamp, nonce) and
/// `msg_signature` over (token, timestamp, nonce, Encrypt).
pub fn sha1_signature(parts: &[&str]) -> String {
    let mut sorted = parts.to_vec();
    sorted.sort_unstable();
    let mut h = Sha1::new();
    for p in sorted {
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Index of the token whose signature matches `provided`. Every token is tried and compared in
/// constant time, so timing tells neither whether nor which one matched.
pub fn signature_matches(
    tokens: &[String],
    timestamp: &str,
    nonce: &str,
    encrypt: Option<&str>,
    provided: &str,
) -> Option<usize> {
    let provided = provided.trim().to_ascii_lowercase();
    let mut matched = None;
    for (i, token) in tokens.iter().enumerate() {
        let expected = match encrypt {
            Some(e) => sha1_signature(&[token, timestamp, nonce, e]),
            None => sha1_signature(&[token, timestamp, nonce]),
        };
        if token_eq(&expected, &provided) && matched.is_none() {
            matched = Some(i);
        }
    }
    matched
}

// ---------------------------------------------------------------------------------------------
// Message crypto (消息加解密)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CryptoError {
    Base64,
    /// Ciphertext empty or not a whole number of AES blocks.
    Length,
    Padding,
    /// The length prefix points outside the plaintext.
    Layout,
    AppId,
    Utf8,
}

/// AESKey = Base64_Decode(EncodingAESKey + "="): 43 characters → 32 bytes.
pub fn decode_aes_key(encoding_aes_key: &str) -> Result<[u8; 32], String> {
    if encoding_aes_key.len() != 43 {
        return Err(format!(
            "an EncodingAESKey has 43 characters, not {}",
            encoding_aes_key.chars().count()
        ));
    }
    let bytes = B64
        .decode(format!("{encoding_aes_key}="))
        .map_err(|_| "an EncodingAESKey is Base64 (A-Z, a-z, 0-9, +, /)".to_string())?;
    bytes
        .try_into()
        .map_err(|_| "an EncodingAESKey must decode to 32 bytes".to_string())
}

/// PKCS#7 padding to WeChat's 32-byte block (not AES's 16, which is why cbc's own padding
/// types do not fit): 1..=32 bytes, each equal to the count.
fn pad32(buf: &mut Vec<u8>) {
    let n = 32 - buf.len() % 32;
    buf.extend(std::iter::repeat_n(n as u8, n));
}

/// Strips the PKCS#7-32 padding, checking every pad byte; malformed padding is an error, never
/// a panic.
fn unpad32(buf: &[u8]) -> Result<&[u8], CryptoError> {
    let n = usize::from(*buf.last().ok_or(CryptoError::Padding)?);
    if n == 0 || n > 32 || n > buf.len() {
        return Err(CryptoError::Padding);
    }
    let (body, pad) = buf.split_at(buf.len() - n);
    if pad.iter().any(|&b| usize::from(b) != n) {
        return Err(CryptoError::Padding);
    }
    Ok(body)
}

/// Encrypts `xml` for `app_id` with a given 16-byte random prefix; returns the Base64 `Encrypt`.
pub fn encrypt_with(
    key: &[u8; 32],
    app_id: &str,
    xml: &str,
    random: &[u8; 16],
) -> Result<String, CryptoError> {
    let len = u32::try_from(xml.len()).map_err(|_| CryptoError::Length)?;
    let mut buf = Vec::with_capacity(20 + xml.len() + app_id.len() + 32);
    buf.extend_from_slice(random);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(xml.as_bytes());
    buf.extend_from_slice(app_id.as_bytes());
    pad32(&mut buf);
    let n = buf.len();
    let (iv, _) = key.split_at(16);
    let enc = Aes256CbcEnc::new_from_slices(key, iv).map_err(|_| CryptoError::Length)?;
    let ct = enc
        .encrypt_padded_mut::<NoPadding>(&mut buf, n)
        .map_err(|_| CryptoError::Length)?;
    Ok(B64.encode(ct))
}

/// Encrypts with a fresh random prefix.
pub fn encrypt(key: &[u8; 32], app_id: &str, xml: &str) -> Result<String, CryptoError> {
    encrypt_with(key, app_id, xml, &random16())
}

/// Decrypts an `Encrypt` value and checks that the trailing AppID (CorpID for WeCom) is
/// `app_id`; returns the inner XML.
pub fn decrypt(key: &[u8; 32], app_id: &str, encrypted: &str) -> Result<String, CryptoError> {
    let mut buf = B64
        .decode(encrypted.trim())
        .map_err(|_| CryptoError::Base64)?;
    if buf.is_empty() || buf.len() % 16 != 0 {
        return Err(CryptoError::Length);
    }
    let (iv, _) = key.split_at(16);
    let dec = Aes256CbcDec::new_from_slices(key, iv).map_err(|_| CryptoError::Length)?;
    let plain = dec
        .decrypt_padded_mut::<NoPadding>(&mut buf)
        .map_err(|_| CryptoError::Length)?;
    let plain = unpad32(plain)?;
    let len_bytes: [u8; 4] = plain
        .get(16..20)
        .and_then(|b| b.try_into().ok())
        .ok_or(CryptoError::Layout)?;
    let len = usize::try_from(u32::from_be_bytes(len_bytes)).map_err(|_| CryptoError::Layout)?;
    let end = 20usize.checked_add(len).ok_or(CryptoError::Layout)?;
    let msg = plain.get(20..end).ok_or(CryptoError::Layout)?;
    let tail = plain.get(end..).ok_or(CryptoError::Layout)?;
    let tail = std::str::from_utf8(tail).map_err(|_| CryptoError::AppId)?;
    if app_id.is_empty() || !token_eq(tail, app_id) {
        return Err(CryptoError::AppId);
    }
    String::from_utf8(msg.to_vec()).map_err(|_| CryptoError::Utf8)
}

/// 16 random bytes from two ULIDs' random parts (80 bits each, from a CSPRNG).
fn random16() -> [u8; 16] {
    let a = ulid::Ulid::new().random().to_be_bytes();
    let b = ulid::Ulid::new().random().to_be_bytes();
    let mut out = [0u8; 16];
    for (o, x) in out.iter_mut().zip(a.iter().skip(6).chain(b.iter().skip(6))) {
        *o = *x;
    }
    out
}

/// A numeric nonce for replies.
fn nonce() -> String {
    (ulid::Ulid::new().random() % 10_000_000_000).to_string()
}

// ---------------------------------------------------------------------------------------------
// XML

/// The direct children of the root element, as (name, text) in document order. Nested
/// elements (e.g. `SendPicsInfo`) are skipped. DOCTYPE and custom entities are refused, so
/// there is no entity expansion; the predefined entities and character references are decoded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fields(Vec<(String, String)>);

impl Fields {
    /// A field's text, trimmed; `None` when absent or blank.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.raw(name).map(str::trim).filter(|v| !v.is_empty())
    }

    /// A field's text exactly as sent.
    pub fn raw(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn bad_xml(msg: impl std::fmt::Display) -> Rejection {
    Rejection::new(Reason::InvalidEvent, format!("malformed XML: {msg}"))
}

pub fn parse_xml(xml: &str) -> Result<Fields, Rejection> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut depth = 0usize;
    let mut root_done = false;
    let mut current: Option<(String, String)> = None;
    loop {
        let event = reader.read_event().map_err(bad_xml)?;
        match event {
            Event::Start(_) | Event::Empty(_) if root_done => {
                return Err(bad_xml("more than one root element"));
            }
            Event::Start(e) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(bad_xml("nested too deeply"));
                }
                if depth == 2 {
                    let name = std::str::from_utf8(e.name().as_ref())
                        .map_err(bad_xml)?
                        .to_string();
                    current = Some((name, String::new()));
                }
            }
            Event::Empty(e) => {
                if depth == 1 {
                    let name = std::str::from_utf8(e.name().as_ref())
                        .map_err(bad_xml)?
                        .to_string();
                    push_field(&mut fields, (name, String::new()))?;
                } else if depth == 0 {
                    root_done = true;
                }
            }
            Event::End(_) => {
                if depth == 2 {
                    if let Some(f) = current.take() {
                        push_field(&mut fields, f)?;
                    }
                }
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    root_done = true;
                }
            }
            Event::Text(t) => {
                let s = t.decode().map_err(bad_xml)?;
                if depth == 2 {
                    if let Some((_, v)) = current.as_mut() {
                        v.push_str(&s);
                    }
                } else if depth == 0 && !s.trim().is_empty() {
                    return Err(bad_xml("text outside the root element"));
                }
            }
            Event::CData(c) => {
                if depth == 2 {
                    let s = c.decode().map_err(bad_xml)?;
                    if let Some((_, v)) = current.as_mut() {
                        v.push_str(&s);
                    }
                } else if depth == 0 {
                    return Err(bad_xml("text outside the root element"));
                }
            }
            Event::GeneralRef(r) => {
                let resolved: String = match r.resolve_char_ref().map_err(bad_xml)? {
                    Some(c) => c.to_string(),
                    None => {
                        let name = r.decode().map_err(bad_xml)?;
                        quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| bad_xml("unknown entity"))?
                            .to_string()
                    }
                };
                if depth == 2 {
                    if let Some((_, v)) = current.as_mut() {
                        v.push_str(&resolved);
                    }
                } else if depth == 0 {
                    return Err(bad_xml("text outside the root element"));
                }
            }
            Event::DocType(_) => return Err(bad_xml("DOCTYPE is not allowed")),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !root_done || depth != 0 {
        return Err(bad_xml("no complete root element"));
    }
    Ok(Fields(fields))
}

fn push_field(fields: &mut Vec<(String, String)>, f: (String, String)) -> Result<(), Rejection> {
    if fields.len() >= MAX_FIELDS {
        return Err(bad_xml("too many elements"));
    }
    if fields.iter().any(|(k, _)| *k == f.0) {
        return Err(bad_xml("an element appears twice"));
    }
    fields.push(f);
    Ok(())
}

/// Text inside CDATA; a `]]>` in the value is split across two sections.
fn cdata(s: &str) -> String {
    format!("<![CDATA[{}]]>", s.replace("]]>", "]]]]><![CDATA[>"))
}

// ---------------------------------------------------------------------------------------------
// Messages

/// What one push carries.
#[derive(Debug)]
pub enum Push {
    /// A message that becomes a record; `oa` and `openid` address the passive reply.
    Message {
        intake: Box<Intake>,
        oa: String,
        openid: String,
    },
    /// An event or a message type we do not record; `kind` is a fixed-vocabulary label.
    Ignored { kind: &'static str },
}

fn required<'a>(f: &'a Fields, name: &str) -> Result<&'a str, Rejection> {
    let v = f
        .get(name)
        .ok_or_else(|| Rejection::new(Reason::InvalidEvent, format!("{name} is missing")))?;
    if v.len() > MAX_ID_LEN {
        return Err(Rejection::new(
            Reason::InvalidEvent,
            format!("{name} is too long"),
        ));
    }
    Ok(v)
}

fn event_kind(event: &str) -> &'static str {
    match event.to_ascii_lowercase().as_str() {
        "subscribe" => "event_subscribe",
        "unsubscribe" => "event_unsubscribe",
        "scan" => "event_scan",
        "location" => "event_location",
        "click" => "event_click",
        "view" => "event_view",
        _ => "event_other",
    }
}

/// Maps a push's fields to a record (or to an acknowledged, unrecorded event).
pub fn classify(f: &Fields) -> Result<Push, Rejection> {
    let msg_type = required(f, "MsgType")?.to_ascii_lowercase();
    if msg_type == "event" {
        return Ok(Push::Ignored {
            kind: event_kind(f.get("Event").unwrap_or("")),
        });
    }
    if !matches!(
        msg_type.as_str(),
        "text" | "image" | "voice" | "video" | "shortvideo" | "location" | "link"
    ) {
        return Ok(Push::Ignored {
            kind: "unsupported_message",
        });
    }
    let oa = required(f, "ToUserName")?.to_string();
    let openid = required(f, "FromUserName")?.to_string();
    let create_time = required(f, "CreateTime")?;
    let occurred_at = create_time
        .parse::<i64>()
        .ok()
        .and_then(|s| chrono::DateTime::<chrono::Utc>::from_timestamp(s, 0))
        .ok_or_else(|| Rejection::new(Reason::InvalidEvent, "CreateTime is not unix seconds"))?;
    let msg_id = match f.get("MsgId") {
        Some(id) if id.len() <= MAX_ID_LEN => id.to_string(),
        Some(_) => return Err(Rejection::new(Reason::InvalidEvent, "MsgId is too long")),
        // Every documented message has a MsgId; without one, WeChat's event key.
        None => format!("{openid}:{create_time}"),
    };

    let mut text = String::new();
    let mut i = Intake::new(ChannelKind::Social, NAME, "");
    let meta = |k: &str, field: &str, i: &mut Intake| {
        if let Some(v) = f.get(field) {
            i.metadata.insert(k.to_string(), v.to_string());
        }
    };
    meta("media_id", "MediaId", &mut i);
    match msg_type.as_str() {
        "text" => {
            text = f.raw("Content").unwrap_or("").to_string();
            meta("msg_data_id", "MsgDataId", &mut i);
            meta("idx", "Idx", &mut i);
        }
        "image" => {
            let url = f.get("PicUrl").map(str::to_string);
            if url.is_some() || f.get("MediaId").is_some() {
                i.attachments.push(Attachment {
                    url,
                    content_type: Some("image/jpeg".into()),
                    name: f.get("MediaId").map(|m| format!("{m}.jpg")),
                    ..Default::default()
                });
            }
        }
        "voice" => {
            let recognition = f
                .raw("Recognition")
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map(str::to_string);
            let format = f.get("Format").unwrap_or("amr").to_ascii_lowercase();
            meta("voice_format", "Format", &mut i);
            if let Some(m) = f.get("MediaId") {
                let ext: String = format
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .take(8)
                    .collect();
                i.attachments.push(Attachment {
                    name: Some(format!("{m}.{ext}")),
                    content_type: Some(format!("audio/{ext}")),
                    ..Default::default()
                });
            }
            text = recognition.clone().unwrap_or_default();
            i.voice = Some(Voice {
                transcription: recognition,
                ..Default::default()
            });
        }
        "video" | "shortvideo" => {
            meta("thumb_media_id", "ThumbMediaId", &mut i);
            if let Some(m) = f.get("MediaId") {
                i.attachments.push(Attachment {
                    name: Some(format!("{m}.mp4")),
                    content_type: Some("video/mp4".into()),
                    ..Default::default()
                });
            }
        }
        "location" => {
            meta("location_lat", "Location_X", &mut i);
            meta("location_lon", "Location_Y", &mut i);
            meta("location_scale", "Scale", &mut i);
            meta("location_label", "Label", &mut i);
            let pos = match (f.get("Location_X"), f.get("Location_Y")) {
                (Some(x), Some(y)) => format!("({x}, {y})"),
                _ => String::new(),
            };
            text = [f.raw("Label").unwrap_or("").trim(), pos.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
        }
        "link" => {
            meta("link_url", "Url", &mut i);
            i.subject = f.get("Title").map(str::to_string);
            text = [f.raw("Title"), f.raw("Description"), f.raw("Url")]
                .iter()
                .filter_map(|s| s.map(str::trim).filter(|s| !s.is_empty()))
                .collect::<Vec<_>>()
                .join("\n");
        }
        _ => {}
    }
    // Nothing the pipeline would keep (empty or control characters only): answered `success`
    // and counted, since a 400 would only make WeChat retry and show the customer an error.
    if crate::record::normalize_text(&text).is_empty()
        && i.attachments.is_empty()
        && i.voice.is_none()
    {
        return Ok(Push::Ignored {
            kind: "empty_message",
        });
    }
    i.text = text;
    i.metadata.insert("msg_type".into(), msg_type.clone());
    i.provider_message_id = Some(msg_id);
    i.account = Some(oa.clone());
    i.occurred_at = Some(occurred_at);
    i.identity = RawIdentity {
        social: Some(SocialId {
            platform: NAME.into(),
            account: Some(oa.clone()),
            id: openid.clone(),
            handle: None,
        }),
        ..Default::default()
    };
    Ok(Push::Message {
        intake: Box::new(i),
        oa,
        openid,
    })
}

// ---------------------------------------------------------------------------------------------
// The channel

#[derive(Debug, Default)]
struct Query {
    signature: Option<String>,
    msg_signature: Option<String>,
    timestamp: Option<String>,
    nonce: Option<String>,
    echostr: Option<String>,
}

impl Query {
    fn parse(parts: &Parts) -> Self {
        let mut q = Query::default();
        for (k, v) in super::form_pairs(parts.uri.query().unwrap_or("").as_bytes()) {
            let slot = match k.as_str() {
                "signature" => &mut q.signature,
                "msg_signature" => &mut q.msg_signature,
                "timestamp" => &mut q.timestamp,
                "nonce" => &mut q.nonce,
                "echostr" => &mut q.echostr,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(v);
            }
        }
        q
    }
}

/// How to encrypt the reply: the key that decrypted the request, the token that signed it.
struct ReplyCrypto {
    key: usize,
    token: usize,
}

pub struct Wechat {
    cfg: WechatConfig,
    keys: Vec<[u8; 32]>,
    enabled: bool,
    _normalizer: crate::identity::Normalizer,
}

impl Wechat {
    pub fn new(cfg: WechatConfig, normalizer: crate::identity::Normalizer) -> Result<Self, String> {
        if cfg.tokens.len() > 2 {
            return Err("wechat.tokens: one token, or two during rotation".into());
        }
        if cfg
            .tokens
            .iter()
            .any(|t| !(3..=32).contains(&t.len()) || !t.chars().all(|c| c.is_ascii_alphanumeric()))
        {
            return Err(
                "wechat.tokens: each token is 3-32 letters or digits (as in the OA console)".into(),
            );
        }
        if cfg.encoding_aes_keys.len() > 2 {
            return Err("wechat.encoding_aes_keys: one key, or two during rotation".into());
        }
        let keys = cfg
            .encoding_aes_keys
            .iter()
            .map(|k| decode_aes_key(k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("wechat.encoding_aes_keys: {e}"))?;
        if cfg.app_id.len() > 64
            || !cfg
                .app_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err("wechat.app_id: the AppID is letters and digits (wx…)".into());
        }
        if cfg.encryption != Encryption::Plain {
            if keys.is_empty() {
                return Err("wechat.encoding_aes_keys: compatible and safe encryption need the EncodingAESKey".into());
            }
            if cfg.app_id.is_empty() {
                return Err("wechat.app_id: compatible and safe encryption need the AppID".into());
            }
            if cfg.tokens.is_empty() {
                return Err(
                    "wechat.tokens: compatible and safe encryption need the token (replies are signed)"
                        .into(),
                );
            }
        }
        if cfg.passive_reply.len() > MAX_REPLY_TEMPLATE {
            return Err(format!(
                "wechat.passive_reply: at most {MAX_REPLY_TEMPLATE} bytes (WeChat caps replies at 2048)"
            ));
        }
        let enabled = !cfg.tokens.is_empty() || cfg.signature_mode == SignatureMode::Off;
        Ok(Self {
            cfg,
            keys,
            enabled,
            _normalizer: normalizer,
        })
    }

    fn fresh(&self, ts: &str) -> bool {
        let tol = self.cfg.timestamp_tolerance_secs;
        tol == 0
            || ts
                .trim()
                .parse::<i64>()
                .is_ok_and(|t| crate::auth::timestamp_fresh(t, chrono::Utc::now().timestamp(), tol))
    }

    /// Checks `signature` (or `msg_signature` over `encrypt`) and the timestamp under the
    /// configured mode; returns the index of the matching token (0 when not checked).
    fn verify(&self, q: &Query, encrypt: Option<&str>) -> Result<usize, Rejection> {
        let provided = if encrypt.is_some() {
            q.msg_signature.as_deref()
        } else {
            q.signature.as_deref()
        };
        let outcome = match (provided, q.timestamp.as_deref(), q.nonce.as_deref()) {
            (Some(sig), Some(ts), Some(nonce)) => {
                match signature_matches(&self.cfg.tokens, ts, nonce, encrypt, sig) {
                    None => Err(Reason::BadSignature),
                    Some(_) if !self.fresh(ts) => Err(Reason::StaleTimestamp),
                    Some(i) => Ok(i),
                }
            }
            _ => Err(Reason::MissingSignature),
        };
        let token = outcome.as_ref().copied().unwrap_or(0);
        crate::auth::apply_mode(self.cfg.signature_mode, NAME, outcome.map(|_| ()))?;
        Ok(token)
    }

    /// Decrypts with each configured key; the index of the key that worked.
    fn decrypt_any(&self, encrypted: &str) -> Result<(String, usize), Rejection> {
        let mut last = CryptoError::Length;
        for (n, key) in self.keys.iter().enumerate() {
            match decrypt(key, &self.cfg.app_id, encrypted) {
                Ok(xml) => return Ok((xml, n)),
                Err(e) => last = e,
            }
        }
        tracing::info!(channel = NAME, error = ?last, "could not decrypt a WeChat message");
        Err(Rejection::unauthorized(Reason::BadSignature))
    }

    fn url_verification(&self, q: &Query) -> Result<Resp, Rejection> {
        let echostr = q
            .echostr
            .as_deref()
            .filter(|e| !e.is_empty() && e.len() <= MAX_ECHOSTR)
            .ok_or_else(|| Rejection::new(Reason::InvalidEvent, "echostr is missing"))?;
        let echo = if q.msg_signature.is_some() && !self.keys.is_empty() {
            // WeCom-style verification: msg_signature over the encrypted echostr.
            self.verify(q, Some(echostr))?;
            self.decrypt_any(echostr)?.0
        } else {
            self.verify(q, None)?;
            echostr.to_string()
        };
        Ok(text_response(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            echo,
        ))
    }

    async fn message(
        &self,
        q: &Query,
        body: &[u8],
        pipeline: &Pipeline,
        ctx: &RequestCtx,
    ) -> Result<Resp, Rejection> {
        let text = std::str::from_utf8(body).map_err(|_| bad_xml("body is not UTF-8"))?;
        let encrypted = self.cfg.encryption != Encryption::Plain && q.msg_signature.is_some();
        let (fields, crypto) = if encrypted {
            // msg_signature covers the ciphertext, so the outer envelope is parsed first.
            let outer = parse_xml(text)?;
            let enc = outer
                .get("Encrypt")
                .ok_or_else(|| Rejection::new(Reason::InvalidEvent, "Encrypt is missing"))?;
            let token = self.verify(q, Some(enc))?;
            let (inner, key) = self.decrypt_any(enc)?;
            let fields = parse_xml(&inner)?;
            if let (Some(a), Some(b)) = (outer.get("ToUserName"), fields.get("ToUserName")) {
                if a != b {
                    return Err(Rejection::new(
                        Reason::InvalidEvent,
                        "ToUserName differs inside Encrypt",
                    ));
                }
            }
            (fields, Some(ReplyCrypto { key, token }))
        } else {
            if self.cfg.encryption != Encryption::Plain {
                // Safe and compatible mode accept only msg_signature-signed ciphertext: WeChat
                // sends it in both, and `signature` alone does not cover a plaintext body, so
                // dropping msg_signature must not downgrade a request. log_only / off let a
                // plaintext push through.
                crate::auth::apply_mode(
                    self.cfg.signature_mode,
                    NAME,
                    Err(Reason::MissingSignature),
                )?;
            }
            self.verify(q, None)?;
            let fields = parse_xml(text)?;
            if fields.get("MsgType").is_none() && fields.get("Encrypt").is_some() {
                return Err(Rejection::new(
                    Reason::InvalidEvent,
                    "encrypted message: set wechat.encryption and wechat.encoding_aes_keys",
                ));
            }
            (fields, None)
        };

        let (intake, oa, openid) = match classify(&fields)? {
            Push::Ignored { kind } => {
                tracing::debug!(channel = NAME, kind, "acknowledged without a record");
                metrics::counter!(IGNORED, "channel" => NAME, "kind" => kind).increment(1);
                return Ok(success());
            }
            Push::Message { intake, oa, openid } => (intake, oa, openid),
        };
        let mut intake = *intake;
        if crypto.is_some() {
            intake
                .metadata
                .insert("wechat_encrypted".into(), "true".into());
        }
        let accepted = pipeline.submit(ctx, vec![intake]).await?;
        let id = accepted
            .first()
            .map(|a| a.id)
            .ok_or_else(|| Rejection::new(Reason::Internal, "no record id"))?;
        if self.cfg.passive_reply.is_empty() {
            return Ok(success());
        }
        let content = self.cfg.passive_reply.replace("{ref}", &reference(&id));
        let xml = format!(
            "<xml><ToUserName>{}</ToUserName><FromUserName>{}</FromUserName><CreateTime>{}</CreateTime><MsgType><![CDATA[text]]></MsgType><Content>{}</Content></xml>",
            cdata(&openid),
            cdata(&oa),
            chrono::Utc::now().timestamp(),
            cdata(&content)
        );
        let body = match crypto {
            None => xml,
            Some(c) => self.encrypted_reply(&c, &xml)?,
        };
        Ok(text_response(
            StatusCode::OK,
            "text/xml; charset=utf-8",
            body,
        ))
    }

    /// The safe-mode reply envelope: Encrypt, MsgSignature, TimeStamp, Nonce.
    fn encrypted_reply(&self, c: &ReplyCrypto, xml: &str) -> Result<String, Rejection> {
        let internal = || Rejection::new(Reason::Internal, "could not encrypt the reply");
        let key = self.keys.get(c.key).ok_or_else(internal)?;
        let token = self
            .cfg
            .tokens
            .get(c.token)
            .or_else(|| self.cfg.tokens.first())
            .ok_or_else(internal)?;
        let enc = encrypt(key, &self.cfg.app_id, xml).map_err(|_| internal())?;
        let ts = chrono::Utc::now().timestamp().to_string();
        let nonce = nonce();
        let sig = sha1_signature(&[token, &ts, &nonce, &enc]);
        Ok(format!(
            "<xml><Encrypt>{}</Encrypt><MsgSignature>{}</MsgSignature><TimeStamp>{ts}</TimeStamp><Nonce>{}</Nonce></xml>",
            cdata(&enc),
            cdata(&sig),
            cdata(&nonce)
        ))
    }
}

fn success() -> Resp {
    text_response(StatusCode::OK, "text/plain; charset=utf-8", SUCCESS)
}

impl Channel for Wechat {
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
        if !self.enabled {
            return Err(Rejection::new(
                Reason::NotFound,
                "the WeChat channel is not configured (wechat.tokens)",
            ));
        }
        super::get_or_post(parts, &["text/xml", "application/xml"])
    }

    fn handle<'a>(
        &'a self,
        inbound: Inbound,
        pipeline: &'a Pipeline,
    ) -> BoxFuture<'a, Result<Resp, Rejection>> {
        Box::pin(async move {
            let q = Query::parse(&inbound.parts);
            if inbound.parts.method == Method::GET {
                return self.url_verification(&q);
            }
            self.message(&q, &inbound.body, pipeline, &inbound.ctx)
                .await
        })
    }

    /// Anything but `success` or a valid reply makes WeChat retry (3 times in all) and then
    /// show the user an error; the body names the reason only.
    fn reject(&self, r: &Rejection) -> Resp {
        super::with_retry_after(
            text_response(
                provider_status(r),
                "text/plain; charset=utf-8",
                r.reason.code(),
            ),
            r,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/tests/fixtures/wechat/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    const W3_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
    const W3_APP: &str = "wxb11529c136998cb6";

    fn w3_encrypt() -> String {
        let outer = parse_xml(&fixture("safe_w3.xml")).unwrap();
        outer.get("Encrypt").unwrap().to_string()
    }

    /// CHANNELS.md W0 (wechatpy tests/test_utils.py).
    #[test]
    fn url_signature_known_answer() {
        assert_eq!(
            sha1_signature(&["test", "1410685589", "test"]),
            "f21891de399b4e33a1a93c9a7b8a8fffb5a443ff"
        );
        let tokens = vec!["other1".to_string(), "test".to_string()];
        let sig = "f21891de399b4e33a1a93c9a7b8a8fffb5a443ff";
        assert_eq!(
            signature_matches(&tokens, "1410685589", "test", None, sig),
            Some(1)
        );
        assert_eq!(
            signature_matches(&tokens, "1410685589", "test", None, &sig.to_uppercase()),
            Some(1)
        );
        assert_eq!(
            signature_matches(&tokens, "1410685590", "test", None, sig),
            None
        );
        assert_eq!(
            signature_matches(&tokens, "1410685589", "test", None, ""),
            None
        );
    }

    /// wechatpy tests/test_crypto.py (WeCom style: receive id = corp id), per CHANNELS.md §4.4.
    #[test]
    fn wechatpy_vector_verifies_and_decrypts() {
        let enc = "RgqEoJj5A4EMYlLvWO1F86ioRjZfaex/gePD0gOXTxpsq5Yj4GNglrBb8I2BAJVODGajiFnXBu7mCPatfjsu6IHCrsTyeDXzF6Bv283dGymzxh6ydJRvZsryDyZbLTE7rhnus50qGPMfp2wASFlzEgMW9z1ef/RD8XzaFYgm7iTdaXpXaG4+BiYyolBug/gYNx410cvkKR2/nPwBiT+P4hIiOAQqGp/TywZBtDh1yCF2KOd0gpiMZ5jSw3e29mTvmUHzkVQiMS6td7vXUaWOMZnYZlF3So2SjHnwh4jYFxdgpkHHqIrH/54SNdshoQgWYEvccTKe7FS709/5t6NMxuGhcUGAPOQipvWTT4dShyqio7mlsl5noTrb++x6En749zCpQVhDpbV6GDnTbcX2e8K9QaNWHp91eBdCRxthuL0=";
        assert_eq!(
            sha1_signature(&["123456", "1411525903", "461056294", enc]),
            "74d92dfeb87ba7c714f89d98870ae5eb62dff26d"
        );
        assert_eq!(
            sha1_signature(&["123456", "1411525903", "461056294"]),
            "6c729cc5480fab0c2e594b7e25a93d2dbef6ab97"
        );
        let key = decode_aes_key("kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aQ").unwrap();
        let xml = decrypt(&key, "wx49f0ab532d5d035a", enc).unwrap();
        assert_eq!(
            xml,
            "<xml><ToUserName><![CDATA[wx49f0ab532d5d035a]]></ToUserName>\n<FromUserName><![CDATA[messense]]></FromUserName>\n<CreateTime>1411525903</CreateTime>\n<MsgType><![CDATA[text]]></MsgType>\n<Content><![CDATA[test]]></Content>\n<MsgId>4363689963896700987</MsgId>\n<AgentID>1</AgentID>\n</xml>"
        );
        let f = parse_xml(&xml).unwrap();
        assert_eq!(f.get("MsgId"), Some("4363689963896700987"));
        assert_eq!(f.get("AgentID"), Some("1"));
    }

    /// CHANNELS.md W3: signatures, decryption, and our encryption reproduces the envelope.
    #[test]
    fn w3_safe_mode_fixture_round_trips_byte_exact() {
        let enc = w3_encrypt();
        assert_eq!(
            sha1_signature(&["pamtest", "1409304348", "xxxxxx", &enc]),
            "a00ba440393ec2c109fcf41b1d761490322bf951"
        );
        assert_eq!(
            sha1_signature(&["pamtest", "1409304348", "xxxxxx"]),
            "76480565cbe296026c53aaacd1ad523a1ddba24f"
        );
        let key = decode_aes_key(W3_KEY).unwrap();
        let plain = fixture("safe_w3_plain.xml");
        assert_eq!(decrypt(&key, W3_APP, &enc).unwrap(), plain);
        assert_eq!(
            encrypt_with(&key, W3_APP, &plain, b"1234567890123456").unwrap(),
            enc
        );
        // msg_signature computed without Encrypt is a different value: rejected.
        let tokens = vec!["pamtest".to_string()];
        assert_eq!(
            signature_matches(
                &tokens,
                "1409304348",
                "xxxxxx",
                Some(&enc),
                "76480565cbe296026c53aaacd1ad523a1ddba24f"
            ),
            None
        );
        assert_eq!(
            signature_matches(
                &tokens,
                "1409304348",
                "xxxxxx",
                Some(&enc),
                "a00ba440393ec2c109fcf41b1d761490322bf951"
            ),
            Some(0)
        );
    }

    #[test]
    fn round_trip_with_random_prefix_and_wrong_app_id() {
        let key = decode_aes_key(W3_KEY).unwrap();
        let xml = "<xml><Content><![CDATA[宽带😡 ok]]></Content></xml>";
        let a = encrypt(&key, W3_APP, xml).unwrap();
        let b = encrypt(&key, W3_APP, xml).unwrap();
        assert_ne!(a, b, "the random prefix differs per message");
        assert_eq!(decrypt(&key, W3_APP, &a).unwrap(), xml);
        assert_eq!(decrypt(&key, W3_APP, &b).unwrap(), xml);
        assert_eq!(
            decrypt(&key, "wxb11529c136998cb7", &a),
            Err(CryptoError::AppId)
        );
        assert_eq!(decrypt(&key, "", &a), Err(CryptoError::AppId));
        let other = decode_aes_key("kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aQ").unwrap();
        assert!(decrypt(&other, W3_APP, &a).is_err());
    }

    /// Raw AES-CBC over chosen blocks, to produce plaintexts with broken padding or layout.
    fn raw_encrypt(key: &[u8; 32], plain: &[u8]) -> String {
        let mut buf = plain.to_vec();
        let n = buf.len();
        let ct = Aes256CbcEnc::new_from_slices(key, &key[..16])
            .unwrap()
            .encrypt_padded_mut::<NoPadding>(&mut buf, n)
            .unwrap()
            .to_vec();
        B64.encode(ct)
    }

    #[test]
    fn bad_padding_and_layout_are_errors_not_panics() {
        let key = decode_aes_key(W3_KEY).unwrap();
        let mut block = vec![0u8; 64];
        // Last byte 0: no padding.
        assert_eq!(
            decrypt(&key, W3_APP, &raw_encrypt(&key, &block)),
            Err(CryptoError::Padding)
        );
        // 33 > 32.
        block[63] = 33;
        assert_eq!(
            decrypt(&key, W3_APP, &raw_encrypt(&key, &block)),
            Err(CryptoError::Padding)
        );
        // Claims 3 bytes of padding but the others differ.
        block[63] = 3;
        block[62] = 3;
        block[61] = 9;
        assert_eq!(
            decrypt(&key, W3_APP, &raw_encrypt(&key, &block)),
            Err(CryptoError::Padding)
        );
        // Valid padding, length prefix far beyond the plaintext.
        let mut layout = vec![0u8; 32];
        layout[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        layout[28..32].copy_from_slice(&[4, 4, 4, 4]);
        assert_eq!(
            decrypt(&key, W3_APP, &raw_encrypt(&key, &layout)),
            Err(CryptoError::Layout)
        );
        // All padding: shorter than the 20-byte header.
        assert_eq!(
            decrypt(&key, W3_APP, &raw_encrypt(&key, &[32u8; 32])),
            Err(CryptoError::Layout)
        );
        assert_eq!(decrypt(&key, W3_APP, ""), Err(CryptoError::Length));
        assert_eq!(decrypt(&key, W3_APP, "QUJD"), Err(CryptoError::Length));
        assert_eq!(
            decrypt(&key, W3_APP, "not base64!"),
            Err(CryptoError::Base64)
        );
        let enc = w3_encrypt();
        let truncated = B64.encode(&B64.decode(&enc).unwrap()[..48]);
        assert!(decrypt(&key, W3_APP, &truncated).is_err());
    }

    #[test]
    fn pkcs7_32_pads_whole_blocks() {
        for len in [0usize, 1, 31, 32, 33, 63] {
            let mut v = vec![7u8; len];
            pad32(&mut v);
            assert_eq!(v.len() % 32, 0);
            assert!(v.len() > len && v.len() - len <= 32);
            assert_eq!(unpad32(&v).unwrap().len(), len);
        }
        assert_eq!(unpad32(&[]), Err(CryptoError::Padding));
    }

    #[test]
    fn aes_keys_are_validated() {
        assert!(decode_aes_key(W3_KEY).is_ok());
        let e = decode_aes_key(&W3_KEY[..42]).unwrap_err();
        assert!(e.contains("43"), "{e}");
        assert!(decode_aes_key("abcdefghijklmnopqrstuvwxyz0123456789ABCDEF!").is_err());
    }

    fn new(cfg: WechatConfig) -> Result<Wechat, String> {
        Wechat::new(cfg, crate::identity::Normalizer::new("CN"))
    }

    fn safe_cfg() -> WechatConfig {
        WechatConfig {
            tokens: vec!["pamtest".into()],
            app_id: W3_APP.into(),
            encoding_aes_keys: vec![W3_KEY.into()],
            encryption: Encryption::Safe,
            ..Default::default()
        }
    }

    #[test]
    fn config_is_validated_naming_the_key() {
        let w = new(WechatConfig::default()).unwrap();
        assert!(!w.enabled, "no token: the channel is off");
        assert!(new(safe_cfg()).unwrap().enabled);
        let err = |c: WechatConfig| new(c).err().unwrap();
        let e = err(WechatConfig {
            encoding_aes_keys: vec![W3_KEY[..42].into()],
            ..safe_cfg()
        });
        assert!(e.starts_with("wechat.encoding_aes_keys:"), "{e}");
        let e = err(WechatConfig {
            app_id: String::new(),
            ..safe_cfg()
        });
        assert!(e.starts_with("wechat.app_id:"), "{e}");
        let e = err(WechatConfig {
            encoding_aes_keys: vec![],
            encryption: Encryption::Compatible,
            ..safe_cfg()
        });
        assert!(e.starts_with("wechat.encoding_aes_keys:"), "{e}");
        let e = err(WechatConfig {
            tokens: vec!["a b".into()],
            ..Default::default()
        });
        assert!(e.starts_with("wechat.tokens:"), "{e}");
        let e = err(WechatConfig {
            tokens: vec!["aaa".into(), "bbb".into(), "ccc".into()],
            ..Default::default()
        });
        assert!(e.starts_with("wechat.tokens:"), "{e}");
        let e = err(WechatConfig {
            passive_reply: "x".repeat(3000),
            ..safe_cfg()
        });
        assert!(e.starts_with("wechat.passive_reply:"), "{e}");
        // Serialisable into the defaults table the config loader starts from.
        let t = toml::Value::try_from(safe_cfg()).unwrap();
        assert_eq!(t["encryption"].as_str(), Some("safe"));
    }

    /// The `[wechat]` section proposed for config/switchboard.toml parses to the defaults.
    #[test]
    fn documented_toml_section_parses() {
        let section = r#"
signature_mode = "enforce"
tokens = []
app_id = ""
encoding_aes_keys = []
encryption = "plain"
passive_reply = ""
timestamp_tolerance_secs = 300
"#;
        let c: WechatConfig = toml::from_str(section).unwrap();
        assert_eq!(c.signature_mode, SignatureMode::Enforce);
        assert_eq!(c.encryption, Encryption::Plain);
        assert_eq!(c.timestamp_tolerance_secs, 300);
        assert!(new(c).is_ok());
        assert!(toml::from_str::<WechatConfig>("encryption = \"aes\"").is_err());
        assert!(toml::from_str::<WechatConfig>("token = \"x\"").is_err());
    }

    fn query(sig: Option<&str>, msg_sig: Option<&str>, ts: &str, nonce: &str) -> Query {
        Query {
            signature: sig.map(str::to_string),
            msg_signature: msg_sig.map(str::to_string),
            timestamp: Some(ts.into()),
            nonce: Some(nonce.into()),
            echostr: None,
        }
    }

    #[test]
    fn verify_enforces_signature_and_timestamp_window() {
        let w = new(WechatConfig {
            tokens: vec!["newtoken".into(), "test".into()],
            ..Default::default()
        })
        .unwrap();
        let now = chrono::Utc::now().timestamp().to_string();
        let sig = sha1_signature(&["test", &now, "n1"]);
        assert_eq!(
            w.verify(&query(Some(&sig), None, &now, "n1"), None)
                .unwrap(),
            1
        );
        let r = w
            .verify(&query(Some(&sig), None, &now, "n2"), None)
            .unwrap_err();
        assert_eq!(r.reason, Reason::BadSignature);
        assert_eq!(provider_status(&r), StatusCode::FORBIDDEN);
        let r = w.verify(&query(None, None, &now, "n1"), None).unwrap_err();
        assert_eq!(r.reason, Reason::MissingSignature);
        // W0 is correctly signed but from 2014.
        let r = w
            .verify(
                &query(
                    Some("f21891de399b4e33a1a93c9a7b8a8fffb5a443ff"),
                    None,
                    "1410685589",
                    "test",
                ),
                None,
            )
            .unwrap_err();
        assert_eq!(r.reason, Reason::StaleTimestamp);
        let lenient = new(WechatConfig {
            tokens: vec!["test".into()],
            timestamp_tolerance_secs: 0,
            ..Default::default()
        })
        .unwrap();
        lenient
            .verify(
                &query(
                    Some("f21891de399b4e33a1a93c9a7b8a8fffb5a443ff"),
                    None,
                    "1410685589",
                    "test",
                ),
                None,
            )
            .unwrap();
        let log_only = new(WechatConfig {
            tokens: vec!["test".into()],
            signature_mode: SignatureMode::LogOnly,
            ..Default::default()
        })
        .unwrap();
        log_only
            .verify(&query(Some("00"), None, &now, "n"), None)
            .unwrap();
    }

    async fn body(resp: Resp) -> String {
        use http_body_util::BodyExt;
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn wecom_style_echostr_is_decrypted() {
        let cfg = WechatConfig {
            timestamp_tolerance_secs: 0,
            ..safe_cfg()
        };
        let w = new(cfg).unwrap();
        let key = decode_aes_key(W3_KEY).unwrap();
        let echo = encrypt(&key, W3_APP, "1616140317555161061").unwrap();
        let mut q = query(
            None,
            Some(&sha1_signature(&["pamtest", "1409304348", "xxxxxx", &echo])),
            "1409304348",
            "xxxxxx",
        );
        q.echostr = Some(echo);
        let resp = w.url_verification(&q).unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body(resp).await, "1616140317555161061");
        // Plain OA verification.
        let mut q = query(
            Some(&sha1_signature(&["pamtest", "1409304348", "xxxxxx"])),
            None,
            "1409304348",
            "xxxxxx",
        );
        q.echostr = Some("6571340843491738129".into());
        assert_eq!(
            body(w.url_verification(&q).unwrap()).await,
            "6571340843491738129"
        );
        q.signature = Some("f21891de399b4e33a1a93c9a7b8a8fffb5a443ff".into());
        assert_eq!(
            w.url_verification(&q).unwrap_err().reason,
            Reason::BadSignature
        );
    }

    fn message(name: &str) -> Intake {
        match classify(&parse_xml(&fixture(name)).unwrap()).unwrap() {
            Push::Message { intake, .. } => *intake,
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn text_in_chinese_with_emoji_is_byte_exact() {
        let i = message("text_zh.xml");
        assert_eq!(i.text, "家里宽带断网三天了😡，客服电话一直打不通！");
        assert_eq!(
            i.text.as_bytes(),
            "家里宽带断网三天了\u{1F621}，客服电话一直打不通！".as_bytes()
        );
        assert_eq!(i.channel, ChannelKind::Social);
        assert_eq!(i.provider, "wechat");
        assert_eq!(i.provider_message_id.as_deref(), Some("24571203348830123"));
        assert_eq!(i.account.as_deref(), Some("gh_7f083739789a"));
        let s = i.identity.social.unwrap();
        assert_eq!(s.platform, "wechat");
        assert_eq!(s.account.as_deref(), Some("gh_7f083739789a"));
        assert_eq!(s.id, "oia2TjuEGTNoeX76QEjQNrcURxG8");
        assert_eq!(
            crate::record::rfc3339_ms(i.occurred_at.unwrap()),
            "2024-05-20T02:15:03.000Z"
        );
        assert_eq!(i.metadata["msg_type"], "text");
    }

    #[test]
    fn every_message_type_maps() {
        let v = message("voice.xml");
        assert_eq!(v.text, "手机没有信号，打不了电话");
        assert_eq!(
            v.voice.as_ref().unwrap().transcription.as_deref(),
            Some("手机没有信号，打不了电话")
        );
        assert_eq!(v.metadata["voice_format"], "amr");
        assert_eq!(
            v.metadata["media_id"],
            "Wv7K3mVhU0LtQe2w0yXbJ8aSgK1pZrTnGfD4cE5hB6iM9oN"
        );
        assert_eq!(v.attachments[0].content_type.as_deref(), Some("audio/amr"));

        let img = message("image.xml");
        assert_eq!(img.text, "");
        assert_eq!(
            img.attachments[0].url.as_deref(),
            Some("http://mmbiz.qpic.cn/mmbiz_jpg/abc123/0")
        );
        assert_eq!(
            img.metadata["media_id"],
            "Q9xYz8wVu7tS6rQ5pO4nM3lK2jI1hG0fE"
        );

        let loc = message("location.xml");
        assert_eq!(loc.text, "广州市天河区体育西路 (23.134521, 113.358803)");
        assert_eq!(loc.metadata["location_lat"], "23.134521");
        assert_eq!(loc.metadata["location_lon"], "113.358803");
        assert_eq!(loc.metadata["location_scale"], "20");
        assert_eq!(loc.metadata["location_label"], "广州市天河区体育西路");

        let link = message("link.xml");
        assert_eq!(link.subject.as_deref(), Some("话费账单多扣了 50 元"));
        assert_eq!(
            link.text,
            "话费账单多扣了 50 元\n5 月账单 & 增值业务扣费明细 💸\nhttps://example.com/bill?id=1&month=5"
        );
        assert_eq!(
            link.metadata["link_url"],
            "https://example.com/bill?id=1&month=5"
        );

        let sv = message("shortvideo.xml");
        assert_eq!(sv.attachments[0].content_type.as_deref(), Some("video/mp4"));
        assert_eq!(sv.metadata["thumb_media_id"], "tHuMbMeD1aId");

        // W2: events are acknowledged, not recorded.
        let f = parse_xml(&fixture("subscribe.xml")).unwrap();
        assert!(matches!(
            classify(&f).unwrap(),
            Push::Ignored {
                kind: "event_subscribe"
            }
        ));
        let f = parse_xml("<xml><ToUserName>a</ToUserName><FromUserName>b</FromUserName><CreateTime>1</CreateTime><MsgType>miniprogrampage</MsgType></xml>").unwrap();
        assert!(matches!(
            classify(&f).unwrap(),
            Push::Ignored {
                kind: "unsupported_message"
            }
        ));
        // CHANNELS.md W1, the official example.
        let f = parse_xml("<xml>\n  <ToUserName><![CDATA[toUser]]></ToUserName>\n  <FromUserName><![CDATA[fromUser]]></FromUserName>\n  <CreateTime>1348831860</CreateTime>\n  <MsgType><![CDATA[text]]></MsgType>\n  <Content><![CDATA[this is a test]]></Content>\n  <MsgId>1234567890123456</MsgId>\n</xml>").unwrap();
        let Push::Message { intake, .. } = classify(&f).unwrap() else {
            panic!()
        };
        assert_eq!(intake.text, "this is a test");
        assert_eq!(
            intake.provider_message_id.as_deref(),
            Some("1234567890123456")
        );
    }

    #[test]
    fn missing_fields_are_invalid() {
        for xml in [
            "<xml><MsgType>text</MsgType><FromUserName>b</FromUserName><CreateTime>1</CreateTime></xml>",
            "<xml><MsgType>text</MsgType><ToUserName>a</ToUserName><CreateTime>1</CreateTime></xml>",
            "<xml><MsgType>text</MsgType><ToUserName>a</ToUserName><FromUserName>b</FromUserName><CreateTime>soon</CreateTime></xml>",
            "<xml><ToUserName>a</ToUserName></xml>",
        ] {
            let f = parse_xml(xml).unwrap();
            assert_eq!(classify(&f).unwrap_err().reason, Reason::InvalidEvent, "{xml}");
        }
    }

    #[test]
    fn hostile_xml_is_refused_without_panics() {
        for xml in [
            "<!DOCTYPE xml [<!ENTITY x \"boom\">]><xml><Content>&x;</Content></xml>",
            "<xml><Content>&x;</Content></xml>",
            "<xml><Content>a</Content><Content>b</Content></xml>",
            "<xml><Content>a</xml>",
            "<xml><Content>a</Content>",
            "<xml></xml><xml></xml>",
            "stray<xml></xml>",
            "",
            "<xml><a><b><c><d><e><f><g><h><i>deep</i></h></g></f></e></d></c></b></a></xml>",
            "<xml><Content>&#xFFFFFFFF;</Content></xml>",
        ] {
            assert!(parse_xml(xml).is_err(), "{xml}");
        }
        let many: String = (0..100).map(|n| format!("<F{n}>x</F{n}>")).collect();
        assert!(parse_xml(&format!("<xml>{many}</xml>")).is_err());
        // Nested elements are skipped, entities and character references decoded.
        let f = parse_xml("<?xml version=\"1.0\"?><!-- c --><xml><SendPicsInfo><Count>1</Count></SendPicsInfo><Content>a &lt;b&gt; &#x1F600;&#27700;</Content><Empty/></xml>").unwrap();
        assert_eq!(f.raw("Content"), Some("a <b> 😀水"));
        assert_eq!(f.raw("SendPicsInfo"), Some(""));
        assert_eq!(f.raw("Empty"), Some(""));
        assert_eq!(f.len(), 3);
    }

    #[test]
    fn passive_reply_cdata_is_safe() {
        assert_eq!(cdata("a]]>b"), "<![CDATA[a]]]]><![CDATA[>b]]>");
        let f = parse_xml(&format!("<xml><C>{}</C></xml>", cdata("a]]>b"))).unwrap();
        assert_eq!(f.raw("C"), Some("a]]>b"));
    }
}
