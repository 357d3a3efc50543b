//! Entry points for the `cargo fuzz` targets in `fuzz/` (not an API: nothing else calls them).
//!
//! Each takes the bytes an outside party controls and runs them through the same parsing the
//! gateway does, and, where a parser yields intakes, on through the pipeline (identity
//! normalisation, text limits, triage, record encoding) into a sink that keeps nothing. Every
//! function returns normally for any input: a panic is a finding.

use crate::channels;
use crate::config::Config;
use crate::pipeline::{Pipeline, RequestCtx};
use crate::record::Intake;
use crate::sink::{Encoded, Health, Landed, Sink, SinkError};
use futures_util::future::BoxFuture;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// A sink that lands everything and keeps nothing (memory stays flat over millions of runs).
struct NullSink;

impl Sink for NullSink {
    fn write<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Result<Vec<Landed>, SinkError>> {
        Box::pin(async move { Ok(vec![Landed::Memory; batch.len()]) })
    }
    fn health(&self) -> Health {
        Health {
            usable: true,
            healthy: true,
            parts: Vec::new(),
        }
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

struct Harness {
    rt: tokio::runtime::Runtime,
    pipeline: Arc<Pipeline>,
    api: channels::api::ApiChannel,
    twilio: channels::twilio::Twilio,
    meta: channels::meta::Meta,
    telegram: channels::telegram::Telegram,
    x: channels::x::X,
    weibo: channels::weibo::Weibo,
    email: channels::email::EmailParser,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("fuzz runtime");
        let mut cfg = Config::default();
        // Rate limits would refuse most runs after the first second; they are not parsers.
        cfg.limits.enabled = false;
        let pipeline = rt
            .block_on(async { Pipeline::new(&cfg, Arc::new(NullSink)) })
            .expect("fuzz pipeline");
        let n = || crate::identity::Normalizer::new("CN");
        Harness {
            api: channels::api::ApiChannel::new(cfg.api.clone()),
            twilio: channels::twilio::Twilio::new(cfg.twilio.clone(), n()),
            meta: channels::meta::Meta::new(
                channels::meta::MetaConfig {
                    app_secrets: vec!["fuzz-app-secret".into()],
                    verify_token: "fuzz-verify-token".into(),
                    ..Default::default()
                },
                n(),
            )
            .expect("fuzz meta"),
            telegram: channels::telegram::Telegram::new(
                channels::telegram::TelegramConfig {
                    bot_id: "123456".into(),
                    secret_tokens: vec!["fuzz-secret-token".into()],
                    ..Default::default()
                },
                n(),
            )
            .expect("fuzz telegram"),
            x: channels::x::X::new(
                channels::x::XConfig {
                    consumer_secrets: vec!["fuzz-consumer-secret".into()],
                    ..Default::default()
                },
                n(),
            )
            .expect("fuzz x"),
            weibo: channels::weibo::Weibo::new(
                channels::weibo::WeiboConfig {
                    app_secrets: vec!["fuzz-app-secret".into()],
                    ..Default::default()
                },
                n(),
            )
            .expect("fuzz weibo"),
            email: channels::email::EmailParser {
                max_depth: cfg.email.max_mime_depth,
                max_parts: cfg.email.max_mime_parts,
                // Metadata only: no attachment bytes written per run.
                store: None,
            },
            rt,
            pipeline,
        }
    })
}

/// Runs intakes through the pipeline as a channel would (the outcome does not matter).
fn submit(channel: &'static str, intakes: Vec<Intake>) {
    if intakes.is_empty() {
        return;
    }
    let h = harness();
    let ctx = RequestCtx {
        peer: std::net::IpAddr::from([127, 0, 0, 1]),
        channel,
        trace_id: crate::pipeline::trace_id(None),
    };
    let _ = h.rt.block_on(h.pipeline.submit(&ctx, intakes));
}

/// `POST /v1/events`: one event or a batch, to records.
pub fn api_events(data: &[u8]) {
    let h = harness();
    if let Ok((events, _)) = h.api.parse(data) {
        let intakes: Vec<Intake> = events
            .into_iter()
            .filter_map(|e| channels::api::to_intake(e).ok())
            .collect();
        submit("api", intakes);
    }
}

/// Twilio SMS and voice webhooks: a form body (or, first byte `{`, the JSON variant).
pub fn twilio_form(data: &[u8]) {
    let h = harness();
    let params = if data.first() == Some(&b'{') {
        match channels::json_params(data) {
            Ok(p) => p,
            Err(_) => return,
        }
    } else {
        channels::form_pairs(data)
    };
    let body = channels::form_get(&params, "Body")
        .unwrap_or("")
        .to_string();
    let sms = h.twilio.base_intake(
        &params,
        crate::record::ChannelKind::Sms,
        "twilio",
        &body,
        false,
    );
    let mut intakes = vec![sms];
    if let Ok(v) = h.twilio.voice_intake(&params, "gather", &body, None) {
        intakes.push(v);
    }
    submit("twilio", intakes);
}

/// Vonage inbound SMS: a form body, or JSON when the first byte is `{`.
pub fn vonage(data: &[u8]) {
    let params = if data.first() == Some(&b'{') {
        match channels::json_params(data) {
            Ok(p) => p,
            Err(_) => return,
        }
    } else {
        channels::form_pairs(data)
    };
    let v = channels::vonage::Vonage::intake_of(harness().pipeline.normalizer(), &params);
    if let Ok(i) = v {
        submit("vonage", vec![i]);
    }
}

/// Meta (WhatsApp, Messenger, Instagram) webhook JSON.
pub fn meta_json(data: &[u8]) {
    let h = harness();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(batch) = h.meta.parse(&v) {
        submit("meta", batch.into_ordered());
    }
}

/// Telegram Bot API update JSON.
pub fn telegram(data: &[u8]) {
    if let Ok(Some(i)) = harness().telegram.parse(data) {
        submit("telegram", vec![i]);
    }
}

/// X (Twitter) Account Activity JSON.
pub fn x(data: &[u8]) {
    if let Ok(intakes) = harness().x.parse(data) {
        submit("x", intakes);
    }
}

/// Weibo 粉丝服务 push JSON.
pub fn weibo(data: &[u8]) {
    if let Ok(Some(i)) = harness().weibo.parse(data) {
        submit("weibo", vec![i]);
    }
}

/// WeChat Official Account push XML, classified into a record or an ignored kind.
pub fn wechat_xml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(fields) = channels::wechat::parse_xml(text) {
        if let Ok(channels::wechat::Push::Message { intake, .. }) =
            channels::wechat::classify(&fields)
        {
            submit("wechat", vec![*intake]);
        }
    }
}

/// The key the WeChat decryption target uses (any fixed key will do).
const WECHAT_KEY: [u8; 32] = *b"fuzz-wechat-aes-key-32-bytes-ok!";
const WECHAT_APP_ID: &str = "wxfuzz0123456789";

/// WeChat `Encrypt` decryption. First byte even: the rest is the `Encrypt` text as received.
/// Odd: the rest is the plaintext frame (random, length, XML, AppID, padding) the fuzzer shapes,
/// encrypted here so that the layout checks after AES are reached.
pub fn wechat_decrypt(data: &[u8]) {
    use aes::cipher::{block_padding::NoPadding, BlockEncryptMut, KeyIvInit};
    use base64::Engine;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let encrypted = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let mut buf = rest.to_vec();
        buf.resize(rest.len().div_ceil(16).max(1) * 16, 0);
        let n = buf.len();
        let Ok(enc) =
            cbc::Encryptor::<aes::Aes256>::new_from_slices(&WECHAT_KEY, &WECHAT_KEY[..16])
        else {
            return;
        };
        let Ok(ct) = enc.encrypt_padded_mut::<NoPadding>(&mut buf, n) else {
            return;
        };
        base64::engine::general_purpose::STANDARD.encode(ct)
    };
    if let Ok(xml) = channels::wechat::decrypt(&WECHAT_KEY, WECHAT_APP_ID, &encrypted) {
        wechat_xml(xml.as_bytes());
    }
}

/// An RFC 5322 message (as received over SMTP or the inbound webhook) to a record.
pub fn mime_to_record(data: &[u8]) {
    let h = harness();
    let envelope = channels::email::Envelope {
        mail_from: "sender@example.cn".into(),
        rcpt_to: "complaints@switchboard.localhost".into(),
    };
    if let Ok(parsed) = h.email.parse(data, &envelope) {
        submit("email", vec![parsed.intake]);
    }
}

/// An SMTP session fed these bytes as the client's side of the conversation.
pub fn smtp_session(data: &[u8]) {
    harness().rt.block_on(crate::smtp::fuzz_session(data));
}

/// A chat client frame (JSON text), its `client_msg_id`, and a session or customer token.
pub fn chat_protocol(data: &[u8]) {
    static TOKENS: OnceLock<channels::chat::token::Tokens> = OnceLock::new();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(channels::chat::protocol::ClientFrame::Message { client_msg_id, .. }) =
        channels::chat::protocol::parse(text)
    {
        let _ = channels::chat::protocol::valid_client_msg_id(&client_msg_id);
    }
    let tokens = TOKENS.get_or_init(|| {
        channels::chat::token::Tokens::new(
            &["fuzz-session-secret-0123456789abcdef".into()],
            &["fuzz-customer-secret-0123456789".into()],
            3600,
        )
    });
    let _ = tokens.verify_session(text);
    let _ = tokens.verify_customer(text);
}

/// Spool recovery over one arbitrary segment file (and, when the input starts with `{`, a
/// `CURSOR` file made of its first line): the read-only survey, then opening the spool (which
/// trims a torn tail) and reading it from the start. `dir` is an empty directory per run.
pub fn spool_recovery(dir: &Path, data: &[u8]) {
    let (cursor, segment) = match data.first() {
        Some(b'{') => match data.iter().position(|&b| b == b'\n') {
            Some(i) => (Some(&data[..i]), &data[i + 1..]),
            None => (Some(data), &[][..]),
        },
        _ => (None, data),
    };
    if let Some(c) = cursor {
        if std::fs::write(dir.join("CURSOR"), c).is_err() {
            return;
        }
    }
    if std::fs::write(dir.join(format!("{:020}.seg", 1)), segment).is_err() {
        return;
    }
    let _ = crate::sink::spool::stats_of(dir);
    let _ = crate::sink::spool::read_all(dir);
    let cfg = crate::config::SpoolConfig {
        dir: dir.to_path_buf(),
        ..Default::default()
    };
    let h = harness();
    let Ok(spool) = crate::sink::spool::Spool::open(&cfg) else {
        return;
    };
    let spool = Arc::new(spool);
    let mut tail = spool.tail(crate::sink::spool::Pos::default());
    for _ in 0..64 {
        match tail.read(256) {
            Ok(steps) if steps.len() > 1 => {}
            _ => break,
        }
    }
    drop(tail);
    h.rt.block_on(spool.close());
}
