//! The chat channel: `--chat-sessions N` websocket sessions on the gateway's `GET /v1/chat`
//! (docs/chat-protocol.md), each sending `--chat-rate M` messages per second.
//!
//! 1. Connect phase, before the measured run: sessions open at `--chat-connect-rate` per
//!    second, each saying `hello` (anonymous, or with a customer token signed with
//!    `--chat-customer-secret`) and waiting for `welcome`; failures are counted by kind
//!    (`connect`, `timeout`, `http_503`, `hello_<code>`, ...).
//! 2. Load: open loop per session. Session i's k-th message is due at `start + (phase_i + k) /
//!    M` with a random phase in [0, 1), so sessions are spread over each period. One scheduler
//!    thread walks all sessions' due times in order and hands each to its session, which sends
//!    at once; ack latency runs from the due time to the `ack` frame (coordinated-omission
//!    free, and not rounded up to tokio's 1 ms timer since the scheduler sleeps on an hrtimer).
//!    With `--dup-ratio` a message re-sends one of the session's recent `client_msg_id`s with
//!    its text: the gateway answers `duplicate: true` with the same record.
//! 3. After the last due time each session waits up to `--timeout` for its outstanding acks,
//!    then closes with 1000. Closes by the gateway are counted by code (`dropped` when the
//!    connection ended without a close frame).

use crate::channels::{customer, TEXTS};
use crate::stats::{new_hist, Series};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The gateway's websocket subprotocol (echoed when offered).
pub const SUBPROTOCOL: &str = "switchboard.chat.v1";

/// The chat part of a run.
#[derive(Debug, Clone)]
pub struct ChatSettings {
    /// `ws://host:port/v1/chat`.
    pub url: String,
    pub sessions: usize,
    /// Messages per second per session.
    pub rate: f64,
    /// Sessions opened per second in the connect phase.
    pub connect_rate: f64,
    /// `Origin` header (needed when the gateway sets `chat.allowed_origins`).
    pub origin: Option<String>,
    /// HS256 secret of the operator's app (`chat.customer_token_secrets`): each session then
    /// says hello with a customer token carrying a distinct phone; otherwise anonymous.
    pub customer_secret: Option<String>,
    pub dup_ratio: f64,
    /// Connect + welcome timeout, and how long outstanding acks are waited for at the end.
    pub timeout: Duration,
}

/// The chat URL for a `--target` base URL: `http://h:p/x` → `ws://h:p/x/v1/chat`.
pub fn url_for(target: &str) -> String {
    let rest = target.strip_prefix("http://").unwrap_or(target);
    format!("ws://{}/v1/chat", rest.trim_end_matches('/'))
}

// ---------------------------------------------------------------------------------------------
// Frames

/// A `hello` frame, optionally with a customer token.
pub fn hello_frame(customer_token: Option<&str>, lang: &str) -> String {
    let mut v = serde_json::json!({ "type": "hello", "lang": lang });
    if let Some(t) = customer_token {
        v["customer_token"] = serde_json::Value::String(t.to_string());
    }
    v.to_string()
}

/// A `message` frame.
pub fn message_frame(client_msg_id: &str, text: &str) -> String {
    serde_json::json!({ "type": "message", "client_msg_id": client_msg_id, "text": text })
        .to_string()
}

/// The server frames the harness reads (docs/chat-protocol.md); others are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        session_id: String,
    },
    Ack {
        client_msg_id: String,
        record_id: String,
        #[serde(default)]
        duplicate: bool,
    },
    Error {
        code: String,
        #[serde(default)]
        client_msg_id: Option<String>,
    },
    Reply {},
    Pong {},
    #[serde(other)]
    Other,
}

pub fn parse_frame(text: &str) -> Option<ServerFrame> {
    serde_json::from_str(text).ok()
}

/// A customer token as the operator's app would sign it (HS256: `phone`, `name`, `exp`).
pub fn customer_token(secret: &str, phone: &str, name: &str, exp: u64) -> Result<String, String> {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        exp: u64,
        phone: &'a str,
        name: &'a str,
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims { exp, phone, name },
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| format!("--chat-customer-secret: cannot sign a token: {e}"))
}

/// A chat line: a complaint text with a detail that makes it unique, so the gateway's
/// same-sender-same-text dedupe does not fold a session's messages together.
pub fn chat_text(rng: &mut fastrand::Rng) -> String {
    let base = TEXTS[rng.usize(0..TEXTS.len())];
    match rng.u8(0..3) {
        0 => format!("{base} 订单号{}", rng.u32(10_000_000..99_999_999)),
        1 => format!("{base} (ticket {})", rng.u32(100_000..999_999)),
        _ => format!("{base} 已经是第{}次反映了", rng.u32(2..50)),
    }
}

// ---------------------------------------------------------------------------------------------
// Events and statistics

/// How a message was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ack {
        duplicate: bool,
        record_id: String,
    },
    /// An `error` frame naming the message (`rate_limited`, `unavailable`, `invalid`, ...).
    Error {
        code: String,
    },
}

/// What the sessions tell the collector.
#[derive(Debug)]
pub enum ChatEvent {
    /// `welcome` received, `latency` after the connect started.
    Connected {
        latency: Duration,
    },
    ConnectFailed {
        kind: String,
    },
    Answer {
        intended: Instant,
        done: Instant,
        answer: Answer,
        /// A re-send of an earlier `client_msg_id`.
        dup: bool,
    },
    /// Sent but neither acked nor refused before the session ended.
    Unanswered {
        intended: Instant,
        dup: bool,
    },
    /// Frames without a `client_msg_id` that the session did not expect, by `error` code.
    StrayError {
        code: String,
    },
    /// How a connected session ended: `ended` (closed by the harness after the run), a close
    /// code sent by the gateway (`1008`), or `dropped` (no close frame).
    Closed {
        how: String,
    },
}

/// Everything measured of the chat sessions.
#[derive(Debug)]
pub struct ChatStats {
    pub sessions: usize,
    pub rate: f64,
    pub connected: u64,
    pub connect_failures: BTreeMap<String, u64>,
    /// Connect to `welcome`, µs (every session, not only the measured window).
    pub connect_hist: Histogram<u64>,
    pub closes: BTreeMap<String, u64>,
    pub stray_errors: BTreeMap<String, u64>,
    // Measured window (by intended send time):
    /// Messages with an outcome: answered or unanswered.
    pub count: u64,
    pub acked: u64,
    pub duplicate_acks: u64,
    pub dup_sent: u64,
    pub errors: BTreeMap<String, u64>,
    pub unanswered: u64,
    /// Due time to `ack`, µs.
    pub hist: Histogram<u64>,
    pub series: Series,
    /// The finished per-second series (filled when the run ends).
    pub points: Vec<crate::stats::SecondPoint>,
}

impl ChatStats {
    pub fn new(sessions: usize, rate: f64) -> Self {
        Self {
            sessions,
            rate,
            connected: 0,
            connect_failures: BTreeMap::new(),
            connect_hist: new_hist(),
            closes: BTreeMap::new(),
            stray_errors: BTreeMap::new(),
            count: 0,
            acked: 0,
            duplicate_acks: 0,
            dup_sent: 0,
            errors: BTreeMap::new(),
            unanswered: 0,
            hist: new_hist(),
            series: Series::default(),
            points: Vec::new(),
        }
    }

    fn us(d: Duration) -> u64 {
        (d.as_micros().min(u128::from(u64::MAX)) as u64).max(1)
    }

    /// Takes one event; `measure_start` splits warm-up from the measured window. Returns the
    /// acknowledged record id, if any (for `--acked`, warm-up included), and the latency for
    /// the progress line.
    pub fn record(
        &mut self,
        e: ChatEvent,
        measure_start: Instant,
    ) -> (Option<String>, Option<u64>) {
        match e {
            ChatEvent::Connected { latency } => {
                self.connected += 1;
                self.connect_hist.saturating_record(Self::us(latency));
            }
            ChatEvent::ConnectFailed { kind } => {
                *self.connect_failures.entry(kind).or_default() += 1
            }
            ChatEvent::Closed { how } => *self.closes.entry(how).or_default() += 1,
            ChatEvent::StrayError { code } => *self.stray_errors.entry(code).or_default() += 1,
            ChatEvent::Unanswered { intended, dup } => {
                if intended >= measure_start {
                    self.count += 1;
                    self.unanswered += 1;
                    if dup {
                        self.dup_sent += 1;
                    }
                }
            }
            ChatEvent::Answer {
                intended,
                done,
                answer,
                dup,
            } => {
                let latency = Self::us(done.saturating_duration_since(intended));
                let (ok, key) = match answer {
                    Answer::Ack {
                        duplicate,
                        record_id,
                    } => {
                        if intended >= measure_start && duplicate {
                            self.duplicate_acks += 1;
                        }
                        (true, Some(record_id))
                    }
                    Answer::Error { code } => {
                        if intended >= measure_start {
                            *self.errors.entry(code).or_default() += 1;
                        }
                        (false, None)
                    }
                };
                if intended >= measure_start {
                    self.count += 1;
                    if dup {
                        self.dup_sent += 1;
                    }
                    if ok {
                        self.acked += 1;
                        self.hist.saturating_record(latency);
                    }
                    let second = done.saturating_duration_since(measure_start).as_secs();
                    self.series.record(second, ok, ok.then_some(latency));
                }
                return (key, ok.then_some(latency));
            }
        }
        (None, None)
    }

    #[cfg(test)]
    pub fn percentile(&self, q: f64) -> u64 {
        if self.hist.is_empty() {
            0
        } else {
            self.hist.value_at_quantile(q)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions

/// Counters the progress line reads.
#[derive(Debug, Default)]
pub struct ChatShared {
    /// Sessions connected and not yet ended.
    pub open: AtomicUsize,
    /// Sessions that finished connecting (or failed to).
    pub settled: AtomicUsize,
    pub sent: AtomicU64,
}

/// How many file descriptors a run needs beyond the chat sessions: stdio, the runtime, the
/// acked and report files, Kafka-free slack.
pub const FD_SLACK: u64 = 64;

/// Checks that `needed` descriptors fit the soft limit.
pub fn check_fds(needed: u64, soft: u64, hard: u64) -> Result<(), String> {
    if needed > soft {
        return Err(format!(
            "this run needs about {needed} file descriptors (chat sessions, SMTP and HTTP connections, {FD_SLACK} spare) but RLIMIT_NOFILE allows {soft} (hard limit {hard}); use fewer --chat-sessions or raise the hard limit (e.g. `ulimit -Hn 1048576` as root, or LimitNOFILE= in a systemd unit)"
        ));
    }
    Ok(())
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: thousands of sessions must not cost tungstenite's 128 KiB read buffer each.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_frame_size(Some(1 << 20))
        .max_message_size(Some(1 << 20))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn connect_error(e: &WsError) -> String {
    match e {
        WsError::Http(resp) => format!("http_{}", resp.status().as_u16()),
        WsError::Io(_) => "connect".into(),
        WsError::Url(_) => "bad_url".into(),
        WsError::Protocol(
            tokio_tungstenite::tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(_),
        ) => "subprotocol".into(),
        _ => "handshake".into(),
    }
}

/// Opens a session: upgrade, `hello`, `welcome`. The error names the failure kind.
async fn open(s: &ChatSettings, token: Option<&str>) -> Result<Ws, String> {
    let mut req = s
        .url
        .as_str()
        .into_client_request()
        .map_err(|_| "bad_url".to_string())?;
    let h = req.headers_mut();
    h.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    if let Some(o) = &s.origin {
        if let Ok(v) = HeaderValue::from_str(o) {
            h.insert("origin", v);
        }
    }
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true)
        .await
        .map_err(|e| connect_error(&e))?;
    let lang = if fastrand::bool() { "zh-CN" } else { "en" };
    ws.send(Message::text(hello_frame(token, lang)))
        .await
        .map_err(|_| "hello_send".to_string())?;
    loop {
        match ws.next().await {
            None | Some(Err(_)) => return Err("dropped".into()),
            Some(Ok(Message::Text(t))) => match parse_frame(&t) {
                Some(ServerFrame::Welcome { .. }) => return Ok(ws),
                Some(ServerFrame::Error { code, .. }) => return Err(format!("hello_{code}")),
                _ => {}
            },
            Some(Ok(Message::Close(f))) => {
                return Err(format!("closed_{}", f.map_or(1005, |f| u16::from(f.code))))
            }
            Some(Ok(_)) => {}
        }
    }
}

/// Runs one session: connect, then send each due time it is handed until the scheduler drops
/// its sender, then wait for the outstanding answers.
async fn session(
    s: Arc<ChatSettings>,
    n: u64,
    mut due: mpsc::UnboundedReceiver<Instant>,
    tx: mpsc::UnboundedSender<ChatEvent>,
    shared: Arc<ChatShared>,
) {
    let started = Instant::now();
    // `main` signed a token with this secret already, so signing cannot fail here.
    let token = s.customer_secret.as_ref().and_then(|secret| {
        let c = customer(n);
        customer_token(secret, &c.phone, c.name, crate::util::unix_secs() + 86_400).ok()
    });
    let opened = tokio::time::timeout(s.timeout, open(&s, token.as_deref())).await;
    let mut ws = match opened {
        Ok(Ok(ws)) => ws,
        Ok(Err(kind)) => {
            let _ = tx.send(ChatEvent::ConnectFailed { kind });
            shared.settled.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(_) => {
            let _ = tx.send(ChatEvent::ConnectFailed {
                kind: "timeout".into(),
            });
            shared.settled.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let _ = tx.send(ChatEvent::Connected {
        latency: started.elapsed(),
    });
    // Counted open before settled: the connect phase ends when every session settled.
    shared.open.fetch_add(1, Ordering::Relaxed);
    shared.settled.fetch_add(1, Ordering::Relaxed);
    let how = converse(&s, &mut ws, &mut due, &tx, &shared).await;
    shared.open.fetch_sub(1, Ordering::Relaxed);
    let _ = tx.send(ChatEvent::Closed { how });
}

/// The load part of a session; how it ended.
async fn converse(
    s: &ChatSettings,
    ws: &mut Ws,
    due: &mut mpsc::UnboundedReceiver<Instant>,
    tx: &mpsc::UnboundedSender<ChatEvent>,
    shared: &ChatShared,
) -> String {
    let mut rng = fastrand::Rng::new();
    // Outstanding messages by client_msg_id (a re-sent id may be outstanding twice).
    let mut pending: HashMap<String, VecDeque<(Instant, bool)>> = HashMap::new();
    let mut outstanding = 0usize;
    // The last few messages, for re-sends.
    let mut recent: VecDeque<(String, String)> = VecDeque::with_capacity(8);
    let mut sending = true;
    let mut drain_until = Instant::now();
    let how: String = loop {
        if !sending && outstanding == 0 {
            break "ended".into();
        }
        tokio::select! {
            biased;
            frame = ws.next() => {
                let done = Instant::now();
                match frame {
                    None | Some(Err(_)) => break "dropped".into(),
                    Some(Ok(Message::Close(f))) => {
                        break f.map_or(1005, |f| u16::from(f.code)).to_string();
                    }
                    Some(Ok(Message::Text(t))) => {
                        let (id, answer) = match parse_frame(&t) {
                            Some(ServerFrame::Ack { client_msg_id, record_id, duplicate }) => {
                                (client_msg_id, Answer::Ack { duplicate, record_id })
                            }
                            Some(ServerFrame::Error { code, client_msg_id: Some(id) }) => {
                                (id, Answer::Error { code })
                            }
                            Some(ServerFrame::Error { code, client_msg_id: None }) => {
                                let _ = tx.send(ChatEvent::StrayError { code });
                                continue;
                            }
                            _ => continue,
                        };
                        let Some(q) = pending.get_mut(&id) else { continue };
                        let Some((intended, dup)) = q.pop_front() else { continue };
                        if q.is_empty() {
                            pending.remove(&id);
                        }
                        outstanding -= 1;
                        let _ = tx.send(ChatEvent::Answer { intended, done, answer, dup });
                    }
                    Some(Ok(_)) => {}
                }
            }
            d = due.recv(), if sending => match d {
                Some(intended) => {
                    let resend = (s.dup_ratio > 0.0 && !recent.is_empty() && rng.f64() < s.dup_ratio)
                        .then(|| recent[rng.usize(0..recent.len())].clone());
                    let dup = resend.is_some();
                    let (id, text) = resend.unwrap_or_else(|| {
                        (format!("lt-{}", ulid::Ulid::new()), chat_text(&mut rng))
                    });
                    if ws.send(Message::text(message_frame(&id, &text))).await.is_err() {
                        let _ = tx.send(ChatEvent::Unanswered { intended, dup });
                        break "dropped".into();
                    }
                    shared.sent.fetch_add(1, Ordering::Relaxed);
                    pending.entry(id.clone()).or_default().push_back((intended, dup));
                    outstanding += 1;
                    if !dup {
                        if recent.len() == 8 {
                            recent.pop_front();
                        }
                        recent.push_back((id, text));
                    }
                }
                None => {
                    sending = false;
                    drain_until = Instant::now() + s.timeout;
                }
            },
            _ = tokio::time::sleep_until(drain_until.into()), if !sending => {
                break "ended".into();
            }
        }
    };
    for (_, q) in pending.drain() {
        for (intended, dup) in q {
            let _ = tx.send(ChatEvent::Unanswered { intended, dup });
        }
    }
    if how == "ended" {
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    }
    how
}

/// The sessions of a run, connected.
pub struct Sessions {
    /// One due-time sender per session (closed for those that failed).
    senders: Vec<mpsc::UnboundedSender<Instant>>,
    /// Each session's phase in [0, 1) of a period.
    phases: Vec<f64>,
    rate: f64,
    pub tasks: tokio::task::JoinSet<()>,
}

/// Opens `s.sessions` sessions at `s.connect_rate` per second and waits until each connected or
/// failed (or `stop` is set). Progress goes to stderr when `progress` is set.
pub async fn connect_all(
    s: Arc<ChatSettings>,
    tx: mpsc::UnboundedSender<ChatEvent>,
    shared: Arc<ChatShared>,
    stop: Arc<AtomicBool>,
    progress: bool,
) -> Sessions {
    let first_customer = fastrand::u64(0..1_000_000_000);
    let mut senders = Vec::with_capacity(s.sessions);
    let mut tasks = tokio::task::JoinSet::new();
    let began = Instant::now();
    let mut last_print = began;
    for i in 0..s.sessions {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // Pace the opening: session i opens at i / connect_rate.
        let at = began + Duration::from_secs_f64(i as f64 / s.connect_rate);
        tokio::time::sleep_until(at.into()).await;
        let (due_tx, due_rx) = mpsc::unbounded_channel();
        senders.push(due_tx);
        tasks.spawn(session(
            s.clone(),
            first_customer + i as u64,
            due_rx,
            tx.clone(),
            shared.clone(),
        ));
        if progress && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "chat: opening sessions {}/{}, connected {}",
                i + 1,
                s.sessions,
                shared.open.load(Ordering::Relaxed)
            );
        }
    }
    let opened = senders.len();
    while shared.settled.load(Ordering::Relaxed) < opened && !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if progress {
        eprintln!(
            "chat: {} of {} sessions connected in {:.1}s",
            shared.open.load(Ordering::Relaxed),
            s.sessions,
            began.elapsed().as_secs_f64()
        );
    }
    let phases = (0..opened).map(|_| fastrand::f64()).collect();
    Sessions {
        senders,
        phases,
        rate: s.rate,
        tasks,
    }
}

impl Sessions {
    /// The scheduler (run on a blocking thread): hands every session its due times from
    /// `start` until `end`, in time order; dropping the senders at the end tells the sessions
    /// to finish. Sleeps with `std::thread::sleep` (hrtimer) for the same reason as the
    /// open-loop scheduler in `run`.
    pub fn schedule(self: Sessions, start: Instant, end: Instant, stop: Arc<AtomicBool>) -> Self {
        let mut order: Vec<usize> = (0..self.senders.len()).collect();
        order.sort_by(|a, b| self.phases[*a].total_cmp(&self.phases[*b]));
        let mut live = vec![true; self.senders.len()];
        let mut k: u64 = 0;
        'rounds: loop {
            for &i in &order {
                let due = start + Duration::from_secs_f64((self.phases[i] + k as f64) / self.rate);
                if due >= end || stop.load(Ordering::Relaxed) {
                    break 'rounds;
                }
                if !live[i] {
                    continue;
                }
                loop {
                    let now = Instant::now();
                    if due <= now || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep((due - now).min(Duration::from_millis(100)));
                }
                if self.senders[i].send(due).is_err() {
                    live[i] = false; // the session ended (failed to connect, or was closed)
                }
            }
            k += 1;
        }
        self
    }

    /// Ends the load: the sessions drain their outstanding acks and close.
    pub async fn finish(self) {
        let Sessions {
            senders, mut tasks, ..
        } = self;
        drop(senders);
        while let Some(r) = tasks.join_next().await {
            if r.is_err() {
                eprintln!("a chat session task failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn frames_have_the_documented_shape() {
        let v: serde_json::Value = serde_json::from_str(&hello_frame(None, "zh-CN")).unwrap();
        assert_eq!(v["type"], "hello");
        assert_eq!(v["lang"], "zh-CN");
        assert!(v.get("customer_token").is_none());
        let v: serde_json::Value = serde_json::from_str(&hello_frame(Some("t.k.n"), "en")).unwrap();
        assert_eq!(v["customer_token"], "t.k.n");
        let v: serde_json::Value =
            serde_json::from_str(&message_frame("lt-1", "光猫红灯 \"quoted\"")).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["client_msg_id"], "lt-1");
        assert_eq!(v["text"], "光猫红灯 \"quoted\"");
        assert_eq!(
            parse_frame(
                r#"{"type":"ack","client_msg_id":"m","record_id":"01K","reference":"x","duplicate":true}"#
            ),
            Some(ServerFrame::Ack {
                client_msg_id: "m".into(),
                record_id: "01K".into(),
                duplicate: true
            })
        );
        assert_eq!(
            parse_frame(
                r#"{"type":"error","code":"rate_limited","message":"m","client_msg_id":"a","retry_after_ms":5}"#
            ),
            Some(ServerFrame::Error {
                code: "rate_limited".into(),
                client_msg_id: Some("a".into())
            })
        );
        assert_eq!(
            parse_frame(
                r#"{"type":"welcome","session_id":"S","token":"t","resumed":false,"customer":"anonymous","last_seq":0,"heartbeat_ms":25000,"max_text_chars":4000}"#
            ),
            Some(ServerFrame::Welcome {
                session_id: "S".into()
            })
        );
        assert_eq!(
            parse_frame(r#"{"type":"reply","seq":3,"text":"t","at":"x"}"#),
            Some(ServerFrame::Reply {})
        );
        assert_eq!(
            parse_frame(r#"{"type":"pong"}"#),
            Some(ServerFrame::Pong {})
        );
        assert_eq!(
            parse_frame(r#"{"type":"future_thing","x":1}"#),
            Some(ServerFrame::Other)
        );
        assert_eq!(parse_frame("not json"), None);
        assert_eq!(
            url_for("http://127.0.0.1:8080/"),
            "ws://127.0.0.1:8080/v1/chat"
        );
        // Generated ids fit the gateway's client_msg_id rule: 1-64 of A-Z a-z 0-9 . _ : -
        let id = format!("lt-{}", ulid::Ulid::new());
        assert!(id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    }

    #[test]
    fn customer_tokens_are_hs256_jwts_with_phone() {
        let t = customer_token("app-secret", "+8613800000001", "张伟", 2_000_000_000).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.validate_exp = false;
        let d = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &jsonwebtoken::DecodingKey::from_secret(b"app-secret"),
            &v,
        )
        .unwrap();
        assert_eq!(d.claims["phone"], "+8613800000001");
        assert_eq!(d.claims["exp"], 2_000_000_000u64);
    }

    #[test]
    fn fd_budget() {
        assert!(check_fds(10_064, 20_000, 20_000).is_ok());
        let e = check_fds(30_000, 20_000, 20_000).unwrap_err();
        assert!(e.contains("30000") && e.contains("20000"), "{e}");
    }

    #[test]
    fn stats_split_warmup_and_count_answers() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut s = ChatStats::new(2, 1.0);
        s.record(
            ChatEvent::Connected {
                latency: Duration::from_millis(3),
            },
            ms(1000),
        );
        s.record(
            ChatEvent::ConnectFailed {
                kind: "http_503".into(),
            },
            ms(1000),
        );
        // Warm-up: the record id is still returned (for --acked) but nothing is counted.
        let (key, _) = s.record(
            ChatEvent::Answer {
                intended: ms(500),
                done: ms(502),
                answer: Answer::Ack {
                    duplicate: false,
                    record_id: "R0".into(),
                },
                dup: false,
            },
            ms(1000),
        );
        assert_eq!(key.as_deref(), Some("R0"));
        for i in 0..10 {
            s.record(
                ChatEvent::Answer {
                    intended: ms(1000 + i * 100),
                    done: ms(1000 + i * 100 + 4),
                    answer: Answer::Ack {
                        duplicate: i == 3,
                        record_id: format!("R{i}"),
                    },
                    dup: i == 3,
                },
                ms(1000),
            );
        }
        s.record(
            ChatEvent::Answer {
                intended: ms(2500),
                done: ms(2501),
                answer: Answer::Error {
                    code: "rate_limited".into(),
                },
                dup: false,
            },
            ms(1000),
        );
        s.record(
            ChatEvent::Unanswered {
                intended: ms(2600),
                dup: false,
            },
            ms(1000),
        );
        s.record(
            ChatEvent::Closed {
                how: "ended".into(),
            },
            ms(1000),
        );
        assert_eq!((s.connected, s.connect_failures["http_503"]), (1, 1));
        assert_eq!(
            (s.count, s.acked, s.duplicate_acks, s.dup_sent),
            (12, 10, 1, 1)
        );
        assert_eq!((s.errors["rate_limited"], s.unanswered), (1, 1));
        let p50 = s.percentile(0.5);
        assert!((3_990..=4_010).contains(&p50), "{p50}");
        assert_eq!(s.closes["ended"], 1);
    }

    /// A fake chat server: welcome after hello, then an ack for each message (the same record
    /// id for a re-sent client_msg_id, with duplicate: true), and `rate_limited` for text
    /// containing "limit".
    async fn fake_gateway(listener: TcpListener, sessions: usize) {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..sessions {
            let (tcp, _) = listener.accept().await.unwrap();
            tasks.spawn(async move {
                // Like the gateway: the subprotocol is echoed when offered, the origin checked.
                #[allow(clippy::result_large_err)]
                let echo = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                            mut resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                    assert_eq!(req.headers()["origin"], "http://example.com");
                    assert_eq!(req.headers()["sec-websocket-protocol"], SUBPROTOCOL);
                    resp.headers_mut().insert(
                        "sec-websocket-protocol",
                        HeaderValue::from_static(SUBPROTOCOL),
                    );
                    Ok(resp)
                };
                let mut ws = tokio_tungstenite::accept_hdr_async(tcp, echo).await.unwrap();
                let mut seen: HashMap<String, String> = HashMap::new();
                while let Some(Ok(m)) = ws.next().await {
                    let Message::Text(t) = m else { continue };
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    let reply = match v["type"].as_str().unwrap() {
                        "hello" => serde_json::json!({"type":"welcome","session_id":"S","token":"t","resumed":false,"customer":"anonymous","last_seq":0,"heartbeat_ms":25000,"max_text_chars":4000}),
                        "message" => {
                            let id = v["client_msg_id"].as_str().unwrap().to_string();
                            let dup = seen.contains_key(&id);
                            let rec = seen
                                .entry(id.clone())
                                .or_insert_with(|| ulid::Ulid::new().to_string())
                                .clone();
                            serde_json::json!({"type":"ack","client_msg_id":id,"record_id":rec,"reference":"x","duplicate":dup})
                        }
                        _ => continue,
                    };
                    ws.send(Message::text(reply.to_string())).await.unwrap();
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_connect_send_on_schedule_and_match_acks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(fake_gateway(listener, 3));
        let s = Arc::new(ChatSettings {
            url: format!("ws://{addr}/v1/chat"),
            sessions: 3,
            rate: 20.0,
            connect_rate: 100.0,
            origin: Some("http://example.com".into()),
            customer_secret: None,
            dup_ratio: 0.3,
            timeout: Duration::from_secs(5),
        });
        let (tx, mut rx) = mpsc::unbounded_channel();
        let shared = Arc::new(ChatShared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = connect_all(s.clone(), tx, shared.clone(), stop.clone(), false).await;
        assert_eq!(shared.open.load(Ordering::Relaxed), 3);
        let start = Instant::now() + Duration::from_millis(10);
        let end = start + Duration::from_millis(500);
        let sessions = tokio::task::spawn_blocking(move || sessions.schedule(start, end, stop))
            .await
            .unwrap();
        sessions.finish().await;
        server.abort();
        let mut stats = ChatStats::new(3, 20.0);
        let mut keys = Vec::new();
        while let Ok(e) = rx.try_recv() {
            if let (Some(k), _) = stats.record(e, start) {
                keys.push(k);
            }
        }
        assert_eq!(stats.connected, 3);
        // 3 sessions × 20/s × 0.5 s: exactly 10 due times each.
        assert_eq!(stats.count, 30);
        assert_eq!(stats.acked, 30, "{stats:?}");
        assert_eq!(stats.unanswered, 0);
        assert_eq!(stats.closes.get("ended"), Some(&3));
        assert!(stats.dup_sent > 0, "30% re-sends expected among 30");
        assert_eq!(stats.duplicate_acks, stats.dup_sent);
        assert_eq!(shared.sent.load(Ordering::Relaxed), 30);
        let distinct: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(distinct.len() as u64, 30 - stats.dup_sent);
    }

    #[tokio::test]
    async fn refused_upgrades_and_dead_servers_are_counted_by_kind() {
        // An HTTP server answering 503 to the upgrade.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            tcp.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nretry-after: 5\r\n\r\n",
            )
            .await
            .unwrap();
        });
        let mut s = ChatSettings {
            url: format!("ws://{addr}/v1/chat"),
            sessions: 1,
            rate: 1.0,
            connect_rate: 10.0,
            origin: None,
            customer_secret: None,
            dup_ratio: 0.0,
            timeout: Duration::from_secs(5),
        };
        assert_eq!(open(&s, None).await.err().unwrap(), "http_503");
        server.await.unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        s.url = format!("ws://{}/v1/chat", l.local_addr().unwrap());
        drop(l);
        assert_eq!(open(&s, None).await.err().unwrap(), "connect");
    }
}
