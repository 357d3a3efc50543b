//! SMTP listener (RFC 5321) on tokio, with smtp-proto for command parsing and DATA
//! dot-unstuffing. It owns sockets, protocol state and limits, and knows nothing of complaints:
//! recipients are checked and messages delivered through a `MailHandler`.
//!
//! EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, VRFY (252); PIPELINING, SIZE, 8BITMIME,
//! ENHANCEDSTATUSCODES advertised. Limits: message size (SIZE= and actual), recipients, DATA
//! line length, command and data timeouts, connections, errors before disconnect. A bare LF (or
//! bare CR) in DATA rejects the message (SMTP smuggling). STARTTLS (rustls, TLS 1.2+) is offered
//! when a certificate is configured; bytes pipelined after STARTTLS are discarded (no command
//! injection across the TLS boundary) and the session starts afresh inside TLS. With
//! `implicit_tls` (the `email.smtps_listen` listener) the session is TLS from the first byte.
//! Either handshake runs within the acceptor's timeout, not the command timeout.

use futures_util::future::BoxFuture;
use smtp_proto::request::receiver::{DataReceiver, RequestReceiver, MAX_LINE_LENGTH};
use smtp_proto::Request;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry::{
    SMTP_CONNECTIONS_REJECTED, SMTP_REPLIES, SMTP_SESSIONS, SMTP_SESSIONS_CLOSED,
};

/// Counts a session the gateway closes, by why.
fn closed(reason: &'static str) {
    metrics::counter!(SMTP_SESSIONS_CLOSED, "reason" => reason).increment(1);
}

/// An SMTP reply: code, enhanced status code, text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: &'static str,
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, status: &'static str, text: impl Into<String>) -> Self {
        Self {
            code,
            status,
            text: text.into(),
        }
    }

    fn line(&self) -> String {
        metrics::counter!(SMTP_REPLIES, "code" => self.code.to_string()).increment(1);
        format!("{} {} {}\r\n", self.code, self.status, self.text)
    }
}

/// One accepted message.
pub struct Delivery {
    pub peer: IpAddr,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub data: Vec<u8>,
}

pub trait MailHandler: Send + Sync + 'static {
    /// Whether mail for this recipient is accepted here (no open relay).
    fn accept_recipient(&self, rcpt: &str) -> bool;
    /// Makes the message durable (or not) and says what to answer after DATA.
    fn deliver(&self, d: Delivery) -> BoxFuture<'static, Reply>;
}

#[derive(Clone)]
pub struct SmtpLimits {
    /// STARTTLS is offered when set (or, with `implicit_tls`, every session is TLS).
    pub tls: Option<crate::tls::Acceptor>,
    /// TLS from the first byte (implicit TLS, RFC 8314) instead of STARTTLS; needs `tls`.
    pub implicit_tls: bool,
    pub hostname: String,
    pub max_message_bytes: usize,
    pub max_recipients: usize,
    pub max_line_bytes: usize,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub max_connections: usize,
    pub max_errors: usize,
    /// Commands that move no mail (NOOP, RSET, VRFY, HELO/EHLO, ...) before the session is closed;
    /// the count starts again after each accepted message.
    pub max_junk_commands: usize,
}

/// Serves until `shutdown`, then lets sessions finish their current message (bounded by `grace`).
pub async fn serve(
    listener: TcpListener,
    limits: SmtpLimits,
    handler: Arc<dyn MailHandler>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let limits = Arc::new(limits);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "smtp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!(SMTP_CONNECTIONS_REJECTED).increment(1);
            // A plain-text 421 means nothing to a client that expects a TLS handshake. A fresh
            // socket's send buffer is empty: the write does not wait, and never holds the loop.
            if !limits.implicit_tls {
                let _ = stream.try_write(b"421 4.3.2 Too many connections, try again later\r\n");
            }
            drop(stream);
            continue;
        };
        let (handler, limits, shutdown) = (handler.clone(), limits.clone(), shutdown.clone());
        tracker.spawn(async move {
            metrics::gauge!(SMTP_SESSIONS).increment(1.0);
            session(stream, peer, &limits, handler, shutdown).await;
            metrics::gauge!(SMTP_SESSIONS).decrement(1.0);
            drop(permit);
        });
    }
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("smtp sessions still open after the grace period");
    }
}

/// One connection: plain (with STARTTLS when offered) or TLS from the first byte. Handshake
/// failures are counted and logged by the acceptor.
async fn session(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    limits: &SmtpLimits,
    handler: Arc<dyn MailHandler>,
    shutdown: CancellationToken,
) {
    let end = match (&limits.tls, limits.implicit_tls) {
        (Some(acceptor), true) => {
            if let Ok(tls) = acceptor.accept(stream).await {
                let session = Session::new(tls, peer, limits, handler, true);
                if let Err(e) = session.run(shutdown, true).await {
                    tracing::debug!(error = %e, "smtp session ended");
                }
            }
            return;
        }
        (None, true) => {
            tracing::error!("implicit-TLS SMTP listener without a certificate");
            return;
        }
        (_, false) => {
            Session::new(stream, peer, limits, handler.clone(), false)
                .run(shutdown.clone(), true)
                .await
        }
    };
    match end {
        Ok(End::StartTls(tcp)) => {
            // STARTTLS is only offered with an acceptor.
            let Some(acceptor) = &limits.tls else { return };
            if let Ok(tls) = acceptor.accept(tcp).await {
                let session = Session::new(tls, peer, limits, handler, true);
                if let Err(e) = session.run(shutdown, false).await {
                    tracing::debug!(error = %e, "smtp session ended");
                }
            }
        }
        Ok(End::Closed) => {}
        Err(e) => tracing::debug!(error = %e, "smtp session ended"),
    }
}

struct Session<'a, S> {
    stream: S,
    tls_active: bool,
    peer: SocketAddr,
    limits: &'a SmtpLimits,
    handler: Arc<dyn MailHandler>,
    helo: bool,
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
    errors: usize,
    junk: usize,
}

enum Flow {
    Continue,
    Close,
    StartTls,
}

/// How a session ended: closed, or handing its socket over for the TLS handshake.
enum End<S> {
    Closed,
    StartTls(S),
}

/// Why a DATA section was refused, if it was.
fn check_data(data: &[u8], max_line: usize) -> Option<Reply> {
    let mut line_start = 0;
    for (i, &b) in data.iter().enumerate() {
        match b {
            b'\n' => {
                if i == 0 || data[i - 1] != b'\r' {
                    return Some(Reply::new(
                        550,
                        "5.5.2",
                        "Bare LF received; lines must end with CRLF",
                    ));
                }
                if i - line_start > max_line {
                    return Some(Reply::new(
                        552,
                        "5.3.4",
                        format!("Line longer than {max_line} bytes"),
                    ));
                }
                line_start = i + 1;
            }
            b'\r' if data.get(i + 1) != Some(&b'\n') => {
                return Some(Reply::new(
                    550,
                    "5.5.2",
                    "Bare CR received; lines must end with CRLF",
                ));
            }
            _ => {}
        }
    }
    if data.len() - line_start > max_line {
        return Some(Reply::new(
            552,
            "5.3.4",
            format!("Line longer than {max_line} bytes"),
        ));
    }
    None
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Session<'a, S> {
    fn new(
        stream: S,
        peer: SocketAddr,
        limits: &'a SmtpLimits,
        handler: Arc<dyn MailHandler>,
        tls_active: bool,
    ) -> Self {
        Self {
            stream,
            tls_active,
            peer,
            limits,
            handler,
            helo: false,
            mail_from: None,
            rcpt_to: Vec::new(),
            errors: 0,
            junk: 0,
        }
    }

    async fn send(&mut self, r: Reply) -> std::io::Result<()> {
        self.write(r.line().as_bytes()).await
    }

    /// Writes with the command timeout: a client that never reads cannot hold the session.
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match tokio::time::timeout(self.limits.command_timeout, self.stream.write_all(bytes)).await
        {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client does not read replies",
            )),
        }
    }

    async fn run(mut self, shutdown: CancellationToken, greet: bool) -> std::io::Result<End<S>> {
        if greet {
            let greeting = format!("220 {} ESMTP Switchboard\r\n", self.limits.hostname);
            self.write(greeting.as_bytes()).await?;
        }
        let mut receiver = RequestReceiver::default();
        let mut buf = vec![0u8; 8192];
        // Bytes received but not yet parsed (several pipelined commands, or what followed DATA).
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let mut out = String::new();
            let mut iter = pending.iter();
            let mut after_data: Option<Vec<u8>> = None;
            loop {
                // smtp-proto caps a command line only when it spans reads; one that arrives
                // whole in a read is capped here, at the same length.
                let rest = iter.as_slice();
                let line = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
                let parsed = if line > MAX_LINE_LENGTH {
                    Err(smtp_proto::Error::ResponseTooLong)
                } else {
                    receiver.ingest(&mut iter).map(|r| r.into_owned())
                };
                let flow = match parsed {
                    Ok(req) => {
                        let is_data = matches!(req, Request::Data);
                        let flow = self.command(req, &mut out);
                        if matches!(flow, Flow::Continue) && is_data && self.ready_for_data() {
                            // 354 is intermediate: no enhanced status code (RFC 2034 covers 2xx/4xx/5xx).
                            metrics::counter!(SMTP_REPLIES, "code" => "354").increment(1);
                            out.push_str("354 End data with <CR><LF>.<CR><LF>\r\n");
                            self.write(out.as_bytes()).await?;
                            out.clear();
                            let (reply, leftover) = self.data(iter.as_slice().to_vec()).await?;
                            self.mail_from = None;
                            self.rcpt_to.clear();
                            out.push_str(&reply.line());
                            if reply.code >= 500 {
                                self.errors += 1;
                            } else if reply.code < 300 {
                                self.junk = 0;
                            }
                            if reply.code == 421 || self.errors >= self.limits.max_errors {
                                if reply.code == 421 {
                                    closed("data_timeout");
                                } else {
                                    closed("too_many_errors");
                                    out.push_str(
                                        &Reply::new(
                                            421,
                                            "4.7.0",
                                            "Too many errors, closing connection",
                                        )
                                        .line(),
                                    );
                                }
                                Flow::Close
                            } else {
                                // Parse what followed the message (pipelined commands) next.
                                after_data = Some(leftover);
                                break;
                            }
                        } else {
                            flow
                        }
                    }
                    Err(smtp_proto::Error::NeedsMoreData { .. }) => break,
                    Err(e) => self.protocol_error(e, &mut out),
                };
                match flow {
                    Flow::Continue => {}
                    Flow::Close => {
                        self.write(out.as_bytes()).await?;
                        return Ok(End::Closed);
                    }
                    Flow::StartTls => {
                        // Anything pipelined after STARTTLS is dropped, never run inside TLS.
                        self.write(out.as_bytes()).await?;
                        self.stream.flush().await?;
                        return Ok(End::StartTls(self.stream));
                    }
                }
            }
            if !out.is_empty() {
                self.write(out.as_bytes()).await?;
            }
            if let Some(rest) = after_data {
                pending = rest;
                continue;
            }
            let n = tokio::select! {
                _ = shutdown.cancelled() => {
                    self.send(Reply::new(421, "4.3.2", "Service shutting down")).await?;
                    return Ok(End::Closed);
                }
                r = tokio::time::timeout(self.limits.command_timeout, self.stream.read(&mut buf)) => match r {
                    Err(_) => {
                        closed("command_timeout");
                        self.send(Reply::new(421, "4.4.2", "Timeout waiting for a command")).await?;
                        return Ok(End::Closed);
                    }
                    Ok(r) => r?,
                },
            };
            if n == 0 {
                return Ok(End::Closed);
            }
            pending = buf[..n].to_vec();
        }
    }

    fn ready_for_data(&self) -> bool {
        self.mail_from.is_some() && !self.rcpt_to.is_empty()
    }

    fn protocol_error(&mut self, e: smtp_proto::Error, out: &mut String) -> Flow {
        let r = match e {
            smtp_proto::Error::UnknownCommand => Reply::new(500, "5.5.1", "Unknown command"),
            smtp_proto::Error::ResponseTooLong => {
                // The rest of the line would be read as commands: answer and close.
                out.push_str(&Reply::new(500, "5.5.2", "Line too long").line());
                out.push_str(&Reply::new(421, "4.7.0", "Line too long, closing connection").line());
                closed("line_too_long");
                return Flow::Close;
            }
            smtp_proto::Error::InvalidSenderAddress => {
                Reply::new(501, "5.1.7", "Invalid sender address")
            }
            smtp_proto::Error::InvalidRecipientAddress => {
                Reply::new(501, "5.1.3", "Invalid recipient address")
            }
            smtp_proto::Error::UnsupportedParameter { .. } => {
                Reply::new(555, "5.5.4", "Unsupported parameter")
            }
            _ => Reply::new(501, "5.5.4", "Syntax error"),
        };
        self.error(r, out)
    }

    /// Counts an error reply; too many and the session ends.
    fn error(&mut self, r: Reply, out: &mut String) -> Flow {
        self.errors += 1;
        out.push_str(&r.line());
        if self.errors >= self.limits.max_errors {
            out.push_str(&Reply::new(421, "4.7.0", "Too many errors, closing connection").line());
            closed("too_many_errors");
            return Flow::Close;
        }
        Flow::Continue
    }

    /// Counts a command that moves no mail; past `max_junk_commands` the session ends (a flood
    /// of NOOPs or RSETs is not an error reply, so `max_errors` alone would never end it).
    fn junk(&mut self, out: &mut String) -> Option<Flow> {
        self.junk += 1;
        if self.junk > self.limits.max_junk_commands {
            out.push_str(
                &Reply::new(
                    421,
                    "4.7.0",
                    "Too many commands without mail, closing connection",
                )
                .line(),
            );
            closed("junk_commands");
            return Some(Flow::Close);
        }
        None
    }

    fn command(&mut self, req: Request<String>, out: &mut String) -> Flow {
        let junk = !matches!(
            req,
            Request::Mail { .. }
                | Request::Rcpt { .. }
                | Request::Data
                | Request::Quit
                | Request::StartTls
        );
        if junk {
            if let Some(flow) = self.junk(out) {
                return flow;
            }
        }
        match req {
            Request::Ehlo { host: _ } | Request::Lhlo { host: _ } => {
                self.helo = true;
                self.mail_from = None;
                self.rcpt_to.clear();
                let starttls = if self.limits.tls.is_some() && !self.tls_active {
                    "250-STARTTLS\r\n"
                } else {
                    ""
                };
                out.push_str(&format!(
                    "250-{} Switchboard\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n{starttls}250 ENHANCEDSTATUSCODES\r\n",
                    self.limits.hostname, self.limits.max_message_bytes
                ));
                metrics::counter!(SMTP_REPLIES, "code" => "250").increment(1);
            }
            Request::Helo { host: _ } => {
                self.helo = true;
                self.mail_from = None;
                self.rcpt_to.clear();
                out.push_str(&Reply::new(250, "2.0.0", self.limits.hostname.clone()).line());
            }
            Request::Mail { from } => {
                if !self.helo {
                    return self.error(Reply::new(503, "5.5.1", "Send EHLO or HELO first"), out);
                }
                if self.mail_from.is_some() {
                    return self.error(Reply::new(503, "5.5.1", "Sender already given"), out);
                }
                if from.size > self.limits.max_message_bytes {
                    return self.error(
                        Reply::new(
                            552,
                            "5.3.4",
                            format!(
                                "Message size exceeds {} bytes",
                                self.limits.max_message_bytes
                            ),
                        ),
                        out,
                    );
                }
                self.mail_from = Some(from.address);
                out.push_str(&Reply::new(250, "2.1.0", "Sender OK").line());
            }
            Request::Rcpt { to } => {
                if self.mail_from.is_none() {
                    return self.error(Reply::new(503, "5.5.1", "Send MAIL FROM first"), out);
                }
                if self.rcpt_to.len() >= self.limits.max_recipients {
                    out.push_str(&Reply::new(452, "4.5.3", "Too many recipients").line());
                    return Flow::Continue;
                }
                if !self.handler.accept_recipient(&to.address) {
                    return self.error(
                        Reply::new(550, "5.1.1", "Recipient not accepted here (no relay)"),
                        out,
                    );
                }
                self.rcpt_to.push(to.address);
                out.push_str(&Reply::new(250, "2.1.5", "Recipient OK").line());
            }
            Request::Data => {
                if !self.ready_for_data() {
                    return self.error(
                        Reply::new(503, "5.5.1", "Send MAIL FROM and RCPT TO first"),
                        out,
                    );
                }
            }
            Request::Rset => {
                self.mail_from = None;
                self.rcpt_to.clear();
                out.push_str(&Reply::new(250, "2.0.0", "Reset").line());
            }
            Request::Noop { .. } => out.push_str(&Reply::new(250, "2.0.0", "OK").line()),
            Request::Vrfy { .. } => {
                out.push_str(&Reply::new(252, "2.5.0", "Cannot verify, but will accept").line())
            }
            Request::Quit => {
                out.push_str(&Reply::new(221, "2.0.0", "Bye").line());
                return Flow::Close;
            }
            Request::StartTls => {
                if self.tls_active {
                    return self.error(Reply::new(503, "5.5.1", "TLS already active"), out);
                }
                if self.limits.tls.is_none() {
                    return self.error(Reply::new(454, "4.7.0", "TLS not available"), out);
                }
                out.push_str(&Reply::new(220, "2.0.0", "Ready to start TLS").line());
                return Flow::StartTls;
            }
            other => {
                return self.error(
                    Reply::new(502, "5.5.1", format!("{} not implemented", other.name())),
                    out,
                );
            }
        }
        Flow::Continue
    }

    /// Reads the message after 354, bounded in size and time; returns the reply and any bytes
    /// that followed the end marker (pipelined commands).
    async fn data(&mut self, mut pending: Vec<u8>) -> std::io::Result<(Reply, Vec<u8>)> {
        let mut receiver = DataReceiver::new();
        // The receiver looks for "CRLF ." sequences; priming it with the CRLF that ended the
        // DATA command makes a first line "." (empty message) or ".." (stuffed) parse right.
        let mut primer = Vec::new();
        receiver.ingest(&mut b"\r\n".iter(), &mut primer);
        // However slowly the client sends, the whole message must arrive within this time.
        let deadline = tokio::time::Instant::now() + self.limits.data_timeout * 4;
        let mut message = Vec::new();
        let mut too_big = false;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut iter = pending.iter();
            let mut sink = Vec::new();
            let done = receiver.ingest(&mut iter, &mut sink);
            let rest: Vec<u8> = iter.as_slice().to_vec();
            if !too_big {
                if message.len() + sink.len() > self.limits.max_message_bytes {
                    too_big = true;
                    message = Vec::new();
                } else {
                    message.extend_from_slice(&sink);
                }
            }
            if done {
                let reply = if too_big {
                    Reply::new(
                        552,
                        "5.3.4",
                        format!("Message exceeds {} bytes", self.limits.max_message_bytes),
                    )
                } else if let Some(r) = check_data(&message, self.limits.max_line_bytes) {
                    r
                } else {
                    let from = self.mail_from.clone().unwrap_or_default();
                    self.handler
                        .deliver(Delivery {
                            peer: self.peer.ip(),
                            mail_from: from,
                            rcpt_to: self.rcpt_to.clone(),
                            data: message,
                        })
                        .await
                };
                return Ok((reply, rest));
            }
            let wait = self
                .limits
                .data_timeout
                .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            let n = match tokio::time::timeout(wait, self.stream.read(&mut buf)).await {
                Err(_) => {
                    return Ok((
                        Reply::new(421, "4.4.2", "Timeout waiting for data"),
                        Vec::new(),
                    ));
                }
                Ok(r) => r?,
            };
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "client went away during DATA",
                ));
            }
            pending = buf[..n].to_vec();
        }
    }
}

/// A mail handler that takes everything (for the fuzz target).
struct AcceptAll;

impl MailHandler for AcceptAll {
    fn accept_recipient(&self, rcpt: &str) -> bool {
        !rcpt.is_empty()
    }
    fn deliver(&self, _d: Delivery) -> BoxFuture<'static, Reply> {
        Box::pin(async { Reply::new(250, "2.0.0", "OK") })
    }
}

/// Runs one session over `input` as the client's bytes (then the client's end of stream) and
/// drains the replies: the fuzz target's entry point (`crate::fuzzing::smtp_session`).
pub(crate) async fn fuzz_session(input: &[u8]) {
    let limits = SmtpLimits {
        tls: None,
        implicit_tls: false,
        hostname: "fuzz.localhost".into(),
        max_message_bytes: 64 * 1024,
        max_recipients: 10,
        max_line_bytes: 1000,
        command_timeout: Duration::from_secs(5),
        data_timeout: Duration::from_secs(5),
        max_connections: 1,
        max_errors: 10,
        max_junk_commands: 20,
    };
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let peer = SocketAddr::from(([127, 0, 0, 1], 25));
    let session = Session::new(server, peer, &limits, Arc::new(AcceptAll), false);
    let drive = async {
        // The server's replies are read concurrently so that its writes never wait on us.
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        let write = async {
            let _ = wr.write_all(input).await;
            let _ = wr.shutdown().await;
        };
        let read = async {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        };
        tokio::join!(write, read);
    };
    let run = async {
        let _ = session.run(CancellationToken::new(), true).await;
    };
    tokio::join!(run, drive);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_lf_and_cr_are_refused() {
        assert!(check_data(b"Subject: x\r\n\r\nok\r\n", 1000).is_none());
        assert_eq!(
            check_data(b"Subject: x\n\r\nok\r\n", 1000).unwrap().code,
            550
        );
        assert_eq!(
            check_data(b"Subject: x\r\n\r\nsmuggled\n.\r\nMAIL FROM:<x>\r\n", 1000)
                .unwrap()
                .code,
            550
        );
        assert_eq!(check_data(b"a\rb\r\n", 1000).unwrap().code, 550);
        assert_eq!(check_data(b"0123456789\r\n", 5).unwrap().code, 552);
    }
}
