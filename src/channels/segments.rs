//! Long SMS that a bridge delivers in parts (Vonage `concat-*`, SMPP `sar-*`): the parts are
//! joined into one complaint before it enters the pipeline.
//!
//! Nothing is acknowledged before it is durable, so a part's request is held open until its
//! message is complete (or `sms.concat_wait_ms` passes), the joined record is written, and then
//! every part's request is answered with the same record id. If a part never arrives, what came
//! is emitted after the wait, flagged in `metadata.segments_missing`. A redelivered part of a
//! message already emitted is a duplicate of that record (the parts' ids are its aliases).

use crate::error::{Reason, Rejection};
use crate::pipeline::{Accepted, Pipeline, RequestCtx};
use crate::record::Intake;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// One part of a long message.
pub struct Part {
    /// Identifies the long message: the bridge's reference number, scoped by sender.
    pub reference: String,
    pub total: u8,
    /// 1-based.
    pub index: u8,
    /// The intake this part alone would be (identity, ids, its slice of the text).
    pub intake: Intake,
}

type Waiter = oneshot::Sender<Result<Accepted, Rejection>>;

struct Pending {
    /// Tells this group from a later one under the same key (for the wait timer).
    generation: u64,
    total: u8,
    parts: BTreeMap<u8, Intake>,
    waiters: Vec<Waiter>,
    ctx: RequestCtx,
}

struct Inner {
    pipeline: Arc<Pipeline>,
    wait: Duration,
    max_pending: usize,
    pending: Mutex<HashMap<String, Pending>>,
    next_generation: std::sync::atomic::AtomicU64,
}

#[derive(Clone)]
pub struct Assembler {
    inner: Arc<Inner>,
}

impl Assembler {
    pub fn new(pipeline: Arc<Pipeline>, wait: Duration, max_pending: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                pipeline,
                wait,
                max_pending,
                pending: Mutex::new(HashMap::new()),
                next_generation: std::sync::atomic::AtomicU64::new(1),
            }),
        }
    }

    /// Submits one part; resolves when the whole message (or what came of it) is durable.
    pub async fn submit(&self, ctx: &RequestCtx, part: Part) -> Result<Accepted, Rejection> {
        let inner = &self.inner;
        let i = &part.intake;
        if let Some(mid) = i.provider_message_id.as_deref() {
            if let Some(id) = inner.pipeline.seen(&i.provider, i.account.as_deref(), mid) {
                return Ok(Accepted {
                    id,
                    duplicate: true,
                    first_response_due: None,
                });
            }
        }
        if part.total <= 1 || part.index == 0 || part.index > part.total {
            return one(inner.pipeline.submit(ctx, vec![part.intake]).await);
        }
        let key = format!(
            "{}\u{0}{}\u{0}{}\u{0}{}",
            i.provider,
            i.account.as_deref().unwrap_or(""),
            sender(i),
            part.reference
        );
        let (tx, rx) = oneshot::channel();
        enum Next {
            Alone(Box<Intake>),
            Wait {
                complete: Option<Pending>,
                /// Set when this part opened the group: the group's generation, for the timer.
                opened: Option<u64>,
            },
        }
        let next = {
            let mut pending = inner.pending.lock();
            if !pending.contains_key(&key) && pending.len() >= inner.max_pending {
                // Too many open messages: this part goes alone rather than grow memory.
                let mut intake = part.intake;
                intake
                    .metadata
                    .insert("segments".into(), format!("{}/{}", part.index, part.total));
                Next::Alone(Box::new(intake))
            } else {
                let opened = !pending.contains_key(&key);
                let generation = inner
                    .next_generation
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let entry = pending.entry(key.clone()).or_insert_with(|| Pending {
                    generation,
                    total: part.total,
                    parts: BTreeMap::new(),
                    waiters: Vec::new(),
                    ctx: ctx.clone(),
                });
                entry.parts.entry(part.index).or_insert(part.intake);
                entry.waiters.push(tx);
                let generation = entry.generation;
                let complete = if entry.parts.len() >= entry.total as usize {
                    pending.remove(&key)
                } else {
                    None
                };
                Next::Wait {
                    complete,
                    opened: opened.then_some(generation),
                }
            }
        };
        let (complete, opened) = match next {
            Next::Alone(intake) => return one(inner.pipeline.submit(ctx, vec![*intake]).await),
            Next::Wait { complete, opened } => (complete, opened),
        };
        if let Some(p) = complete {
            emit(inner.pipeline.clone(), p).await;
        } else if let Some(generation) = opened {
            let inner = self.inner.clone();
            tokio::spawn(async move {
                tokio::time::sleep(inner.wait).await;
                let expired = {
                    let mut pending = inner.pending.lock();
                    // Only the group this timer was started for (not a later one, same key).
                    match pending.get(&key) {
                        Some(p) if p.generation == generation => pending.remove(&key),
                        _ => None,
                    }
                };
                if let Some(p) = expired {
                    emit(inner.pipeline.clone(), p).await;
                }
            });
        }
        rx.await.unwrap_or_else(|_| {
            Err(Rejection::new(
                Reason::Internal,
                "long message assembly was interrupted",
            ))
        })
    }
}

fn one(r: Result<Vec<Accepted>, Rejection>) -> Result<Accepted, Rejection> {
    r.map(|v| v[0])
}

/// The sender, for grouping parts: the phone, else the provider-scoped sender id.
fn sender(i: &Intake) -> &str {
    i.identity
        .phone
        .as_deref()
        .or(i.identity.social.as_ref().map(|s| s.id.as_str()))
        .unwrap_or("")
}

/// Joins the parts that came (in order), writes the record, answers every waiting part.
async fn emit(pipeline: Arc<Pipeline>, mut p: Pending) {
    // Parts a record already answers (a redelivery that raced the first write) are not written
    // again; if every part is answered, the waiters get that record.
    let mut answered = None;
    p.parts.retain(|_, i| {
        let seen = i
            .provider_message_id
            .as_deref()
            .and_then(|m| pipeline.seen(&i.provider, i.account.as_deref(), m));
        if seen.is_some() {
            answered = seen;
        }
        seen.is_none()
    });
    if p.parts.is_empty() {
        let id = answered.expect("a part was answered");
        for w in p.waiters {
            let _ = w.send(Ok(Accepted {
                id,
                duplicate: true,
                first_response_due: None,
            }));
        }
        return;
    }
    let got = p.parts.len();
    let missing: Vec<String> = (1..=p.total)
        .filter(|n| !p.parts.contains_key(n))
        .map(|n| n.to_string())
        .collect();
    let mut parts = p.parts.into_values();
    let mut intake = parts.next().expect("at least one part");
    for next in parts {
        intake.text.push_str(&next.text);
        if let Some(id) = next.provider_message_id {
            intake.alias_message_ids.push(id);
        }
        intake.attachments.extend(next.attachments);
    }
    intake
        .metadata
        .insert("segments".into(), format!("{got}/{}", p.total));
    if !missing.is_empty() {
        tracing::warn!(
            channel = p.ctx.channel,
            got,
            total = p.total,
            "long SMS incomplete after the wait; emitting what came"
        );
        intake
            .metadata
            .insert("segments_missing".into(), missing.join(","));
    }
    let result = one(pipeline.submit(&p.ctx, vec![intake]).await).map(|a| Accepted {
        id: a.id,
        duplicate: a.duplicate,
        first_response_due: a.first_response_due,
    });
    for w in p.waiters {
        let _ = w.send(result.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::record::ChannelKind;
    use crate::sink::memory::MemorySink;

    fn ctx() -> RequestCtx {
        RequestCtx {
            peer: "127.0.0.1".parse().unwrap(),
            channel: "vonage",
            trace_id: crate::pipeline::trace_id(None),
        }
    }

    fn part(id: &str, index: u8, total: u8, text: &str) -> Part {
        let mut i = Intake::new(ChannelKind::Sms, "vonage", text);
        i.provider_message_id = Some(id.into());
        i.identity.phone = Some("+447911123456".into());
        Part {
            reference: "ref-9".into(),
            total,
            index,
            intake: i,
        }
    }

    fn setup(wait_ms: u64) -> (Assembler, Arc<MemorySink>) {
        let sink = Arc::new(MemorySink::default());
        let p = Pipeline::new(&Config::default(), sink.clone()).unwrap();
        (Assembler::new(p, Duration::from_millis(wait_ms), 100), sink)
    }

    fn texts(sink: &MemorySink) -> Vec<serde_json::Value> {
        sink.records
            .lock()
            .iter()
            .map(|e| serde_json::from_slice(&e.payload).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn parts_out_of_order_become_one_record() {
        let (a, sink) = setup(60_000);
        let a2 = a.clone();
        let third = tokio::spawn(async move { a2.submit(&ctx(), part("m3", 3, 3, "三。")).await });
        let a3 = a.clone();
        let first =
            tokio::spawn(async move { a3.submit(&ctx(), part("m1", 1, 3, "宽带断网，")).await });
        tokio::task::yield_now().await;
        let second = a.submit(&ctx(), part("m2", 2, 3, "已经第")).await.unwrap();
        let first = first.await.unwrap().unwrap();
        let third = third.await.unwrap().unwrap();
        assert_eq!(first.id, second.id);
        assert_eq!(third.id, second.id);
        let recs = texts(&sink);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0]["content"]["text"], "宽带断网，已经第三。");
        assert_eq!(recs[0]["metadata"]["segments"], "3/3");
        // A redelivered part is a duplicate of the joined record.
        let again = a.submit(&ctx(), part("m2", 2, 3, "已经第")).await.unwrap();
        assert_eq!(
            again,
            Accepted {
                id: first.id,
                duplicate: true,
                first_response_due: None,
            }
        );
        assert_eq!(texts(&sink).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_part_is_flagged_after_the_wait_and_nothing_is_lost() {
        let (a, sink) = setup(5_000);
        let r = a
            .submit(&ctx(), part("m1", 1, 3, "part one "))
            .await
            .unwrap();
        // (paused time: the wait elapses as soon as everything is idle)
        let recs = texts(&sink);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0]["id"], r.id.to_string());
        assert_eq!(recs[0]["metadata"]["segments"], "1/3");
        assert_eq!(recs[0]["metadata"]["segments_missing"], "2,3");
    }
}
