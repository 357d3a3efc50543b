//! The chaos test: continuous load through the gateway while the Kafka broker is stopped and
//! restarted several times and the gateway is SIGKILLed and restarted on its spool, in an
//! interleaved schedule. Then `lost = |acked \ found| = 0`, reported with the counts.

mod common;

use common::durability::*;
use common::*;
use std::sync::atomic::Ordering;

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillGateway,
    StopBroker,
    ResumeBroker,
}

#[tokio::test]
async fn chaos_broker_bounces_and_gateway_kills_under_load_lose_nothing() {
    use Fault::*;
    let started = std::time::Instant::now();
    let broker = PrivateBroker::start().await;
    let topic = unique("complaints.chaos");
    create_topic(&broker.brokers(), &topic, 3).await;
    let env = vec![
        ("SWITCHBOARD_KAFKA__BROKERS", broker.brokers()),
        ("SWITCHBOARD_KAFKA__TOPIC", topic.clone()),
        ("SWITCHBOARD_KAFKA__STATISTICS_INTERVAL_MS", "500".into()),
        ("SWITCHBOARD_LIMITS__ENABLED", "false".into()),
        ("SWITCHBOARD_SPOOL__SEGMENT_BYTES", "262144".into()),
    ];
    let mut gw = Gateway::start(&env).await;
    gw.wait_ready(true).await;
    let load = Load::start(6, &gw.http);
    // Three broker bounces and five gateway kills (two while Kafka is down, one right after it
    // returned, while the backlog drains).
    let schedule = [
        KillGateway,
        StopBroker,
        KillGateway,
        ResumeBroker,
        KillGateway,
        StopBroker,
        ResumeBroker,
        StopBroker,
        KillGateway,
        ResumeBroker,
        KillGateway,
    ];
    let (mut kills, mut bounces) = (0, 0);
    for fault in schedule {
        // 12 steps of at least 450 acknowledged records each: over 5,000 in all.
        load.wait_more(450).await;
        match fault {
            KillGateway => {
                let dir = gw.kill().await;
                load.retarget(None);
                gw = Gateway::start_in(dir, &env).await;
                load.retarget(Some(&gw.http));
                kills += 1;
            }
            StopBroker => broker.stop().await,
            ResumeBroker => {
                broker.resume().await;
                bounces += 1;
            }
        }
        println!(
            "chaos: {fault:?} done at {:.0} s, {} acknowledged so far",
            started.elapsed().as_secs_f64(),
            load.acked()
        );
    }
    load.wait_more(450).await;
    let sent = load.sent.load(Ordering::Relaxed);
    let refused = load.refused.load(Ordering::Relaxed);
    let acked = load.finish().await;
    gw.wait_ready(true).await;
    gw.wait_metric("switchboard_spool_backlog_records", &[], 0.0)
        .await;
    let (v, _) = verify(&broker.brokers(), &topic, &acked).await;
    println!(
        "{} (broker bounces={bounces}, gateway kill -9={kills}, requests sent={sent}, not acknowledged={refused}, {:.0} s)",
        v.report("chaos"),
        started.elapsed().as_secs_f64()
    );
    assert!(v.acked >= 5000, "{}", v.report("too few acknowledged"));
    assert!(v.lost.is_empty(), "{}: {:?}", v.report("lost"), v.lost);
}
