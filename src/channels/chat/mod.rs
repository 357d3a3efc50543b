//! Web chat: websocket sessions on `GET /v1/chat` (docs/chat-protocol.md) and the widget page on
//! `GET /chat`.
//!
//! A session acknowledges a message only once the pipeline made it durable, answers a resent
//! `client_msg_id` with the same record id (the pipeline's provider-id dedupe, keyed by session),
//! and delivers replies from its outbox by `seq`, so a resumed session gets what it missed once.
//! Each connection is one task; submissions run as their own tasks so a record whose client went
//! away still lands (and its resend is then a duplicate, not a second record).
//!
//! Limits: sessions per instance (503 on upgrade), upgrades per source address (the pipeline's
//! source limit, 429), frame and message size (tungstenite, close 1009), frames per second (close
//! 1008), messages per minute (error `rate_limited`, then close 1008), hello and idle timeouts,
//! heartbeats, and a write timeout so a client that stops reading is cut instead of buffered.
//! Protocol violations close with 1002, text that is not UTF-8 with 1007.

pub mod outbox;
pub mod protocol;
pub mod token;

use crate::config::ChatConfig;
use crate::error::{Reason, Rejection};
use crate::http::{rejection_response, Resp};
use crate::identity::{RawIdentity, SocialId};
use crate::pipeline::{Accepted, Pipeline, RequestCtx};
use crate::record::{ChannelKind, Intake};
use crate::telemetry;
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use outbox::{Attached, Outboxes};
use protocol::{ClientFrame, ServerFrame};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use token::{Tokens, Verified};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const CHANNEL: &str = "chat";
pub const PROVIDER: &str = "webchat";
pub const SUBPROTOCOL: &str = "switchboard.chat.v1";
const WIDGET: &str = include_str!("../../../static/chat.html");
/// The widget talks only to its own origin; who may frame it follows `chat.allowed_origins`.
const WIDGET_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors";

pub struct Chat {
    cfg: ChatConfig,
    pipeline: Arc<Pipeline>,
    tokens: Tokens,
    outboxes: Arc<Outboxes>,
    sessions: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    ws_config: WebSocketConfig,
    widget_csp: HeaderValue,
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// How a connection ended, for the close counter.
#[derive(Debug, Clone, Copy)]
enum End {
    Client,
    Idle,
    DeadPeer,
    NoHello,
    BadToken,
    Abuse,
    TooBig,
    Binary,
    SlowReader,
    Shutdown,
    Protocol,
    BadUtf8,
}

impl End {
    fn label(self) -> &'static str {
        match self {
            End::Client => "client",
            End::Idle => "idle",
            End::DeadPeer => "dead_peer",
            End::NoHello => "no_hello",
            End::BadToken => "bad_token",
            End::Abuse => "abuse",
            End::TooBig => "too_big",
            End::Binary => "binary",
            End::SlowReader => "slow_reader",
            End::Shutdown => "shutdown",
            End::Protocol => "protocol_error",
            End::BadUtf8 => "invalid_utf8",
        }
    }
}

impl Chat {
    pub fn new(
        cfg: ChatConfig,
        pipeline: Arc<Pipeline>,
        outboxes: Arc<Outboxes>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        if cfg.session_secrets.is_empty() {
            tracing::warn!("chat.session_secrets is empty: a random secret is used, so chat sessions cannot resume across restarts or instances");
        }
        // Frames are written eagerly (write_buffer_size 0) and each send waits for its flush, so
        // the write buffer holds at most one frame: the largest reply (4 bytes a character at
        // worst, plus the JSON around it) or error.
        let largest_frame = cfg.max_reply_chars * 4 + 4096;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_write_buffer_size(largest_frame + 16 * 1024)
            .max_frame_size(Some(cfg.max_frame_bytes))
            .max_message_size(Some(cfg.max_message_bytes));
        let ancestors = if cfg.allowed_origins.is_empty() {
            "*".to_string()
        } else {
            cfg.allowed_origins.join(" ")
        };
        let widget_csp = HeaderValue::from_str(&format!("{WIDGET_CSP} {ancestors}"))
            .unwrap_or_else(|_| HeaderValue::from_static(WIDGET_CSP));
        Arc::new(Self {
            widget_csp,
            tokens: Tokens::new(
                &cfg.session_secrets,
                &cfg.customer_token_secrets,
                cfg.session_ttl_secs,
            ),
            sessions: Arc::new(Semaphore::new(cfg.max_sessions)),
            cfg,
            pipeline,
            outboxes,
            tracker: TaskTracker::new(),
            shutdown,
            ws_config,
        })
    }

    pub fn outboxes(&self) -> &Arc<Outboxes> {
        &self.outboxes
    }

    pub fn widget_enabled(&self) -> bool {
        self.cfg.widget
    }

    /// Waits (up to `grace`) for sessions and their in-flight messages after shutdown began.
    pub async fn drain(&self, grace: Duration) {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("chat sessions still open after the grace period");
        }
    }

    /// `GET /chat`: the widget page.
    pub fn widget(&self, req: &Request<Incoming>) -> Resp {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = rejection_response(&Rejection::new(Reason::MethodNotAllowed, "use GET"));
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let mut resp = Response::new(Full::new(Bytes::from_static(WIDGET.as_bytes())));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        h.insert(header::CONTENT_SECURITY_POLICY, self.widget_csp.clone());
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    }

    /// `GET /v1/chat`: checks the upgrade request, answers 101 and runs the session.
    pub async fn upgrade(self: &Arc<Self>, mut req: Request<Incoming>, ctx: RequestCtx) -> Resp {
        match self.check_upgrade(&req, &ctx).await {
            Err(r) => {
                r.count(CHANNEL);
                tracing::info!(
                    channel = CHANNEL,
                    reason = r.reason.code(),
                    "upgrade refused"
                );
                let mut resp = rejection_response(&r);
                match r.reason {
                    Reason::MethodNotAllowed => {
                        resp.headers_mut()
                            .insert(header::ALLOW, HeaderValue::from_static("GET"));
                    }
                    Reason::InvalidEvent if r.message.contains("version") => {
                        *resp.status_mut() = StatusCode::UPGRADE_REQUIRED;
                        resp.headers_mut()
                            .insert("sec-websocket-version", HeaderValue::from_static("13"));
                    }
                    _ => {}
                }
                resp
            }
            Ok((accept, protocol, permit)) => {
                let on_upgrade = hyper::upgrade::on(&mut req);
                let me = self.clone();
                self.tracker.spawn(async move {
                    let upgraded = match on_upgrade.await {
                        Ok(u) => u,
                        Err(e) => {
                            tracing::debug!(error = %e, "websocket upgrade did not complete");
                            return;
                        }
                    };
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(me.ws_config),
                    )
                    .await;
                    metrics::gauge!(telemetry::CHAT_SESSIONS).increment(1.0);
                    let end = Session::new(me.clone(), ws, ctx).run().await;
                    metrics::gauge!(telemetry::CHAT_SESSIONS).decrement(1.0);
                    metrics::counter!(telemetry::CHAT_CLOSES, "reason" => end.label()).increment(1);
                    drop(permit);
                });
                let mut resp = Response::new(Full::new(Bytes::new()));
                *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                let h = resp.headers_mut();
                h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                if let Ok(v) = HeaderValue::from_str(&accept) {
                    h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
                }
                if protocol {
                    h.insert(
                        header::SEC_WEBSOCKET_PROTOCOL,
                        HeaderValue::from_static(SUBPROTOCOL),
                    );
                }
                resp
            }
        }
    }

    async fn check_upgrade(
        &self,
        req: &Request<Incoming>,
        ctx: &RequestCtx,
    ) -> Result<(String, bool, OwnedSemaphorePermit), Rejection> {
        if req.method() != Method::GET {
            return Err(Rejection::new(
                Reason::MethodNotAllowed,
                "open the chat with a GET websocket upgrade",
            ));
        }
        self.pipeline.admit(ctx).await?;
        let h = req.headers();
        let has_token = |name: header::HeaderName, token: &str| {
            h.get_all(name).iter().any(|v| {
                v.to_str()
                    .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                    .unwrap_or(false)
            })
        };
        if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
            return Err(Rejection::new(
                Reason::InvalidEvent,
                "expected a websocket upgrade (Connection: upgrade, Upgrade: websocket)",
            ));
        }
        if h.get(header::SEC_WEBSOCKET_VERSION)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            != Some("13")
        {
            return Err(Rejection::new(
                Reason::InvalidEvent,
                "unsupported websocket version (13 is spoken)",
            ));
        }
        let key = h
            .get(header::SEC_WEBSOCKET_KEY)
            .map(|v| v.as_bytes().trim_ascii())
            .filter(|k| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(k)
                    .map(|d| d.len() == 16)
                    .unwrap_or(false)
            })
            .ok_or_else(|| {
                Rejection::new(
                    Reason::InvalidEvent,
                    "Sec-WebSocket-Key must be 16 bytes in base64",
                )
            })?;
        if !self.cfg.allowed_origins.is_empty() {
            let origin = h.get(header::ORIGIN).and_then(|v| v.to_str().ok());
            if !origin.is_some_and(|o| self.cfg.allowed_origins.iter().any(|a| a == o)) {
                return Err(Rejection::new(
                    Reason::Forbidden,
                    "origin not allowed to open the chat",
                ));
            }
        }
        let protocol = has_token(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL);
        let permit = self.sessions.clone().try_acquire_owned().map_err(|_| {
            Rejection::new(Reason::Overloaded, "too many chat sessions; retry later")
                .retry_after(Duration::from_secs(5))
        })?;
        Ok((
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(key),
            protocol,
            permit,
        ))
    }
}

/// The identity a session settled on in its `hello`.
struct Established {
    session_id: String,
    identity: RawIdentity,
    verified: bool,
    lang: Option<String>,
}

type Submitted = futures_util::future::BoxFuture<'static, (String, Result<Accepted, Rejection>)>;

struct Session {
    chat: Arc<Chat>,
    ws: Ws,
    ctx: RequestCtx,
    frames: DefaultDirectRateLimiter,
    messages: DefaultDirectRateLimiter,
    violations: u32,
    last_heard: Instant,
    last_active: Instant,
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).expect("at least 1")
}

impl Session {
    fn new(chat: Arc<Chat>, ws: Ws, ctx: RequestCtx) -> Self {
        let c = &chat.cfg;
        let frames = RateLimiter::direct(Quota::per_second(nz(c.frames_per_second)));
        let messages = RateLimiter::direct(
            Quota::per_minute(nz(c.messages_per_minute)).allow_burst(nz(c.message_burst)),
        );
        let now = Instant::now();
        Self {
            chat,
            ws,
            ctx,
            frames,
            messages,
            violations: 0,
            last_heard: now,
            last_active: now,
        }
    }

    async fn run(mut self) -> End {
        let (est, last_seq) = match self.hello().await {
            Ok(x) => x,
            Err(end) => return end,
        };
        self.serve(est, last_seq).await
    }

    /// Sends one frame, waiting at most the write timeout (a client that stops reading is cut).
    async fn send(&mut self, msg: Message) -> Result<(), End> {
        let wt = Duration::from_millis(self.chat.cfg.write_timeout_ms);
        match tokio::time::timeout(wt, self.ws.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(WsError::WriteBufferFull(_))) => Err(End::SlowReader),
            Ok(Err(_)) => Err(End::Client),
            Err(_) => Err(End::SlowReader),
        }
    }

    async fn send_frame(&mut self, f: ServerFrame<'_>) -> Result<(), End> {
        self.send(Message::text(f.to_json())).await
    }

    async fn error(
        &mut self,
        code: &'static str,
        message: &str,
        client_msg_id: Option<&str>,
        retry_after_ms: Option<u64>,
    ) -> Result<(), End> {
        metrics::counter!(telemetry::REJECTIONS, "channel" => CHANNEL, "reason" => code)
            .increment(1);
        self.send_frame(ServerFrame::Error {
            code,
            message,
            client_msg_id,
            retry_after_ms,
        })
        .await
    }

    /// Sends a close frame (bounded by the write timeout) and reports `end`.
    async fn close(&mut self, code: CloseCode, reason: &'static str, end: End) -> End {
        let wt = Duration::from_millis(self.chat.cfg.write_timeout_ms);
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(wt, self.ws.close(Some(frame))).await;
        end
    }

    /// Applies the frame-rate limit to every frame received.
    fn frame_allowed(&mut self) -> bool {
        self.last_heard = Instant::now();
        self.frames.check().is_ok()
    }

    /// Maps a read error to how the connection ends (oversize → 1009, protocol → 1002, bad
    /// UTF-8 → 1007).
    async fn read_error(&mut self, e: WsError) -> End {
        match e {
            WsError::Capacity(_) => {
                self.close(CloseCode::Size, "frame or message too big", End::TooBig)
                    .await
            }
            WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_) => End::Client,
            // RFC 6455 7.4.1: 1002 for a protocol violation, 1007 for text that is not UTF-8.
            WsError::Protocol(_) => {
                self.close(CloseCode::Protocol, "protocol error", End::Protocol)
                    .await
            }
            WsError::Utf8(_) => {
                self.close(CloseCode::Invalid, "text frame is not UTF-8", End::BadUtf8)
                    .await
            }
            _ => End::Protocol,
        }
    }

    /// Waits for the `hello` and settles the session's identity; answers with `welcome`.
    async fn hello(&mut self) -> Result<(Established, u64), End> {
        let deadline = Instant::now() + Duration::from_secs(self.chat.cfg.hello_timeout_secs);
        let hello = loop {
            let shutdown = self.chat.shutdown.clone();
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    return Err(self
                        .close(CloseCode::Away, "gateway shutting down", End::Shutdown)
                        .await);
                }
                n = tokio::time::timeout_at(deadline, self.ws.next()) => n,
            };
            let msg = match next {
                Err(_) => {
                    let _ = self
                        .error("hello_required", "no hello received in time", None, None)
                        .await;
                    return Err(self
                        .close(CloseCode::Policy, "no hello", End::NoHello)
                        .await);
                }
                Ok(None) => return Err(End::Client),
                Ok(Some(Err(e))) => return Err(self.read_error(e).await),
                Ok(Some(Ok(m))) => m,
            };
            if !self.frame_allowed() {
                return Err(self
                    .close(CloseCode::Policy, "too many frames", End::Abuse)
                    .await);
            }
            match msg {
                Message::Text(t) => match protocol::parse(&t) {
                    Ok(ClientFrame::Hello {
                        token,
                        customer_token,
                        last_seq,
                        lang,
                    }) => break (token, customer_token, last_seq, lang),
                    Ok(ClientFrame::Ping) => self.send_frame(ServerFrame::Pong).await?,
                    Ok(_) => {
                        let _ = self
                            .error("hello_required", "send hello first", None, None)
                            .await;
                        return Err(self
                            .close(CloseCode::Policy, "hello required", End::NoHello)
                            .await);
                    }
                    Err(m) => {
                        let _ = self.error("bad_frame", &m, None, None).await;
                        return Err(self
                            .close(CloseCode::Policy, "hello required", End::NoHello)
                            .await);
                    }
                },
                Message::Binary(_) => return Err(self.binary().await),
                Message::Close(_) => return Err(End::Client),
                _ => {}
            }
        };
        let (token, customer_token, last_seq, lang) = hello;
        match self.establish(token, customer_token, lang) {
            Ok((est, resumed, customer)) => {
                let session_token = self.chat.tokens.issue(&est.session_id, customer.as_ref());
                let last = self.chat.outboxes.last_seq(&est.session_id);
                self.send_frame(ServerFrame::Welcome {
                    session_id: &est.session_id,
                    token: &session_token,
                    resumed,
                    customer: if est.verified {
                        "verified"
                    } else {
                        "anonymous"
                    },
                    last_seq: last,
                    heartbeat_ms: self.chat.cfg.heartbeat_secs * 1000,
                    max_text_chars: self.chat.cfg.max_text_chars,
                })
                .await?;
                let from = if resumed { last_seq.unwrap_or(0) } else { 0 };
                Ok((est, from))
            }
            Err((code, message)) => {
                let _ = self.error(code, message, None, None).await;
                Err(self
                    .close(CloseCode::Policy, "bad token", End::BadToken)
                    .await)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn establish(
        &self,
        token: Option<String>,
        customer_token: Option<String>,
        lang: Option<String>,
    ) -> Result<(Established, bool, Option<Verified>), (&'static str, &'static str)> {
        let tokens = &self.chat.tokens;
        let from_app = match customer_token.as_deref().filter(|t| !t.is_empty()) {
            Some(t) => Some(tokens.verify_customer(t).map_err(|_| {
                (
                    "bad_customer_token",
                    "customer token is invalid, expired or not accepted here",
                )
            })?),
            None => None,
        };
        let (session_id, resumed, from_session) = match token.as_deref().filter(|t| !t.is_empty()) {
            Some(t) => {
                let (sid, cust) = tokens.verify_session(t).map_err(|_| {
                    (
                        "bad_token",
                        "session token is invalid or expired; start a new session",
                    )
                })?;
                (sid, true, cust)
            }
            None => (ulid::Ulid::new().to_string(), false, None),
        };
        // A different customer's token never takes over a session: it starts a new one.
        let (session_id, resumed) = match (&from_app, &from_session) {
            (Some(a), Some(s)) if a.phone != s.phone || a.cid != s.cid => {
                (ulid::Ulid::new().to_string(), false)
            }
            (Some(_), None) if resumed => (ulid::Ulid::new().to_string(), false),
            _ => (session_id, resumed),
        };
        let customer = from_app.or(from_session);
        if customer.is_none() && !self.chat.cfg.allow_anonymous {
            return Err(("bad_customer_token", "a customer token is required"));
        }
        let identity = match &customer {
            Some(v) => RawIdentity {
                phone: v.phone.clone(),
                customer_id: v.cid.clone(),
                name: v.name.clone(),
                ..Default::default()
            },
            None => RawIdentity {
                social: Some(SocialId {
                    platform: PROVIDER.into(),
                    account: None,
                    id: session_id.clone(),
                    handle: None,
                }),
                ..Default::default()
            },
        };
        // Fail now, not on every message, if the app's phone does not normalise.
        self.chat
            .pipeline
            .normalizer()
            .normalize(identity.clone())
            .map_err(|_| {
                (
                    "bad_customer_token",
                    "customer token carries a phone number that is not valid",
                )
            })?;
        let lang = lang
            .filter(|l| (2..=16).contains(&l.len()))
            .filter(|l| l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        Ok((
            Established {
                session_id,
                identity,
                verified: customer.is_some(),
                lang,
            },
            resumed,
            customer,
        ))
    }

    async fn binary(&mut self) -> End {
        let _ = self
            .error(
                "binary_unsupported",
                "binary frames are not supported; send JSON text frames",
                None,
                None,
            )
            .await;
        self.close(
            CloseCode::Unsupported,
            "binary frames unsupported",
            End::Binary,
        )
        .await
    }

    async fn deliver(&mut self, attached: &Attached, delivered: &mut u64) -> Result<(), End> {
        for r in attached.since(*delivered) {
            self.send_frame(ServerFrame::Reply {
                seq: r.seq,
                text: &r.text,
                at: &r.at,
                reply_id: r.reply_id.as_deref(),
                in_reply_to: r.in_reply_to.as_deref(),
            })
            .await?;
            *delivered = r.seq;
            metrics::counter!(telemetry::CHAT_REPLIES, "outcome" => "delivered").increment(1);
        }
        Ok(())
    }

    async fn serve(&mut self, est: Established, mut delivered: u64) -> End {
        let key = self
            .chat
            .pipeline
            .normalizer()
            .normalize(est.identity.clone())
            .map(|i| i.key)
            .ok();
        let mut attached = self.chat.outboxes.attach(&est.session_id, key.as_deref());
        attached.changed.mark_changed();
        let cfg = self.chat.cfg.clone();
        let heartbeat = Duration::from_secs(cfg.heartbeat_secs);
        let mut tick = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        let idle = Duration::from_secs(cfg.idle_timeout_secs);
        let mut inflight: FuturesUnordered<Submitted> = FuturesUnordered::new();
        let shutdown = self.chat.shutdown.clone();
        let result: Result<End, End> = async {
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        // Let accepted messages finish and be acknowledged first.
                        while let Some(done) = inflight.next().await {
                            self.acknowledge(done).await?;
                        }
                        return Ok(self.close(CloseCode::Away, "gateway shutting down", End::Shutdown).await);
                    }
                    Some(done) = inflight.next(), if !inflight.is_empty() => {
                        self.acknowledge(done).await?;
                    }
                    r = attached.changed.changed() => {
                        if r.is_ok() {
                            self.deliver(&attached, &mut delivered).await?;
                        }
                    }
                    _ = tick.tick() => {
                        // While reading is paused (max_in_flight) pongs wait unread: not a dead peer.
                        if inflight.len() < cfg.max_in_flight && self.last_heard.elapsed() > heartbeat * 2 {
                            return Ok(End::DeadPeer);
                        }
                        self.send(Message::Ping(Bytes::new())).await?;
                    }
                    _ = tokio::time::sleep_until(self.last_active + idle) => {
                        return Ok(self.close(CloseCode::Normal, "idle", End::Idle).await);
                    }
                    next = self.ws.next(), if inflight.len() < cfg.max_in_flight => {
                        let msg = match next {
                            None => return Ok(End::Client),
                            Some(Err(e)) => return Ok(self.read_error(e).await),
                            Some(Ok(m)) => m,
                        };
                        if !self.frame_allowed() {
                            return Ok(self.close(CloseCode::Policy, "too many frames", End::Abuse).await);
                        }
                        match msg {
                            Message::Text(t) => {
                                self.last_active = Instant::now();
                                if let Some(end) = self.on_text(&t, &est, &mut inflight).await? {
                                    return Ok(end);
                                }
                            }
                            Message::Binary(_) => return Ok(self.binary().await),
                            Message::Close(_) => {}
                            _ => {}
                        }
                    }
                }
            }
        }
        .await;
        match result {
            Ok(end) | Err(end) => end,
        }
    }

    /// One text frame after `hello`. `Some(end)` closes the connection.
    async fn on_text(
        &mut self,
        text: &str,
        est: &Established,
        inflight: &mut FuturesUnordered<Submitted>,
    ) -> Result<Option<End>, End> {
        let frame = match protocol::parse(text) {
            Ok(f) => f,
            Err(m) => {
                self.error("bad_frame", &m, None, None).await?;
                return Ok(None);
            }
        };
        match frame {
            ClientFrame::Ping => self.send_frame(ServerFrame::Pong).await?,
            ClientFrame::Typing => {}
            ClientFrame::Hello { .. } => {
                self.error(
                    "already_hello",
                    "this session already said hello",
                    None,
                    None,
                )
                .await?
            }
            ClientFrame::Message {
                client_msg_id,
                text,
            } => {
                if let Err(not_until) = self.messages.check() {
                    use governor::clock::{Clock, DefaultClock};
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    self.violations += 1;
                    metrics::counter!(telemetry::RATE_LIMITED, "channel" => CHANNEL, "scope" => "connection")
                        .increment(1);
                    let id = protocol::valid_client_msg_id(&client_msg_id)
                        .then_some(client_msg_id.as_str());
                    self.error(
                        "rate_limited",
                        "too many messages; resend after retry_after_ms",
                        id,
                        Some(wait.as_millis().max(1) as u64),
                    )
                    .await?;
                    if self.violations >= self.chat.cfg.max_violations {
                        // Acknowledge what was already accepted before closing.
                        while let Some(done) = inflight.next().await {
                            self.acknowledge(done).await?;
                        }
                        return Ok(Some(
                            self.close(CloseCode::Policy, "message rate abuse", End::Abuse)
                                .await,
                        ));
                    }
                    return Ok(None);
                }
                if !protocol::valid_client_msg_id(&client_msg_id) {
                    self.error(
                        "bad_client_msg_id",
                        "client_msg_id needs 1-64 characters of A-Z a-z 0-9 . _ : -",
                        None,
                        None,
                    )
                    .await?;
                    return Ok(None);
                }
                if text.trim().is_empty() {
                    self.error(
                        "text_empty",
                        "message text is empty",
                        Some(&client_msg_id),
                        None,
                    )
                    .await?;
                    return Ok(None);
                }
                if text.chars().count() > self.chat.cfg.max_text_chars {
                    let m = format!(
                        "message text is longer than {} characters",
                        self.chat.cfg.max_text_chars
                    );
                    self.error("text_too_long", &m, Some(&client_msg_id), None)
                        .await?;
                    return Ok(None);
                }
                inflight.push(self.submit(est, client_msg_id, text));
            }
        }
        Ok(None)
    }

    /// Hands one message to the pipeline as its own task: it completes even if the client leaves.
    fn submit(&self, est: &Established, client_msg_id: String, text: String) -> Submitted {
        let mut intake = Intake::new(ChannelKind::Chat, PROVIDER, text);
        intake.provider_message_id = Some(client_msg_id.clone());
        intake.account = Some(est.session_id.clone());
        intake.identity = est.identity.clone();
        intake.thread_id = Some(est.session_id.clone());
        intake.metadata.insert(
            "chat_customer".into(),
            if est.verified {
                "verified"
            } else {
                "anonymous"
            }
            .into(),
        );
        if let Some(l) = &est.lang {
            intake.metadata.insert("ui_lang".into(), l.clone());
        }
        let pipeline = self.chat.pipeline.clone();
        let ctx = self.ctx.clone();
        let id = client_msg_id.clone();
        let task: JoinHandle<Result<Accepted, Rejection>> = self.chat.tracker.spawn(async move {
            pipeline.submit(&ctx, vec![intake]).await.and_then(|mut v| {
                v.pop()
                    .ok_or_else(|| Rejection::new(Reason::Internal, "no answer for the message"))
            })
        });
        Box::pin(async move {
            let r = task.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "chat submission task failed");
                Err(Rejection::new(
                    Reason::Internal,
                    "the message could not be processed; resend it",
                )
                .retry_after(Duration::from_secs(1)))
            });
            (id, r)
        })
    }

    async fn acknowledge(
        &mut self,
        (id, result): (String, Result<Accepted, Rejection>),
    ) -> Result<(), End> {
        match result {
            Ok(a) => {
                metrics::counter!(telemetry::CHAT_MESSAGES, "outcome" => if a.duplicate { "duplicate" } else { "acked" })
                    .increment(1);
                self.send_frame(ServerFrame::Ack {
                    client_msg_id: &id,
                    record_id: a.id.to_string(),
                    reference: crate::channels::reference(&a.id),
                    duplicate: a.duplicate,
                })
                .await
            }
            Err(r) => {
                metrics::counter!(telemetry::CHAT_MESSAGES, "outcome" => "refused").increment(1);
                let code = match r.reason {
                    Reason::RateLimited { .. } => "rate_limited",
                    Reason::SinkUnavailable | Reason::Overloaded | Reason::Internal => {
                        "unavailable"
                    }
                    _ => "invalid",
                };
                if code != "rate_limited" {
                    // The pipeline already counted rate limits under their scope.
                    r.count(CHANNEL);
                }
                let retry = r.retry_after.map(|d| d.as_millis().max(1) as u64);
                self.send_frame(ServerFrame::Error {
                    code,
                    message: &r.message,
                    client_msg_id: Some(&id),
                    retry_after_ms: retry,
                })
                .await
            }
        }
    }
}
