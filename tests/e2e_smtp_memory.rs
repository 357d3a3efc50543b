//! The SMTP memory budget end to end: 200 concurrent large mails (the default session cap) over
//! raw SMTP against the real binary, every one accepted (a `452 4.3.1` is retried, as an MTA
//! would), every one in Kafka, and the gateway's peak RSS (VmHWM) within the bound the README
//! documents:
//!
//!   idle RSS + max_connections × (data_memory_bytes + 256 KiB)
//!            + 3 × max(parse_memory_bytes, max_message_bytes)
//!
//! with the values of the shipped config. No sleeps: every step waits for an SMTP reply.

mod common;

use common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Barrier;

const INTAKE: &str = "complaints@switchboard.localhost";
const MAILS: usize = 200;

/// `SWITCHBOARD_FLOOD_MAIL_BYTES` (default 3 MB): the size of each mail's attachment.
fn attachment_bytes() -> usize {
    std::env::var("SWITCHBOARD_FLOOD_MAIL_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000_000)
}

/// A base64 attachment body (76-column lines), shared by every mail.
fn attachment(len: usize) -> Vec<u8> {
    use base64::Engine;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let raw: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
    let mut out = Vec::with_capacity(b64.len() * 78 / 76 + 2);
    for line in b64.as_bytes().chunks(76) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn head(n: usize) -> Vec<u8> {
    format!(
        "From: Sender {n} <flood{n}@example.cn>\r\nTo: {INTAKE}\r\nSubject: flood {n}\r\n\
         Message-ID: <flood-{n}@example.cn>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\nMy bill for March is wrong ({n}), scan attached.\r\n\
         --b\r\nContent-Type: application/pdf; name=\"bill.pdf\"\r\n\
         Content-Disposition: attachment; filename=\"bill.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n"
    )
    .into_bytes()
}

/// Reads one (possibly multi-line) reply; returns its code and last line.
async fn reply(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> (u16, String) {
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).await.expect("read reply");
        assert!(n > 0, "the gateway closed the connection");
        if line.as_bytes().get(3) != Some(&b'-') {
            return (line[..3].parse().expect("reply code"), line);
        }
    }
}

/// One attempt: the session up to 354, the message, then (after `barrier`: every message sent
/// but for its end) the final dot. Returns the reply to it.
async fn attempt(smtp: &str, n: usize, body: &[u8], barrier: Option<&Barrier>) -> (u16, String) {
    let (rd, mut wr) = TcpStream::connect(smtp).await.unwrap().into_split();
    let mut rd = BufReader::new(rd);
    assert_eq!(reply(&mut rd).await.0, 220);
    for (cmd, want) in [
        ("EHLO flood.example\r\n".to_string(), 250),
        (format!("MAIL FROM:<flood{n}@example.cn>\r\n"), 250),
        (format!("RCPT TO:<{INTAKE}>\r\n"), 250),
        ("DATA\r\n".to_string(), 354),
    ] {
        wr.write_all(cmd.as_bytes()).await.unwrap();
        let (code, line) = reply(&mut rd).await;
        if code != want {
            // A 421 (too many connections) or 4xx: the caller retries. The others still meet.
            if let Some(b) = barrier {
                b.wait().await;
            }
            return (code, line);
        }
    }
    wr.write_all(&head(n)).await.unwrap();
    wr.write_all(body).await.unwrap();
    wr.write_all(b"--b--\r\n").await.unwrap();
    if let Some(b) = barrier {
        // Every message is on its way before any ends: the gateway holds 200 at once.
        b.wait().await;
    }
    wr.write_all(b".\r\n").await.unwrap();
    let out = reply(&mut rd).await;
    let _ = wr.write_all(b"QUIT\r\n").await;
    out
}

fn status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// The shipped config's `[email]` values the bound is made of.
fn shipped(key: &str) -> u64 {
    let cfg: toml::Value = toml::from_str(&std::fs::read_to_string(CONFIG).unwrap()).unwrap();
    cfg["email"]
        .get(key)
        .and_then(toml::Value::as_integer)
        .unwrap_or_else(|| panic!("email.{key} in the shipped config")) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_large_mails_all_land_within_the_documented_rss() {
    let (gw, brokers, topic) = gateway_with_topic(1, &[]).await;
    let pid = gw.child.id().unwrap();
    let idle_kb = status_kb(pid, "VmRSS:");
    let body = Arc::new(attachment(attachment_bytes()));
    let barrier = Arc::new(Barrier::new(MAILS));
    let deferred = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..MAILS {
        let (smtp, body, barrier, deferred) = (
            gw.smtp.clone(),
            body.clone(),
            barrier.clone(),
            deferred.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (mut code, mut line) = attempt(&smtp, n, &body, Some(&barrier)).await;
            // A 4xx is "try again later" (an MTA queues and retries); bounded here.
            for _ in 0..20 {
                if !(400..500).contains(&code) {
                    break;
                }
                deferred.fetch_add(1, Ordering::Relaxed);
                (code, line) = attempt(&smtp, n, &body, None).await;
            }
            assert_eq!(code, 250, "mail {n}: {line}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let hwm_kb = status_kb(pid, "VmHWM:");
    eprintln!(
        "smtp flood: {MAILS} mails with a {} byte attachment, {} deferred and retried; \
         gateway idle RSS {} MiB, peak RSS (VmHWM) {} MiB",
        attachment_bytes(),
        deferred.load(Ordering::Relaxed),
        idle_kb / 1024,
        hwm_kb / 1024,
    );

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    let mut ids: Vec<String> = recs
        .iter()
        .map(|r| r["provider_message_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), MAILS, "every mail recorded once");
    for r in &recs {
        assert_eq!(r["content"]["attachments"][0]["stored"], true);
    }
    assert!(
        gw.metric("switchboard_smtp_data_spilled_total", &[("result", "ok")])
            .await as usize
            >= MAILS,
        "every large mail went through a spill file"
    );
    let spill = gw.dir.path().join("attachments").join(".incoming");
    assert_eq!(
        std::fs::read_dir(&spill).map(|d| d.count()).unwrap_or(0),
        0,
        "no spill file left"
    );

    let kib = 1024;
    let bound_kb = idle_kb
        + shipped("max_connections") * (shipped("data_memory_bytes") + 256 * kib) / kib
        + 3 * shipped("parse_memory_bytes").max(shipped("max_message_bytes")) / kib;
    eprintln!("smtp flood: documented bound {} MiB", bound_kb / 1024);
    assert!(
        hwm_kb <= bound_kb,
        "peak RSS {hwm_kb} kB over the documented bound {bound_kb} kB"
    );
}
