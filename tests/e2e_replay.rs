//! Spool replay against a real broker that goes away and comes back: records spooled during the
//! outage reach Kafka in order per customer, the backlog drains to 0 and forwarded segments are
//! released; a gateway restarted on an unfinished spool replays it; `switchboard spool replay`
//! forwards a stopped gateway's spool (and refuses a running one's); `spool stats` shows the
//! backlog.

mod common;

use common::durability::*;
use common::*;
use std::collections::HashMap;

fn env(broker: &PrivateBroker, topic: &str) -> Vec<(&'static str, String)> {
    vec![
        ("SWITCHBOARD_KAFKA__BROKERS", broker.brokers()),
        ("SWITCHBOARD_KAFKA__TOPIC", topic.to_string()),
        ("SWITCHBOARD_KAFKA__STATISTICS_INTERVAL_MS", "500".into()),
        // Small segments: the outage spans several, so releasing them is visible.
        ("SWITCHBOARD_SPOOL__SEGMENT_BYTES", "4096".into()),
    ]
}

async fn post_seq(gw: &Gateway, c: usize, seq: u64) -> String {
    let r = gw.post_signed(&event(c, seq)).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let v: serde_json::Value = r.json().await.unwrap();
    v["id"].as_str().unwrap().to_string()
}

async fn stats(dir: &std::path::Path) -> serde_json::Value {
    let (ok, out, err) = spool_cli(&["stats", "--dir", &dir.display().to_string()], &[]).await;
    assert!(ok, "spool stats failed: {err}");
    serde_json::from_str(out.trim()).unwrap()
}

/// Per key (one partition each), the seq of each record's first appearance only grows.
fn assert_in_order_per_key(records: &[OwnedMessageJson]) -> usize {
    let mut last: HashMap<&str, u64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for r in records {
        if !seen.insert(r.record["id"].as_str().unwrap()) {
            continue;
        }
        let seq = seq_of(&r.record);
        if let Some(prev) = last.insert(&r.key, seq) {
            assert!(prev < seq, "customer {}: seq {seq} after {prev}", r.key);
        }
    }
    last.len()
}

#[tokio::test]
async fn spooled_records_reach_kafka_in_order_when_it_returns_and_segments_are_released() {
    let broker = PrivateBroker::start().await;
    let topic = unique("complaints.replay");
    create_topic(&broker.brokers(), &topic, 3).await;
    let gw = Gateway::start(&env(&broker, &topic)).await;
    gw.wait_ready(true).await;
    let mut acked = Vec::new();
    for c in 0..5 {
        acked.push(post_seq(&gw, c, 0).await);
    }

    broker.stop().await;
    gw.wait_ready(false).await;
    // One customer's complaints follow one another (each acknowledged before the next).
    for seq in 1..=12 {
        for c in 0..5 {
            acked.push(post_seq(&gw, c, seq).await);
        }
    }
    let s = stats(&gw.spool_dir()).await;
    assert_eq!(s["backlog_records"], 60, "{s}");
    assert!(s["backlog_bytes"].as_u64().unwrap() > 0);
    assert!(
        s["segments"].as_u64().unwrap() > 2,
        "the outage spans segments: {s}"
    );
    assert_eq!(
        gw.metric("switchboard_spool_backlog_records", &[]).await,
        60.0
    );

    broker.resume().await;
    gw.wait_ready(true).await;
    // New complaints of the same customers while (or after) the backlog drains stay behind it.
    for seq in 13..=16 {
        for c in 0..5 {
            acked.push(post_seq(&gw, c, seq).await);
        }
    }
    gw.wait_metric("switchboard_spool_backlog_records", &[], 0.0)
        .await;
    // The drained active segment is sealed and released too: one empty segment is left.
    gw.wait_metric("switchboard_spool_segments", &[], 1.0).await;
    assert_eq!(segment_files(&gw.spool_dir()), 1);
    assert!(
        gw.metric("switchboard_spool_segments_released_total", &[])
            .await
            > 2.0
    );
    assert!(gw.metric("switchboard_spool_replayed_total", &[]).await >= 60.0);
    let s = stats(&gw.spool_dir()).await;
    assert_eq!(s["backlog_records"], 0, "{s}");

    let (v, records) = verify(&broker.brokers(), &topic, &acked).await;
    println!("{}", v.report("replay after outage"));
    assert!(v.lost.is_empty(), "{}: {:?}", v.report("lost"), v.lost);
    assert_eq!(assert_in_order_per_key(&records), 5);
    // Replayed records carry what a direct write carries.
    let validator = schema_validator();
    for r in &records {
        assert_valid(&validator, &r.record);
    }
    // After the drain, writes go to Kafka directly again.
    let before = gw
        .metric("switchboard_records_emitted_total", &[("sink", "kafka")])
        .await;
    post_seq(&gw, 0, 17).await;
    assert_eq!(
        gw.metric("switchboard_records_emitted_total", &[("sink", "kafka")])
            .await,
        before + 1.0
    );
}

#[tokio::test]
async fn a_restarted_gateway_replays_its_spool_and_spool_replay_forwards_a_stopped_one() {
    let broker = PrivateBroker::start().await;
    let topic = unique("complaints.restart");
    create_topic(&broker.brokers(), &topic, 3).await;
    let env = env(&broker, &topic);
    broker.stop().await;

    // 1. Kafka down: ten complaints spooled, then the gateway is killed.
    let gw = Gateway::start(&env).await;
    let mut acked = Vec::new();
    for seq in 0..10 {
        acked.push(post_seq(&gw, seq as usize % 3, seq).await);
    }
    let dir = gw.kill().await;
    let spool = dir.path().join("spool");
    let spool_arg = spool.display().to_string();

    // 2. `spool replay` refuses a spool a gateway holds.
    let gw = Gateway::start_in(dir, &env).await;
    let (ok, _, err) = spool_cli(&["replay", "--dir", &spool_arg], &env).await;
    assert!(!ok);
    assert!(err.contains("refusing"), "{err}");
    let dir = gw.kill().await;

    // 3. Kafka back, gateway stopped: `spool replay` forwards the backlog and exits.
    broker.resume().await;
    let (ok, out, err) = spool_cli(&["replay", "--dir", &spool_arg], &env).await;
    assert!(ok, "spool replay failed: {err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["replayed"], 10, "{summary}");
    assert_eq!(summary["backlog_records"], 0);
    assert_eq!(stats(&spool).await["backlog_records"], 0);
    let (v, _) = verify(&broker.brokers(), &topic, &acked).await;
    println!("{}", v.report("spool replay"));
    assert!(v.lost.is_empty(), "{:?}", v.lost);

    // 4. Another outage: spooled, killed; the next start replays the unfinished spool.
    broker.stop().await;
    let gw = Gateway::start_in(dir, &env).await;
    for seq in 10..20 {
        acked.push(post_seq(&gw, seq as usize % 3, seq).await);
    }
    assert_eq!(stats(&spool).await["backlog_records"], 10);
    let dir = gw.kill().await;
    broker.resume().await;
    let gw = Gateway::start_in(dir, &env).await;
    gw.wait_metric("switchboard_spool_backlog_records", &[], 0.0)
        .await;
    let (v, records) = verify(&broker.brokers(), &topic, &acked).await;
    println!("{}", v.report("replay on start"));
    assert!(v.lost.is_empty(), "{:?}", v.lost);
    assert_eq!(v.duplicates, 0, "a clean replay sends each record once");
    assert_in_order_per_key(&records);
    assert!(gw
        .log()
        .contains("spool holds records not yet forwarded to Kafka"));
}
