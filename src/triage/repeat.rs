//! Repeat complaints: how many separate complaints a customer made about the same matter within
//! the window, bounded in memory (a quick_cache cache: a size cap with S3-FIFO eviction; a
//! history's entries older than the window are ignored and dropped on the next commit, so an idle
//! customer costs only its slot until evicted). quick_cache rather than moka: moka's bookkeeping
//! per insert was about 4% of the gateway's CPU under load, quick_cache's is a fraction of it.
//!
//! A complaint is *counted* only once it is durable (`commit`), so a sender's retry after a
//! failed write is not a repeat. Messages in the same conversation, or closer than the minimum
//! gap to the previous counted complaint, are the same contact: they share its count and do not
//! add to it (a chat session's ten messages are one complaint).

use super::rules::RepeatPolicy;
use quick_cache::sync::{Cache, DefaultLifecycle, EntryAction, EntryResult};
use quick_cache::UnitWeighter;

/// Most past complaints remembered per customer; also the highest repeat step.
pub const DEPTH: usize = 8;

#[derive(Debug, Clone, Copy, Default)]
struct History {
    len: u8,
    /// Oldest first: when each counted complaint arrived (ms since the epoch) and its thread.
    at: [i64; DEPTH],
    thread: [u64; DEPTH],
}

/// What `assess` found, to `commit` once the record is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    key: u64,
    at: i64,
    thread: u64,
}

/// The repeat count of one complaint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// Separate complaints within the window, this one included.
    pub count: u32,
    /// Set when this complaint is a new contact (to be counted on commit).
    pub mark: Option<Mark>,
}

pub struct Repeats {
    cache: Cache<u64, History, UnitWeighter, foldhash::fast::RandomState>,
}

impl Repeats {
    /// `max_customers` bounds memory (about 200 bytes each). Past that the least useful histories
    /// are evicted; expiry needs no timer, since every read ignores entries outside the window.
    pub fn new(max_customers: u64) -> Self {
        let cap = usize::try_from(max_customers).unwrap_or(usize::MAX).max(1);
        Self {
            cache: Cache::with(
                cap,
                cap as u64,
                UnitWeighter,
                // Keys are already seeded hashes; re-hashing them with SipHash is wasted work.
                foldhash::fast::RandomState::default(),
                DefaultLifecycle::default(),
            ),
        }
    }

    /// Counts this complaint against the customer's history (claims nothing).
    /// `key` is the customer (and category) hash, `thread` a hash of the conversation (0: none).
    pub fn assess(&self, p: &RepeatPolicy, key: u64, now_ms: i64, thread: u64) -> Count {
        let h = self.cache.get(&key).unwrap_or_default();
        let since = now_ms - p.window_ms;
        let mut prior = 0u32;
        let mut same_contact = false;
        let mut last = i64::MIN;
        for i in 0..h.len as usize {
            if h.at[i] <= since {
                continue;
            }
            prior += 1;
            last = last.max(h.at[i]);
            if thread != 0 && h.thread[i] == thread {
                same_contact = true;
            }
        }
        if prior > 0 && now_ms - last < p.min_gap_ms {
            same_contact = true;
        }
        if same_contact {
            return Count {
                count: prior,
                mark: None,
            };
        }
        Count {
            count: prior + 1,
            mark: Some(Mark {
                key,
                at: now_ms,
                thread,
            }),
        }
    }

    /// Counts a durable complaint.
    pub fn commit(&self, p: &RepeatPolicy, m: Mark) {
        let since = m.at - p.window_ms;
        let update = |old: &History| {
            let mut h = History::default();
            for i in 0..old.len as usize {
                if old.at[i] > since {
                    push(&mut h, old.at[i], old.thread[i]);
                }
            }
            push(&mut h, m.at, m.thread);
            h
        };
        // Atomic per key: a concurrent commit for the same customer waits for this one.
        match self.cache.entry(&m.key, None, |_, h| {
            *h = update(h);
            EntryAction::Retain(())
        }) {
            EntryResult::Vacant(guard) => {
                let _ = guard.insert(update(&History::default()));
            }
            EntryResult::Retained(()) | EntryResult::Removed(..) | EntryResult::Timeout => {}
            EntryResult::Replaced(guard, old) => {
                let _ = guard.insert(update(&old));
            }
        }
    }

    /// Customers remembered (for the gauge).
    pub fn len(&self) -> u64 {
        self.cache.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn push(h: &mut History, at: i64, thread: u64) {
    if h.len as usize == DEPTH {
        h.at.copy_within(1.., 0);
        h.thread.copy_within(1.., 0);
        h.len -= 1;
    }
    h.at[h.len as usize] = at;
    h.thread[h.len as usize] = thread;
    h.len += 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::triage::rules::Severity;

    fn policy() -> RepeatPolicy {
        RepeatPolicy {
            window_ms: 7 * 86_400_000,
            min_gap_ms: 3_600_000,
            same_category: true,
            steps: vec![(2, Severity::Complex), (3, Severity::Major3)],
        }
    }

    const H: i64 = 3_600_000;
    const D: i64 = 24 * H;

    fn complain(r: &Repeats, p: &RepeatPolicy, at: i64, thread: u64) -> u32 {
        let c = r.assess(p, 42, at, thread);
        if let Some(m) = c.mark {
            r.commit(p, m);
        }
        c.count
    }

    #[test]
    fn counts_separate_complaints_in_the_window() {
        let r = Repeats::new(1000);
        let p = policy();
        let t0 = 1_800_000_000_000;
        assert_eq!(complain(&r, &p, t0, 0), 1);
        assert_eq!(
            complain(&r, &p, t0 + 10 * 60_000, 0),
            1,
            "10 minutes later: same contact"
        );
        assert_eq!(complain(&r, &p, t0 + D, 0), 2);
        assert_eq!(p.severity_for(2), Some(Severity::Complex));
        assert_eq!(complain(&r, &p, t0 + 2 * D, 0), 3);
        assert_eq!(p.severity_for(3), Some(Severity::Major3));
        // Seven days and an hour after the first, the first has left the window.
        assert_eq!(complain(&r, &p, t0 + 7 * D + H, 0), 3);
        assert_eq!(complain(&r, &p, t0 + 30 * D, 0), 1);
    }

    #[test]
    fn same_conversation_is_one_complaint() {
        let r = Repeats::new(1000);
        let p = policy();
        let t0 = 1_800_000_000_000;
        assert_eq!(complain(&r, &p, t0, 7), 1);
        assert_eq!(
            complain(&r, &p, t0 + 5 * H, 7),
            1,
            "same thread hours later"
        );
        assert_eq!(complain(&r, &p, t0 + 6 * H, 8), 2, "another thread");
    }

    #[test]
    fn nothing_counts_until_committed() {
        let r = Repeats::new(1000);
        let p = policy();
        let t0 = 1_800_000_000_000;
        assert_eq!(r.assess(&p, 42, t0, 0).count, 1);
        assert_eq!(
            r.assess(&p, 42, t0 + D, 0).count,
            1,
            "the first was never durable"
        );
    }

    #[test]
    fn history_is_capped() {
        let r = Repeats::new(1000);
        let mut p = policy();
        p.window_ms = 365 * D;
        let t0 = 1_800_000_000_000;
        for i in 0..20 {
            complain(&r, &p, t0 + i * D, 0);
        }
        assert_eq!(r.assess(&p, 42, t0 + 21 * D, 0).count, DEPTH as u32 + 1);
    }
}
