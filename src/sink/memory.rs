//! In-memory sink: durable only for the process's life. For benchmarks of the HTTP path without
//! Kafka or disk, and for unit tests. Never selected by configuration.

use super::{Encoded, Health, Landed, Sink, SinkError};
use futures_util::future::BoxFuture;
use parking_lot::Mutex;

#[derive(Default)]
pub struct MemorySink {
    pub records: Mutex<Vec<Encoded>>,
}

impl Sink for MemorySink {
    fn write<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Result<Vec<Landed>, SinkError>> {
        Box::pin(async move {
            self.records.lock().extend_from_slice(batch);
            Ok(vec![Landed::Memory; batch.len()])
        })
    }

    fn health(&self) -> Health {
        Health {
            usable: true,
            healthy: true,
            parts: vec![("memory".into(), "up".into())],
        }
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
