//! The `smtp` channel: realistic MIME complaint mails, and a pool of SMTP connections that send
//! them to the gateway's listener (src/smtp.rs in the gateway) with ESMTP pipelining.
//!
//! The client is hand-written on a raw tokio `TcpStream`: lettre (the gateway's mail crate)
//! sends one command per round trip and does not expose PIPELINING (RFC 2920), which is what
//! this channel must measure. Per message, with PIPELINING advertised, it writes `MAIL FROM`,
//! `RCPT TO` and `DATA` in one write and then reads the three replies; on 354 it writes the
//! message and the final `.` and reads the reply to it: latency runs to that reply. The
//! connection is reused for the next message (after a refused transaction, `RSET` goes in front
//! of the next `MAIL`). Without PIPELINING it falls back to one command per round trip.
//!
//! Each due message takes a connection from the pool (`--smtp-connections`), opening one when
//! none is idle; in open loop the wait for a free connection counts in the latency, which runs
//! from the intended send time. A connection whose state is unknown (an I/O error, a timeout, a
//! 421) is dropped, never reused.

use crate::channels::{Customer, TEXTS};
use crate::stats::ErrorKind;
use base64::Engine;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

// ---------------------------------------------------------------------------------------------
// Mails

/// How the text part is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEncoding {
    /// UTF-8 as is (`Content-Transfer-Encoding: 8bit`, `BODY=8BITMIME`).
    EightBit,
    Base64,
    /// Half the mails of each.
    Mixed,
}

impl BodyEncoding {
    pub fn parse(s: &str) -> Result<BodyEncoding, String> {
        match s.trim() {
            "8bit" => Ok(BodyEncoding::EightBit),
            "base64" => Ok(BodyEncoding::Base64),
            "mixed" => Ok(BodyEncoding::Mixed),
            other => Err(format!(
                "--smtp-encoding `{other}`: use 8bit, base64 or mixed"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BodyEncoding::EightBit => "8bit",
            BodyEncoding::Base64 => "base64",
            BodyEncoding::Mixed => "mixed",
        }
    }
}

/// What the mails of a run look like.
#[derive(Debug, Clone)]
pub struct MailSettings {
    /// Target size of the whole message in bytes (headers included); met within one line.
    pub size: usize,
    /// The intake address: envelope recipient and `To`.
    pub rcpt: String,
    pub encoding: BodyEncoding,
    /// Share of mails (0-1) that carry an attachment (a quarter of the size, base64).
    pub attachment_ratio: f64,
}

/// One mail ready for DATA.
#[derive(Debug, Clone)]
pub struct Mail {
    /// Envelope sender (also `From`).
    pub from: String,
    /// The message, lines ending in CRLF, dot-stuffed, ending with CRLF (without the final `.`).
    pub data: Bytes,
    /// The Message-ID without angle brackets: what the gateway stores as the record's
    /// `provider_message_id` (mail-parser drops the brackets).
    pub message_id: String,
    /// Whether any byte is outside ASCII (then `BODY=8BITMIME` is declared).
    pub eight_bit: bool,
}

const SUBJECTS: &[&str] = &[
    "宽带故障投诉",
    "话费账单有误，要求退款",
    "投诉：营业厅服务态度",
    "手机信号差，多次报修未解决",
    "个人信息泄露投诉",
    "Re: 工单跟进",
    "Complaint: broadband outage",
    "Billing dispute on my last invoice",
    "No signal at home for a week",
    "Formal complaint about your engineer visit",
];

const GREETINGS: &[&str] = &["您好：", "尊敬的客服：", "Dear customer service,", "Hello,"];

/// RFC 2047 encoded words for a header value that is not plain ASCII (folded every 45 bytes of
/// UTF-8 so each word stays under 75 characters).
pub fn encode_header(value: &str) -> String {
    if value.is_ascii() {
        return value.to_string();
    }
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in value.chars() {
        if chunk.len() + c.len_utf8() > 45 {
            words.push(std::mem::take(&mut chunk));
        }
        chunk.push(c);
    }
    if !chunk.is_empty() {
        words.push(chunk);
    }
    words
        .iter()
        .map(|w| {
            format!(
                "=?UTF-8?B?{}?=",
                base64::engine::general_purpose::STANDARD.encode(w)
            )
        })
        .collect::<Vec<_>>()
        .join("\r\n ")
}

/// Splits text into lines of at most `max` bytes, at spaces where there are any, else at
/// character boundaries (Chinese has no spaces).
pub fn wrap(text: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while rest.len() > max {
        let mut cut = 0;
        let mut last_space = None;
        for (i, c) in rest.char_indices() {
            if i + c.len_utf8() > max {
                break;
            }
            cut = i + c.len_utf8();
            if c == ' ' {
                last_space = Some(i);
            }
        }
        let at = match last_space {
            Some(s) if s > max / 2 => s,
            _ => cut.max(rest.chars().next().map_or(1, char::len_utf8)),
        };
        out.push(rest[..at].trim_end().to_string());
        rest = rest[at..].trim_start();
    }
    if !rest.is_empty() {
        out.push(rest.to_string());
    }
    out
}

/// Base64 in lines of 76 characters, each ending in CRLF.
fn base64_lines(raw: &[u8], out: &mut String) {
    let enc = base64::engine::general_purpose::STANDARD.encode(raw);
    for line in enc.as_bytes().chunks(76) {
        // Base64 output is ASCII.
        out.push_str(std::str::from_utf8(line).unwrap_or(""));
        out.push_str("\r\n");
    }
}

/// Bytes of base64 in 76-character CRLF lines for `n` raw bytes.
fn base64_size(n: usize) -> usize {
    let enc = n.div_ceil(3) * 4;
    enc + 2 * enc.div_ceil(76)
}

/// Adds an extra `.` to every line that starts with one (RFC 5321 §4.5.2).
pub fn dot_stuff(message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 8);
    for (i, line) in message.split("\r\n").enumerate() {
        if i > 0 {
            out.push_str("\r\n");
        }
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
    }
    out
}

/// The mail address of a customer (reserved example domains, distinct per customer).
pub fn customer_address(c: &Customer) -> String {
    let digits: String = c.phone.chars().filter(char::is_ascii_digit).collect();
    let domain = if c.country == "CN" {
        "mail.example.com"
    } else {
        "example.org"
    };
    format!("c{digits}@{domain}")
}

/// Longest text line of a mail body: whole sentences stay on one line (a break inside a
/// Chinese word would split it for triage), well under SMTP's 998.
const TEXT_LINE: usize = 900;

/// Text lines of about `target` bytes in total: the complaint, then further details drawn from
/// the complaint texts, then a signature.
fn body_text(rng: &mut fastrand::Rng, c: &Customer, complaint: &str, target: usize) -> String {
    let mut s = String::with_capacity(target + 128);
    s.push_str(GREETINGS[rng.usize(0..GREETINGS.len())]);
    s.push_str("\r\n\r\n");
    for line in wrap(complaint, TEXT_LINE) {
        s.push_str(&line);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    let signature = format!("\r\n--\r\n{}\r\n{}\r\n", c.name, c.phone);
    let mut k = rng.usize(0..TEXTS.len());
    let mut n = 0u32;
    while s.len() + signature.len() < target {
        n += 1;
        let detail = match n % 3 {
            0 => format!("补充说明{n}：{}", TEXTS[k]),
            1 => format!("Update {n}: {}", TEXTS[k]),
            _ => TEXTS[k].to_string(),
        };
        for line in wrap(&detail, TEXT_LINE) {
            s.push_str(&line);
            s.push_str("\r\n");
        }
        if n.is_multiple_of(4) {
            s.push_str("\r\n");
        }
        k = (k + 1) % TEXTS.len();
    }
    s.push_str(&signature);
    s
}

/// A plausible log file as an attachment: ASCII lines of about `target` bytes.
fn attachment_bytes(rng: &mut fastrand::Rng, target: usize) -> Vec<u8> {
    let mut s = String::with_capacity(target + 80);
    let mut t = rng.u32(0..86_400);
    while s.len() < target {
        t += rng.u32(1..5);
        s.push_str(&format!(
            "{:02}:{:02}:{:02} ping 192.0.2.1 seq={} ttl=57 time={}.{} ms loss={}%\r\n",
            t / 3600 % 24,
            t / 60 % 60,
            t % 60,
            rng.u32(1..10_000),
            rng.u32(2..900),
            rng.u32(0..10),
            rng.u32(0..40)
        ));
    }
    s.into_bytes()
}

/// A complaint mail from customer `c` about `complaint`, sized by `m`, dated `date` (RFC 2822).
pub fn build_mail(
    rng: &mut fastrand::Rng,
    m: &MailSettings,
    c: &Customer,
    complaint: &str,
    date: &str,
) -> Mail {
    let from = customer_address(c);
    let message_id = format!("lt.{}@loadtest.switchboard.example", ulid::Ulid::new());
    let subject = SUBJECTS[rng.usize(0..SUBJECTS.len())];
    let base64 = match m.encoding {
        BodyEncoding::EightBit => false,
        BodyEncoding::Base64 => true,
        BodyEncoding::Mixed => rng.bool(),
    };
    let attach = m.attachment_ratio > 0.0 && rng.f64() < m.attachment_ratio;
    let cte = if base64 { "base64" } else { "8bit" };
    let mut head = format!(
        "From: {} <{from}>\r\nTo: <{}>\r\nSubject: {}\r\nDate: {date}\r\nMessage-ID: <{message_id}>\r\nMIME-Version: 1.0\r\nX-Mailer: switchboard-loadtest\r\n",
        encode_header(c.name),
        m.rcpt,
        encode_header(subject),
    );
    let text_headers =
        format!("Content-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: {cte}\r\n");
    let boundary = format!("=_lt_{}", ulid::Ulid::new());
    let attachment = if attach {
        let raw = attachment_bytes(rng, m.size / 4 * 3 / 4);
        let name = format!("speedtest-{}.log", rng.u32(1000..9999));
        let mut part = format!(
            "--{boundary}\r\nContent-Type: text/plain; charset=US-ASCII; name=\"{name}\"\r\nContent-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        );
        base64_lines(&raw, &mut part);
        part.push_str(&format!("--{boundary}--\r\n"));
        part
    } else {
        String::new()
    };
    let text_intro = if attach {
        head.push_str(&format!(
            "Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\nThis is a multipart message in MIME format.\r\n\r\n--{boundary}\r\n"
        ));
        format!("{text_headers}\r\n")
    } else {
        head.push_str(&text_headers);
        "\r\n".to_string()
    };
    // What the text part may take, in bytes as sent.
    let fixed = head.len() + text_intro.len() + attachment.len() + if attach { 2 } else { 0 };
    let room = m.size.saturating_sub(fixed).max(64);
    let mut body = String::new();
    if base64 {
        // The largest raw size whose base64 lines fit in the room, then one line more at most.
        let mut raw_target = room * 57 / 78;
        while raw_target > 0 && base64_size(raw_target) > room {
            raw_target -= 1;
        }
        let text = body_text(rng, c, complaint, raw_target);
        base64_lines(text.as_bytes(), &mut body);
    } else {
        body = body_text(rng, c, complaint, room);
    }
    let mut message = head;
    message.push_str(&text_intro);
    message.push_str(&body);
    if attach {
        message.push_str("\r\n");
        message.push_str(&attachment);
    }
    let eight_bit = !message.is_ascii();
    Mail {
        from,
        data: Bytes::from(dot_stuff(&message)),
        message_id,
        eight_bit,
    }
}

// ---------------------------------------------------------------------------------------------
// The client

/// An SMTP reply: the code of its last line and its text (lines joined by `\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    fn positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

/// Why an exchange failed without a reply to report.
#[derive(Debug)]
pub enum SmtpError {
    Connect(std::io::Error),
    Io(std::io::Error),
    /// The server closed the connection.
    Closed,
    /// A reply that is not SMTP (or a greeting that is not 220).
    Protocol(String),
}

impl SmtpError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SmtpError::Connect(_) => ErrorKind::Connect,
            SmtpError::Io(_) | SmtpError::Closed => ErrorKind::Request,
            SmtpError::Protocol(_) => ErrorKind::Protocol,
        }
    }
}

impl std::fmt::Display for SmtpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SmtpError::Connect(e) => write!(f, "connect: {e}"),
            SmtpError::Io(e) => write!(f, "i/o: {e}"),
            SmtpError::Closed => write!(f, "the server closed the connection"),
            SmtpError::Protocol(m) => write!(f, "protocol: {m}"),
        }
    }
}

/// Longest reply line and most lines per reply read: a server cannot make the client buffer
/// without bound.
const MAX_REPLY_LINE: u64 = 4096;
const MAX_REPLY_LINES: usize = 64;

/// What the server's EHLO reply advertised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extensions {
    pub pipelining: bool,
    /// `SIZE` (with or without a limit).
    pub size: bool,
    pub eight_bit_mime: bool,
}

impl Extensions {
    /// From the lines of a 250 EHLO reply (the first line is the greeting).
    pub fn parse(reply: &str) -> Extensions {
        let mut e = Extensions::default();
        for line in reply.lines().skip(1) {
            let kw = line
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            match kw.as_str() {
                "PIPELINING" => e.pipelining = true,
                "SIZE" => e.size = true,
                "8BITMIME" => e.eight_bit_mime = true,
                _ => {}
            }
        }
        e
    }
}

/// One SMTP connection after EHLO.
pub struct Conn {
    io: BufStream<TcpStream>,
    pub ext: Extensions,
    /// The last transaction was refused part way: `RSET` before the next `MAIL`.
    needs_rset: bool,
    /// The server said 421 (closing): do not reuse.
    closing: bool,
    /// Never use PIPELINING even if advertised (`--smtp-no-pipelining`).
    no_pipelining: bool,
}

async fn read_reply<S: tokio::io::AsyncBufRead + Unpin>(io: &mut S) -> Result<Reply, SmtpError> {
    let mut text = String::new();
    for _ in 0..MAX_REPLY_LINES {
        let mut line = Vec::new();
        let n = (&mut *io)
            .take(MAX_REPLY_LINE)
            .read_until(b'\n', &mut line)
            .await
            .map_err(SmtpError::Io)?;
        if n == 0 {
            return Err(SmtpError::Closed);
        }
        if line.last() != Some(&b'\n') {
            return Err(SmtpError::Protocol(format!(
                "reply line longer than {MAX_REPLY_LINE} bytes or cut off"
            )));
        }
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches(['\r', '\n']);
        let code: u16 = line
            .get(..3)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| SmtpError::Protocol("reply does not start with a code".into()))?;
        let sep = line.as_bytes().get(3).copied();
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(line.get(4..).unwrap_or(""));
        match sep {
            Some(b'-') => continue,
            Some(b' ') | None => return Ok(Reply { code, text }),
            Some(_) => {
                return Err(SmtpError::Protocol(
                    "reply code not followed by space or dash".into(),
                ))
            }
        }
    }
    Err(SmtpError::Protocol(format!(
        "reply of more than {MAX_REPLY_LINES} lines"
    )))
}

impl Conn {
    /// Connects, reads the greeting and says EHLO (HELO if EHLO is refused).
    pub async fn connect(addr: &str, helo: &str, no_pipelining: bool) -> Result<Conn, SmtpError> {
        let tcp = TcpStream::connect(addr).await.map_err(SmtpError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let mut c = Conn {
            io: BufStream::with_capacity(8 * 1024, 64 * 1024, tcp),
            ext: Extensions::default(),
            needs_rset: false,
            closing: false,
            no_pipelining,
        };
        let greeting = read_reply(&mut c.io).await?;
        if greeting.code != 220 {
            return Err(SmtpError::Protocol(format!(
                "greeting {} instead of 220",
                greeting.code
            )));
        }
        c.command(&format!("EHLO {helo}\r\n")).await?;
        let ehlo = read_reply(&mut c.io).await?;
        if ehlo.code == 250 {
            c.ext = Extensions::parse(&ehlo.text);
        } else {
            c.command(&format!("HELO {helo}\r\n")).await?;
            let r = read_reply(&mut c.io).await?;
            if r.code != 250 {
                return Err(SmtpError::Protocol(format!("HELO answered {}", r.code)));
            }
        }
        Ok(c)
    }

    async fn command(&mut self, line: &str) -> Result<(), SmtpError> {
        self.io
            .write_all(line.as_bytes())
            .await
            .map_err(SmtpError::Io)?;
        self.io.flush().await.map_err(SmtpError::Io)
    }

    pub fn pipelining(&self) -> bool {
        self.ext.pipelining && !self.no_pipelining
    }

    /// Whether the connection can take another message.
    pub fn reusable(&self) -> bool {
        !self.closing
    }

    /// The `MAIL FROM` line with the parameters the server advertised.
    fn mail_from(&self, mail: &Mail) -> String {
        let mut s = format!("MAIL FROM:<{}>", mail.from);
        if self.ext.size {
            s.push_str(&format!(" SIZE={}", mail.data.len()));
        }
        if self.ext.eight_bit_mime && mail.eight_bit {
            s.push_str(" BODY=8BITMIME");
        }
        s.push_str("\r\n");
        s
    }

    fn note(&mut self, r: &Reply) {
        if r.code == 421 {
            self.closing = true;
        }
    }

    /// Sends one mail to `rcpt`; the reply that decided it: the one to the final `.`, or the
    /// first refusal of `MAIL`, `RCPT` or `DATA`.
    pub async fn send(&mut self, mail: &Mail, rcpt: &str) -> Result<Reply, SmtpError> {
        let rset = std::mem::take(&mut self.needs_rset);
        let mail_cmd = self.mail_from(mail);
        let rcpt_cmd = format!("RCPT TO:<{rcpt}>\r\n");
        // A 421 (the server is closing, e.g. after too many errors) ends the exchange at once,
        // whichever command it answers: it is this mail's status and the connection is dropped.
        macro_rules! reply {
            () => {{
                let r = read_reply(&mut self.io).await?;
                self.note(&r);
                if self.closing {
                    return Ok(r);
                }
                r
            }};
        }
        let (mail_r, rcpt_r, data_r);
        if self.pipelining() {
            // RFC 2920: the whole group in one write, then the replies in order.
            let mut group = String::with_capacity(mail_cmd.len() + rcpt_cmd.len() + 16);
            if rset {
                group.push_str("RSET\r\n");
            }
            group.push_str(&mail_cmd);
            group.push_str(&rcpt_cmd);
            group.push_str("DATA\r\n");
            self.command(&group).await?;
            if rset {
                reply!();
            }
            mail_r = reply!();
            rcpt_r = reply!();
            data_r = reply!();
        } else {
            if rset {
                self.command("RSET\r\n").await?;
                reply!();
            }
            self.command(&mail_cmd).await?;
            mail_r = reply!();
            if !mail_r.positive() {
                self.needs_rset = true;
                return Ok(mail_r);
            }
            self.command(&rcpt_cmd).await?;
            rcpt_r = reply!();
            if !rcpt_r.positive() {
                self.needs_rset = true;
                return Ok(rcpt_r);
            }
            self.command("DATA\r\n").await?;
            data_r = reply!();
        }
        let refused = [&mail_r, &rcpt_r]
            .into_iter()
            .find(|r| !r.positive())
            .cloned();
        if data_r.code != 354 {
            self.needs_rset = true;
            return Ok(refused.unwrap_or(data_r));
        }
        if let Some(r) = refused {
            // A server that says 354 after refusing the envelope gets an empty message.
            self.command(".\r\n").await?;
            reply!();
            self.needs_rset = true;
            return Ok(r);
        }
        self.io.write_all(&mail.data).await.map_err(SmtpError::Io)?;
        if !mail.data.ends_with(b"\r\n") {
            self.io.write_all(b"\r\n").await.map_err(SmtpError::Io)?;
        }
        self.command(".\r\n").await?;
        Ok(reply!())
    }
}

/// Connections shared by every sender of a run.
pub struct Pool {
    addr: String,
    helo: String,
    pub rcpt: String,
    no_pipelining: bool,
    permits: Semaphore,
    idle: Mutex<Vec<Conn>>,
    pub size: usize,
    /// Connections opened (reconnects included).
    pub opened: AtomicU64,
    /// Whether any connection's server advertised PIPELINING.
    pub pipelining_seen: AtomicBool,
    /// Whether a connection sent without it (not advertised, or `--smtp-no-pipelining`).
    pub unpipelined_seen: AtomicBool,
}

impl Pool {
    pub fn new(addr: String, helo: String, rcpt: String, size: usize, no_pipelining: bool) -> Pool {
        Pool {
            addr,
            helo,
            rcpt,
            no_pipelining,
            permits: Semaphore::new(size),
            idle: Mutex::new(Vec::with_capacity(size)),
            size,
            opened: AtomicU64::new(0),
            pipelining_seen: AtomicBool::new(false),
            unpipelined_seen: AtomicBool::new(false),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        // A panic elsewhere leaves the list of idle connections usable.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `mail` over a pooled connection: the reply code, or why there was none. The caller
    /// bounds it with its timeout; a dropped future drops its connection too.
    pub async fn send(&self, mail: &Mail) -> Result<u16, ErrorKind> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| ErrorKind::ClientOverload)?;
        let conn = self.idle().pop();
        let mut conn = match conn {
            Some(c) => c,
            None => {
                let c = Conn::connect(&self.addr, &self.helo, self.no_pipelining)
                    .await
                    .map_err(|e| e.kind())?;
                self.opened.fetch_add(1, Ordering::Relaxed);
                if c.pipelining() {
                    self.pipelining_seen.store(true, Ordering::Relaxed);
                } else {
                    self.unpipelined_seen.store(true, Ordering::Relaxed);
                }
                c
            }
        };
        let reply = conn.send(mail, &self.rcpt).await.map_err(|e| e.kind())?;
        if conn.reusable() {
            self.idle().push(conn);
        }
        Ok(reply.code)
    }
}

/// `host:port` for `--smtp-target`.
pub fn validate_addr(raw: &str) -> Result<String, String> {
    let s = raw.trim();
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("--smtp-target `{raw}`: use host:port (e.g. 127.0.0.1:2525)"))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!(
            "--smtp-target `{raw}`: use host:port (e.g. 127.0.0.1:2525)"
        ));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
    use crate::channels::customer;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::TcpListener;

    fn settings(size: usize, encoding: BodyEncoding, attachment_ratio: f64) -> MailSettings {
        MailSettings {
            size,
            rcpt: "complaints@switchboard.localhost".into(),
            encoding,
            attachment_ratio,
        }
    }

    const DATE: &str = "Tue, 1 Jul 2025 10:52:37 +0000";

    #[test]
    fn mails_are_the_asked_size_and_parse_as_complaints() {
        let mut rng = fastrand::Rng::with_seed(7);
        for (size, enc, att) in [
            (10 * 1024, BodyEncoding::EightBit, 0.0),
            (10 * 1024, BodyEncoding::Base64, 0.0),
            (10 * 1024, BodyEncoding::EightBit, 1.0),
            (2_000, BodyEncoding::Base64, 1.0),
            (100 * 1024, BodyEncoding::EightBit, 0.0),
            (500, BodyEncoding::EightBit, 0.0),
        ] {
            let c = customer(3);
            let m = build_mail(&mut rng, &settings(size, enc, att), &c, TEXTS[0], DATE);
            let len = m.data.len();
            assert!(
                len >= size && len <= size + 400,
                "{size} {enc:?} {att}: {len} bytes"
            );
            let text = std::str::from_utf8(&m.data).unwrap();
            // CRLF only: no bare LF or CR (the gateway refuses them as smuggling).
            assert_eq!(text.matches('\n').count(), text.matches("\r\n").count());
            assert_eq!(text.matches('\r').count(), text.matches("\r\n").count());
            assert!(text.ends_with("\r\n"));
            assert!(text.lines().all(|l| l.len() <= 998), "line too long");
            assert_eq!(m.eight_bit, !text.is_ascii());
            if enc == BodyEncoding::Base64 && att == 0.0 {
                assert!(text.is_ascii(), "base64 mail with 8bit bytes");
            }
            // The gateway's parser reads it as we meant.
            let parsed = mail_parser::MessageParser::default()
                .parse(m.data.as_ref())
                .unwrap();
            assert_eq!(parsed.message_id(), Some(m.message_id.as_str()));
            assert!(SUBJECTS.contains(&parsed.subject().unwrap()));
            let body = parsed.body_text(0).unwrap();
            assert!(body.contains(TEXTS[0]), "{enc:?}: complaint text lost");
            let from = parsed.from().unwrap().first().unwrap();
            assert_eq!(from.address(), Some(m.from.as_str()));
            assert_eq!(from.name(), Some(c.name));
            assert_eq!(parsed.attachment_count(), usize::from(att > 0.0));
        }
    }

    #[test]
    fn message_ids_and_senders_differ_per_mail() {
        let mut rng = fastrand::Rng::new();
        let s = settings(1024, BodyEncoding::Mixed, 0.0);
        let a = build_mail(&mut rng, &s, &customer(1), TEXTS[1], DATE);
        let b = build_mail(&mut rng, &s, &customer(2), TEXTS[1], DATE);
        assert_ne!(a.message_id, b.message_id);
        assert_ne!(a.from, b.from);
        assert!(!a.message_id.contains('<'));
    }

    #[test]
    fn dot_stuffing_and_wrapping() {
        assert_eq!(dot_stuff(".a\r\nb\r\n..c\r\n"), "..a\r\nb\r\n...c\r\n");
        assert_eq!(dot_stuff("a.\r\n.\r\n"), "a.\r\n..\r\n");
        let lines = wrap("宽带断网三天了，报修单一直没有回复，客服也打不通。", 12);
        assert!(lines.iter().all(|l| l.len() <= 12), "{lines:?}");
        assert_eq!(
            lines.concat(),
            "宽带断网三天了，报修单一直没有回复，客服也打不通。"
        );
        let lines = wrap("my broadband has been down for three days now", 20);
        assert!(lines.iter().all(|l| l.len() <= 20), "{lines:?}");
        assert_eq!(
            lines.join(" "),
            "my broadband has been down for three days now"
        );
        let h = encode_header("宽带故障投诉，要求赔偿本月全部月租费用以及上门费用");
        assert!(h
            .split("\r\n ")
            .all(|w| w.len() <= 75 && w.starts_with("=?UTF-8?B?")));
        assert_eq!(encode_header("Billing"), "Billing");
    }

    #[test]
    fn extensions_and_addresses() {
        let e = Extensions::parse(
            "gw Switchboard\nPIPELINING\nSIZE 26214400\n8BITMIME\nENHANCEDSTATUSCODES",
        );
        assert_eq!(
            e,
            Extensions {
                pipelining: true,
                size: true,
                eight_bit_mime: true
            }
        );
        assert_eq!(
            Extensions::parse("gw\nSIZE"),
            Extensions {
                size: true,
                ..Default::default()
            }
        );
        assert!(validate_addr("127.0.0.1:2525").is_ok());
        for bad in ["", "127.0.0.1", ":25", "h:0", "h:x", "h:70000"] {
            assert!(validate_addr(bad).is_err(), "{bad:?}");
        }
    }

    /// What the fake server saw of one connection.
    #[derive(Debug, Default)]
    struct Seen {
        commands: Vec<String>,
        messages: Vec<Vec<u8>>,
    }

    impl Seen {
        /// The command verbs in order (`MAIL FROM:<a>` → `MAIL`).
        fn verbs(&self) -> Vec<&str> {
            self.commands
                .iter()
                .map(|c| c.split([' ', ':']).next().unwrap())
                .collect()
        }
    }

    /// A tiny SMTP server that, when `pipelining` is advertised, answers the envelope only once
    /// MAIL, RCPT and DATA have all arrived: a client waiting for each reply before sending the
    /// next command would hang (and the test time out). RCPT to `refuse@…` gets 550.
    async fn fake_server(
        listener: TcpListener,
        pipelining: bool,
        seen: std::sync::Arc<Mutex<Seen>>,
    ) {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut io = BufStream::new(tcp);
        io.write_all(b"220 fake ESMTP\r\n").await.unwrap();
        io.flush().await.unwrap();
        let mut group: Vec<String> = Vec::new();
        loop {
            let mut line = String::new();
            if io.read_line(&mut line).await.unwrap() == 0 {
                return;
            }
            let cmd = line.trim_end().to_string();
            seen.lock().unwrap().commands.push(cmd.clone());
            let verb = cmd.split([' ', ':']).next().unwrap().to_ascii_uppercase();
            let reply: String = match verb.as_str() {
                "EHLO" => {
                    if pipelining {
                        "250-fake\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n".into()
                    } else {
                        "250-fake\r\n250 SIZE 1000000\r\n".into()
                    }
                }
                "QUIT" => {
                    io.write_all(b"221 bye\r\n").await.unwrap();
                    io.flush().await.unwrap();
                    return;
                }
                "RSET" | "MAIL" | "RCPT" | "DATA" => {
                    group.push(cmd.clone());
                    if pipelining && verb != "DATA" {
                        continue; // wait for the rest of the group before answering
                    }
                    let mut out = String::new();
                    let mut ok = true;
                    for c in group.drain(..) {
                        if c.starts_with("RSET") {
                            out.push_str("250 reset\r\n");
                        } else if c.starts_with("MAIL") {
                            out.push_str("250 sender ok\r\n");
                        } else if c.starts_with("RCPT") {
                            if c.contains("refuse@") {
                                ok = false;
                                out.push_str("550 no such user\r\n");
                            } else {
                                out.push_str("250 rcpt ok\r\n");
                            }
                        } else if ok {
                            out.push_str("354 go ahead\r\n");
                        } else {
                            out.push_str("503 no valid recipients\r\n");
                        }
                    }
                    io.write_all(out.as_bytes()).await.unwrap();
                    io.flush().await.unwrap();
                    if !out.contains("354") {
                        continue;
                    }
                    let mut data = Vec::new();
                    loop {
                        let mut l = Vec::new();
                        io.read_until(b'\n', &mut l).await.unwrap();
                        if l == b".\r\n" {
                            break;
                        }
                        data.extend_from_slice(&l);
                    }
                    seen.lock().unwrap().messages.push(data);
                    "250 2.0.0 Queued as 01K0000000000000000000000\r\n".into()
                }
                _ => "502 not implemented\r\n".into(),
            };
            io.write_all(reply.as_bytes()).await.unwrap();
            io.flush().await.unwrap();
        }
    }

    async fn exchange(pipelining: bool) -> (Vec<u16>, Seen, Extensions) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = std::sync::Arc::new(Mutex::new(Seen::default()));
        let server = tokio::spawn(fake_server(listener, pipelining, seen.clone()));
        let mut rng = fastrand::Rng::with_seed(1);
        let s = settings(3000, BodyEncoding::EightBit, 0.0);
        let mut conn = tokio::time::timeout(
            DEFAULT_TIMEOUT,
            Conn::connect(&addr, "loadtest.example", false),
        )
        .await
        .unwrap()
        .unwrap();
        let ext = conn.ext;
        let mut codes = Vec::new();
        for rcpt in ["a@x", "refuse@x", "b@x"] {
            let m = build_mail(&mut rng, &s, &customer(9), ".starts with a dot", DATE);
            let r = tokio::time::timeout(DEFAULT_TIMEOUT, conn.send(&m, rcpt))
                .await
                .expect("the client waited for a reply the server holds back (no pipelining)")
                .unwrap();
            codes.push(r.code);
        }
        conn.command("QUIT\r\n").await.unwrap();
        server.await.unwrap();
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        (codes, seen, ext)
    }

    #[tokio::test]
    async fn pipelines_the_envelope_and_reuses_the_connection() {
        let (codes, seen, ext) = exchange(true).await;
        assert!(ext.pipelining);
        assert_eq!(codes, vec![250, 550, 250]);
        let verbs = seen.verbs();
        // One connection, three transactions; RSET only after the refused one.
        assert_eq!(
            verbs,
            vec![
                "EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT",
                "DATA", "QUIT"
            ]
        );
        assert!(seen.commands[1].contains(" SIZE="));
        assert!(seen.commands[1].ends_with(" BODY=8BITMIME"));
        assert_eq!(seen.messages.len(), 2);
        // Dot-stuffed on the wire: the server sees the stuffed line.
        let m = String::from_utf8(seen.messages[0].clone()).unwrap();
        assert!(m.contains("\r\n..starts with a dot"), "{m}");
    }

    #[tokio::test]
    async fn without_pipelining_one_command_at_a_time() {
        let (codes, seen, ext) = exchange(false).await;
        assert!(!ext.pipelining && !ext.eight_bit_mime && ext.size);
        assert_eq!(codes, vec![250, 550, 250]);
        let verbs = seen.verbs();
        // After the refused RCPT no DATA is sent; RSET before the next MAIL.
        assert_eq!(
            verbs,
            vec![
                "EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "DATA",
                "QUIT"
            ]
        );
        assert!(!seen.commands[1].contains("BODY="));
    }

    #[tokio::test]
    async fn garbage_replies_and_closed_servers_are_typed_errors() {
        for (greeting, want) in [
            (&b"HTTP/1.1 400 Bad Request\r\n"[..], ErrorKind::Protocol),
            (b"554 go away\r\n", ErrorKind::Protocol),
            (b"", ErrorKind::Request),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let server = tokio::spawn(async move {
                let (mut tcp, _) = listener.accept().await.unwrap();
                tcp.write_all(greeting).await.unwrap();
            });
            let e = Conn::connect(&addr, "x", false).await.err().unwrap();
            assert_eq!(e.kind(), want, "{e}");
            server.await.unwrap();
        }
        // A server closing with 421 after the first refused mail (like the gateway after
        // email.max_errors): the next mail's status is 421 and the connection is not reused.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut io = BufStream::new(tcp);
            io.write_all(b"220 x\r\n").await.unwrap();
            io.flush().await.unwrap();
            let mut line = String::new();
            io.read_line(&mut line).await.unwrap(); // EHLO
            io.write_all(b"250-x\r\n250 PIPELINING\r\n").await.unwrap();
            io.flush().await.unwrap();
            for _ in 0..3 {
                line.clear();
                io.read_line(&mut line).await.unwrap(); // MAIL, RCPT, DATA
            }
            io.write_all(b"250 ok\r\n550 no\r\n503 no\r\n421 4.7.0 Too many errors\r\n")
                .await
                .unwrap();
            io.flush().await.unwrap();
            // Keep the socket until the client is done (a close could reset unread replies).
            while io.read_line(&mut line).await.unwrap_or(0) > 0 {}
        });
        let mut c = Conn::connect(&addr, "x", false).await.unwrap();
        let mut rng = fastrand::Rng::with_seed(3);
        let m = build_mail(
            &mut rng,
            &settings(1000, BodyEncoding::EightBit, 0.0),
            &customer(1),
            TEXTS[2],
            DATE,
        );
        assert_eq!(c.send(&m, "a@x").await.unwrap().code, 550);
        assert!(c.reusable(), "the 421 is not read yet");
        assert_eq!(c.send(&m, "a@x").await.unwrap().code, 421);
        assert!(!c.reusable());
        drop(c);
        server.await.unwrap();
        // Nobody listening.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let e = Conn::connect(&addr, "x", false).await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Connect);
        // An endless reply line is cut, not buffered.
        let mut long = b"220-".to_vec();
        long.extend(std::iter::repeat_n(b'x', 10_000));
        let r = read_reply(&mut tokio::io::BufReader::new(&long[..])).await;
        assert!(matches!(r, Err(SmtpError::Protocol(_))), "{r:?}");
        let r = read_reply(&mut tokio::io::BufReader::new(&b"250-a\r\n250 b\r\n"[..]))
            .await
            .unwrap();
        assert_eq!((r.code, r.text.as_str()), (250, "a\nb"));
    }
}
