//! Email intake: the SMTP listener's `MailHandler`, and `POST /hooks/email/inbound` (raw MIME
//! over HTTP: SendGrid Inbound Parse raw mode `email`, Mailgun `body-mime`). Both go through the
//! same parser into the same record; the acknowledgement mail is queued once the record is
//! durable, never for auto-submitted mail or a duplicate.
//!
//! MIME parsing needs the whole message in memory: a bytes-weighted semaphore
//! (`email.parse_memory_bytes`) bounds the bytes of mail being parsed and submitted at once. A
//! message waits for its share (one larger than the budget takes all of it) at most
//! `email.data_timeout_secs`; then SMTP answers `452 4.3.1` (the sender retries) and the webhook
//! `503`.

use super::email::{EmailParser, Envelope, NAME};
use super::{network_and_token, Allowlist, Channel, Inbound};
use crate::ack_mail::{AckJob, AckMailer};
use crate::attachments::AttachmentStore;
use crate::config::{EmailConfig, SignatureMode};
use crate::error::{Reason, Rejection};
use crate::http::{json_response, Resp};
use crate::pipeline::{trace_id, Accepted, Pipeline, RequestCtx};
use crate::smtp::{Delivery, MailData, MailHandler, Reply};
use crate::telemetry::EMAIL_PARSE_BYTES;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use hmac::{Hmac, Mac};
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// The parse budget is counted in KiB (a permit each).
const UNIT: usize = 1024;

/// Bytes of mail being parsed at once, at most.
struct ParseBudget {
    permits: Arc<Semaphore>,
    total: u32,
    wait: Duration,
}

impl ParseBudget {
    fn new(bytes: usize, wait: Duration) -> Self {
        let total = (bytes / UNIT).clamp(1, u32::MAX as usize) as u32;
        Self {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
            wait,
        }
    }

    /// Waits for `len` bytes' share (all of the budget at most).
    async fn acquire(&self, len: usize) -> Result<BudgetPermit, Rejection> {
        let units = len.div_ceil(UNIT).clamp(1, self.total as usize) as u32;
        match tokio::time::timeout(self.wait, self.permits.clone().acquire_many_owned(units)).await
        {
            Ok(Ok(permit)) => {
                let bytes = units as f64 * UNIT as f64;
                metrics::gauge!(EMAIL_PARSE_BYTES).increment(bytes);
                Ok(BudgetPermit {
                    _permit: permit,
                    bytes,
                })
            }
            _ => Err(Rejection::new(
                Reason::Overloaded,
                "too much mail being parsed, try again later",
            )),
        }
    }
}

struct BudgetPermit {
    _permit: tokio::sync::OwnedSemaphorePermit,
    bytes: f64,
}

impl Drop for BudgetPermit {
    fn drop(&mut self) {
        metrics::gauge!(EMAIL_PARSE_BYTES).decrement(self.bytes);
    }
}

pub struct EmailIntake {
    parser: EmailParser,
    pipeline: Arc<Pipeline>,
    addresses: HashSet<String>,
    domains: Vec<String>,
    ack: Option<Arc<AckMailer>>,
    budget: ParseBudget,
}

impl EmailIntake {
    /// `store`: where attachment bytes go (`None`: metadata only).
    pub fn new(
        cfg: &EmailConfig,
        pipeline: Arc<Pipeline>,
        ack: Option<Arc<AckMailer>>,
        store: Option<Arc<AttachmentStore>>,
    ) -> Self {
        Self {
            parser: EmailParser {
                max_depth: cfg.max_mime_depth,
                max_parts: cfg.max_mime_parts,
                store,
            },
            budget: ParseBudget::new(
                cfg.parse_memory_bytes,
                Duration::from_secs(cfg.data_timeout_secs),
            ),
            pipeline,
            addresses: cfg
                .intake_addresses
                .iter()
                .map(|a| a.trim().to_lowercase())
                .collect(),
            domains: cfg
                .intake_domains
                .iter()
                .map(|d| d.trim().to_lowercase())
                .collect(),
            ack,
        }
    }

    pub fn accepts(&self, rcpt: &str) -> bool {
        let r = rcpt.trim().trim_matches(['<', '>']).to_lowercase();
        self.addresses.contains(&r)
            || r.rsplit_once('@')
                .is_some_and(|(_, d)| self.domains.iter().any(|x| x == d))
    }

    /// The first recipient that is ours: the intake address the record is scoped to.
    fn intake_address(&self, rcpts: &[String]) -> String {
        rcpts
            .iter()
            .find(|r| self.accepts(r))
            .or_else(|| self.addresses.iter().next())
            .map(|r| r.trim().to_lowercase())
            .unwrap_or_default()
    }

    /// Parses, makes durable, queues the acknowledgement.
    pub async fn take(
        &self,
        peer: IpAddr,
        mail_from: String,
        rcpts: &[String],
        raw: MailData,
    ) -> Result<Accepted, Rejection> {
        let ctx = RequestCtx {
            peer,
            channel: NAME,
            trace_id: trace_id(None),
        };
        self.pipeline.admit(&ctx).await?;
        let envelope = Envelope {
            mail_from,
            rcpt_to: self.intake_address(rcpts),
        };
        // Held until the record is submitted: the parsed text is as large as the message.
        let _budget = self.budget.acquire(raw.len()).await?;
        let parser = self.parser.clone();
        // Reading a spilled message, parsing (and writing its attachments) is blocking work.
        let parsed = tokio::task::spawn_blocking(move || {
            let raw = raw.load().map_err(|e| {
                tracing::warn!(error_kind = %e.kind(), "could not read a spilled message back");
                Rejection::new(Reason::SinkUnavailable, "message spill file unreadable")
            })?;
            parser.parse(&raw, &envelope)
        })
        .await
        .map_err(|_| Rejection::new(Reason::Internal, "mail parser failed"))??;
        let a = self
            .pipeline
            .submit(&ctx, vec![parsed.intake.clone()])
            .await?[0];
        if let (Some(ack), false, None, Some(to)) = (
            &self.ack,
            a.duplicate,
            &parsed.auto_submitted,
            &parsed.reply_address,
        ) {
            ack.enqueue(AckJob {
                to: to.clone(),
                subject: parsed.subject.clone(),
                message_id: parsed.message_id.clone(),
                references: parsed.references.clone(),
                reference: super::reference(&a.id),
                first_response_due: a
                    .first_response_due
                    .map(crate::record::rfc3339_ms)
                    .unwrap_or_default(),
            });
        }
        Ok(a)
    }
}

/// The SMTP listener's handler.
pub struct SmtpIntake(pub Arc<EmailIntake>);

impl MailHandler for SmtpIntake {
    fn accept_recipient(&self, rcpt: &str) -> bool {
        self.0.accepts(rcpt)
    }

    fn deliver(&self, d: Delivery) -> BoxFuture<'static, Reply> {
        let intake = self.0.clone();
        Box::pin(async move {
            match intake.take(d.peer, d.mail_from, &d.rcpt_to, d.data).await {
                Ok(a) => Reply::new(
                    250,
                    "2.0.0",
                    format!("Queued as {} (reference {})", a.id, super::reference(&a.id)),
                ),
                Err(r) => {
                    r.count(NAME);
                    match r.reason {
                        Reason::RateLimited { .. } => {
                            Reply::new(451, "4.7.1", "Rate limited, try again later")
                        }
                        Reason::BodyTooLarge => Reply::new(552, "5.3.4", r.message),
                        Reason::Overloaded => Reply::new(
                            452,
                            "4.3.1",
                            "Insufficient system resources, try again later",
                        ),
                        Reason::InvalidEvent | Reason::MalformedJson => {
                            Reply::new(554, "5.6.0", r.message)
                        }
                        _ => Reply::new(
                            451,
                            "4.3.0",
                            "Temporary failure storing the message, try again later",
                        ),
                    }
                }
            }
        })
    }
}

pub const INBOUND_ROUTE: &str = "/hooks/email/inbound";

/// `POST /hooks/email/inbound?token=...`
pub struct EmailInbound {
    intake: Arc<EmailIntake>,
    max_body: usize,
    mode: SignatureMode,
    tokens: Vec<String>,
    mailgun_keys: Vec<String>,
}

impl EmailInbound {
    pub fn new(cfg: &EmailConfig, intake: Arc<EmailIntake>) -> Self {
        Self {
            intake,
            // A raw message up to email.max_message_bytes, form-encoded (up to 3 bytes a byte).
            max_body: cfg.max_message_bytes.saturating_mul(3),
            mode: cfg.inbound_auth_mode,
            tokens: cfg.inbound_tokens.clone(),
            mailgun_keys: cfg.mailgun_signing_keys.clone(),
        }
    }

    /// Mailgun: hex(HMAC-SHA256(signing key, timestamp + token)), timestamp within 5 minutes.
    fn check_mailgun(&self, fields: &[(String, Bytes)]) -> Result<(), Rejection> {
        if self.mailgun_keys.is_empty() {
            return Ok(());
        }
        let get = |k: &str| {
            fields
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let outcome = (|| {
            let (Some(ts), Some(token), Some(sig)) =
                (get("timestamp"), get("token"), get("signature"))
            else {
                return Err(Reason::MissingSignature);
            };
            let provided = hex::decode(sig.trim()).map_err(|_| Reason::BadSignature)?;
            let mut ok = false;
            for key in &self.mailgun_keys {
                let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes())
                    .expect("HMAC takes any key");
                mac.update(ts.as_bytes());
                mac.update(token.as_bytes());
                ok |= mac.verify_slice(&provided).is_ok();
            }
            if !ok {
                return Err(Reason::BadSignature);
            }
            let ts: i64 = ts.trim().parse().map_err(|_| Reason::BadSignature)?;
            if !crate::auth::timestamp_fresh(ts, chrono::Utc::now().timestamp(), 300) {
                return Err(Reason::StaleTimestamp);
            }
            Ok(())
        })();
        crate::auth::apply_mode(self.mode, NAME, outcome)
    }
}

async fn fields(parts: &Parts, body: Bytes) -> Result<Vec<(String, Bytes)>, Rejection> {
    let ct = parts
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if super::content_type(&parts.headers) == "application/x-www-form-urlencoded" {
        return Ok(super::form_pairs(&body)
            .into_iter()
            .map(|(k, v)| (k, Bytes::from(v)))
            .collect());
    }
    let boundary = multer::parse_boundary(ct)
        .map_err(|e| Rejection::new(Reason::MalformedJson, format!("multipart: {e}")))?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut mp = multer::Multipart::new(stream, boundary);
    let mut out = Vec::new();
    while let Some(field) = mp
        .next_field()
        .await
        .map_err(|e| Rejection::new(Reason::MalformedJson, format!("multipart: {e}")))?
    {
        let name = field.name().unwrap_or("").to_string();
        let data = field
            .bytes()
            .await
            .map_err(|e| Rejection::new(Reason::MalformedJson, format!("multipart: {e}")))?;
        out.push((name, data));
    }
    Ok(out)
}

impl Channel for EmailInbound {
    fn name(&self) -> &'static str {
        NAME
    }

    fn precheck(&self, parts: &Parts, ctx: &RequestCtx) -> Result<(), Rejection> {
        if parts.method != Method::POST {
            return Err(Rejection::new(Reason::MethodNotAllowed, "use POST"));
        }
        super::require_content_type(
            &parts.headers,
            &["multipart/form-data", "application/x-www-form-urlencoded"],
        )?;
        let q = super::form_pairs(parts.uri.query().unwrap_or("").as_bytes());
        network_and_token(
            self.mode,
            NAME,
            &Allowlist::default(),
            ctx.peer,
            Some((&self.tokens, super::form_get(&q, "token"))),
        )
    }

    fn reject(&self, r: &Rejection) -> Resp {
        super::provider_json_reject(r)
    }

    fn max_body(&self) -> Option<usize> {
        Some(self.max_body)
    }

    fn handle<'a>(
        &'a self,
        inbound: Inbound,
        _pipeline: &'a Pipeline,
    ) -> BoxFuture<'a, Result<Resp, Rejection>> {
        Box::pin(async move {
            let f = fields(&inbound.parts, inbound.body).await?;
            let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let text = |k: &str| get(k).map(|v| String::from_utf8_lossy(&v).into_owned());
            let (raw, mail_from, rcpts) = if let Some(raw) = get("email") {
                // SendGrid raw mode: the envelope is JSON {"to":[...],"from":"..."}.
                let env: serde_json::Value = text("envelope")
                    .and_then(|e| serde_json::from_str(&e).ok())
                    .unwrap_or_default();
                let to = env["to"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                (raw, env["from"].as_str().unwrap_or("").to_string(), to)
            } else if let Some(raw) = get("body-mime") {
                self.check_mailgun(&f)?;
                (
                    raw,
                    text("sender").unwrap_or_default(),
                    text("recipient").into_iter().collect(),
                )
            } else {
                return Err(Rejection::new(
                    Reason::InvalidEvent,
                    "no raw MIME: use SendGrid raw mode (`email`) or a Mailgun `mime` route (`body-mime`)",
                ));
            };
            let rcpts: Vec<String> = rcpts;
            if !rcpts.is_empty() && !rcpts.iter().any(|r| self.intake.accepts(r)) {
                // Mailgun reads 406 as "rejected, do not retry".
                return Ok(json_response(
                    StatusCode::NOT_ACCEPTABLE,
                    serde_json::json!({"error": "unknown_recipient", "message": "no intake address among the recipients"}).to_string(),
                ));
            }
            let a = self
                .intake
                .take(inbound.ctx.peer, mail_from, &rcpts, MailData::Memory(raw))
                .await?;
            Ok(json_response(
                StatusCode::OK,
                serde_json::json!({"id": a.id.to_string(), "duplicate": a.duplicate}).to_string(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, RateConfig};
    use crate::sink::{Encoded, Health, Landed, Sink, SinkError};

    /// A sink that cannot take anything (Kafka and spool both gone).
    struct Down;

    impl Sink for Down {
        fn write<'a>(&'a self, _: &'a [Encoded]) -> BoxFuture<'a, Result<Vec<Landed>, SinkError>> {
            Box::pin(async { Err(SinkError::Spool("disk gone".into())) })
        }
        fn health(&self) -> Health {
            Health {
                usable: false,
                healthy: false,
                parts: vec![],
            }
        }
        fn shutdown(&self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    fn delivery(n: u32) -> Delivery {
        Delivery {
            peer: "127.0.0.1".parse().unwrap(),
            mail_from: "a@example.cn".into(),
            rcpt_to: vec!["complaints@switchboard.localhost".into()],
            data: format!("From: a@example.cn\r\nMessage-ID: <m{n}@example.cn>\r\nSubject: s\r\n\r\nbody {n}\r\n").into_bytes().into(),
        }
    }

    #[tokio::test]
    async fn sink_failure_is_451_4_3_0_and_rate_limit_is_451_4_7_1() {
        let mut cfg = Config::default();
        cfg.email.attachment_dir = tempfile::tempdir().unwrap().keep();
        let down = Pipeline::new(&cfg, Arc::new(Down)).unwrap();
        let h = SmtpIntake(Arc::new(EmailIntake::new(&cfg.email, down, None, None)));
        let r = h.deliver(delivery(1)).await;
        assert_eq!((r.code, r.status), (451, "4.3.0"));

        cfg.limits.per_source = RateConfig {
            per_second: 0.001,
            burst: 1,
        };
        let ok = Pipeline::new(&cfg, Arc::new(crate::sink::memory::MemorySink::default())).unwrap();
        let h = SmtpIntake(Arc::new(EmailIntake::new(&cfg.email, ok, None, None)));
        assert_eq!(h.deliver(delivery(2)).await.code, 250);
        let r = h.deliver(delivery(3)).await;
        assert_eq!((r.code, r.status), (451, "4.7.1"));
        assert!(!h.accept_recipient("someone@elsewhere.example"));
        assert!(h.accept_recipient("<Complaints@Switchboard.localhost>"));
    }

    #[tokio::test]
    async fn no_parse_budget_in_time_is_452_4_3_1() {
        let mut cfg = Config::default();
        cfg.email.parse_memory_bytes = 4096;
        cfg.email.data_timeout_secs = 0;
        let p = Pipeline::new(&cfg, Arc::new(crate::sink::memory::MemorySink::default())).unwrap();
        let h = SmtpIntake(Arc::new(EmailIntake::new(&cfg.email, p, None, None)));
        // A message larger than the budget takes all of it; the next one cannot get its share.
        let held = h.0.budget.acquire(1 << 20).await.unwrap();
        let r = h.deliver(delivery(4)).await;
        assert_eq!((r.code, r.status), (452, "4.3.1"));
        drop(held);
        assert_eq!(h.deliver(delivery(5)).await.code, 250);
    }
}
