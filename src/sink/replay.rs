//! Replay: forwards spooled records to Kafka, in spool order, and moves the spool's cursor.
//!
//! The replayer reads records past the cursor (`Spool::tail`), rebuilds each one's key and
//! headers from the record JSON (`decode`: the same values `pipeline::encode` derived when it was
//! written), and hands it to the same idempotent producer as a direct write, at most
//! `spool.replay_max_in_flight` at a time (memory stays bounded however large the backlog). The
//! cursor advances only over a contiguous prefix of records Kafka acknowledged, and is made
//! durable at most every 200 ms and whenever the replayer goes idle; sealed segments wholly
//! behind it are then deleted, and a drained active segment is sealed so it can go too.
//!
//! A delivery that fails keeps its record in the spool: the window is drained, reading goes back
//! to the last acknowledged record and resends from there after a backoff (200 ms doubling to
//! 10 s). Nothing is dropped; records after the failed one that had already landed are sent again
//! (duplicates carrying the same record id, as after a crash: records Kafka took after the last
//! durable cursor are forwarded again on start).
//!
//! # Order per key
//! Kafka keeps one customer's records in order only if they are handed to the producer in order.
//! `Route` does that: while the spool holds records not yet handed to the producer (`direct` is
//! false), every new record is spooled behind them, even when Kafka is up. Every spool append
//! holds `Route::gate` shared and clears `direct` first; the replayer, once it has read all that
//! is committed, takes the gate exclusively (no append can be half done), hands the rest to the
//! producer and only then sets `direct`, so new records queue behind the last replayed one.
//!
//! Where per-key order can still break (all rare, none loses a record):
//! - A record handed to the producer whose delivery then fails (replayed after the switch, or a
//!   direct write that times out) is resent later, while newer records of the same customer that
//!   were queued behind it may already have landed: the older one then arrives after them.
//! - A delivery that fails "possibly persisted" (timed out in flight) may be in Kafka already;
//!   its resend is a duplicate, later than newer records (the first copy is in order).
//! - If the spool cannot write while it holds a backlog and Kafka is up, records go to Kafka
//!   directly rather than being refused (availability first), overtaking the backlog.
//! - After a crash, records that Kafka took after the last durable cursor are sent again.

use super::kafka::KafkaSink;
use super::spool::{Pos, Spool, Step};
use super::Encoded;
use bytes::Bytes;
use futures_util::FutureExt;
use rdkafka::producer::DeliveryFuture;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Most time between durable cursor updates while records are being acknowledged.
const PERSIST_EVERY: Duration = Duration::from_millis(200);

/// Where new records go: straight to Kafka, or behind the spool's backlog.
pub struct Route {
    direct: AtomicBool,
    gate: tokio::sync::RwLock<()>,
}

impl Route {
    /// `direct` when the spool holds nothing that was not yet handed to the producer.
    pub fn new(direct: bool) -> Self {
        Self {
            direct: AtomicBool::new(direct),
            gate: tokio::sync::RwLock::new(()),
        }
    }

    pub fn direct(&self) -> bool {
        self.direct.load(Ordering::Acquire)
    }

    /// Held (shared) across a spool append, which clears `direct` first.
    pub async fn enter_spool(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    pub fn clear_direct(&self) {
        self.direct.store(false, Ordering::Release);
    }
}

/// The head of a record JSON: what key and headers are derived from.
#[derive(serde::Deserialize)]
struct Head {
    schema: String,
    channel: String,
    provider: String,
    trace_id: String,
    dedupe_key: String,
    customer: CustomerHead,
}

#[derive(serde::Deserialize)]
struct CustomerHead {
    key: String,
}

/// A spooled record as the producer takes it: the payload unchanged, key and headers from the
/// JSON (as `pipeline::encode` set them). A payload that is not a record (it passed its checksum,
/// so this is a bug, not a torn write) is still forwarded, without key or headers: nothing is
/// dropped.
pub fn decode(payload: Bytes) -> Encoded {
    match serde_json::from_slice::<Head>(&payload) {
        Ok(h) => Encoded {
            key: h.customer.key,
            headers: vec![
                ("schema", h.schema),
                ("channel", h.channel),
                ("provider", h.provider),
                ("trace_id", h.trace_id),
                ("dedupe_key", h.dedupe_key),
            ],
            payload,
        },
        Err(e) => {
            tracing::error!(error = %e, "spooled record is not a complaint record; forwarding it without key or headers");
            Encoded {
                key: String::new(),
                headers: Vec::new(),
                payload,
            }
        }
    }
}

/// A record handed to the producer (or a segment boundary) waiting for its acknowledgement.
struct Pending {
    /// `None` for a segment boundary: nothing to wait for.
    delivery: Option<DeliveryFuture>,
    /// The position after it: the cursor once it and everything before it are acknowledged.
    end: Pos,
    bytes: u64,
}

/// What a replay run did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Outcome {
    pub replayed: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Records still past the cursor when the run ended.
    pub backlog_records: u64,
}

/// Live counts of a running replayer.
#[derive(Debug, Default)]
pub struct Progress {
    pub replayed: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
}

pub struct Replayer {
    progress: Arc<Progress>,
    spool: Arc<Spool>,
    kafka: Arc<KafkaSink>,
    route: Arc<Route>,
    max_in_flight: usize,
    /// How long a stopping replayer waits for the deliveries it has in flight.
    drain_timeout: Duration,
}

/// Why the window was drained.
enum Stop {
    Failed,
    Cancelled,
}

impl Replayer {
    pub fn new(
        spool: Arc<Spool>,
        kafka: Arc<KafkaSink>,
        route: Arc<Route>,
        max_in_flight: usize,
        drain_timeout: Duration,
    ) -> Self {
        Self {
            progress: Arc::default(),
            spool,
            kafka,
            route,
            max_in_flight: max_in_flight.max(1),
            drain_timeout,
        }
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Replays until `stop` (the gateway) or, with `until_drained`, until the spool holds nothing
    /// past the cursor (`switchboard spool replay`).
    pub async fn run(self, stop: CancellationToken, until_drained: bool) -> Outcome {
        let started = Instant::now();
        let mut out = Outcome::default();
        let mut tail = self.spool.tail(self.spool.cursor());
        // The contiguous acknowledged prefix ends here; `fwd` is what it holds beyond the durable
        // cursor (records, bytes).
        let mut acked = self.spool.cursor();
        let mut fwd = (0u64, 0u64);
        let mut last_persist = Instant::now();
        let mut window: VecDeque<Pending> = VecDeque::new();
        let mut backoff = FIRST_BACKOFF;
        let mut rolled_for = 0u64;
        let mut waiting_logged = false;
        loop {
            if stop.is_cancelled() {
                self.drain(&mut window, &mut acked, &mut fwd, &mut out, Stop::Cancelled)
                    .await;
                break;
            }
            if !self.kafka.is_up() && window.is_empty() {
                if !waiting_logged && self.spool.stats().backlog_records > 0 {
                    tracing::info!("spool replay waits for Kafka");
                    waiting_logged = true;
                }
                self.persist(acked, &mut fwd, &mut last_persist, true).await;
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                continue;
            }
            waiting_logged = false;

            // 1. Fill the window from the spool.
            let mut idle = false;
            let mut refused = false;
            if window.len() < self.max_in_flight {
                let room = self.max_in_flight - window.len();
                match self.read(&mut tail, room).await {
                    Ok(steps) => {
                        let r = self.hand_over(steps, &mut tail, &mut window);
                        idle = r.idle;
                        refused = r.refused;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "spool replay cannot read the spool");
                        metrics::counter!(crate::telemetry::SPOOL_REPLAY_ERRORS).increment(1);
                        self.sleep(&stop, &mut backoff).await;
                        continue;
                    }
                }
            }

            // 2. Everything committed is handed over: new records may go to Kafka directly.
            if idle && !self.route.direct() && self.kafka.is_up() {
                idle = self.switch_to_direct(&mut tail, &mut window).await;
            }

            // 3. Acknowledgements, in order.
            let mut failed = false;
            loop {
                let must_wait = idle || refused || window.len() >= self.max_in_flight;
                let Some(front) = window.front_mut() else {
                    break;
                };
                let Some(delivery) = front.delivery.as_mut() else {
                    acked = front.end;
                    window.pop_front();
                    continue;
                };
                let result = if must_wait {
                    tokio::select! {
                        r = delivery => Some(r),
                        _ = stop.cancelled() => None,
                    }
                } else {
                    delivery.now_or_never()
                };
                let Some(result) = result else { break };
                let p = window.pop_front().expect("front exists");
                match result {
                    Ok(Ok(_)) => {
                        acked = p.end;
                        fwd.0 += 1;
                        fwd.1 += p.bytes;
                        out.replayed += 1;
                        self.progress.replayed.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(crate::telemetry::SPOOL_REPLAYED).increment(1);
                        backoff = FIRST_BACKOFF;
                    }
                    Ok(Err((e, _))) => {
                        tracing::warn!(error = %e, "replayed record not delivered; it stays in the spool and is retried");
                        failed = true;
                        break;
                    }
                    Err(_) => {
                        tracing::warn!("replay delivery cancelled; the record stays in the spool");
                        failed = true;
                        break;
                    }
                }
                if last_persist.elapsed() >= PERSIST_EVERY {
                    self.persist(acked, &mut fwd, &mut last_persist, false)
                        .await;
                }
            }
            if failed {
                out.errors += 1;
                self.progress.errors.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(crate::telemetry::SPOOL_REPLAY_ERRORS).increment(1);
                self.drain(&mut window, &mut acked, &mut fwd, &mut out, Stop::Failed)
                    .await;
                tail.reset(acked);
                self.persist(acked, &mut fwd, &mut last_persist, true).await;
                self.sleep(&stop, &mut backoff).await;
                continue;
            }
            if refused && window.is_empty() {
                // librdkafka's queue is full of direct writes: give it a moment.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }

            // 4. Idle: make the cursor durable, release what is behind it, wait for new records.
            if idle && window.is_empty() {
                self.persist(acked, &mut fwd, &mut last_persist, true).await;
                let tip = self.spool.tip();
                let drained = acked == tip;
                if drained
                    && tip.offset > super::spool::MAGIC.len() as u64
                    && rolled_for != tip.segment
                {
                    // The active segment holds only forwarded records: seal it so it can go.
                    rolled_for = tip.segment;
                    self.spool.request_roll();
                }
                // Done once the sealed, drained segment is released too (an empty active one).
                if until_drained && drained && tip.offset == super::spool::MAGIC.len() as u64 {
                    break;
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = self.spool.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
        self.persist(acked, &mut fwd, &mut last_persist, true).await;
        out.seconds = started.elapsed().as_secs_f64();
        out.backlog_records = self.spool.stats().backlog_records;
        out
    }

    async fn read(&self, tail: &mut super::spool::Tail, max: usize) -> std::io::Result<Vec<Step>> {
        // File reads off the async runtime; the tail travels to the blocking pool and back.
        let mut t = std::mem::replace(tail, self.spool.tail(tail.pos()));
        let (t, steps) = tokio::task::spawn_blocking(move || {
            let steps = t.read(max);
            (t, steps)
        })
        .await
        .map_err(std::io::Error::other)?;
        *tail = t;
        steps
    }

    /// Hands records to the producer in order. On a refusal (queue full) the tail goes back to
    /// the refused record, which is read again next time.
    fn hand_over(
        &self,
        steps: Vec<Step>,
        tail: &mut super::spool::Tail,
        window: &mut VecDeque<Pending>,
    ) -> HandOver {
        let mut r = HandOver::default();
        for step in steps {
            match step {
                Step::Record {
                    payload,
                    end,
                    bytes,
                } => {
                    let rec = decode(payload);
                    match self.kafka.enqueue(&rec) {
                        Ok(delivery) => window.push_back(Pending {
                            delivery: Some(delivery),
                            end,
                            bytes,
                        }),
                        Err(e) => {
                            tracing::debug!(error = %e, "producer refused a replayed record for now");
                            tail.reset(Pos {
                                segment: end.segment,
                                offset: end.offset - bytes,
                            });
                            r.refused = true;
                            return r;
                        }
                    }
                }
                Step::Next(pos) => window.push_back(Pending {
                    delivery: None,
                    end: pos,
                    bytes: 0,
                }),
                Step::Idle => r.idle = true,
            }
        }
        r
    }

    /// Under the exclusive gate, hands over whatever was appended meanwhile and sets `direct`.
    /// Returns whether the replayer is still idle (caught up).
    async fn switch_to_direct(
        &self,
        tail: &mut super::spool::Tail,
        window: &mut VecDeque<Pending>,
    ) -> bool {
        let _gate = self.route.gate.write().await;
        let room = self.max_in_flight.saturating_sub(window.len());
        if room == 0 {
            return false;
        }
        let steps = match self.read(tail, room).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "spool replay cannot read the spool");
                return false;
            }
        };
        let r = self.hand_over(steps, tail, window);
        if r.idle && !r.refused {
            self.route.direct.store(true, Ordering::Release);
            tracing::info!("spool backlog handed to Kafka; new records go to Kafka directly");
            true
        } else {
            false
        }
    }

    /// Waits (bounded) for what is in flight, so the cursor covers every record that landed.
    async fn drain(
        &self,
        window: &mut VecDeque<Pending>,
        acked: &mut Pos,
        fwd: &mut (u64, u64),
        out: &mut Outcome,
        why: Stop,
    ) {
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        let mut contiguous = matches!(why, Stop::Cancelled);
        while let Some(mut p) = window.pop_front() {
            let ok = match p.delivery.as_mut() {
                None => true,
                Some(d) => matches!(tokio::time::timeout_at(deadline, d).await, Ok(Ok(Ok(_)))),
            };
            // After a failure the tail resends from the failed record: later successes are
            // duplicates-to-be, so they do not move the cursor (contiguity).
            if contiguous && ok {
                *acked = p.end;
                if p.delivery.is_some() {
                    fwd.0 += 1;
                    fwd.1 += p.bytes;
                    out.replayed += 1;
                    self.progress.replayed.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(crate::telemetry::SPOOL_REPLAYED).increment(1);
                }
            } else {
                contiguous = false;
            }
        }
        if matches!(why, Stop::Failed) {
            // Until the backlog is handed over again, new records queue behind it.
            self.route.clear_direct();
        }
    }

    /// Makes `acked` the durable cursor when it moved (always when `now`, else every 200 ms).
    async fn persist(&self, acked: Pos, fwd: &mut (u64, u64), last: &mut Instant, now: bool) {
        if acked <= self.spool.cursor() || (!now && last.elapsed() < PERSIST_EVERY) {
            return;
        }
        let spool = self.spool.clone();
        let (records, bytes) = *fwd;
        let r =
            tokio::task::spawn_blocking(move || spool.commit_cursor(acked, records, bytes)).await;
        match r {
            Ok(Ok(())) => *fwd = (0, 0),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot write the spool cursor; forwarded records will be sent again after a restart")
            }
            Err(e) => tracing::error!(error = %e, "spool cursor task failed"),
        }
        *last = Instant::now();
    }

    async fn sleep(&self, stop: &CancellationToken, backoff: &mut Duration) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(*backoff) => {}
        }
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
    }
}

#[derive(Default)]
struct HandOver {
    idle: bool,
    refused: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, KafkaConfig, SpoolConfig};
    use crate::sink::failover::Failover;
    use crate::sink::{Landed, Sink};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::mocking::MockCluster;
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    use std::collections::HashMap;

    fn record(key: &str, n: usize) -> Bytes {
        Bytes::from(
            serde_json::json!({
                "schema": "complaint.v1", "id": format!("r{n}"), "channel": "api",
                "provider": "api", "trace_id": "t", "dedupe_key": "d",
                "customer": {"key": key}, "n": n,
            })
            .to_string(),
        )
    }

    fn spool_cfg(dir: &std::path::Path) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_path_buf(),
            segment_bytes: 4096,
            ..SpoolConfig::default()
        }
    }

    async fn kafka(brokers: String) -> Arc<KafkaSink> {
        let k = KafkaSink::new(&KafkaConfig {
            brokers,
            topic: "t".into(),
            delivery_timeout_ms: 1000,
            statistics_interval_ms: 200,
            ..KafkaConfig::default()
        })
        .unwrap();
        assert!(
            k.probe_once(Duration::from_secs(5)).await,
            "mock broker answers"
        );
        k
    }

    /// Reads topic `t` (3 partitions) until `want` distinct records came: (key, n) in each
    /// partition's order, duplicates included.
    fn consume(brokers: &str, want: usize) -> Vec<(String, usize)> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "replay-test")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..3 {
            tpl.add_partition_offset("t", p, Offset::Beginning).unwrap();
        }
        c.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut out = Vec::new();
        let mut distinct = std::collections::HashSet::new();
        while distinct.len() < want {
            assert!(
                Instant::now() < deadline,
                "consumed {} of {want}",
                distinct.len()
            );
            if let Some(m) = c.poll(Duration::from_millis(100)) {
                let m = m.unwrap();
                let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
                let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
                assert_eq!(v["customer"]["key"], key.as_str(), "key from the record");
                let headers = m.headers().unwrap();
                assert_eq!(headers.count(), 5, "the five headers of a direct write");
                let n = v["n"].as_u64().unwrap() as usize;
                distinct.insert(n);
                out.push((key, n));
            }
        }
        out
    }

    /// Per key, the first appearance of each n is in increasing order.
    fn assert_ordered_per_key(got: &[(String, usize)]) {
        let mut last: HashMap<&str, usize> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for (k, n) in got {
            if !seen.insert(*n) {
                continue; // a duplicate from a resend: same record, already placed
            }
            if let Some(prev) = last.insert(k, *n) {
                assert!(prev < *n, "key {k}: {n} after {prev}");
            }
        }
    }

    #[test]
    fn decode_rebuilds_the_key_and_headers_encode_set() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let sink = Arc::new(crate::sink::memory::MemorySink::default());
            let p = crate::pipeline::Pipeline::new(&Config::default(), sink.clone()).unwrap();
            let mut i =
                crate::record::Intake::new(crate::record::ChannelKind::Api, "api", "断网了");
            i.provider_message_id = Some("e1".into());
            i.identity.phone = Some("13800138000".into());
            let ctx = crate::pipeline::RequestCtx {
                peer: "127.0.0.1".parse().unwrap(),
                channel: "api",
                trace_id: crate::pipeline::trace_id(None),
            };
            p.submit(&ctx, vec![i]).await.unwrap();
            let e = sink.records.lock()[0].clone();
            let d = decode(e.payload.clone());
            assert_eq!(d.key, e.key);
            assert_eq!(d.headers, e.headers);
            assert_eq!(d.payload, e.payload);
        });
        let junk = decode(Bytes::from_static(b"not json"));
        assert_eq!(junk.key, "");
        assert_eq!(&junk.payload[..], b"not json", "forwarded as it is");
    }

    #[tokio::test]
    async fn a_backlog_is_forwarded_in_order_then_released() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("t", 3, 1).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(&spool_cfg(tmp.path())).unwrap());
        let keys = ["a", "b", "c", "d"];
        for n in 0..300 {
            spool.append(vec![record(keys[n % 4], n)]).await.unwrap();
        }
        let segments = spool.stats().segments;
        assert!(segments > 5);
        let k = kafka(mock.bootstrap_servers()).await;
        // A small window: the backlog is far larger than what is ever in flight.
        let r = Replayer::new(
            spool.clone(),
            k.clone(),
            Arc::new(Route::new(false)),
            16,
            Duration::from_secs(5),
        );
        let out = r.run(CancellationToken::new(), true).await;
        assert_eq!(out.replayed, 300);
        assert_eq!(out.backlog_records, 0);
        let got = consume(&mock.bootstrap_servers(), 300);
        assert_eq!(got.len(), 300, "no duplicates without a failure");
        assert_ordered_per_key(&got);
        let stats = spool.stats();
        assert_eq!(stats.backlog_records, 0);
        assert_eq!(stats.cursor, spool.tip(), "cursor at the end of the log");
        let on_disk = crate::sink::spool::list_segments(tmp.path()).unwrap();
        assert_eq!(
            on_disk.len(),
            1,
            "forwarded segments are released: {on_disk:?}"
        );
        spool.close().await;
        drop(spool);
        // Nothing is replayed twice after a restart.
        let spool = Arc::new(Spool::open(&spool_cfg(tmp.path())).unwrap());
        assert_eq!(spool.stats().backlog_records, 0);
    }

    #[tokio::test]
    async fn a_failed_delivery_keeps_its_record_and_is_retried() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("t", 3, 1).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(&spool_cfg(tmp.path())).unwrap());
        for n in 0..40 {
            spool
                .append(vec![record(["a", "b"][n % 2], n)])
                .await
                .unwrap();
        }
        let k = kafka(mock.bootstrap_servers()).await;
        // Every produce request takes longer than the delivery timeout: deliveries fail.
        mock.broker_round_trip_time(1, Duration::from_secs(3))
            .unwrap();
        let stop = CancellationToken::new();
        let r = Replayer::new(
            spool.clone(),
            k.clone(),
            Arc::new(Route::new(false)),
            64,
            Duration::from_secs(5),
        );
        let progress = r.progress();
        let task = tokio::spawn(r.run(stop.clone(), true));
        let deadline = Instant::now() + Duration::from_secs(20);
        while progress.errors.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "no delivery failed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            spool.stats().backlog_records,
            40,
            "nothing failed is released"
        );
        mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
        let out = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap()
            .unwrap();
        assert!(out.errors >= 1, "{out:?}");
        assert_eq!(spool.stats().backlog_records, 0);
        let got = consume(&mock.bootstrap_servers(), 40);
        let distinct: std::collections::BTreeSet<usize> = got.iter().map(|(_, n)| *n).collect();
        assert_eq!(
            distinct.len(),
            40,
            "every record landed (duplicates allowed)"
        );
        assert_ordered_per_key(&got);
    }

    #[tokio::test]
    async fn new_records_queue_behind_the_backlog_until_it_is_handed_over() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("t", 3, 1).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(&spool_cfg(tmp.path())).unwrap();
            for n in 0..200 {
                spool.append(vec![record("k", n)]).await.unwrap();
            }
            spool.close().await;
        }
        let spool = Arc::new(Spool::open(&spool_cfg(tmp.path())).unwrap());
        let k = kafka(mock.bootstrap_servers()).await;
        let f = Failover::new(k, spool.clone(), 32, Duration::from_secs(5));
        let mut landed = Vec::new();
        for n in 200..260 {
            let e = decode(record("k", n));
            landed.push(f.write(std::slice::from_ref(&e)).await.unwrap()[0]);
        }
        assert_eq!(
            landed[0],
            Landed::Spool,
            "the first new record queues behind the backlog"
        );
        // Once the backlog is handed over, new records go to Kafka directly.
        let deadline = Instant::now() + Duration::from_secs(20);
        while spool.stats().backlog_records > 0 {
            assert!(Instant::now() < deadline, "backlog not drained");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for n in 260..270 {
            let e = decode(record("k", n));
            assert_eq!(
                f.write(std::slice::from_ref(&e)).await.unwrap(),
                vec![Landed::Kafka]
            );
        }
        let got = consume(&mock.bootstrap_servers(), 270);
        assert_ordered_per_key(&got);
        let distinct: std::collections::BTreeSet<usize> = got.iter().map(|(_, n)| *n).collect();
        assert_eq!(distinct.len(), 270);
        f.shutdown().await;
    }
}
