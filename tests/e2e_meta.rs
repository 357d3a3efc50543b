//! Meta webhooks (WhatsApp Cloud API, Messenger, Instagram) end to end against a real Kafka
//! broker: the GET handshake, `X-Hub-Signature-256`-signed deliveries as Meta sends them, and the
//! records they leave in the topic.

mod common;

use common::*;
use switchboard::channels::meta;

const APP_SECRET: &str = "test_app_secret";
const VERIFY_TOKEN: &str = "meatyhamhock";
const JSON: &str = "application/json";

fn meta_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "SWITCHBOARD_META__APP_SECRETS",
            format!("[\"rotated-in-secret\", \"{APP_SECRET}\"]"),
        ),
        ("SWITCHBOARD_META__VERIFY_TOKEN", VERIFY_TOKEN.into()),
    ]
}

fn signature(body: &str) -> String {
    format!(
        "sha256={}",
        switchboard::auth::sign_hex(APP_SECRET, &[body.as_bytes()])
    )
}

async fn deliver(gw: &Gateway, body: &str) -> reqwest::Response {
    deliver_signed(gw, body, &signature(body)).await
}

async fn deliver_signed(gw: &Gateway, body: &str, sig: &str) -> reqwest::Response {
    gw.post(
        meta::ROUTE,
        JSON,
        &[("x-hub-signature-256", sig.to_string())],
        body.to_string(),
    )
    .await
}

async fn assert_received(r: reqwest::Response) {
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), meta::SUCCESS);
}

async fn handshake(gw: &Gateway, query: &str) -> reqwest::Response {
    gw.client
        .get(format!("{}{}?{query}", gw.http, meta::ROUTE))
        .send()
        .await
        .unwrap()
}

/// `/metrics` on a new connection: the shared client's pooled admin connection may have been
/// closed by the server's idle timeout while the test was reading Kafka.
async fn fresh_metrics(gw: &Gateway) -> String {
    reqwest::get(format!("{}/metrics", gw.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn by_id<'a>(recs: &'a [serde_json::Value], id: &str) -> &'a serde_json::Value {
    recs.iter()
        .find(|r| r["provider_message_id"] == id)
        .unwrap_or_else(|| panic!("no record for {id} in {recs:?}"))
}

#[tokio::test]
async fn meta_handshake_products_and_signature_failures() {
    let (gw, brokers, topic) = gateway_with_topic(1, &meta_env()).await;
    let validator = schema_validator();

    // Handshake: the challenge back as text/plain for the right token only.
    let r = handshake(
        &gw,
        "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=meatyhamhock",
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.text().await.unwrap(), "1158201444");
    for q in [
        "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=wrong",
        "hub.challenge=1158201444&hub.verify_token=meatyhamhock",
        "",
    ] {
        assert_eq!(handshake(&gw, q).await.status(), 403, "{q}");
    }

    // M1 exactly as CHANNELS.md gives it, with its published (computed) signature.
    let m1 = fixture("meta/whatsapp_text_m1.json");
    assert_received(
        deliver_signed(
            &gw,
            &m1,
            "sha256=ded1d1d9621cffa39832ccf2b330fa476b4dc8ec2a5d102e1e554312b3f21d42",
        )
        .await,
    )
    .await;

    // Chinese text sent \u-escaped, a redelivery of it, an image, Messenger, Instagram, a batch
    // over two entries, then deliveries with nothing to record.
    let zh = fixture("meta/whatsapp_text_zh.json");
    assert_received(deliver(&gw, &zh).await).await;
    assert_received(deliver(&gw, &zh).await).await;
    for f in [
        "meta/whatsapp_image.json",
        "meta/messenger_text.json",
        "meta/instagram_text.json",
        "meta/whatsapp_batch_multi_entry.json",
        "meta/whatsapp_statuses.json",
        "meta/messenger_echo.json",
    ] {
        assert_received(deliver(&gw, &fixture(f)).await).await;
    }

    // The same JSON re-encoded (as a proxy would) under the original signature: refused.
    let reencoded =
        serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(&zh).unwrap())
            .unwrap();
    let r = deliver_signed(&gw, &reencoded, &signature(&zh)).await;
    assert_eq!(r.status(), 403);
    // Signed by another app, unsigned, and signed but not JSON.
    let forged = format!(
        "sha256={}",
        switchboard::auth::sign_hex("another-app", &[m1.as_bytes()])
    );
    assert_eq!(deliver_signed(&gw, &m1, &forged).await.status(), 403);
    let r = gw.post(meta::ROUTE, JSON, &[], m1.clone()).await;
    assert_eq!(r.status(), 403);
    assert_eq!(deliver(&gw, "{\"object\":").await.status(), 400);

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 9, "{recs:#?}");
    for r in &recs {
        assert_valid(&validator, r);
        assert_eq!(r["channel"], "social");
    }

    let r = by_id(
        &recs,
        "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=",
    );
    assert_eq!(r["provider"], "meta.whatsapp");
    assert_eq!(r["customer"]["key"], "+16505551234");
    assert_eq!(r["customer"]["name"], "Sheena Nelson");
    assert_eq!(r["content"]["text"], "Does it come in another color?");
    assert_eq!(r["metadata"]["occurred_at"], "2025-06-08T20:59:43.000Z");

    let r = by_id(
        &recs,
        "wamid.HBgNODYxMzgwMDEzODAwMBUCABIYFjNFQjBDMEEyRjE4NzFBQjc2RkM2AA==",
    );
    assert_eq!(r["provider"], "meta.whatsapp");
    assert_eq!(
        r["content"]["text"],
        "家里宽带断网三天了😡，客服电话一直打不通！"
    );
    assert_eq!(r["customer"]["phone"], "+8613800138000");
    assert_eq!(r["customer"]["key"], "+8613800138000");
    assert_eq!(r["customer"]["name"], "王小明");
    assert_eq!(
        r["customer"]["social"],
        serde_json::json!({"platform": "whatsapp", "account": "310000000000001", "id": "8613800138000"})
    );
    assert_eq!(r["metadata"]["occurred_at"], "2026-01-01T00:00:00.000Z");

    let r = by_id(
        &recs,
        "wamid.HBgNODYxMzkwMDEzOTAwMBUCABIYFjNFQjBBQkNERUYwMTIzNDU2Nzg5AA==",
    );
    assert_eq!(r["content"]["text"], "路由器一直红灯");
    assert_eq!(
        r["content"]["attachments"],
        serde_json::json!([{
            "content_type": "image/jpeg",
            "sha256": "tmCr8d9uH5kH3p5VY9vW8cM1ZbqD2o8xQm3j0g0Lr9k=",
            "url": "https://graph.facebook.com/1471350733630522",
        }])
    );
    assert_eq!(r["metadata"]["media_id"], "1471350733630522");

    let r = by_id(&recs, "mid.1457764197618:41d102a3e1ae206a38");
    assert_eq!(r["provider"], "meta.messenger");
    assert_eq!(r["content"]["text"], "hello, world!");
    assert_eq!(
        r["customer"],
        serde_json::json!({
            "key": "messenger:1234567890123456:2345678901234567",
            "social": {"platform": "messenger", "account": "1234567890123456", "id": "2345678901234567"},
        })
    );
    assert_eq!(r["metadata"]["occurred_at"], "2016-03-12T06:29:57.627Z");

    let r = by_id(&recs, "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQxNDAwMDAwMDAwMDAxOjM0MDI4MjM2Njg0MTcxMDMwMTI0NDI3NjAxNzQ4MTgwNjAwNTg1");
    assert_eq!(r["provider"], "meta.instagram");
    assert_eq!(r["content"]["text"], "My SIM stopped working");
    assert_eq!(
        r["customer"]["key"],
        "instagram:17841400000000001:1122334455667788"
    );

    // The two-entry batch lands in provider-time order, not array order.
    let batch: Vec<&serde_json::Value> = recs
        .iter()
        .filter(|r| {
            r["provider_message_id"]
                .as_str()
                .unwrap()
                .starts_with("wamid.batch.")
        })
        .collect();
    let order: Vec<&str> = batch
        .iter()
        .map(|r| r["provider_message_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        [
            "wamid.batch.0001",
            "wamid.batch.0002",
            "wamid.batch.0003",
            "wamid.batch.0004"
        ]
    );
    assert_eq!(batch[0]["content"]["text"], "网络问题");
    assert_eq!(
        batch[0]["conversation"]["in_reply_to"],
        "wamid.outbound.0001"
    );
    assert_eq!(batch[1]["content"]["text"], "Family plan 👨‍👩‍👧 billed twice");
    assert_eq!(
        batch[1]["customer"]["key"],
        "whatsapp:310000000000002:US.13491208655302741918"
    );
    assert!(batch[1]["customer"].get("phone").is_none());
    assert_eq!(
        batch[2]["content"]["text"],
        "\u{200f}الإنترنت لا يعمل منذ يومين 📶❌"
    );
    assert_eq!(batch[2]["customer"]["phone"], "+971501234567");
    assert_eq!(
        batch[3]["content"]["text"],
        "天安门营业厅\n北京市东城区\n39.9087,116.3975"
    );

    // Statuses and echoes/receipts were counted, not recorded.
    let metrics = fresh_metrics(&gw).await;
    let ignored = |kind: &str| {
        metric_value(
            &metrics,
            meta::IGNORED_METRIC,
            &[("channel", "meta"), ("kind", kind)],
        )
    };
    assert_eq!(ignored("status"), 3.0);
    assert_eq!(ignored("echo"), 1.0);
    assert_eq!(ignored("delivery"), 1.0);
    assert_eq!(ignored("read"), 1.0);

    gw.assert_log_has_none_of(&[
        "8613800138000",
        "16505551234",
        "2345678901234567",
        "US.13491208655302741918",
        "宽带断网",
        "Does it come in another color",
        "My SIM stopped working",
    ]);
}

fn bulk(n: usize) -> String {
    let messages: Vec<serde_json::Value> = (0..n)
        .map(|k| {
            serde_json::json!({
                "from": format!("861380{k:07}"),
                "id": format!("wamid.bulk.{k:04}"),
                // Later in the array, earlier in time.
                "timestamp": (1_767_225_600 + n - k).to_string(),
                "type": "text",
                "text": {"body": format!("第{k}条投诉：信号很差 📶 {k}")},
            })
        })
        .collect();
    serde_json::json!({"object": "whatsapp_business_account", "entry": [{"id": "210000000000009",
        "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "8610010009", "phone_number_id": "310000000000009"},
            "messages": messages}}]}]})
    .to_string()
}

#[tokio::test]
async fn meta_batch_of_1000_is_recorded_once() {
    let (gw, brokers, topic) = gateway_with_topic(1, &meta_env()).await;
    let body = bulk(1000);
    assert_received(deliver(&gw, &body).await).await;
    // Meta redelivers the whole batch: every wamid is known, nothing new, still 200.
    assert_received(deliver(&gw, &body).await).await;

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 1000);
    let validator = schema_validator();
    for (pos, r) in recs.iter().enumerate() {
        let k = 999 - pos;
        assert_eq!(r["provider_message_id"], format!("wamid.bulk.{k:04}"));
        assert_eq!(
            r["content"]["text"],
            format!("第{k}条投诉：信号很差 📶 {k}")
        );
        assert_eq!(r["customer"]["phone"], format!("+861380{k:07}"));
        assert_eq!(r["provider"], "meta.whatsapp");
    }
    assert_valid(&validator, &recs[0]);
    assert_valid(&validator, &recs[999]);
    assert_eq!(
        metric_value(
            &fresh_metrics(&gw).await,
            "switchboard_dedupe_hits_total",
            &[("channel", "meta"), ("kind", "provider_id")]
        ),
        1000.0
    );
}
