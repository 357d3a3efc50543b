//! `run`: load against a gateway, open loop (`--rate`) or closed loop (`--concurrency`).
//!
//! Open loop: request i is due at `start + i / rate`. The scheduler sleeps until each due time
//! and spawns the request as its own task, so a slow answer never delays the next send; latency
//! is measured from the due time, not from when the request actually left (coordinated-omission
//! free: if the client or the gateway stalls, the stall is in the numbers). At most
//! `--max-in-flight` requests wait at once; a due request over the cap is not sent and counts as
//! a `client_overload` error.
//!
//! Closed loop: `--concurrency` workers each send back-to-back (latency from the actual send);
//! this finds the maximum throughput rather than latency at a given load.
//!
//! `smtp` payloads in the mix go to the SMTP pool (`crate::smtp`) instead of the HTTP client,
//! with the same scheduling and statistics. Chat sessions (`crate::chat`) connect before the
//! measured run starts and then load alongside, with their own statistics. With a gateway pid,
//! its RSS and CPU are sampled every second of the measured window (`crate::resources`).

use crate::acked::AckWriter;
use crate::channels::{Channel, GenConfig, Generator, Payload, Secrets, Signer};
use crate::stats::{Collector, ErrorKind, Outcome, Shared, Stats};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Open loop at a rate, or closed loop with a number of workers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Open { rate: f64 },
    Closed { concurrency: usize },
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub target: String,
    pub mode: Mode,
    pub duration: Duration,
    pub warmup: Duration,
    pub mix: crate::channels::Mix,
    pub dup_ratio: f64,
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub meta_batch: usize,
    pub wechat_account: String,
    pub secrets: Secrets,
    pub acked: Option<PathBuf>,
    /// The SMTP pool for `smtp` in the mix (required when it is there).
    pub smtp: Option<SmtpRun>,
    /// Chat sessions alongside the mix.
    pub chat: Option<crate::chat::ChatSettings>,
    /// The gateway process to sample (RSS, CPU).
    pub gateway_pid: Option<u32>,
    pub progress: bool,
    /// Stop early on Ctrl-C and report what was measured (the CLI; not in tests, where a
    /// process-wide SIGINT handler would outlive the run).
    pub catch_interrupt: bool,
}

/// The SMTP side of a run.
#[derive(Debug, Clone)]
pub struct SmtpRun {
    /// `host:port` of the gateway's SMTP listener.
    pub addr: String,
    pub helo: String,
    pub connections: usize,
    pub mail: crate::smtp::MailSettings,
    pub no_pipelining: bool,
}

/// What the SMTP pool did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpResult {
    pub connections: usize,
    pub opened: u64,
    /// Some connection used PIPELINING / some did not.
    pub pipelined: bool,
    pub unpipelined: bool,
}

/// RLIMIT_NOFILE at start and after raising the soft limit to the hard one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub before: u64,
    pub after: u64,
    pub hard: u64,
    pub needed: u64,
}

pub struct RunResult {
    pub stats: Stats,
    /// The measured window (after warm-up; shorter if interrupted).
    pub measured: Duration,
    pub sent: u64,
    pub acked_written: u64,
    /// A failure writing the acked file (the run itself went on).
    pub acked_error: Option<String>,
    pub interrupted: bool,
    pub smtp: Option<SmtpResult>,
    pub resources: Option<crate::resources::ResourceReport>,
    pub fds: Option<FdLimit>,
}

/// Checks `--target`: `http://host[:port][/prefix]`, no query. Returns it without a trailing `/`.
pub fn validate_target(raw: &str) -> Result<String, String> {
    let uri: hyper::Uri = raw
        .trim()
        .parse()
        .map_err(|e| format!("--target `{raw}`: not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "--target `{raw}`: https is not supported (the gateway speaks plain HTTP/1.1; run the harness next to it)"
            ))
        }
        _ => return Err(format!("--target `{raw}`: use http://host:port")),
    }
    if uri.authority().is_none() {
        return Err(format!("--target `{raw}`: no host"));
    }
    if uri.query().is_some() {
        return Err(format!("--target `{raw}`: no query string, please"));
    }
    Ok(raw.trim().trim_end_matches('/').to_string())
}

/// When request `i` is due, relative to the start (open loop).
pub fn intended_offset(i: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(i as f64 / rate)
}

/// How many requests are due within `window` at `rate` (those with offset < window).
pub fn sends_within(window: Duration, rate: f64) -> u64 {
    let mut n = (window.as_secs_f64() * rate).ceil() as u64;
    // Guard the float edge: make `intended_offset(n - 1) < window <= intended_offset(n)`.
    while n > 0 && intended_offset(n - 1, rate) >= window {
        n -= 1;
    }
    while intended_offset(n, rate) < window {
        n += 1;
    }
    n
}

pub fn client(max_idle: usize, timeout: Duration) -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeout));
    http.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(max_idle)
        .build(http)
}

struct Ctx {
    client: HttpClient,
    signer: Signer,
    timeout: Duration,
    smtp: Option<crate::smtp::Pool>,
}

#[derive(serde::Deserialize)]
struct EventsAnswer {
    id: Option<String>,
    duplicate: Option<bool>,
}

async fn exchange(ctx: &Ctx, p: &Payload) -> Result<(u16, Bytes), ErrorKind> {
    if p.channel == Channel::Smtp {
        // `main` refuses smtp in the mix without an SMTP target, so both are there.
        let (Some(mail), Some(pool)) = (&p.mail, &ctx.smtp) else {
            return Err(ErrorKind::Request);
        };
        return tokio::time::timeout(ctx.timeout, pool.send(mail))
            .await
            .unwrap_or(Err(ErrorKind::Timeout))
            .map(|code| (code, Bytes::new()));
    }
    let out = ctx.signer.request(
        p,
        crate::util::unix_secs(),
        fastrand::u64(1..10_000_000_000),
    );
    let mut b = Request::builder().method(Method::POST).uri(out.uri);
    for (k, v) in out.headers {
        b = b.header(k, v);
    }
    let req = b
        .body(Full::new(out.body))
        .map_err(|_| ErrorKind::Request)?;
    let fut = async {
        let resp = ctx.client.request(req).await.map_err(|e| {
            if e.is_connect() {
                ErrorKind::Connect
            } else {
                ErrorKind::Request
            }
        })?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| ErrorKind::Body)?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(ctx.timeout, fut)
        .await
        .unwrap_or(Err(ErrorKind::Timeout))
}

/// Sends one payload; the outcome with latency from `intended`.
async fn one(ctx: &Ctx, p: &Payload, dup: bool, intended: Instant) -> Outcome {
    let r = exchange(ctx, p).await;
    let done = Instant::now();
    let mut duplicate_answer = false;
    let mut acked = Vec::new();
    let result = match r {
        Ok((status, body)) => {
            if (200..300).contains(&status) {
                if p.channel == Channel::Events {
                    // 202 {"event_id","id","duplicate"}: the record id is the key.
                    if let Ok(a) = serde_json::from_slice::<EventsAnswer>(&body) {
                        duplicate_answer = a.duplicate.unwrap_or(false);
                        acked.extend(a.id);
                    }
                } else {
                    acked.extend(p.keys.iter().cloned());
                }
            }
            Ok(status)
        }
        Err(k) => Err(k),
    };
    Outcome {
        channel: p.channel,
        intended,
        done,
        result,
        dup,
        duplicate_answer,
        acked,
    }
}

/// Decrements the in-flight count when a request task ends, however it ends.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Raises the fd limit and checks the run fits in it.
fn fd_budget(cfg: &RunConfig) -> Result<Option<FdLimit>, String> {
    let (before, after, hard) = match crate::resources::raise_nofile() {
        Ok(x) => x,
        // Not fatal where there is no such limit; the connects will say what is wrong.
        Err(e) => {
            eprintln!("warning: {e}");
            return Ok(None);
        }
    };
    let sessions = cfg.chat.as_ref().map_or(0, |c| c.sessions) as u64;
    let smtp = cfg.smtp.as_ref().map_or(0, |s| s.connections) as u64;
    let http = match cfg.mode {
        Mode::Closed { concurrency } if !cfg.mix.is_none() => concurrency as u64,
        _ => 0,
    };
    let needed = sessions + smtp + http + crate::chat::FD_SLACK;
    crate::chat::check_fds(needed, after, hard)?;
    Ok(Some(FdLimit {
        before,
        after,
        hard,
        needed,
    }))
}

pub async fn run(cfg: RunConfig) -> Result<RunResult, String> {
    let fds = fd_budget(&cfg)?;
    if let (true, Some(f)) = (cfg.progress, fds) {
        eprintln!(
            "file descriptors: soft limit {} raised to {} (hard {}); this run needs about {}",
            f.before, f.after, f.hard, f.needed
        );
    }
    let acked = match &cfg.acked {
        Some(p) => Some(AckWriter::create(p)?),
        None => None,
    };
    let max_idle = match cfg.mode {
        Mode::Open { .. } => cfg.max_in_flight,
        Mode::Closed { concurrency } => concurrency,
    };
    let ctx = Arc::new(Ctx {
        client: client(max_idle, cfg.timeout),
        signer: Signer::new(&cfg.target, cfg.secrets.clone()),
        timeout: cfg.timeout,
        smtp: cfg.smtp.as_ref().map(|s| {
            crate::smtp::Pool::new(
                s.addr.clone(),
                s.helo.clone(),
                s.mail.rcpt.clone(),
                s.connections,
                s.no_pipelining,
            )
        }),
    });
    let gen_cfg = Arc::new(GenConfig::with_mail(
        cfg.mix.clone(),
        cfg.dup_ratio,
        cfg.meta_batch,
        cfg.wechat_account.clone(),
        cfg.smtp
            .as_ref()
            .map_or_else(crate::channels::default_mail, |s| s.mail.clone()),
    ));
    let shared = Arc::new(Shared::default());
    let stop = Arc::new(AtomicBool::new(false));
    if cfg.catch_interrupt {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupted: stopping the load and reporting what was measured");
                stop.store(true, Ordering::Relaxed);
            }
        });
    }

    // Chat sessions connect before the measured run, so the connect storm is not in it.
    let (chat_tx, mut chat_rx) = mpsc::unbounded_channel::<crate::chat::ChatEvent>();
    let sessions = match &cfg.chat {
        Some(c) => Some(
            crate::chat::connect_all(
                Arc::new(c.clone()),
                chat_tx.clone(),
                shared.chat.clone(),
                stop.clone(),
                cfg.progress,
            )
            .await,
        ),
        None => None,
    };
    drop(chat_tx);

    // Start a little ahead so the first due times are not already late.
    let start = Instant::now() + Duration::from_millis(20);
    let measure_start = start + cfg.warmup;
    let end = measure_start + cfg.duration;
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();

    let sampling_done = Arc::new(AtomicBool::new(false));
    // Always sampled: the harness's own CPU is worth knowing even without a gateway pid.
    let sampler = tokio::spawn(crate::resources::sample(
        cfg.gateway_pid,
        measure_start,
        sampling_done.clone(),
    ));

    let collector = {
        let shared = shared.clone();
        let progress = cfg.progress;
        let warmup = cfg.warmup;
        let chat = cfg.chat.as_ref().map(|c| (c.sessions, c.rate));
        tokio::spawn(async move {
            let tty = std::io::stderr().is_terminal();
            let mut c = Collector::new(start, warmup, acked);
            if let Some((n, rate)) = chat {
                c = c.with_chat(n, rate);
            }
            let mut error: Option<String> = None;
            let second = Duration::from_secs(1);
            let mut ticker = tokio::time::interval_at((start + second).into(), second);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut requests_open, mut chat_open) = (true, true);
            while requests_open || chat_open {
                tokio::select! {
                    biased;
                    now = ticker.tick() => {
                        let line = c.tick(now.into_std(), &shared);
                        if progress {
                            if tty {
                                eprint!("\r{line}\x1b[K");
                            } else {
                                eprintln!("{line}");
                            }
                        }
                    }
                    o = rx.recv(), if requests_open => match o {
                        Some(o) => {
                            if let Err(e) = c.record(o) {
                                error.get_or_insert(e);
                            }
                        }
                        None => requests_open = false,
                    },
                    e = chat_rx.recv(), if chat_open => match e {
                        Some(e) => {
                            if let Err(e) = c.record_chat(e) {
                                error.get_or_insert(e);
                            }
                        }
                        None => chat_open = false,
                    },
                }
            }
            if progress && tty {
                eprintln!();
            }
            (c, error)
        })
    };

    // The chat scheduler runs alongside the request load; the sessions drain after it.
    let chat_load = sessions.map(|sessions| {
        let stop = stop.clone();
        tokio::spawn(async move {
            let sessions =
                tokio::task::spawn_blocking(move || sessions.schedule(start, end, stop)).await;
            match sessions {
                Ok(s) => s.finish().await,
                Err(e) => eprintln!("the chat scheduler failed: {e}"),
            }
        })
    });

    let stopped_at = if cfg.mix.is_none() {
        drop(tx);
        // Only chat: the load ends at `end` (or on interrupt).
        while Instant::now() < end && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(
                end.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100)),
            )
            .await;
        }
        Instant::now().min(end)
    } else {
        match cfg.mode {
            Mode::Open { rate } => {
                let handle = tokio::runtime::Handle::current();
                let (ctx, shared, stop) = (ctx.clone(), shared.clone(), stop.clone());
                let max_in_flight = cfg.max_in_flight;
                tokio::task::spawn_blocking(move || {
                    schedule(
                        handle,
                        ctx,
                        gen_cfg,
                        rate,
                        start,
                        end,
                        max_in_flight,
                        tx,
                        shared,
                        stop,
                    )
                })
                .await
                .unwrap_or_else(|e| {
                    eprintln!("the open-loop scheduler failed: {e}");
                    Instant::now()
                })
            }
            Mode::Closed { concurrency } => {
                closed_loop(
                    ctx.clone(),
                    gen_cfg,
                    concurrency,
                    start,
                    end,
                    tx,
                    shared.clone(),
                    stop.clone(),
                )
                .await
            }
        }
    };
    if let Some(h) = chat_load {
        if h.await.is_err() {
            eprintln!("the chat sessions failed");
        }
    }
    let (collector, error) = collector
        .await
        .map_err(|e| format!("the statistics task failed: {e}"))?;
    sampling_done.store(true, Ordering::Relaxed);
    // The sampler takes its last reading at its next tick (within a second).
    let readings = if Instant::now() >= measure_start {
        tokio::time::timeout(Duration::from_secs(2), sampler)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    } else {
        sampler.abort(); // interrupted during warm-up: nothing measured
        Vec::new()
    };
    let resources = Some(crate::resources::summarise(cfg.gateway_pid, &readings));
    let interrupted = stop.load(Ordering::Relaxed);
    let (ok, err) = collector.progress_totals();
    if cfg.progress {
        let scheduled = match cfg.mode {
            Mode::Open { rate } if !cfg.mix.is_none() => format!(
                " of {} scheduled",
                sends_within(cfg.warmup + cfg.duration, rate)
            ),
            _ => String::new(),
        };
        eprintln!(
            "done: sent {}{scheduled}, ok {ok}, errors {err}",
            shared.sent.load(Ordering::Relaxed)
        );
    }
    let (stats, acked_written) = match collector.finish() {
        Ok(x) => x,
        Err(e) => return Err(e),
    };
    Ok(RunResult {
        stats,
        measured: stopped_at.min(end).saturating_duration_since(measure_start),
        sent: shared.sent.load(Ordering::Relaxed),
        acked_written,
        acked_error: error,
        interrupted,
        smtp: ctx.smtp.as_ref().map(|p| SmtpResult {
            connections: p.size,
            opened: p.opened.load(Ordering::Relaxed),
            pipelined: p.pipelining_seen.load(Ordering::Relaxed),
            unpipelined: p.unpipelined_seen.load(Ordering::Relaxed),
        }),
        resources,
        fds,
    })
}

/// The open-loop scheduler; returns when it stopped sending.
///
/// It runs on a blocking thread of its own and sleeps with `std::thread::sleep` (hrtimer,
/// tens of microseconds late at most) rather than tokio's timer, which rounds every deadline up
/// to its 1 ms tick: since latency counts from the due time, a millisecond of scheduler
/// lateness would be added to every figure. Requests are spawned onto the runtime.
#[allow(clippy::too_many_arguments)]
fn schedule(
    handle: tokio::runtime::Handle,
    ctx: Arc<Ctx>,
    gen_cfg: Arc<GenConfig>,
    rate: f64,
    start: Instant,
    end: Instant,
    max_in_flight: usize,
    tx: mpsc::UnboundedSender<Outcome>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) -> Instant {
    let mut gen = Generator::new(gen_cfg, &ctx.signer.secrets);
    let mut i: u64 = 0;
    loop {
        let due = start + intended_offset(i, rate);
        if due >= end || stop.load(Ordering::Relaxed) {
            return Instant::now().min(end);
        }
        i += 1;
        // Sleep in slices so an interrupt is seen even at very low rates.
        loop {
            let now = Instant::now();
            if due <= now || stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(100)));
        }
        let (payload, dup) = gen.next(crate::util::unix_secs());
        shared.sent.fetch_add(1, Ordering::Relaxed);
        if shared.in_flight.load(Ordering::Relaxed) >= max_in_flight {
            let _ = tx.send(Outcome {
                channel: payload.channel,
                intended: due,
                done: due,
                result: Err(ErrorKind::ClientOverload),
                dup,
                duplicate_answer: false,
                acked: Vec::new(),
            });
            continue;
        }
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(shared.clone());
        let ctx = ctx.clone();
        let tx = tx.clone();
        handle.spawn(async move {
            let _guard = guard;
            let o = one(&ctx, &payload, dup, due).await;
            let _ = tx.send(o);
        });
    }
}

/// Closed-loop workers; returns when they stopped sending.
#[allow(clippy::too_many_arguments)]
async fn closed_loop(
    ctx: Arc<Ctx>,
    gen_cfg: Arc<GenConfig>,
    concurrency: usize,
    start: Instant,
    end: Instant,
    tx: mpsc::UnboundedSender<Outcome>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) -> Instant {
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let ctx = ctx.clone();
        let tx = tx.clone();
        let shared = shared.clone();
        let stop = stop.clone();
        let mut gen = Generator::new(gen_cfg.clone(), &ctx.signer.secrets);
        workers.spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            loop {
                let now = Instant::now();
                if now >= end || stop.load(Ordering::Relaxed) {
                    return;
                }
                let (payload, dup) = gen.next(crate::util::unix_secs());
                shared.sent.fetch_add(1, Ordering::Relaxed);
                shared.in_flight.fetch_add(1, Ordering::Relaxed);
                let guard = InFlight(shared.clone());
                let o = one(&ctx, &payload, dup, now).await;
                drop(guard);
                let _ = tx.send(o);
            }
        });
    }
    drop(tx);
    let mut last_stop = Instant::now();
    while let Some(r) = workers.join_next().await {
        if r.is_err() {
            eprintln!("a load worker failed; continuing with the others");
        }
        last_stop = Instant::now();
    }
    // The workers stopped sending at `end` (or on interrupt); their last answers came after.
    if stop.load(Ordering::Relaxed) {
        last_stop.min(end)
    } else {
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intended_times_are_fixed_intervals_from_the_start() {
        assert_eq!(intended_offset(0, 500.0), Duration::ZERO);
        assert_eq!(intended_offset(1, 500.0), Duration::from_millis(2));
        assert_eq!(intended_offset(250, 500.0), Duration::from_millis(500));
        assert_eq!(intended_offset(3, 0.5), Duration::from_secs(6));
        // Independent of how late earlier sends were: i / rate, never accumulated.
        let d = intended_offset(1_000_000_007, 100_000.0);
        assert_eq!(d.as_secs(), 10_000);
        assert!((d.subsec_nanos() as i64 - 70_000).abs() < 100, "{d:?}");
        // 3/s: 0, 1/3, 2/3 within the first second.
        assert!(intended_offset(1, 3.0) < intended_offset(2, 3.0));
        assert_eq!(intended_offset(3, 3.0), Duration::from_secs(1));
    }

    #[test]
    fn sends_per_window() {
        assert_eq!(sends_within(Duration::from_secs(10), 500.0), 5_000);
        assert_eq!(sends_within(Duration::from_secs(1), 3.0), 3);
        assert_eq!(sends_within(Duration::from_secs(10), 0.5), 5);
        assert_eq!(sends_within(Duration::from_millis(2500), 1.0), 3);
        assert_eq!(sends_within(Duration::ZERO, 1000.0), 0);
        assert_eq!(sends_within(Duration::from_secs(30), 7.0), 210);
    }

    #[test]
    fn targets() {
        assert_eq!(
            validate_target("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            validate_target("http://gw.local/prefix").unwrap(),
            "http://gw.local/prefix"
        );
        for bad in [
            "",
            "127.0.0.1:8080",
            "https://gw",
            "ftp://x",
            "http://gw/?a=1",
            "http://",
        ] {
            assert!(validate_target(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// The open-loop scheduler end to end against a tiny local server: the right number of
    /// sends, every one answered, latency from the due time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_against_the_ceiling_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(crate::ceiling::serve(listener));
        let acked = std::env::temp_dir().join(format!("lt-run-{}.jsonl", ulid::Ulid::new()));
        let cfg = RunConfig {
            target: format!("http://{addr}"),
            mode: Mode::Open { rate: 200.0 },
            duration: Duration::from_secs(1),
            warmup: Duration::from_millis(250),
            mix: crate::channels::Mix::parse("events=1,twilio=1,meta=1,wechat=1").unwrap(),
            dup_ratio: 0.0,
            timeout: Duration::from_secs(5),
            max_in_flight: 1000,
            meta_batch: 1,
            wechat_account: "gh_test".into(),
            secrets: Secrets {
                api_secret: "s".into(),
                twilio_auth_token: "t".into(),
                twilio_url: "http://127.0.0.1:8080".into(),
                meta_app_secret: "m".into(),
                wechat_token: "w".into(),
            },
            acked: Some(acked.clone()),
            smtp: None,
            chat: None,
            gateway_pid: None,
            progress: false,
            catch_interrupt: false,
        };
        let r = run(cfg).await.unwrap();
        assert_eq!(r.sent, sends_within(Duration::from_millis(1250), 200.0));
        let t = &r.stats.total;
        assert_eq!(t.count, 200, "the measured second only");
        assert_eq!(t.ok, 200);
        assert_eq!(t.statuses.get(&200), Some(&200));
        assert!(t.percentile(0.5) >= 1);
        // Events against the ceiling: no record id in the answer, so no acked line for them.
        let lines = crate::acked::read(&acked).unwrap();
        assert_eq!(lines.len() as u64, r.acked_written);
        assert!(lines.iter().all(|l| l.channel != "events"));
        assert!(!lines.is_empty());
        std::fs::remove_file(&acked).ok();
    }
}
