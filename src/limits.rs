//! Rate limits (GCRA, governor): per source address, per channel, per customer.
//!
//! Keys are hashed to 64 bits before they reach the limiter, so no address or customer key is
//! held as a string. IPv6 sources are aggregated to their /64 (one host owns a whole /64). Memory
//! is bounded: a background task calls `retain_recent()` (drops keys whose bucket is full again)
//! and, past `max_keys`, new keys share a small set of overflow buckets instead of growing the map.

use crate::config::{LimitsConfig, RateConfig};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

const OVERFLOW_BUCKETS: u64 = 1024;

/// Which limit refused a request; also the `scope` label of `switchboard_rate_limited_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Source,
    Channel,
    Customer,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Source => "source",
            Scope::Channel => "channel",
            Scope::Customer => "customer",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub scope: Scope,
    pub retry_after: Duration,
}

struct Keyed {
    limiter: DefaultKeyedRateLimiter<u64>,
    scope: Scope,
}

pub struct Limits {
    enabled: bool,
    max_keys: usize,
    clock: DefaultClock,
    source: Keyed,
    channel: Keyed,
    customer: Keyed,
}

fn quota(r: &RateConfig) -> Quota {
    let period = Duration::from_secs_f64(1.0 / r.per_second).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(r.burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period)
        .expect("period is positive")
        .allow_burst(burst)
}

/// The key a source address is limited by: IPv4 as is, IPv6 by its /64 prefix.
pub fn source_key(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => match v4.to_ipv6_mapped().to_canonical() {
            IpAddr::V4(a) => u32::from(a) as u64,
            IpAddr::V6(_) => unreachable!("canonical form of a mapped v4 is v4"),
        },
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u32::from(v4) as u64,
            None => (u128::from(v6) >> 64) as u64 | (1u64 << 63),
        },
    }
}

/// Hash for string keys (channel names, customer keys).
pub fn text_key(s: &str) -> u64 {
    (crate::dedupe::hash_key(&[s.as_bytes()]) >> 64) as u64
}

impl Limits {
    pub fn new(cfg: &LimitsConfig) -> Arc<Self> {
        let keyed = |r: &RateConfig, scope| Keyed {
            limiter: RateLimiter::keyed(quota(r)),
            scope,
        };
        Arc::new(Self {
            enabled: cfg.enabled,
            max_keys: cfg.max_keys,
            clock: DefaultClock::default(),
            source: keyed(&cfg.per_source, Scope::Source),
            channel: keyed(&cfg.per_channel, Scope::Channel),
            customer: keyed(&cfg.per_customer, Scope::Customer),
        })
    }

    fn check(&self, k: &Keyed, key: u64, n: u32) -> Result<(), Limited> {
        if !self.enabled || n == 0 {
            return Ok(());
        }
        let key = if k.limiter.len() >= self.max_keys {
            // Full: fold into overflow buckets rather than grow without bound.
            u64::MAX - (key % OVERFLOW_BUCKETS)
        } else {
            key
        };
        let n = NonZeroU32::new(n).expect("n > 0");
        let refused = |retry_after| Limited {
            scope: k.scope,
            retry_after,
        };
        match k.limiter.check_key_n(&key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(refused(not_until.wait_time_from(self.clock.now()))),
            // More at once than the burst allows: it can never pass as one batch.
            Err(_) => Err(refused(Duration::from_secs(60))),
        }
    }

    /// Admission of one request from `ip` on `channel` (before it is parsed).
    pub fn admit(&self, ip: IpAddr, channel: &'static str) -> Result<(), Limited> {
        self.check(&self.source, source_key(ip), 1)?;
        self.check(&self.channel, text_key(channel), 1)
    }

    /// One record for `customer_key`.
    pub fn customer(&self, customer_key: &str) -> Result<(), Limited> {
        self.check(&self.customer, text_key(customer_key), 1)
    }

    /// Drops idle keys; returns the key counts (source, channel, customer).
    pub fn evict_idle(&self) -> [usize; 3] {
        let mut out = [0; 3];
        for (i, k) in [&self.source, &self.channel, &self.customer]
            .into_iter()
            .enumerate()
        {
            k.limiter.retain_recent();
            k.limiter.shrink_to_fit();
            out[i] = k.limiter.len();
            metrics::gauge!(crate::telemetry::RATE_LIMIT_KEYS, "scope" => k.scope.as_str())
                .set(out[i] as f64);
        }
        out
    }

    /// Background eviction; ends when the returned handle is aborted.
    pub fn spawn_evictor(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.evict_idle();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(per_second: f64, burst: u32) -> LimitsConfig {
        let r = RateConfig { per_second, burst };
        LimitsConfig {
            enabled: true,
            per_source: r.clone(),
            per_channel: RateConfig {
                per_second: 1e6,
                burst: 1_000_000,
            },
            per_customer: r,
            max_keys: 1000,
            evict_interval_secs: 60,
        }
    }

    #[test]
    fn ipv6_sources_share_their_slash_64_and_v4_mapped_is_v4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source_key(v4), source_key(mapped));
        assert_ne!(source_key(v4), source_key("192.0.2.8".parse().unwrap()));
    }

    #[test]
    fn one_key_exhausted_leaves_others_alone() {
        let l = Limits::new(&cfg(0.001, 3));
        let ip1: IpAddr = "192.0.2.1".parse().unwrap();
        let ip2: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            l.admit(ip1, "api").unwrap();
        }
        let e = l.admit(ip1, "api").unwrap_err();
        assert_eq!(e.scope, Scope::Source);
        assert!(e.retry_after > Duration::from_secs(1));
        l.admit(ip2, "api").expect("another source is not limited");

        for _ in 0..3 {
            l.customer("+8613800138000").unwrap();
        }
        assert_eq!(
            l.customer("+8613800138000").unwrap_err().scope,
            Scope::Customer
        );
        l.customer("+8613900139000")
            .expect("another customer is not limited");
    }

    #[test]
    fn channel_limit_is_per_channel() {
        let mut c = cfg(1e6, 1_000_000);
        c.per_channel = RateConfig {
            per_second: 0.001,
            burst: 2,
        };
        let l = Limits::new(&c);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        l.admit(ip, "api").unwrap();
        l.admit(ip, "api").unwrap();
        assert_eq!(l.admit(ip, "api").unwrap_err().scope, Scope::Channel);
        l.admit(ip, "twilio")
            .expect("other channel has its own bucket");
    }

    #[test]
    fn key_count_is_bounded() {
        let mut c = cfg(0.001, 5);
        c.max_keys = 50;
        let l = Limits::new(&c);
        for i in 0..5000u32 {
            let _ = l.customer(&format!("customer:{i}"));
        }
        assert!(l.evict_idle()[2] <= 50 + OVERFLOW_BUCKETS as usize);
    }

    #[test]
    fn disabled_limits_admit_everything() {
        let mut c = cfg(0.001, 1);
        c.enabled = false;
        let l = Limits::new(&c);
        for _ in 0..100 {
            l.customer("x").unwrap();
        }
    }
}
