//! The shared store several instances use for dedupe windows and rate limits (`backend =
//! "redis"`): one multiplexed, self-reconnecting connection (`redis::aio::ConnectionManager`),
//! a short timeout on every call and a circuit breaker, so intake never waits on Redis.
//!
//! Policy when Redis is unreachable: a call that fails or times out opens the breaker; for
//! `redis.retry_after_ms` every call is skipped and the caller uses its local store (the memory
//! dedupe windows, the local governor). Each skipped or failed call is counted
//! (`switchboard_redis_fallbacks_total{op}`); the log says so once per opening of the breaker and
//! once when Redis answers again. Keys are hashes (`<prefix>dd:<window>:<128-bit hex>`,
//! `<prefix>rl:<scope>:<64-bit hex>`), never a phone, an address or a message id.
//!
//! Dedupe entries: `SET key "p:<record id>" NX GET PX <pending>` claims a key for a write in
//! flight (one round trip: nil = ours, `p:..` = another instance is writing it, an id = already
//! answered with that record); after the write is durable, `SET key <id> PX <window>`; when the
//! write fails, the claim is deleted again if it is still ours (a compare-and-delete script).
//!
//! Rate limits: GCRA in one Lua script over every key a request is checked against (source and
//! channel, or customer), Redis's own clock (`TIME`), so instances with skewed clocks agree.

use crate::config::RedisConfig;
use crate::telemetry;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ulid::Ulid;

/// GCRA over KEYS in order, all charged `ARGV[1]`. `ARGV[2i]`, `ARGV[2i+1]`: emission interval
/// (µs) and burst of `KEYS[i]`. Returns `{0, 0}` when every key admits (each is charged), else
/// `{i, retry_after_us}` for the first key that refuses; keys before it stay charged, as with the
/// local limiter. State: one number per key, the theoretical arrival time (µs), expiring when the
/// bucket is full again.
const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  if n > burst then
    return {i, 60000000}
  end
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval * n
  local allow_at = new_tat - interval * burst
  if allow_at > now then
    return {i, math.ceil(allow_at - now)}
  end
  redis.call('SET', key, string.format('%.0f', new_tat), 'PX',
    math.max(1, math.ceil((new_tat - now) / 1000)))
end
return {0, 0}
"#;

/// Deletes `KEYS[i]` if it still holds `ARGV[i]` (a claim of ours, not one taken since).
const RELEASE_LUA: &str = r#"
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then
    n = n + redis.call('DEL', key)
  end
end
return n
"#;

/// What a call was for: the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    DedupeClaim,
    DedupeCommit,
    DedupeRelease,
    Limit,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::DedupeClaim => "dedupe_claim",
            Op::DedupeCommit => "dedupe_commit",
            Op::DedupeRelease => "dedupe_release",
            Op::Limit => "limit",
        }
    }
}

/// What Redis says of a dedupe key we tried to claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remote {
    /// Nobody had it: ours now (pending until committed or released).
    Won,
    /// Another instance is writing this message right now.
    Pending,
    /// Already answered with this record.
    Duplicate(Ulid),
}

/// One dedupe key as Redis holds it.
#[derive(Debug, Clone, Copy)]
pub struct DedupeKey {
    pub window: &'static str,
    pub key: u128,
}

/// One GCRA check: the limiter key and its rate.
#[derive(Debug, Clone, Copy)]
pub struct RateCheck {
    pub scope: &'static str,
    pub key: u64,
    /// Emission interval in microseconds (1 / rate).
    pub interval_us: f64,
    pub burst: u32,
}

pub struct Shared {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    retry_after: Duration,
    epoch: Instant,
    /// Microseconds since `epoch` until which Redis is skipped; 0: closed.
    open_until_us: AtomicU64,
    /// Last state published (for the log line on each change).
    up: AtomicBool,
    gcra: Script,
    release: Script,
}

impl Shared {
    /// Connects lazily: nothing is sent until the first call, so a Redis that is down at start
    /// delays nothing (the first calls fall back and open the breaker).
    pub fn new(cfg: &RedisConfig) -> Result<Arc<Self>, String> {
        let client = redis::Client::open(cfg.url.as_str())
            .map_err(|_| "redis.url: not a Redis URL".to_string())?;
        let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // Reconnects are driven by the next call after the breaker closes, not retried here.
            .set_number_of_retries(1)
            .set_max_delay(timeout);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("redis: {}", e.category()))?;
        metrics::gauge!(telemetry::REDIS_UP).set(1.0);
        Ok(Arc::new(Self {
            conn,
            prefix: cfg.key_prefix.clone(),
            timeout,
            retry_after: Duration::from_millis(cfg.retry_after_ms.max(1)),
            epoch: Instant::now(),
            open_until_us: AtomicU64::new(0),
            up: AtomicBool::new(true),
            gcra: Script::new(GCRA_LUA),
            release: Script::new(RELEASE_LUA),
        }))
    }

    /// False while the breaker is open (Redis is being skipped).
    pub fn available(&self) -> bool {
        self.open_until_us.load(Ordering::Relaxed) <= self.now_us()
    }

    /// For `/readyz`: `up`, or `down` while calls fall back to the local stores.
    pub fn state(&self) -> &'static str {
        if self.up.load(Ordering::Relaxed) && self.available() {
            "up"
        } else {
            "down (local fallback)"
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Runs one call under the timeout and the breaker; `None` means "use the local store" (and
    /// was counted).
    async fn call<T, F>(&self, op: Op, f: impl FnOnce(ConnectionManager) -> F) -> Option<T>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let op_label = op.as_str();
        if !self.available() {
            metrics::counter!(telemetry::REDIS_FALLBACKS, "op" => op_label).increment(1);
            return None;
        }
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.timeout, f(self.conn.clone())).await;
        let failure = match outcome {
            Ok(Ok(v)) => {
                metrics::histogram!(telemetry::REDIS_SECONDS, "op" => op_label)
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!(telemetry::REDIS_REQUESTS, "op" => op_label, "outcome" => "ok")
                    .increment(1);
                if !self.up.swap(true, Ordering::Relaxed) {
                    metrics::gauge!(telemetry::REDIS_UP).set(1.0);
                    tracing::warn!("redis answers again; shared dedupe and limits resume");
                }
                return Some(v);
            }
            Ok(Err(e)) => (e.category().to_string(), "error"),
            Err(_) => ("timeout".to_string(), "timeout"),
        };
        let (failure, outcome) = (failure.0.as_str(), failure.1);
        metrics::counter!(telemetry::REDIS_REQUESTS, "op" => op_label, "outcome" => outcome)
            .increment(1);
        metrics::counter!(telemetry::REDIS_FALLBACKS, "op" => op_label).increment(1);
        let until = self.now_us() + self.retry_after.as_micros() as u64;
        self.open_until_us.store(until, Ordering::Relaxed);
        // One line per opening of the breaker (at most one per retry_after), not one per call.
        if self.up.swap(false, Ordering::Relaxed) {
            metrics::gauge!(telemetry::REDIS_UP).set(0.0);
            tracing::warn!(
                op = op_label,
                error = failure,
                retry_after_ms = self.retry_after.as_millis() as u64,
                "redis unreachable; dedupe and limits fall back to this instance's memory"
            );
        } else {
            tracing::debug!(op = op_label, error = failure, "redis call failed again");
        }
        None
    }

    fn dedupe_key(&self, k: &DedupeKey) -> String {
        format!("{}dd:{}:{:032x}", self.prefix, k.window, k.key)
    }

    fn limit_key(&self, scope: &str, key: u64) -> String {
        format!("{}rl:{}:{:016x}", self.prefix, scope, key)
    }

    /// Claims `key` for the write of record `id`, pending for `pending` at most.
    pub async fn claim(&self, key: &DedupeKey, id: Ulid, pending: Duration) -> Option<Remote> {
        let k = self.dedupe_key(key);
        let value = pending_value(id);
        let ms = pending.as_millis().max(1) as u64;
        let old: Option<String> = self
            .call(Op::DedupeClaim, |mut c| async move {
                redis::cmd("SET")
                    .arg(&k)
                    .arg(&value)
                    .arg("NX")
                    .arg("GET")
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Some(match old {
            None => Remote::Won,
            Some(v) if v.starts_with("p:") => Remote::Pending,
            Some(v) => match v.parse::<Ulid>() {
                Ok(id) => Remote::Duplicate(id),
                // Not ours to interpret: treat as a record we cannot name, i.e. write anew.
                Err(_) => Remote::Won,
            },
        })
    }

    /// Records that each key was answered by its record, for `window` from now. One round trip.
    pub async fn commit(&self, entries: &[(DedupeKey, Ulid, Duration)]) -> bool {
        if entries.is_empty() {
            return true;
        }
        let mut pipe = redis::pipe();
        for (k, id, window) in entries {
            pipe.cmd("SET")
                .arg(self.dedupe_key(k))
                .arg(id.to_string())
                .arg("PX")
                .arg(window.as_millis().max(1) as u64)
                .ignore();
        }
        self.call(Op::DedupeCommit, |mut c| async move {
            pipe.query_async::<()>(&mut c).await
        })
        .await
        .is_some()
    }

    /// Gives back claims whose write failed, where they are still ours. One round trip.
    pub async fn release(&self, entries: &[(DedupeKey, Ulid)]) -> bool {
        if entries.is_empty() {
            return true;
        }
        let mut inv = self.release.prepare_invoke();
        for (k, id) in entries {
            inv.key(self.dedupe_key(k)).arg(pending_value(*id));
        }
        self.call(Op::DedupeRelease, |mut c| async move {
            inv.invoke_async::<i64>(&mut c).await
        })
        .await
        .is_some()
    }

    /// GCRA over `checks` in order, each charged `n`. `Some(Ok)`: admitted by all;
    /// `Some(Err((i, retry_after)))`: `checks[i]` refused; `None`: Redis unavailable.
    pub async fn gcra(
        &self,
        checks: &[RateCheck],
        n: u32,
    ) -> Option<Result<(), (usize, Duration)>> {
        let mut inv = self.gcra.prepare_invoke();
        inv.arg(n);
        for c in checks {
            inv.key(self.limit_key(c.scope, c.key))
                .arg(c.interval_us)
                .arg(c.burst);
        }
        let (i, retry_us): (i64, i64) = self
            .call(
                Op::Limit,
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await?;
        Some(if i <= 0 {
            Ok(())
        } else {
            Err((
                (i as usize - 1).min(checks.len().saturating_sub(1)),
                Duration::from_micros(retry_us.max(1) as u64),
            ))
        })
    }
}

fn pending_value(id: Ulid) -> String {
    format!("p:{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real redis-server the test script starts, or `None` (the test says it skipped).
    fn test_url() -> Option<String> {
        match std::env::var("SWITCHBOARD_TEST_REDIS") {
            Ok(u) if !u.is_empty() => Some(u),
            _ => {
                eprintln!(
                    "SKIPPED: SWITCHBOARD_TEST_REDIS is not set (scripts/test.sh starts a redis-server and sets it)"
                );
                None
            }
        }
    }

    fn cfg(url: &str) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            key_prefix: format!("sbtest:{}:", Ulid::new()),
            timeout_ms: 5_000,
            retry_after_ms: 60_000,
        }
    }

    fn check(key: u64, per_second: f64, burst: u32) -> RateCheck {
        RateCheck {
            scope: "customer",
            key,
            interval_us: 1e6 / per_second,
            burst,
        }
    }

    #[tokio::test]
    async fn gcra_admits_the_burst_then_refuses_with_a_retry_after() {
        let Some(url) = test_url() else { return };
        let s = Shared::new(&cfg(&url)).unwrap();
        // 1 per 100 s, burst 3: three pass at once, the fourth is told to wait about 100 s.
        let c = [check(7, 0.01, 3)];
        for i in 0..3 {
            assert_eq!(s.gcra(&c, 1).await, Some(Ok(())), "request {i}");
        }
        let Some(Err((0, retry))) = s.gcra(&c, 1).await else {
            panic!("fourth must be refused")
        };
        assert!(
            retry > Duration::from_secs(90) && retry <= Duration::from_secs(100),
            "{retry:?}"
        );
        // Another key has its own bucket; more than the burst at once never passes.
        assert_eq!(s.gcra(&[check(8, 0.01, 3)], 1).await, Some(Ok(())));
        assert!(matches!(
            s.gcra(&[check(9, 0.01, 3)], 4).await,
            Some(Err((0, _)))
        ));
    }

    #[tokio::test]
    async fn gcra_refills_at_the_rate_and_names_the_refusing_key() {
        let Some(url) = test_url() else { return };
        let s = Shared::new(&cfg(&url)).unwrap();
        // 1000/s, burst 1: the second at once is refused, one after its retry_after passes.
        let c = [check(1, 1000.0, 1)];
        assert_eq!(s.gcra(&c, 1).await, Some(Ok(())));
        let mut refused = 0;
        loop {
            match s.gcra(&c, 1).await {
                Some(Ok(())) => break,
                Some(Err((0, retry))) => {
                    assert!(retry <= Duration::from_millis(1), "{retry:?}");
                    refused += 1;
                    tokio::time::sleep(retry).await;
                }
                other => panic!("{other:?}"),
            }
            assert!(refused < 1000, "never refilled");
        }
        // Two keys: the first admits (and is charged), the second refuses and is named.
        let pair = [check(2, 1000.0, 10), check(3, 0.01, 1)];
        assert_eq!(s.gcra(&pair, 1).await, Some(Ok(())));
        assert!(matches!(s.gcra(&pair, 1).await, Some(Err((1, _)))));
    }

    #[tokio::test]
    async fn dedupe_claim_commit_release() {
        let Some(url) = test_url() else { return };
        let s = Shared::new(&cfg(&url)).unwrap();
        let k = DedupeKey {
            window: "provider_id",
            key: crate::dedupe::hash_key(&[b"m1"]),
        };
        let (a, b) = (Ulid::new(), Ulid::new());
        let pending = Duration::from_secs(30);
        assert_eq!(s.claim(&k, a, pending).await, Some(Remote::Won));
        assert_eq!(s.claim(&k, b, pending).await, Some(Remote::Pending));
        // A release by someone else's id leaves our claim alone; ours frees it.
        assert!(s.release(&[(k, b)]).await);
        assert_eq!(s.claim(&k, b, pending).await, Some(Remote::Pending));
        assert!(s.release(&[(k, a)]).await);
        assert_eq!(s.claim(&k, b, pending).await, Some(Remote::Won));
        assert!(s.commit(&[(k, b, Duration::from_secs(60))]).await);
        assert_eq!(s.claim(&k, a, pending).await, Some(Remote::Duplicate(b)));
        // A commit is not undone by a late release.
        assert!(s.release(&[(k, b)]).await);
        assert_eq!(s.claim(&k, a, pending).await, Some(Remote::Duplicate(b)));
        assert_eq!(s.state(), "up");
    }

    #[tokio::test]
    async fn a_closed_port_falls_back_at_once_and_opens_the_breaker() {
        // A port nobody listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let s = Shared::new(&cfg(&format!("redis://127.0.0.1:{port}/0"))).unwrap();
        let k = DedupeKey {
            window: "fingerprint",
            key: 1,
        };
        assert_eq!(s.claim(&k, Ulid::new(), Duration::from_secs(1)).await, None);
        assert!(!s.available(), "breaker opened");
        assert_eq!(s.state(), "down (local fallback)");
        // While open, nothing is sent: every call answers "use local" at once.
        assert_eq!(s.gcra(&[check(1, 1.0, 1)], 1).await, None);
        assert!(!s.commit(&[(k, Ulid::new(), Duration::from_secs(1))]).await);
        assert!(!s.release(&[(k, Ulid::new())]).await);
    }
}
