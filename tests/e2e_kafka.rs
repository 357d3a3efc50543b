//! End to end against a real Kafka broker: signed events in over HTTP, records out of
//! `complaints.v1` read by a real consumer. Needs SWITCHBOARD_TEST_KAFKA (scripts/test.sh).

mod common;

use common::*;
use std::collections::{HashMap, HashSet};

#[tokio::test]
async fn signed_events_reach_kafka_with_fields_key_headers_and_schema() {
    let (gw, brokers, topic) = gateway_with_topic(3, &[]).await;
    let validator = schema_validator();

    let single = fixture("api/single_zh.json");
    let r = gw.post_signed(&single).await;
    assert_eq!(r.status(), 202);
    let single_ack: serde_json::Value = r.json().await.unwrap();
    assert_eq!(single_ack["event_id"], "crm-20261122-000123");
    assert_eq!(single_ack["duplicate"], false);

    let batch = fixture("api/batch_mixed.json");
    let r = gw.post_signed(&batch).await;
    assert_eq!(r.status(), 202);
    let batch_ack: serde_json::Value = r.json().await.unwrap();
    let results = batch_ack["results"].as_array().unwrap();
    assert_eq!(results.len(), 5, "a batch of N yields N answers");

    let mut want: HashMap<String, serde_json::Value> = HashMap::new();
    want.insert(
        single_ack["id"].as_str().unwrap().into(),
        serde_json::from_str(&single).unwrap(),
    );
    let batch_events: Vec<serde_json::Value> = serde_json::from_str(&batch).unwrap();
    for (ack, ev) in results.iter().zip(batch_events) {
        assert_eq!(ack["duplicate"], false);
        assert_eq!(ack["event_id"], ev["event_id"]);
        want.insert(ack["id"].as_str().unwrap().into(), ev);
    }

    let msgs = consume_until(&brokers, &topic, |m| m.len() >= 6).await;
    assert_eq!(msgs.len(), 6, "one record per event");
    let mut seen = HashSet::new();
    for m in &msgs {
        let rec = record_json(m);
        assert_valid(&validator, &rec);
        let id = rec["id"].as_str().unwrap().to_string();
        let ev = want
            .get(&id)
            .unwrap_or_else(|| panic!("unexpected record {id}"));
        assert!(seen.insert(id.clone()), "record {id} twice");

        // Key and headers.
        assert_eq!(key(m), rec["customer"]["key"].as_str().unwrap());
        assert_eq!(header(m, "schema").as_deref(), Some("complaint.v1"));
        assert_eq!(header(m, "channel").as_deref(), Some("api"));
        assert_eq!(header(m, "provider").as_deref(), Some("api"));
        assert_eq!(header(m, "trace_id").as_deref(), rec["trace_id"].as_str());
        assert_eq!(
            header(m, "dedupe_key").as_deref(),
            rec["dedupe_key"].as_str()
        );

        // Fields carried over from the input.
        assert_eq!(rec["schema"], "complaint.v1");
        assert_eq!(rec["channel"], "api");
        assert_eq!(rec["provider"], "api");
        assert_eq!(rec["provider_message_id"], ev["event_id"]);
        assert_eq!(
            rec["metadata"]["source"],
            ev.get("source").cloned().unwrap_or("api".into())
        );
        // Triage by the shipped rules (the rules themselves are tested in e2e_triage and
        // triage_accuracy).
        let text = ev["text"].as_str().unwrap();
        let want = [
            ("从昨天晚上", "network"),
            ("流量套餐莫名其妙", "billing"),
            ("I was charged for roaming", "billing"),
            ("5G signal drops", "network"),
            ("Data leak?", "privacy"),
        ]
        .iter()
        .find(|(p, _)| text.starts_with(p))
        .map(|(_, c)| *c);
        if let Some(c) = want {
            assert_eq!(rec["triage"]["category"], c, "{text}");
        }
        assert!(!rec["triage"]["reasons"].as_array().unwrap().is_empty());
        if let Some(subject) = ev.get("subject") {
            assert_eq!(&rec["content"]["subject"], subject);
        }
        if let Some(name) = ev["customer"].get("name") {
            assert_eq!(&rec["customer"]["name"], name);
        }
    }

    // Identity normalisation as seen downstream.
    let by_event: HashMap<String, serde_json::Value> = msgs
        .iter()
        .map(record_json)
        .map(|r| (r["provider_message_id"].as_str().unwrap().to_string(), r))
        .collect();
    let s = &by_event["crm-20261122-000123"];
    assert_eq!(s["customer"]["key"], "+8613800138000");
    assert_eq!(s["customer"]["phone"], "+8613800138000");
    assert_eq!(
        s["content"]["text"],
        "从昨天晚上开始家里宽带一直断网，客服电话打了三次都没人解决。 请尽快处理！"
    );
    assert_eq!(s["conversation"]["thread_id"], "crm-case-88812");
    assert_eq!(s["content"]["attachments"][0]["name"], "router.jpg");
    assert_eq!(s["metadata"]["area"], "shenzhen-nanshan");
    assert_eq!(s["metadata"]["occurred_at"], "2026-11-22T01:30:00.000Z");
    assert_eq!(by_event["app-7f3a01"]["customer"]["key"], "+8613900139000");
    assert_eq!(
        by_event["app-7f3a02"]["customer"]["key"],
        "li.na@example.com"
    );
    assert_eq!(
        by_event["terminal-shop-0042-991"]["customer"]["key"],
        "customer:CUST-0099812"
    );
    assert_eq!(
        by_event["app-7f3a03"]["customer"]["key"],
        "wechat:gh_3c8f0a1b2c3d:oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"
    );
    assert_eq!(by_event["app-7f3a04"]["customer"]["key"], "+8613700137000");

    assert_eq!(
        gw.metric(
            "switchboard_records_emitted_total",
            &[("channel", "api"), ("sink", "kafka")]
        )
        .await,
        6.0
    );
    gw.assert_log_has_none_of(&[
        "13800138000",
        "li.na@example.com",
        "Li.Na@Example.COM",
        "13900139000",
        "宽带一直断网",
    ]);
}

#[tokio::test]
async fn redelivery_yields_no_second_record_and_returns_the_first_id() {
    let (gw, brokers, topic) = gateway_with_topic(1, &[]).await;
    let body = fixture("api/single_zh.json");
    let first: serde_json::Value = gw.post_signed(&body).await.json().await.unwrap();
    assert_eq!(first["duplicate"], false);
    for _ in 0..3 {
        let r = gw.post_signed(&body).await;
        assert_eq!(r.status(), 202, "a duplicate is a success");
        let again: serde_json::Value = r.json().await.unwrap();
        assert_eq!(again["id"], first["id"]);
        assert_eq!(again["duplicate"], true);
    }
    // A batch that repeats the event inside it and again from before.
    let ev: serde_json::Value = serde_json::from_str(&body).unwrap();
    let batch = serde_json::json!([ev, ev]).to_string();
    let r: serde_json::Value = gw.post_signed(&batch).await.json().await.unwrap();
    for item in r["results"].as_array().unwrap() {
        assert_eq!(item["id"], first["id"]);
        assert_eq!(item["duplicate"], true);
    }

    assert_eq!(gw.post_signed(&sentinel(1)).await.status(), 202);
    // One partition: everything produced before the sentinel is before it in the log.
    let msgs = consume_until(&brokers, &topic, |m| has_text(m, "sentinel 1")).await;
    assert_eq!(msgs.len(), 2, "the original and the sentinel, nothing else");
    assert_eq!(record_json(&msgs[0])["id"], first["id"]);
    assert!(
        gw.metric(
            "switchboard_dedupe_hits_total",
            &[("channel", "api"), ("kind", "provider_id")]
        )
        .await
            >= 4.0
    );
}

#[tokio::test]
async fn bad_requests_get_typed_errors_and_counters_and_nothing_reaches_kafka() {
    let (gw, brokers, topic) =
        gateway_with_topic(1, &[("SWITCHBOARD_HTTP__MAX_BODY_BYTES", "4096".into())]).await;
    let good = fixture("api/single_zh.json");
    let now = chrono::Utc::now().timestamp();
    let url = format!("{}/v1/events", gw.http);

    struct Case {
        name: &'static str,
        status: u16,
        code: &'static str,
        resp: reqwest::Response,
    }
    let mut cases = Vec::new();

    // Bad signature: signed with another secret.
    let bad_sig = switchboard::auth::sign_hex(
        "not-the-secret-000000",
        &[now.to_string().as_bytes(), b".", good.as_bytes()],
    );
    let resp = gw
        .client
        .post(&url)
        .header("content-type", "application/json")
        .header("x-switchboard-timestamp", now.to_string())
        .header("x-switchboard-signature", format!("v1={bad_sig}"))
        .body(good.clone())
        .send()
        .await
        .unwrap();
    cases.push(Case {
        name: "bad signature",
        status: 401,
        code: "bad_signature",
        resp,
    });

    // Expired timestamp (validly signed, 10 minutes old).
    let resp = gw.post_signed_at(&good, now - 600).await;
    cases.push(Case {
        name: "expired timestamp",
        status: 401,
        code: "stale_timestamp",
        resp,
    });

    // Malformed JSON.
    let resp = gw.post_signed("{\"event_id\": \"x\", ").await;
    cases.push(Case {
        name: "malformed json",
        status: 400,
        code: "malformed_json",
        resp,
    });

    // Well-formed JSON that is not an event.
    let resp = gw
        .post_signed(
            r#"{"event_id":"x","customer":{"phone":"13800138000"},"text":"t","colour":"red"}"#,
        )
        .await;
    cases.push(Case {
        name: "unknown field",
        status: 400,
        code: "invalid_event",
        resp,
    });

    // Invalid phone.
    let resp = gw
        .post_signed(r#"{"event_id":"x","customer":{"phone":"12"},"text":"t"}"#)
        .await;
    cases.push(Case {
        name: "invalid phone",
        status: 400,
        code: "invalid_event",
        resp,
    });

    // Too large a body (cap is 4096 bytes here).
    let big = serde_json::json!({"event_id":"big","customer":{"id":"c"},"text":"x".repeat(8000)})
        .to_string();
    let resp = gw.post_signed(&big).await;
    cases.push(Case {
        name: "too large",
        status: 413,
        code: "body_too_large",
        resp,
    });

    // Wrong content type, otherwise valid.
    let resp = gw
        .client
        .post(&url)
        .header("content-type", "text/plain")
        .header("x-switchboard-timestamp", now.to_string())
        .header(
            "x-switchboard-signature",
            format!("v1={}", sign(&good, now)),
        )
        .body(good.clone())
        .send()
        .await
        .unwrap();
    cases.push(Case {
        name: "wrong content type",
        status: 415,
        code: "unsupported_media_type",
        resp,
    });

    // Wrong method, unknown route.
    let resp = gw.client.get(&url).send().await.unwrap();
    assert_eq!(resp.headers().get("allow").unwrap(), "POST");
    cases.push(Case {
        name: "wrong method",
        status: 405,
        code: "method_not_allowed",
        resp,
    });

    let mut expected: HashMap<&str, f64> = HashMap::new();
    for c in cases {
        assert_eq!(c.resp.status().as_u16(), c.status, "{}", c.name);
        assert_eq!(
            c.resp.headers().get("content-type").unwrap(),
            "application/json",
            "{}",
            c.name
        );
        let body: serde_json::Value = c.resp.json().await.unwrap();
        assert_eq!(body["error"], c.code, "{}: {body}", c.name);
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            c.name
        );
        *expected.entry(c.code).or_default() += 1.0;
    }
    let metrics = gw.metrics().await;
    for (code, n) in expected {
        assert_eq!(
            metric_value(
                &metrics,
                "switchboard_rejections_total",
                &[("channel", "api"), ("reason", code)]
            ),
            n,
            "counter for {code}"
        );
    }
    assert_eq!(
        metric_value(&metrics, "switchboard_records_emitted_total", &[]),
        0.0
    );

    assert_eq!(gw.post_signed(&sentinel(2)).await.status(), 202);
    let msgs = consume_until(&brokers, &topic, |m| has_text(m, "sentinel 2")).await;
    assert_eq!(msgs.len(), 1, "only the sentinel reached Kafka");
    gw.assert_log_has_none_of(&["13800138000", "宽带一直断网"]);
}

#[tokio::test]
async fn graceful_shutdown_flushes_what_was_in_flight() {
    // A long linger keeps records in librdkafka's queue while SIGTERM arrives.
    let (mut gw, brokers, topic) =
        gateway_with_topic(3, &[("SWITCHBOARD_KAFKA__LINGER_MS", "1500".into())]).await;
    let n = 20;
    let mut tasks = Vec::new();
    for i in 0..n {
        let body = serde_json::json!({
            "event_id": format!("shutdown-{i}"),
            "customer": {"phone": format!("1380013{:04}", 8000 + i)},
            "text": format!("complaint number {i} before shutdown"),
        })
        .to_string();
        let client = gw.client.clone();
        let url = format!("{}/v1/events", gw.http);
        let ts = chrono::Utc::now().timestamp();
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .header("content-type", "application/json")
                .header("x-switchboard-timestamp", ts.to_string())
                .header("x-switchboard-signature", format!("v1={}", sign(&body, ts)))
                .body(body)
                .send()
                .await
        }));
    }
    // Wait until all requests are inside the gateway, then stop it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while gw.metric("switchboard_http_in_flight_requests", &[]).await < n as f64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests never all in flight"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let status = gw.terminate().await;
    assert!(status.success(), "exit status {status}");

    let mut acked = HashSet::new();
    for t in tasks {
        let r = t
            .await
            .unwrap()
            .expect("in-flight request answered during shutdown");
        assert_eq!(r.status(), 202);
        let v: serde_json::Value = r.json().await.unwrap();
        acked.insert(v["id"].as_str().unwrap().to_string());
    }
    assert_eq!(acked.len(), n);
    let msgs = consume_until(&brokers, &topic, |m| m.len() >= n).await;
    let found: HashSet<String> = msgs
        .iter()
        .map(|m| record_json(m)["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        acked.is_subset(&found),
        "acknowledged but not in Kafka: {:?}",
        acked.difference(&found).collect::<Vec<_>>()
    );
    // Nothing was spooled: Kafka took everything before exit.
    let (spooled, _) = switchboard::sink::spool::read_all(&gw.spool_dir()).unwrap();
    assert!(spooled.is_empty());
}
