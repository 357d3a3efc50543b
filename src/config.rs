//! Configuration: `config/switchboard.toml`, overridden by `SWITCHBOARD_<SECTION>__<KEY>` env vars.
//!
//! Every struct denies unknown keys, so a typo fails start-up naming the key instead of being
//! silently ignored. Defaults run on a laptop: loopback listeners, the embedded spool as the sink.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod redact;

pub const ENV_PREFIX: &str = "SWITCHBOARD_";

#[derive(Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub identity: IdentityConfig,
    pub dedupe: DedupeConfig,
    pub limits: LimitsConfig,
    pub redis: RedisConfig,
    pub triage: TriageConfig,
    pub sink: SinkConfig,
    pub kafka: KafkaConfig,
    pub spool: SpoolConfig,
    pub api: ApiChannelConfig,
    pub sms: SmsConfig,
    pub twilio: TwilioConfig,
    pub vonage: VonageConfig,
    pub alibaba: AlibabaConfig,
    pub smpp: SmppConfig,
    pub email: EmailConfig,
    pub chat: ChatConfig,
    pub wechat: crate::channels::wechat::WechatConfig,
    pub weibo: crate::channels::weibo::WeiboConfig,
    pub meta: crate::channels::meta::MetaConfig,
    pub telegram: crate::channels::telegram::TelegramConfig,
    pub x: crate::channels::x::XConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub header_read_timeout_ms: u64,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: usize,
    pub body_read_timeout_ms: u64,
    pub keepalive_idle_timeout_ms: u64,
    pub shutdown_grace_ms: u64,
    /// Accept queue of the listening sockets (public, admin, SMTP): connections the kernel holds
    /// before the gateway accepts them (capped by net.core.somaxconn).
    pub listen_backlog: u32,
    /// PEM certificate chain and private key; both set: the listener speaks HTTPS only (TLS 1.2
    /// and 1.3, ALPN http/1.1), re-read on SIGHUP. Both empty: plain HTTP.
    pub tls_cert_path: String,
    pub tls_key_path: String,
    /// A TLS client must finish its handshake within this time (public and admin listeners).
    pub tls_handshake_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("static address"),
            max_connections: 10_000,
            header_read_timeout_ms: 10_000,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_body_bytes: 1024 * 1024,
            body_read_timeout_ms: 15_000,
            keepalive_idle_timeout_ms: 60_000,
            shutdown_grace_ms: 20_000,
            listen_backlog: 1024,
            tls_cert_path: String::new(),
            tls_key_path: String::new(),
            tls_handshake_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    /// `/readyz` answers 503 while Kafka is configured but down (requests still succeed via the
    /// spool). `false`: ready whenever records can be made durable somewhere.
    pub readyz_requires_kafka: bool,
    /// PEM certificate chain and private key; both set: the admin listener speaks HTTPS only.
    pub tls_cert_path: String,
    pub tls_key_path: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".parse().expect("static address"),
            max_connections: 64,
            readyz_requires_kafka: true,
            tls_cert_path: String::new(),
            tls_key_path: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// ISO 3166 region used for phone numbers written without a country code.
    pub default_region: String,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            default_region: "CN".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupeConfig {
    /// `memory`: each instance dedupes on its own. `redis`: instances share the windows through
    /// `[redis]` (the memory windows stay in front as a cache, and are the fallback).
    pub backend: Backend,
    pub provider_id_window_secs: u64,
    pub fingerprint_window_secs: u64,
    pub max_entries: usize,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Memory,
            provider_id_window_secs: 8 * 24 * 3600,
            fingerprint_window_secs: 120,
            max_entries: 2_000_000,
        }
    }
}

/// Where dedupe windows and rate limits are kept.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Memory,
    Redis,
}

/// The Redis that `dedupe.backend = "redis"` and `limits.backend = "redis"` share.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user][:password@]host[:port][/db]`; the password is redacted by check-config.
    pub url: String,
    /// Prepended to every key, so several deployments can share one Redis.
    pub key_prefix: String,
    /// Longest wait for one Redis call; past it the call falls back to the local store.
    pub timeout_ms: u64,
    /// After a failed call, Redis is skipped (local store used) for this long.
    pub retry_after_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            key_prefix: "switchboard:".into(),
            timeout_ms: 50,
            retry_after_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// Sustained rate, requests (or records) per second.
    pub per_second: f64,
    /// How many may arrive at once above the sustained rate.
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub enabled: bool,
    /// `memory`: limits per instance. `redis`: one GCRA state per key shared through `[redis]`
    /// (the local limiter is the fallback while Redis is unreachable).
    pub backend: Backend,
    pub per_source: RateConfig,
    pub per_channel: RateConfig,
    pub per_customer: RateConfig,
    pub max_keys: usize,
    pub evict_interval_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            backend: Backend::Memory,
            per_source: RateConfig {
                per_second: 500.0,
                burst: 2_000,
            },
            per_channel: RateConfig {
                per_second: 20_000.0,
                burst: 40_000,
            },
            per_customer: RateConfig {
                per_second: 0.5,
                burst: 20,
            },
            max_keys: 1_000_000,
            evict_interval_secs: 60,
        }
    }
}

/// Triage: where the rule file is (categories, severities, SLA table, business calendar,
/// repeat and storm policy; reloaded on SIGHUP) and the memory bounds of its state.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TriageConfig {
    /// The rule file; empty = the rules compiled into the binary (`config/triage.toml`).
    pub rules_file: PathBuf,
    /// Customers whose recent complaints are remembered for repeat detection (~200 bytes each).
    pub max_repeat_customers: u64,
    /// (category, area) buckets the storm detector tracks at once.
    pub max_storm_buckets: usize,
    /// Distinct customers remembered per bucket; past it a bucket is storming anyway.
    pub max_storm_customers_per_bucket: usize,
}

impl Default for TriageConfig {
    fn default() -> Self {
        Self {
            rules_file: PathBuf::new(),
            max_repeat_customers: 250_000,
            max_storm_buckets: 10_000,
            max_storm_customers_per_bucket: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// How long a request waits for the sink before answering 503.
    pub write_timeout_ms: u64,
    pub retry_after_secs: u64,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            write_timeout_ms: 10_000,
            retry_after_secs: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers. Empty: no Kafka, the spool is the sink.
    pub brokers: String,
    pub topic: String,
    pub dlq_topic: String,
    pub replies_topic: String,
    pub client_id: String,
    pub compression: String,
    pub linger_ms: u64,
    pub batch_num_messages: u64,
    pub queue_buffering_max_messages: u64,
    pub queue_buffering_max_kbytes: u64,
    /// librdkafka's `message.timeout.ms`: after this a record falls back to the spool.
    pub delivery_timeout_ms: u64,
    pub statistics_interval_ms: u64,
    pub flush_timeout_ms: u64,
    /// Any other librdkafka property, passed through verbatim.
    pub extra: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            topic: "complaints.v1".into(),
            dlq_topic: "complaints.dlq.v1".into(),
            replies_topic: "replies.v1".into(),
            client_id: "switchboard".into(),
            compression: "zstd".into(),
            linger_ms: 5,
            batch_num_messages: 10_000,
            queue_buffering_max_messages: 100_000,
            queue_buffering_max_kbytes: 262_144,
            delivery_timeout_ms: 3_000,
            statistics_interval_ms: 5_000,
            flush_timeout_ms: 15_000,
            extra: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub segment_bytes: u64,
    /// Largest group committed by one fsync.
    pub max_batch_records: usize,
    /// Group commit wait: when the previous commit found more than one request queued (there is
    /// concurrency), the writer waits up to this long collecting more before its write + fsync.
    /// A lone request under light load is never delayed. 0 = off.
    pub group_commit_wait_us: u64,
    /// Replay to Kafka: most spooled records handed to the producer and not yet acknowledged.
    pub replay_max_in_flight: usize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("var/spool"),
            segment_bytes: 64 * 1024 * 1024,
            max_batch_records: 4096,
            group_commit_wait_us: 200,
            replay_max_in_flight: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SignatureMode {
    Enforce,
    LogOnly,
    Off,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiChannelConfig {
    pub signature_mode: SignatureMode,
    /// Current secret first; a second one is accepted during rotation.
    pub secrets: Vec<String>,
    pub timestamp_tolerance_secs: u64,
    pub max_batch: usize,
}

impl Default for ApiChannelConfig {
    fn default() -> Self {
        Self {
            signature_mode: SignatureMode::Enforce,
            secrets: vec!["dev-only-secret-change-me".into()],
            timestamp_tolerance_secs: 300,
            max_batch: 500,
        }
    }
}

pub const CATEGORIES: [&str; 6] = [
    "network", "billing", "service", "product", "privacy", "other",
];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmsConfig {
    /// How long the parts of a long SMS are awaited before what came is emitted (flagged).
    pub concat_wait_ms: u64,
    /// Most long messages being assembled at once.
    pub concat_max_pending: usize,
}

impl Default for SmsConfig {
    fn default() -> Self {
        Self {
            concat_wait_ms: 5_000,
            concat_max_pending: 10_000,
        }
    }
}

impl SmsConfig {
    pub fn concat_wait(&self) -> Duration {
        Duration::from_millis(self.concat_wait_ms)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwilioConfig {
    pub signature_mode: SignatureMode,
    /// Auth Token(s): primary first, secondary during rotation.
    pub auth_tokens: Vec<String>,
    /// The scheme://host[:port] Twilio calls (as configured in the Twilio console); signatures
    /// are computed over it, not over the address the request arrived at.
    pub public_url: String,
    /// Text sent back to an SMS sender, `{ref}` = record reference; empty: no reply message.
    pub sms_auto_reply: String,
    /// `<Say>`/`<Gather>` language.
    pub voice_language: String,
    /// Spoken when a call comes in; the caller then presses a menu key or speaks.
    pub voice_prompt: String,
    /// Spoken after a menu key, before recording the complaint.
    pub voice_record_prompt: String,
    /// Spoken once a complaint is durable; `{ref}` = record reference.
    pub voice_confirmation: String,
    pub voice_record_max_seconds: u32,
    /// Menu key → category.
    pub ivr_menu: BTreeMap<String, String>,
}

impl Default for TwilioConfig {
    fn default() -> Self {
        let menu = [
            ("1", "network"),
            ("2", "billing"),
            ("3", "service"),
            ("4", "product"),
            ("5", "privacy"),
            ("9", "other"),
        ];
        Self {
            signature_mode: SignatureMode::Enforce,
            auth_tokens: vec!["dev-only-twilio-auth-token".into()],
            public_url: "http://127.0.0.1:8080".into(),
            sms_auto_reply: String::new(),
            voice_language: "zh-CN".into(),
            voice_prompt: "您好，投诉网络问题请按1，资费问题请按2，服务问题请按3，产品问题请按4，个人信息问题请按5，其他请按9，也可以直接说出您的问题。".into(),
            voice_record_prompt: "请在提示音后说出您的问题，说完请按井号键。".into(),
            voice_confirmation: "您的投诉已受理，编号 {ref}。感谢您的来电，再见。".into(),
            voice_record_max_seconds: 120,
            ivr_menu: menu.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VonageConfig {
    pub signature_mode: SignatureMode,
    /// md5hash, md5, sha1, sha256 or sha512, as set on the Vonage account.
    pub signature_method: String,
    /// Signature secret(s): current first, previous during rotation.
    pub secrets: Vec<String>,
    /// The signed `timestamp` must be this close to now.
    pub timestamp_tolerance_secs: u64,
}

impl Default for VonageConfig {
    fn default() -> Self {
        Self {
            signature_mode: SignatureMode::Enforce,
            signature_method: "sha256".into(),
            secrets: vec!["dev-only-vonage-signature-secret".into()],
            timestamp_tolerance_secs: 300,
        }
    }
}

/// Alibaba Cloud SMS uplink push has no signature: a secret path token plus source networks.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlibabaConfig {
    pub auth_mode: SignatureMode,
    /// The route is `/hooks/alibaba/sms/<path_token>`; use a long random value.
    pub path_token: String,
    /// Also accepted while a new `path_token` is rolled out; empty: none.
    pub previous_path_token: String,
    /// Source networks (CIDR or addresses) allowed to push; empty: any.
    pub allow_networks: Vec<String>,
}

impl Default for AlibabaConfig {
    fn default() -> Self {
        Self {
            auth_mode: SignatureMode::Enforce,
            path_token: "dev-only-alibaba-path-token".into(),
            previous_path_token: String::new(),
            allow_networks: vec!["127.0.0.0/8".into(), "::1/128".into()],
        }
    }
}

/// SMPP-to-HTTP bridges (Jasmin style) sign nothing: source networks plus an optional token.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmppConfig {
    pub auth_mode: SignatureMode,
    /// When set, the bridge must send it as `X-Switchboard-Token` or the `token` parameter.
    pub token: String,
    /// Also accepted while a new `token` is rolled out; empty: none.
    pub previous_token: String,
    pub allow_networks: Vec<String>,
}

impl Default for SmppConfig {
    fn default() -> Self {
        Self {
            auth_mode: SignatureMode::Enforce,
            token: String::new(),
            previous_token: String::new(),
            allow_networks: vec!["127.0.0.0/8".into(), "::1/128".into()],
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmailConfig {
    /// SMTP listener; set `smtp_enabled = false` to run without it.
    pub smtp_enabled: bool,
    pub smtp_listen: SocketAddr,
    /// Name in the greeting and EHLO reply.
    pub hostname: String,
    /// Addresses mail is accepted for (case-insensitive).
    pub intake_addresses: Vec<String>,
    /// Domains whose every address is accepted.
    pub intake_domains: Vec<String>,
    pub max_message_bytes: usize,
    pub max_recipients: usize,
    pub max_line_bytes: usize,
    pub command_timeout_secs: u64,
    pub data_timeout_secs: u64,
    pub max_connections: usize,
    pub max_errors: usize,
    /// Commands that move no mail (NOOP, RSET, VRFY, HELO/EHLO, HELP, ...) a session may send;
    /// past it the session is closed with 421 4.7.0 (a command flood).
    pub max_junk_commands: usize,
    /// PEM certificate chain and private key; both set: STARTTLS is offered (TLS 1.2+).
    pub tls_cert_path: String,
    pub tls_key_path: String,
    pub max_mime_depth: usize,
    pub max_mime_parts: usize,
    /// Attachment bytes are stored here by sha256; the record holds the reference.
    pub attachment_dir: PathBuf,
    /// Prefix of the attachment reference in the record (the sha256 follows).
    pub attachment_url_prefix: String,
    /// Attachment bytes one message may store; the attachments past it are recorded without
    /// their body (`omitted: "quota_message"`).
    pub attachment_max_message_bytes: u64,
    /// Attachment bytes one sender (From, else envelope sender) may store per hour
    /// (`omitted: "quota_sender"`).
    pub attachment_sender_bytes_per_hour: u64,
    /// Bytes the attachment store may hold in all (`omitted: "quota_total"`).
    pub attachment_max_total_bytes: u64,
    /// Stored attachments older than this are deleted by the retention sweep (0: kept forever).
    pub attachment_max_age_hours: u64,
    /// Free space kept on the attachment volume: an attachment that would leave less is not
    /// stored (`omitted: "disk_low"`). 0: none kept (a full disk gives `disk_full`).
    pub attachment_min_free_bytes: u64,
    /// How often the retention sweep runs (it also removes stale temp files).
    pub attachment_sweep_interval_secs: u64,
    /// DATA bytes a session keeps in memory; a larger message streams to a temp file in
    /// `data_spill_dir`.
    pub data_memory_bytes: usize,
    /// Where large messages are streamed during DATA; empty: `<attachment_dir>/.incoming` (the
    /// attachment volume, never the spool's).
    pub data_spill_dir: String,
    /// Message bytes parsed at once (MIME parsing needs the whole message in memory): a
    /// bytes-weighted semaphore; a message waits for its share (at most `data_timeout_secs`,
    /// then `452 4.3.1`).
    pub parse_memory_bytes: usize,
    /// `POST /hooks/email/inbound?token=...`: "enforce", "log_only" or "off".
    pub inbound_auth_mode: SignatureMode,
    /// Token(s) in the inbound webhook's URL (current, previous).
    pub inbound_tokens: Vec<String>,
    /// Mailgun webhook signing key(s); when a Mailgun request carries `signature`, it must match.
    pub mailgun_signing_keys: Vec<String>,
    pub ack: AckMailConfig,
    /// Implicit-TLS SMTP listener (submissions port style: TLS from the first byte) with the
    /// certificate above; empty: none.
    pub smtps_listen: String,
    /// A client must finish the TLS handshake (implicit TLS or after STARTTLS) within this time.
    pub tls_handshake_timeout_secs: u64,
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self {
            smtp_enabled: true,
            smtp_listen: "127.0.0.1:2525".parse().expect("static address"),
            hostname: "switchboard.localhost".into(),
            intake_addresses: vec!["complaints@switchboard.localhost".into()],
            intake_domains: Vec::new(),
            max_message_bytes: 25 * 1024 * 1024,
            max_recipients: 100,
            max_line_bytes: 10_000,
            command_timeout_secs: 300,
            data_timeout_secs: 180,
            max_connections: 200,
            max_errors: 10,
            max_junk_commands: 100,
            tls_cert_path: String::new(),
            tls_key_path: String::new(),
            max_mime_depth: 20,
            max_mime_parts: 500,
            attachment_dir: PathBuf::from("attachments"),
            attachment_url_prefix: "attachment:sha256:".into(),
            attachment_max_message_bytes: 10 * 1024 * 1024,
            attachment_sender_bytes_per_hour: 50 * 1024 * 1024,
            attachment_max_total_bytes: 10 * 1024 * 1024 * 1024,
            attachment_max_age_hours: 90 * 24,
            attachment_min_free_bytes: 512 * 1024 * 1024,
            attachment_sweep_interval_secs: 300,
            data_memory_bytes: 256 * 1024,
            data_spill_dir: String::new(),
            parse_memory_bytes: 64 * 1024 * 1024,
            inbound_auth_mode: SignatureMode::Enforce,
            inbound_tokens: vec!["dev-only-email-inbound-token".into()],
            mailgun_signing_keys: Vec::new(),
            ack: AckMailConfig::default(),
            smtps_listen: String::new(),
            tls_handshake_timeout_secs: 10,
        }
    }
}

/// Acknowledgement mail to complainants, sent through a relay after the record is durable.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AckMailConfig {
    pub enabled: bool,
    /// SMTP relay host:port (plain SMTP; a local MTA that relays onwards).
    pub relay: String,
    pub from: String,
    /// `{subject}`, `{ref}`, `{first_response_due}` are filled in.
    pub subject: String,
    pub body: String,
    /// Acknowledgements per recipient per hour at most (a complainant writing 50 mails gets a few).
    pub per_recipient_per_hour: u32,
    pub max_attempts: u32,
    pub queue_size: usize,
    pub retry_base_ms: u64,
}

impl Default for AckMailConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            relay: "127.0.0.1:25".into(),
            from: "Complaints <complaints@switchboard.localhost>".into(),
            subject: "Re: {subject} [{ref}]".into(),
            body: "您好，您的投诉已受理，编号 {ref}。我们将在 {first_response_due} 前答复您。\n\nHello, we have received your complaint, reference {ref}. We will respond by {first_response_due}.\n".into(),
            per_recipient_per_hour: 5,
            max_attempts: 5,
            queue_size: 10_000,
            retry_base_ms: 1_000,
        }
    }
}

/// Web chat over websockets (`GET /v1/chat`) and its widget (`GET /chat`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatConfig {
    pub enabled: bool,
    /// Serve the widget page at `GET /chat`.
    pub widget: bool,
    /// Secrets signing session tokens (HS256): the first signs, all verify (rotation). Empty: a
    /// random secret per process, so sessions cannot resume across restarts or instances.
    pub session_secrets: Vec<String>,
    pub session_ttl_secs: u64,
    /// Secrets of the operator's app that signs logged-in customers' tokens (HS256, one or two).
    pub customer_token_secrets: Vec<String>,
    /// Accept visitors without a customer token.
    pub allow_anonymous: bool,
    /// Allowed `Origin` values for the upgrade; empty allows any.
    pub allowed_origins: Vec<String>,
    /// Concurrent websocket sessions on this instance; over it the upgrade answers 503.
    pub max_sessions: usize,
    pub hello_timeout_secs: u64,
    pub heartbeat_secs: u64,
    pub idle_timeout_secs: u64,
    pub write_timeout_ms: u64,
    pub max_frame_bytes: usize,
    pub max_message_bytes: usize,
    pub max_text_chars: usize,
    pub messages_per_minute: u32,
    pub message_burst: u32,
    /// Rate-limit errors a connection may collect before it is closed with 1008.
    pub max_violations: u32,
    /// All frames (pings included) per second per connection; over it, close 1008.
    pub frames_per_second: u32,
    /// Messages of one connection being made durable at once; reading pauses beyond it.
    pub max_in_flight: usize,
    /// Consume `kafka.replies_topic` and deliver replies (needs `kafka.brokers`).
    pub replies: bool,
    pub outbox_max_replies: usize,
    pub outbox_ttl_secs: u64,
    /// Sessions whose outboxes are kept (connected or recently active); the oldest idle go first.
    pub outbox_max_sessions: usize,
    /// Reply text held across all outboxes, in bytes.
    pub outbox_max_bytes: usize,
    pub max_reply_chars: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            widget: true,
            session_secrets: Vec::new(),
            session_ttl_secs: 86_400,
            customer_token_secrets: Vec::new(),
            allow_anonymous: true,
            allowed_origins: Vec::new(),
            max_sessions: 20_000,
            hello_timeout_secs: 10,
            heartbeat_secs: 25,
            idle_timeout_secs: 1_800,
            write_timeout_ms: 5_000,
            max_frame_bytes: 16 * 1024,
            max_message_bytes: 64 * 1024,
            max_text_chars: 4_000,
            messages_per_minute: 30,
            message_burst: 10,
            max_violations: 20,
            frames_per_second: 50,
            max_in_flight: 8,
            replies: true,
            outbox_max_replies: 64,
            outbox_ttl_secs: 86_400,
            outbox_max_sessions: 100_000,
            outbox_max_bytes: 64 * 1024 * 1024,
            max_reply_chars: 4_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

fn key_err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.into(),
        message: message.into(),
    }
}

/// Debug output is the redacted TOML (`check-config`'s), so a `{:?}` or a panic message never
/// prints a secret.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match redact::to_redacted_toml(self) {
            Ok(t) => f.write_str(&t),
            Err(_) => f.write_str("Config { <unprintable> }"),
        }
    }
}

impl Config {
    /// Reads `path` (a missing file is an error: the caller chose it), applies env overrides from
    /// `env`, then validates.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::from_toml_str(&text, env).map_err(|e| match e {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        // The rule file lives beside the config: a relative path is relative to its directory.
        let rules = &cfg.triage.rules_file;
        if !rules.as_os_str().is_empty() && rules.is_relative() {
            if let Some(dir) = path.parent() {
                cfg.triage.rules_file = dir.join(rules);
            }
        }
        Ok(cfg)
    }

    pub fn from_toml_str(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let file: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: PathBuf::new(),
                message: e.to_string(),
            })?;
        // Defaults first, then the file, then env: a partial section keeps its other defaults.
        let mut table = match toml::Value::try_from(Config::default()) {
            Ok(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        merge(&mut table, file);
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            // Only SECTION__KEY names are overrides; SWITCHBOARD_CONFIG and the like are not.
            if !rest.contains("__") {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(key_err(
                    &name,
                    "env overrides look like SWITCHBOARD_<SECTION>__<KEY>",
                ));
            }
            set_path(&mut table, &path, env_value(&raw))
                .map_err(|m| key_err(&path.join("."), m))?;
        }
        let cfg: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(
            |e: serde_path_to_error::Error<toml::de::Error>| {
                let key = e.path().to_string();
                key_err(&key, e.into_inner().message().to_string())
            },
        )?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let h = &self.http;
        if h.max_connections == 0 {
            return Err(key_err("http.max_connections", "must be at least 1"));
        }
        if h.max_header_bytes < 8192 {
            return Err(key_err(
                "http.max_header_bytes",
                "must be at least 8192 (hyper's smallest read buffer)",
            ));
        }
        if h.max_headers == 0 {
            return Err(key_err("http.max_headers", "must be at least 1"));
        }
        if h.max_body_bytes == 0 {
            return Err(key_err("http.max_body_bytes", "must be at least 1"));
        }
        if h.listen_backlog == 0 {
            return Err(key_err("http.listen_backlog", "must be at least 1"));
        }
        for (k, v) in [
            ("http.header_read_timeout_ms", h.header_read_timeout_ms),
            ("http.body_read_timeout_ms", h.body_read_timeout_ms),
            (
                "http.keepalive_idle_timeout_ms",
                h.keepalive_idle_timeout_ms,
            ),
            ("sink.write_timeout_ms", self.sink.write_timeout_ms),
            ("kafka.delivery_timeout_ms", self.kafka.delivery_timeout_ms),
        ] {
            if v == 0 {
                return Err(key_err(k, "must be greater than 0"));
            }
        }
        if self.admin.max_connections == 0 {
            return Err(key_err("admin.max_connections", "must be at least 1"));
        }
        if self.admin.listen == self.http.listen && self.http.listen.port() != 0 {
            return Err(key_err("admin.listen", "must differ from http.listen"));
        }
        if self
            .identity
            .default_region
            .parse::<rlibphonenumber::enums::Region>()
            .ok()
            .filter(|r| {
                rlibphonenumber::PHONE_NUMBER_UTIL
                    .get_supported_regions()
                    .any(|s| s == *r)
            })
            .is_none()
        {
            return Err(key_err(
                "identity.default_region",
                format!(
                    "`{}` is not an ISO 3166 region code like CN or US",
                    self.identity.default_region
                ),
            ));
        }
        if self.dedupe.provider_id_window_secs == 0 {
            return Err(key_err(
                "dedupe.provider_id_window_secs",
                "must be greater than 0",
            ));
        }
        if self.dedupe.max_entries < 1024 {
            return Err(key_err("dedupe.max_entries", "must be at least 1024"));
        }
        for (k, r) in [
            ("limits.per_source", &self.limits.per_source),
            ("limits.per_channel", &self.limits.per_channel),
            ("limits.per_customer", &self.limits.per_customer),
        ] {
            if !(r.per_second.is_finite() && r.per_second > 0.0) {
                return Err(key_err(
                    &format!("{k}.per_second"),
                    "must be a positive number",
                ));
            }
            if r.burst == 0 {
                return Err(key_err(&format!("{k}.burst"), "must be at least 1"));
            }
        }
        if self.limits.evict_interval_secs == 0 {
            return Err(key_err(
                "limits.evict_interval_secs",
                "must be greater than 0",
            ));
        }
        if !matches!(
            self.kafka.compression.as_str(),
            "none" | "gzip" | "snappy" | "lz4" | "zstd"
        ) {
            return Err(key_err(
                "kafka.compression",
                "must be one of none, gzip, snappy, lz4, zstd",
            ));
        }
        if self.kafka.topic.is_empty() {
            return Err(key_err("kafka.topic", "must not be empty"));
        }
        for forced in ["enable.idempotence", "acks", "bootstrap.servers"] {
            if self.kafka.extra.contains_key(forced) {
                return Err(key_err(
                    &format!("kafka.extra.{forced}"),
                    "is set by Switchboard and cannot be overridden",
                ));
            }
        }
        if self.spool.segment_bytes < 4096 {
            return Err(key_err("spool.segment_bytes", "must be at least 4096"));
        }
        if self.spool.max_batch_records == 0 {
            return Err(key_err("spool.max_batch_records", "must be at least 1"));
        }
        if self.spool.group_commit_wait_us > 100_000 {
            return Err(key_err(
                "spool.group_commit_wait_us",
                "must be at most 100000 (100 ms): every concurrent request waits up to this long",
            ));
        }
        if self.spool.replay_max_in_flight == 0 || self.spool.replay_max_in_flight > 100_000 {
            return Err(key_err(
                "spool.replay_max_in_flight",
                "must be between 1 and 100000",
            ));
        }
        let c = &self.chat;
        for (k, v) in [
            ("chat.max_sessions", c.max_sessions as u64),
            ("chat.hello_timeout_secs", c.hello_timeout_secs),
            ("chat.heartbeat_secs", c.heartbeat_secs),
            ("chat.idle_timeout_secs", c.idle_timeout_secs),
            ("chat.write_timeout_ms", c.write_timeout_ms),
            ("chat.session_ttl_secs", c.session_ttl_secs),
            ("chat.max_text_chars", c.max_text_chars as u64),
            ("chat.messages_per_minute", c.messages_per_minute as u64),
            ("chat.message_burst", c.message_burst as u64),
            ("chat.frames_per_second", c.frames_per_second as u64),
            ("chat.max_in_flight", c.max_in_flight as u64),
            ("chat.outbox_max_replies", c.outbox_max_replies as u64),
            ("chat.outbox_ttl_secs", c.outbox_ttl_secs),
            ("chat.outbox_max_sessions", c.outbox_max_sessions as u64),
            ("chat.outbox_max_bytes", c.outbox_max_bytes as u64),
            ("chat.max_reply_chars", c.max_reply_chars as u64),
        ] {
            if v == 0 {
                return Err(key_err(k, "must be greater than 0"));
            }
        }
        if c.max_frame_bytes < 1024 || c.max_message_bytes < c.max_frame_bytes {
            return Err(key_err(
                "chat.max_message_bytes",
                "needs max_frame_bytes >= 1024 and max_message_bytes >= max_frame_bytes",
            ));
        }
        if c.session_secrets.iter().any(|s| s.len() < 32) {
            return Err(key_err(
                "chat.session_secrets",
                "each secret needs at least 32 characters",
            ));
        }
        if c.customer_token_secrets.len() > 2
            || c.customer_token_secrets.iter().any(|s| s.len() < 16)
        {
            return Err(key_err(
                "chat.customer_token_secrets",
                "one secret, or two during rotation, each at least 16 characters",
            ));
        }
        if !c.allow_anonymous && c.customer_token_secrets.is_empty() {
            return Err(key_err(
                "chat.allow_anonymous",
                "false needs chat.customer_token_secrets, or nobody could chat",
            ));
        }
        let api = &self.api;
        if api.signature_mode != SignatureMode::Off {
            if api.secrets.is_empty() || api.secrets.len() > 2 {
                return Err(key_err(
                    "api.secrets",
                    "needs one secret, or two during rotation",
                ));
            }
            if api.secrets.iter().any(|s| s.len() < 16) {
                return Err(key_err(
                    "api.secrets",
                    "each secret needs at least 16 characters",
                ));
            }
        }
        if api.max_batch == 0 {
            return Err(key_err("api.max_batch", "must be at least 1"));
        }
        let t = &self.twilio;
        if t.signature_mode != SignatureMode::Off
            && (t.auth_tokens.is_empty()
                || t.auth_tokens.len() > 2
                || t.auth_tokens.iter().any(|s| s.is_empty()))
        {
            return Err(key_err(
                "twilio.auth_tokens",
                "needs one auth token, or two during rotation",
            ));
        }
        if !(t.public_url.starts_with("http://") || t.public_url.starts_with("https://"))
            || t.public_url.trim_end_matches('/').matches('/').count() > 2
        {
            return Err(key_err(
                "twilio.public_url",
                "must be scheme://host[:port] with no path",
            ));
        }
        for (k, v) in &t.ivr_menu {
            if !CATEGORIES.contains(&v.as_str()) {
                return Err(key_err(
                    &format!("twilio.ivr_menu.{k}"),
                    format!("`{v}` is not one of {}", CATEGORIES.join(", ")),
                ));
            }
        }
        let v = &self.vonage;
        if !matches!(
            v.signature_method.as_str(),
            "md5hash" | "md5" | "sha1" | "sha256" | "sha512"
        ) {
            return Err(key_err(
                "vonage.signature_method",
                "must be md5hash, md5, sha1, sha256 or sha512",
            ));
        }
        if v.signature_mode != SignatureMode::Off
            && (v.secrets.is_empty()
                || v.secrets.len() > 2
                || v.secrets.iter().any(|s| s.is_empty()))
        {
            return Err(key_err(
                "vonage.secrets",
                "needs one secret, or two during rotation",
            ));
        }
        if self.alibaba.auth_mode != SignatureMode::Off && self.alibaba.path_token.len() < 16 {
            return Err(key_err(
                "alibaba.path_token",
                "needs at least 16 characters",
            ));
        }
        if self.alibaba.path_token.contains('/') {
            return Err(key_err("alibaba.path_token", "must not contain '/'"));
        }
        let e = &self.email;
        for (k, v) in [
            ("email.max_message_bytes", e.max_message_bytes),
            ("email.max_recipients", e.max_recipients),
            ("email.max_line_bytes", e.max_line_bytes),
            ("email.max_connections", e.max_connections),
            ("email.max_errors", e.max_errors),
            ("email.max_junk_commands", e.max_junk_commands),
            ("email.max_mime_depth", e.max_mime_depth),
            ("email.max_mime_parts", e.max_mime_parts),
            ("email.data_memory_bytes", e.data_memory_bytes),
            ("email.parse_memory_bytes", e.parse_memory_bytes),
            (
                "email.attachment_sweep_interval_secs",
                e.attachment_sweep_interval_secs as usize,
            ),
        ] {
            if v == 0 {
                return Err(key_err(k, "must be at least 1"));
            }
        }
        if e.tls_cert_path.is_empty() != e.tls_key_path.is_empty() {
            return Err(key_err(
                "email.tls_key_path",
                "set both tls_cert_path and tls_key_path, or neither",
            ));
        }
        if e.max_line_bytes < 1000 {
            return Err(key_err(
                "email.max_line_bytes",
                "must be at least 1000 (RFC 5321)",
            ));
        }
        if e.intake_addresses.is_empty() && e.intake_domains.is_empty() {
            return Err(key_err(
                "email.intake_addresses",
                "name at least one address or domain",
            ));
        }
        if e.inbound_auth_mode != SignatureMode::Off
            && e.inbound_tokens.iter().all(|t| t.len() < 16)
        {
            return Err(key_err(
                "email.inbound_tokens",
                "needs a token of 16+ characters",
            ));
        }
        if e.ack.enabled && (e.ack.relay.is_empty() || !e.ack.from.contains('@')) {
            return Err(key_err(
                "email.ack",
                "relay and from are needed when enabled",
            ));
        }
        if self.sms.concat_max_pending == 0 {
            return Err(key_err("sms.concat_max_pending", "must be at least 1"));
        }
        for (key, list) in [
            ("alibaba.allow_networks", &self.alibaba.allow_networks),
            ("smpp.allow_networks", &self.smpp.allow_networks),
        ] {
            crate::channels::Allowlist::parse(list).map_err(|m| key_err(key, m))?;
        }
        self.validate_tls()?;
        self.validate_redis()?;
        Ok(())
    }

    /// A Redis backend needs an address the client can parse; timeouts must be positive.
    fn validate_redis(&self) -> Result<(), ConfigError> {
        if !self.redis_enabled() {
            return Ok(());
        }
        let r = &self.redis;
        if r.url.is_empty() {
            let key = if self.dedupe.backend == Backend::Redis {
                "dedupe.backend"
            } else {
                "limits.backend"
            };
            return Err(key_err(key, "\"redis\" needs redis.url"));
        }
        // The message never echoes the URL: it may carry a password.
        if !(r.url.starts_with("redis://") || r.url.starts_with("redis+unix://")) {
            return Err(key_err(
                "redis.url",
                "use redis:// (this build has no TLS to Redis: keep it on a private network)",
            ));
        }
        if redis::Client::open(r.url.as_str()).is_err() {
            return Err(key_err(
                "redis.url",
                "not a Redis URL: redis://[user][:password@]host[:port][/db]",
            ));
        }
        if r.timeout_ms == 0 {
            return Err(key_err("redis.timeout_ms", "must be at least 1"));
        }
        if r.retry_after_ms == 0 {
            return Err(key_err("redis.retry_after_ms", "must be at least 1"));
        }
        Ok(())
    }

    /// Either store is kept in Redis.
    pub fn redis_enabled(&self) -> bool {
        self.dedupe.backend == Backend::Redis || self.limits.backend == Backend::Redis
    }

    /// Certificate keys come in pairs; implicit-TLS SMTP needs the email certificate. The files
    /// themselves are read at start (`tls::CertStore::open`), so a bad file names its key there.
    fn validate_tls(&self) -> Result<(), ConfigError> {
        for (section, cert, key) in [
            ("http", &self.http.tls_cert_path, &self.http.tls_key_path),
            ("admin", &self.admin.tls_cert_path, &self.admin.tls_key_path),
        ] {
            if cert.is_empty() != key.is_empty() {
                return Err(key_err(
                    &format!("{section}.tls_key_path"),
                    "set both tls_cert_path and tls_key_path, or neither",
                ));
            }
        }
        if self.http.tls_handshake_timeout_ms == 0 {
            return Err(key_err(
                "http.tls_handshake_timeout_ms",
                "must be greater than 0",
            ));
        }
        let e = &self.email;
        if e.tls_handshake_timeout_secs == 0 {
            return Err(key_err(
                "email.tls_handshake_timeout_secs",
                "must be greater than 0",
            ));
        }
        if let Some(addr) = e.smtps_addr()? {
            if e.tls_cert_path.is_empty() {
                return Err(key_err(
                    "email.smtps_listen",
                    "needs email.tls_cert_path and email.tls_key_path",
                ));
            }
            if e.smtp_enabled && addr == e.smtp_listen && addr.port() != 0 {
                return Err(key_err(
                    "email.smtps_listen",
                    "must differ from smtp_listen",
                ));
            }
        }
        Ok(())
    }

    pub fn kafka_enabled(&self) -> bool {
        !self.kafka.brokers.trim().is_empty()
    }
}

impl EmailConfig {
    /// The implicit-TLS SMTP address, if one is configured.
    pub fn smtps_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let raw = self.smtps_listen.trim();
        if raw.is_empty() {
            return Ok(None);
        }
        raw.parse().map(Some).map_err(|_| {
            key_err(
                "email.smtps_listen",
                format!("`{raw}` is not an address like 127.0.0.1:4650 (empty: no listener)"),
            )
        })
    }

    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.tls_handshake_timeout_secs)
    }

    /// Where DATA larger than `data_memory_bytes` is streamed.
    pub fn data_spill_dir(&self) -> PathBuf {
        match self.data_spill_dir.trim() {
            "" => self.attachment_dir.join(".incoming"),
            d => PathBuf::from(d),
        }
    }
}

impl HttpConfig {
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms)
    }
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }
    pub fn keepalive_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.keepalive_idle_timeout_ms)
    }
}

/// An env value is read as a TOML value when it is one (numbers, booleans, arrays, quoted
/// strings), otherwise as a bare string, so `127.0.0.1:9092` needs no quotes.
fn env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().expect("path has at least two parts");
    let mut cur = table;
    for p in parents {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a section"))?;
    }
    // A string override of a field that the file holds as a number keeps its string form so the
    // type error names the key; numbers written for string fields are turned back into strings.
    let value = match (cur.get(last), value) {
        (Some(toml::Value::String(_)), v @ (toml::Value::Integer(_) | toml::Value::Float(_))) => {
            toml::Value::String(v.to_string())
        }
        (_, v) => v,
    };
    cur.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_config_is_valid_and_matches_defaults() {
        let text = include_str!("../config/switchboard.toml");
        let cfg = Config::from_toml_str(text, env(&[])).expect("shipped config");
        let def = Config::default();
        assert_eq!(cfg.http.listen, def.http.listen);
        assert_eq!(cfg.admin.listen, def.admin.listen);
        assert_eq!(cfg.dedupe.provider_id_window_secs, 8 * 24 * 3600);
        assert!(!cfg.kafka_enabled(), "shipped config runs on the spool");
        // The shipped rule file is the one compiled in, and it checks out.
        assert_eq!(cfg.triage.rules_file, Path::new("triage.toml"));
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/switchboard.toml");
        let loaded = Config::load(&path, env(&[])).unwrap();
        assert_eq!(
            loaded.triage.rules_file,
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/triage.toml")
        );
        let shipped = std::fs::read_to_string(&loaded.triage.rules_file).unwrap();
        assert_eq!(shipped, crate::triage::DEFAULT_RULES);
        crate::triage::Triager::check(&TriageConfig::default()).unwrap();
    }

    #[test]
    fn redis_backends_need_a_redis_url() {
        assert_eq!(Config::default().dedupe.backend, Backend::Memory);
        assert_eq!(Config::default().limits.backend, Backend::Memory);
        assert!(!Config::default().redis_enabled());
        let e = Config::from_toml_str("[dedupe]\nbackend = \"redis\"\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("dedupe.backend") && e.contains("redis.url"),
            "{e}"
        );
        let e = Config::from_toml_str("[limits]\nbackend = \"redis\"\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.backend"), "{e}");
        let e = Config::from_toml_str(
            "[limits]\nbackend = \"redis\"\n[redis]\nurl = \"rediss://:pw@h\"\n",
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("redis.url") && !e.contains("pw"), "{e}");
        let e = Config::from_toml_str("[dedupe]\nbackend = \"valkey\"\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dedupe.backend"), "{e}");
        let cfg = Config::from_toml_str(
            "",
            env(&[
                ("SWITCHBOARD_DEDUPE__BACKEND", "redis"),
                ("SWITCHBOARD_LIMITS__BACKEND", "redis"),
                ("SWITCHBOARD_REDIS__URL", "redis://127.0.0.1:6379/0"),
                ("SWITCHBOARD_REDIS__TIMEOUT_MS", "20"),
            ]),
        )
        .unwrap();
        assert!(cfg.redis_enabled());
        assert_eq!(cfg.redis.timeout_ms, 20);
        assert_eq!(cfg.redis.key_prefix, "switchboard:");
    }

    #[test]
    fn env_overrides_nested_keys_with_types() {
        let cfg = Config::from_toml_str(
            "",
            env(&[
                ("SWITCHBOARD_HTTP__LISTEN", "127.0.0.1:18080"),
                ("SWITCHBOARD_KAFKA__BROKERS", "127.0.0.1:9092"),
                ("SWITCHBOARD_HTTP__MAX_CONNECTIONS", "7"),
                ("SWITCHBOARD_LIMITS__PER_CUSTOMER__BURST", "3"),
                (
                    "SWITCHBOARD_API__SECRETS",
                    r#"["aaaaaaaaaaaaaaaa","bbbbbbbbbbbbbbbb"]"#,
                ),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.http.listen.port(), 18080);
        assert_eq!(cfg.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(cfg.http.max_connections, 7);
        assert_eq!(cfg.limits.per_customer.burst, 3);
        assert_eq!(cfg.api.secrets.len(), 2);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = Config::from_toml_str("[http]\nmax_connections = \"many\"\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.max_connections"), "{e}");
        let e = Config::from_toml_str("[http]\nmax_conections = 5\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_conections"), "{e}");
        let e = Config::from_toml_str("", env(&[("SWITCHBOARD_HTTP__LISTEN", "nowhere")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.listen"), "{e}");
        let e = Config::from_toml_str("[identity]\ndefault_region = \"XX\"\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("identity.default_region"), "{e}");
        let e = Config::from_toml_str("[api]\nsecrets = [\"a\",\"b\",\"c\"]\n", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("api.secrets"), "{e}");
        let e = Config::from_toml_str(
            "[kafka.extra]\n\"enable.idempotence\" = \"false\"\n",
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("enable.idempotence"), "{e}");
    }

    #[test]
    fn tls_keys_are_checked_in_pairs_and_smtps_needs_a_certificate() {
        let err = |toml: &str, vars: &[(&str, &str)]| {
            Config::from_toml_str(toml, env(vars))
                .unwrap_err()
                .to_string()
        };
        let e = err("[http]\ntls_cert_path = \"c.pem\"\n", &[]);
        assert!(e.contains("http.tls_key_path"), "{e}");
        let e = err("", &[("SWITCHBOARD_ADMIN__TLS_KEY_PATH", "k.pem")]);
        assert!(e.contains("admin.tls_key_path"), "{e}");
        let e = err("[email]\nsmtps_listen = \"127.0.0.1:4650\"\n", &[]);
        assert!(
            e.contains("email.smtps_listen") && e.contains("tls_cert_path"),
            "{e}"
        );
        let e = err("[email]\nsmtps_listen = \"port 465\"\n", &[]);
        assert!(e.contains("email.smtps_listen"), "{e}");
        let e = err("[http]\ntls_handshake_timeout_ms = 0\n", &[]);
        assert!(e.contains("http.tls_handshake_timeout_ms"), "{e}");
        let cfg = Config::from_toml_str(
            "",
            env(&[
                ("SWITCHBOARD_EMAIL__SMTPS_LISTEN", "127.0.0.1:4650"),
                ("SWITCHBOARD_EMAIL__TLS_CERT_PATH", "c.pem"),
                ("SWITCHBOARD_EMAIL__TLS_KEY_PATH", "k.pem"),
            ]),
        )
        .unwrap();
        assert_eq!(
            cfg.email.smtps_addr().unwrap(),
            Some("127.0.0.1:4650".parse().unwrap())
        );
        assert_eq!(Config::default().email.smtps_addr().unwrap(), None);
    }
}
