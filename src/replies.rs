//! The replies source: reads `kafka.replies_topic` (downstream → customers) and hands each reply
//! to the chat outboxes. It knows Kafka and nothing of websockets; the chat channel knows
//! outboxes and nothing of Kafka.
//!
//! Every instance reads every partition itself (manual assignment, no shared consumer group):
//! each delivers to its own connected sessions, and a session can resume on any instance. On
//! start it reads from `now - chat.outbox_ttl_secs` (Kafka's time index), so the outboxes a
//! restart lost are rebuilt. The reply's `seq` is its offset + 1.

use crate::channels::chat::outbox::{Incoming, Outboxes, Pushed, Target};
use crate::config::{ChatConfig, KafkaConfig};
use crate::telemetry;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A reply as the downstream publishes it (docs/chat-protocol.md).
#[derive(Debug, Deserialize)]
struct ReplyMessage {
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    customer_key: Option<String>,
    text: String,
    #[serde(default)]
    reply_id: Option<String>,
    #[serde(default)]
    in_reply_to: Option<String>,
    #[serde(default)]
    at: Option<String>,
}

/// Why a reply was dropped (counted as `invalid`).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply is not JSON with a text field")]
    NotJson,
    #[error("reply names neither session_id nor customer_key, and has no key")]
    NoTarget,
    #[error("reply text is empty")]
    Empty,
    #[error("session_id, customer_key, reply_id or in_reply_to is longer than 128 bytes")]
    FieldTooLong,
}

/// Longest id (session, customer key, reply id, record id) a reply may carry.
pub const MAX_ID_BYTES: usize = 128;

/// Decodes one reply: its target and what the outbox keeps. `key` (the Kafka key) addresses a
/// session when the body names none; `timestamp_ms` fills `at` when the body has none.
pub fn decode(
    payload: &[u8],
    key: Option<&[u8]>,
    timestamp_ms: Option<i64>,
    offset: i64,
    max_chars: usize,
) -> Result<(Target, Incoming), ReplyError> {
    let m: ReplyMessage = serde_json::from_slice(payload).map_err(|_| ReplyError::NotJson)?;
    let nonempty = |s: Option<String>| s.filter(|v| !v.trim().is_empty());
    for f in [&m.session_id, &m.customer_key, &m.reply_id, &m.in_reply_to] {
        if f.as_ref().is_some_and(|v| v.len() > MAX_ID_BYTES) {
            return Err(ReplyError::FieldTooLong);
        }
    }
    let target = match (nonempty(m.session_id), nonempty(m.customer_key)) {
        (Some(s), _) => Target::Session(s),
        (None, Some(c)) => Target::Customer(c),
        (None, None) => match key.and_then(|k| std::str::from_utf8(k).ok()) {
            Some(k) if !k.is_empty() && k.len() <= MAX_ID_BYTES => Target::Session(k.to_string()),
            _ => return Err(ReplyError::NoTarget),
        },
    };
    let text: String = m.text.trim().chars().take(max_chars).collect();
    if text.is_empty() {
        return Err(ReplyError::Empty);
    }
    // Re-formatted, so its length is fixed whatever the producer sent.
    let at =
        m.at.and_then(|a| chrono::DateTime::parse_from_rfc3339(&a).ok())
            .map(|t| crate::record::rfc3339_ms(t.with_timezone(&chrono::Utc)))
            .or_else(|| {
                timestamp_ms
                    .and_then(chrono::DateTime::from_timestamp_millis)
                    .map(crate::record::rfc3339_ms)
            })
            .unwrap_or_else(|| crate::record::rfc3339_ms(chrono::Utc::now()));
    Ok((
        target,
        Incoming {
            text,
            at,
            reply_id: nonempty(m.reply_id),
            in_reply_to: nonempty(m.in_reply_to),
            origin_seq: u64::try_from(offset).ok().map(|o| o + 1),
        },
    ))
}

pub fn consumer(cfg: &KafkaConfig) -> Result<StreamConsumer, String> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", format!("{}-replies", cfg.client_id))
        .set(
            "group.id",
            format!("{}-replies-{}", cfg.client_id, ulid::Ulid::new()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    for (k, v) in &cfg.extra {
        // Producer-only tuning does not apply to the consumer; security settings do.
        if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
            c.set(k, v);
        }
    }
    c.create()
        .map_err(|e| format!("kafka replies consumer: {e}"))
}

/// Assigns every partition of `topic`, starting at the first reply newer than `since_ms`.
/// Blocking (metadata and offset lookups): call from a blocking thread.
fn assign(consumer: &StreamConsumer, topic: &str, since_ms: i64) -> Result<usize, String> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or("topic missing from metadata")?;
    if let Some(e) = t.error() {
        return Err(format!("topic: {e:?}"));
    }
    if t.partitions().is_empty() {
        return Err("topic has no partitions".into());
    }
    let mut by_time = TopicPartitionList::new();
    // Each partition's end, read *before* the time lookup. `Offset::End` would be resolved later
    // by the fetcher, so a reply produced between `assign` and that lookup would be skipped.
    // If the time lookup then finds no reply newer than `since`, none was newer when the end
    // was read either, so everything from that end on is new.
    let mut ends = std::collections::HashMap::new();
    for p in t.partitions() {
        let (_, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        ends.insert(p.id(), high);
        by_time
            .add_partition_offset(topic, p.id(), Offset::Offset(since_ms))
            .map_err(|e| e.to_string())?;
    }
    let offsets = consumer
        .offsets_for_times(by_time, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let mut tpl = TopicPartitionList::new();
    for e in offsets.elements() {
        let start = match (e.offset(), ends.get(&e.partition())) {
            (Offset::Offset(o), _) => Offset::Offset(o),
            // No reply newer than `since`: start where the partition ended before the lookup.
            (_, Some(&high)) => Offset::Offset(high),
            _ => Offset::End,
        };
        tpl.add_partition_offset(topic, e.partition(), start)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    Ok(tpl.count())
}

/// Runs until `shutdown`: assigns (retrying until the topic exists), then feeds the outboxes.
pub fn spawn(
    kafka: &KafkaConfig,
    chat: &ChatConfig,
    outboxes: Arc<Outboxes>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let consumer = Arc::new(consumer(kafka)?);
    let topic = kafka.replies_topic.clone();
    let lookback = chat.outbox_ttl_secs;
    let max_chars = chat.max_reply_chars;
    Ok(tokio::spawn(async move {
        metrics::gauge!(telemetry::REPLIES_CONSUMER_UP).set(0.0);
        let since_ms =
            chrono::Utc::now().timestamp_millis() - (lookback.min(30 * 86_400) as i64) * 1000;
        loop {
            let c = consumer.clone();
            let t = topic.clone();
            match tokio::task::spawn_blocking(move || assign(&c, &t, since_ms)).await {
                Ok(Ok(n)) => {
                    tracing::info!(topic = %topic, partitions = n, "replies consumer assigned");
                    break;
                }
                Ok(Err(e)) => {
                    tracing::warn!(topic = %topic, error = %e, "replies topic not readable yet; retrying in 5 s")
                }
                Err(e) => tracing::error!(error = %e, "replies assignment task failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
        metrics::gauge!(telemetry::REPLIES_CONSUMER_UP).set(1.0);
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = consumer.recv() => m,
            };
            let m = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "replies consumer error");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            };
            let decoded = decode(
                m.payload().unwrap_or_default(),
                m.key(),
                m.timestamp().to_millis(),
                m.offset(),
                max_chars,
            );
            let outcome = match decoded {
                Err(e) => {
                    tracing::warn!(partition = m.partition(), offset = m.offset(), error = %e, "reply dropped");
                    "invalid"
                }
                Ok((target, reply)) => match outboxes.push(&target, reply) {
                    Pushed::Queued(_) => "queued",
                    Pushed::Duplicate => "duplicate",
                    Pushed::NoSession => "no_session",
                },
            };
            metrics::counter!(telemetry::CHAT_REPLIES, "outcome" => outcome).increment(1);
        }
        metrics::gauge!(telemetry::REPLIES_CONSUMER_UP).set(0.0);
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_replies_to_sessions_and_customers() {
        let (t, r) = decode(
            r#"{"session_id":"S1","text":" 已安排工程师 ","reply_id":"r1","in_reply_to":"01REC"}"#
                .as_bytes(),
            Some(b"S1"),
            Some(1_764_374_400_000),
            41,
            100,
        )
        .unwrap();
        assert_eq!(t, Target::Session("S1".into()));
        assert_eq!(r.text, "已安排工程师");
        assert_eq!(r.origin_seq, Some(42));
        assert_eq!(r.reply_id.as_deref(), Some("r1"));
        assert!(r.at.starts_with("2025-11-29T"), "{}", r.at);
        let (t, _) = decode(
            br#"{"customer_key":"+8613800138000","text":"hi"}"#,
            None,
            None,
            0,
            100,
        )
        .unwrap();
        assert_eq!(t, Target::Customer("+8613800138000".into()));
        let (t, _) = decode(br#"{"text":"hi"}"#, Some(b"S9"), None, 0, 100).unwrap();
        assert_eq!(t, Target::Session("S9".into()));
    }

    #[test]
    fn bad_replies_are_refused_and_long_ones_cut() {
        assert_eq!(
            decode(b"nope", None, None, 0, 10).unwrap_err(),
            ReplyError::NotJson
        );
        assert_eq!(
            decode(br#"{"text":"x"}"#, None, None, 0, 10).unwrap_err(),
            ReplyError::NoTarget
        );
        assert_eq!(
            decode(br#"{"session_id":"S","text":"  "}"#, None, None, 0, 10).unwrap_err(),
            ReplyError::Empty
        );
        let (_, r) = decode(
            br#"{"session_id":"S","text":"abcdefghijklmnop","at":"2026-01-01T00:00:00Z"}"#,
            None,
            None,
            0,
            5,
        )
        .unwrap();
        assert_eq!(r.text, "abcde");
        assert_eq!(r.at, "2026-01-01T00:00:00.000Z");
        let long = "x".repeat(129);
        for field in ["session_id", "customer_key", "reply_id", "in_reply_to"] {
            let body = serde_json::json!({"session_id": "S", field: long, "text": "t"});
            assert_eq!(
                decode(body.to_string().as_bytes(), None, None, 0, 10).unwrap_err(),
                ReplyError::FieldTooLong,
                "{field}"
            );
        }
        let (_, r) = decode(
            br#"{"session_id":"S","text":"t","at":"2026-01-01T08:00:00.123456789123456789+08:00"}"#,
            None,
            None,
            0,
            5,
        )
        .unwrap();
        assert_eq!(r.at, "2026-01-01T00:00:00.123Z");
    }
}
