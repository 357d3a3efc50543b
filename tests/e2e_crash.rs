//! Crash safety: the gateway is SIGKILLed under concurrent load, once with Kafka up and once
//! while Kafka is down (records only in the spool), and restarted on the same spool. Every record
//! whose sender got a 202 must be in Kafka afterwards (`lost = |acked \ found| = 0`);
//! duplicates (records Kafka took after the last durable cursor, sent again) keep their id.

mod common;

use common::durability::*;
use common::*;

#[tokio::test]
async fn kill_9_under_load_with_kafka_up_and_down_loses_no_acknowledged_record() {
    let broker = PrivateBroker::start().await;
    let topic = unique("complaints.crash");
    create_topic(&broker.brokers(), &topic, 3).await;
    let env = vec![
        ("SWITCHBOARD_KAFKA__BROKERS", broker.brokers()),
        ("SWITCHBOARD_KAFKA__TOPIC", topic.clone()),
        ("SWITCHBOARD_KAFKA__STATISTICS_INTERVAL_MS", "500".into()),
        ("SWITCHBOARD_LIMITS__ENABLED", "false".into()),
        ("SWITCHBOARD_SPOOL__SEGMENT_BYTES", "65536".into()),
    ];
    let gw = Gateway::start(&env).await;
    gw.wait_ready(true).await;
    let load = Load::start(8, &gw.http);

    // 1. Kafka up: killed mid-load (acks came from Kafka).
    load.wait_more(400).await;
    let dir = gw.kill().await;
    load.retarget(None);
    let gw = Gateway::start_in(dir, &env).await;
    load.retarget(Some(&gw.http));
    load.wait_more(300).await;

    // 2. Kafka down: acks come from the spool; killed mid-load, restarted with Kafka still down.
    broker.stop().await;
    gw.wait_ready(false).await;
    load.wait_more(400).await;
    let dir = gw.kill().await;
    load.retarget(None);
    let gw = Gateway::start_in(dir, &env).await;
    load.retarget(Some(&gw.http));
    load.wait_more(200).await;

    // 3. Kafka back: the spool drains under load.
    broker.resume().await;
    gw.wait_ready(true).await;
    load.wait_more(200).await;
    let sent = load.sent.load(std::sync::atomic::Ordering::Relaxed);
    let refused = load.refused.load(std::sync::atomic::Ordering::Relaxed);
    let acked = load.finish().await;
    gw.wait_metric("switchboard_spool_backlog_records", &[], 0.0)
        .await;

    let (v, _) = verify(&broker.brokers(), &topic, &acked).await;
    println!(
        "{} (requests sent={sent}, not acknowledged={refused}; kill -9 twice)",
        v.report("e2e crash")
    );
    assert!(v.acked >= 1500);
    assert!(v.lost.is_empty(), "{}: {:?}", v.report("lost"), v.lost);
}
