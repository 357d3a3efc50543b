//! HTTP/1.1 listener on hyper 1 with edge-safe limits. It owns sockets, protocol limits and
//! timeouts, and knows nothing of complaints: requests go to a `Handler`.
//!
//! Limits (all from config): a connection cap (semaphore at accept; over it the connection is
//! closed at once and counted), a header-read timer (hyper's, which needs a timer to work at all
//! and also bounds the gap between keep-alive requests), a header-size cap (hyper's read buffer,
//! → 431), a header-count cap, a keep-alive idle timeout of our own, and helpers for the body cap
//! (→ 413) and body-read timeout (→ 408). Only HTTP/1.1: hyper-util's h1/h2 auto-detection reads
//! the preface with no timer.
//!
//! With a TLS acceptor (`tls`) every connection is TLS: the handshake runs under the
//! connection's permit and within its own timeout, before hyper's timers start.

use crate::error::{Reason, Rejection};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub type Resp = Response<Full<Bytes>>;

/// What a listener calls for each request.
pub trait Handler: Send + Sync + 'static {
    fn call(&self, req: Request<Incoming>, peer: SocketAddr) -> BoxFuture<'static, Resp>;
}

#[derive(Debug, Clone)]
pub struct ListenerLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub keepalive_idle_timeout: Duration,
}

/// Serves until `shutdown` fires, then stops accepting, asks every connection to finish its
/// in-flight request and close, and returns once all have (bounded by `grace`).
pub async fn serve(
    listener: TcpListener,
    limits: ListenerLimits,
    tls: Option<crate::tls::Acceptor>,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
    grace: Duration,
    name: &'static str,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .keep_alive(true);
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!(crate::telemetry::HTTP_CONNECTIONS_REJECTED, "listener" => name)
                .increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let idle = limits.keepalive_idle_timeout;
        let tls = tls.clone();
        tracker.spawn(async move {
            metrics::gauge!(crate::telemetry::HTTP_CONNECTIONS, "listener" => name).increment(1.0);
            match tls {
                None => {
                    serve_connection(stream, peer, handler, &builder, shutdown, idle, name).await
                }
                Some(tls) => {
                    // A failed handshake is counted by the acceptor; the socket just closes.
                    if let Ok(stream) = tls.accept(stream).await {
                        serve_connection(stream, peer, handler, &builder, shutdown, idle, name)
                            .await;
                    }
                }
            }
            metrics::gauge!(crate::telemetry::HTTP_CONNECTIONS, "listener" => name).decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            listener = name,
            "connections still open after the grace period; closing"
        );
    }
}

struct Activity {
    active: AtomicUsize,
    last_ms: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    handler: Arc<dyn Handler>,
    builder: &hyper::server::conn::http1::Builder,
    shutdown: CancellationToken,
    idle: Duration,
    name: &'static str,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        active: AtomicUsize::new(0),
        last_ms: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let act = activity.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        let act = act.clone();
        async move {
            act.active.fetch_add(1, Ordering::Relaxed);
            let resp = handler.call(req, peer).await;
            act.active.fetch_sub(1, Ordering::Relaxed);
            act.touch();
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    // Upgrades (the chat websocket) hand the socket to the handler's task once the 101 is sent.
    let conn = builder
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    if let Some(reason) = connection_error_reason(&e) {
                        metrics::counter!(
                            crate::telemetry::HTTP_CONNECTION_ERRORS,
                            "listener" => name,
                            "reason" => reason
                        )
                        .increment(1);
                    }
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = idle_expired(&activity, idle), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// What hyper refused on a connection, for the counter: a request head not received within
/// `header_read_timeout_ms` (slowloris), one over the size or count cap (hyper answered 431), or
/// one that does not parse (hyper answered 400). A client hanging up is not counted.
fn connection_error_reason(e: &hyper::Error) -> Option<&'static str> {
    if e.is_timeout() {
        Some("header_timeout")
    } else if e.is_parse_too_large() {
        Some("header_too_large")
    } else if e.is_parse() || e.is_parse_version_h2() {
        Some("malformed_request")
    } else {
        None
    }
}

/// Binds a listening TCP socket with an explicit accept queue (`http.listen_backlog`); tokio's
/// `TcpListener::bind` always asks for 1024.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std and tokio do on Unix: a restart may bind while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Raises the soft limit on open files to the hard limit, so `max_connections` (HTTP, admin,
/// SMTP, chat) is what bounds connections rather than a default soft limit of 1024. Returns the
/// limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Resolves once the connection has had no request in flight for `idle`.
async fn idle_expired(a: &Activity, idle: Duration) {
    loop {
        let last = a.epoch + Duration::from_millis(a.last_ms.load(Ordering::Relaxed));
        let deadline = last + idle;
        if Instant::now() >= deadline && a.active.load(Ordering::Relaxed) == 0 {
            return;
        }
        let wake = if Instant::now() >= deadline {
            Instant::now() + idle.min(Duration::from_secs(1))
        } else {
            deadline
        };
        tokio::time::sleep_until(wake).await;
    }
}

/// Reads a request body with a size cap and a read timeout.
/// `Content-Length` over the cap is refused before a byte of the body is read.
pub async fn read_body(
    req: Request<Incoming>,
    max_bytes: usize,
    timeout: Duration,
) -> Result<(hyper::http::request::Parts, Bytes), Rejection> {
    let (parts, body) = req.into_parts();
    if let Some(len) = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max_bytes as u64 {
            return Err(too_large(max_bytes));
        }
    }
    let collect = Limited::new(body, max_bytes).collect();
    match tokio::time::timeout(timeout, collect).await {
        Err(_) => Err(Rejection::new(
            Reason::BodyTimeout,
            format!(
                "request body not received within {} ms",
                timeout.as_millis()
            ),
        )),
        Ok(Err(e)) => {
            if e.is::<http_body_util::LengthLimitError>() {
                Err(too_large(max_bytes))
            } else {
                Err(Rejection::new(
                    Reason::MalformedJson,
                    "request body could not be read",
                ))
            }
        }
        Ok(Ok(c)) => Ok((parts, c.to_bytes())),
    }
}

fn too_large(max: usize) -> Rejection {
    Rejection::new(
        Reason::BodyTooLarge,
        format!("request body exceeds {max} bytes"),
    )
}

/// The JSON error response for a rejection (with `Retry-After` for 429/503).
pub fn rejection_response(r: &Rejection) -> Resp {
    let mut resp = json_response(r.reason.status(), r.body_json());
    if let Some(secs) = r.retry_after_secs() {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

pub fn json_response(status: StatusCode, body: String) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Resp {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
