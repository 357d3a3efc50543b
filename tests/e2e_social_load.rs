//! Social webhooks under concurrent load against real Kafka: every delivery is answered in the
//! provider's exact success format within the provider's deadline (Meta 5 s, X 3 s), and every
//! message of every batch is recorded once. The latencies are printed as figures.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

const META_SECRET: &str = "load-meta-app-secret";
const X_SECRET: &str = "load-x-consumer-secret-0123456789";

fn meta_batch(batch: usize, n: usize) -> String {
    let messages: Vec<serde_json::Value> = (0..n)
        .map(|k| {
            json!({
                "from": format!("86139{batch:03}{k:05}"),
                "id": format!("wamid.load.{batch}.{k}"),
                "timestamp": (1_767_225_600 + k).to_string(),
                "type": "text",
                "text": {"body": format!("批量投诉 {batch}-{k}：没有信号 📶")},
            })
        })
        .collect();
    json!({"object": "whatsapp_business_account", "entry": [{"id": "210000000000001",
        "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "8610010001", "phone_number_id": "310000000000001"},
            "messages": messages}}]}]})
    .to_string()
}

fn x_dm(i: usize) -> String {
    json!({"for_user_id": "4337869213", "direct_message_events": [{
        "type": "message_create", "id": format!("19000000000{i:06}"),
        "created_timestamp": "1717000000001",
        "message_create": {"target": {"recipient_id": "4337869213"},
            "sender_id": format!("77{i:06}"),
            "message_data": {"text": format!("DM complaint {i}: 网速太慢")}}}],
        "users": {}})
    .to_string()
}

fn summary(name: &str, mut ms: Vec<f64>) -> f64 {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    eprintln!(
        "{name}: {} requests, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms.len(),
        p(0.5),
        p(0.99),
        ms[ms.len() - 1]
    );
    ms[ms.len() - 1]
}

#[tokio::test]
async fn concurrent_deliveries_are_answered_within_provider_deadlines() {
    let (gw, brokers, topic) = gateway_with_topic(
        3,
        &[
            (
                "SWITCHBOARD_META__APP_SECRETS",
                format!("[\"{META_SECRET}\"]"),
            ),
            (
                "SWITCHBOARD_X__CONSUMER_SECRETS",
                format!("[\"{X_SECRET}\"]"),
            ),
            (
                "SWITCHBOARD_LIMITS__PER_SOURCE__PER_SECOND",
                "100000".into(),
            ),
            ("SWITCHBOARD_LIMITS__PER_SOURCE__BURST", "100000".into()),
        ],
    )
    .await;
    const BATCHES: usize = 40;
    const PER_BATCH: usize = 25;
    const DMS: usize = 200;
    let mut tasks = Vec::new();
    for b in 0..BATCHES {
        let client = gw.client.clone();
        let url = format!("{}/hooks/meta", gw.http);
        tasks.push(tokio::spawn(async move {
            let body = meta_batch(b, PER_BATCH);
            let sig = format!(
                "sha256={}",
                switchboard::auth::sign_hex(META_SECRET, &[body.as_bytes()])
            );
            let t = Instant::now();
            let r = client
                .post(url)
                .header("content-type", "application/json")
                .header("x-hub-signature-256", sig)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            ("meta", status.as_u16(), text, t.elapsed())
        }));
    }
    for i in 0..DMS {
        let client = gw.client.clone();
        let url = format!("{}/hooks/x", gw.http);
        tasks.push(tokio::spawn(async move {
            let body = x_dm(i);
            let sig = switchboard::channels::x::sign(X_SECRET, body.as_bytes());
            let t = Instant::now();
            let r = client
                .post(url)
                .header("content-type", "application/json")
                .header("x-twitter-webhooks-signature", sig)
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            ("x", status.as_u16(), text, t.elapsed())
        }));
    }
    let (mut meta_ms, mut x_ms) = (Vec::new(), Vec::new());
    for t in tasks {
        let (kind, status, body, took) = t.await.unwrap();
        assert_eq!(status, 200, "{kind}: {body}");
        if kind == "meta" {
            assert_eq!(body, switchboard::channels::meta::SUCCESS);
            meta_ms.push(took.as_secs_f64() * 1000.0);
        } else {
            x_ms.push(took.as_secs_f64() * 1000.0);
        }
    }
    // The providers' deadlines, not performance targets: a late answer is a failed delivery.
    assert!(summary("meta batches of 25", meta_ms) < Duration::from_secs(5).as_secs_f64() * 1000.0);
    assert!(summary("x direct messages", x_ms) < Duration::from_secs(3).as_secs_f64() * 1000.0);

    let want = BATCHES * PER_BATCH + DMS;
    let msgs = consume_until(&brokers, &topic, |m| m.len() >= want).await;
    let ids: std::collections::HashSet<String> = msgs
        .iter()
        .map(|m| {
            record_json(m)["provider_message_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), want, "every message recorded once");
}
