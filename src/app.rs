//! Wiring: routes of the public and admin listeners, the sink chosen by config, background upkeep,
//! signals and the graceful shutdown order (stop accepting → drain in-flight → flush → exit).

use crate::ack_mail::AckMailer;
use crate::channels::alibaba::Alibaba;
use crate::channels::api::ApiChannel;
use crate::channels::chat::{outbox::Outboxes, Chat};
use crate::channels::email_intake::{EmailInbound, EmailIntake, SmtpIntake};
use crate::channels::segments::Assembler;
use crate::channels::smpp::Smpp;
use crate::channels::twilio::Twilio;
use crate::channels::vonage::Vonage;
use crate::channels::{Channel, Inbound};
use crate::config::Config;
use crate::error::{Reason, Rejection};
use crate::http::{
    self, json_response, rejection_response, text_response, Handler, ListenerLimits, Resp,
};
use crate::pipeline::{trace_id, Pipeline, RequestCtx};
use crate::sink::{failover::Failover, kafka::KafkaSink, spool::Spool, Sink};
use crate::telemetry;
use futures_util::future::BoxFuture;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW};
use hyper::{Method, Request, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A public route: an exact path, or a prefix (for routes that carry a secret path token).
struct Route {
    path: &'static str,
    prefix: bool,
    channel: Arc<dyn Channel>,
}

struct PublicInner {
    pipeline: Arc<Pipeline>,
    routes: Vec<Route>,
    chat: Option<Arc<Chat>>,
    max_body: usize,
    body_timeout: Duration,
}

/// The public listener's routes.
#[derive(Clone)]
pub struct Public(Arc<PublicInner>);

/// Decrements the in-flight gauge however the request ends (also when the client goes away).
struct InFlight;

impl InFlight {
    fn start() -> Self {
        metrics::gauge!(telemetry::HTTP_IN_FLIGHT).increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(telemetry::HTTP_IN_FLIGHT).decrement(1.0);
    }
}

impl Handler for Public {
    fn call(&self, req: Request<Incoming>, peer: SocketAddr) -> BoxFuture<'static, Resp> {
        let me = self.0.clone();
        Box::pin(async move {
            let _in_flight = InFlight::start();
            let path = req.uri().path();
            if let Some(chat) = &me.chat {
                let chat_route = match path {
                    "/v1/chat" => Some("/v1/chat"),
                    "/chat" if chat.widget_enabled() => Some("/chat"),
                    _ => None,
                };
                if let Some(label) = chat_route {
                    let resp = if label == "/chat" {
                        chat.widget(&req)
                    } else {
                        let ctx = RequestCtx {
                            peer: peer.ip(),
                            channel: crate::channels::chat::CHANNEL,
                            trace_id: trace_id(
                                req.headers()
                                    .get("traceparent")
                                    .and_then(|v| v.to_str().ok()),
                            ),
                        };
                        chat.upgrade(req, ctx).await
                    };
                    metrics::counter!(
                        telemetry::HTTP_REQUESTS,
                        "route" => label,
                        "status" => resp.status().as_str().to_string()
                    )
                    .increment(1);
                    return resp;
                }
            }
            let route = me.routes.iter().find(|r| {
                if r.prefix {
                    path.starts_with(r.path)
                } else {
                    path == r.path
                }
            });
            let (label, resp) = match route {
                Some(r) => (r.path, me.dispatch(r.channel.as_ref(), req, peer).await),
                None => {
                    let r = Rejection::new(Reason::NotFound, "no such route");
                    r.count("none");
                    ("unmatched", rejection_response(&r))
                }
            };
            metrics::counter!(
                telemetry::HTTP_REQUESTS,
                "route" => label,
                "status" => resp.status().as_str().to_string()
            )
            .increment(1);
            resp
        })
    }
}

impl PublicInner {
    /// Limits, cheap checks, body within its caps, then the channel; errors in the channel's
    /// own shape, each counted by channel and reason.
    async fn dispatch(
        &self,
        channel: &dyn Channel,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Resp {
        let ctx = RequestCtx {
            peer: peer.ip(),
            channel: channel.name(),
            trace_id: trace_id(
                req.headers()
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok()),
            ),
        };
        let result = async {
            self.pipeline.admit(&ctx).await?;
            let (parts, body) = req.into_parts();
            channel.precheck(&parts, &ctx)?;
            let (parts, body) = http::read_body(
                Request::from_parts(parts, body),
                channel.max_body().unwrap_or(self.max_body),
                self.body_timeout,
            )
            .await?;
            channel
                .handle(
                    Inbound {
                        parts,
                        body,
                        ctx: ctx.clone(),
                    },
                    &self.pipeline,
                )
                .await
        }
        .await;
        result.unwrap_or_else(|r| {
            r.count(ctx.channel);
            if r.reason.status().is_server_error() {
                tracing::warn!(
                    channel = ctx.channel,
                    reason = r.reason.code(),
                    "request failed"
                );
            } else {
                tracing::info!(
                    channel = ctx.channel,
                    reason = r.reason.code(),
                    "request rejected"
                );
            }
            let mut resp = channel.reject(&r);
            if r.reason == Reason::MethodNotAllowed {
                resp.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(channel.allow()));
            }
            resp
        })
    }
}

/// The admin listener's routes: `/metrics`, `/healthz`, `/readyz`.
#[derive(Clone)]
pub struct Admin {
    pipeline: Arc<Pipeline>,
    prometheus: PrometheusHandle,
    readyz_requires_kafka: bool,
    /// The attachment store's volume headroom, shown in `/readyz` (informational).
    attachments: Option<Arc<crate::attachments::AttachmentStore>>,
}

impl Handler for Admin {
    fn call(&self, req: Request<Incoming>, _peer: SocketAddr) -> BoxFuture<'static, Resp> {
        let me = self.clone();
        Box::pin(async move {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                let mut r =
                    rejection_response(&Rejection::new(Reason::MethodNotAllowed, "use GET"));
                r.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
                return r;
            }
            match req.uri().path() {
                "/metrics" => text_response(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    me.prometheus.render(),
                ),
                "/healthz" => json_response(StatusCode::OK, r#"{"status":"ok"}"#.into()),
                "/readyz" => {
                    let h = me.pipeline.sink_health();
                    let ready = if me.readyz_requires_kafka {
                        h.healthy
                    } else {
                        h.usable
                    };
                    let parts: serde_json::Map<_, _> = h
                        .parts
                        .into_iter()
                        .map(|(k, v)| (k, serde_json::Value::String(v)))
                        .collect();
                    let mut body = serde_json::json!({
                        "ready": ready,
                        "accepting": h.usable,
                        "sinks": parts,
                    });
                    // Informational: while Redis is down, dedupe and limits run per instance
                    // and intake goes on, so readiness does not depend on it.
                    if let Some(state) = me.pipeline.shared_state() {
                        body["redis"] = serde_json::Value::String(state.into());
                    }
                    // Informational: a full attachment volume only omits attachment bodies.
                    if let Some(store) = &me.attachments {
                        body["disk"]["attachments"] = store.headroom();
                    }
                    let status = if ready {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    json_response(status, body.to_string())
                }
                _ => rejection_response(&Rejection::new(Reason::NotFound, "no such route")),
            }
        })
    }
}

/// Every public route and the channel behind it.
fn routes(
    cfg: &Config,
    pipeline: &Arc<Pipeline>,
    email: &Arc<EmailIntake>,
) -> Result<Vec<Route>, String> {
    let exact = |path, channel: Arc<dyn Channel>| Route {
        path,
        prefix: false,
        channel,
    };
    let assembler = Assembler::new(
        pipeline.clone(),
        cfg.sms.concat_wait(),
        cfg.sms.concat_max_pending,
    );
    let twilio: Arc<dyn Channel> = Arc::new(Twilio::new(
        cfg.twilio.clone(),
        pipeline.normalizer().clone(),
    ));
    let mut routes = vec![
        exact("/v1/events", Arc::new(ApiChannel::new(cfg.api.clone()))),
        exact("/hooks/twilio/sms", twilio.clone()),
        Route {
            path: "/hooks/twilio/voice",
            prefix: true,
            channel: twilio,
        },
        exact(
            "/hooks/vonage/sms",
            Arc::new(Vonage::new(
                cfg.vonage.clone(),
                pipeline.normalizer().clone(),
                assembler.clone(),
            )),
        ),
        Route {
            path: "/hooks/alibaba/sms",
            prefix: true,
            channel: Arc::new(Alibaba::new(
                cfg.alibaba.clone(),
                pipeline.normalizer().clone(),
            )?),
        },
        exact(
            crate::channels::email_intake::INBOUND_ROUTE,
            Arc::new(EmailInbound::new(&cfg.email, email.clone())),
        ),
        exact(
            crate::channels::wechat::ROUTE,
            Arc::new(crate::channels::wechat::Wechat::new(
                cfg.wechat.clone(),
                pipeline.normalizer().clone(),
            )?),
        ),
        exact(
            "/hooks/smpp",
            Arc::new(Smpp::new(
                cfg.smpp.clone(),
                pipeline.normalizer().clone(),
                assembler,
            )?),
        ),
    ];
    // Social providers without a secret are off: their routes answer 404, so no deployment runs
    // a provider it never configured (with `signature_mode = "off"` they run unauthenticated).
    use crate::channels::{meta, telegram, weibo, x};
    use crate::config::SignatureMode::Off;
    let n = || pipeline.normalizer().clone();
    if !cfg.meta.app_secrets.is_empty() || cfg.meta.signature_mode == Off {
        routes.push(exact(
            meta::ROUTE,
            Arc::new(meta::Meta::new(cfg.meta.clone(), n())?),
        ));
    }
    if !cfg.telegram.secret_tokens.is_empty() || cfg.telegram.signature_mode == Off {
        routes.push(exact(
            telegram::ROUTE,
            Arc::new(telegram::Telegram::new(cfg.telegram.clone(), n())?),
        ));
    }
    if !cfg.x.consumer_secrets.is_empty() || cfg.x.signature_mode == Off {
        routes.push(exact(x::ROUTE, Arc::new(x::X::new(cfg.x.clone(), n())?)));
    }
    if !cfg.weibo.app_secrets.is_empty() || cfg.weibo.signature_mode == Off {
        routes.push(exact(
            weibo::ROUTE,
            Arc::new(weibo::Weibo::new(cfg.weibo.clone(), n())?),
        ));
    }
    Ok(routes)
}

/// Opens the sink the config asks for: the spool alone, or Kafka with the spool behind it.
pub async fn open_sink(cfg: &Config) -> Result<Arc<dyn Sink>, String> {
    let spool = Arc::new(
        Spool::open(&cfg.spool)
            .map_err(|e| format!("spool.dir {}: {e}", cfg.spool.dir.display()))?,
    );
    if cfg.kafka_enabled() {
        let kafka = KafkaSink::new(&cfg.kafka).map_err(|e| format!("kafka: {e}"))?;
        // Know the broker's state before the first request, so a healthy start does not spool.
        if !kafka.probe_once(Duration::from_secs(3)).await {
            tracing::warn!(brokers = %cfg.kafka.brokers, "kafka unreachable at start; records go to the spool until it answers");
        }
        tracing::info!(brokers = %cfg.kafka.brokers, topic = %cfg.kafka.topic, "sink: kafka, spool as fallback (replayed to kafka)");
        Ok(Arc::new(Failover::new(
            kafka,
            spool,
            cfg.spool.replay_max_in_flight,
            Duration::from_millis(cfg.kafka.flush_timeout_ms),
        )))
    } else {
        tracing::info!(dir = %cfg.spool.dir.display(), "sink: spool (no kafka.brokers configured)");
        Ok(spool)
    }
}

/// `switchboard spool replay`: forwards the backlog of a stopped gateway's spool to Kafka and
/// returns (the spool's LOCK keeps a running gateway's spool out of reach).
pub async fn forward_backlog(
    cfg: &Config,
    timeout: Duration,
) -> Result<crate::sink::replay::Outcome, String> {
    use crate::sink::replay::{Replayer, Route};
    if !cfg.kafka_enabled() {
        return Err("spool replay needs kafka.brokers (SWITCHBOARD_KAFKA__BROKERS)".into());
    }
    let spool = Arc::new(Spool::open(&cfg.spool).map_err(|e| {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            format!("refusing to replay: {e} (stop that gateway first; a running gateway replays its own spool)")
        } else {
            format!("spool.dir {}: {e}", cfg.spool.dir.display())
        }
    })?);
    let kafka = KafkaSink::new(&cfg.kafka).map_err(|e| format!("kafka: {e}"))?;
    let stop = CancellationToken::new();
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            stop.cancel();
        })
    };
    let replayer = Replayer::new(
        spool.clone(),
        kafka.clone(),
        Arc::new(Route::new(false)),
        cfg.spool.replay_max_in_flight,
        Duration::from_millis(cfg.kafka.flush_timeout_ms),
    );
    let backlog = spool.stats().backlog_records;
    tracing::info!(records = backlog, brokers = %cfg.kafka.brokers, "forwarding the spool's backlog");
    let out = replayer.run(stop, true).await;
    timer.abort();
    kafka.flush().await;
    spool.close().await;
    Ok(out)
}

/// The attachment store (never fatal: see `AttachmentStore::open`), with a warning when it shares
/// a volume with the spool (a mail flood could then fill the spool's disk).
fn open_attachment_store(cfg: &Config) -> Arc<crate::attachments::AttachmentStore> {
    let e = &cfg.email;
    let store = crate::attachments::AttachmentStore::open(
        e.attachment_dir.clone(),
        e.attachment_url_prefix.clone(),
        crate::attachments::StoreLimits::from_config(e),
    );
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    if let (Some(a), Some(s)) = (dev(&e.attachment_dir), dev(&cfg.spool.dir)) {
        if a == s {
            tracing::warn!(
                "email.attachment_dir is on the same volume as spool.dir: give it its own volume \
                 (attachments are bounded by email.attachment_max_total_bytes and \
                 email.attachment_min_free_bytes, but the spool then shares their disk)"
            );
        }
    }
    store
}

/// Refreshes the attachment volume's headroom gauge every 15 s and runs the retention sweep
/// every `email.attachment_sweep_interval_secs` (stale SMTP spill files go too).
fn spawn_attachment_sweeper(
    cfg: &Config,
    store: Arc<crate::attachments::AttachmentStore>,
) -> tokio::task::JoinHandle<()> {
    let every = Duration::from_secs(cfg.email.attachment_sweep_interval_secs);
    let spill_dir = cfg.email.data_spill_dir();
    // A message is in its spill file for at most 4 data timeouts, then waits for the parser.
    let spill_stale =
        (Duration::from_secs(cfg.email.data_timeout_secs) * 6).max(Duration::from_secs(3600));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.min(Duration::from_secs(15)));
        let mut last: Option<tokio::time::Instant> = None;
        loop {
            tick.tick().await;
            if last.is_some_and(|l| l.elapsed() < every) {
                store.free_bytes();
                continue;
            }
            last = Some(tokio::time::Instant::now());
            let (store, spill_dir) = (store.clone(), spill_dir.clone());
            let _ = tokio::task::spawn_blocking(move || {
                let now = std::time::SystemTime::now();
                store.sweep(now);
                let n = crate::attachments::remove_older_than(&spill_dir, spill_stale, now, |n| {
                    n.ends_with(".eml")
                });
                if n > 0 {
                    metrics::counter!(telemetry::ATTACHMENTS_DELETED, "reason" => "stale_spill")
                        .increment(n);
                }
            })
            .await;
        }
    })
}

/// Runs the gateway until SIGTERM/SIGINT, then shuts down gracefully.
pub async fn serve(cfg: Config) -> Result<(), String> {
    let prometheus = telemetry::install_recorder()?;
    let sink = open_sink(&cfg).await?;
    let pipeline = Pipeline::new(&cfg, sink)?;
    tracing::info!("{}", pipeline.triage().summary());

    match crate::http::raise_fd_limit() {
        Ok(n) => tracing::info!(nofile = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let backlog = cfg.http.listen_backlog;
    let public_listener = crate::http::bind(cfg.http.listen, backlog)
        .map_err(|e| format!("http.listen {}: {e}", cfg.http.listen))?;
    let admin_listener = crate::http::bind(cfg.admin.listen, backlog)
        .map_err(|e| format!("admin.listen {}: {e}", cfg.admin.listen))?;
    let public_addr = public_listener.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;

    let evictor = pipeline
        .limits()
        .spawn_evictor(Duration::from_secs(cfg.limits.evict_interval_secs));
    let sweeper = {
        let p = pipeline.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                p.sweep();
            }
        })
    };

    // Certificates are read before anything is served: a bad pair fails start-up naming its key.
    let tls = TlsListeners::load(&cfg)?;

    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    spawn_reload_handler(pipeline.triage().clone(), tls.stores());

    let ack = if cfg.email.ack.enabled {
        Some(AckMailer::start(cfg.email.ack.clone())?)
    } else {
        None
    };
    let attachments = open_attachment_store(&cfg);
    let attachment_sweeper = spawn_attachment_sweeper(&cfg, attachments.clone());
    let email = Arc::new(EmailIntake::new(
        &cfg.email,
        pipeline.clone(),
        ack.clone(),
        Some(attachments.clone()),
    ));
    // Per-recipient acknowledgement limits forget recipients idle for an hour.
    let ack_evictor = ack.map(|a| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(300));
            loop {
                tick.tick().await;
                a.evict_idle();
            }
        })
    });
    let smtps = match cfg.email.smtps_addr().map_err(|e| e.to_string())? {
        Some(listen) => {
            let l = crate::http::bind(listen, backlog)
                .map_err(|e| format!("email.smtps_listen {listen}: {e}"))?;
            let addr = l.local_addr().map_err(|e| e.to_string())?;
            Some((l, addr))
        }
        None => None,
    };
    let smtp = if cfg.email.smtp_enabled {
        let l = crate::http::bind(cfg.email.smtp_listen, backlog)
            .map_err(|e| format!("email.smtp_listen {}: {e}", cfg.email.smtp_listen))?;
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        Some((l, addr))
    } else {
        None
    };

    let chat = if cfg.chat.enabled {
        let outboxes = Outboxes::new(
            cfg.chat.outbox_max_replies,
            cfg.chat.outbox_max_sessions,
            cfg.chat.outbox_max_bytes,
            Duration::from_secs(cfg.chat.outbox_ttl_secs),
        );
        Some(Chat::new(
            cfg.chat.clone(),
            pipeline.clone(),
            outboxes,
            shutdown.clone(),
        ))
    } else {
        None
    };
    let replies_task = match &chat {
        Some(c) if cfg.chat.replies && cfg.kafka_enabled() => Some(crate::replies::spawn(
            &cfg.kafka,
            &cfg.chat,
            c.outboxes().clone(),
            shutdown.clone(),
        )?),
        _ => None,
    };
    let outbox_sweeper = chat.as_ref().map(|c| {
        let o = c.outboxes().clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                let n = o.sweep();
                metrics::gauge!(telemetry::CHAT_OUTBOX_SESSIONS).set(n as f64);
            }
        })
    });
    let public = Public(Arc::new(PublicInner {
        pipeline: pipeline.clone(),
        routes: routes(&cfg, &pipeline, &email)?,
        chat: chat.clone(),
        max_body: cfg.http.max_body_bytes,
        body_timeout: cfg.http.body_read_timeout(),
    }));
    let admin = Admin {
        pipeline: pipeline.clone(),
        prometheus,
        readyz_requires_kafka: cfg.admin.readyz_requires_kafka,
        attachments: Some(attachments.clone()),
    };
    let grace = Duration::from_millis(cfg.http.shutdown_grace_ms);
    let public_limits = ListenerLimits {
        max_connections: cfg.http.max_connections,
        header_read_timeout: cfg.http.header_read_timeout(),
        max_header_bytes: cfg.http.max_header_bytes,
        max_headers: cfg.http.max_headers,
        keepalive_idle_timeout: cfg.http.keepalive_idle_timeout(),
    };
    let admin_limits = ListenerLimits {
        max_connections: cfg.admin.max_connections,
        ..public_limits.clone()
    };
    tracing::info!(http = %public_addr, admin = %admin_addr, "switchboard listening");
    // One machine-readable line on stdout, for scripts and tests that start the gateway.
    let smtp_addr = smtp.as_ref().map(|(_, a)| a.to_string());
    let smtps_addr = smtps.as_ref().map(|(_, a)| a.to_string());
    println!(
        "{}",
        serde_json::json!({"event": "listening", "http": public_addr.to_string(), "admin": admin_addr.to_string(), "smtp": smtp_addr, "smtps": smtps_addr, "tls": tls.summary()})
    );
    let smtp_limits = |tls: Option<crate::tls::Acceptor>, implicit_tls: bool| {
        let e = &cfg.email;
        crate::smtp::SmtpLimits {
            tls,
            implicit_tls,
            hostname: e.hostname.clone(),
            max_message_bytes: e.max_message_bytes,
            max_recipients: e.max_recipients,
            max_line_bytes: e.max_line_bytes,
            command_timeout: Duration::from_secs(e.command_timeout_secs),
            data_timeout: Duration::from_secs(e.data_timeout_secs),
            max_connections: e.max_connections,
            max_errors: e.max_errors,
            max_junk_commands: e.max_junk_commands,
            data_memory_bytes: e.data_memory_bytes,
            data_spill_dir: e.data_spill_dir(),
        }
    };
    let smtp_task = smtp.map(|(listener, addr)| {
        tracing::info!(smtp = %addr, starttls = tls.smtp.is_some(), "smtp listening");
        tokio::spawn(crate::smtp::serve(
            listener,
            smtp_limits(tls.smtp.clone(), false),
            Arc::new(SmtpIntake(email.clone())),
            shutdown.clone(),
            grace,
        ))
    });
    let smtps_task = smtps.map(|(listener, addr)| {
        tracing::info!(smtps = %addr, "smtp (implicit TLS) listening");
        tokio::spawn(crate::smtp::serve(
            listener,
            smtp_limits(tls.smtps.clone(), true),
            Arc::new(SmtpIntake(email.clone())),
            shutdown.clone(),
            grace,
        ))
    });

    let public_task = tokio::spawn(http::serve(
        public_listener,
        public_limits,
        tls.public.clone(),
        Arc::new(public),
        shutdown.clone(),
        grace,
        "public",
    ));
    let admin_task = tokio::spawn(http::serve(
        admin_listener,
        admin_limits,
        tls.admin.clone(),
        Arc::new(admin),
        shutdown.clone(),
        grace,
        "admin",
    ));
    let _ = public_task.await;
    if let Some(t) = smtp_task {
        let _ = t.await;
    }
    if let Some(t) = smtps_task {
        let _ = t.await;
    }
    if let Some(c) = &chat {
        // Sessions close with 1001 after their in-flight messages are acknowledged.
        c.drain(grace).await;
    }
    if let Some(t) = replies_task {
        let _ = t.await;
    }
    if let Some(t) = outbox_sweeper {
        t.abort();
    }
    tracing::info!("listeners drained; flushing the sink");
    pipeline.shutdown_sink().await;
    let _ = admin_task.await;
    evictor.abort();
    sweeper.abort();
    attachment_sweeper.abort();
    if let Some(t) = ack_evictor {
        t.abort();
    }
    tracing::info!("switchboard stopped");
    Ok(())
}

/// The TLS acceptor of each listener that has a certificate configured. SMTP's STARTTLS and
/// implicit-TLS listeners share the email certificate but load it separately, so each counts
/// its own handshakes and reloads.
struct TlsListeners {
    public: Option<crate::tls::Acceptor>,
    admin: Option<crate::tls::Acceptor>,
    smtp: Option<crate::tls::Acceptor>,
    smtps: Option<crate::tls::Acceptor>,
}

impl TlsListeners {
    fn load(cfg: &Config) -> Result<Self, String> {
        use crate::tls::{Acceptor, ALPN_HTTP1};
        let [http, admin, email] = crate::tls::sources(cfg);
        let http_timeout = cfg.http.tls_handshake_timeout();
        let smtp_timeout = cfg.email.tls_handshake_timeout();
        let smtps = if cfg.email.smtps_addr().map_err(|e| e.to_string())?.is_some() {
            Acceptor::from_config("smtps", email.clone(), &[], smtp_timeout)?
        } else {
            None
        };
        Ok(Self {
            public: Acceptor::from_config("public", http, ALPN_HTTP1, http_timeout)?,
            admin: Acceptor::from_config("admin", admin, ALPN_HTTP1, http_timeout)?,
            smtp: if cfg.email.smtp_enabled {
                Acceptor::from_config("smtp", email, &[], smtp_timeout)?
            } else {
                None
            },
            smtps,
        })
    }

    fn all(&self) -> impl Iterator<Item = &crate::tls::Acceptor> {
        [&self.public, &self.admin, &self.smtp, &self.smtps]
            .into_iter()
            .flatten()
    }

    fn stores(&self) -> Vec<Arc<crate::tls::CertStore>> {
        self.all().map(|a| a.store().clone()).collect()
    }

    /// The listeners speaking TLS, for the listening line.
    fn summary(&self) -> Vec<&'static str> {
        self.all().map(|a| a.store().listener()).collect()
    }
}

/// SIGHUP re-reads the triage rule file and the TLS certificates; a file that does not check
/// out keeps what was in force.
fn spawn_reload_handler(
    triage: Arc<crate::triage::Triager>,
    certs: Vec<Arc<crate::tls::CertStore>>,
) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot install the SIGHUP handler");
            return;
        };
        while hup.recv().await.is_some() {
            match triage.reload() {
                Ok(summary) => tracing::info!("SIGHUP: reloaded {summary}"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: the triage rules did not load; the previous rules stay in force")
                }
            }
            crate::tls::reload_all(&certs);
        }
    });
}

fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
}
