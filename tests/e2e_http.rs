//! The public listener's edge limits and the spool-only gateway, with real HTTP and TCP clients.
//! No Kafka needed: the gateway runs on its embedded spool, as `cargo run` does.

mod common;

use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn event(id: &str, phone: &str, text: &str) -> String {
    serde_json::json!({"event_id": id, "customer": {"phone": phone}, "text": text}).to_string()
}

/// Reads until the server closes the connection (bounded); returns what was read.
async fn read_to_close(s: &mut TcpStream, within: Duration) -> String {
    let mut buf = Vec::new();
    tokio::time::timeout(within, s.read_to_end(&mut buf))
        .await
        .expect("server did not close the connection in time")
        .ok();
    String::from_utf8_lossy(&buf).into_owned()
}

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

#[tokio::test]
async fn spool_gateway_accepts_and_spool_cat_reads_the_record() {
    let gw = Gateway::start(&[]).await;
    let (status, ready) = gw.readyz().await;
    assert_eq!(status, 200, "spool-only gateway is ready: {ready}");
    let health = gw
        .client
        .get(format!("{}/healthz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    let r = gw.post_signed(&fixture("api/single_zh.json")).await;
    assert_eq!(r.status(), 202);
    let ack: serde_json::Value = r.json().await.unwrap();

    // The operator's view of the spool, through the CLI.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--config", CONFIG, "spool", "cat", "--dir"])
        .arg(gw.spool_dir())
        .output()
        .unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    let rec: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(rec["id"], ack["id"]);
    assert_valid(&schema_validator(), &rec);

    let r = gw
        .client
        .get(format!("{}/nowhere", gw.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "not_found");
}

#[tokio::test]
async fn oversized_heads_are_refused_with_431() {
    let gw = Gateway::start(&[
        ("SWITCHBOARD_HTTP__MAX_HEADER_BYTES", "8192".into()),
        ("SWITCHBOARD_HTTP__MAX_HEADERS", "16".into()),
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
    let mut req = gw.client.post(&url);
    for i in 0..40 {
        req = req.header(format!("x-h{i}"), "v");
    }
    assert_eq!(req.body("{}").send().await.unwrap().status(), 431);
}

#[tokio::test]
async fn slow_clients_are_cut_off() {
    let gw = Gateway::start(&[
        ("SWITCHBOARD_HTTP__HEADER_READ_TIMEOUT_MS", "500".into()),
        ("SWITCHBOARD_HTTP__BODY_READ_TIMEOUT_MS", "500".into()),
        ("SWITCHBOARD_HTTP__KEEPALIVE_IDLE_TIMEOUT_MS", "400".into()),
    ])
    .await;
    let a = addr(&gw.http);

    // Slowloris: half a request head, then silence. The server closes within the timer.
    let mut s = TcpStream::connect(&a).await.unwrap();
    s.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    read_to_close(&mut s, Duration::from_secs(10)).await;

    // Slow body: the head promises 100 bytes, 10 arrive. 408 with a typed body.
    let mut s = TcpStream::connect(&a).await.unwrap();
    s.write_all(
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"event_i",
    )
    .await
    .unwrap();
    let resp = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("body_timeout"), "{resp}");

    // Keep-alive idle: after one answered request and silence, the server closes.
    let mut s = TcpStream::connect(&a).await.unwrap();
    s.write_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let resp = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");

    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "switchboard_rejections_total",
            &[("reason", "body_timeout")]
        ),
        1.0
    );
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let gw = Gateway::start(&[("SWITCHBOARD_HTTP__MAX_CONNECTIONS", "2".into())]).await;
    let a = addr(&gw.http);
    // Two keep-alive connections, each proven accepted by an answered request.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(&a).await.unwrap();
        s.write_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 404"));
        held.push(s);
    }
    let mut third = TcpStream::connect(&a).await.unwrap();
    let _ = third
        .write_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let resp = read_to_close(&mut third, Duration::from_secs(10)).await;
    assert!(resp.is_empty(), "third connection got an answer: {resp}");
    assert_eq!(
        gw.metric(
            "switchboard_http_connections_rejected_total",
            &[("listener", "public")]
        )
        .await,
        1.0
    );
    drop(held);
}

#[tokio::test]
async fn per_customer_limit_answers_429_with_retry_after_and_duplicates_are_free() {
    let gw = Gateway::start(&[
        ("SWITCHBOARD_LIMITS__PER_CUSTOMER__BURST", "2".into()),
        (
            "SWITCHBOARD_LIMITS__PER_CUSTOMER__PER_SECOND",
            "0.01".into(),
        ),
    ])
    .await;
    for i in 0..2 {
        let r = gw
            .post_signed(&event(
                &format!("rl-{i}"),
                "13800138000",
                &format!("complaint {i}"),
            ))
            .await;
        assert_eq!(r.status(), 202);
    }
    // A redelivery does not count against the customer.
    assert_eq!(
        gw.post_signed(&event("rl-0", "13800138000", "complaint 0"))
            .await
            .status(),
        202
    );
    let r = gw
        .post_signed(&event("rl-2", "+8613800138000", "complaint 2"))
        .await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=100).contains(&retry), "Retry-After {retry}");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "rate_limited");
    // Another customer is unaffected.
    assert_eq!(
        gw.post_signed(&event("rl-3", "13900139000", "x"))
            .await
            .status(),
        202
    );

    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "switchboard_rate_limited_total",
            &[("channel", "api"), ("scope", "customer")]
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "switchboard_rejections_total",
            &[("channel", "api"), ("reason", "rate_limited")]
        ),
        1.0
    );
    // Nothing personal in metric labels.
    assert!(!m.contains("13800138000") && !m.contains("rl-2"));
    // The rejected complaint was not written.
    let (records, _) = switchboard::sink::spool::read_all(&gw.spool_dir()).unwrap();
    assert_eq!(records.len(), 3);
    gw.assert_log_has_none_of(&["13800138000", "13900139000"]);
}

#[tokio::test]
async fn invalid_config_fails_at_start_naming_the_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--config", CONFIG, "check-config"])
        .env("SWITCHBOARD_HTTP__MAX_CONNECTIONS", "lots")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http.max_connections"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--config", CONFIG, "check-config"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
