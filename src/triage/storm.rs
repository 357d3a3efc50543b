//! Storm detection: many distinct customers reporting the same category with overlapping key
//! terms (and the same area, when the channel gives one) within a sliding window become one
//! incident, and every complaint that joins it carries the incident id.
//!
//! A bucket per (category, area) remembers, for the window, each distinct customer once with the
//! key terms (bits of the rules that fired) they used, and per term how many customers used it.
//! A term used by `min_customers` customers is *hot*; the first hot term opens an incident, and
//! later complaints in the bucket sharing a term with it join. The incident ends when nobody has
//! joined it for a whole window. Every operation is O(terms) under one short lock, and both the
//! buckets and the customers per bucket are capped, so a storm never slows intake: past the cap
//! a bucket is certainly storming and new customers simply join without being remembered.

use parking_lot::Mutex;
use std::collections::VecDeque;

/// Keys are already seeded hashes (`Triager::hash`), so a fast hasher is enough.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::sync::Arc;
use ulid::Ulid;

/// Key-term bits are rule indexes modulo this (bit `TERMS - 1` is the channel's own category).
pub const TERMS: u32 = 128;
/// The bit standing for "the channel said so" (an IVR menu choice).
pub const HINT_BIT: u32 = TERMS - 1;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_buckets: usize,
    pub max_customers_per_bucket: usize,
}

struct Incident {
    id: Arc<str>,
    terms: u128,
    last_join_ms: i64,
}

#[derive(Default)]
struct Bucket {
    customers: HashMap<u64, (i64, u128)>,
    order: VecDeque<(i64, u64)>,
    counts: Vec<u32>,
    incident: Option<Incident>,
    last_ms: i64,
}

impl Bucket {
    fn expire(&mut self, since: i64) {
        while let Some(&(t, c)) = self.order.front() {
            if t > since {
                break;
            }
            self.order.pop_front();
            if let Some(&(last, mask)) = self.customers.get(&c) {
                if last == t {
                    self.customers.remove(&c);
                    for_bits(mask, |b| self.counts[b] = self.counts[b].saturating_sub(1));
                }
            }
        }
    }
}

fn for_bits(mut m: u128, mut f: impl FnMut(usize)) {
    while m != 0 {
        f(m.trailing_zeros() as usize);
        m &= m - 1;
    }
}

/// One complaint as the detector sees it.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub now_ms: i64,
    pub category: u8,
    pub area: u64,
    pub customer: u64,
    pub terms: u128,
}

/// What joining did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    No,
    /// Joined a running incident.
    Existing(Arc<str>),
    /// This complaint opened a new incident.
    Opened(Arc<str>),
}

pub struct Storms {
    limits: Limits,
    buckets: Mutex<HashMap<(u8, u64), Bucket>>,
}

impl Storms {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buckets: Mutex::new(HashMap::default()),
        }
    }

    /// Registers a complaint; `window_ms` and `min_customers` come from the current rules.
    pub fn observe(&self, r: Report, window_ms: i64, min_customers: u32) -> Joined {
        if r.terms == 0 {
            return Joined::No;
        }
        let since = r.now_ms - window_ms;
        let mut buckets = self.buckets.lock();
        if !buckets.contains_key(&(r.category, r.area)) && buckets.len() >= self.limits.max_buckets
        {
            // Make room: forget buckets that went quiet; if none did, do not track this one.
            buckets.retain(|_, b| b.last_ms > since || b.incident.is_some());
            if buckets.len() >= self.limits.max_buckets {
                metrics::counter!(crate::telemetry::TRIAGE_STORM_UNTRACKED).increment(1);
                return Joined::No;
            }
        }
        let b = buckets.entry((r.category, r.area)).or_default();
        if b.counts.is_empty() {
            b.counts = vec![0; TERMS as usize];
        }
        b.last_ms = b.last_ms.max(r.now_ms);
        b.expire(since);
        if let Some(i) = &b.incident {
            if i.last_join_ms <= since {
                b.incident = None;
                metrics::gauge!(crate::telemetry::TRIAGE_INCIDENTS_ACTIVE).decrement(1.0);
            }
        }
        let fresh = match b.customers.get(&r.customer).copied() {
            Some((_, old)) => r.terms & !old,
            None if b.customers.len() < self.limits.max_customers_per_bucket => r.terms,
            None => 0,
        };
        if b.customers.contains_key(&r.customer)
            || b.customers.len() < self.limits.max_customers_per_bucket
        {
            let e = b.customers.entry(r.customer).or_insert((r.now_ms, 0));
            e.0 = r.now_ms;
            e.1 |= r.terms;
            b.order.push_back((r.now_ms, r.customer));
            for_bits(fresh, |t| b.counts[t] += 1);
        }
        let mut hot = 0u128;
        for_bits(r.terms, |t| {
            if b.counts[t] >= min_customers {
                hot |= 1 << t;
            }
        });
        let full = b.customers.len() >= self.limits.max_customers_per_bucket;
        match &mut b.incident {
            Some(i) if r.terms & (i.terms | hot) != 0 || full => {
                i.terms |= hot;
                i.last_join_ms = r.now_ms;
                Joined::Existing(i.id.clone())
            }
            Some(_) => Joined::No,
            None if hot != 0 => {
                let start = u64::try_from(r.now_ms).unwrap_or(0);
                let id: Arc<str> = format!("INC-{}", Ulid::from_parts(start, rand_bits()))
                    .as_str()
                    .into();
                b.incident = Some(Incident {
                    id: id.clone(),
                    terms: hot,
                    last_join_ms: r.now_ms,
                });
                metrics::gauge!(crate::telemetry::TRIAGE_INCIDENTS_ACTIVE).increment(1.0);
                metrics::counter!(crate::telemetry::TRIAGE_INCIDENTS).increment(1);
                Joined::Opened(id)
            }
            None => Joined::No,
        }
    }

    /// Expires old reports, ends quiet incidents, drops empty buckets; returns the number of
    /// active incidents (and sets the gauge to it).
    pub fn sweep(&self, now_ms: i64, window_ms: i64) -> usize {
        let since = now_ms - window_ms;
        let mut buckets = self.buckets.lock();
        let mut active = 0;
        buckets.retain(|_, b| {
            b.expire(since);
            if matches!(&b.incident, Some(i) if i.last_join_ms <= since) {
                b.incident = None;
            }
            if b.incident.is_some() {
                active += 1;
            }
            b.incident.is_some() || !b.customers.is_empty()
        });
        metrics::gauge!(crate::telemetry::TRIAGE_INCIDENTS_ACTIVE).set(active as f64);
        active
    }

    /// Buckets tracked (for tests and the gauge).
    pub fn buckets(&self) -> usize {
        self.buckets.lock().len()
    }
}

fn rand_bits() -> u128 {
    // The random part of a ULID; Ulid::new() draws it from the thread RNG.
    Ulid::new().random()
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: i64 = 600_000;
    const L: Limits = Limits {
        max_buckets: 100,
        max_customers_per_bucket: 1000,
    };

    fn report(now_ms: i64, customer: u64, terms: u128) -> Report {
        Report {
            now_ms,
            category: 0,
            area: 0,
            customer,
            terms,
        }
    }

    #[test]
    fn many_customers_with_a_shared_term_make_one_incident() {
        let s = Storms::new(L);
        let t0 = 1_800_000_000_000;
        for c in 0..4 {
            assert_eq!(s.observe(report(t0 + c as i64, c, 0b011), W, 5), Joined::No);
        }
        let Joined::Opened(id) = s.observe(report(t0 + 10, 4, 0b010), W, 5) else {
            panic!("the fifth customer opens it")
        };
        assert!(id.starts_with("INC-"));
        // Another customer sharing a term joins; one with unrelated terms does not.
        assert_eq!(
            s.observe(report(t0 + 20, 5, 0b110), W, 5),
            Joined::Existing(id.clone())
        );
        assert_eq!(s.observe(report(t0 + 30, 6, 0b1000), W, 5), Joined::No);
        assert_eq!(s.sweep(t0 + 40, W), 1);
        // Nobody joins for a window: it ends; the next storm is a new incident.
        assert_eq!(s.sweep(t0 + 40 + W, W), 0);
        assert_eq!(s.buckets(), 0);
    }

    #[test]
    fn the_same_customer_counts_once() {
        let s = Storms::new(L);
        let t0 = 1_800_000_000_000;
        for i in 0..50 {
            assert_eq!(s.observe(report(t0 + i, 7, 0b1), W, 3), Joined::No);
        }
    }

    #[test]
    fn reports_leave_the_window() {
        let s = Storms::new(L);
        let t0 = 1_800_000_000_000;
        s.observe(report(t0, 1, 1), W, 3);
        s.observe(report(t0 + 1, 2, 1), W, 3);
        // The first two are out of the window by the time the third arrives.
        assert_eq!(s.observe(report(t0 + W + 5, 3, 1), W, 3), Joined::No);
        assert!(matches!(
            s.observe(report(t0 + W + 6, 4, 1), W, 3),
            Joined::No
        ));
        assert!(matches!(
            s.observe(report(t0 + W + 7, 5, 1), W, 3),
            Joined::Opened(_)
        ));
    }

    #[test]
    fn areas_and_categories_are_separate_and_capped() {
        let s = Storms::new(Limits {
            max_buckets: 2,
            max_customers_per_bucket: 3,
        });
        let t0 = 1_800_000_000_000;
        let mut r = report(t0, 1, 1);
        r.area = 1;
        s.observe(r, W, 2);
        r.area = 2;
        r.customer = 2;
        assert_eq!(
            s.observe(r, W, 2),
            Joined::No,
            "another area: its own bucket"
        );
        r.area = 3;
        assert_eq!(
            s.observe(r, W, 2),
            Joined::No,
            "over the bucket cap: untracked"
        );
        assert_eq!(s.buckets(), 2);
        // Customer cap: past it, everyone joins the running incident.
        let mut ids = Vec::new();
        for c in 10..20 {
            let mut r = report(t0 + c as i64, c, 1);
            r.area = 1;
            ids.push(s.observe(r, W, 2));
        }
        assert!(matches!(ids[0], Joined::Opened(_)));
        assert!(ids[1..].iter().all(|j| matches!(j, Joined::Existing(_))));
    }

    #[test]
    fn no_terms_no_storm() {
        let s = Storms::new(L);
        for c in 0..10 {
            assert_eq!(s.observe(report(1, c, 0), W, 2), Joined::No);
        }
    }
}
