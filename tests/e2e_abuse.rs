//! Abuse at the edges, with real clients against the running gateway: slowloris heads and bodies,
//! thousands of idle connections, connection caps, oversize heads and bodies, websocket floods,
//! huge and malformed frames, SMTP command floods and oversize lines. Every refusal is checked
//! on its counter. No Kafka needed: the gateway runs on its embedded spool.

mod common;

use common::*;
use futures_util::SinkExt;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (bounded); returns what was read.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .expect("server did not close the connection in time")
        .ok();
    String::from_utf8_lossy(&buf).into_owned()
}

/// Writes `bytes` one at a time, `gap` apart, until the server closes the connection (a write
/// fails or a read sees the end); returns what the server sent. The pace is the client's
/// behaviour under test, not a wait for the server.
async fn dribble(s: TcpStream, bytes: &[u8], gap: Duration) -> String {
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = rd.read_to_end(&mut buf).await;
        buf
    });
    for b in bytes.iter().cycle().take(10_000) {
        if reader.is_finished() || wr.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(gap).await;
    }
    let got = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("server did not close the dribbling connection")
        .unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn slowloris_heads_and_bodies_are_cut_and_counted() {
    let gw = Gateway::start(&[
        ("SWITCHBOARD_HTTP__HEADER_READ_TIMEOUT_MS", "300".into()),
        ("SWITCHBOARD_HTTP__BODY_READ_TIMEOUT_MS", "300".into()),
    ])
    .await;
    let a = addr(&gw.http);

    // A head dribbled a byte every 20 ms never completes within 300 ms: hyper's timer closes it.
    let s = TcpStream::connect(&a).await.unwrap();
    let got = dribble(
        s,
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        Duration::from_millis(20),
    )
    .await;
    assert!(!got.contains("HTTP/1.1 2"), "{got}");
    gw.wait_metric(
        "switchboard_http_connection_errors_total",
        &[("listener", "public"), ("reason", "header_timeout")],
        1.0,
    )
    .await;

    // A body dribbled after a complete head: 408 with a typed body, counted.
    let s = TcpStream::connect(&a).await.unwrap();
    let (rd, mut wr) = s.into_split();
    wr.write_all(
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
    )
    .await
    .unwrap();
    let s = rd.reunite(wr).unwrap();
    let got = dribble(s, b"{\"event_id\":", Duration::from_millis(20)).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("body_timeout"), "{got}");
    gw.wait_metric(
        "switchboard_rejections_total",
        &[("reason", "body_timeout")],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn oversize_heads_get_431_and_bodies_413_and_both_are_counted() {
    let gw = Gateway::start(&[
        ("SWITCHBOARD_HTTP__MAX_HEADER_BYTES", "8192".into()),
        ("SWITCHBOARD_HTTP__MAX_BODY_BYTES", "4096".into()),
    ])
    .await;
    let url = format!("{}/v1/events", gw.http);
    let r = gw
        .client
        .post(&url)
        .header("x-big", "a".repeat(20_000))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    gw.wait_metric(
        "switchboard_http_connection_errors_total",
        &[("listener", "public"), ("reason", "header_too_large")],
        1.0,
    )
    .await;

    // Declared too large: refused before the body is read.
    let body = "x".repeat(10_000);
    let r = gw.post_signed(&body).await;
    assert_eq!(r.status(), 413);
    // Chunked (no Content-Length): refused once the cap is crossed.
    let mut s = TcpStream::connect(addr(&gw.http)).await.unwrap();
    s.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..3 {
        s.write_all(format!("800\r\n{}\r\n", "y".repeat(0x800)).as_bytes())
            .await
            .unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line).await.unwrap();
    assert!(line.starts_with("HTTP/1.1 413"), "{line}");
    gw.wait_metric(
        "switchboard_rejections_total",
        &[("reason", "body_too_large")],
        2.0,
    )
    .await;

    // A request line that is not HTTP: hyper answers 400, counted as malformed.
    let mut s = TcpStream::connect(addr(&gw.http)).await.unwrap();
    s.write_all(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        .await
        .unwrap();
    let got = read_to_close(&mut s).await;
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 400"), "{got}");
    gw.wait_metric(
        "switchboard_http_connection_errors_total",
        &[("listener", "public"), ("reason", "malformed_request")],
        1.0,
    )
    .await;
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_and_counted() {
    let gw = Gateway::start(&[("SWITCHBOARD_HTTP__MAX_CONNECTIONS", "3".into())]).await;
    let a = addr(&gw.http);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(&a).await.unwrap());
    }
    gw.wait_metric(
        "switchboard_http_connections",
        &[("listener", "public")],
        3.0,
    )
    .await;
    let mut over = TcpStream::connect(&a).await.unwrap();
    assert_eq!(read_to_close(&mut over).await, "");
    gw.wait_metric(
        "switchboard_http_connections_rejected_total",
        &[("listener", "public")],
        1.0,
    )
    .await;
    // A held connection still works.
    let s = &mut held[0];
    s.write_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(read_to_close(s).await.starts_with("HTTP/1.1 404"));
}

/// Sequential signed posts; returns (median, max) latency.
async fn latencies(gw: &Gateway, tag: &str, n: usize) -> (Duration, Duration) {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let body = serde_json::json!({
            "event_id": format!("{tag}-{i}"),
            "customer": {"phone": format!("+86138{:08}", i)},
            "text": "网络信号很差，无法接听电话",
        })
        .to_string();
        let t = Instant::now();
        let r = gw.post_signed(&body).await;
        v.push(t.elapsed());
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    }
    v.sort();
    (v[n / 2], v[n - 1])
}

#[tokio::test]
async fn two_thousand_idle_connections_do_not_stop_other_clients() {
    // This process holds the idle sockets: its own soft limit is raised as the gateway's is.
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap();
    assert!(limit >= 4_500, "open-file hard limit {limit} is too low");
    let gw = Gateway::start(&[
        ("SWITCHBOARD_HTTP__HEADER_READ_TIMEOUT_MS", "120000".into()),
        (
            "SWITCHBOARD_HTTP__KEEPALIVE_IDLE_TIMEOUT_MS",
            "120000".into(),
        ),
        ("SWITCHBOARD_HTTP__MAX_CONNECTIONS", "5000".into()),
        ("SWITCHBOARD_LIMITS__ENABLED", "false".into()),
    ])
    .await;
    let (p50_before, max_before) = latencies(&gw, "before", 50).await;

    let a = addr(&gw.http);
    let mut idle = Vec::with_capacity(2_000);
    for i in 0..2_000 {
        let mut s = TcpStream::connect(&a).await.unwrap();
        // Half say nothing at all; half start a head and stop (slowloris that never finishes).
        if i % 2 == 1 {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        }
        idle.push(s);
    }
    // Every idle connection was accepted (the gateway's own count: +1 for reqwest's pool).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = gw
            .metric("switchboard_http_connections", &[("listener", "public")])
            .await;
        if n >= 2_000.0 {
            break;
        }
        assert!(Instant::now() < deadline, "only {n} connections open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (p50_during, max_during) = latencies(&gw, "during", 50).await;
    eprintln!(
        "signed POST /v1/events, 50 sequential: without idle connections p50 {p50_before:?} max {max_before:?}; with 2000 idle p50 {p50_during:?} max {max_during:?}"
    );
    drop(idle);
}

/// Opens a websocket to the chat endpoint by hand, so that frames the client libraries refuse
/// to send (reserved bits, invalid UTF-8) can be written raw.
async fn raw_ws(http: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr(http)).await.unwrap();
    s.write_all(
        b"GET /v1/chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// A masked client frame (zero mask key: the payload goes as is).
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![first, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

/// Reads server frames until a close frame; returns its code.
async fn close_code_of(s: &mut TcpStream) -> u16 {
    loop {
        let mut h = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut h))
            .await
            .expect("no close frame within 20 s")
            .expect("connection dropped without a close frame");
        let len = usize::from(h[1] & 0x7f);
        assert!(len < 126, "unexpected large server frame");
        let mut p = vec![0u8; len];
        s.read_exact(&mut p).await.unwrap();
        if h[0] & 0x0f == 0x8 {
            return u16::from_be_bytes([p[0], p[1]]);
        }
    }
}

#[tokio::test]
async fn websocket_abuse_closes_with_the_right_codes_and_is_counted() {
    let gw = Gateway::start(&[
        ("SWITCHBOARD_CHAT__MAX_FRAME_BYTES", "1024".into()),
        ("SWITCHBOARD_CHAT__MAX_MESSAGE_BYTES", "1024".into()),
        ("SWITCHBOARD_CHAT__FRAMES_PER_SECOND", "5".into()),
        ("SWITCHBOARD_CHAT__REPLIES", "false".into()),
        ("SWITCHBOARD_LIMITS__ENABLED", "false".into()),
    ])
    .await;
    let closes = |reason: &'static str| ("reason", reason);

    // A frame over max_frame_bytes: 1009.
    let mut c = common::chat::ChatClient::connect(&gw.http).await;
    c.ws.send(Message::text("x".repeat(4096))).await.unwrap();
    assert_eq!(c.closed().await, common::chat::Closed::Code(1009));
    gw.wait_metric("switchboard_chat_closes_total", &[closes("too_big")], 1.0)
        .await;

    // A flood of pings over frames_per_second: 1008.
    let mut c = common::chat::ChatClient::connect(&gw.http).await;
    for _ in 0..50 {
        if c.ws.send(Message::Ping(Vec::new().into())).await.is_err() {
            break;
        }
    }
    assert_eq!(c.closed().await, common::chat::Closed::Code(1008));
    gw.wait_metric("switchboard_chat_closes_total", &[closes("abuse")], 1.0)
        .await;
    // The flood never reached the rest of the gateway: a new session is served.
    let mut c = common::chat::ChatClient::connect(&gw.http).await;
    c.hello(serde_json::json!({})).await;
    let _ = c.ws.close(None).await;

    // Reserved bits set (no extension negotiated): protocol error, 1002.
    let mut s = raw_ws(&gw.http).await;
    s.write_all(&frame(0x80 | 0x40 | 0x1, b"{}")).await.unwrap();
    assert_eq!(close_code_of(&mut s).await, 1002);
    gw.wait_metric(
        "switchboard_chat_closes_total",
        &[closes("protocol_error")],
        1.0,
    )
    .await;

    // A text frame that is not UTF-8: 1007.
    let mut s = raw_ws(&gw.http).await;
    s.write_all(&frame(0x80 | 0x1, b"{\"type\":\"\xff\xfe\"}"))
        .await
        .unwrap();
    assert_eq!(close_code_of(&mut s).await, 1007);
    gw.wait_metric(
        "switchboard_chat_closes_total",
        &[closes("invalid_utf8")],
        1.0,
    )
    .await;
}

/// An SMTP client on a raw socket: reads the greeting, then lines.
struct Smtp {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

impl Smtp {
    async fn connect(addr: &str) -> (Smtp, String) {
        let s = TcpStream::connect(addr).await.unwrap();
        let (rd, wr) = s.into_split();
        let mut c = Smtp {
            rd: BufReader::new(rd),
            wr,
        };
        let greeting = c.line().await;
        (c, greeting)
    }
    async fn line(&mut self) -> String {
        let mut l = String::new();
        tokio::time::timeout(Duration::from_secs(20), self.rd.read_line(&mut l))
            .await
            .expect("no SMTP reply within 20 s")
            .unwrap();
        l
    }
    async fn send(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.unwrap();
    }
    /// The server closed the connection with nothing more said: end of stream, or a reset (a
    /// server closing with unread input, e.g. the rest of an oversize line, resets).
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match tokio::time::timeout(Duration::from_secs(20), self.rd.read_to_end(&mut rest))
            .await
            .expect("SMTP session not closed within 20 s")
        {
            Ok(_) => rest.is_empty(),
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[tokio::test]
async fn smtp_floods_and_oversize_lines_end_the_session_and_are_counted() {
    let gw = Gateway::start(&[
        ("SWITCHBOARD_EMAIL__MAX_JUNK_COMMANDS", "5".into()),
        ("SWITCHBOARD_EMAIL__MAX_ERRORS", "3".into()),
        ("SWITCHBOARD_EMAIL__MAX_CONNECTIONS", "2".into()),
    ])
    .await;
    let closed = |reason: &'static str| [("reason", reason)];

    // NOOP flood (not an error reply, so max_errors alone would never end it).
    let (mut c, greeting) = Smtp::connect(&gw.smtp).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    c.send(&b"NOOP\r\n".repeat(8)).await;
    for _ in 0..5 {
        assert!(c.line().await.starts_with("250 "));
    }
    let l = c.line().await;
    assert!(l.starts_with("421 4.7.0"), "{l}");
    assert!(c.closed().await);
    gw.wait_metric(
        "switchboard_smtp_sessions_closed_total",
        &closed("junk_commands"),
        1.0,
    )
    .await;

    // Unknown commands: error replies up to max_errors, then 421.
    let (mut c, _) = Smtp::connect(&gw.smtp).await;
    c.send(b"FOO\r\nBAR\r\nBAZ\r\nQUX\r\n").await;
    for _ in 0..3 {
        let l = c.line().await;
        assert!(l.starts_with("500 5.5.1"), "{l}");
    }
    let l = c.line().await;
    assert!(l.starts_with("421 4.7.0"), "{l}");
    assert!(c.closed().await);
    gw.wait_metric(
        "switchboard_smtp_sessions_closed_total",
        &closed("too_many_errors"),
        1.0,
    )
    .await;

    // A command line over the limit (4096 bytes): 500 5.5.2, then 421 and the connection is
    // dropped. (6000 bytes: one read of the server's, so no unread input turns the close into a
    // reset that could overtake the replies.)
    let (mut c, _) = Smtp::connect(&gw.smtp).await;
    let mut long = b"EHLO ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 6_000));
    long.extend_from_slice(b"\r\n");
    c.send(&long).await;
    let l = c.line().await;
    assert!(l.starts_with("500 5.5.2"), "{l}");
    let l = c.line().await;
    assert!(l.starts_with("421 4.7.0"), "{l}");
    assert!(c.closed().await);
    gw.wait_metric(
        "switchboard_smtp_sessions_closed_total",
        &closed("line_too_long"),
        1.0,
    )
    .await;

    // Over email.max_connections: 421 4.3.2 at once, counted.
    gw.wait_metric("switchboard_smtp_sessions", &[], 0.0).await;
    let (_a, _) = Smtp::connect(&gw.smtp).await;
    let (_b, _) = Smtp::connect(&gw.smtp).await;
    let (mut over, greeting) = Smtp::connect(&gw.smtp).await;
    assert!(greeting.starts_with("421 4.3.2"), "{greeting}");
    assert!(over.closed().await);
    gw.wait_metric("switchboard_smtp_connections_rejected_total", &[], 1.0)
        .await;
}
