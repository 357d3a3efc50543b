//! Reports of a run: machine-readable JSON (`--out`), a self-contained HTML page with inline
//! SVG charts (`--html`: no scripts, no network), and a short table on stdout.

use crate::channels::Channel;
use crate::chat::ChatStats;
use crate::resources::ResourceReport;
use crate::run::{Mode, RunConfig, RunResult};
use crate::stats::{ChannelStats, SecondPoint};
use crate::util::fmt_us;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub started_at_unix_ms: u64,
    pub config: ConfigReport,
    /// The measured window after warm-up, in seconds (shorter than `duration` if interrupted).
    pub measured_secs: f64,
    /// Requests attempted, warm-up included.
    pub sent: u64,
    pub interrupted: bool,
    pub total: ChannelReport,
    pub channels: BTreeMap<String, ChannelReport>,
    /// One point per second of the measured window, by completion time.
    pub timeseries: Vec<SecondPoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked: Option<AckedReport>,
    /// The SMTP pool (when `smtp` is in the mix).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smtp: Option<SmtpReport>,
    /// The chat sessions (with `--chat-sessions`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatReport>,
    /// The gateway's RSS and CPU (with `--gateway-pid`) and the harness's CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceReport>,
    /// RLIMIT_NOFILE of the harness.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_descriptors: Option<FdReport>,
}

#[derive(Debug, Serialize)]
pub struct SmtpReport {
    pub target: String,
    pub connections: usize,
    /// Connections opened over the run (more than `connections` after drops and reconnects).
    pub opened: u64,
    pub mail_size: usize,
    pub encoding: &'static str,
    pub attachment_ratio: f64,
    /// Whether messages went with PIPELINING: `yes`, `no` (not advertised or turned off), or
    /// `partly`.
    pub pipelining: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ChatReport {
    pub url: String,
    pub sessions: usize,
    pub rate_per_session: f64,
    /// sessions × rate.
    pub offered_per_sec: f64,
    pub connect_rate: f64,
    /// `anonymous` or `customer_token`.
    pub hello: &'static str,
    pub connected: u64,
    /// Sessions that did not get to `welcome`, by kind: connect, timeout, http_<status>,
    /// hello_<error code>, closed_<code>, dropped.
    pub connect_failures: BTreeMap<String, u64>,
    /// Upgrade + hello to welcome, microseconds.
    pub connect_latency_us: Latency,
    /// How connected sessions ended: `ended` (closed by the harness after the run), a close
    /// code from the gateway, or `dropped` (no close frame).
    pub closes: BTreeMap<String, u64>,
    /// Messages due in the measured window with an outcome (answered or not).
    pub count: u64,
    pub acked: u64,
    /// Error frames for messages, by code (rate_limited, unavailable, invalid, ...).
    pub errors: BTreeMap<String, u64>,
    /// Error frames naming no message, by code.
    pub other_errors: BTreeMap<String, u64>,
    /// Sent but neither acked nor refused before the session ended (`--timeout` after the run).
    pub unanswered: u64,
    pub dup_sent: u64,
    /// Acks with `duplicate: true`.
    pub duplicate_acks: u64,
    pub acks_per_sec: f64,
    /// Due time to the ack frame, microseconds (HdrHistogram, 3 significant digits).
    pub ack_latency_us: Latency,
    pub distribution: Vec<DistPoint>,
    pub timeseries: Vec<SecondPoint>,
}

#[derive(Debug, Serialize)]
pub struct FdReport {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
    pub needed: u64,
}

/// The run's settings (secrets are left out).
#[derive(Debug, Serialize)]
pub struct ConfigReport {
    pub target: String,
    /// `open` (fixed rate), `closed` (back-to-back workers) or `none` (`--mix none`: chat only).
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    pub duration_secs: f64,
    pub warmup_secs: f64,
    pub mix: String,
    pub dup_ratio: f64,
    pub timeout_secs: f64,
    pub max_in_flight: usize,
    pub meta_batch: usize,
    pub twilio_url: String,
    pub wechat_account: String,
}

#[derive(Debug, Serialize)]
pub struct AckedReport {
    pub path: String,
    pub lines: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct DistPoint {
    /// Quantile in [0, 1].
    pub quantile: f64,
    /// 1 / (1 - quantile): the x axis of an HdrHistogram percentile plot.
    pub inverse: f64,
    pub value_us: u64,
}

#[derive(Debug, Serialize)]
pub struct ChannelReport {
    /// Outcomes (answers and errors, `client_overload` included).
    pub count: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Everything else: non-2xx answers plus transport errors.
    pub errors: u64,
    /// Answers by HTTP status.
    pub status: BTreeMap<String, u64>,
    /// Requests with no answer, by kind: connect, timeout, client_overload, request, body.
    pub error_kinds: BTreeMap<String, u64>,
    /// Re-sent earlier payloads (`--dup-ratio`).
    pub dup_sent: u64,
    /// Answers saying `"duplicate": true` (only the events route reports it).
    pub duplicate_answers: u64,
    /// Outcomes per second over the measured window.
    pub throughput_rps: f64,
    /// 2xx answers per second.
    pub ok_rps: f64,
    /// Latency of every HTTP answer, microseconds (HdrHistogram, 3 significant digits).
    pub latency_us: Latency,
    /// The percentile distribution for plotting.
    pub distribution: Vec<DistPoint>,
}

fn latency(s: &ChannelStats) -> Latency {
    latency_of(&s.hist)
}

fn latency_of(h: &Histogram<u64>) -> Latency {
    let q = |q| h.value_at_quantile(q);
    if h.is_empty() {
        return Latency {
            count: 0,
            min: 0,
            mean: 0.0,
            p50: 0,
            p90: 0,
            p99: 0,
            p999: 0,
            max: 0,
        };
    }
    Latency {
        count: h.len(),
        min: h.min(),
        mean: (h.mean() * 10.0).round() / 10.0,
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        p999: q(0.999),
        max: h.max(),
    }
}

/// Points at 1/(1-q) = 10^(k/20), up to where the histogram runs out of samples, plus the max.
pub fn distribution(s: &ChannelStats) -> Vec<DistPoint> {
    distribution_of(&s.hist)
}

pub fn distribution_of(h: &Histogram<u64>) -> Vec<DistPoint> {
    let mut out = Vec::new();
    if h.is_empty() {
        return out;
    }
    let limit = (h.len() as f64).clamp(1.0, 1e6);
    let mut k = 0u32;
    loop {
        let inverse = 10f64.powf(f64::from(k) / 20.0);
        if inverse > limit {
            break;
        }
        let quantile = 1.0 - 1.0 / inverse;
        out.push(DistPoint {
            quantile,
            inverse,
            value_us: h.value_at_quantile(quantile),
        });
        k += 1;
    }
    out.push(DistPoint {
        quantile: 1.0,
        inverse: limit.max(out.last().map_or(1.0, |p| p.inverse)),
        value_us: h.max(),
    });
    out
}

fn channel_report(s: &ChannelStats, secs: f64) -> ChannelReport {
    let per_sec = |n: u64| per_sec(n, secs);
    ChannelReport {
        count: s.count,
        ok: s.ok,
        errors: s.errors_total(),
        status: s
            .statuses
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        error_kinds: s.errors.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        dup_sent: s.dup_sent,
        duplicate_answers: s.duplicate_answers,
        throughput_rps: per_sec(s.count),
        ok_rps: per_sec(s.ok),
        latency_us: latency(s),
        distribution: distribution(s),
    }
}

fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        ((n as f64 / secs) * 10.0).round() / 10.0
    } else {
        0.0
    }
}

fn chat_report(cfg: &crate::chat::ChatSettings, c: &ChatStats, secs: f64) -> ChatReport {
    ChatReport {
        url: cfg.url.clone(),
        sessions: c.sessions,
        rate_per_session: c.rate,
        offered_per_sec: (c.sessions as f64 * c.rate * 10.0).round() / 10.0,
        connect_rate: cfg.connect_rate,
        hello: if cfg.customer_secret.is_some() {
            "customer_token"
        } else {
            "anonymous"
        },
        connected: c.connected,
        connect_failures: c.connect_failures.clone(),
        connect_latency_us: latency_of(&c.connect_hist),
        closes: c.closes.clone(),
        count: c.count,
        acked: c.acked,
        errors: c.errors.clone(),
        other_errors: c.stray_errors.clone(),
        unanswered: c.unanswered,
        dup_sent: c.dup_sent,
        duplicate_acks: c.duplicate_acks,
        acks_per_sec: per_sec(c.acked, secs),
        ack_latency_us: latency_of(&c.hist),
        distribution: distribution_of(&c.hist),
        timeseries: c.points.clone(),
    }
}

/// The request series with the resource samples of each second merged in (seconds with only
/// samples get empty request points).
fn merge_resources(mut ts: Vec<SecondPoint>, res: Option<&ResourceReport>) -> Vec<SecondPoint> {
    let Some(res) = res else { return ts };
    for p in &res.series {
        let i = p.second as usize;
        while ts.len() <= i {
            let next = ts.len() as u64;
            ts.push(SecondPoint::empty(next));
        }
        if let Some(t) = ts.iter_mut().find(|t| t.second == p.second) {
            t.resources = p.sample;
        }
    }
    ts
}

pub fn build(cfg: &RunConfig, r: &RunResult, started_at_unix_ms: u64) -> Report {
    let secs = r.measured.as_secs_f64();
    let (mode, rate, concurrency) = match cfg.mode {
        _ if cfg.mix.is_none() => ("none", None, None),
        Mode::Open { rate } => ("open", Some(rate), None),
        Mode::Closed { concurrency } => ("closed", None, Some(concurrency)),
    };
    let channels = Channel::ALL
        .iter()
        .filter(|c| cfg.mix.contains(**c))
        .map(|c| {
            (
                c.name().to_string(),
                channel_report(&r.stats.channels[c.index()], secs),
            )
        })
        .collect();
    Report {
        tool: "switchboard-loadtest",
        version: env!("CARGO_PKG_VERSION"),
        started_at_unix_ms,
        config: ConfigReport {
            target: cfg.target.clone(),
            mode,
            rate,
            concurrency,
            duration_secs: cfg.duration.as_secs_f64(),
            warmup_secs: cfg.warmup.as_secs_f64(),
            mix: cfg.mix.describe(),
            dup_ratio: cfg.dup_ratio,
            timeout_secs: cfg.timeout.as_secs_f64(),
            max_in_flight: cfg.max_in_flight,
            meta_batch: cfg.meta_batch,
            twilio_url: cfg.secrets.twilio_url.clone(),
            wechat_account: cfg.wechat_account.clone(),
        },
        measured_secs: (secs * 1000.0).round() / 1000.0,
        sent: r.sent,
        interrupted: r.interrupted,
        total: channel_report(&r.stats.total, secs),
        channels,
        timeseries: merge_resources(r.stats.series.clone(), r.resources.as_ref()),
        acked: cfg.acked.as_ref().map(|p| AckedReport {
            path: p.display().to_string(),
            lines: r.acked_written,
            error: r.acked_error.clone(),
        }),
        smtp: match (&cfg.smtp, &r.smtp) {
            (Some(c), Some(s)) => Some(SmtpReport {
                target: c.addr.clone(),
                connections: c.connections,
                opened: s.opened,
                mail_size: c.mail.size,
                encoding: c.mail.encoding.name(),
                attachment_ratio: c.mail.attachment_ratio,
                pipelining: match (s.pipelined, s.unpipelined) {
                    (true, false) => "yes",
                    (false, true) => "no",
                    (true, true) => "partly",
                    (false, false) => "none sent",
                },
            }),
            _ => None,
        },
        chat: match (&cfg.chat, &r.stats.chat) {
            (Some(c), Some(s)) => Some(chat_report(c, s, secs)),
            _ => None,
        },
        resources: r.resources.clone(),
        file_descriptors: r.fds.map(|f| FdReport {
            soft_before: f.before,
            soft: f.after,
            hard: f.hard,
            needed: f.needed,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Text summary

fn kv(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// "open loop at R req/s" or "closed loop with N workers".
fn mode(c: &ConfigReport) -> String {
    match (c.rate, c.concurrency) {
        (Some(r), _) => format!("open loop at {r} req/s"),
        (_, Some(n)) => format!("closed loop with {n} workers"),
        _ => "chat sessions only".into(),
    }
}

pub fn summary(rep: &Report) -> String {
    let mut s = String::new();
    let c = &rep.config;
    let how = mode(c);
    let _ = writeln!(
        s,
        "\n{} → {how}, {:.1}s measured after {:.1}s warm-up, mix {}{}",
        c.target,
        rep.measured_secs,
        c.warmup_secs,
        c.mix,
        if rep.interrupted {
            " (interrupted)"
        } else {
            ""
        }
    );
    if !rep.channels.is_empty() {
        request_table(rep, &mut s);
    }
    if let Some(m) = &rep.smtp {
        let _ = writeln!(
            s,
            "smtp: {} connections to {} (opened {}), {}-byte mails ({}, attachments {}), pipelining {}",
            m.connections, m.target, m.opened, m.mail_size, m.encoding, m.attachment_ratio, m.pipelining
        );
    }
    if let Some(c) = &rep.chat {
        s.push_str(&chat_summary(c));
    }
    if let Some(r) = &rep.resources {
        s.push_str(&resources_summary(r));
    }
    if let Some(a) = &rep.acked {
        let _ = writeln!(s, "acked: {} lines in {}", a.lines, a.path);
        if let Some(e) = &a.error {
            let _ = writeln!(s, "acked: WRITE FAILED: {e}");
        }
    }
    s
}

fn request_table(rep: &Report, s: &mut String) {
    let _ = writeln!(
        s,
        "{:<8} {:>9} {:>9} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "channel", "count", "ok", "errors", "req/s", "p50", "p90", "p99", "p99.9", "max"
    );
    let mut row = |name: &str, r: &ChannelReport| {
        let l = &r.latency_us;
        let _ = writeln!(
            s,
            "{:<8} {:>9} {:>9} {:>7} {:>9.1} {:>8} {:>8} {:>8} {:>8} {:>8}",
            name,
            r.count,
            r.ok,
            r.errors,
            r.throughput_rps,
            fmt_us(l.p50),
            fmt_us(l.p90),
            fmt_us(l.p99),
            fmt_us(l.p999),
            fmt_us(l.max)
        );
    };
    for (name, r) in &rep.channels {
        row(name, r);
    }
    row("total", &rep.total);
    for (name, r) in rep
        .channels
        .iter()
        .chain(std::iter::once((&"total".to_string(), &rep.total)))
    {
        let mut parts = Vec::new();
        if !r.status.is_empty() {
            parts.push(format!("status {}", kv(&r.status)));
        }
        if !r.error_kinds.is_empty() {
            parts.push(format!("errors {}", kv(&r.error_kinds)));
        }
        if r.dup_sent > 0 || r.duplicate_answers > 0 {
            parts.push(format!(
                "dups sent {} answered duplicate {}",
                r.dup_sent, r.duplicate_answers
            ));
        }
        if !parts.is_empty() {
            let _ = writeln!(s, "  {name}: {}", parts.join("; "));
        }
    }
}

fn lat_line(l: &Latency) -> String {
    format!(
        "p50 {} p90 {} p99 {} p99.9 {} max {}",
        fmt_us(l.p50),
        fmt_us(l.p90),
        fmt_us(l.p99),
        fmt_us(l.p999),
        fmt_us(l.max)
    )
}

fn chat_summary(c: &ChatReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "chat: {} sessions ({}) × {}/s = {}/s offered; connected {}{}; connect {}",
        c.sessions,
        c.hello,
        c.rate_per_session,
        c.offered_per_sec,
        c.connected,
        if c.connect_failures.is_empty() {
            String::new()
        } else {
            format!(", failed {}", kv(&c.connect_failures))
        },
        lat_line(&c.connect_latency_us)
    );
    let _ = writeln!(
        s,
        "chat: {} messages, acked {} ({}/s), ack {}",
        c.count,
        c.acked,
        c.acks_per_sec,
        lat_line(&c.ack_latency_us)
    );
    let mut parts = Vec::new();
    if !c.errors.is_empty() {
        parts.push(format!("errors {}", kv(&c.errors)));
    }
    if !c.other_errors.is_empty() {
        parts.push(format!("other errors {}", kv(&c.other_errors)));
    }
    if c.unanswered > 0 {
        parts.push(format!("UNANSWERED {}", c.unanswered));
    }
    if c.dup_sent > 0 || c.duplicate_acks > 0 {
        parts.push(format!(
            "dups sent {} acked duplicate {}",
            c.dup_sent, c.duplicate_acks
        ));
    }
    parts.push(format!("closes {}", kv(&c.closes)));
    let _ = writeln!(s, "  chat: {}", parts.join("; "));
    s
}

fn resources_summary(r: &ResourceReport) -> String {
    let mut s = String::new();
    if let Some(pid) = r.gateway_pid {
        let rss = r
            .gateway_rss_mb
            .as_ref()
            .map(|m| {
                format!(
                    "RSS start {:.1} MB, end {:.1}, min {:.1}, max {:.1}, slope {} MB/min",
                    m.start,
                    m.end,
                    m.min,
                    m.max,
                    m.slope_mb_per_min
                        .map_or("-".to_string(), |v| format!("{v:+.2}"))
                )
            })
            .unwrap_or_else(|| "no RSS samples".into());
        let cpu = r
            .gateway_cpu_cores
            .map_or("-".to_string(), |c| format!("{c:.2}"));
        let _ = writeln!(
            s,
            "gateway (pid {pid}): {rss}; CPU {cpu} cores{}",
            if r.gateway_exited {
                "; THE PROCESS EXITED DURING THE RUN"
            } else {
                ""
            }
        );
    }
    if let Some(c) = r.loadgen_cpu_cores {
        let _ = writeln!(s, "harness: CPU {c:.2} cores");
    }
    s
}

/// Advice for answers that point at the gateway's configuration rather than at its capacity.
pub fn hints(rep: &Report) -> Vec<String> {
    let mut out = Vec::new();
    for (name, r) in &rep.channels {
        let n404 = r.status.get("404").copied().unwrap_or(0);
        let n403 =
            r.status.get("403").copied().unwrap_or(0) + r.status.get("401").copied().unwrap_or(0);
        if n404 > 0 && r.ok == 0 {
            let how = match name.as_str() {
                "meta" => "the gateway ships with Meta off: start it with SWITCHBOARD_META__APP_SECRETS='[\"<--meta-app-secret>\"]'",
                "wechat" => "the gateway ships with WeChat off: start it with SWITCHBOARD_WECHAT__TOKENS='[\"<--wechat-token>\"]'",
                _ => "check --target",
            };
            out.push(format!("{name}: every answer was 404; {how}"));
        }
        if n403 > 0 {
            let how = match name.as_str() {
                "events" => "--api-secret must be one of the gateway's api.secrets (SWITCHBOARD_API__SECRETS); clocks must agree within 300 s",
                "twilio" => "--twilio-auth-token must match twilio.auth_tokens and --twilio-url the gateway's twilio.public_url (SWITCHBOARD_TWILIO__PUBLIC_URL)",
                "meta" => "--meta-app-secret must be one of meta.app_secrets (SWITCHBOARD_META__APP_SECRETS)",
                "wechat" => "--wechat-token must be one of wechat.tokens (SWITCHBOARD_WECHAT__TOKENS) and wechat.encryption must be plain",
                _ => "",
            };
            out.push(format!(
                "{name}: {n403} answers refused the signature; {how}"
            ));
        }
    }
    if let Some(m) = rep.channels.get("smtp") {
        let n = |c: &str| m.status.get(c).copied().unwrap_or(0);
        if n("550") > 0 {
            out.push(format!("smtp: {} mails refused with 550 (recipient not accepted): --smtp-rcpt must be one of the gateway's email.intake_addresses or in email.intake_domains", n("550")));
        }
        if n("451") > 0 {
            out.push(format!("smtp: {} mails deferred with 451 (rate limited or the sink unavailable): raise SWITCHBOARD_LIMITS__PER_SOURCE__PER_SECOND / ..._BURST (the source limit covers SMTP too)", n("451")));
        }
        if n("421") > 0 || m.error_kinds.contains_key("protocol") {
            out.push("smtp: 421 or unreadable greetings: the gateway closes a connection after email.max_errors (10) refused commands (see the other statuses) and refuses connections over email.max_connections (200; raise SWITCHBOARD_EMAIL__MAX_CONNECTIONS above --smtp-connections)".into());
        }
        if n("552") > 0 {
            out.push(
                "smtp: 552 message too large: --smtp-size is above email.max_message_bytes".into(),
            );
        }
        if m.error_kinds.contains_key("connect") {
            out.push(
                "smtp: connections refused: check --smtp-target and that email.smtp_enabled is on"
                    .into(),
            );
        }
    }
    if let Some(c) = &rep.chat {
        let f = |k: &str| c.connect_failures.get(k).copied().unwrap_or(0);
        if f("http_429") > 0 {
            out.push(format!("chat: {} upgrades refused with 429: the per-source limit covers upgrades; raise SWITCHBOARD_LIMITS__PER_SOURCE__PER_SECOND / ..._BURST or lower --chat-connect-rate", f("http_429")));
        }
        if f("http_503") > 0 || f("dropped") > 0 || f("connect") > 0 {
            out.push("chat: upgrades refused or dropped: the gateway caps sessions at chat.max_sessions (20000) and HTTP connections at http.max_connections (10000), and its own fd limit applies; raise SWITCHBOARD_CHAT__MAX_SESSIONS, SWITCHBOARD_HTTP__MAX_CONNECTIONS and `ulimit -n` for the gateway".into());
        }
        if f("http_403") > 0 {
            out.push("chat: upgrades refused with 403: the gateway has chat.allowed_origins; pass one as --chat-origin".into());
        }
        if c.connect_failures.keys().any(|k| k.starts_with("hello_")) {
            out.push("chat: hellos refused: without chat.allow_anonymous pass --chat-customer-secret (one of chat.customer_token_secrets)".into());
        }
        if let Some(n) = c.errors.get("rate_limited") {
            out.push(format!("chat: {n} messages rate_limited: per connection the gateway allows chat.messages_per_minute (30, burst 10) and per customer limits.per_customer (0.5/s, burst 20); for --chat-rate above 0.5 raise SWITCHBOARD_CHAT__MESSAGES_PER_MINUTE, SWITCHBOARD_CHAT__MESSAGE_BURST and SWITCHBOARD_LIMITS__PER_CUSTOMER__PER_SECOND"));
        }
        if c.closes.get("1008").is_some_and(|n| *n > 0) {
            out.push("chat: sessions closed with 1008 (policy): too many rate-limit errors (chat.max_violations) or frames (chat.frames_per_second)".into());
        }
    }
    if let Some(n) = rep.total.status.get("429").filter(|n| **n > 0) {
        out.push(format!(
            "{n} answers were 429 rate_limited: the gateway limits each source address (limits.per_source, 500/s burst 2000 by default); for load tests raise it (SWITCHBOARD_LIMITS__PER_SOURCE__PER_SECOND, ..._BURST) or set SWITCHBOARD_LIMITS__ENABLED=false"
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HTML

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Ticks at 1, 2 or 5 × 10^k covering `0..=max`; returns the ticks and the axis top.
pub fn nice_ticks(max: f64, target: usize) -> (Vec<f64>, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let top = (max / step).ceil() * step;
    let n = (top / step).round() as usize;
    ((0..=n).map(|i| i as f64 * step).collect(), top)
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
    dashed: bool,
}

struct Axis {
    label: String,
    min: f64,
    max: f64,
    ticks: Vec<(f64, String)>,
}

const COLORS: &[&str] = &["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728"];

/// A shaded band over part of the x axis, with a label.
struct Band<'a> {
    from: f64,
    to: f64,
    label: &'a str,
}

fn svg_chart(title: &str, x: &Axis, y: &Axis, series: &[Series], band: Option<Band>) -> String {
    let (w, h) = (860.0, 340.0);
    let (l, r, t, b) = (70.0, 150.0, 34.0, 48.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let sx = |v: f64| {
        let span = (x.max - x.min).max(1e-12);
        l + (v - x.min) / span * pw
    };
    let sy = |v: f64| {
        let span = (y.max - y.min).max(1e-12);
        t + ph - (v.clamp(y.min, y.max) - y.min) / span * ph
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{t_esc}"><rect width="100%" height="100%" fill="#fff"/><text x="{l}" y="20" font-size="15" font-weight="bold">{t_esc}</text>"##,
        t_esc = esc(title)
    );
    if let Some(b) = band {
        let (x0, x1) = (sx(b.from.max(x.min)), sx(b.to.min(x.max)));
        if x1 > x0 {
            let _ = write!(
                s,
                r##"<rect x="{x0:.1}" y="{t}" width="{w:.1}" height="{ph}" fill="#f0f0f0"/><text x="{tx:.1}" y="{ty}" font-size="10" fill="#777">{lab}</text>"##,
                w = x1 - x0,
                tx = x0 + 3.0,
                ty = t + 12.0,
                lab = esc(b.label)
            );
        }
    }
    for (v, label) in &y.ticks {
        let yy = sy(*v);
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e3e3e3"/><text x="{tx}" y="{ty:.1}" font-size="11" text-anchor="end">{lab}</text>"##,
            x2 = l + pw,
            tx = l - 6.0,
            ty = yy + 4.0,
            lab = esc(label)
        );
    }
    for (v, label) in &x.ticks {
        let xx = sx(*v);
        let _ = write!(
            s,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{t}" y2="{y2}" stroke="#eeeeee"/><text x="{xx:.1}" y="{ty}" font-size="11" text-anchor="middle">{lab}</text>"##,
            y2 = t + ph,
            ty = t + ph + 16.0,
            lab = esc(label)
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#888"/><text x="{cx}" y="{by}" font-size="12" text-anchor="middle">{xl}</text><text transform="translate(16,{cy}) rotate(-90)" font-size="12" text-anchor="middle">{yl}</text>"##,
        cx = l + pw / 2.0,
        by = h - 8.0,
        cy = t + ph / 2.0,
        xl = esc(&x.label),
        yl = esc(&y.label)
    );
    for (i, se) in series.iter().enumerate() {
        if !se.points.is_empty() {
            let pts: Vec<String> = se
                .points
                .iter()
                .map(|(a, b)| format!("{:.1},{:.1}", sx(*a), sy(*b)))
                .collect();
            let dash = if se.dashed {
                r#" stroke-dasharray="5,3""#
            } else {
                ""
            };
            let _ = write!(
                s,
                r##"<polyline fill="none" stroke="{c}" stroke-width="1.8"{dash} points="{p}"><title>{n}</title></polyline>"##,
                c = se.color,
                p = pts.join(" "),
                n = esc(se.name)
            );
        }
        let ly = t + 14.0 + i as f64 * 18.0;
        let lx = l + pw + 12.0;
        let _ = write!(
            s,
            r##"<line x1="{lx}" x2="{lx2}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2.5"/><text x="{tx}" y="{ty}" font-size="12">{n}</text>"##,
            lx2 = lx + 20.0,
            tx = lx + 26.0,
            ty = ly + 4.0,
            c = se.color,
            n = esc(se.name)
        );
    }
    s.push_str("</svg>");
    s
}

fn ms_axis(label: &str, max_us: u64) -> Axis {
    let (ticks, top) = nice_ticks(max_us as f64 / 1000.0, 6);
    Axis {
        label: label.into(),
        min: 0.0,
        max: top,
        ticks: ticks.into_iter().map(|v| (v, fmt_num(v))).collect(),
    }
}

fn seconds_axis(n: usize) -> Axis {
    let (ticks, top) = nice_ticks(n.max(1) as f64, 10);
    Axis {
        label: "seconds after warm-up (by completion time)".into(),
        min: 0.0,
        max: top,
        ticks: ticks.into_iter().map(|v| (v, fmt_num(v))).collect(),
    }
}

/// The seconds after the last send: only answers still in flight complete there.
fn drain(rep: &Report) -> Option<Band<'static>> {
    let last = rep.timeseries.last()?.second as f64 + 1.0;
    let from = rep.measured_secs.floor();
    (last > from).then_some(Band {
        from,
        to: last,
        label: "drain",
    })
}

fn latency_over_time(rep: &Report) -> String {
    latency_chart(
        "Latency over time (all channels, per second)",
        &rep.timeseries,
        drain(rep),
    )
}

fn latency_chart(title: &str, ts: &[SecondPoint], band: Option<Band<'static>>) -> String {
    let max = ts.iter().map(|p| p.p99_us).max().unwrap_or(0).max(1);
    let pick = |f: fn(&SecondPoint) -> u64| -> Vec<(f64, f64)> {
        ts.iter()
            .filter(|p| p.requests > p.errors || p.p50_us > 0)
            .map(|p| (p.second as f64 + 0.5, f(p) as f64 / 1000.0))
            .collect()
    };
    svg_chart(
        title,
        &seconds_axis(ts.len()),
        &ms_axis("latency (ms)", max),
        &[
            Series {
                name: "p50",
                color: COLORS[0],
                points: pick(|p| p.p50_us),
                dashed: false,
            },
            Series {
                name: "p99",
                color: COLORS[4],
                points: pick(|p| p.p99_us),
                dashed: false,
            },
        ],
        band,
    )
}

fn throughput_over_time(rep: &Report) -> String {
    let ts = &rep.timeseries;
    let max = ts.iter().map(|p| p.requests).max().unwrap_or(0).max(1);
    let (ticks, top) = nice_ticks(max as f64, 6);
    let y = Axis {
        label: "requests / s".into(),
        min: 0.0,
        max: top,
        ticks: ticks.into_iter().map(|v| (v, fmt_num(v))).collect(),
    };
    let pts = |f: fn(&SecondPoint) -> u64| -> Vec<(f64, f64)> {
        ts.iter()
            .map(|p| (p.second as f64 + 0.5, f(p) as f64))
            .collect()
    };
    svg_chart(
        "Throughput over time (completions per second)",
        &seconds_axis(ts.len()),
        &y,
        &[
            Series {
                name: "all answers",
                color: COLORS[0],
                points: pts(|p| p.requests),
                dashed: false,
            },
            Series {
                name: "2xx",
                color: COLORS[2],
                points: pts(|p| p.ok),
                dashed: true,
            },
            Series {
                name: "errors",
                color: COLORS[4],
                points: pts(|p| p.errors),
                dashed: false,
            },
        ],
        drain(rep),
    )
}

fn percentile_label(inverse: f64) -> String {
    let q = 100.0 * (1.0 - 1.0 / inverse);
    if inverse <= 1.0 {
        "0%".into()
    } else {
        let s = format!("{q:.5}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s}%")
    }
}

fn distribution_chart(rep: &Report) -> String {
    let mut all: Vec<(&str, &[DistPoint], u64)> = rep
        .channels
        .iter()
        .map(|(n, r)| (n.as_str(), &r.distribution[..], r.latency_us.max))
        .collect();
    all.push(("total", &rep.total.distribution, rep.total.latency_us.max));
    percentile_chart("Latency by percentile", &all)
}

/// Percentile curves of `(name, distribution, max µs)`; a series named `total` is black, dashed.
fn percentile_chart(title: &str, all: &[(&str, &[DistPoint], u64)]) -> String {
    let max_inverse = all
        .iter()
        .flat_map(|(_, d, _)| d.iter().map(|p| p.inverse))
        .fold(10.0f64, f64::max);
    let decades = max_inverse.log10().ceil().max(1.0) as u32;
    let x = Axis {
        label: "percentile (log scale of 1/(1-q))".into(),
        min: 0.0,
        max: f64::from(decades),
        ticks: (0..=decades)
            .map(|d| (f64::from(d), percentile_label(10f64.powi(d as i32))))
            .collect(),
    };
    let max_us = all.iter().map(|(_, _, m)| *m).max().unwrap_or(1).max(1);
    let series: Vec<Series> = all
        .iter()
        .enumerate()
        .map(|(i, (name, d, _))| Series {
            name,
            color: if *name == "total" {
                "#000000"
            } else {
                COLORS[i % COLORS.len()]
            },
            points: d
                .iter()
                .map(|p| (p.inverse.log10(), p.value_us as f64 / 1000.0))
                .collect(),
            dashed: *name == "total",
        })
        .collect();
    svg_chart(title, &x, &ms_axis("latency (ms)", max_us), &series, None)
}

fn count_axis(label: &str, max: f64) -> Axis {
    let (ticks, top) = nice_ticks(max, 6);
    Axis {
        label: label.into(),
        min: 0.0,
        max: top,
        ticks: ticks.into_iter().map(|v| (v, fmt_num(v))).collect(),
    }
}

fn acks_over_time(c: &ChatReport) -> String {
    let ts = &c.timeseries;
    let max = ts.iter().map(|p| p.requests).max().unwrap_or(0).max(1);
    let pts = |f: fn(&SecondPoint) -> u64| -> Vec<(f64, f64)> {
        ts.iter()
            .map(|p| (p.second as f64 + 0.5, f(p) as f64))
            .collect()
    };
    svg_chart(
        "Chat answers per second",
        &seconds_axis(ts.len()),
        &count_axis("messages / s", max as f64),
        &[
            Series {
                name: "acks",
                color: COLORS[2],
                points: pts(|p| p.ok),
                dashed: false,
            },
            Series {
                name: "errors",
                color: COLORS[4],
                points: pts(|p| p.errors),
                dashed: false,
            },
        ],
        None,
    )
}

fn chat_html(c: &ChatReport, s: &mut String) {
    let _ = write!(
        s,
        "<h2>Chat sessions</h2><p>{url}: {n} sessions ({hello}) × {rate} messages/s = {offered}/s offered, opened at {cr}/s before the measured run.</p>",
        url = esc(&c.url),
        n = c.sessions,
        hello = c.hello,
        rate = c.rate_per_session,
        offered = c.offered_per_sec,
        cr = c.connect_rate,
    );
    s.push_str("<table><tr><th>sessions</th><th>connected</th><th>connect failures</th><th>connect p50</th><th>connect p99</th><th>closes</th></tr>");
    let _ = write!(
        s,
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
        c.sessions,
        c.connected,
        esc(&kv(&c.connect_failures)),
        fmt_us(c.connect_latency_us.p50),
        fmt_us(c.connect_latency_us.p99),
        esc(&kv(&c.closes)),
    );
    s.push_str("<table><tr><th>messages</th><th>acked</th><th>acks/s</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th><th>errors</th><th>unanswered</th><th>dups sent</th><th>duplicate acks</th></tr>");
    let l = &c.ack_latency_us;
    let _ = write!(
        s,
        "<tr><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
        c.count,
        c.acked,
        c.acks_per_sec,
        fmt_us(l.p50),
        fmt_us(l.p90),
        fmt_us(l.p99),
        fmt_us(l.p999),
        fmt_us(l.max),
        esc(&kv(&c.errors)),
        c.unanswered,
        c.dup_sent,
        c.duplicate_acks,
    );
    s.push_str(r#"<p class="small">Ack latency runs from each message's scheduled send time to its ack frame (coordinated-omission free).</p>"#);
    s.push_str(&latency_chart(
        "Chat ack latency over time (per second)",
        &c.timeseries,
        None,
    ));
    s.push_str(&acks_over_time(c));
    s.push_str(&percentile_chart(
        "Chat ack latency by percentile",
        &[("ack", &c.distribution, l.max)],
    ));
}

fn resources_html(r: &ResourceReport, s: &mut String) {
    let ts = &r.series;
    if ts.is_empty() {
        return;
    }
    s.push_str("<h2>Resources</h2>");
    if let Some(pid) = r.gateway_pid {
        let m = r.gateway_rss_mb.as_ref();
        let _ = write!(
            s,
            "<p>Gateway pid {pid}: RSS start {} MB, end {}, min {}, max {}, slope {} MB/min; CPU {} cores on average{}. Harness CPU {} cores.</p>",
            m.map_or("-".into(), |m| format!("{:.1}", m.start)),
            m.map_or("-".into(), |m| format!("{:.1}", m.end)),
            m.map_or("-".into(), |m| format!("{:.1}", m.min)),
            m.map_or("-".into(), |m| format!("{:.1}", m.max)),
            m.and_then(|m| m.slope_mb_per_min)
                .map_or("-".into(), |v| format!("{v:+.2}")),
            r.gateway_cpu_cores.map_or("-".into(), |c| format!("{c:.2}")),
            if r.gateway_exited { " (the process exited during the run)" } else { "" },
            r.loadgen_cpu_cores.map_or("-".into(), |c| format!("{c:.2}")),
        );
        let rss: Vec<(f64, f64)> = ts
            .iter()
            .filter_map(|p| p.sample.gateway_rss_mb.map(|v| (p.second as f64 + 1.0, v)))
            .collect();
        let max = rss.iter().map(|p| p.1).fold(1.0, f64::max);
        s.push_str(&svg_chart(
            "Gateway RSS over time",
            &seconds_axis(ts.len() + 1),
            &count_axis("RSS (MB)", max),
            &[Series {
                name: "RSS",
                color: COLORS[3],
                points: rss,
                dashed: false,
            }],
            None,
        ));
    }
    let pts = |f: fn(&crate::resources::ResourcePoint) -> Option<f64>| -> Vec<(f64, f64)> {
        ts.iter()
            .filter_map(|p| f(p).map(|v| (p.second as f64 + 0.5, v)))
            .collect()
    };
    let gw = pts(|p| p.sample.gateway_cpu_cores);
    let lg = pts(|p| p.sample.loadgen_cpu_cores);
    let max = gw.iter().chain(&lg).map(|p| p.1).fold(1.0, f64::max);
    s.push_str(&svg_chart(
        "CPU over time",
        &seconds_axis(ts.len()),
        &count_axis("cores", max),
        &[
            Series {
                name: "gateway",
                color: COLORS[0],
                points: gw,
                dashed: false,
            },
            Series {
                name: "harness",
                color: COLORS[1],
                points: lg,
                dashed: true,
            },
        ],
        None,
    ));
}

pub fn html(rep: &Report) -> String {
    let mut s = String::new();
    let c = &rep.config;
    let how = mode(c);
    let _ = write!(
        s,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>switchboard-loadtest report</title><style>
body{{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222}}
table{{border-collapse:collapse;margin:12px 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}
.small{{color:#555;font-size:13px}}svg{{display:block;margin:18px 0;max-width:100%;height:auto}}
</style></head><body><h1>Switchboard load test</h1>
<p>{target}: {how}, {measured:.1} s measured after {warmup:.1} s warm-up; mix <code>{mix}</code>; dup ratio {dup}; timeout {timeout} s{intr}.</p>
"#,
        target = esc(&c.target),
        how = esc(&how),
        measured = rep.measured_secs,
        warmup = c.warmup_secs,
        mix = esc(&c.mix),
        dup = c.dup_ratio,
        timeout = c.timeout_secs,
        intr = if rep.interrupted {
            " (interrupted)"
        } else {
            ""
        },
    );
    if !rep.channels.is_empty() {
        request_html(rep, &mut s);
    }
    if let Some(m) = &rep.smtp {
        let _ = write!(
            s,
            "<p>SMTP: {} connections to {} (opened {}), {}-byte mails ({}, attachment ratio {}), pipelining {}; statuses are reply codes.</p>",
            m.connections,
            esc(&m.target),
            m.opened,
            m.mail_size,
            m.encoding,
            m.attachment_ratio,
            m.pipelining
        );
    }
    if let Some(c) = &rep.chat {
        chat_html(c, &mut s);
    }
    if let Some(r) = &rep.resources {
        resources_html(r, &mut s);
    }
    s.push_str("</body></html>\n");
    s
}

fn request_html(rep: &Report, s: &mut String) {
    s.push_str("<table><tr><th>channel</th><th>count</th><th>2xx</th><th>errors</th><th>req/s</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th><th>statuses</th><th>errors by kind</th></tr>");
    let mut rows: Vec<(&str, &ChannelReport)> =
        rep.channels.iter().map(|(n, r)| (n.as_str(), r)).collect();
    rows.push(("total", &rep.total));
    for (name, r) in rows {
        let l = &r.latency_us;
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            r.count,
            r.ok,
            r.errors,
            r.throughput_rps,
            fmt_us(l.p50),
            fmt_us(l.p90),
            fmt_us(l.p99),
            fmt_us(l.p999),
            fmt_us(l.max),
            esc(&kv(&r.status)),
            esc(&kv(&r.error_kinds)),
        );
    }
    s.push_str("</table>");
    s.push_str(r#"<p class="small">Latency in open loop runs from each request's scheduled send time (coordinated-omission free); in closed loop from the actual send. Histograms: HdrHistogram, 1 µs – 60 s, 3 significant digits; every HTTP answer counts, transport errors do not.</p>"#);
    s.push_str(&latency_over_time(rep));
    s.push_str(&throughput_over_time(rep));
    s.push_str(&distribution_chart(rep));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::{Mix, Secrets};
    use crate::stats::{Collector, ErrorKind, Outcome};
    use std::time::{Duration, Instant};

    fn sample() -> (RunConfig, RunResult) {
        let start = Instant::now();
        let mut c = Collector::new(start, Duration::ZERO, None);
        for i in 0..1000u64 {
            let intended = start + Duration::from_millis(i * 3);
            let channel = if i % 2 == 0 {
                Channel::Events
            } else {
                Channel::Twilio
            };
            c.record(Outcome {
                channel,
                intended,
                done: intended + Duration::from_micros(500 + i * 7),
                result: if i % 100 == 7 {
                    Err(ErrorKind::Timeout)
                } else {
                    Ok(if channel == Channel::Events { 202 } else { 200 })
                },
                dup: i % 20 == 0,
                duplicate_answer: i % 40 == 0,
                acked: vec![],
            })
            .unwrap();
        }
        let (stats, _) = c.finish().unwrap();
        let cfg = RunConfig {
            target: "http://127.0.0.1:8080".into(),
            mode: Mode::Open { rate: 333.0 },
            duration: Duration::from_secs(3),
            warmup: Duration::ZERO,
            mix: Mix::parse("events=1,twilio=1").unwrap(),
            dup_ratio: 0.05,
            timeout: Duration::from_secs(10),
            max_in_flight: 10_000,
            meta_batch: 1,
            wechat_account: "gh_<x>".into(),
            secrets: Secrets {
                api_secret: "SECRET-API".into(),
                twilio_auth_token: "SECRET-TW".into(),
                twilio_url: "http://127.0.0.1:8080".into(),
                meta_app_secret: "SECRET-META".into(),
                wechat_token: "SECRETWX".into(),
            },
            acked: None,
            smtp: None,
            chat: None,
            gateway_pid: None,
            progress: false,
            catch_interrupt: false,
        };
        let r = RunResult {
            stats,
            measured: Duration::from_secs(3),
            sent: 1000,
            acked_written: 0,
            acked_error: None,
            interrupted: false,
            smtp: None,
            resources: None,
            fds: None,
        };
        (cfg, r)
    }

    #[test]
    fn json_report_has_percentiles_counts_and_series() {
        let (cfg, r) = sample();
        let rep = build(&cfg, &r, 1);
        let v = serde_json::to_value(&rep).unwrap();
        assert_eq!(v["total"]["count"], 1000);
        assert_eq!(v["total"]["ok"], 990);
        assert_eq!(v["total"]["errors"], 10);
        assert_eq!(v["total"]["error_kinds"]["timeout"], 10);
        assert_eq!(v["channels"]["events"]["status"]["202"], 500);
        assert_eq!(v["channels"]["twilio"]["status"]["200"], 490);
        assert_eq!(v["total"]["dup_sent"], 50);
        assert_eq!(v["total"]["duplicate_answers"], 25);
        assert!(
            v["channels"].get("meta").is_none(),
            "only channels in the mix"
        );
        let l = &v["total"]["latency_us"];
        let p50 = l["p50"].as_u64().unwrap();
        // Latencies 500 + 7i µs, i < 1000 (minus the timeouts): median near 500 + 3500.
        assert!((3_900..=4_100).contains(&p50), "{p50}");
        assert!(l["p99"].as_u64().unwrap() >= l["p90"].as_u64().unwrap());
        assert!(l["max"].as_u64().unwrap() >= 7_380);
        assert!((v["total"]["throughput_rps"].as_f64().unwrap() - 333.3).abs() < 0.1);
        let ts = v["timeseries"].as_array().unwrap();
        assert!(ts.len() >= 3);
        assert!(ts[0]["p99_us"].as_u64().unwrap() >= ts[0]["p50_us"].as_u64().unwrap());
        let dist = v["total"]["distribution"].as_array().unwrap();
        assert_eq!(dist[0]["quantile"], 0.0);
        assert_eq!(dist.last().unwrap()["quantile"], 1.0);
        // Secrets never reach the report.
        let text = serde_json::to_string(&rep).unwrap();
        assert!(!text.contains("SECRET"));
    }

    #[test]
    fn html_is_self_contained_with_svg() {
        let (cfg, r) = sample();
        let rep = build(&cfg, &r, 1);
        let page = html(&rep);
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert_eq!(page.matches("<svg").count(), 3);
        assert!(page.contains("Latency by percentile"));
        assert!(page.contains("99.9%"));
        assert!(page.contains("<polyline"));
        assert!(
            page.contains(">drain</text>"),
            "the tail after the last send is marked"
        );
        assert!(!page.contains("<script"));
        assert!(!page.contains("src=\"http"));
        assert!(!page.contains("SECRET"));
        // User-supplied text is escaped.
        assert!(page.contains("gh_&lt;x&gt;") || !page.contains("gh_<x>"));
        let text = summary(&rep);
        assert!(text.contains("total"));
        assert!(text.contains("timeout=10"));
    }

    #[test]
    fn ticks_and_labels() {
        let (t, top) = nice_ticks(7.3, 6);
        assert_eq!(top, 8.0);
        assert_eq!(t, vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        let (t, top) = nice_ticks(0.0, 6);
        assert_eq!((t.len(), top), (6, 1.0));
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(100000.0), "99.999%");
    }

    #[test]
    fn chat_smtp_and_resources_get_their_sections() {
        use crate::chat::{Answer, ChatEvent, ChatSettings};
        use crate::resources::{summarise, Reading};
        let (mut cfg, _) = sample();
        let start = Instant::now();
        let mut c = Collector::new(start, Duration::ZERO, None).with_chat(2, 1.0);
        c.record_chat(ChatEvent::Connected {
            latency: Duration::from_millis(2),
        })
        .unwrap();
        c.record_chat(ChatEvent::ConnectFailed {
            kind: "http_503".into(),
        })
        .unwrap();
        for i in 0..50u64 {
            let intended = start + Duration::from_millis(i * 20);
            c.record_chat(ChatEvent::Answer {
                intended,
                done: intended + Duration::from_millis(3),
                answer: if i == 7 {
                    Answer::Error {
                        code: "rate_limited".into(),
                    }
                } else {
                    Answer::Ack {
                        duplicate: false,
                        record_id: format!("R{i}"),
                    }
                },
                dup: false,
            })
            .unwrap();
        }
        c.record_chat(ChatEvent::Closed { how: "1008".into() })
            .unwrap();
        let (stats, _) = c.finish().unwrap();
        cfg.mix = Mix::none();
        cfg.chat = Some(ChatSettings {
            url: "ws://127.0.0.1:8080/v1/chat".into(),
            sessions: 2,
            rate: 1.0,
            connect_rate: 100.0,
            origin: None,
            customer_secret: None,
            dup_ratio: 0.0,
            timeout: Duration::from_secs(5),
        });
        let readings: Vec<Reading> = (0..=3)
            .map(|i| Reading {
                t: i as f64,
                rss_kb: Some(200_000 + i * 1000),
                gateway_ticks: Some(i * 100),
                self_ticks: Some(i * 10),
            })
            .collect();
        let r = RunResult {
            stats,
            measured: Duration::from_secs(1),
            sent: 0,
            acked_written: 0,
            acked_error: None,
            interrupted: false,
            smtp: None,
            resources: Some(summarise(Some(42), &readings)),
            fds: Some(crate::run::FdLimit {
                before: 1024,
                after: 20_000,
                hard: 20_000,
                needed: 66,
            }),
        };
        let rep = build(&cfg, &r, 0);
        let v = serde_json::to_value(&rep).unwrap();
        assert_eq!(v["config"]["mode"], "none");
        assert_eq!(v["chat"]["connected"], 1);
        assert_eq!(v["chat"]["connect_failures"]["http_503"], 1);
        assert_eq!(v["chat"]["acked"], 49);
        assert_eq!(v["chat"]["errors"]["rate_limited"], 1);
        assert_eq!(v["chat"]["closes"]["1008"], 1);
        let p50 = v["chat"]["ack_latency_us"]["p50"].as_u64().unwrap();
        assert!((2_990..=3_010).contains(&p50), "{p50}");
        assert_eq!(v["resources"]["gateway_cpu_cores"], 1.0);
        assert_eq!(v["file_descriptors"]["soft"], 20_000);
        // The per-second series carries the samples even without request load.
        assert_eq!(v["timeseries"][1]["gateway_cpu_cores"], 1.0);
        assert!(v["timeseries"][2]["gateway_rss_mb"].as_f64().unwrap() > 200.0);
        let text = summary(&rep);
        assert!(text.contains("chat: 2 sessions"), "{text}");
        assert!(text.contains("failed http_503=1"));
        assert!(text.contains("gateway (pid 42)"));
        assert!(
            !text.contains("channel      count"),
            "no request table for --mix none"
        );
        assert!(hints(&rep)
            .iter()
            .any(|h| h.contains("MESSAGES_PER_MINUTE")));
        assert!(hints(&rep).iter().any(|h| h.contains("MAX_SESSIONS")));
        let page = html(&rep);
        assert!(page.contains("<h2>Chat sessions</h2>"));
        assert!(page.contains("Chat ack latency by percentile"));
        assert!(page.contains("Gateway RSS over time"));
        assert!(page.contains("CPU over time"));
        assert!(!page.contains("Throughput over time"));
    }

    #[test]
    fn empty_run_reports_without_panicking() {
        let (cfg, _) = sample();
        let c = Collector::new(Instant::now(), Duration::ZERO, None);
        let (stats, _) = c.finish().unwrap();
        let r = RunResult {
            stats,
            measured: Duration::ZERO,
            sent: 0,
            acked_written: 0,
            acked_error: None,
            interrupted: true,
            smtp: None,
            resources: None,
            fds: None,
        };
        let rep = build(&cfg, &r, 0);
        assert_eq!(rep.total.throughput_rps, 0.0);
        assert!(html(&rep).contains("<svg"));
        assert!(summary(&rep).contains("interrupted"));
    }
}
