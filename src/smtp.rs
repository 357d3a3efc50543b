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
//!
//! Memory: a session keeps at most `data_memory_bytes` of a message in memory; the rest of a
//! larger message streams to a temp file in `data_spill_dir` (removed once delivered, or on any
//! failure). A spill that cannot be written (a full disk) is answered `452 4.3.1`: the sender
//! retries later, nothing is lost. The DATA checks (bare LF/CR, line length) run on the stream.

use futures_util::future::BoxFuture;
use smtp_proto::request::receiver::{DataReceiver, RequestReceiver, MAX_LINE_LENGTH};
use smtp_proto::Request;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry::{
    SMTP_CONNECTIONS_REJECTED, SMTP_DATA_SPILLED, SMTP_REPLIES, SMTP_SESSIONS, SMTP_SESSIONS_CLOSED,
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
    pub data: MailData,
}

/// The bytes of a message: in memory, or (larger than `data_memory_bytes`) in a temp file that
/// is removed when this is dropped.
pub enum MailData {
    Memory(bytes::Bytes),
    File(SpillFile),
}

impl MailData {
    pub fn len(&self) -> usize {
        match self {
            MailData::Memory(b) => b.len(),
            MailData::File(f) => f.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in memory (blocking read for a spilled message; its file goes on drop).
    pub fn load(self) -> std::io::Result<bytes::Bytes> {
        match self {
            MailData::Memory(b) => Ok(b),
            MailData::File(f) => std::fs::read(&f.path).map(bytes::Bytes::from),
        }
    }
}

impl From<Vec<u8>> for MailData {
    fn from(v: Vec<u8>) -> Self {
        MailData::Memory(v.into())
    }
}

/// A temp file holding a message during DATA; deleted on drop (delivered, refused, failed).
pub struct SpillFile {
    path: PathBuf,
    len: usize,
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, "could not remove an SMTP spill file");
            }
        }
    }
}

/// The message being received: in memory up to the threshold, then in a temp file.
struct DataBuffer<'a> {
    memory: Vec<u8>,
    file: Option<(tokio::fs::File, SpillFile)>,
    len: usize,
    threshold: usize,
    dir: &'a Path,
}

impl<'a> DataBuffer<'a> {
    fn new(threshold: usize, dir: &'a Path) -> Self {
        Self {
            memory: Vec::new(),
            file: None,
            len: 0,
            threshold,
            dir,
        }
    }

    async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() && self.memory.len() + chunk.len() > self.threshold {
            tokio::fs::create_dir_all(self.dir).await?;
            let path = self.dir.join(format!("{}.eml", ulid::Ulid::new()));
            let file = tokio::fs::File::options()
                .write(true)
                .create_new(true)
                .open(&path)
                .await?;
            // From here on the guard removes the file, whatever happens.
            self.file = Some((file, SpillFile { path, len: 0 }));
            let memory = std::mem::take(&mut self.memory);
            self.append(&memory).await?;
        }
        if self.file.is_some() {
            self.append(chunk).await?;
        } else {
            self.memory.extend_from_slice(chunk);
        }
        self.len += chunk.len();
        Ok(())
    }

    async fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if let Some((f, spill)) = &mut self.file {
            f.write_all(bytes).await?;
            spill.len += bytes.len();
        }
        Ok(())
    }

    /// Drops what was received (the temp file included).
    fn discard(&mut self) {
        self.memory = Vec::new();
        self.file = None;
    }

    async fn finish(mut self) -> std::io::Result<MailData> {
        match self.file.take() {
            None => Ok(MailData::Memory(std::mem::take(&mut self.memory).into())),
            Some((mut f, spill)) => {
                f.flush().await?;
                drop(f);
                Ok(MailData::File(spill))
            }
        }
    }
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
    /// DATA kept in memory per session; a larger message streams to `data_spill_dir`.
    pub data_memory_bytes: usize,
    pub data_spill_dir: PathBuf,
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

/// The DATA checks on the stream: a bare LF or bare CR (SMTP smuggling), a line over the cap.
struct LineCheck {
    max_line: usize,
    prev_cr: bool,
    line: usize,
}

impl LineCheck {
    fn new(max_line: usize) -> Self {
        Self {
            max_line,
            prev_cr: false,
            line: 0,
        }
    }

    fn too_long(&self) -> Reply {
        Reply::new(
            552,
            "5.3.4",
            format!("Line longer than {} bytes", self.max_line),
        )
    }

    fn bare_cr() -> Reply {
        Reply::new(550, "5.5.2", "Bare CR received; lines must end with CRLF")
    }

    /// The first fault in `chunk` (bytes following every chunk fed so far), if any.
    fn feed(&mut self, chunk: &[u8]) -> Option<Reply> {
        for &b in chunk {
            if self.prev_cr && b != b'\n' {
                return Some(Self::bare_cr());
            }
            if b == b'\n' {
                if !self.prev_cr {
                    return Some(Reply::new(
                        550,
                        "5.5.2",
                        "Bare LF received; lines must end with CRLF",
                    ));
                }
                if self.line > self.max_line {
                    return Some(self.too_long());
                }
                self.line = 0;
            } else {
                self.line += 1;
            }
            self.prev_cr = b == b'\r';
        }
        None
    }

    /// At the end of the message.
    fn finish(&self) -> Option<Reply> {
        if self.prev_cr {
            return Some(Self::bare_cr());
        }
        (self.line > self.max_line).then(|| self.too_long())
    }
}

/// Why a DATA section was refused, if it was (the whole message at once).
#[cfg(test)]
fn check_data(data: &[u8], max_line: usize) -> Option<Reply> {
    let mut c = LineCheck::new(max_line);
    c.feed(data).or_else(|| c.finish())
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
    /// that followed the end marker (pipelined commands). At most `data_memory_bytes` of it is
    /// held in memory; the rest streams to a temp file.
    async fn data(&mut self, mut pending: Vec<u8>) -> std::io::Result<(Reply, Vec<u8>)> {
        let mut receiver = DataReceiver::new();
        // The receiver looks for "CRLF ." sequences; priming it with the CRLF that ended the
        // DATA command makes a first line "." (empty message) or ".." (stuffed) parse right.
        let mut primer = Vec::new();
        receiver.ingest(&mut b"\r\n".iter(), &mut primer);
        // However slowly the client sends, the whole message must arrive within this time.
        let deadline = tokio::time::Instant::now() + self.limits.data_timeout * 4;
        let limits = self.limits;
        let mut message = DataBuffer::new(limits.data_memory_bytes, &limits.data_spill_dir);
        let mut check = LineCheck::new(limits.max_line_bytes);
        let mut size = 0usize;
        // The first fault; the rest of the message is read and dropped.
        let mut fault: Option<Reply> = None;
        let mut spill_failed = false;
        let mut too_big = false;
        // Small buffers: 200 sessions in DATA hold 200 of each.
        let mut buf = vec![0u8; 16 * 1024];
        let mut sink = Vec::with_capacity(buf.len());
        loop {
            let mut iter = pending.iter();
            sink.clear();
            let done = receiver.ingest(&mut iter, &mut sink);
            let rest: Vec<u8> = iter.as_slice().to_vec();
            size = size.saturating_add(sink.len());
            if size > limits.max_message_bytes {
                if !too_big {
                    too_big = true;
                    message.discard();
                }
            } else if fault.is_none() {
                fault = check.feed(&sink);
                if fault.is_none() {
                    if let Err(e) = message.write(&sink).await {
                        spill_failed = true;
                        tracing::warn!(error_kind = %e.kind(), "smtp: could not spill a large message to disk");
                        fault = Some(Reply::new(
                            452,
                            "4.3.1",
                            "Insufficient system storage, try again later",
                        ));
                    }
                }
                if fault.is_some() {
                    message.discard();
                }
            }
            if done {
                if too_big {
                    // Too big wins over any other fault.
                    fault = Some(Reply::new(
                        552,
                        "5.3.4",
                        format!("Message exceeds {} bytes", limits.max_message_bytes),
                    ));
                } else if fault.is_none() {
                    fault = check.finish();
                }
                let spilled = message.file.is_some();
                let reply = match fault {
                    Some(r) => r,
                    None => match message.finish().await {
                        Err(e) => {
                            spill_failed = true;
                            tracing::warn!(error_kind = %e.kind(), "smtp: could not spill a large message to disk");
                            Reply::new(452, "4.3.1", "Insufficient system storage, try again later")
                        }
                        Ok(data) => {
                            let from = self.mail_from.clone().unwrap_or_default();
                            self.handler
                                .deliver(Delivery {
                                    peer: self.peer.ip(),
                                    mail_from: from,
                                    rcpt_to: self.rcpt_to.clone(),
                                    data,
                                })
                                .await
                        }
                    },
                };
                if spilled || spill_failed {
                    let result = if spill_failed { "error" } else { "ok" };
                    metrics::counter!(SMTP_DATA_SPILLED, "result" => result).increment(1);
                }
                return Ok((reply, rest));
            }
            let wait = limits
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
            pending.clear();
            pending.extend_from_slice(&buf[..n]);
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
        // Never reached (the message cap is lower): no file is written per run.
        data_memory_bytes: 64 * 1024 + 1,
        data_spill_dir: std::env::temp_dir(),
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
        assert_eq!(check_data(b"ok\r\nend\r", 1000).unwrap().code, 550);
    }

    #[test]
    fn the_stream_check_agrees_byte_by_byte() {
        for (data, want) in [
            (&b"ab\r\n\r\nok\r\n"[..], None),
            (b"a\r\nb\nc\r\n", Some(550)),
            (b"a\rb\r\n", Some(550)),
            (b"012345\r\n", Some(552)),
            (b"0123\r\n0123", None),
            (b"0123\r\n012345", Some(552)),
        ] {
            let mut c = LineCheck::new(5);
            let got = data
                .iter()
                .find_map(|b| c.feed(std::slice::from_ref(b)))
                .or_else(|| c.finish())
                .map(|r| r.code);
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(data));
            assert_eq!(check_data(data, 5).map(|r| r.code), want);
        }
    }

    /// Messages delivered: (spilled to a file, bytes).
    type Kept = Arc<parking_lot::Mutex<Vec<(bool, Vec<u8>)>>>;

    /// Keeps what it is given (a spilled message read back).
    struct Keep(Kept);

    impl MailHandler for Keep {
        fn accept_recipient(&self, _: &str) -> bool {
            true
        }
        fn deliver(&self, d: Delivery) -> BoxFuture<'static, Reply> {
            let spilled = matches!(d.data, MailData::File(_));
            self.0
                .lock()
                .push((spilled, d.data.load().unwrap().to_vec()));
            Box::pin(async { Reply::new(250, "2.0.0", "OK") })
        }
    }

    async fn converse(limits: &SmtpLimits, handler: Arc<dyn MailHandler>, input: &[u8]) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let peer = SocketAddr::from(([127, 0, 0, 1], 25));
        let session = Session::new(server, peer, limits, handler, false);
        let (_, out) = tokio::join!(session.run(CancellationToken::new(), true), async {
            client.write_all(input).await.unwrap();
            let mut out = Vec::new();
            client.read_to_end(&mut out).await.unwrap();
            out
        });
        String::from_utf8(out).unwrap()
    }

    fn limits(spill: PathBuf) -> SmtpLimits {
        SmtpLimits {
            tls: None,
            implicit_tls: false,
            hostname: "t".into(),
            max_message_bytes: 1 << 20,
            max_recipients: 10,
            max_line_bytes: 1000,
            command_timeout: Duration::from_secs(30),
            data_timeout: Duration::from_secs(30),
            max_connections: 1,
            max_errors: 10,
            max_junk_commands: 20,
            data_memory_bytes: 1024,
            data_spill_dir: spill,
        }
    }

    fn mail(lines: usize) -> Vec<u8> {
        let mut m = b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n".to_vec();
        for i in 0..lines {
            m.extend_from_slice(format!("line {i} of the message body\r\n").as_bytes());
        }
        m.extend_from_slice(b".\r\nQUIT\r\n");
        m
    }

    #[tokio::test]
    async fn a_large_message_streams_to_a_temp_file_that_goes_afterwards() {
        let dir = tempfile::tempdir().unwrap();
        let spill = dir.path().join("incoming");
        let kept = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let l = limits(spill.clone());
        let out = converse(&l, Arc::new(Keep(kept.clone())), &mail(2000)).await;
        assert!(out.contains("\r\n250 2.0.0 OK\r\n"), "{out}");
        let out = converse(&l, Arc::new(Keep(kept.clone())), &mail(3)).await;
        assert!(out.contains("\r\n250 2.0.0 OK\r\n"), "{out}");
        let kept = kept.lock();
        assert!(kept[0].0, "spilled");
        assert!(kept[0].1.starts_with(b"line 0 of"));
        assert!(kept[0].1.ends_with(b"line 1999 of the message body\r\n"));
        assert_eq!(
            kept[0].1.len(),
            (0..2000)
                .map(|i| format!("line {i} of the message body\r\n").len())
                .sum::<usize>()
        );
        assert!(!kept[1].0, "small: in memory");
        assert_eq!(
            std::fs::read_dir(&spill).unwrap().count(),
            0,
            "no spill file left"
        );
    }

    #[tokio::test]
    async fn a_spill_that_cannot_be_written_is_452_4_3_1() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the spill directory should be: it cannot be created.
        let spill = dir.path().join("not-a-dir");
        std::fs::write(&spill, b"x").unwrap();
        let kept = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let out = converse(&limits(spill), Arc::new(Keep(kept.clone())), &mail(2000)).await;
        assert!(out.contains("\r\n452 4.3.1 "), "{out}");
        assert!(
            out.ends_with("221 2.0.0 Bye\r\n"),
            "the session goes on: {out}"
        );
        assert!(kept.lock().is_empty());
    }
}
