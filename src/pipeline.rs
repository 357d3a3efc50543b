//! The channel-agnostic pipeline, top to bottom in `submit`:
//! identity → dedupe → limits → triage → record → sink → commit dedupe → answer.
//!
//! A batch is answered as a whole: every message is either made durable or was already
//! (a duplicate), or the request fails and nothing it claimed stays claimed, so the sender's
//! retry goes through.

use crate::config::{Backend, Config};
use crate::dedupe::{hash_key, Claim, Lookup, Window};
use crate::error::{Reason, Rejection};
use crate::identity::{Identity, Normalizer};
use crate::limits::Limits;
use crate::record::{
    normalize_text, rfc3339_ms, ComplaintRecord, Content, Conversation, Customer, Intake,
    SocialIdentity, SCHEMA,
};
use crate::shared::{DedupeKey, Remote, Shared};
use crate::sink::{Encoded, Health, Sink};
use crate::telemetry::{self, mask_customer_key};
use crate::triage::{self, Triager};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ulid::Ulid;

/// Largest complaint text kept, in characters; longer text is cut (and flagged in metadata).
pub const MAX_TEXT_CHARS: usize = 32 * 1024;

/// Who is asking, for limits, labels and the trace.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    pub peer: IpAddr,
    /// Channel name used as a metric label (`api`, `twilio`, ...).
    pub channel: &'static str,
    pub trace_id: String,
}

/// The answer for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub id: Ulid,
    pub duplicate: bool,
    /// When the first response is due (from triage); `None` for a duplicate.
    pub first_response_due: Option<DateTime<Utc>>,
}

enum Slot {
    New {
        /// The record's id (chosen at claim time: the shared store holds it for other instances).
        id: Ulid,
        provider_claim: Option<Claim>,
        fingerprint_claim: Claim,
        alias_claims: Vec<Claim>,
        dedupe_key: u128,
    },
    Duplicate(Ulid),
    /// Same message as an earlier one in this batch.
    SameAs(usize),
}

/// Why a dedupe pass has to wait.
enum Busy {
    /// A request on this instance holds a key: its outcome channel.
    Local(tokio::sync::watch::Receiver<Option<Ulid>>),
    /// Another instance is writing a key right now (the shared store says pending).
    Remote,
}

/// The keys a request claimed in the shared store. Committed once the records are durable;
/// released (where still ours) when the request fails or is dropped, so the sender's retry to
/// any instance goes through, as with the memory windows' claims.
struct RemoteClaims {
    shared: Option<Arc<Shared>>,
    /// (key, pending record id, window length)
    held: Vec<(DedupeKey, Ulid, Duration)>,
}

impl RemoteClaims {
    fn new(shared: Option<Arc<Shared>>) -> Self {
        Self {
            shared,
            held: Vec::new(),
        }
    }

    /// Every held key now answers with its record (one round trip).
    async fn commit(mut self) {
        let held = std::mem::take(&mut self.held);
        if let Some(s) = &self.shared {
            s.commit(&held).await;
        }
    }

    /// The key `key` of `window`, claimed above for a new record, answers with `first` instead.
    async fn answer_now(&mut self, window: &'static str, key: u128, first: Ulid) {
        let Some(pos) = self
            .held
            .iter()
            .position(|(k, _, _)| k.window == window && k.key == key)
        else {
            return;
        };
        let (k, _, len) = self.held.swap_remove(pos);
        if let Some(s) = &self.shared {
            s.commit(&[(k, first, len)]).await;
        }
    }

    async fn release_now(&mut self) {
        let held: Vec<(DedupeKey, Ulid)> = self.held.drain(..).map(|(k, id, _)| (k, id)).collect();
        if let (Some(s), false) = (&self.shared, held.is_empty()) {
            s.release(&held).await;
        }
    }
}

impl Drop for RemoteClaims {
    fn drop(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let (Some(s), Ok(rt)) = (self.shared.clone(), tokio::runtime::Handle::try_current()) else {
            // No runtime (shutting down): the pending claims expire by themselves.
            return;
        };
        let held: Vec<(DedupeKey, Ulid)> = self.held.drain(..).map(|(k, id, _)| (k, id)).collect();
        rt.spawn(async move {
            s.release(&held).await;
        });
    }
}

pub struct Pipeline {
    normalizer: Normalizer,
    provider_ids: Window,
    fingerprints: Window,
    limits: Arc<Limits>,
    /// The shared dedupe store (`dedupe.backend = "redis"`); the windows above are its cache.
    shared: Option<Arc<Shared>>,
    /// How long a claim in the shared store stays pending without a commit (a crashed writer's
    /// claim frees itself).
    pending_ttl: Duration,
    sink: Arc<dyn Sink>,
    triage: Arc<Triager>,
    write_timeout: Duration,
    retry_after: Duration,
}

impl Pipeline {
    /// Fails when the triage rule file cannot be read or does not check out.
    pub fn new(cfg: &Config, sink: Arc<dyn Sink>) -> Result<Arc<Self>, String> {
        let shared = if cfg.redis_enabled() {
            Some(Shared::new(&cfg.redis)?)
        } else {
            None
        };
        let pick = |b: Backend| {
            if b == Backend::Redis {
                shared.clone()
            } else {
                None
            }
        };
        let write_timeout = Duration::from_millis(cfg.sink.write_timeout_ms);
        let triage = Arc::new(Triager::new(&cfg.triage)?);
        let normalizer = Normalizer::new(&cfg.identity.default_region);
        normalizer.warm_up();
        Ok(Arc::new(Self {
            normalizer,
            provider_ids: Window::new(
                "provider_id",
                Duration::from_secs(cfg.dedupe.provider_id_window_secs),
                cfg.dedupe.max_entries,
            ),
            fingerprints: Window::new(
                "fingerprint",
                Duration::from_secs(cfg.dedupe.fingerprint_window_secs.max(1)),
                cfg.dedupe.max_entries,
            ),
            limits: Limits::with_shared(&cfg.limits, pick(cfg.limits.backend)),
            shared: pick(cfg.dedupe.backend),
            // The dedupe wait and the sink write, with room to spare.
            pending_ttl: write_timeout * 2 + Duration::from_secs(1),
            sink,
            triage,
            write_timeout,
            retry_after: Duration::from_secs(cfg.sink.retry_after_secs.max(1)),
        }))
    }

    /// The triage rules and state (SIGHUP reloads through it).
    pub fn triage(&self) -> &Arc<Triager> {
        &self.triage
    }

    pub fn normalizer(&self) -> &Normalizer {
        &self.normalizer
    }

    /// The record that already answered this provider message id, if any (claims nothing).
    pub fn seen(&self, provider: &str, account: Option<&str>, message_id: &str) -> Option<Ulid> {
        self.provider_ids
            .peek(provider_key(provider, account, message_id))
    }

    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    pub fn sink_health(&self) -> Health {
        self.sink.health()
    }

    pub async fn shutdown_sink(&self) {
        self.sink.shutdown().await;
    }

    /// Drops expired dedupe entries and publishes the window sizes.
    pub fn sweep(&self) {
        for w in [&self.provider_ids, &self.fingerprints] {
            let n = w.sweep();
            metrics::gauge!(telemetry::DEDUPE_ENTRIES, "window" => w.name()).set(n as f64);
        }
        self.triage.sweep(Utc::now());
    }

    /// Per-source and per-channel admission, before a request is read or verified.
    pub async fn admit(&self, ctx: &RequestCtx) -> Result<(), Rejection> {
        self.limits
            .admit(ctx.peer, ctx.channel)
            .await
            .map_err(|l| limited(ctx.channel, l))
    }

    /// The shared store's state for `/readyz` (`None`: both stores are in memory).
    pub fn shared_state(&self) -> Option<&'static str> {
        self.shared
            .as_ref()
            .or(self.limits.shared())
            .map(|s| s.state())
    }

    pub async fn submit(
        &self,
        ctx: &RequestCtx,
        intakes: Vec<Intake>,
    ) -> Result<Vec<Accepted>, Rejection> {
        let received_at = Utc::now();
        let n = intakes.len();
        let at = |i: usize| {
            if n > 1 {
                format!("[{i}] ")
            } else {
                String::new()
            }
        };

        // 1. Identity.
        let mut items = Vec::with_capacity(n);
        for (i, intake) in intakes.into_iter().enumerate() {
            let identity = self
                .normalizer
                .normalize(intake.identity.clone())
                .map_err(|e| {
                    Rejection::new(Reason::InvalidEvent, format!("{}customer: {e}", at(i)))
                })?;
            let mut text = normalize_text(&intake.text);
            let mut truncated = false;
            if text.chars().count() > MAX_TEXT_CHARS {
                text = text.chars().take(MAX_TEXT_CHARS).collect();
                truncated = true;
            }
            if text.is_empty() && intake.attachments.is_empty() && intake.voice.is_none() {
                return Err(Rejection::new(
                    Reason::InvalidEvent,
                    format!(
                        "{}complaint has no text, attachment or voice content",
                        at(i)
                    ),
                ));
            }
            items.push((intake, identity, text, truncated));
        }

        // 2. Dedupe. Bounded: a claim held by a stuck request elsewhere cannot hold us forever.
        let mut remote = RemoteClaims::new(self.shared.clone());
        let slots = tokio::time::timeout(self.write_timeout, self.dedupe(ctx, &items, &mut remote))
            .await
            .map_err(|_| self.unavailable("timed out waiting for a concurrent delivery"))?;

        // 3. Limits, for what is new. A single message over its customer's limit is refused
        //    (429, the sender retries); in a batch, refusing would fail everyone else's
        //    complaints in it, so an over-limit message is kept, flagged and counted.
        let mut over_limit = Vec::with_capacity(n);
        for ((_, identity, _, _), slot) in items.iter().zip(&slots) {
            let mut over = false;
            if matches!(slot, Slot::New { .. }) {
                if let Err(l) = self.limits.customer(&identity.key).await {
                    if n == 1 {
                        return Err(limited(ctx.channel, l));
                    }
                    metrics::counter!(telemetry::RATE_LIMITED, "channel" => ctx.channel, "scope" => "customer_in_batch")
                        .increment(1);
                    over = true;
                }
            }
            over_limit.push(over);
        }

        // 4. Triage and records.
        let mut ids = Vec::with_capacity(n);
        let mut encoded = Vec::new();
        let mut accepted_log = Vec::new();
        let mut marks = Vec::new();
        for (((mut intake, identity, text, truncated), slot), over) in
            items.into_iter().zip(&slots).zip(over_limit)
        {
            let Slot::New { dedupe_key, id, .. } = slot else {
                ids.push(None);
                continue;
            };
            let id = *id;
            if over {
                intake
                    .metadata
                    .insert("over_customer_limit".into(), "true".into());
            }
            accepted_log.push((
                id,
                intake.provider.clone(),
                mask_customer_key(&identity.key),
            ));
            let (record, mark, first_response_due) = self.build(
                id,
                received_at,
                intake,
                identity,
                text,
                truncated,
                *dedupe_key,
                ctx,
            );
            ids.push(Some((id, first_response_due)));
            marks.extend(mark);
            encoded.push(encode(&record));
        }

        // 5. Sink: durable, or the request fails and the claims are released.
        if !encoded.is_empty() {
            let started = Instant::now();
            let landed = match tokio::time::timeout(self.write_timeout, self.sink.write(&encoded))
                .await
            {
                Ok(Ok(landed)) => landed,
                Ok(Err(e)) => {
                    tracing::error!(channel = ctx.channel, error = %e, "sink could not take records");
                    return Err(self.unavailable("the gateway cannot store complaints right now"));
                }
                Err(_) => {
                    tracing::error!(channel = ctx.channel, "sink write timed out");
                    return Err(self.unavailable("the gateway cannot store complaints right now"));
                }
            };
            // Durable: now the complaints count towards their customers' repeat history.
            self.triage.commit(marks);
            for l in &landed {
                metrics::counter!(telemetry::RECORDS_EMITTED, "channel" => ctx.channel, "sink" => l.as_str())
                    .increment(1);
            }
            for (id, provider, customer) in &accepted_log {
                tracing::info!(
                    record_id = %id,
                    channel = ctx.channel,
                    provider = %provider,
                    customer = %customer,
                    trace_id = %ctx.trace_id,
                    sink_ms = started.elapsed().as_millis() as u64,
                    "complaint accepted"
                );
            }
        }

        // 6. Commit the claims and answer.
        remote.commit().await;
        let mut out: Vec<Accepted> = Vec::with_capacity(n);
        for (slot, id) in slots.into_iter().zip(ids) {
            let accepted = match slot {
                Slot::New {
                    provider_claim,
                    fingerprint_claim,
                    alias_claims,
                    ..
                } => {
                    let (id, due) = id.expect("new slots have ids");
                    if let Some(c) = provider_claim {
                        c.commit(id);
                    }
                    for c in alias_claims {
                        c.commit(id);
                    }
                    fingerprint_claim.commit(id);
                    Accepted {
                        id,
                        duplicate: false,
                        first_response_due: Some(due),
                    }
                }
                Slot::Duplicate(id) => Accepted {
                    id,
                    duplicate: true,
                    first_response_due: None,
                },
                Slot::SameAs(j) => Accepted {
                    id: out[j].id,
                    duplicate: true,
                    first_response_due: None,
                },
            };
            out.push(accepted);
        }
        Ok(out)
    }

    /// Claims every message's keys without waiting. If another request holds one of them (it is
    /// writing the same message right now, here or on another instance), every claim taken here
    /// is released and we wait for that request to finish, then start over: two batches holding
    /// each other's messages can never deadlock.
    async fn dedupe(
        &self,
        ctx: &RequestCtx,
        items: &[(Intake, Identity, String, bool)],
        remote: &mut RemoteClaims,
    ) -> Vec<Slot> {
        loop {
            match self.try_dedupe(items, remote).await {
                Ok((slots, hits)) => {
                    for kind in hits {
                        hit(ctx.channel, kind);
                    }
                    return slots;
                }
                Err(Busy::Local(mut busy)) => {
                    remote.release_now().await;
                    // Resolves when the holder commits or releases (or already has).
                    let _ = busy.changed().await;
                }
                Err(Busy::Remote) => {
                    remote.release_now().await;
                    // Another instance is writing it: ask again shortly (jittered, so two
                    // batches holding each other's messages on two instances fall out of step).
                    // Bounded by the caller's write timeout, like a local wait.
                    let jitter = (u128::from(Ulid::new()) % 20) as u64;
                    tokio::time::sleep(Duration::from_millis(10 + jitter)).await;
                }
            }
        }
    }

    /// The local claim `c` of `key` in `window` is ours; asks the shared store too (when there is
    /// one and it answers). `Ok(None)`: ours everywhere; `Ok(Some(id))`: another instance
    /// already answered it with record `id` (remembered locally from now on).
    async fn claim_shared(
        &self,
        window: &Window,
        key: u128,
        id: Ulid,
        remote: &mut RemoteClaims,
    ) -> Result<Option<Ulid>, Busy> {
        let Some(shared) = &self.shared else {
            return Ok(None);
        };
        let k = DedupeKey {
            window: window.name(),
            key,
        };
        match shared.claim(&k, id, self.pending_ttl).await {
            // Unreachable: this instance's window decides alone (counted in `shared`).
            None => Ok(None),
            Some(Remote::Won) => {
                remote.held.push((k, id, window.length()));
                Ok(None)
            }
            Some(Remote::Pending) => Err(Busy::Remote),
            Some(Remote::Duplicate(first)) => Ok(Some(first)),
        }
    }

    async fn try_dedupe(
        &self,
        items: &[(Intake, Identity, String, bool)],
        remote: &mut RemoteClaims,
    ) -> Result<(Vec<Slot>, Vec<&'static str>), Busy> {
        let mut slots = Vec::with_capacity(items.len());
        let mut hits = Vec::new();
        let mut in_batch: HashMap<u128, usize, foldhash::fast::RandomState> = HashMap::default();
        for (i, (intake, identity, text, _)) in items.iter().enumerate() {
            let provider_key = intake
                .provider_message_id
                .as_deref()
                .map(|m| provider_key(&intake.provider, intake.account.as_deref(), m));
            let fingerprint_key = fingerprint(intake, identity, text);
            let earlier = provider_key
                .and_then(|k| in_batch.get(&k))
                .or_else(|| in_batch.get(&fingerprint_key));
            if let Some(&j) = earlier {
                hits.push("in_batch");
                slots.push(Slot::SameAs(j));
                continue;
            }
            // The record's id, if it is new: also the value of its claims in the shared store.
            let id = Ulid::new();
            let provider_claim = match provider_key {
                Some(k) => match self.provider_ids.try_claim(k).map_err(Busy::Local)? {
                    Lookup::Duplicate(id) => {
                        hits.push("provider_id");
                        slots.push(Slot::Duplicate(id));
                        continue;
                    }
                    Lookup::New(c) => {
                        match self.claim_shared(&self.provider_ids, k, id, remote).await? {
                            Some(first) => {
                                hits.push("provider_id");
                                c.commit(first);
                                slots.push(Slot::Duplicate(first));
                                continue;
                            }
                            None => Some(c),
                        }
                    }
                },
                None => None,
            };
            let fingerprint_claim = match self
                .fingerprints
                .try_claim(fingerprint_key)
                .map_err(Busy::Local)?
            {
                Lookup::Duplicate(first) => Err(first),
                Lookup::New(c) => {
                    match self
                        .claim_shared(&self.fingerprints, fingerprint_key, id, remote)
                        .await?
                    {
                        Some(first) => {
                            c.commit(first);
                            Err(first)
                        }
                        None => Ok(c),
                    }
                }
            };
            match fingerprint_claim {
                Err(first) => {
                    hits.push("fingerprint");
                    // A retry under a new message id: later retries of this id answer alike.
                    if let Some(c) = provider_claim {
                        c.commit(first);
                        if let Some(k) = provider_key {
                            remote.answer_now(self.provider_ids.name(), k, first).await;
                        }
                    }
                    slots.push(Slot::Duplicate(first));
                }
                Ok(c) => {
                    if let Some(k) = provider_key {
                        in_batch.insert(k, i);
                    }
                    in_batch.insert(fingerprint_key, i);
                    let mut alias_claims = Vec::new();
                    let mut aliases: Vec<&String> = intake
                        .alias_message_ids
                        .iter()
                        .filter(|a| Some(a.as_str()) != intake.provider_message_id.as_deref())
                        .collect();
                    aliases.sort();
                    aliases.dedup();
                    for alias in aliases {
                        let ak = provider_key_of(intake, alias);
                        // An alias already answered elsewhere stays with that record.
                        if let Lookup::New(c) =
                            self.provider_ids.try_claim(ak).map_err(Busy::Local)?
                        {
                            match self
                                .claim_shared(&self.provider_ids, ak, id, remote)
                                .await?
                            {
                                Some(first) => c.commit(first),
                                None => alias_claims.push(c),
                            }
                        }
                    }
                    slots.push(Slot::New {
                        id,
                        provider_claim,
                        fingerprint_claim: c,
                        alias_claims,
                        dedupe_key: provider_key.unwrap_or(fingerprint_key),
                    });
                }
            }
        }
        Ok((slots, hits))
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        id: Ulid,
        received_at: DateTime<Utc>,
        intake: Intake,
        identity: Identity,
        text: String,
        truncated: bool,
        dedupe_key: u128,
        ctx: &RequestCtx,
    ) -> (ComplaintRecord, Option<triage::repeat::Mark>, DateTime<Utc>) {
        let mut metadata = intake.metadata;
        if let Some(t) = intake.occurred_at {
            metadata.insert("occurred_at".into(), rfc3339_ms(t));
        }
        if truncated {
            metadata.insert("text_truncated".into(), "true".into());
        }
        let subject = intake
            .subject
            .map(|s| normalize_text(&s))
            .filter(|s| !s.is_empty());
        let triage::Outcome {
            triage,
            language,
            mark,
            first_response_due,
            ..
        } = self.triage.assess(&triage::Input {
            received_at,
            channel: intake.channel.as_str(),
            customer_key: &identity.key,
            thread: intake.thread_id.as_deref(),
            subject: subject.as_deref(),
            text: &text,
            category_hint: intake
                .category_hint
                .as_ref()
                .map(|(c, why)| (c.as_str(), why.as_str())),
            metadata: &metadata,
        });
        // The detected language of the text; the channel's own tag when the text is too short.
        let language = language.map(str::to_string).or(intake.language);
        let record = ComplaintRecord {
            schema: SCHEMA.into(),
            id: id.to_string(),
            received_at: rfc3339_ms(received_at),
            channel: intake.channel,
            provider: intake.provider,
            provider_message_id: intake.provider_message_id,
            customer: Customer {
                key: identity.key,
                phone: identity.phone,
                email: identity.email,
                customer_id: identity.customer_id,
                social: identity.social.map(|s| SocialIdentity {
                    platform: s.platform,
                    account: s.account,
                    id: s.id,
                    handle: s.handle,
                }),
                name: identity.name,
            },
            conversation: Conversation {
                thread_id: intake.thread_id,
                in_reply_to: intake.in_reply_to,
            },
            content: Content {
                subject,
                text,
                language,
                attachments: intake.attachments,
                voice: intake.voice,
            },
            triage,
            dedupe_key: format!("{dedupe_key:032x}"),
            trace_id: ctx.trace_id.clone(),
            metadata,
        };
        (record, mark, first_response_due)
    }

    fn unavailable(&self, message: &str) -> Rejection {
        Rejection::new(Reason::SinkUnavailable, message).retry_after(self.retry_after)
    }
}

/// Same customer, same content: subject, text, and whatever else carries the complaint
/// (attachments, a recording), so two photo-only MMS or two calls are not one complaint.
fn fingerprint(intake: &Intake, identity: &Identity, text: &str) -> u128 {
    let mut extra = String::new();
    for a in &intake.attachments {
        extra.push_str(a.sha256.as_deref().or(a.url.as_deref()).unwrap_or(""));
        extra.push('\u{1}');
    }
    if let Some(v) = &intake.voice {
        for part in [&v.call_id, &v.recording_url, &v.speech, &v.transcription] {
            extra.push_str(part.as_deref().unwrap_or(""));
            extra.push('\u{1}');
        }
    }
    hash_key(&[
        b"fp",
        identity.key.as_bytes(),
        intake.subject.as_deref().unwrap_or("").as_bytes(),
        text.as_bytes(),
        extra.as_bytes(),
    ])
}

fn provider_key(provider: &str, account: Option<&str>, message_id: &str) -> u128 {
    hash_key(&[
        b"pid",
        provider.as_bytes(),
        account.unwrap_or("").as_bytes(),
        message_id.as_bytes(),
    ])
}

fn provider_key_of(intake: &Intake, message_id: &str) -> u128 {
    provider_key(&intake.provider, intake.account.as_deref(), message_id)
}

fn hit(channel: &'static str, kind: &'static str) {
    metrics::counter!(telemetry::DEDUPE_HITS, "channel" => channel, "kind" => kind).increment(1);
}

fn limited(channel: &'static str, l: crate::limits::Limited) -> Rejection {
    tracing::info!(channel, scope = l.scope.as_str(), "rate limited");
    metrics::counter!(telemetry::RATE_LIMITED, "channel" => channel, "scope" => l.scope.as_str())
        .increment(1);
    Rejection::new(
        Reason::RateLimited {
            scope: l.scope.as_str(),
        },
        format!(
            "too many requests ({} limit); retry later",
            l.scope.as_str()
        ),
    )
    .retry_after(l.retry_after)
}

/// The record as the sinks see it: key, headers, JSON payload.
pub fn encode(record: &ComplaintRecord) -> Encoded {
    Encoded {
        key: record.customer.key.clone(),
        headers: vec![
            ("schema", record.schema.clone()),
            ("channel", record.channel.as_str().to_string()),
            ("provider", record.provider.clone()),
            ("trace_id", record.trace_id.clone()),
            ("dedupe_key", record.dedupe_key.clone()),
        ],
        payload: Bytes::from(serde_json::to_vec(record).expect("records serialise")),
    }
}

/// A trace id: the W3C `traceparent` trace-id when the caller sent a valid one, else a new one.
pub fn trace_id(traceparent: Option<&str>) -> String {
    if let Some(tp) = traceparent {
        let parts: Vec<&str> = tp.trim().split('-').collect();
        if parts.len() == 4
            && parts[1].len() == 32
            && parts[1]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            && parts[1] != "00000000000000000000000000000000"
        {
            return parts[1].to_string();
        }
    }
    format!("{:032x}", u128::from(Ulid::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::ChannelKind;
    use crate::sink::memory::MemorySink;

    fn pipeline() -> (Arc<Pipeline>, Arc<MemorySink>) {
        let sink = Arc::new(MemorySink::default());
        (
            Pipeline::new(&Config::default(), sink.clone()).unwrap(),
            sink,
        )
    }

    fn ctx() -> RequestCtx {
        RequestCtx {
            peer: "127.0.0.1".parse().unwrap(),
            channel: "api",
            trace_id: trace_id(None),
        }
    }

    fn intake(id: &str, phone: &str, text: &str) -> Intake {
        let mut i = Intake::new(ChannelKind::Api, "api", text);
        i.provider_message_id = Some(id.into());
        i.account = Some("crm".into());
        i.identity.phone = Some(phone.into());
        i
    }

    #[tokio::test]
    async fn redelivery_and_fingerprint_duplicates_answer_with_the_first_id() {
        let (p, sink) = pipeline();
        let a = p
            .submit(&ctx(), vec![intake("e1", "13800138000", "no signal")])
            .await
            .unwrap();
        assert!(!a[0].duplicate);
        let b = p
            .submit(&ctx(), vec![intake("e1", "13800138000", "no signal")])
            .await
            .unwrap();
        assert_eq!(
            b[0],
            Accepted {
                id: a[0].id,
                duplicate: true,
                first_response_due: None,
            }
        );
        // Same sender, same text, new id (a double submission) within the short window.
        let c = p
            .submit(
                &ctx(),
                vec![intake("e2", "+86 138 0013 8000", "no  signal")],
            )
            .await
            .unwrap();
        assert_eq!(
            c[0],
            Accepted {
                id: a[0].id,
                duplicate: true,
                first_response_due: None,
            }
        );
        // And the new id now answers the same too.
        let d = p
            .submit(&ctx(), vec![intake("e2", "13800138000", "other text")])
            .await
            .unwrap();
        assert_eq!(d[0].id, a[0].id);
        assert_eq!(sink.records.lock().len(), 1);
    }

    #[tokio::test]
    async fn batch_with_repeats_inside_writes_once() {
        let (p, sink) = pipeline();
        let out = p
            .submit(
                &ctx(),
                vec![
                    intake("a", "13800138000", "x"),
                    intake("b", "13900139000", "y"),
                    intake("a", "13800138000", "x"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(
            out[2],
            Accepted {
                id: out[0].id,
                duplicate: true,
                first_response_due: None,
            }
        );
        assert_ne!(out[0].id, out[1].id);
        assert_eq!(sink.records.lock().len(), 2);
    }

    #[tokio::test]
    async fn records_carry_key_headers_and_triage() {
        let (p, sink) = pipeline();
        let out = p
            .submit(&ctx(), vec![intake("e9", "13800138000", "网络很差")])
            .await
            .unwrap();
        let recs = sink.records.lock();
        let e = &recs[0];
        assert_eq!(e.key, "+8613800138000");
        let names: Vec<_> = e.headers.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            ["schema", "channel", "provider", "trace_id", "dedupe_key"]
        );
        let r: ComplaintRecord = serde_json::from_slice(&e.payload).unwrap();
        assert_eq!(r.id, out[0].id.to_string());
        assert_eq!(r.triage.category, "network");
        assert_eq!(r.triage.severity, "general");
        assert!(r.triage.reasons.iter().any(|x| &**x == "network.data"));
        assert_eq!(r.content.text, "网络很差");
        assert_eq!(r.content.language.as_deref(), Some("zh"));
        assert!(out[0].first_response_due.is_some());
    }

    #[tokio::test]
    async fn bad_identity_is_a_typed_rejection_naming_the_index() {
        let (p, _) = pipeline();
        let e = p
            .submit(
                &ctx(),
                vec![intake("a", "13800138000", "x"), intake("b", "12", "y")],
            )
            .await
            .unwrap_err();
        assert_eq!(e.reason, Reason::InvalidEvent);
        assert!(e.message.starts_with("[1] customer"), "{}", e.message);
    }

    /// A sink that fails while `fail` is set.
    #[derive(Default)]
    struct Flaky {
        fail: std::sync::atomic::AtomicBool,
        inner: MemorySink,
    }

    impl Sink for Flaky {
        fn write<'a>(
            &'a self,
            batch: &'a [Encoded],
        ) -> futures_util::future::BoxFuture<
            'a,
            Result<Vec<crate::sink::Landed>, crate::sink::SinkError>,
        > {
            if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                Box::pin(async { Err(crate::sink::SinkError::Spool("disk gone".into())) })
            } else {
                self.inner.write(batch)
            }
        }
        fn health(&self) -> Health {
            self.inner.health()
        }
        fn shutdown(&self) -> futures_util::future::BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    #[tokio::test]
    async fn sink_failure_is_503_with_retry_after_and_the_retry_is_not_a_duplicate() {
        let sink = Arc::new(Flaky::default());
        sink.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        let p = Pipeline::new(&Config::default(), sink.clone()).unwrap();
        let e = p
            .submit(&ctx(), vec![intake("e1", "13800138000", "x")])
            .await
            .unwrap_err();
        assert_eq!(e.reason, Reason::SinkUnavailable);
        assert_eq!(e.reason.status(), hyper::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.retry_after_secs(), Some(5));
        sink.fail.store(false, std::sync::atomic::Ordering::Relaxed);
        let ok = p
            .submit(&ctx(), vec![intake("e1", "13800138000", "x")])
            .await
            .unwrap();
        assert!(!ok[0].duplicate, "nothing was kept, so the retry is new");
        assert_eq!(sink.inner.records.lock().len(), 1);
    }

    #[tokio::test]
    async fn content_only_in_attachments_or_recordings_is_not_one_complaint() {
        let (p, sink) = pipeline();
        for (id, url) in [("mms1", "https://m/1.jpg"), ("mms2", "https://m/2.jpg")] {
            let mut i = intake(id, "13800138000", "");
            i.attachments.push(crate::record::Attachment {
                url: Some(url.into()),
                ..Default::default()
            });
            let a = p.submit(&ctx(), vec![i]).await.unwrap();
            assert!(!a[0].duplicate, "{id}");
        }
        assert_eq!(sink.records.lock().len(), 2);
    }

    #[tokio::test]
    async fn repeated_alias_ids_do_not_wait_on_themselves() {
        let (p, sink) = pipeline();
        let mut i = intake("m1", "13800138000", "joined text");
        i.alias_message_ids = vec!["m1".into(), "m2".into(), "m2".into()];
        let a = tokio::time::timeout(Duration::from_secs(5), p.submit(&ctx(), vec![i]))
            .await
            .expect("no self-wait")
            .unwrap();
        let again = p
            .submit(&ctx(), vec![intake("m2", "13800138000", "part")])
            .await
            .unwrap();
        assert_eq!(again[0].id, a[0].id);
        assert_eq!(sink.records.lock().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_holding_each_others_messages_do_not_deadlock() {
        /// A sink slow enough that both batches hold their first claim at once.
        struct Slow(MemorySink);
        impl Sink for Slow {
            fn write<'a>(
                &'a self,
                batch: &'a [Encoded],
            ) -> futures_util::future::BoxFuture<
                'a,
                Result<Vec<crate::sink::Landed>, crate::sink::SinkError>,
            > {
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    self.0.write(batch).await
                })
            }
            fn health(&self) -> Health {
                self.0.health()
            }
            fn shutdown(&self) -> futures_util::future::BoxFuture<'_, ()> {
                Box::pin(async {})
            }
        }
        let sink = Arc::new(Slow(MemorySink::default()));
        let p = Pipeline::new(&Config::default(), sink.clone()).unwrap();
        for round in 0..20 {
            let a = format!("a{round}");
            let b = format!("b{round}");
            let (p1, p2) = (p.clone(), p.clone());
            let (a1, b1, a2, b2) = (a.clone(), b.clone(), a.clone(), b.clone());
            let x = tokio::spawn(async move {
                p1.submit(
                    &ctx(),
                    vec![
                        intake(&a1, "13800138000", &a1),
                        intake(&b1, "13900139000", &b1),
                    ],
                )
                .await
            });
            let y = tokio::spawn(async move {
                p2.submit(
                    &ctx(),
                    vec![
                        intake(&b2, "13900139000", &b2),
                        intake(&a2, "13800138000", &a2),
                    ],
                )
                .await
            });
            let (x, y) = tokio::time::timeout(Duration::from_secs(5), async { (x.await, y.await) })
                .await
                .expect("no deadlock");
            let (x, y) = (x.unwrap().unwrap(), y.unwrap().unwrap());
            assert_eq!(x[0].id, y[1].id);
            assert_eq!(x[1].id, y[0].id);
        }
        assert_eq!(sink.0.records.lock().len(), 40);
    }

    #[tokio::test]
    async fn over_limit_customers_in_a_batch_are_kept_and_flagged() {
        let mut cfg = Config::default();
        cfg.limits.per_customer = crate::config::RateConfig {
            per_second: 0.001,
            burst: 1,
        };
        let sink = Arc::new(MemorySink::default());
        let p = Pipeline::new(&cfg, sink.clone()).unwrap();
        let out = p
            .submit(
                &ctx(),
                vec![
                    intake("x1", "13800138000", "one"),
                    intake("x2", "13800138000", "two"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(out.len(), 2);
        let payload = sink.records.lock()[1].payload.clone();
        let second: ComplaintRecord = serde_json::from_slice(&payload).unwrap();
        assert_eq!(second.metadata["over_customer_limit"], "true");
        // A single message over the limit is refused.
        let e = p
            .submit(&ctx(), vec![intake("x3", "13800138000", "three")])
            .await
            .unwrap_err();
        assert_eq!(e.reason.status(), hyper::StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn trace_ids_come_from_traceparent_when_valid() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(Some(tp)), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace_id(Some("garbage")).len(), 32);
        assert_ne!(trace_id(None), trace_id(None));
    }
}
