//! Metric names (one table, mirrored in the README), the Prometheus recorder, logging set-up, and
//! the maskers that keep personal data out of logs.
//!
//! Labels are always drawn from fixed vocabularies (route, status, channel, reason, sink, scope):
//! never a phone, email, name, text, or any id a sender controls.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS: &str = "switchboard_http_requests_total";
pub const HTTP_IN_FLIGHT: &str = "switchboard_http_in_flight_requests";
pub const HTTP_CONNECTIONS: &str = "switchboard_http_connections";
pub const HTTP_CONNECTIONS_REJECTED: &str = "switchboard_http_connections_rejected_total";
pub const HTTP_CONNECTION_ERRORS: &str = "switchboard_http_connection_errors_total";
pub const SMTP_CONNECTIONS_REJECTED: &str = "switchboard_smtp_connections_rejected_total";
pub const SMTP_SESSIONS_CLOSED: &str = "switchboard_smtp_sessions_closed_total";
pub const RECORDS_EMITTED: &str = "switchboard_records_emitted_total";
pub const REJECTIONS: &str = "switchboard_rejections_total";
pub const SIGNATURE_LOG_ONLY: &str = "switchboard_signature_failures_allowed_total";
pub const DEDUPE_HITS: &str = "switchboard_dedupe_hits_total";
pub const DEDUPE_ENTRIES: &str = "switchboard_dedupe_entries";
pub const DEDUPE_EVICTIONS: &str = "switchboard_dedupe_evictions_total";
pub const RATE_LIMITED: &str = "switchboard_rate_limited_total";
pub const RATE_LIMIT_KEYS: &str = "switchboard_rate_limit_keys";
pub const SINK_WRITE_SECONDS: &str = "switchboard_sink_write_duration_seconds";
pub const SINK_FALLBACKS: &str = "switchboard_sink_fallbacks_total";
pub const SINK_ERRORS: &str = "switchboard_sink_errors_total";
pub const SPOOL_BYTES: &str = "switchboard_spool_bytes";
pub const SPOOL_RECORDS: &str = "switchboard_spool_records";
pub const SPOOL_SEGMENTS: &str = "switchboard_spool_segments";
pub const SPOOL_FSYNC_SECONDS: &str = "switchboard_spool_fsync_duration_seconds";
pub const SPOOL_TORN_RECORDS: &str = "switchboard_spool_torn_records_total";
pub const KAFKA_UP: &str = "switchboard_kafka_up";
pub const KAFKA_QUEUE_MESSAGES: &str = "switchboard_kafka_queue_messages";
pub const KAFKA_QUEUE_BYTES: &str = "switchboard_kafka_queue_bytes";
pub const KAFKA_BROKER_RTT_SECONDS: &str = "switchboard_kafka_broker_rtt_avg_seconds";
pub const KAFKA_TX_ERRORS: &str = "switchboard_kafka_broker_tx_errors";
pub const KAFKA_DELIVERY_ERRORS: &str = "switchboard_kafka_delivery_errors_total";
pub const BUILD_INFO: &str = "switchboard_build_info";
pub const SMTP_SESSIONS: &str = "switchboard_smtp_sessions";
pub const SMTP_REPLIES: &str = "switchboard_smtp_replies_total";
pub const ACK_MAIL: &str = "switchboard_ack_mail_total";
pub const CHAT_SESSIONS: &str = "switchboard_chat_sessions";
pub const CHAT_MESSAGES: &str = "switchboard_chat_messages_total";
pub const CHAT_CLOSES: &str = "switchboard_chat_closes_total";
pub const CHAT_REPLIES: &str = "switchboard_chat_replies_total";
pub const CHAT_OUTBOX_SESSIONS: &str = "switchboard_chat_outbox_sessions";
pub const CHAT_OUTBOX_EVICTIONS: &str = "switchboard_chat_outbox_evictions_total";
pub const REPLIES_CONSUMER_UP: &str = "switchboard_replies_consumer_up";
pub const SOCIAL_IGNORED: &str = "switchboard_social_ignored_total";
pub const TRIAGE_RECORDS: &str = "switchboard_triage_records_total";
pub const TRIAGE_INCIDENTS_ACTIVE: &str = "switchboard_triage_incidents_active";
pub const TRIAGE_INCIDENTS: &str = "switchboard_triage_incidents_total";
pub const TRIAGE_STORM_UNTRACKED: &str = "switchboard_triage_storm_untracked_total";
pub const TRIAGE_REPEAT_CUSTOMERS: &str = "switchboard_triage_repeat_customers";
pub const TRIAGE_RULES: &str = "switchboard_triage_rules";
pub const TRIAGE_RELOADS: &str = "switchboard_triage_reloads_total";
pub const TRIAGE_BAD_FLAGS: &str = "switchboard_triage_bad_escalation_flags_total";
pub const TLS_HANDSHAKES: &str = "switchboard_tls_handshakes_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "switchboard_tls_handshake_failures_total";
pub const TLS_RELOADS: &str = "switchboard_tls_reloads_total";
// Spool replay and spool health.
pub const SPOOL_BACKLOG_RECORDS: &str = "switchboard_spool_backlog_records";
pub const SPOOL_BACKLOG_BYTES: &str = "switchboard_spool_backlog_bytes";
pub const SPOOL_REPLAYED: &str = "switchboard_spool_replayed_total";
pub const SPOOL_REPLAY_ERRORS: &str = "switchboard_spool_replay_errors_total";
pub const SPOOL_SEGMENTS_RELEASED: &str = "switchboard_spool_segments_released_total";
pub const SPOOL_WRITE_ERRORS: &str = "switchboard_spool_write_errors_total";
pub const SPOOL_UP: &str = "switchboard_spool_up";
// The shared store (dedupe.backend / limits.backend = "redis").
pub const REDIS_REQUESTS: &str = "switchboard_redis_requests_total";
pub const REDIS_FALLBACKS: &str = "switchboard_redis_fallbacks_total";
pub const REDIS_UP: &str = "switchboard_redis_up";
pub const REDIS_SECONDS: &str = "switchboard_redis_request_duration_seconds";
// The attachment store, its volume, and the SMTP memory budget.
pub const ATTACHMENTS: &str = "switchboard_attachments_total";
pub const ATTACHMENTS_DELETED: &str = "switchboard_attachments_deleted_total";
pub const ATTACHMENT_STORE_BYTES: &str = "switchboard_attachment_store_bytes";
pub const ATTACHMENT_STORE_FILES: &str = "switchboard_attachment_store_files";
pub const DISK_FREE_BYTES: &str = "switchboard_disk_free_bytes";
pub const SMTP_DATA_SPILLED: &str = "switchboard_smtp_data_spilled_total";
pub const EMAIL_PARSE_BYTES: &str = "switchboard_email_parse_in_flight_bytes";

/// Installs the global recorder and returns the handle `/metrics` renders.
pub fn install_recorder() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_duration_seconds".into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    // Background upkeep of histograms; rendering also does it, this bounds memory between scrapes.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

fn describe() {
    describe_spool_replay();
    describe_attachments();
    describe_counter!(
        REDIS_REQUESTS,
        "Calls to the shared Redis store, by op (dedupe_claim, dedupe_commit, dedupe_release, limit) and outcome (ok, error, timeout)."
    );
    describe_counter!(
        REDIS_FALLBACKS,
        "Redis calls answered from this instance's memory instead (Redis failed, timed out, or was being skipped after a failure), by op."
    );
    describe_gauge!(
        REDIS_UP,
        "1 while the shared Redis store answers; 0 while dedupe and limits fall back to local memory."
    );
    describe_histogram!(
        REDIS_SECONDS,
        Unit::Seconds,
        "Round-trip time of successful Redis calls, by op."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route and status code."
    );
    describe_gauge!(HTTP_IN_FLIGHT, "HTTP requests being processed now.");
    describe_gauge!(HTTP_CONNECTIONS, "Open connections on the public listener.");
    describe_counter!(
        HTTP_CONNECTIONS_REJECTED,
        "Connections closed at once because http.max_connections was reached."
    );
    describe_counter!(
        HTTP_CONNECTION_ERRORS,
        "Connections hyper refused, by listener and reason (header_timeout, header_too_large, malformed_request)."
    );
    describe_counter!(
        SMTP_CONNECTIONS_REJECTED,
        "SMTP connections refused at once because email.max_connections was reached."
    );
    describe_counter!(
        SMTP_SESSIONS_CLOSED,
        "SMTP sessions the gateway closed, by reason (too_many_errors, junk_commands, line_too_long, command_timeout, data_timeout)."
    );
    describe_counter!(
        RECORDS_EMITTED,
        "Complaint records made durable, by channel and sink (kafka or spool)."
    );
    describe_counter!(REJECTIONS, "Requests rejected, by channel and reason.");
    describe_counter!(
        SIGNATURE_LOG_ONLY,
        "Signature failures let through because the channel's mode is log_only."
    );
    describe_counter!(
        DEDUPE_HITS,
        "Redeliveries answered with the original record, by channel and kind."
    );
    describe_gauge!(
        DEDUPE_ENTRIES,
        "Entries held by the dedupe window (128-bit hashes)."
    );
    describe_counter!(
        DEDUPE_EVICTIONS,
        "Dedupe entries dropped before expiry because dedupe.max_entries was reached."
    );
    describe_counter!(
        RATE_LIMITED,
        "Requests refused by a rate limit, by channel and scope."
    );
    describe_gauge!(RATE_LIMIT_KEYS, "Keys held by the rate limiters, by scope.");
    describe_histogram!(
        SINK_WRITE_SECONDS,
        Unit::Seconds,
        "Time from handing records to a sink until it reported them durable."
    );
    describe_counter!(
        SINK_FALLBACKS,
        "Records written to the spool because Kafka could not take them, by reason."
    );
    describe_counter!(SINK_ERRORS, "Sink writes that failed, by sink.");
    describe_gauge!(SPOOL_BYTES, Unit::Bytes, "Bytes in the spool's segments.");
    describe_gauge!(SPOOL_RECORDS, "Records in the spool's segments.");
    describe_gauge!(SPOOL_SEGMENTS, "Segment files in the spool.");
    describe_histogram!(
        SPOOL_FSYNC_SECONDS,
        Unit::Seconds,
        "Time of one group commit (write + fsync) in the spool."
    );
    describe_counter!(
        SPOOL_TORN_RECORDS,
        "Torn or corrupt records found (and skipped) while opening the spool."
    );
    describe_gauge!(KAFKA_UP, "1 when at least one Kafka broker is connected.");
    describe_gauge!(
        KAFKA_QUEUE_MESSAGES,
        "Messages in librdkafka's producer queue (msg_cnt)."
    );
    describe_gauge!(
        KAFKA_QUEUE_BYTES,
        Unit::Bytes,
        "Bytes in librdkafka's producer queue (msg_size)."
    );
    describe_gauge!(
        KAFKA_BROKER_RTT_SECONDS,
        Unit::Seconds,
        "Average broker round-trip time over the last statistics interval, by broker id."
    );
    describe_gauge!(
        KAFKA_TX_ERRORS,
        "Broker transmit errors (cumulative), by broker id."
    );
    describe_counter!(
        KAFKA_DELIVERY_ERRORS,
        "Kafka deliveries that failed (the record then went to the spool)."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the build.");
    describe_gauge!(SMTP_SESSIONS, "Open SMTP sessions.");
    describe_counter!(SMTP_REPLIES, "SMTP replies sent, by reply code.");
    describe_counter!(
        ACK_MAIL,
        "Acknowledgement mails by outcome: queued, sent, retried, gave_up, rate_limited, dropped_queue_full, invalid."
    );
    describe_gauge!(CHAT_SESSIONS, "Open web chat websocket sessions.");
    describe_counter!(
        CHAT_MESSAGES,
        "Chat messages answered, by outcome: acked, duplicate, refused."
    );
    describe_counter!(
        CHAT_CLOSES,
        "Chat connections ended, by reason: client, idle, dead_peer, no_hello, bad_token, abuse, too_big, binary, slow_reader, shutdown, protocol_error."
    );
    describe_counter!(
        CHAT_REPLIES,
        "Downstream replies, by outcome: queued, duplicate, no_session, invalid, delivered."
    );
    describe_gauge!(
        CHAT_OUTBOX_SESSIONS,
        "Chat sessions whose reply outboxes are held (connected or recently active)."
    );
    describe_counter!(
        CHAT_OUTBOX_EVICTIONS,
        "Idle chat outboxes evicted because outbox_max_sessions was reached."
    );
    describe_counter!(
        SOCIAL_IGNORED,
        "Webhook items answered but not recorded as complaints (statuses, echoes, receipts, reactions, items without an id, sender or content), by channel and kind."
    );
    describe_counter!(
        TRIAGE_RECORDS,
        "Complaints triaged, by category and severity (general, complex, urgent, major3, major2, major1)."
    );
    describe_gauge!(
        TRIAGE_INCIDENTS_ACTIVE,
        "Storm incidents in progress: many distinct customers reporting the same category and key terms (and area) within the storm window."
    );
    describe_counter!(TRIAGE_INCIDENTS, "Storm incidents opened.");
    describe_counter!(
        TRIAGE_STORM_UNTRACKED,
        "Complaints the storm detector could not track because triage.max_storm_buckets buckets were all active."
    );
    describe_gauge!(
        TRIAGE_REPEAT_CUSTOMERS,
        "Customers whose recent complaints are remembered for repeat detection (bounded by triage.max_repeat_customers)."
    );
    describe_gauge!(TRIAGE_RULES, "Triage rules in force.");
    describe_counter!(
        TRIAGE_RELOADS,
        "Rule file reloads on SIGHUP, by result (ok, error: the old rules stay)."
    );
    describe_counter!(
        TRIAGE_BAD_FLAGS,
        "Escalation flags from a trusted channel that named no known severity, by channel."
    );
    describe_gauge!(
        REPLIES_CONSUMER_UP,
        "1 while the replies consumer has its partitions assigned, else 0."
    );
    describe_counter!(
        TLS_HANDSHAKES,
        "TLS handshakes completed, by listener and protocol version (1.2, 1.3)."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes that did not complete, by listener and reason (timeout, closed, protocol)."
    );
    describe_counter!(
        TLS_RELOADS,
        "Certificate reloads on SIGHUP, by listener and result (ok, error: the old certificate stays)."
    );
}

fn describe_spool_replay() {
    describe_gauge!(
        SPOOL_BACKLOG_RECORDS,
        "Records in the spool past the replay cursor: not yet forwarded to Kafka."
    );
    describe_gauge!(
        SPOOL_BACKLOG_BYTES,
        Unit::Bytes,
        "Frame bytes of the records past the replay cursor."
    );
    describe_counter!(
        SPOOL_REPLAYED,
        "Spooled records forwarded to Kafka (acknowledged by the broker)."
    );
    describe_counter!(
        SPOOL_REPLAY_ERRORS,
        "Replayed records whose delivery failed (kept in the spool and retried with backoff)."
    );
    describe_counter!(
        SPOOL_SEGMENTS_RELEASED,
        "Spool segments deleted because every record in them was forwarded to Kafka."
    );
    describe_counter!(
        SPOOL_WRITE_ERRORS,
        "Spool writes or fsyncs that failed (ENOSPC, EIO): the requests of that group were refused."
    );
    describe_gauge!(
        SPOOL_UP,
        "1 while the spool can write, 0 after a write or fsync error until a fresh segment opens."
    );
}

/// Sets up `tracing`: JSON or pretty, level from config unless `RUST_LOG` says otherwise.
///
/// Lines are formatted on the calling thread and written to stderr by a writer thread, in
/// batches (flushed whenever its queue empties), so request threads never wait on a write(2) per
/// line. Nothing is dropped: a full queue makes the logging thread wait. Keep the returned guard
/// alive until exit; dropping it flushes what is queued.
pub fn init_logging(
    cfg: &crate::config::LogConfig,
) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(cfg.level.clone()));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let res = match cfg.format {
        crate::config::LogFormat::Json => builder.json().flatten_event(true).try_init(),
        crate::config::LogFormat::Pretty => builder.try_init(),
    };
    // A second init (tests) keeps the first subscriber, and its writer.
    res.ok().map(|()| guard)
}

/// `+8613800138000` → `+86138****8000`; `13800138000` → `138****8000`. Keeps at most the first
/// three and last four digits of the subscriber part, so an 11-digit number shows 7 at most.
pub fn mask_phone(phone: &str) -> String {
    let (prefix, digits) = match phone.strip_prefix("+86") {
        Some(rest) => ("+86", rest),
        None => match phone.strip_prefix('+') {
            Some(rest) => ("+", rest),
            None => ("", phone),
        },
    };
    let chars: Vec<char> = digits.chars().collect();
    if chars.len() <= 7 {
        return format!("{prefix}****");
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{prefix}{head}****{tail}")
}

/// `john.doe@example.com` → `j***@example.com`.
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first = local.chars().next().map(String::from).unwrap_or_default();
            format!("{first}***@{domain}")
        }
        None => "***".into(),
    }
}

/// A customer key in a log line: phones and emails masked, scoped social ids shortened.
pub fn mask_customer_key(key: &str) -> String {
    if key.starts_with('+') {
        mask_phone(key)
    } else if key.contains('@') {
        mask_email(key)
    } else {
        match key.rsplit_once(':') {
            Some((scope, id)) => {
                let keep: String = id.chars().take(3).collect();
                format!("{scope}:{keep}***")
            }
            None => "***".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_are_masked_to_at_most_seven_digits() {
        assert_eq!(mask_phone("+8613800138000"), "+86138****8000");
        assert_eq!(mask_phone("13800138000"), "138****8000");
        assert_eq!(mask_phone("+14155550123"), "+141****0123");
        assert_eq!(mask_phone("+123"), "+****");
        for p in [
            "+8613800138000",
            "13800138000",
            "+447700900123",
            "+14155550123",
        ] {
            let shown = mask_phone(p)
                .trim_start_matches("+86")
                .chars()
                .filter(|c| c.is_ascii_digit())
                .count();
            assert!(shown <= 7, "{p} shows {shown} digits");
            // Idempotent enough that masking a mask reveals nothing new.
            assert!(!mask_phone(&mask_phone(p)).contains("0013"));
        }
    }

    #[test]
    fn emails_keep_one_letter_and_the_domain() {
        assert_eq!(mask_email("john.doe@example.com"), "j***@example.com");
        assert_eq!(mask_email("nobody"), "***");
        assert_eq!(
            mask_customer_key("wechat:gh_1:oABCDEFG"),
            "wechat:gh_1:oAB***"
        );
        assert_eq!(mask_customer_key("+8613800138000"), "+86138****8000");
    }
}

#[cfg(test)]
mod readme_tests {
    /// Every metric this module names is documented in the README's metrics table.
    #[test]
    fn every_metric_is_in_the_readme_table() {
        let readme = include_str!("../README.md");
        let src = include_str!("telemetry.rs");
        let names: Vec<&str> = src
            .lines()
            .filter(|l| l.starts_with("pub const ") && l.contains("\"switchboard_"))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        assert!(names.len() > 20);
        for n in names {
            assert!(
                readme.contains(&format!("`{n}`")),
                "{n} missing from README metrics table"
            );
        }
    }
}

fn describe_attachments() {
    describe_counter!(
        ATTACHMENTS,
        "Email attachments by outcome: stored, existing (already in the store), or recorded without their body: quota_message, quota_sender, quota_total, disk_low, disk_full, write_error."
    );
    describe_counter!(
        ATTACHMENTS_DELETED,
        "Files the attachment sweep deleted, by reason (expired: older than email.attachment_max_age_hours; stale_temp: a temp file left by a crash; stale_spill: an SMTP spill file left by a crash)."
    );
    describe_gauge!(
        ATTACHMENT_STORE_BYTES,
        Unit::Bytes,
        "Bytes held by the attachment store (email.attachment_dir)."
    );
    describe_gauge!(
        ATTACHMENT_STORE_FILES,
        "Files held by the attachment store."
    );
    describe_gauge!(
        DISK_FREE_BYTES,
        Unit::Bytes,
        "Free bytes (for an unprivileged writer) on a volume the gateway writes, by volume."
    );
    describe_counter!(
        SMTP_DATA_SPILLED,
        "SMTP messages larger than email.data_memory_bytes streamed to a temp file during DATA, by result (ok, error: answered 452 4.3.1)."
    );
    describe_gauge!(
        EMAIL_PARSE_BYTES,
        Unit::Bytes,
        "Bytes of mail being parsed now (bounded by email.parse_memory_bytes)."
    );
}
