//! Kafka unavailable at start, and Kafka going away under a running gateway: requests still
//! succeed via the spool, `/readyz` says so, and nothing acknowledged is lost.

mod common;

use common::durability::PrivateBroker;
use common::*;
use std::time::Duration;

fn event(id: &str, text: &str) -> String {
    serde_json::json!({"event_id": id, "customer": {"phone": "13800138000"}, "text": text})
        .to_string()
}

fn spooled_ids(gw: &Gateway) -> Vec<String> {
    let (records, _) = switchboard::sink::spool::read_all(&gw.spool_dir()).unwrap();
    records
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(r).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn kafka_unavailable_at_start_requests_succeed_via_the_spool() {
    // Nothing listens on port 1.
    let gw = Gateway::start(&[("SWITCHBOARD_KAFKA__BROKERS", "127.0.0.1:1".into())]).await;
    let ready = gw.wait_ready(false).await;
    assert_eq!(ready["sinks"]["kafka"], "down");
    assert_eq!(ready["sinks"]["spool"], "up");
    assert_eq!(ready["accepting"], true);

    let r = gw
        .post_signed(&event("outage-start-1", "no signal at all"))
        .await;
    assert_eq!(r.status(), 202);
    let ack: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        spooled_ids(&gw),
        vec![ack["id"].as_str().unwrap().to_string()]
    );
    let validator = schema_validator();
    let (records, _) = switchboard::sink::spool::read_all(&gw.spool_dir()).unwrap();
    assert_valid(&validator, &serde_json::from_slice(&records[0]).unwrap());
    assert_eq!(
        gw.metric("switchboard_records_emitted_total", &[("sink", "spool")])
            .await,
        1.0
    );
    assert_eq!(
        gw.metric(
            "switchboard_sink_fallbacks_total",
            &[("reason", "kafka_down")]
        )
        .await,
        1.0
    );
    // A redelivery while Kafka is down is still a duplicate, not a second spooled record.
    let again: serde_json::Value = gw
        .post_signed(&event("outage-start-1", "no signal at all"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["id"], ack["id"]);
    assert_eq!(spooled_ids(&gw).len(), 1);
}

#[tokio::test]
async fn kafka_going_away_falls_back_to_the_spool_and_readyz_reflects_it() {
    let broker = PrivateBroker::start().await;
    let topic = unique("complaints.outage");
    create_topic(&broker.brokers(), &topic, 1).await;
    let gw = Gateway::start(&[
        ("SWITCHBOARD_KAFKA__BROKERS", broker.brokers()),
        ("SWITCHBOARD_KAFKA__TOPIC", topic.clone()),
        ("SWITCHBOARD_KAFKA__STATISTICS_INTERVAL_MS", "500".into()),
    ])
    .await;
    let ready = gw.wait_ready(true).await;
    assert_eq!(ready["sinks"]["kafka"], "up");

    let r = gw
        .post_signed(&event("before-outage", "before the outage"))
        .await;
    assert_eq!(r.status(), 202);
    let before: serde_json::Value = r.json().await.unwrap();
    let msgs = consume_until(&broker.brokers(), &topic, |m| !m.is_empty()).await;
    assert_eq!(record_json(&msgs[0])["id"], before["id"]);

    broker.stop().await;
    let ready = gw.wait_ready(false).await;
    assert_eq!(ready["sinks"]["kafka"], "down");
    assert_eq!(ready["accepting"], true);

    let mut during = Vec::new();
    for i in 0..5 {
        let started = std::time::Instant::now();
        let r = gw
            .post_signed(&event(
                &format!("during-outage-{i}"),
                &format!("during the outage {i}"),
            ))
            .await;
        assert_eq!(
            r.status(),
            202,
            "intake keeps succeeding while Kafka is down"
        );
        // Well inside the providers' 3-5 s deadlines (a generous bound, not a benchmark).
        assert!(started.elapsed() < Duration::from_secs(3));
        let v: serde_json::Value = r.json().await.unwrap();
        during.push(v["id"].as_str().unwrap().to_string());
    }
    let spooled = spooled_ids(&gw);
    assert_eq!(
        spooled, during,
        "every record acknowledged during the outage is in the spool"
    );
    assert!(!spooled.contains(&before["id"].as_str().unwrap().to_string()));
    let metrics = gw.metrics().await;
    assert_eq!(metric_value(&metrics, "switchboard_kafka_up", &[]), 0.0);
    assert_eq!(
        metric_value(
            &metrics,
            "switchboard_records_emitted_total",
            &[("sink", "spool")]
        ),
        5.0
    );
    // The spool's gauges are published after the commit that answered the sender, so the scrape
    // right after the last 202 may not see them yet: await them (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = gw.metric("switchboard_spool_records", &[]).await;
        if v >= 5.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "switchboard_spool_records is {v}, want at least 5"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
