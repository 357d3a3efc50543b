//! Kafka sink: an idempotent rdkafka FutureProducer (`enable.idempotence=true`, `acks=all`).
//!
//! A record counts as durable when its delivery report says the broker acknowledged it.
//! `message.timeout.ms` bounds how long librdkafka tries; after that the failover sink spools the
//! record. Broker health comes from librdkafka itself: the "all brokers down" error and the
//! per-broker states in its statistics mark Kafka down at once; while down, a probe asks for
//! metadata every second and marks it up again when a broker answers.

use super::{Encoded, Health, Landed, Sink, SinkError};
use crate::config::KafkaConfig;
use futures_util::future::BoxFuture;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Client context: health flag and statistics as gauges.
pub struct Context {
    up: Arc<AtomicBool>,
}

impl ClientContext for Context {
    fn stats(&self, s: Statistics) {
        use crate::telemetry::*;
        metrics::gauge!(KAFKA_QUEUE_MESSAGES).set(s.msg_cnt as f64);
        metrics::gauge!(KAFKA_QUEUE_BYTES).set(s.msg_size as f64);
        let mut any_up = false;
        for b in s.brokers.values() {
            if b.nodeid < 0 {
                continue; // bootstrap placeholders
            }
            any_up |= b.state == "UP";
            let id = b.nodeid.to_string();
            if let Some(rtt) = &b.rtt {
                metrics::gauge!(KAFKA_BROKER_RTT_SECONDS, "broker" => id.clone())
                    .set(rtt.avg as f64 / 1e6);
            }
            metrics::gauge!(KAFKA_TX_ERRORS, "broker" => id).set(b.txerrs as f64);
        }
        if !any_up && self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!("kafka: no broker connected; records go to the spool");
        }
        metrics::gauge!(KAFKA_UP).set(if self.up.load(Ordering::Relaxed) {
            1.0
        } else {
            0.0
        });
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            if self.up.swap(false, Ordering::Relaxed) {
                tracing::warn!("kafka: all brokers down; records go to the spool");
            }
            metrics::gauge!(crate::telemetry::KAFKA_UP).set(0.0);
        } else {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }
}

pub struct KafkaSink {
    producer: FutureProducer<Context>,
    topic: String,
    up: Arc<AtomicBool>,
    flush_timeout: Duration,
    probe: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The librdkafka properties Switchboard sets; `extra` may add others but not override these
/// three (validated with the config).
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", &cfg.client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", &cfg.compression)
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("batch.num.messages", cfg.batch_num_messages.to_string())
        .set(
            "queue.buffering.max.messages",
            cfg.queue_buffering_max_messages.to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            cfg.queue_buffering_max_kbytes.to_string(),
        )
        .set("message.timeout.ms", cfg.delivery_timeout_ms.to_string())
        .set(
            "statistics.interval.ms",
            cfg.statistics_interval_ms.to_string(),
        );
    for (k, v) in &cfg.extra {
        c.set(k, v);
    }
    c
}

impl KafkaSink {
    /// Creates the producer (no network round trip) and starts the health probe.
    pub fn new(cfg: &KafkaConfig) -> Result<Arc<Self>, SinkError> {
        let up = Arc::new(AtomicBool::new(false));
        let producer: FutureProducer<Context> = client_config(cfg)
            .create_with_context(Context { up: up.clone() })
            .map_err(|e| SinkError::Kafka(format!("cannot create producer: {e}")))?;
        let sink = Arc::new(Self {
            producer,
            topic: cfg.topic.clone(),
            up,
            flush_timeout: Duration::from_millis(cfg.flush_timeout_ms),
            probe: parking_lot::Mutex::new(None),
        });
        let probe = tokio::spawn(Self::probe_loop(Arc::downgrade(&sink)));
        *sink.probe.lock() = Some(probe);
        Ok(sink)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Asks a broker for metadata once (bounded); marks Kafka up when one answers.
    pub async fn probe_once(self: &Arc<Self>, timeout: Duration) -> bool {
        let probe = self.clone();
        let ok = tokio::task::spawn_blocking(move || {
            probe
                .producer
                .client()
                .fetch_metadata(Some(&probe.topic), timeout)
                .map(|m| !m.brokers().is_empty())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if ok && !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!("kafka: broker reachable; records go to Kafka");
            metrics::gauge!(crate::telemetry::KAFKA_UP).set(1.0);
        }
        ok
    }

    async fn probe_loop(me: std::sync::Weak<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(sink) = me.upgrade() else { return };
            if !sink.is_up() {
                sink.probe_once(Duration::from_secs(2)).await;
            }
        }
    }

    fn record<'a>(&'a self, rec: &'a Encoded) -> FutureRecord<'a, [u8], [u8]> {
        let mut headers = OwnedHeaders::new_with_capacity(rec.headers.len());
        for (k, v) in &rec.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        FutureRecord::to(&self.topic)
            .key(rec.key.as_bytes())
            .payload(rec.payload.as_ref())
            .headers(headers)
    }

    /// Hands one record to the producer without waiting (replay): the future resolves with the
    /// broker's acknowledgement. Fails at once when librdkafka's queue is full.
    pub fn enqueue(&self, rec: &Encoded) -> Result<DeliveryFuture, KafkaError> {
        self.producer
            .send_result(self.record(rec))
            .map_err(|(e, _)| e)
    }

    /// Sends every record; the result for each says whether the broker acknowledged it.
    pub async fn send_all(&self, batch: &[Encoded]) -> Vec<Result<(), SinkError>> {
        let started = Instant::now();
        let sends = batch.iter().map(|rec| {
            let record = self.record(rec);
            // Wait briefly for room in librdkafka's queue (backpressure), then give up to the
            // spool rather than hold the sender.
            self.producer.send(record, Duration::from_millis(500))
        });
        let results = futures_util::future::join_all(sends).await;
        metrics::histogram!(crate::telemetry::SINK_WRITE_SECONDS, "sink" => "kafka")
            .record(started.elapsed().as_secs_f64());
        results
            .into_iter()
            .map(|r| match r {
                Ok(_) => {
                    if !self.up.swap(true, Ordering::Relaxed) {
                        metrics::gauge!(crate::telemetry::KAFKA_UP).set(1.0);
                    }
                    Ok(())
                }
                Err((e, _)) => {
                    metrics::counter!(crate::telemetry::KAFKA_DELIVERY_ERRORS).increment(1);
                    Err(SinkError::Kafka(e.to_string()))
                }
            })
            .collect()
    }

    /// Waits for everything queued to be delivered (or `flush_timeout`).
    pub async fn flush(self: &Arc<Self>) {
        if let Some(p) = self.probe.lock().take() {
            p.abort();
        }
        let me = self.clone();
        let timeout = self.flush_timeout;
        let r = tokio::task::spawn_blocking(move || me.producer.flush(timeout)).await;
        match r {
            Ok(Ok(())) => tracing::info!("kafka: producer flushed"),
            Ok(Err(e)) => tracing::error!(error = %e, "kafka: flush incomplete"),
            Err(e) => tracing::error!(error = %e, "kafka: flush task failed"),
        }
    }
}

impl Sink for Arc<KafkaSink> {
    fn write<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Result<Vec<Landed>, SinkError>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(batch.len());
            for r in self.send_all(batch).await {
                r?;
                out.push(Landed::Kafka);
            }
            Ok(out)
        })
    }

    fn health(&self) -> Health {
        let up = self.is_up();
        Health {
            usable: up,
            healthy: up,
            parts: vec![("kafka".into(), if up { "up" } else { "down" }.into())],
        }
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.flush())
    }
}
