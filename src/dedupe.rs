//! Deduplication windows: 128-bit hashes of keys (never the strings), each mapped to the record id
//! that answered it first.
//!
//! Hand-written rather than moka: we need (a) the clock to be tokio's, so window expiry is tested
//! with paused time, (b) an "in flight" state so a redelivery arriving while the first delivery is
//! still being written waits for it and answers with the same id instead of writing twice, and
//! (c) the first claim to be released when its write fails, so the sender's retry goes through.
//!
//! Memory is bounded: each window holds at most `max_entries` keys; past that the oldest are
//! evicted early (counted). Entries expire in insertion order, which is also expiry order because
//! a window has one fixed length.

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;

/// Keys are already SHA-256 derived, so SipHash over them is wasted work; foldhash, seeded per
/// process, is enough.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use ulid::Ulid;

const SHARDS: usize = 16;

/// Stable 128-bit hash of a sequence of parts (length-prefixed so `("ab","c")` ≠ `("a","bc")`).
pub fn hash_key(parts: &[&[u8]]) -> u128 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    u128::from_be_bytes(b)
}

enum Entry {
    InFlight {
        generation: u64,
        done: watch::Receiver<Option<Ulid>>,
    },
    Done {
        generation: u64,
        expires: Instant,
        id: Ulid,
    },
}

impl Entry {
    fn generation(&self) -> u64 {
        match self {
            Entry::InFlight { generation, .. } | Entry::Done { generation, .. } => *generation,
        }
    }
}

#[derive(Default)]
struct Shard {
    map: HashMap<u128, Entry>,
    /// (expiry, key, generation) in insertion order; stale rows (key re-claimed or released) are
    /// recognised by generation and skipped.
    order: VecDeque<(Instant, u128, u64)>,
}

struct Inner {
    name: &'static str,
    window: Duration,
    max_per_shard: usize,
    shards: Vec<Mutex<Shard>>,
    next_generation: std::sync::atomic::AtomicU64,
}

/// One dedupe window (e.g. provider message ids for 8 days, or content fingerprints for 2 min).
#[derive(Clone)]
pub struct Window {
    inner: Arc<Inner>,
}

/// Result of looking a key up.
pub enum Lookup {
    /// First time seen: the caller writes the record and then commits (or drops to release).
    New(Claim),
    /// Seen within the window: answer with this record id.
    Duplicate(Ulid),
}

/// The right to write the record for a key. Dropping it without `commit` releases the key, and
/// anyone waiting on it tries again.
pub struct Claim {
    inner: Arc<Inner>,
    key: u128,
    generation: u64,
    tx: Option<watch::Sender<Option<Ulid>>>,
}

impl Window {
    pub fn new(name: &'static str, window: Duration, max_entries: usize) -> Self {
        let max_per_shard = (max_entries / SHARDS).max(1);
        Self {
            inner: Arc::new(Inner {
                name,
                window,
                max_per_shard,
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                next_generation: std::sync::atomic::AtomicU64::new(1),
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    /// How long an answered key is remembered.
    pub fn length(&self) -> Duration {
        self.inner.window
    }

    /// Looks `key` up; if another request holds it in flight, waits for that one's outcome.
    pub async fn claim(&self, key: u128) -> Lookup {
        loop {
            let mut waiting = match self.try_claim(key) {
                Ok(lookup) => return lookup,
                Err(rx) => rx,
            };
            // Wait for the holder to commit (Some(id)) or release (sender dropped).
            let outcome = loop {
                if let Some(id) = *waiting.borrow_and_update() {
                    break Some(id);
                }
                if waiting.changed().await.is_err() {
                    break *waiting.borrow();
                }
            };
            if let Some(id) = outcome {
                return Lookup::Duplicate(id);
            }
        }
    }

    /// The record id a key answered with, if it is within the window; claims nothing.
    pub fn peek(&self, key: u128) -> Option<Ulid> {
        let now = Instant::now();
        match self.inner.shard(key).lock().map.get(&key) {
            Some(Entry::Done { expires, id, .. }) if *expires > now => Some(*id),
            _ => None,
        }
    }

    /// Looks `key` up without waiting: `Err` carries the in-flight holder's outcome channel.
    pub fn try_claim(&self, key: u128) -> Result<Lookup, watch::Receiver<Option<Ulid>>> {
        let now = Instant::now();
        let mut shard = self.inner.shard(key).lock();
        match shard.map.get(&key) {
            Some(Entry::Done { expires, id, .. }) if *expires > now => {
                return Ok(Lookup::Duplicate(*id));
            }
            Some(Entry::InFlight { done, .. }) => return Err(done.clone()),
            _ => {}
        }
        let generation = self
            .inner
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        shard.map.insert(
            key,
            Entry::InFlight {
                generation,
                done: rx,
            },
        );
        Ok(Lookup::New(Claim {
            inner: self.inner.clone(),
            key,
            generation,
            tx: Some(tx),
        }))
    }

    /// Drops expired entries; returns how many entries remain.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut total = 0;
        for shard in &self.inner.shards {
            let mut s = shard.lock();
            s.expire(now);
            total += s.map.len();
        }
        total
    }

    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| s.lock().map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn shard(&self, key: u128) -> &Mutex<Shard> {
        &self.shards[(key as usize) % SHARDS]
    }
}

impl Shard {
    fn expire(&mut self, now: Instant) {
        while let Some(&(expires, key, generation)) = self.order.front() {
            if expires > now {
                break;
            }
            self.order.pop_front();
            self.remove_if_generation(key, generation, true);
        }
    }

    fn remove_if_generation(&mut self, key: u128, generation: u64, only_done: bool) -> bool {
        let matches = match self.map.get(&key) {
            Some(e @ Entry::Done { .. }) => e.generation() == generation,
            Some(e @ Entry::InFlight { .. }) => !only_done && e.generation() == generation,
            None => false,
        };
        if matches {
            self.map.remove(&key);
        }
        matches
    }
}

impl Claim {
    /// Records that `id` answered this key; later lookups within the window get `Duplicate(id)`.
    pub fn commit(mut self, id: Ulid) {
        let now = Instant::now();
        let expires = now + self.inner.window;
        {
            let mut shard = self.inner.shard(self.key).lock();
            shard.expire(now);
            shard.map.insert(
                self.key,
                Entry::Done {
                    generation: self.generation,
                    expires,
                    id,
                },
            );
            shard.order.push_back((expires, self.key, self.generation));
            while shard.order.len() > self.inner.max_per_shard {
                if let Some((_, key, generation)) = shard.order.pop_front() {
                    if shard.remove_if_generation(key, generation, true) {
                        metrics::counter!(crate::telemetry::DEDUPE_EVICTIONS, "window" => self.inner.name)
                            .increment(1);
                    }
                }
            }
        }
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(id));
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.tx.is_some() {
            // Released without a record: forget the key so the sender's retry is not a duplicate.
            self.inner.shard(self.key).lock().remove_if_generation(
                self.key,
                self.generation,
                false,
            );
            // Dropping `tx` wakes the waiters, who then claim again.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Ulid {
        Ulid::from(n)
    }

    #[test]
    fn hash_is_length_prefixed() {
        assert_ne!(hash_key(&[b"ab", b"c"]), hash_key(&[b"a", b"bc"]));
        assert_eq!(hash_key(&[b"api", b"x"]), hash_key(&[b"api", b"x"]));
    }

    #[tokio::test(start_paused = true)]
    async fn window_expires_after_its_length() {
        let w = Window::new("provider_id", Duration::from_secs(60), 1 << 16);
        let k = hash_key(&[b"k"]);
        match w.claim(k).await {
            Lookup::New(c) => c.commit(id(1)),
            Lookup::Duplicate(_) => panic!("fresh key"),
        }
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(matches!(w.claim(k).await, Lookup::Duplicate(x) if x == id(1)));
        tokio::time::advance(Duration::from_secs(2)).await;
        match w.claim(k).await {
            Lookup::New(c) => c.commit(id(2)),
            Lookup::Duplicate(_) => panic!("expired key must be new again"),
        }
        assert!(matches!(w.claim(k).await, Lookup::Duplicate(x) if x == id(2)));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(w.sweep(), 0, "sweep drops expired entries");
    }

    #[tokio::test(start_paused = true)]
    async fn released_claim_lets_the_retry_through_and_waiters_follow_the_winner() {
        let w = Window::new("provider_id", Duration::from_secs(60), 1 << 16);
        let k = hash_key(&[b"k"]);
        let Lookup::New(first) = w.claim(k).await else {
            panic!()
        };
        let w2 = w.clone();
        let waiter = tokio::spawn(async move {
            match w2.claim(k).await {
                Lookup::New(c) => {
                    c.commit(id(7));
                    None
                }
                Lookup::Duplicate(x) => Some(x),
            }
        });
        tokio::task::yield_now().await;
        drop(first); // the first write failed
        assert_eq!(waiter.await.unwrap(), None, "waiter becomes the writer");
        assert!(matches!(w.claim(k).await, Lookup::Duplicate(x) if x == id(7)));

        let k2 = hash_key(&[b"k2"]);
        let Lookup::New(c) = w.claim(k2).await else {
            panic!()
        };
        let w3 = w.clone();
        let waiter = tokio::spawn(async move {
            match w3.claim(k2).await {
                Lookup::Duplicate(x) => Some(x),
                Lookup::New(_) => None,
            }
        });
        tokio::task::yield_now().await;
        c.commit(id(9));
        assert_eq!(waiter.await.unwrap(), Some(id(9)));
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_by_max_entries() {
        let w = Window::new("fingerprint", Duration::from_secs(3600), SHARDS * 4);
        for n in 0..10_000u32 {
            if let Lookup::New(c) = w.claim(hash_key(&[&n.to_le_bytes()])).await {
                c.commit(id(n as u128));
            }
        }
        assert!(w.len() <= SHARDS * 4, "len {}", w.len());
        // The newest survive, the oldest were evicted.
        assert!(matches!(
            w.claim(hash_key(&[&9_999u32.to_le_bytes()])).await,
            Lookup::Duplicate(_)
        ));
    }
}
