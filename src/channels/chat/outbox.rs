//! Per-session reply outboxes: what the downstream answered, kept so a connected session gets
//! it at once and a resumed session gets what it missed, exactly once (by `seq`).
//!
//! Bounded: replies per session, sessions kept and total reply bytes (idle sessions are evicted
//! oldest first at either cap; connected ones never, and past the byte cap a connected session
//! keeps only its newest reply). A session's `seq` comes from the reply's
//! origin (its Kafka offset + 1) when that is larger than the last one, so every instance reading
//! the same partition numbers a session's replies alike.
//!
//! Hand-written over a plain map rather than a cache crate: entries with a connected session must
//! never be evicted, which size-bounded caches (moka's included) cannot promise.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub seq: u64,
    pub text: Arc<str>,
    pub at: Arc<str>,
    pub reply_id: Option<Arc<str>>,
    pub in_reply_to: Option<Arc<str>>,
}

/// A reply as the source hands it over, before it has a seq.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub text: String,
    pub at: String,
    pub reply_id: Option<String>,
    pub in_reply_to: Option<String>,
    /// Position in the source (Kafka offset + 1), if it has one.
    pub origin_seq: Option<u64>,
}

/// Where a reply goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Session(String),
    Customer(String),
}

/// What became of one reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued for this many sessions.
    Queued(usize),
    /// Already queued (same `reply_id`).
    Duplicate,
    /// Addressed to a customer with no session known here (another instance may have one).
    NoSession,
}

struct Entry {
    replies: VecDeque<Reply>,
    last_seq: watch::Sender<u64>,
    connected: usize,
    touched: Instant,
    customer: Option<String>,
}

struct Inner {
    sessions: HashMap<String, Entry>,
    customers: HashMap<String, HashSet<String>>,
    /// Bytes of replies held across all sessions (`Reply::weight`).
    bytes: usize,
    /// Sessions with no connection (the only ones that may be evicted).
    idle: usize,
}

impl Reply {
    /// What a reply costs in memory, roughly: its strings plus bookkeeping.
    fn weight(&self) -> usize {
        64 + self.text.len()
            + self.at.len()
            + self.reply_id.as_ref().map_or(0, |r| r.len())
            + self.in_reply_to.as_ref().map_or(0, |r| r.len())
    }
}

impl Inner {
    /// The session's entry, created idle if new.
    fn entry(&mut self, session: &str) -> &mut Entry {
        if !self.sessions.contains_key(session) {
            self.idle += 1;
        }
        self.sessions
            .entry(session.to_string())
            .or_insert_with(|| Entry::new(None))
    }
}

pub struct Outboxes {
    inner: Mutex<Inner>,
    max_replies: usize,
    max_sessions: usize,
    max_bytes: usize,
    ttl: Duration,
}

/// A connected session's hold on its outbox: it is not evicted while held.
pub struct Attached {
    outboxes: Arc<Outboxes>,
    session: String,
    pub changed: watch::Receiver<u64>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut g = self.outboxes.inner.lock();
        let mut now_idle = false;
        if let Some(e) = g.sessions.get_mut(&self.session) {
            e.connected = e.connected.saturating_sub(1);
            e.touched = Instant::now();
            now_idle = e.connected == 0;
        }
        if now_idle {
            g.idle += 1;
        }
    }
}

impl Attached {
    /// Replies with `seq > after`, in order.
    pub fn since(&self, after: u64) -> Vec<Reply> {
        let g = self.outboxes.inner.lock();
        g.sessions
            .get(&self.session)
            .map(|e| {
                e.replies
                    .iter()
                    .filter(|r| r.seq > after)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Outboxes {
    pub fn new(
        max_replies: usize,
        max_sessions: usize,
        max_bytes: usize,
        ttl: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                sessions: HashMap::new(),
                customers: HashMap::new(),
                bytes: 0,
                idle: 0,
            }),
            max_replies: max_replies.max(1),
            max_sessions: max_sessions.max(1),
            max_bytes: max_bytes.max(1),
            ttl,
        })
    }

    /// Registers a connected session (and the customer it belongs to) and returns its hold.
    pub fn attach(self: &Arc<Self>, session: &str, customer: Option<&str>) -> Attached {
        let mut g = self.inner.lock();
        self.make_room(&mut g);
        let e = g.entry(session);
        let was_idle = e.connected == 0;
        e.connected += 1;
        e.touched = Instant::now();
        let changed = e.last_seq.subscribe();
        if was_idle {
            g.idle -= 1;
        }
        let e = g.sessions.get_mut(session).expect("just attached");
        if let Some(c) = customer {
            if e.customer.is_none() {
                e.customer = Some(c.to_string());
                g.customers
                    .entry(c.to_string())
                    .or_default()
                    .insert(session.to_string());
            }
        }
        Attached {
            outboxes: self.clone(),
            session: session.to_string(),
            changed,
        }
    }

    /// The highest seq held for a session (0 if none).
    pub fn last_seq(&self, session: &str) -> u64 {
        self.inner
            .lock()
            .sessions
            .get(session)
            .map(|e| *e.last_seq.borrow())
            .unwrap_or(0)
    }

    pub fn push(&self, target: &Target, reply: Incoming) -> Pushed {
        let mut g = self.inner.lock();
        let sessions: Vec<String> = match target {
            Target::Session(s) => vec![s.clone()],
            Target::Customer(c) => match g.customers.get(c) {
                Some(set) if !set.is_empty() => set.iter().cloned().collect(),
                _ => return Pushed::NoSession,
            },
        };
        let text: Arc<str> = reply.text.into();
        let weight = Reply {
            seq: 0,
            text: text.clone(),
            at: reply.at.as_str().into(),
            reply_id: reply.reply_id.as_deref().map(Into::into),
            in_reply_to: reply.in_reply_to.as_deref().map(Into::into),
        }
        .weight();
        let at: Arc<str> = reply.at.into();
        let reply_id: Option<Arc<str>> = reply.reply_id.map(Into::into);
        let in_reply_to: Option<Arc<str>> = reply.in_reply_to.map(Into::into);
        let mut queued = 0;
        for s in sessions {
            if !g.sessions.contains_key(&s) {
                self.make_room(&mut g);
            }
            if g.bytes + weight > self.max_bytes {
                // Down to 90 % of the cap, so the next pushes do not scan again.
                let target = self.max_bytes / 10 * 9;
                self.evict_idle(
                    &mut g,
                    Some(&s),
                    Evict::UntilBytes(target.saturating_sub(weight)),
                );
            }
            g.entry(&s);
            let inner = &mut *g;
            let e = inner.sessions.get_mut(&s).expect("entry exists");
            if let Some(id) = &reply_id {
                if e.replies.iter().any(|r| r.reply_id.as_ref() == Some(id)) {
                    continue;
                }
            }
            let last = *e.last_seq.borrow();
            let seq = reply.origin_seq.filter(|o| *o > last).unwrap_or(last + 1);
            e.replies.push_back(Reply {
                seq,
                text: text.clone(),
                at: at.clone(),
                reply_id: reply_id.clone(),
                in_reply_to: in_reply_to.clone(),
            });
            inner.bytes += weight;
            // Past the byte cap with nothing idle left to evict, this session keeps its newest.
            while e.replies.len() > self.max_replies
                || (inner.bytes > self.max_bytes && e.replies.len() > 1)
            {
                if let Some(old) = e.replies.pop_front() {
                    inner.bytes -= old.weight();
                }
            }
            e.touched = Instant::now();
            e.last_seq.send_replace(seq);
            queued += 1;
        }
        if queued == 0 {
            Pushed::Duplicate
        } else {
            Pushed::Queued(queued)
        }
    }

    /// Forgets idle sessions past the TTL; returns how many sessions remain.
    pub fn sweep(&self) -> usize {
        let mut g = self.inner.lock();
        let ttl = self.ttl;
        let expired: Vec<String> = g
            .sessions
            .iter()
            .filter(|(_, e)| e.connected == 0 && e.touched.elapsed() >= ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            remove(&mut g, &k);
        }
        g.sessions.len()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// At the session cap, evicts the oldest tenth of the idle sessions (amortised: one scan
    /// frees room for many inserts). Connected sessions stay, so a full table of connected
    /// sessions grows past the cap by at most the connection cap.
    fn make_room(&self, g: &mut Inner) {
        if g.sessions.len() < self.max_sessions {
            return;
        }
        self.evict_idle(g, None, Evict::Count((self.max_sessions / 10).max(1)));
    }

    /// Evicts idle sessions, oldest first (never `keep`): a number of them, or until the held
    /// bytes are down to a target. Returns at once when nothing is idle.
    fn evict_idle(&self, g: &mut Inner, keep: Option<&str>, how: Evict) {
        let keep_idle = keep
            .and_then(|k| g.sessions.get(k))
            .is_some_and(|e| e.connected == 0);
        if g.idle <= usize::from(keep_idle) {
            return;
        }
        let mut idle: Vec<(Instant, String)> = g
            .sessions
            .iter()
            .filter(|(k, e)| e.connected == 0 && Some(k.as_str()) != keep)
            .map(|(k, e)| (e.touched, k.clone()))
            .collect();
        idle.sort_unstable();
        let mut n = 0;
        for (_, k) in idle {
            let done = match how {
                Evict::Count(c) => n >= c,
                Evict::UntilBytes(b) => g.bytes <= b,
            };
            if done {
                break;
            }
            remove(g, &k);
            n += 1;
        }
        if n > 0 {
            metrics::counter!(crate::telemetry::CHAT_OUTBOX_EVICTIONS).increment(n as u64);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Evict {
    Count(usize),
    UntilBytes(usize),
}

impl Entry {
    fn new(customer: Option<String>) -> Self {
        Self {
            replies: VecDeque::new(),
            last_seq: watch::Sender::new(0),
            connected: 0,
            touched: Instant::now(),
            customer,
        }
    }
}

fn remove(g: &mut Inner, session: &str) {
    if let Some(e) = g.sessions.remove(session) {
        g.bytes -= e.replies.iter().map(Reply::weight).sum::<usize>();
        if e.connected == 0 {
            g.idle -= 1;
        }
        if let Some(c) = e.customer {
            if let Some(set) = g.customers.get_mut(&c) {
                set.remove(session);
                if set.is_empty() {
                    g.customers.remove(&c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(text: &str, id: Option<&str>, origin: Option<u64>) -> Incoming {
        Incoming {
            text: text.into(),
            at: "2026-11-29T00:00:00.000Z".into(),
            reply_id: id.map(Into::into),
            in_reply_to: None,
            origin_seq: origin,
        }
    }

    #[test]
    fn replies_queue_in_order_with_increasing_seq() {
        let o = Outboxes::new(10, 100, 1 << 20, Duration::from_secs(60));
        let s = Target::Session("S1".into());
        assert_eq!(o.push(&s, reply("a", None, Some(5))), Pushed::Queued(1));
        assert_eq!(o.push(&s, reply("b", None, Some(9))), Pushed::Queued(1));
        // An origin behind the last seq (another partition) still moves forward.
        assert_eq!(o.push(&s, reply("c", None, Some(3))), Pushed::Queued(1));
        assert_eq!(o.push(&s, reply("d", None, None)), Pushed::Queued(1));
        let a = o.attach("S1", None);
        let seqs: Vec<u64> = a.since(0).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![5, 9, 10, 11]);
        let after: Vec<String> = a.since(9).iter().map(|r| r.text.to_string()).collect();
        assert_eq!(after, vec!["c", "d"]);
        assert_eq!(o.last_seq("S1"), 11);
    }

    #[test]
    fn same_reply_id_is_queued_once_and_outbox_is_bounded() {
        let o = Outboxes::new(3, 100, 1 << 20, Duration::from_secs(60));
        let s = Target::Session("S1".into());
        assert_eq!(o.push(&s, reply("a", Some("r1"), None)), Pushed::Queued(1));
        assert_eq!(o.push(&s, reply("a", Some("r1"), None)), Pushed::Duplicate);
        for i in 0..10 {
            o.push(&s, reply(&format!("x{i}"), None, None));
        }
        let a = o.attach("S1", None);
        let all = a.since(0);
        assert_eq!(all.len(), 3);
        assert_eq!(&*all[2].text, "x9");
    }

    #[test]
    fn customer_replies_reach_every_session_of_the_customer() {
        let o = Outboxes::new(10, 100, 1 << 20, Duration::from_secs(60));
        let c = Target::Customer("+8613800138000".into());
        assert_eq!(o.push(&c, reply("x", None, None)), Pushed::NoSession);
        let a = o.attach("S1", Some("+8613800138000"));
        let b = o.attach("S2", Some("+8613800138000"));
        assert_eq!(o.push(&c, reply("hi", None, None)), Pushed::Queued(2));
        assert_eq!(a.since(0).len(), 1);
        assert_eq!(b.since(0).len(), 1);
    }

    #[tokio::test]
    async fn attached_sessions_are_woken_and_never_evicted() {
        let o = Outboxes::new(10, 10, 1 << 20, Duration::from_secs(60));
        let mut a = o.attach("KEEP", None);
        for i in 0..50 {
            o.push(&Target::Session(format!("S{i}")), reply("x", None, None));
        }
        assert!(o.len() <= 11, "{}", o.len());
        o.push(
            &Target::Session("KEEP".into()),
            reply("for you", None, None),
        );
        a.changed.changed().await.unwrap();
        assert_eq!(a.since(0).len(), 1);
    }

    #[test]
    fn total_bytes_are_bounded_idle_sessions_go_first() {
        let o = Outboxes::new(100, 1000, 1000, Duration::from_secs(60));
        assert_eq!(o.inner.lock().idle, 0);
        let held = o.attach("HELD", None);
        for i in 0..20 {
            o.push(
                &Target::Session(format!("IDLE{i}")),
                reply(&"x".repeat(100), None, None),
            );
        }
        assert!(o.inner.lock().bytes <= 1000);
        for _ in 0..30 {
            o.push(
                &Target::Session("HELD".into()),
                reply(&"y".repeat(100), None, None),
            );
        }
        let g = o.inner.lock();
        assert!(g.bytes <= 1000, "{}", g.bytes);
        drop(g);
        assert!(!held.since(0).is_empty());
        // The idle count matches the table: nothing leaked either way.
        drop(held);
        let g = o.inner.lock();
        let idle = g.sessions.values().filter(|e| e.connected == 0).count();
        assert_eq!(g.idle, idle);
        let bytes: usize = g
            .sessions
            .values()
            .flat_map(|e| e.replies.iter())
            .map(Reply::weight)
            .sum();
        assert_eq!(g.bytes, bytes);
    }

    #[test]
    fn idle_sessions_expire_after_the_ttl_but_connected_ones_stay() {
        let o = Outboxes::new(10, 100, 1 << 20, Duration::ZERO);
        o.push(&Target::Session("IDLE".into()), reply("x", None, None));
        let _held = o.attach("HELD", Some("c"));
        assert_eq!(o.sweep(), 1);
        assert_eq!(o.last_seq("IDLE"), 0);
    }
}
