//! Acknowledgement mail: after an email complaint is durable, the complainant gets a reply with
//! the record reference and the first-response deadline, threaded (`In-Reply-To`,
//! `References`) and marked `Auto-Submitted: auto-replied` so their auto-responder stays quiet.
//!
//! A background task sends through the configured relay (lettre). Intake only enqueues: a relay
//! outage never blocks or fails intake. Failures are retried with backoff up to `max_attempts`,
//! then dropped; everything is counted. Per-recipient rate limit: a complainant writing many
//! mails gets a few acknowledgements, not a flood.

use crate::config::AckMailConfig;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use lettre::message::header::{Header, HeaderName, HeaderValue};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

use crate::telemetry::ACK_MAIL;

/// One acknowledgement to send.
#[derive(Debug, Clone)]
pub struct AckJob {
    pub to: String,
    pub subject: Option<String>,
    /// The complaint mail's Message-ID (without angle brackets).
    pub message_id: Option<String>,
    pub references: Vec<String>,
    pub reference: String,
    pub first_response_due: String,
}

#[derive(Clone)]
struct AutoSubmitted;

impl Header for AutoSubmitted {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Auto-Submitted")
    }
    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AutoSubmitted)
    }
    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "auto-replied".into())
    }
}

#[derive(Clone)]
struct SuppressAutoResponse;

impl Header for SuppressAutoResponse {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("X-Auto-Response-Suppress")
    }
    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(SuppressAutoResponse)
    }
    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "All".into())
    }
}

/// Mails being sent or retried at once.
const SENDERS: usize = 32;

pub struct AckMailer {
    tx: mpsc::Sender<AckJob>,
    limiter: DefaultKeyedRateLimiter<u64>,
}

fn outcome(o: &'static str) {
    metrics::counter!(ACK_MAIL, "outcome" => o).increment(1);
}

fn fill(template: &str, job: &AckJob) -> String {
    template
        .replace(
            "{subject}",
            job.subject.as_deref().unwrap_or("(no subject)"),
        )
        .replace("{ref}", &job.reference)
        .replace("{first_response_due}", &job.first_response_due)
}

/// The acknowledgement as a message (public for tests of its headers).
pub fn build(cfg: &AckMailConfig, job: &AckJob) -> Result<Message, String> {
    let mut b = Message::builder()
        .from(
            cfg.from
                .parse()
                .map_err(|e| format!("email.ack.from: {e}"))?,
        )
        .to(job.to.parse().map_err(|e| format!("recipient: {e}"))?)
        .subject(fill(&cfg.subject, job))
        .header(AutoSubmitted)
        .header(SuppressAutoResponse);
    if let Some(id) = &job.message_id {
        b = b.in_reply_to(format!("<{id}>"));
        let mut refs: Vec<String> = job.references.iter().map(|r| format!("<{r}>")).collect();
        refs.push(format!("<{id}>"));
        b = b.references(refs.join(" "));
    }
    b.body(fill(&cfg.body, job)).map_err(|e| e.to_string())
}

impl AckMailer {
    /// Starts the sender task.
    pub fn start(cfg: AckMailConfig) -> Result<Arc<Self>, String> {
        let (host, port) = cfg
            .relay
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| format!("email.ack.relay `{}` is not host:port", cfg.relay))?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(Duration::from_secs(30)))
            .build();
        let (tx, mut rx) = mpsc::channel::<AckJob>(cfg.queue_size.max(1));
        let per_hour = NonZeroU32::new(cfg.per_recipient_per_hour.max(1)).expect("max(1)");
        let limiter = RateLimiter::keyed(Quota::per_hour(per_hour));
        let cfg = Arc::new(cfg);
        // At most this many mails in flight (sending or waiting to retry): during a relay
        // outage the queue fills and further acknowledgements are dropped and counted.
        let in_flight = Arc::new(tokio::sync::Semaphore::new(SENDERS));
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let (cfg, transport) = (cfg.clone(), transport.clone());
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    return;
                };
                // Each mail retries on its own so one bad recipient does not hold the queue.
                tokio::spawn(async move {
                    let _permit = permit;
                    let msg = match build(&cfg, &job) {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(error = %e, "acknowledgement not built");
                            outcome("invalid");
                            return;
                        }
                    };
                    // RFC 3834: automatic replies go out with a null reverse-path, so they can
                    // never bounce back into a loop.
                    let Ok(to) = job.to.parse::<lettre::Address>() else {
                        outcome("invalid");
                        return;
                    };
                    let envelope =
                        lettre::address::Envelope::new(None, vec![to]).expect("one recipient");
                    let raw = msg.formatted();
                    let mut delay = Duration::from_millis(cfg.retry_base_ms.max(1));
                    let attempts = cfg.max_attempts.max(1);
                    for attempt in 1..=attempts {
                        match transport.send_raw(&envelope, &raw).await {
                            Ok(_) => {
                                outcome("sent");
                                return;
                            }
                            Err(e) => {
                                // The relay's text can quote the recipient: log the code only.
                                let code = e
                                    .status()
                                    .map(|c| c.to_string())
                                    .unwrap_or_else(|| "none".into());
                                tracing::warn!(
                                    attempt,
                                    code,
                                    permanent = e.is_permanent(),
                                    "acknowledgement mail failed"
                                );
                                if e.is_permanent() || attempt == attempts {
                                    break;
                                }
                                outcome("retried");
                                tokio::time::sleep(delay).await;
                                delay = (delay * 2).min(Duration::from_secs(300));
                            }
                        }
                    }
                    outcome("gave_up");
                });
            }
        });
        Ok(Arc::new(Self { tx, limiter }))
    }

    /// Queues an acknowledgement; never waits. Counted when limited or when the queue is full.
    pub fn enqueue(&self, job: AckJob) {
        let key = crate::limits::text_key(&job.to.to_lowercase());
        if self.limiter.check_key(&key).is_err() {
            outcome("rate_limited");
            return;
        }
        match self.tx.try_send(job) {
            Ok(()) => outcome("queued"),
            Err(_) => outcome("dropped_queue_full"),
        }
    }

    /// Drops idle per-recipient limiter keys.
    pub fn evict_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_is_threaded_and_marked_auto_replied() {
        let cfg = AckMailConfig {
            enabled: true,
            ..Default::default()
        };
        let job = AckJob {
            to: "alice@example.org".into(),
            subject: Some("宽带断网".into()),
            message_id: Some("m2@example.org".into()),
            references: vec!["m1@example.org".into()],
            reference: "ABCD1234".into(),
            first_response_due: "2026-11-23T10:00:00.000Z".into(),
        };
        let raw = String::from_utf8(build(&cfg, &job).unwrap().formatted()).unwrap();
        assert!(raw.contains("In-Reply-To: <m2@example.org>"), "{raw}");
        assert!(
            raw.contains("References: <m1@example.org> <m2@example.org>"),
            "{raw}"
        );
        assert!(raw.contains("Auto-Submitted: auto-replied"));
        assert!(raw.contains("X-Auto-Response-Suppress: All"));
        assert!(raw.contains("To: alice@example.org"));
    }
}
