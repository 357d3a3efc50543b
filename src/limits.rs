//! Rate limits (GCRA, governor): per source address, per channel, per customer.
//!
//! Keys are hashed to 64 bits before they reach the limiter, so no address or customer key is
//! held as a string. IPv6 sources are aggregated to their /64 (one host owns a whole /64). Memory
//! is bounded: a background task calls `retain_recent()` (drops keys whose bucket is full again)
//! and, past `max_keys`, new keys share a small set of overflow buckets instead of growing the map.
//!
//! With `limits.backend = "redis"` the same GCRA runs in Redis (src/shared.rs), one state per
//! hashed key for every instance; the local limiters answer only while Redis is unreachable.

use crate::config::{LimitsConfig, RateConfig};
use crate::shared::{RateCheck, Shared};
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
    /// Emission interval (µs) and burst, for the shared limiter.
    interval_us: f64,
    burst: u32,
}

pub struct Limits {
    enabled: bool,
    max_keys: usize,
    clock: DefaultClock,
    source: Keyed,
    channel: Keyed,
    customer: Keyed,
    shared: Option<Arc<Shared>>,
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
        Self::with_shared(cfg, None)
    }

    /// Limits kept in `shared` (Redis), the local limiters as the fallback.
    pub fn with_shared(cfg: &LimitsConfig, shared: Option<Arc<Shared>>) -> Arc<Self> {
        let keyed = |r: &RateConfig, scope| Keyed {
            limiter: RateLimiter::keyed(quota(r)),
            scope,
            interval_us: quota(r).replenish_interval().as_nanos() as f64 / 1000.0,
            burst: r.burst.max(1),
        };
        Arc::new(Self {
            enabled: cfg.enabled,
            max_keys: cfg.max_keys,
            clock: DefaultClock::default(),
            source: keyed(&cfg.per_source, Scope::Source),
            channel: keyed(&cfg.per_channel, Scope::Channel),
            customer: keyed(&cfg.per_customer, Scope::Customer),
            shared,
        })
    }

    /// The shared limiter's verdict over `keys` in order, or `None` to decide locally.
    async fn check_shared(&self, keys: &[(&Keyed, u64)]) -> Option<Result<(), Limited>> {
        let shared = self.shared.as_ref()?;
        let checks: Vec<RateCheck> = keys
            .iter()
            .map(|(k, key)| RateCheck {
                scope: k.scope.as_str(),
                key: *key,
                interval_us: k.interval_us,
                burst: k.burst,
            })
            .collect();
        Some(
            shared
                .gcra(&checks, 1)
                .await?
                .map_err(|(i, retry_after)| Limited {
                    scope: keys[i].0.scope,
                    retry_after,
                }),
        )
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
    pub async fn admit(&self, ip: IpAddr, channel: &'static str) -> Result<(), Limited> {
        if !self.enabled {
            return Ok(());
        }
        let (source, channel) = (source_key(ip), text_key(channel));
        if let Some(verdict) = self
            .check_shared(&[(&self.source, source), (&self.channel, channel)])
            .await
        {
            return verdict;
        }
        self.admit_local(source, channel)
    }

    fn admit_local(&self, source: u64, channel: u64) -> Result<(), Limited> {
        self.check(&self.source, source, 1)?;
        self.check(&self.channel, channel, 1)
    }

    /// One record for `customer_key`.
    pub async fn customer(&self, customer_key: &str) -> Result<(), Limited> {
        if !self.enabled {
            return Ok(());
        }
        let key = text_key(customer_key);
        if let Some(verdict) = self.check_shared(&[(&self.customer, key)]).await {
            return verdict;
        }
        self.check(&self.customer, key, 1)
    }

    /// The shared store the limits are kept in, if any.
    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
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
            backend: crate::config::Backend::Memory,
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

    #[tokio::test]
    async fn one_key_exhausted_leaves_others_alone() {
        let l = Limits::new(&cfg(0.001, 3));
        let ip1: IpAddr = "192.0.2.1".parse().unwrap();
        let ip2: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            l.admit(ip1, "api").await.unwrap();
        }
        let e = l.admit(ip1, "api").await.unwrap_err();
        assert_eq!(e.scope, Scope::Source);
        assert!(e.retry_after > Duration::from_secs(1));
        l.admit(ip2, "api")
            .await
            .expect("another source is not limited");

        for _ in 0..3 {
            l.customer("+8613800138000").await.unwrap();
        }
        assert_eq!(
            l.customer("+8613800138000").await.unwrap_err().scope,
            Scope::Customer
        );
        l.customer("+8613900139000")
            .await
            .expect("another customer is not limited");
    }

    #[tokio::test]
    async fn channel_limit_is_per_channel() {
        let mut c = cfg(1e6, 1_000_000);
        c.per_channel = RateConfig {
            per_second: 0.001,
            burst: 2,
        };
        let l = Limits::new(&c);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        l.admit(ip, "api").await.unwrap();
        l.admit(ip, "api").await.unwrap();
        assert_eq!(l.admit(ip, "api").await.unwrap_err().scope, Scope::Channel);
        l.admit(ip, "twilio")
            .await
            .expect("other channel has its own bucket");
    }

    #[tokio::test]
    async fn key_count_is_bounded() {
        let mut c = cfg(0.001, 5);
        c.max_keys = 50;
        let l = Limits::new(&c);
        for i in 0..5000u32 {
            let _ = l.customer(&format!("customer:{i}")).await;
        }
        assert!(l.evict_idle()[2] <= 50 + OVERFLOW_BUCKETS as usize);
    }

    #[tokio::test]
    async fn disabled_limits_admit_everything() {
        let mut c = cfg(0.001, 1);
        c.enabled = false;
        let l = Limits::new(&c);
        for _ in 0..100 {
            l.customer("x").await.unwrap();
        }
    }

    fn redis_cfg(url: String) -> crate::config::RedisConfig {
        crate::config::RedisConfig {
            url,
            key_prefix: format!("sbtest:{}:", ulid::Ulid::new()),
            timeout_ms: 5_000,
            retry_after_ms: 60_000,
        }
    }

    /// Two instances sharing one Redis: a customer's burst holds across both, and so does a
    /// source's.
    #[tokio::test]
    async fn shared_limits_hold_across_instances() {
        let Ok(url) = std::env::var("SWITCHBOARD_TEST_REDIS") else {
            eprintln!("SKIPPED: SWITCHBOARD_TEST_REDIS is not set (scripts/test.sh sets it)");
            return;
        };
        let shared = Shared::new(&redis_cfg(url)).unwrap();
        let a = Limits::with_shared(&cfg(0.001, 4), Some(shared.clone()));
        let b = Limits::with_shared(&cfg(0.001, 4), Some(shared));
        let mut accepted = 0;
        let mut refused = 0;
        for i in 0..10 {
            let l = if i % 2 == 0 { &a } else { &b };
            match l.customer("+8613800138000").await {
                Ok(()) => accepted += 1,
                Err(e) => {
                    assert_eq!(e.scope, Scope::Customer);
                    assert!(e.retry_after > Duration::from_secs(100));
                    refused += 1;
                }
            }
        }
        assert_eq!((accepted, refused), (4, 6));
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        for _ in 0..2 {
            a.admit(ip, "api").await.unwrap();
            b.admit(ip, "api").await.unwrap();
        }
        assert_eq!(a.admit(ip, "api").await.unwrap_err().scope, Scope::Source);
        assert_eq!(b.admit(ip, "api").await.unwrap_err().scope, Scope::Source);
    }

    /// Redis unreachable: the local limiter answers (per instance), at once.
    #[tokio::test]
    async fn unreachable_redis_falls_back_to_the_local_limiter() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let shared = Shared::new(&redis_cfg(format!("redis://127.0.0.1:{port}"))).unwrap();
        let l = Limits::with_shared(&cfg(0.001, 3), Some(shared.clone()));
        for _ in 0..3 {
            l.customer("x").await.unwrap();
        }
        assert_eq!(l.customer("x").await.unwrap_err().scope, Scope::Customer);
        assert!(!shared.available());
    }
}
