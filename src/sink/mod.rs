//! Sinks make records durable and say so. They know records as keyed, headed byte payloads:
//! nothing about channels or providers beyond the header values they are handed.
//!
//! - `spool`: local append-only, checksummed, segmented log with group-commit fsync and a durable
//!   replay cursor.
//! - `kafka`: rdkafka FutureProducer, idempotent, acks=all.
//! - `failover`: Kafka first, the spool when Kafka cannot take a record (or while the spool holds
//!   a backlog). This is what runs when Kafka is configured; the spool alone runs when it is not.
//! - `replay`: forwards the spool's backlog to Kafka in order and moves its cursor.
//! - `memory`: keeps records in memory; for benchmarks and unit tests of the HTTP path.

pub mod failover;
pub mod kafka;
pub mod memory;
pub mod replay;
pub mod spool;

use bytes::Bytes;
use futures_util::future::BoxFuture;

/// One record ready for a sink.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Kafka key: the customer key, so one customer's complaints stay ordered.
    pub key: String,
    /// Kafka headers (schema, channel, provider, trace_id, dedupe_key).
    pub headers: Vec<(&'static str, String)>,
    /// The record as JSON.
    pub payload: Bytes,
}

/// Where a record became durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landed {
    Kafka,
    Spool,
    Memory,
}

impl Landed {
    pub fn as_str(self) -> &'static str {
        match self {
            Landed::Kafka => "kafka",
            Landed::Spool => "spool",
            Landed::Memory => "memory",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    #[error("kafka delivery failed: {0}")]
    Kafka(String),
    #[error("spool write failed: {0}")]
    Spool(String),
    #[error("sink is shut down")]
    Closed,
}

/// Health for `/readyz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    /// Records can be made durable now.
    pub usable: bool,
    /// Every configured part is healthy (e.g. Kafka up, not only the spool).
    pub healthy: bool,
    pub parts: Vec<(String, String)>,
}

pub trait Sink: Send + Sync + 'static {
    /// Makes every record durable, or fails as a whole for the caller (some may still have
    /// landed; ids make that safe downstream). Returns where each record landed, in order.
    fn write<'a>(&'a self, batch: &'a [Encoded]) -> BoxFuture<'a, Result<Vec<Landed>, SinkError>>;

    fn health(&self) -> Health;

    /// Graceful shutdown: flush what is queued, sync, stop.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}
