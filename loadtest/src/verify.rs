//! `verify`: were all acknowledged complaints written to Kafka, and only once?
//!
//! Reads the topic from the beginning with a fresh random consumer group (partitions assigned
//! explicitly, nothing committed), parses each record's JSON and matches it by `id` (events and
//! chat acks carry the record id) or `provider_message_id` (Twilio MessageSid, Meta wamid, WeChat
//! MsgId, the mail's Message-ID for SMTP: compared without angle brackets, since the gateway's
//! mail parser drops them).
//! Stops once every acked key is found and the partitions are read up to the high watermarks
//! taken at start, or, failing that, once `--timeout` has passed and those watermarks are reached.

use crate::acked::AckLine;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// The fields of a `complaint.v1` record used for matching.
#[derive(Debug, Deserialize)]
struct RecordKeys {
    id: Option<String>,
    provider_message_id: Option<String>,
}

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct ChannelCounts {
    pub acked: u64,
    pub found: u64,
    pub lost: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct VerifyReport {
    /// Distinct acked keys.
    pub acked: u64,
    /// Acked keys with at least one record in the topic.
    pub found: u64,
    /// |acked \ found|.
    pub lost: u64,
    /// Extra records for an acked key (a key seen n > 1 times adds n - 1).
    pub duplicates: u64,
    /// Acked keys seen more than once.
    pub duplicate_keys: u64,
    pub by_channel: BTreeMap<String, ChannelCounts>,
    /// Records read from the topic (all of them, not just the acked ones).
    pub records_read: u64,
    /// Records that were not complaint JSON.
    pub unparsed: u64,
    /// Whether every partition was read up to its high watermark taken at start.
    pub reached_end: bool,
    pub elapsed_secs: f64,
    /// Up to 20 lost keys, for a look in the gateway's logs or spool.
    pub lost_sample: Vec<AckLine>,
}

/// A key without the angle brackets a Message-ID may be written with (`<a@b>` → `a@b`); other
/// keys never start with `<`.
fn message_id(key: &str) -> &str {
    key.strip_prefix('<')
        .and_then(|k| k.strip_suffix('>'))
        .unwrap_or(key)
}

/// Matching state: acked keys by kind, with how many records each one got.
#[derive(Debug, Default)]
pub struct Matcher {
    by_id: HashMap<String, (usize, u32)>,
    by_pmid: HashMap<String, (usize, u32)>,
    lines: Vec<AckLine>,
    found: usize,
    records: u64,
    unparsed: u64,
}

impl Matcher {
    pub fn new(acked: Vec<AckLine>) -> Self {
        let mut m = Matcher::default();
        for mut a in acked {
            a.key = message_id(&a.key).to_string();
            let map = if a.is_record_id() {
                &mut m.by_id
            } else {
                &mut m.by_pmid
            };
            if map.contains_key(&a.key) {
                continue; // a re-sent duplicate acks the same key again
            }
            map.insert(a.key.clone(), (m.lines.len(), 0));
            m.lines.push(a);
        }
        m
    }

    pub fn acked(&self) -> usize {
        self.lines.len()
    }

    pub fn all_found(&self) -> bool {
        self.found == self.lines.len()
    }

    /// Takes one record's bytes.
    pub fn record(&mut self, payload: &[u8]) {
        self.records += 1;
        let Ok(r) = serde_json::from_slice::<RecordKeys>(payload) else {
            self.unparsed += 1;
            return;
        };
        for (map, key) in [
            (&mut self.by_id, r.id.as_deref()),
            (
                &mut self.by_pmid,
                r.provider_message_id.as_deref().map(message_id),
            ),
        ] {
            if let Some((_, n)) = key.and_then(|k| map.get_mut(k)) {
                if *n == 0 {
                    self.found += 1;
                }
                *n += 1;
            }
        }
    }

    pub fn report(&self, reached_end: bool, elapsed: Duration) -> VerifyReport {
        let mut by_channel: BTreeMap<String, ChannelCounts> = BTreeMap::new();
        let mut duplicates = 0u64;
        let mut duplicate_keys = 0u64;
        let mut lost_idx: Vec<usize> = Vec::new();
        for (idx, n) in self.by_id.values().chain(self.by_pmid.values()) {
            let c = by_channel
                .entry(self.lines[*idx].channel.clone())
                .or_default();
            c.acked += 1;
            if *n == 0 {
                c.lost += 1;
                lost_idx.push(*idx);
            } else {
                c.found += 1;
            }
            if *n > 1 {
                duplicates += u64::from(*n - 1);
                duplicate_keys += 1;
            }
        }
        lost_idx.sort_unstable();
        let acked = self.lines.len() as u64;
        let found = self.found as u64;
        VerifyReport {
            acked,
            found,
            lost: acked - found,
            duplicates,
            duplicate_keys,
            by_channel,
            records_read: self.records,
            unparsed: self.unparsed,
            reached_end,
            elapsed_secs: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            lost_sample: lost_idx
                .iter()
                .take(20)
                .map(|i| self.lines[*i].clone())
                .collect(),
        }
    }
}

pub struct VerifyConfig {
    pub brokers: String,
    pub topic: String,
    pub acked: std::path::PathBuf,
    pub timeout: Duration,
}

/// Reads the topic; the report, or an error (broker unreachable, topic missing, bad file).
pub fn verify(cfg: &VerifyConfig) -> Result<VerifyReport, String> {
    let started = Instant::now();
    let lines = crate::acked::read(&cfg.acked)?;
    let mut m = Matcher::new(lines);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set(
            "group.id",
            format!("switchboard-loadtest-verify-{}", ulid::Ulid::new()),
        )
        .set("client.id", "switchboard-loadtest-verify")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .set("fetch.max.bytes", "52428800")
        .create()
        .map_err(|e| format!("kafka consumer: {e}"))?;

    let meta_timeout = Duration::from_secs(15);
    let md = consumer
        .fetch_metadata(Some(&cfg.topic), meta_timeout)
        .map_err(|e| format!("--brokers {}: no metadata: {e}", cfg.brokers))?;
    let topic = md
        .topics()
        .iter()
        .find(|t| t.name() == cfg.topic)
        .ok_or_else(|| format!("--topic {}: not in the broker's metadata", cfg.topic))?;
    if let Some(e) = topic.error() {
        return Err(format!(
            "--topic {}: {} (does it exist on {}?)",
            cfg.topic,
            rdkafka::error::RDKafkaErrorCode::from(e),
            cfg.brokers
        ));
    }
    let partitions: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
    if partitions.is_empty() {
        return Err(format!("--topic {}: no partitions", cfg.topic));
    }
    // End offsets now: everything acked before this moment lies below them.
    let mut end: HashMap<i32, i64> = HashMap::new();
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(&cfg.topic, *p, meta_timeout)
            .map_err(|e| format!("--topic {} partition {p}: watermarks: {e}", cfg.topic))?;
        end.insert(*p, high);
        next.insert(*p, low);
        tpl.add_partition_offset(&cfg.topic, *p, Offset::Beginning)
            .map_err(|e| format!("partition {p}: {e}"))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| format!("--topic {}: assign failed: {e}", cfg.topic))?;
    let total_end: i64 = end.values().sum();
    eprintln!(
        "verify: {} acked keys; reading {} partitions of {} ({} records below the end offsets)",
        m.acked(),
        partitions.len(),
        cfg.topic,
        total_end - next.values().sum::<i64>()
    );

    let reached = |next: &HashMap<i32, i64>| {
        end.iter()
            .all(|(p, e)| next.get(p).copied().unwrap_or(0) >= *e)
    };
    // Past the timeout, the read to the end offsets gets as long again (30 s at least) before
    // giving up: without reaching them, `lost` would not mean anything.
    let hard_deadline = started + cfg.timeout + cfg.timeout.max(Duration::from_secs(30));
    let mut last_progress = Instant::now();
    let mut last_errors: Option<String> = None;
    loop {
        let at_end = reached(&next);
        if at_end && (m.all_found() || started.elapsed() >= cfg.timeout) {
            break;
        }
        if Instant::now() >= hard_deadline {
            let detail = last_errors
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default();
            return Err(format!(
                "could not read {} to its end offsets within {:.0}s{detail}; found {} of {} so far",
                cfg.topic,
                (hard_deadline - started).as_secs_f64(),
                m.found,
                m.acked()
            ));
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(msg)) => {
                if let Some(payload) = msg.payload() {
                    m.record(payload);
                }
                let e = next.entry(msg.partition()).or_insert(0);
                *e = (*e).max(msg.offset() + 1);
            }
            Some(Err(e)) => last_errors = Some(e.to_string()),
            None => {
                // Nothing came: the consumer's position passes control records and gaps.
                if let Ok(pos) = consumer.position() {
                    for el in pos.elements_for_topic(&cfg.topic) {
                        if let Offset::Offset(o) = el.offset() {
                            let e = next.entry(el.partition()).or_insert(0);
                            *e = (*e).max(o);
                        }
                    }
                }
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "verify: {} records read, {} of {} acked keys found",
                m.records,
                m.found,
                m.acked()
            );
            last_progress = Instant::now();
        }
    }
    Ok(m.report(reached(&next), started.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(channel: &str, key: &str) -> AckLine {
        AckLine {
            channel: channel.into(),
            key: key.into(),
        }
    }

    #[test]
    fn matches_by_id_and_provider_message_id() {
        let mut m = Matcher::new(vec![
            ack("events", "01KREC0000000000000000000A"),
            ack("events", "01KREC0000000000000000000A"), // re-sent duplicate: same key
            ack("twilio", "SM1"),
            ack("meta", "wamid.X"),
            ack("wechat", "6054768590064713728"),
            ack("smtp", "lt.01KMAIL@loadtest.switchboard.example"),
            ack("smtp", "<lt.02KMAIL@loadtest.switchboard.example>"),
            ack("chat", "01KCHAT0000000000000000000"),
        ]);
        assert_eq!(m.acked(), 7);
        m.record(
            br#"{"id":"01KE1","provider_message_id":"lt.01KMAIL@loadtest.switchboard.example"}"#,
        );
        m.record(
            br#"{"id":"01KE2","provider_message_id":"<lt.02KMAIL@loadtest.switchboard.example>"}"#,
        );
        // A chat record: matched by its id, not by the client_msg_id in provider_message_id.
        m.record(br#"{"id":"01KCHAT0000000000000000000","provider_message_id":"lt-01KCLIENT"}"#);
        m.record(br#"{"id":"01KREC0000000000000000000A","provider_message_id":"lt-e1"}"#);
        m.record(br#"{"id":"01KOTHER","provider_message_id":"SM1"}"#);
        m.record(br#"{"id":"01KOTHER2","provider_message_id":"SM1"}"#); // written twice
        m.record(br#"{"id":"01KOTHER3","provider_message_id":"unrelated"}"#);
        m.record(b"not json");
        // An events record id never matches a provider id, nor the reverse.
        m.record(br#"{"id":"wamid.X"}"#);
        assert!(!m.all_found());
        m.record(br#"{"id":"01KW","provider_message_id":"6054768590064713728"}"#);
        let r = m.report(true, Duration::from_millis(1500));
        assert_eq!((r.acked, r.found, r.lost), (7, 6, 1));
        assert_eq!((r.duplicates, r.duplicate_keys), (1, 1));
        assert_eq!(r.records_read, 10);
        assert_eq!(r.by_channel["smtp"].found, 2);
        assert_eq!(r.by_channel["chat"].found, 1);
        assert_eq!(r.unparsed, 1);
        assert_eq!(r.lost_sample, vec![ack("meta", "wamid.X")]);
        assert_eq!(r.by_channel["meta"].lost, 1);
        assert_eq!(r.by_channel["twilio"].found, 1);
        m.record(br#"{"id":"01KM","provider_message_id":"wamid.X"}"#);
        assert!(m.all_found());
        assert_eq!(m.report(true, Duration::ZERO).lost, 0);
    }

    #[test]
    fn an_empty_acked_file_is_all_found() {
        let m = Matcher::new(vec![]);
        assert!(m.all_found());
        let r = m.report(true, Duration::ZERO);
        assert_eq!((r.acked, r.found, r.lost), (0, 0, 0));
    }
}
