#![forbid(unsafe_code)]
//! `switchboard-loadtest`: load-test harness for the Switchboard gateway.
//!
//! - `run`: open-loop (`--rate`, coordinated-omission free) or closed-loop (`--concurrency`)
//!   load with a channel mix (events, Twilio SMS, Meta WhatsApp, WeChat, SMTP mails), validly
//!   signed, plus websocket chat sessions alongside; HdrHistogram latencies, per-second series
//!   with the gateway's RSS and CPU, JSON/HTML reports, an acked-records file.
//! - `verify`: reads the Kafka topic and checks every acked record is there exactly once.
//! - `ceiling`: a bare hyper server answering 200, the throughput ceiling to compare with.

mod acked;
mod ceiling;
mod channels;
mod chat;
mod report;
mod resources;
mod run;
mod smtp;
mod stats;
mod util;
mod verify;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Load-test harness for Switchboard: HTTP channels, SMTP and websocket chat.
///
/// Typical session: start the gateway (for Meta and WeChat it needs their secrets, see
/// `run --help`), then `switchboard-loadtest run --rate 500 --duration 30s --acked acked.jsonl
/// --out report.json --html report.html`; with Kafka behind the gateway, `switchboard-loadtest
/// verify --acked acked.jsonl` checks nothing acknowledged was lost. `ceiling` gives the bare
/// HTTP throughput of this machine for comparison.
#[derive(Parser)]
#[command(name = "switchboard-loadtest", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate load against a running gateway and report latency and throughput.
    ///
    /// Open loop (`--rate R`): requests are due at fixed intervals from the start and each is sent
    /// as its own task, so a slow answer never delays the next; latency is measured from the due
    /// time (coordinated-omission free). Closed loop (no `--rate`): `--concurrency` workers send
    /// back-to-back, to find the maximum throughput.
    ///
    /// Channels (`--mix`): `events` = POST /v1/events (signed JSON), `twilio` = POST
    /// /hooks/twilio/sms (form, X-Twilio-Signature), `meta` = POST /hooks/meta (WhatsApp Cloud API,
    /// X-Hub-Signature-256), `wechat` = POST /hooks/wechat (plain-mode XML, query signature),
    /// `smtp` = a MIME mail to the SMTP listener (--smtp-target) over a pool of connections with
    /// ESMTP PIPELINING, latency to the reply after the final dot, statuses by reply code.
    ///
    /// Chat (`--chat-sessions N --chat-rate M`): N websocket sessions on /v1/chat connect first
    /// (at --chat-connect-rate), then each sends M messages per second (open loop, CO-free: ack
    /// latency from the due time) alongside the mix; `--mix none` for chat only. The gateway
    /// limits each chat connection to 30 messages a minute (burst 10) and each customer (an
    /// anonymous session is one) to 0.5/s (burst 20): above 0.5 messages/s per session raise
    /// SWITCHBOARD_CHAT__MESSAGES_PER_MINUTE, SWITCHBOARD_CHAT__MESSAGE_BURST and
    /// SWITCHBOARD_LIMITS__PER_CUSTOMER__PER_SECOND. For thousands of sessions also raise
    /// SWITCHBOARD_HTTP__MAX_CONNECTIONS (10000) and SWITCHBOARD_CHAT__MAX_SESSIONS (20000) as
    /// needed, and the gateway's own fd limit (`ulimit -n`). This tool raises its soft
    /// RLIMIT_NOFILE to the hard limit and refuses a run that cannot fit.
    ///
    /// `--gateway-pid` (or `--gateway-pid-file`): the gateway's RSS and CPU are sampled every
    /// second of the measured window (min/max/start/end RSS, its slope in MB/min, average
    /// cores); the harness's own CPU is always reported.
    ///
    /// The gateway ships with Meta and WeChat off (no secrets in config/switchboard.toml). To load
    /// them, start the gateway with the same secrets this tool uses, e.g.
    /// SWITCHBOARD_META__APP_SECRETS='["loadtest-meta-app-secret"]'
    /// SWITCHBOARD_WECHAT__TOKENS='["loadtestwechattoken"]'. The gateway also limits each source
    /// address to 500 req/s (burst 2000): for more, raise SWITCHBOARD_LIMITS__PER_SOURCE__PER_SECOND
    /// and ..._BURST, or set SWITCHBOARD_LIMITS__ENABLED=false (the same source limit applies
    /// to SMTP mails and chat upgrades).
    Run(Box<RunArgs>),
    /// Check that every acknowledged record is in Kafka, once (exit 1 if any is lost).
    ///
    /// Reads --topic from the beginning with a fresh random consumer group (nothing committed)
    /// and matches each record by `id` (events and chat acks) or `provider_message_id` (Twilio
    /// MessageSid, Meta wamid, WeChat MsgId, SMTP Message-ID without angle brackets). Stops once every acked key is found, or once --timeout has
    /// passed; either way only after reading up to the end offsets taken at start. Prints JSON
    /// on stdout: acked, found, lost (= |acked \ found|), duplicates (extra records for a key),
    /// per-channel counts and a sample of lost keys.
    ///
    /// Exit status: 0 when every acked key was found, 1 when some are lost, 2 on errors
    /// (unreadable file, broker unreachable, topic missing).
    Verify(VerifyArgs),
    /// Serve a bare HTTP/1.1 "200 OK" for any request: the ceiling to compare the gateway with.
    ///
    /// Reads each whole request body and answers 200 with a tiny body, for any method and path,
    /// on a multi-threaded runtime with keep-alive. Point `run --target` at it with the same mix
    /// (signatures are ignored) to see what the client, loopback and hyper manage on this
    /// machine. Stops on Ctrl-C or SIGTERM.
    Ceiling(CeilingArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Base URL of the gateway's public listener (plain HTTP).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,

    /// Open loop: requests per second in total, sent at fixed intervals. Without it the run is
    /// closed loop.
    #[arg(long)]
    rate: Option<f64>,

    /// Closed loop: workers sending back-to-back (default 64). Not with --rate.
    #[arg(long)]
    concurrency: Option<usize>,

    /// Measured duration, after the warm-up (e.g. 30s, 2m, 500ms).
    #[arg(long, default_value = "30s", value_parser = util::positive_duration)]
    duration: Duration,

    /// Warm-up before the measured duration: load is sent but not recorded (acks are still
    /// written to --acked).
    #[arg(long, default_value = "2s", value_parser = util::parse_duration)]
    warmup: Duration,

    /// Channel weights over events, twilio, meta, wechat and smtp, e.g.
    /// events=4,twilio=3,meta=2,wechat=1,smtp=1 (a bare name weighs 1); `none` for chat
    /// sessions only.
    #[arg(long, default_value = "events=4,twilio=3,meta=2,wechat=1")]
    mix: String,

    /// Share of requests (0-1) that re-send an earlier request's exact payload (same provider
    /// message id; SMTP: the same mail and Message-ID; chat: a recent client_msg_id of the
    /// session with its text), to exercise the gateway's dedupe.
    #[arg(long, default_value_t = 0.05)]
    dup_ratio: f64,

    /// A request without a complete answer within this time counts as a `timeout` error.
    #[arg(long, default_value = "10s", value_parser = util::positive_duration)]
    timeout: Duration,

    /// Open loop: most requests waiting for an answer at once; a due request over it is not
    /// sent and counts as a `client_overload` error.
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,

    /// Messages per Meta (WhatsApp) delivery.
    #[arg(long, default_value_t = 1)]
    meta_batch: usize,

    /// Secret for /v1/events: one of the gateway's api.secrets (SWITCHBOARD_API__SECRETS).
    /// Default: the dev secret of config/switchboard.toml.
    #[arg(long, default_value = "dev-only-secret-change-me")]
    api_secret: String,

    /// Twilio Auth Token: one of the gateway's twilio.auth_tokens
    /// (SWITCHBOARD_TWILIO__AUTH_TOKENS). Default: the dev token of config/switchboard.toml.
    #[arg(long, default_value = "dev-only-twilio-auth-token")]
    twilio_auth_token: String,

    /// The gateway's twilio.public_url (SWITCHBOARD_TWILIO__PUBLIC_URL): Twilio signatures
    /// cover this URL + path, not the address the request is sent to.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    twilio_url: String,

    /// Meta app secret: one of the gateway's meta.app_secrets. The shipped config has none
    /// (route off, 404); start the gateway with
    /// SWITCHBOARD_META__APP_SECRETS='["loadtest-meta-app-secret"]' or pass yours here.
    #[arg(long, default_value = "loadtest-meta-app-secret")]
    meta_app_secret: String,

    /// WeChat token (3-32 letters or digits): one of the gateway's wechat.tokens, with
    /// wechat.encryption = "plain". The shipped config has none (route off, 404); start the
    /// gateway with SWITCHBOARD_WECHAT__TOKENS='["loadtestwechattoken"]' or pass yours here.
    #[arg(long, default_value = "loadtestwechattoken")]
    wechat_token: String,

    /// WeChat official account id sent as ToUserName.
    #[arg(long, default_value = "gh_5a1c0ad7e57b")]
    wechat_account: String,

    /// Write the JSON report here (config, per-channel and total counts, statuses, error kinds,
    /// throughput, percentiles, per-second series).
    #[arg(long)]
    out: Option<PathBuf>,

    /// Write a self-contained HTML report with SVG charts here.
    #[arg(long)]
    html: Option<PathBuf>,

    /// Write one line {"channel":..,"key":..} per record acknowledged with 2xx (events: the
    /// record id from the answer; others: the generated provider message id), for `verify`.
    #[arg(long)]
    acked: Option<PathBuf>,

    /// SMTP: the gateway's SMTP listener (email.smtp_listen), host:port.
    #[arg(long, default_value = "127.0.0.1:2525")]
    smtp_target: String,

    /// SMTP: connections in the pool; each message takes an idle one (or opens one), so this is
    /// the most mails in flight at once.
    #[arg(long, default_value_t = 16)]
    smtp_connections: usize,

    /// SMTP: size of each mail, headers included (bytes, or with k/m: 10k = 10240).
    #[arg(long, default_value = "10k", value_parser = util::parse_size)]
    smtp_size: usize,

    /// SMTP: envelope recipient and To: one of the gateway's email.intake_addresses (or in
    /// email.intake_domains).
    #[arg(long, default_value = "complaints@switchboard.localhost")]
    smtp_rcpt: String,

    /// SMTP: the text part's transfer encoding: 8bit (UTF-8, BODY=8BITMIME), base64, or mixed
    /// (half each).
    #[arg(long, default_value = "mixed")]
    smtp_encoding: String,

    /// SMTP: share of mails (0-1) with an attachment (a base64 log file of a quarter of the
    /// size; the gateway stores attachments in email.attachment_dir).
    #[arg(long, default_value_t = 0.0)]
    smtp_attachment_ratio: f64,

    /// SMTP: the name this client gives in EHLO.
    #[arg(long, default_value = "loadtest.switchboard.example")]
    smtp_helo: String,

    /// SMTP: one command per round trip even when the server advertises PIPELINING (to
    /// compare).
    #[arg(long)]
    smtp_no_pipelining: bool,

    /// Chat: websocket sessions on /v1/chat, connected before the measured run (0: none).
    #[arg(long, default_value_t = 0)]
    chat_sessions: usize,

    /// Chat: messages per second of each session (open loop; e.g. 10000 sessions at 0.5 make
    /// 5000 messages/s).
    #[arg(long, default_value_t = 0.5)]
    chat_rate: f64,

    /// Chat: sessions opened per second while connecting.
    #[arg(long, default_value_t = 1000.0)]
    chat_connect_rate: f64,

    /// Chat: the websocket URL (default: --target with ws:// and /v1/chat).
    #[arg(long)]
    chat_url: Option<String>,

    /// Chat: Origin header of the upgrade (needed when the gateway sets chat.allowed_origins).
    #[arg(long)]
    chat_origin: Option<String>,

    /// Chat: a secret of the gateway's chat.customer_token_secrets; each session then says hello
    /// with a customer token (HS256, a distinct phone). Without it sessions are anonymous
    /// (chat.allow_anonymous, on by default).
    #[arg(long)]
    chat_customer_secret: Option<String>,

    /// The gateway's process id: sample its RSS (/proc/PID/status VmRSS) and CPU time
    /// (/proc/PID/stat) every second of the measured window.
    #[arg(long, conflicts_with = "gateway_pid_file")]
    gateway_pid: Option<u32>,

    /// A file whose first line is the gateway's process id (as --gateway-pid).
    #[arg(long)]
    gateway_pid_file: Option<PathBuf>,

    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,

    /// Tokio worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// Kafka bootstrap servers (the gateway's kafka.brokers).
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,

    /// The records topic (the gateway's kafka.topic).
    #[arg(long, default_value = "complaints.v1")]
    topic: String,

    /// The file written by `run --acked`.
    #[arg(long)]
    acked: PathBuf,

    /// Keep reading for keys not found yet up to this long (the topic is always read at least
    /// up to its end offsets taken at start).
    #[arg(long, default_value = "60s", value_parser = util::parse_duration)]
    timeout: Duration,
}

#[derive(Args, Debug)]
struct CeilingArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: String,

    /// Tokio worker threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
}

fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime, String> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all();
    if let Some(n) = threads {
        if n == 0 || n > 1024 {
            return Err("--threads: 1-1024".into());
        }
        b.worker_threads(n);
    }
    b.build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn run_config(a: &RunArgs) -> Result<run::RunConfig, String> {
    let target = run::validate_target(&a.target)?;
    let mode = match (a.rate, a.concurrency) {
        (Some(_), Some(_)) => {
            return Err(
                "--rate (open loop) and --concurrency (closed loop) exclude each other".into(),
            )
        }
        (Some(r), None) => {
            if !r.is_finite() || r <= 0.0 || r > 10_000_000.0 {
                return Err(format!("--rate {r}: must be above 0 and at most 10000000"));
            }
            run::Mode::Open { rate: r }
        }
        (None, c) => {
            let n = c.unwrap_or(64);
            if n == 0 || n > 100_000 {
                return Err(format!("--concurrency {n}: must be 1-100000"));
            }
            run::Mode::Closed { concurrency: n }
        }
    };
    if !(0.0..=1.0).contains(&a.dup_ratio) {
        return Err(format!("--dup-ratio {}: must be 0-1", a.dup_ratio));
    }
    if a.max_in_flight == 0 {
        return Err("--max-in-flight: at least 1".into());
    }
    if a.meta_batch == 0 || a.meta_batch > 1000 {
        return Err("--meta-batch: 1-1000 (Meta batches up to 1000)".into());
    }
    let mix = channels::Mix::parse(&a.mix)?;
    let need = |c: channels::Channel, v: &str, flag: &str| -> Result<(), String> {
        if mix.contains(c) && v.is_empty() {
            Err(format!(
                "{flag}: must not be empty while --mix has {}",
                c.name()
            ))
        } else {
            Ok(())
        }
    };
    need(channels::Channel::Events, &a.api_secret, "--api-secret")?;
    need(
        channels::Channel::Twilio,
        &a.twilio_auth_token,
        "--twilio-auth-token",
    )?;
    need(
        channels::Channel::Meta,
        &a.meta_app_secret,
        "--meta-app-secret",
    )?;
    need(channels::Channel::Wechat, &a.wechat_token, "--wechat-token")?;
    if mix.contains(channels::Channel::Twilio) {
        run::validate_target(&a.twilio_url).map_err(|e| e.replace("--target", "--twilio-url"))?;
    }
    if a.wechat_account.is_empty() || a.wechat_account.len() > 64 {
        return Err("--wechat-account: 1-64 characters".into());
    }
    let smtp = if mix.contains(channels::Channel::Smtp) {
        Some(smtp_config(a)?)
    } else {
        None
    };
    let chat = chat_config(a, &target)?;
    if mix.is_none() && chat.is_none() {
        return Err("--mix none sends nothing: add --chat-sessions N, or name channels".into());
    }
    let gateway_pid = match (&a.gateway_pid, &a.gateway_pid_file) {
        (Some(p), _) => Some(*p),
        (None, Some(f)) => Some(resources::read_pid_file(f)?),
        (None, None) => None,
    };
    if let Some(p) = gateway_pid {
        if !resources::process_exists(p) {
            return Err(format!(
                "--gateway-pid {p}: no such process (or no /proc on this system)"
            ));
        }
    }
    Ok(run::RunConfig {
        target,
        mode,
        duration: a.duration,
        warmup: a.warmup,
        mix,
        dup_ratio: a.dup_ratio,
        timeout: a.timeout,
        max_in_flight: a.max_in_flight,
        meta_batch: a.meta_batch,
        wechat_account: a.wechat_account.clone(),
        secrets: channels::Secrets {
            api_secret: a.api_secret.clone(),
            twilio_auth_token: a.twilio_auth_token.clone(),
            twilio_url: a.twilio_url.trim_end_matches('/').to_string(),
            meta_app_secret: a.meta_app_secret.clone(),
            wechat_token: a.wechat_token.clone(),
        },
        acked: a.acked.clone(),
        smtp,
        chat,
        gateway_pid,
        progress: !a.quiet,
        catch_interrupt: true,
    })
}

fn smtp_config(a: &RunArgs) -> Result<run::SmtpRun, String> {
    let addr = smtp::validate_addr(&a.smtp_target)?;
    if a.smtp_connections == 0 || a.smtp_connections > 100_000 {
        return Err("--smtp-connections: 1-100000".into());
    }
    if !(256..=100 * 1024 * 1024).contains(&a.smtp_size) {
        return Err(format!("--smtp-size {}: 256 bytes to 100m", a.smtp_size));
    }
    let rcpt = a.smtp_rcpt.trim();
    if !rcpt.contains('@') || rcpt.contains(['<', '>', ' ', '\r', '\n']) {
        return Err(format!(
            "--smtp-rcpt `{rcpt}`: a bare address like complaints@switchboard.localhost"
        ));
    }
    if !(0.0..=1.0).contains(&a.smtp_attachment_ratio) {
        return Err("--smtp-attachment-ratio: 0-1".into());
    }
    let helo = a.smtp_helo.trim();
    if helo.is_empty() || helo.contains([' ', '\r', '\n']) {
        return Err("--smtp-helo: a host name".into());
    }
    Ok(run::SmtpRun {
        addr,
        helo: helo.to_string(),
        connections: a.smtp_connections,
        mail: smtp::MailSettings {
            size: a.smtp_size,
            rcpt: rcpt.to_string(),
            encoding: smtp::BodyEncoding::parse(&a.smtp_encoding)?,
            attachment_ratio: a.smtp_attachment_ratio,
        },
        no_pipelining: a.smtp_no_pipelining,
    })
}

fn chat_config(a: &RunArgs, target: &str) -> Result<Option<chat::ChatSettings>, String> {
    if a.chat_sessions == 0 {
        return Ok(None);
    }
    if a.chat_sessions > 1_000_000 {
        return Err("--chat-sessions: at most 1000000".into());
    }
    if !a.chat_rate.is_finite() || a.chat_rate <= 0.0 || a.chat_rate > 1000.0 {
        return Err(format!(
            "--chat-rate {}: above 0 and at most 1000 messages/s per session",
            a.chat_rate
        ));
    }
    if !a.chat_connect_rate.is_finite() || a.chat_connect_rate <= 0.0 || a.chat_connect_rate > 1e6 {
        return Err("--chat-connect-rate: above 0 and at most 1000000".into());
    }
    let url = a.chat_url.clone().unwrap_or_else(|| chat::url_for(target));
    if !url.starts_with("ws://") {
        return Err(format!(
            "--chat-url `{url}`: use ws://host:port/v1/chat (wss is not supported)"
        ));
    }
    if let Some(secret) = &a.chat_customer_secret {
        if secret.is_empty() {
            return Err("--chat-customer-secret: must not be empty".into());
        }
        chat::customer_token(secret, "+8613800000000", "test", 1)?;
    }
    Ok(Some(chat::ChatSettings {
        url,
        sessions: a.chat_sessions,
        rate: a.chat_rate,
        connect_rate: a.chat_connect_rate,
        origin: a.chat_origin.clone(),
        customer_secret: a.chat_customer_secret.clone(),
        dup_ratio: a.dup_ratio,
        timeout: a.timeout,
    }))
}

fn cmd_run(a: RunArgs) -> Result<ExitCode, String> {
    let cfg = run_config(&a)?;
    // Fail on unwritable report paths before spending the run.
    for p in [&a.out, &a.html].into_iter().flatten() {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| format!("{}: cannot write: {e}", p.display()))?;
    }
    let rt = runtime(a.threads)?;
    let started_at = util::unix_ms();
    let result = rt.block_on(run::run(cfg.clone()))?;
    let rep = report::build(&cfg, &result, started_at);
    print!("{}", report::summary(&rep));
    for h in report::hints(&rep) {
        eprintln!("hint: {h}");
    }
    let mut failed = false;
    if let Some(p) = &a.out {
        let json = serde_json::to_string_pretty(&rep)
            .map_err(|e| format!("--out: cannot serialise the report: {e}"))?;
        std::fs::write(p, json + "\n").map_err(|e| format!("--out {}: {e}", p.display()))?;
        println!("report: {}", p.display());
    }
    if let Some(p) = &a.html {
        std::fs::write(p, report::html(&rep))
            .map_err(|e| format!("--html {}: {e}", p.display()))?;
        println!("html: {}", p.display());
    }
    if let Some(e) = &result.acked_error {
        eprintln!("switchboard-loadtest: {e}");
        failed = true;
    }
    Ok(if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn cmd_verify(a: VerifyArgs) -> Result<ExitCode, String> {
    let cfg = verify::VerifyConfig {
        brokers: a.brokers,
        topic: a.topic,
        acked: a.acked,
        timeout: a.timeout,
    };
    let rep = verify::verify(&cfg)?;
    let json = serde_json::to_string_pretty(&rep)
        .map_err(|e| format!("cannot serialise the report: {e}"))?;
    println!("{json}");
    Ok(if rep.lost > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn cmd_ceiling(a: CeilingArgs) -> Result<ExitCode, String> {
    let rt = runtime(a.threads)?;
    rt.block_on(ceiling::run(&a.listen))?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => cmd_run(*a),
        Cmd::Verify(a) => cmd_verify(a),
        Cmd::Ceiling(a) => cmd_ceiling(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("switchboard-loadtest: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_every_flag_is_documented() {
        Cli::command().debug_assert();
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            assert!(sub.get_about().is_some(), "{} undocumented", sub.get_name());
            for arg in sub.get_arguments() {
                if matches!(arg.get_id().as_str(), "help" | "version") {
                    continue;
                }
                assert!(
                    arg.get_help().is_some(),
                    "{} --{} has no help",
                    sub.get_name(),
                    arg.get_id()
                );
            }
        }
    }

    fn args(extra: &[&str]) -> RunArgs {
        let mut v = vec!["switchboard-loadtest", "run"];
        v.extend_from_slice(extra);
        match Cli::try_parse_from(v).unwrap().cmd {
            Cmd::Run(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn run_flags_validate_with_clear_errors() {
        let c = run_config(&args(&["--rate", "500", "--duration", "10s"])).unwrap();
        assert_eq!(c.mode, run::Mode::Open { rate: 500.0 });
        assert_eq!(c.duration, Duration::from_secs(10));
        let c = run_config(&args(&[])).unwrap();
        assert_eq!(c.mode, run::Mode::Closed { concurrency: 64 });
        for bad in [
            &["--rate", "0"][..],
            &["--rate", "NaN"],
            &["--rate", "5", "--concurrency", "3"],
            &["--concurrency", "0"],
            &["--dup-ratio", "1.5"],
            &["--mix", "fax=1"],
            &["--target", "https://x"],
            &["--meta-batch", "0"],
            &["--max-in-flight", "0"],
            &["--api-secret", ""],
        ] {
            assert!(run_config(&args(bad)).is_err(), "{bad:?} accepted");
        }
        for bad in [
            &["--mix", "smtp", "--smtp-target", "localhost"][..],
            &["--mix", "smtp", "--smtp-connections", "0"],
            &["--mix", "smtp", "--smtp-size", "10"],
            &["--mix", "smtp", "--smtp-rcpt", "nobody"],
            &["--mix", "smtp", "--smtp-encoding", "7bit"],
            &["--mix", "smtp", "--smtp-attachment-ratio", "2"],
            &["--mix", "none"],
            &["--chat-sessions", "5", "--chat-rate", "0"],
            &["--chat-sessions", "5", "--chat-url", "http://x/v1/chat"],
            &["--chat-sessions", "5", "--chat-customer-secret", ""],
            &["--gateway-pid", "999999999"],
        ] {
            assert!(run_config(&args(bad)).is_err(), "{bad:?} accepted");
        }
        let c = run_config(&args(&[
            "--mix",
            "none",
            "--chat-sessions",
            "100",
            "--target",
            "http://127.0.0.1:18080",
        ]))
        .unwrap();
        let chat = c.chat.unwrap();
        assert_eq!(chat.url, "ws://127.0.0.1:18080/v1/chat");
        assert_eq!((chat.sessions, chat.rate), (100, 0.5));
        assert!(c.mix.is_none() && c.smtp.is_none());
        let c = run_config(&args(&["--mix", "twilio=3,smtp=1", "--smtp-size", "20k"])).unwrap();
        let smtp = c.smtp.unwrap();
        assert_eq!((smtp.mail.size, smtp.connections), (20 * 1024, 16));
        assert_eq!(smtp.mail.encoding, smtp::BodyEncoding::Mixed);
        let me = std::process::id().to_string();
        assert_eq!(
            run_config(&args(&["--gateway-pid", &me]))
                .unwrap()
                .gateway_pid,
            Some(std::process::id())
        );
        // Empty secrets are fine for channels outside the mix.
        assert!(run_config(&args(&["--mix", "events", "--wechat-token", ""])).is_ok());
        // Bad durations are refused by the parser itself.
        assert!(Cli::try_parse_from(["x", "run", "--duration", "0s"]).is_err());
        assert!(Cli::try_parse_from(["x", "run", "--warmup", "soon"]).is_err());
    }
}
