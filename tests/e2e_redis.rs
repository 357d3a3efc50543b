//! Scale-out: two gateway instances sharing one Redis (dedupe.backend and limits.backend =
//! "redis") and one Kafka topic, as behind a load balancer. A redelivery landing on the other
//! instance collapses to the first record; a per-customer limit holds across both; an instance
//! whose Redis is unreachable keeps taking complaints on its local stores.

mod common;

use common::*;

/// The redis-server the test script started (scripts/test.sh sets this).
fn redis_url() -> String {
    std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| {
        panic!("SWITCHBOARD_TEST_REDIS is not set: run the suite with scripts/test.sh (it starts a real redis-server)")
    })
}

fn shared_env(redis: &str, prefix: &str) -> Vec<(&'static str, String)> {
    vec![
        ("SWITCHBOARD_DEDUPE__BACKEND", "redis".into()),
        ("SWITCHBOARD_LIMITS__BACKEND", "redis".into()),
        ("SWITCHBOARD_REDIS__URL", redis.into()),
        ("SWITCHBOARD_REDIS__KEY_PREFIX", prefix.into()),
        // The shipped 50 ms is for a production network; a loaded CI host running a debug build
        // can stall a call longer than that, and a fallback would make the instances dedupe
        // apart (the very thing these tests show does not happen while Redis answers).
        ("SWITCHBOARD_REDIS__TIMEOUT_MS", "5000".into()),
    ]
}

/// Two instances on one topic (one partition, so the log order is the write order) and one
/// Redis key space of their own.
async fn pair(extra: &[(&'static str, String)]) -> (Gateway, Gateway, String, String) {
    let brokers = kafka_brokers();
    let topic = unique("complaints.e2e");
    create_topic(&brokers, &topic, 1).await;
    let prefix = format!("{}:", unique("sb.e2e"));
    let mut env = vec![
        ("SWITCHBOARD_KAFKA__BROKERS", brokers.clone()),
        ("SWITCHBOARD_KAFKA__TOPIC", topic.clone()),
    ];
    env.extend(shared_env(&redis_url(), &prefix));
    env.extend(extra.iter().cloned());
    let (a, b) = tokio::join!(Gateway::start(&env), Gateway::start(&env));
    a.wait_ready(true).await;
    b.wait_ready(true).await;
    assert_ne!(a.http, b.http);
    (a, b, brokers, topic)
}

fn event(id: &str, customer: &str, text: &str) -> String {
    serde_json::json!({
        "event_id": id,
        "customer": {"id": customer},
        "text": text,
    })
    .to_string()
}

#[tokio::test]
async fn a_redelivery_to_the_other_instance_collapses_to_one_record() {
    let (a, b, brokers, topic) = pair(&[]).await;
    let body = event(
        "crm-4711",
        "cust-redeliver",
        "宽带从昨晚开始断线，请尽快处理",
    );

    let first = a.post_signed(&body).await;
    assert_eq!(first.status(), 202);
    let first: serde_json::Value = first.json().await.unwrap();
    assert_eq!(first["duplicate"], false);

    // The provider's retry lands on the other instance: same answer, nothing written.
    let again = b.post_signed(&body).await;
    assert_eq!(again.status(), 202, "a duplicate is a success");
    let again: serde_json::Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["duplicate"], true);
    let asked = claims(&b).await;
    assert!(asked >= 1.0, "B asked Redis");

    // B now knows it: further repeats on B are answered from its memory, no round trip.
    for _ in 0..3 {
        let r: serde_json::Value = b.post_signed(&body).await.json().await.unwrap();
        assert_eq!(r["id"], first["id"]);
        assert_eq!(r["duplicate"], true);
    }
    assert_eq!(claims(&b).await, asked, "repeats were answered locally");
    // And a repeat back on A is a local hit there.
    let r: serde_json::Value = a.post_signed(&body).await.json().await.unwrap();
    assert_eq!(r["id"], first["id"]);

    // Same content under a new id on the other instance within the fingerprint window.
    let resubmit = event(
        "crm-4712",
        "cust-redeliver",
        "宽带从昨晚开始断线，请尽快处理",
    );
    let r: serde_json::Value = b.post_signed(&resubmit).await.json().await.unwrap();
    assert_eq!(r["id"], first["id"]);
    assert_eq!(r["duplicate"], true);

    // Exactly one record reached Kafka before the sentinel.
    let records = records_until_sentinel(&a, &brokers, &topic).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["id"], first["id"]);
    assert!(
        b.metric(
            "switchboard_dedupe_hits_total",
            &[("channel", "api"), ("kind", "provider_id")]
        )
        .await
            >= 4.0
    );
    assert_eq!(
        b.metric("switchboard_records_emitted_total", &[]).await,
        0.0,
        "B wrote nothing"
    );
    assert_eq!(b.metric("switchboard_redis_up", &[]).await, 1.0);
    assert_eq!(b.readyz().await.1["redis"], "up");
}

#[tokio::test]
async fn a_per_customer_limit_holds_across_both_instances() {
    // Burst 3, refill one per 1000 s: nothing refills during the test.
    let (a, b, brokers, topic) = pair(&[
        ("SWITCHBOARD_LIMITS__PER_CUSTOMER__BURST", "3".into()),
        (
            "SWITCHBOARD_LIMITS__PER_CUSTOMER__PER_SECOND",
            "0.001".into(),
        ),
    ])
    .await;
    let (mut accepted, mut refused) = (0, [0, 0]);
    for i in 0..10 {
        let (gw, n) = if i % 2 == 0 { (&a, 0) } else { (&b, 1) };
        let r = gw
            .post_signed(&event(
                &format!("flood-{i}"),
                "cust-flood",
                &format!("complaint number {i}"),
            ))
            .await;
        match r.status().as_u16() {
            202 => accepted += 1,
            429 => {
                assert!(r.headers().contains_key("retry-after"));
                refused[n] += 1;
            }
            s => panic!("unexpected {s}: {}", r.text().await.unwrap()),
        }
    }
    assert_eq!(accepted, 3, "the burst, across both instances");
    assert_eq!(refused, [3, 4]);
    for (gw, want) in [(&a, 3.0), (&b, 4.0)] {
        assert_eq!(
            gw.metric(
                "switchboard_rate_limited_total",
                &[("channel", "api"), ("scope", "customer")]
            )
            .await,
            want
        );
    }
    // Another customer is not limited, on either instance.
    for gw in [&a, &b] {
        let r = gw
            .post_signed(&event(&unique("other"), "cust-calm", &unique("text")))
            .await;
        assert_eq!(r.status(), 202);
    }
    let records = records_until_sentinel(&a, &brokers, &topic).await;
    let flood = records
        .iter()
        .filter(|r| r["customer"]["customer_id"] == "cust-flood")
        .count();
    assert_eq!(flood, 3);
    assert_eq!(records.len(), 5);
}

#[tokio::test]
async fn an_instance_whose_redis_is_unreachable_keeps_taking_complaints() {
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (gw, brokers, topic) = gateway_with_topic(
        1,
        &[
            ("SWITCHBOARD_DEDUPE__BACKEND", "redis".into()),
            ("SWITCHBOARD_LIMITS__BACKEND", "redis".into()),
            (
                "SWITCHBOARD_REDIS__URL",
                format!("redis://127.0.0.1:{dead}/0"),
            ),
            ("SWITCHBOARD_LIMITS__PER_CUSTOMER__BURST", "2".into()),
            (
                "SWITCHBOARD_LIMITS__PER_CUSTOMER__PER_SECOND",
                "0.001".into(),
            ),
        ],
    )
    .await;
    let body = event("outage-1", "cust-outage", "no signal since the storm");
    let first = gw.post_signed(&body).await;
    assert_eq!(first.status(), 202, "intake does not depend on Redis");
    let first: serde_json::Value = first.json().await.unwrap();
    // Dedupe falls back to this instance's memory.
    let again: serde_json::Value = gw.post_signed(&body).await.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["duplicate"], true);
    // Limits fall back to the local limiter: burst 2 for this customer on this instance.
    assert_eq!(
        gw.post_signed(&event("outage-2", "cust-outage", "still nothing"))
            .await
            .status(),
        202
    );
    assert_eq!(
        gw.post_signed(&event("outage-3", "cust-outage", "and again"))
            .await
            .status(),
        429
    );

    assert!(gw.metric("switchboard_redis_fallbacks_total", &[]).await >= 3.0);
    assert!(
        gw.metric("switchboard_redis_fallbacks_total", &[("op", "limit")])
            .await
            >= 1.0
    );
    assert_eq!(gw.metric("switchboard_redis_up", &[]).await, 0.0);
    // Ready all the same (Redis is not needed to make complaints durable); /readyz says how.
    let (status, body) = gw.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["redis"], "down (local fallback)");
    let log = gw.log();
    assert!(log.contains("redis unreachable"), "the fallback is logged");
    assert!(!log.contains("cust-outage"), "keys are hashes, never ids");

    let records = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(records.len(), 2);
}

/// Claims an instance sent to Redis and got an answer for.
async fn claims(gw: &Gateway) -> f64 {
    gw.metric(
        "switchboard_redis_requests_total",
        &[("op", "dedupe_claim"), ("outcome", "ok")],
    )
    .await
}
