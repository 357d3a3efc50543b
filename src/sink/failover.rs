//! Kafka first, the spool when Kafka cannot take a record: while Kafka is known to be down the
//! records go straight to the spool (no waiting on a dead broker); when it is up, any record whose
//! delivery fails is spooled before the sender is answered. Replay of the spool to Kafka comes
//! with the reliability work; until then spooled records stay on disk untouched.

use super::kafka::KafkaSink;
use super::spool::Spool;
use super::{Encoded, Health, Landed, Sink, SinkError};
use futures_util::future::BoxFuture;
use std::sync::Arc;

pub struct Failover {
    kafka: Arc<KafkaSink>,
    spool: Arc<Spool>,
}

impl Failover {
    pub fn new(kafka: Arc<KafkaSink>, spool: Arc<Spool>) -> Self {
        Self { kafka, spool }
    }
}

impl Sink for Failover {
    fn write<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Result<Vec<Landed>, SinkError>> {
        Box::pin(async move {
            if !self.kafka.is_up() {
                metrics::counter!(crate::telemetry::SINK_FALLBACKS, "reason" => "kafka_down")
                    .increment(batch.len() as u64);
                return self.spool.write(batch).await;
            }
            let results = self.kafka.send_all(batch).await;
            let failed: Vec<Encoded> = batch
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_err())
                .map(|(e, _)| e.clone())
                .collect();
            if !failed.is_empty() {
                metrics::counter!(crate::telemetry::SINK_FALLBACKS, "reason" => "delivery_failed")
                    .increment(failed.len() as u64);
                tracing::warn!(
                    records = failed.len(),
                    error = %results.iter().find_map(|r| r.as_ref().err()).expect("one failed"),
                    "kafka could not take records; spooling them"
                );
                self.spool.write(&failed).await?;
            }
            Ok(results
                .iter()
                .map(|r| {
                    if r.is_ok() {
                        Landed::Kafka
                    } else {
                        Landed::Spool
                    }
                })
                .collect())
        })
    }

    fn health(&self) -> Health {
        let k = self.kafka.health();
        let s = self.spool.health();
        Health {
            usable: k.usable || s.usable,
            healthy: k.healthy && s.healthy,
            parts: k.parts.into_iter().chain(s.parts).collect(),
        }
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.kafka.flush().await;
            self.spool.close().await;
        })
    }
}
