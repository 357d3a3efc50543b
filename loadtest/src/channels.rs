//! The HTTP channels the harness drives: realistic payloads and each provider's signature,
//! computed exactly as the gateway checks it (src/channels/{api,twilio,meta,wechat}.rs and
//! src/auth.rs in the gateway):
//!
//! - `events` → `POST /v1/events`: `X-Switchboard-Timestamp: <unix s>` and
//!   `X-Switchboard-Signature: v1=<hex HMAC-SHA256(api secret, ts + "." + body)>`.
//! - `twilio` → `POST /hooks/twilio/sms` (form): `X-Twilio-Signature` = Base64(HMAC-SHA1(auth
//!   token, twilio.public_url + path + sorted name+value pairs)). The gateway signs over its
//!   configured `twilio.public_url`, not the address it was reached at.
//! - `meta` → `POST /hooks/meta` (WhatsApp Cloud API JSON): `X-Hub-Signature-256: sha256=<hex
//!   HMAC-SHA256(app secret, raw body)>`; the body escapes non-ASCII as `\uXXXX` like Meta does.
//! - `wechat` → `POST /hooks/wechat` (plain-mode XML): query `signature` = hex(SHA1(sorted
//!   concat of token, timestamp, nonce)), `timestamp`, `nonce`, `openid`.
//! - `smtp` → the SMTP listener (not HTTP): a MIME mail from `crate::smtp`, sent over a pooled
//!   connection with ESMTP pipelining; the key is its Message-ID.

use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha1::{Digest, Sha1};
use sha2::Sha256;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One of the request channels of `--mix` (the chat channel runs as sessions, see `crate::chat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    Events,
    Twilio,
    Meta,
    Wechat,
    Smtp,
}

/// How many request channels there are (the length of `Channel::ALL`).
pub const CHANNELS: usize = 5;

impl Channel {
    pub const ALL: [Channel; CHANNELS] = [
        Channel::Events,
        Channel::Twilio,
        Channel::Meta,
        Channel::Wechat,
        Channel::Smtp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Channel::Events => "events",
            Channel::Twilio => "twilio",
            Channel::Meta => "meta",
            Channel::Wechat => "wechat",
            Channel::Smtp => "smtp",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn path(self) -> &'static str {
        match self {
            Channel::Events => "/v1/events",
            Channel::Twilio => "/hooks/twilio/sms",
            Channel::Meta => "/hooks/meta",
            Channel::Wechat => "/hooks/wechat",
            // Not an HTTP route: only named in messages.
            Channel::Smtp => "SMTP",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Channel::Events | Channel::Meta => "application/json",
            Channel::Twilio => "application/x-www-form-urlencoded",
            Channel::Wechat => "text/xml",
            Channel::Smtp => "message/rfc822",
        }
    }

    pub fn from_name(s: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.name() == s)
    }
}

// ---------------------------------------------------------------------------------------------
// Mix

/// Relative weights per channel, e.g. `events=4,twilio=3,meta=2,wechat=1,smtp=1`; `none` for
/// no request load (a chat-only run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mix {
    weights: Vec<(Channel, u32)>,
    total: u64,
}

impl Mix {
    /// No request channel: only chat sessions (if any) send.
    pub fn none() -> Mix {
        Mix {
            weights: Vec::new(),
            total: 0,
        }
    }

    pub fn is_none(&self) -> bool {
        self.total == 0
    }

    pub fn parse(raw: &str) -> Result<Mix, String> {
        if raw.trim() == "none" {
            return Ok(Mix::none());
        }
        let known = || {
            Channel::ALL
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut weights: Vec<(Channel, u32)> = Vec::new();
        for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = match part.split_once('=') {
                Some((n, w)) => (n.trim(), w.trim()),
                None => (part, "1"),
            };
            let channel = Channel::from_name(name)
                .ok_or_else(|| format!("--mix: unknown channel `{name}`; known: {}", known()))?;
            let weight: u32 = weight.parse().map_err(|_| {
                format!(
                    "--mix: weight of `{name}` must be a whole number 0-1000000, got `{weight}`"
                )
            })?;
            if weight > 1_000_000 {
                return Err(format!("--mix: weight of `{name}` is over 1000000"));
            }
            if weights.iter().any(|(c, _)| *c == channel) {
                return Err(format!("--mix: `{name}` is listed twice"));
            }
            weights.push((channel, weight));
        }
        weights.retain(|(_, w)| *w > 0);
        let total: u64 = weights.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return Err(format!(
                "--mix: no channel with a weight above 0 (e.g. events=4,twilio=3,meta=2,wechat=1, or `none` with --chat-sessions; known: {})",
                known()
            ));
        }
        Ok(Mix { weights, total })
    }

    /// The channel for a uniform draw `r` in `0..total()` (not for `none`).
    pub fn pick(&self, r: u64) -> Channel {
        let mut r = r % self.total.max(1);
        for (c, w) in &self.weights {
            let w = u64::from(*w);
            if r < w {
                return *c;
            }
            r -= w;
        }
        // Unreachable: r < total. The last channel keeps the function total.
        self.weights.last().map_or(Channel::Events, |(c, _)| *c)
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn contains(&self, c: Channel) -> bool {
        self.weights.iter().any(|(x, _)| *x == c)
    }

    /// The normalised form, e.g. `events=4,twilio=3` (or `none`).
    pub fn describe(&self) -> String {
        if self.is_none() {
            return "none".into();
        }
        self.weights
            .iter()
            .map(|(c, w)| format!("{}={w}", c.name()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

// ---------------------------------------------------------------------------------------------
// Signatures

type HmacSha256 = Hmac<Sha256>;

fn hmac_sha256_hex(key: &str, parts: &[&[u8]]) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(key.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    for p in parts {
        mac.update(p);
    }
    hex::encode(mac.finalize().into_bytes())
}

/// `X-Switchboard-Signature` value for `/v1/events`: `v1=` + HMAC-SHA256(secret, ts "." body).
pub fn events_signature(secret: &str, ts: &str, body: &[u8]) -> String {
    format!(
        "v1={}",
        hmac_sha256_hex(secret, &[ts.as_bytes(), b".", body])
    )
}

/// `X-Twilio-Signature`: Base64(HMAC-SHA1(token, url + sorted name+value pairs)).
pub fn twilio_signature(token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac = match Hmac::<Sha1>::new_from_slice(token.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// `X-Hub-Signature-256`: `sha256=` + hex HMAC-SHA256(app secret, raw body).
pub fn meta_signature(secret: &str, body: &[u8]) -> String {
    format!("sha256={}", hmac_sha256_hex(secret, &[body]))
}

/// WeChat `signature`: hex(SHA1(concat(sort([token, timestamp, nonce])))).
pub fn wechat_signature(token: &str, timestamp: &str, nonce: &str) -> String {
    let mut parts = [token, timestamp, nonce];
    parts.sort_unstable();
    let mut h = Sha1::new();
    for p in parts {
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

/// JSON with every non-ASCII character as `\uXXXX` (surrogate pairs above U+FFFF), the way
/// Meta sends webhook bodies. Only strings hold non-ASCII in serialised JSON, so this is safe.
pub fn ascii_json(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 2);
    for c in s.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

fn cdata(s: &str) -> String {
    format!("<![CDATA[{}]]>", s.replace("]]>", "]]]]><![CDATA[>"))
}

// ---------------------------------------------------------------------------------------------
// Secrets and the request signer

/// Secrets and provider settings, as configured in the gateway.
#[derive(Debug, Clone)]
pub struct Secrets {
    pub api_secret: String,
    pub twilio_auth_token: String,
    /// The gateway's `twilio.public_url` (scheme://host[:port]); the signature covers it.
    pub twilio_url: String,
    pub meta_app_secret: String,
    pub wechat_token: String,
}

/// What one request carries, built once and (for `--dup-ratio`) possibly sent again unchanged.
/// Signatures that depend on the send time (events, WeChat) are made when it is sent.
#[derive(Debug)]
pub struct Payload {
    pub channel: Channel,
    pub body: Bytes,
    /// The provider message ids in the body (events: the event_id). For Twilio, Meta and WeChat
    /// these are the records' `provider_message_id`s.
    pub keys: Vec<String>,
    /// A signature header that depends on the body only (Twilio, Meta).
    pub fixed_signature: Option<String>,
    /// WeChat's `openid` query parameter.
    pub openid: Option<String>,
    /// The mail of an `smtp` payload (its `data` is also the body).
    pub mail: Option<crate::smtp::Mail>,
}

/// A request ready for the client: method POST, URI, headers and body.
#[derive(Debug)]
pub struct Outgoing {
    pub uri: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

/// Builds signed requests for a base URL.
#[derive(Debug, Clone)]
pub struct Signer {
    pub base: String,
    pub secrets: Secrets,
}

impl Signer {
    pub fn new(base: &str, secrets: Secrets) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            secrets,
        }
    }

    /// The request for `p`, signed at `now` (unix seconds) with `nonce` (WeChat).
    pub fn request(&self, p: &Payload, now: u64, nonce: u64) -> Outgoing {
        let mut headers: Vec<(&'static str, String)> =
            vec![("content-type", p.channel.content_type().to_string())];
        let mut uri = format!("{}{}", self.base, p.channel.path());
        match p.channel {
            Channel::Events => {
                let ts = now.to_string();
                let sig = events_signature(&self.secrets.api_secret, &ts, &p.body);
                headers.push(("x-switchboard-timestamp", ts));
                headers.push(("x-switchboard-signature", sig));
            }
            Channel::Twilio => {
                if let Some(sig) = &p.fixed_signature {
                    headers.push(("x-twilio-signature", sig.clone()));
                }
            }
            Channel::Meta => {
                if let Some(sig) = &p.fixed_signature {
                    headers.push(("x-hub-signature-256", sig.clone()));
                }
            }
            // Never sent over HTTP: `run` hands smtp payloads to the SMTP pool.
            Channel::Smtp => {}
            Channel::Wechat => {
                let ts = now.to_string();
                let nonce = nonce.to_string();
                let sig = wechat_signature(&self.secrets.wechat_token, &ts, &nonce);
                let openid = p.openid.as_deref().unwrap_or("");
                let query = form_urlencoded::Serializer::new(String::new())
                    .append_pair("signature", &sig)
                    .append_pair("timestamp", &ts)
                    .append_pair("nonce", &nonce)
                    .append_pair("openid", openid)
                    .finish();
                uri.push('?');
                uri.push_str(&query);
            }
        }
        Outgoing {
            uri,
            headers,
            body: p.body.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Realistic content

/// Complaint texts: Chinese and English, across network, billing, service, product and privacy.
pub const TEXTS: &[&str] = &[
    // network
    "家里宽带从昨晚开始断网，光猫一直亮红灯，重启了好几次都没用。",
    "小区这两天4G信号特别差，打电话经常掉线，5G图标也时有时无。",
    "宽带测速只有20M，我办的是500M套餐，投诉多次没人处理。",
    "家里的IPTV一直卡顿，看直播每隔几分钟就缓冲一次。",
    "My home broadband has been dropping every evening for a week, speed is under 1 Mbps.",
    "No mobile signal at all inside my office building since the mast upgrade on Monday.",
    "Roaming data does not work in Japan even though I bought the roaming pack yesterday.",
    // billing
    "这个月话费多扣了58元，账单里有一项我从来没订过的增值业务。",
    "套餐到期后自动续费成了更贵的套餐，事先没有任何通知。",
    "流量明明没用完，却提示超出套餐，被收了额外的流量费。",
    "I was charged twice for my monthly plan this month, please refund the duplicate charge.",
    "My bill shows international call charges but I never made any calls abroad.",
    "The early termination fee quoted in the shop was 50 pounds but I was billed 180.",
    // service
    "营业厅工作人员态度很差，办理携号转网被百般刁难。",
    "客服电话打了三次都转不到人工，每次都等了四十分钟。",
    "装维师傅上门后说要另外收200元材料费，之前完全没说过。",
    "The engineer missed the installation appointment twice and nobody called to reschedule.",
    "I have been waiting three weeks for a callback about my complaint, nobody answers.",
    "The chat agent closed my conversation without solving the problem.",
    // product
    "新买的合约机用了一周就无法充电，门店说不给换。",
    "手机里的营业厅App总是闪退，根本无法查询余额和账单。",
    "5G套餐宣传的不限量实际上30G后就限速到1Mbps，涉嫌虚假宣传。",
    "The router you sent me keeps rebooting by itself every few hours.",
    "eSIM activation failed and now my phone has no service at all.",
    // privacy
    "我没有授权，为什么会收到你们合作方的推销短信？我的号码是不是被泄露了？",
    "每天接到好几个自称你们公司的骚扰电话，要求我办理业务。",
    "营业厅复印了我的身份证却没有登记用途，担心个人信息被滥用。",
    "Someone ported my number out without my consent and used it to get my bank codes.",
    "I asked you to delete my personal data six weeks ago and still have no confirmation.",
    // mixed
    "宽带断网三天了 / broadband down for three days, 报修单一直没有回复。",
    "你们的短信验证码经常收不到，导致我无法登录网银。",
    "Billing error and no signal at home — 两个问题都投诉过了，一直没有人处理。",
];

const NAMES: &[&str] = &[
    "张伟",
    "李娜",
    "王芳",
    "刘洋",
    "陈静",
    "黄磊",
    "Oliver Smith",
    "Amelia Jones",
    "Harry Brown",
    "Li Wei",
];

const AREAS: &[&str] = &[
    "shenzhen-nanshan",
    "shenzhen-futian",
    "guangzhou-tianhe",
    "beijing-haidian",
    "shanghai-pudong",
    "hangzhou-xihu",
    "london-camden",
    "manchester-city",
];

/// Fixed provider accounts, like one gateway deployment has.
pub const TWILIO_ACCOUNT_SID: &str = "AC0000000000000000000000000000load";
pub const TWILIO_TO: &str = "+14155550100";
pub const META_WABA_ID: &str = "102290129340398";
pub const META_PHONE_NUMBER_ID: &str = "106540352242922";
pub const META_DISPLAY_NUMBER: &str = "15550783881";

/// A customer: one per request (distinct phones, so per-customer limits and the 2-minute
/// content fingerprint dedupe do not merge separate complaints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer {
    /// E.164, `+86138…` or `+4477…`.
    pub phone: String,
    pub name: &'static str,
    pub country: &'static str,
}

/// The n-th customer of a run: valid numbers (libphonenumber), distinct for 10^8 (CN) and
/// 7·10^7 (GB) consecutive n.
pub fn customer(n: u64) -> Customer {
    let name = NAMES[(n % NAMES.len() as u64) as usize];
    if n % 10 < 7 {
        Customer {
            phone: format!("+86138{:08}", (n / 10 * 7 + n % 10) % 100_000_000),
            name,
            country: "CN",
        }
    } else {
        // GB mobiles 77[1-7]x xxxxxx are valid numbers.
        let m = (n / 10 * 3 + (n % 10 - 7)) % 70_000_000;
        Customer {
            phone: format!("+4477{}{:07}", 1 + m / 10_000_000, m % 10_000_000),
            name,
            country: "GB",
        }
    }
}

/// Settings shared by every generator of a run.
#[derive(Debug)]
pub struct GenConfig {
    pub mix: Mix,
    pub dup_ratio: f64,
    /// Messages per Meta delivery.
    pub meta_batch: usize,
    /// The WeChat official account id (`ToUserName`).
    pub wechat_account: String,
    /// What `smtp` mails look like.
    pub mail: crate::smtp::MailSettings,
    /// Next customer number (shared by all generators; random start per run).
    pub customer_seq: AtomicU64,
    /// Recent payloads per channel, for `dup_ratio` re-sends. One ring for the whole run (at
    /// most `DUP_RING` per channel), so memory does not grow with the number of workers and a
    /// re-send may go out on another connection than the original, as provider retries do.
    recent: Mutex<[VecDeque<Arc<Payload>>; CHANNELS]>,
}

/// Mail settings for generators that are not given any (1 KB, 8bit, the dev intake address).
pub fn default_mail() -> crate::smtp::MailSettings {
    crate::smtp::MailSettings {
        size: 1024,
        rcpt: "complaints@switchboard.localhost".into(),
        encoding: crate::smtp::BodyEncoding::EightBit,
        attachment_ratio: 0.0,
    }
}

impl GenConfig {
    #[cfg(test)]
    pub fn new(mix: Mix, dup_ratio: f64, meta_batch: usize, wechat_account: String) -> Self {
        Self::with_mail(mix, dup_ratio, meta_batch, wechat_account, default_mail())
    }

    pub fn with_mail(
        mix: Mix,
        dup_ratio: f64,
        meta_batch: usize,
        wechat_account: String,
        mail: crate::smtp::MailSettings,
    ) -> Self {
        Self {
            mix,
            dup_ratio,
            meta_batch,
            wechat_account,
            mail,
            customer_seq: AtomicU64::new(fastrand::u64(0..1_000_000_000)),
            recent: Mutex::new(Default::default()),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, [VecDeque<Arc<Payload>>; CHANNELS]> {
        // A panic elsewhere cannot leave the rings inconsistent: keep using them.
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A random recent payload of `channel`, if there is one.
    fn pick_recent(&self, channel: Channel, rng: &mut fastrand::Rng) -> Option<Arc<Payload>> {
        let rings = self.recent();
        let ring = &rings[channel.index()];
        (!ring.is_empty()).then(|| ring[rng.usize(0..ring.len())].clone())
    }

    fn remember(&self, p: Arc<Payload>) {
        let evicted = {
            let mut rings = self.recent();
            let ring = &mut rings[p.channel.index()];
            let evicted = if ring.len() == DUP_RING {
                ring.pop_front()
            } else {
                None
            };
            ring.push_back(p);
            evicted
        };
        drop(evicted); // freed outside the lock
    }
}

const DUP_RING: usize = 1024;

/// Makes payloads: a channel from the mix, or (with `dup_ratio`) an earlier payload of that
/// channel again, byte for byte.
pub struct Generator {
    cfg: Arc<GenConfig>,
    rng: fastrand::Rng,
    twilio_url: String,
    twilio_token: String,
    meta_secret: String,
}

impl Generator {
    pub fn new(cfg: Arc<GenConfig>, secrets: &Secrets) -> Self {
        Self {
            cfg,
            rng: fastrand::Rng::new(),
            twilio_url: format!(
                "{}{}",
                secrets.twilio_url.trim_end_matches('/'),
                Channel::Twilio.path()
            ),
            twilio_token: secrets.twilio_auth_token.clone(),
            meta_secret: secrets.meta_app_secret.clone(),
        }
    }

    /// The next payload and whether it is a re-send of an earlier one.
    pub fn next(&mut self, now: u64) -> (Arc<Payload>, bool) {
        let channel = self.cfg.mix.pick(self.rng.u64(0..self.cfg.mix.total()));
        if self.cfg.dup_ratio <= 0.0 {
            return (Arc::new(self.fresh(channel, now)), false);
        }
        if self.rng.f64() < self.cfg.dup_ratio {
            if let Some(p) = self.cfg.pick_recent(channel, &mut self.rng) {
                return (p, true);
            }
        }
        let p = Arc::new(self.fresh(channel, now));
        self.cfg.remember(p.clone());
        (p, false)
    }

    fn next_customer(&mut self) -> Customer {
        customer(self.cfg.customer_seq.fetch_add(1, Ordering::Relaxed))
    }

    fn text(&mut self) -> String {
        let base = TEXTS[self.rng.usize(0..TEXTS.len())];
        // Some senders add a detail; it also keeps texts varied.
        match self.rng.u8(0..4) {
            0 => format!("{base} 订单号{}", self.rng.u32(10_000_000..99_999_999)),
            1 => format!("{base} (account {})", self.rng.u32(100_000..999_999)),
            _ => base.to_string(),
        }
    }

    /// A new payload for `channel`, created at `now` (unix seconds).
    pub fn fresh(&mut self, channel: Channel, now: u64) -> Payload {
        match channel {
            Channel::Events => self.events(),
            Channel::Twilio => self.twilio(),
            Channel::Meta => self.meta(now),
            Channel::Wechat => self.wechat(now),
            Channel::Smtp => self.smtp(),
        }
    }

    fn smtp(&mut self) -> Payload {
        let c = self.next_customer();
        let text = self.text();
        let date = chrono::Utc::now().to_rfc2822();
        let mail = crate::smtp::build_mail(&mut self.rng, &self.cfg.mail, &c, &text, &date);
        Payload {
            channel: Channel::Smtp,
            body: mail.data.clone(),
            keys: vec![mail.message_id.clone()],
            fixed_signature: None,
            openid: None,
            mail: Some(mail),
        }
    }

    fn events(&mut self) -> Payload {
        let c = self.next_customer();
        let event_id = format!("lt-{}", ulid::Ulid::new());
        // Half the Chinese numbers come in national form, as operator systems often send them.
        let phone = if c.country == "CN" && self.rng.bool() {
            c.phone.trim_start_matches("+86").to_string()
        } else {
            c.phone.clone()
        };
        let area = AREAS[self.rng.usize(0..AREAS.len())];
        let source = ["crm", "app", "shop"][self.rng.usize(0..3)];
        let body = serde_json::json!({
            "event_id": event_id,
            "source": source,
            "customer": { "phone": phone, "name": c.name },
            "text": self.text(),
            "metadata": { "area": area, "loadtest": "1" },
        });
        Payload {
            channel: Channel::Events,
            body: Bytes::from(body.to_string()),
            keys: vec![event_id],
            fixed_signature: None,
            openid: None,
            mail: None,
        }
    }

    fn twilio(&mut self) -> Payload {
        let c = self.next_customer();
        let sid = format!("SM{:032x}", ulid::Ulid::new().0);
        let text = self.text();
        let params: Vec<(String, String)> = [
            ("ToCountry", "US"),
            ("ToState", "CA"),
            ("SmsMessageSid", sid.as_str()),
            ("NumMedia", "0"),
            ("ToCity", "SAN FRANCISCO"),
            ("SmsSid", sid.as_str()),
            ("SmsStatus", "received"),
            ("Body", text.as_str()),
            ("FromCountry", c.country),
            ("To", TWILIO_TO),
            ("NumSegments", "1"),
            ("MessageSid", sid.as_str()),
            ("AccountSid", TWILIO_ACCOUNT_SID),
            ("From", c.phone.as_str()),
            ("ApiVersion", "2010-04-01"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &params {
            ser.append_pair(k, v);
        }
        let sig = twilio_signature(&self.twilio_token, &self.twilio_url, &params);
        Payload {
            channel: Channel::Twilio,
            body: Bytes::from(ser.finish()),
            keys: vec![sid],
            fixed_signature: Some(sig),
            openid: None,
            mail: None,
        }
    }

    fn meta(&mut self, now: u64) -> Payload {
        let n = self.cfg.meta_batch.max(1);
        let mut contacts = Vec::with_capacity(n);
        let mut messages = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        for _ in 0..n {
            let c = self.next_customer();
            let wa_id = c.phone.trim_start_matches('+').to_string();
            let mut raw = Vec::with_capacity(18);
            raw.extend_from_slice(b"LT");
            raw.extend_from_slice(&ulid::Ulid::new().0.to_be_bytes());
            let wamid = format!(
                "wamid.{}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            );
            contacts.push(serde_json::json!({ "profile": { "name": c.name }, "wa_id": wa_id }));
            messages.push(serde_json::json!({
                "from": wa_id,
                "id": wamid,
                "timestamp": now.to_string(),
                "type": "text",
                "text": { "body": self.text() },
            }));
            keys.push(wamid);
        }
        let body = serde_json::json!({
            "object": "whatsapp_business_account",
            "entry": [{
                "id": META_WABA_ID,
                "changes": [{
                    "value": {
                        "messaging_product": "whatsapp",
                        "metadata": {
                            "display_phone_number": META_DISPLAY_NUMBER,
                            "phone_number_id": META_PHONE_NUMBER_ID,
                        },
                        "contacts": contacts,
                        "messages": messages,
                    },
                    "field": "messages",
                }],
            }],
        });
        let body = ascii_json(&body.to_string());
        let sig = meta_signature(&self.meta_secret, body.as_bytes());
        Payload {
            channel: Channel::Meta,
            body: Bytes::from(body),
            keys,
            fixed_signature: Some(sig),
            openid: None,
            mail: None,
        }
    }

    fn wechat(&mut self, now: u64) -> Payload {
        let c = self.next_customer();
        // OpenIDs are 28 characters: "o" + 27 of base64url.
        let mut raw = [0u8; 20];
        raw[..8].copy_from_slice(&fastrand_u64_bytes(&mut self.rng));
        raw[8..].copy_from_slice(&c.phone.as_bytes()[c.phone.len() - 12..]);
        let openid = format!(
            "o{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        );
        // MsgId is a 64-bit number; random in [10^17, 9·10^18) so runs do not collide.
        let msg_id = self
            .rng
            .u64(100_000_000_000_000_000..9_000_000_000_000_000_000);
        let xml = format!(
            "<xml><ToUserName>{}</ToUserName><FromUserName>{}</FromUserName><CreateTime>{now}</CreateTime><MsgType>{}</MsgType><Content>{}</Content><MsgId>{msg_id}</MsgId></xml>",
            cdata(&self.cfg.wechat_account),
            cdata(&openid),
            cdata("text"),
            cdata(&self.text()),
        );
        Payload {
            channel: Channel::Wechat,
            body: Bytes::from(xml),
            keys: vec![msg_id.to_string()],
            fixed_signature: None,
            openid: Some(openid),
            mail: None,
        }
    }
}

fn fastrand_u64_bytes(rng: &mut fastrand::Rng) -> [u8; 8] {
    rng.u64(..).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> Secrets {
        Secrets {
            api_secret: "dev-only-secret-change-me".into(),
            twilio_auth_token: "dev-only-twilio-auth-token".into(),
            twilio_url: "http://127.0.0.1:8080".into(),
            meta_app_secret: "test_app_secret".into(),
            wechat_token: "test".into(),
        }
    }

    /// The gateway's own known-answer vectors (src/channels/twilio.rs, from twilio-python).
    #[test]
    fn twilio_known_answers() {
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            twilio_signature(
                "12345",
                "https://mycompany.com/myapp.php?foo=1&bar=2",
                &params
            ),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        assert_eq!(
            twilio_signature(
                "12345",
                "https://mycompany.com:443/myapp.php?foo=1&bar=2",
                &params
            ),
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        );
        let mut rev = params.clone();
        rev.reverse();
        assert_eq!(
            twilio_signature("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", &rev),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        // CHANNELS.md T2, over the decoded form pairs of the fixture body.
        let body = "ToCountry=US&ToState=CA&SmsMessageSid=SM1b3c5e7a9d1f3b5c7e9a1c3e5f7b9d1a&NumMedia=0&ToCity=SAN+FRANCISCO&FromZip=94105&SmsSid=SM1b3c5e7a9d1f3b5c7e9a1c3e5f7b9d1a&FromState=CA&SmsStatus=received&FromCity=SAN+FRANCISCO&Body=My+broadband+has+been+down+for+3+days&FromCountry=US&To=%2B14155550100&ToZip=94105&NumSegments=1&MessageSid=SM1b3c5e7a9d1f3b5c7e9a1c3e5f7b9d1a&AccountSid=ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX&From=%2B14155550123&ApiVersion=2010-04-01";
        let pairs: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
        assert_eq!(
            twilio_signature("12345", "https://gateway.example.com/twilio/sms", &pairs),
            "DwRsmP8DzYkkwS7mO+dYmAwR5VY="
        );
    }

    /// CHANNELS.md §3.6 M1 and M4 (the gateway's src/channels/meta.rs vectors).
    #[test]
    fn meta_known_answers() {
        let m1 = r#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},"contacts":[{"profile":{"name":"Sheena Nelson"},"wa_id":"16505551234"}],"messages":[{"from":"16505551234","id":"wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=","timestamp":"1749416383","type":"text","text":{"body":"Does it come in another color?"}}]},"field":"messages"}]}]}"#;
        assert_eq!(m1.len(), 499);
        assert_eq!(
            meta_signature("test_app_secret", m1.as_bytes()),
            "sha256=ded1d1d9621cffa39832ccf2b330fa476b4dc8ec2a5d102e1e554312b3f21d42"
        );
        let m4 = ascii_json(r#"{"text":"äöå"}"#);
        assert_eq!(m4, r#"{"text":"\u00e4\u00f6\u00e5"}"#);
        assert_eq!(
            meta_signature("test_app_secret", m4.as_bytes()),
            "sha256=02331cadf5416e9e5dc4ecf73b5c9b7aa6577a90b90fbb6bad6e9a35d8a8f6a9"
        );
    }

    /// CHANNELS.md W0 (wechatpy) and the W3/wechatpy URL signatures.
    #[test]
    fn wechat_known_answers() {
        assert_eq!(
            wechat_signature("test", "1410685589", "test"),
            "f21891de399b4e33a1a93c9a7b8a8fffb5a443ff"
        );
        assert_eq!(
            wechat_signature("123456", "1411525903", "461056294"),
            "6c729cc5480fab0c2e594b7e25a93d2dbef6ab97"
        );
        assert_eq!(
            wechat_signature("pamtest", "1409304348", "xxxxxx"),
            "76480565cbe296026c53aaacd1ad523a1ddba24f"
        );
    }

    /// The events signature is HMAC-SHA256 over `ts.body` (the gateway's `sign_hex` with the
    /// parts `[ts, ".", body]`). Expected value computed independently:
    /// `printf '%s' '1700000000.{"event_id":"e1"}' | openssl dgst -sha256 -hmac dev-only-secret-change-me`.
    #[test]
    fn events_signature_is_hmac_over_ts_dot_body() {
        let sig = events_signature(
            "dev-only-secret-change-me",
            "1700000000",
            br#"{"event_id":"e1"}"#,
        );
        assert!(sig.starts_with("v1="));
        assert_eq!(sig.len(), 3 + 64);
        assert_eq!(
            sig,
            "v1=114b227c028abfa989529882856bf61e53f816847c6181aa5fe4e264355fd382"
        );
        // RFC 4231 test case 2 pins the HMAC-SHA256 primitive itself.
        assert_eq!(
            hmac_sha256_hex("Jefe", &[b"what do ya want ", b"for nothing?"]),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn mix_parsing() {
        let m = Mix::parse("events=4,twilio=3,meta=2,wechat=1").unwrap();
        assert_eq!(m.total(), 10);
        let mut counts = [0u32; 4];
        for r in 0..10 {
            counts[m.pick(r).index()] += 1;
        }
        assert_eq!(counts, [4, 3, 2, 1]);
        assert_eq!(m.describe(), "events=4,twilio=3,meta=2,wechat=1");
        let m = Mix::parse(" events , wechat=0, meta = 2 ").unwrap();
        assert_eq!(m.describe(), "events=1,meta=2");
        assert!(!m.contains(Channel::Wechat));
        let m = Mix::parse("twilio=3,smtp=1").unwrap();
        assert!(m.contains(Channel::Smtp) && !m.is_none());
        assert_eq!(m.describe(), "twilio=3,smtp=1");
        let none = Mix::parse("none").unwrap();
        assert!(none.is_none());
        assert_eq!(none.describe(), "none");
        for bad in [
            "",
            "sms=1",
            "events=-1",
            "events=x",
            "events=1,events=2",
            "events=0",
            "events=99999999999",
            "none,events",
        ] {
            assert!(Mix::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn customers_are_valid_shaped_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..10_000u64 {
            let c = customer(n);
            match c.country {
                "CN" => {
                    assert!(
                        c.phone.starts_with("+86138") && c.phone.len() == 14,
                        "{}",
                        c.phone
                    )
                }
                _ => {
                    assert!(
                        c.phone.starts_with("+4477") && c.phone.len() == 13,
                        "{}",
                        c.phone
                    );
                    let d = c.phone.as_bytes()[5];
                    assert!((b'1'..=b'7').contains(&d), "{}", c.phone);
                }
            }
            assert!(seen.insert(c.phone));
        }
    }

    #[test]
    fn payloads_are_signed_as_the_gateway_checks() {
        let s = secrets();
        let cfg = Arc::new(GenConfig::new(
            Mix::parse("events").unwrap(),
            0.0,
            2,
            "gh_10adb0a7e5c1".into(),
        ));
        let mut g = Generator::new(cfg, &s);
        let signer = Signer::new("http://127.0.0.1:8080/", s.clone());

        // Events: the header verifies against ts + "." + body.
        let p = g.fresh(Channel::Events, 1_700_000_000);
        let out = signer.request(&p, 1_700_000_000, 7);
        assert_eq!(out.uri, "http://127.0.0.1:8080/v1/events");
        let h = |name: &str| {
            out.headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(h("x-switchboard-timestamp"), "1700000000");
        assert_eq!(
            h("x-switchboard-signature"),
            events_signature(&s.api_secret, "1700000000", &p.body)
        );
        let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["event_id"], p.keys[0].as_str());

        // Twilio: the signature covers public URL + path + the decoded, sorted form pairs.
        let p = g.fresh(Channel::Twilio, 0);
        let pairs: Vec<(String, String)> = form_urlencoded::parse(&p.body).into_owned().collect();
        assert_eq!(
            p.fixed_signature.as_deref().unwrap(),
            twilio_signature(
                &s.twilio_auth_token,
                "http://127.0.0.1:8080/hooks/twilio/sms",
                &pairs
            )
        );
        assert!(pairs
            .iter()
            .any(|(k, v)| k == "MessageSid" && *v == p.keys[0]));
        assert_eq!(p.keys[0].len(), 34);

        // Meta: ASCII-only body, signature over the exact bytes, one key per message.
        let p = g.fresh(Channel::Meta, 1_700_000_000);
        assert!(p.body.is_ascii());
        assert_eq!(p.keys.len(), 2);
        assert_eq!(
            p.fixed_signature.as_deref().unwrap(),
            meta_signature("test_app_secret", &p.body)
        );
        let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
        let msgs = &v["entry"][0]["changes"][0]["value"]["messages"];
        assert_eq!(msgs[1]["id"], p.keys[1].as_str());
        assert!(TEXTS
            .iter()
            .any(|t| msgs[0]["text"]["body"].as_str().unwrap().starts_with(t)));

        // WeChat: query signature over (token, timestamp, nonce); MsgId is the key.
        let p = g.fresh(Channel::Wechat, 1_700_000_000);
        let out = signer.request(&p, 1_700_000_001, 424242);
        let query = out.uri.split_once('?').unwrap().1;
        let q: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let get = |k: &str| q.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(get("timestamp"), "1700000001");
        assert_eq!(get("nonce"), "424242");
        assert_eq!(
            get("signature"),
            wechat_signature("test", "1700000001", "424242")
        );
        assert_eq!(get("openid").len(), 28);
        let xml = std::str::from_utf8(&p.body).unwrap();
        assert!(xml.contains(&format!("<MsgId>{}</MsgId>", p.keys[0])));
        assert!(xml.contains("<ToUserName><![CDATA[gh_10adb0a7e5c1]]></ToUserName>"));
    }

    #[test]
    fn duplicates_resend_the_same_bytes() {
        let s = secrets();
        let cfg = Arc::new(GenConfig::new(
            Mix::parse("twilio").unwrap(),
            1.0,
            1,
            "gh_x".into(),
        ));
        let mut g = Generator::new(cfg, &s);
        let (first, dup) = g.next(0);
        assert!(!dup, "nothing to repeat yet");
        let (again, dup) = g.next(0);
        assert!(dup);
        assert_eq!(first.body, again.body);
        assert_eq!(first.keys, again.keys);
    }

    #[test]
    fn the_dup_ring_is_shared_and_bounded() {
        let s = secrets();
        // dup_ratio 1: the first payload is fresh, every later one a re-send.
        let cfg = Arc::new(GenConfig::new(
            Mix::parse("events").unwrap(),
            1.0,
            1,
            "gh_x".into(),
        ));
        let mut a = Generator::new(cfg.clone(), &s);
        let mut b = Generator::new(cfg.clone(), &s);
        let (first, dup) = a.next(0);
        assert!(!dup);
        // Another worker's generator re-sends what this one made.
        let (again, dup) = b.next(0);
        assert!(dup);
        assert_eq!(again.keys, first.keys);
        // The ring keeps at most DUP_RING payloads per channel, whatever the number of workers.
        let half = Arc::new(GenConfig::new(
            Mix::parse("events").unwrap(),
            0.01,
            1,
            "gh_x".into(),
        ));
        let mut gens: Vec<Generator> = (0..8).map(|_| Generator::new(half.clone(), &s)).collect();
        for i in 0..5000 {
            gens[i % 8].next(0);
        }
        assert_eq!(half.recent()[Channel::Events.index()].len(), DUP_RING);
        // Without re-sends nothing is kept.
        let none = Arc::new(GenConfig::new(
            Mix::parse("meta").unwrap(),
            0.0,
            1,
            "gh_x".into(),
        ));
        let mut g = Generator::new(none.clone(), &s);
        for _ in 0..10 {
            assert!(!g.next(0).1);
        }
        assert!(none.recent().iter().all(|r| r.is_empty()));
    }

    #[test]
    fn smtp_payloads_carry_their_mail_and_message_id() {
        let s = secrets();
        let mut mail = default_mail();
        mail.size = 4096;
        let cfg = Arc::new(GenConfig::with_mail(
            Mix::parse("smtp").unwrap(),
            1.0,
            1,
            "gh_x".into(),
            mail,
        ));
        let mut g = Generator::new(cfg, &s);
        let (p, dup) = g.next(0);
        assert!(!dup);
        assert_eq!(p.channel, Channel::Smtp);
        let m = p.mail.as_ref().unwrap();
        assert_eq!(p.body, m.data);
        assert_eq!(p.keys, vec![m.message_id.clone()]);
        assert!(p.body.len() >= 4096);
        let text = std::str::from_utf8(&p.body).unwrap();
        assert!(text.contains(&format!("Message-ID: <{}>", m.message_id)));
        // A re-send is the same mail, Message-ID included: the gateway's dedupe sees it again.
        let (again, dup) = g.next(0);
        assert!(dup);
        assert_eq!(again.body, p.body);
    }

    #[test]
    fn cdata_cannot_be_closed_early() {
        assert_eq!(cdata("a]]>b"), "<![CDATA[a]]]]><![CDATA[>b]]>");
    }
}
