//! Kafka first, the spool when Kafka cannot take a record, and replay of the spool when Kafka is
//! back. While Kafka is known to be down the records go straight to the spool (no waiting on a
//! dead broker); when it is up, any record whose delivery fails is spooled before the sender is
//! answered. While the spool holds records not yet handed to the producer, new records are
//! spooled behind them (one customer's records stay in order); the replayer (`replay`) forwards
//! the backlog and switches writes back to Kafka once all of it is handed over. See `replay` for
//! the exact order rule and the windows where it can break.

use super::kafka::KafkaSink;
use super::replay::{Replayer, Route};
use super::spool::Spool;
use super::{Encoded, Health, Landed, Sink, SinkError};
use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct Failover {
    kafka: Arc<KafkaSink>,
    spool: Arc<Spool>,
    route: Arc<Route>,
    stop: CancellationToken,
    replayer: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    drain_timeout: Duration,
}

impl Failover {
    /// Starts the replayer too: an unfinished spool is forwarded as soon as Kafka is up.
    pub fn new(
        kafka: Arc<KafkaSink>,
        spool: Arc<Spool>,
        replay_max_in_flight: usize,
        drain_timeout: Duration,
    ) -> Self {
        let route = Arc::new(Route::new(spool.stats().backlog_records == 0));
        let stop = CancellationToken::new();
        let replayer = Replayer::new(
            spool.clone(),
            kafka.clone(),
            route.clone(),
            replay_max_in_flight,
            drain_timeout,
        );
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let out = replayer.run(token, false).await;
            tracing::info!(
                replayed = out.replayed,
                errors = out.errors,
                backlog = out.backlog_records,
                "spool replay stopped"
            );
        });
        Self {
            kafka,
            spool,
            route,
            stop,
            replayer: parking_lot::Mutex::new(Some(task)),
            drain_timeout,
        }
    }

    /// Spools records behind the backlog. `Ok(None)`: the backlog was handed over meanwhile, the
    /// caller goes to Kafka instead.
    async fn to_spool(
        &self,
        batch: &[Encoded],
        reason: &'static str,
        recheck: bool,
    ) -> Result<Option<Vec<Landed>>, SinkError> {
        let gate = self.route.enter_spool().await;
        if recheck && self.route.direct() && self.kafka.is_up() {
            return Ok(None);
        }
        // Before the append: whatever is submitted after this record's ack queues behind it.
        self.route.clear_direct();
        metrics::counter!(crate::telemetry::SINK_FALLBACKS, "reason" => reason)
            .increment(batch.len() as u64);
        let r = self.spool.write(batch).await;
        drop(gate);
        match r {
            Ok(landed) => Ok(Some(landed)),
            Err(e) if self.kafka.is_up() => {
                // The spool cannot write but Kafka can: durable beats ordered (see `replay`).
                tracing::warn!(error = %e, "spool write failed; sending to Kafka directly, ahead of the spool's backlog");
                let results = self.kafka.send_all(batch).await;
                match results.into_iter().find_map(Result::err) {
                    None => Ok(Some(vec![Landed::Kafka; batch.len()])),
                    Some(_) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }
}

impl Sink for Failover {
    fn write<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Result<Vec<Landed>, SinkError>> {
        Box::pin(async move {
            if !(self.route.direct() && self.kafka.is_up()) {
                let reason = if self.kafka.is_up() {
                    "backlog"
                } else {
                    "kafka_down"
                };
                if let Some(landed) = self.to_spool(batch, reason, true).await? {
                    return Ok(landed);
                }
            }
            let results = self.kafka.send_all(batch).await;
            let failed: Vec<Encoded> = batch
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_err())
                .map(|(e, _)| e.clone())
                .collect();
            if !failed.is_empty() {
                tracing::warn!(
                    records = failed.len(),
                    error = %results.iter().find_map(|r| r.as_ref().err()).expect("one failed"),
                    "kafka could not take records; spooling them"
                );
                self.to_spool(&failed, "delivery_failed", false).await?;
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
            // The replayer first: it waits for its deliveries and makes the cursor durable.
            self.stop.cancel();
            let task = self.replayer.lock().take();
            if let Some(t) = task {
                let _ = tokio::time::timeout(self.drain_timeout + Duration::from_secs(1), t).await;
            }
            self.kafka.flush().await;
            self.spool.close().await;
        })
    }
}
