//! Latency histograms (HdrHistogram, 1 µs – 60 s, 3 significant digits), counts by status and
//! error kind, the per-second time series and the collector that owns them.
//!
//! Every request task sends one [`Outcome`] to the collector task, which is the only writer:
//! no locks on the hot path. Latency is `done - intended`: in open loop `intended` is the
//! scheduled send time, so a stalled gateway (or a stalled client) shows up as latency instead
//! of silently lowering the send rate (no coordinated omission).

use crate::acked::AckWriter;
use crate::channels::Channel;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub const HIST_LOW_US: u64 = 1;
pub const HIST_HIGH_US: u64 = 60_000_000;
pub const HIST_SIGFIG: u8 = 3;

/// A fresh latency histogram in microseconds.
pub fn new_hist() -> Histogram<u64> {
    // Constant bounds (low >= 1, high >= 2 * low, sigfig <= 5): construction cannot fail, and
    // `histogram_bounds_and_precision` exercises exactly these constants.
    Histogram::new_with_bounds(HIST_LOW_US, HIST_HIGH_US, HIST_SIGFIG)
        .expect("constant histogram bounds are valid")
}

/// Why a request got no answer (no HTTP status, no SMTP reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ErrorKind {
    /// The TCP connection could not be made.
    Connect,
    /// No complete answer within `--timeout`.
    Timeout,
    /// Not sent: `--max-in-flight` requests were already waiting.
    ClientOverload,
    /// The connection failed after it was made (reset, closed before the answer).
    Request,
    /// The answer's body could not be read.
    Body,
    /// The server spoke something else than the protocol (SMTP: not a reply line, or a
    /// greeting other than 220).
    Protocol,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::ClientOverload => "client_overload",
            ErrorKind::Request => "request",
            ErrorKind::Body => "body",
            ErrorKind::Protocol => "protocol",
        }
    }
}

/// What happened to one request.
#[derive(Debug)]
pub struct Outcome {
    pub channel: Channel,
    /// When it was meant to be sent (open loop) or was sent (closed loop).
    pub intended: Instant,
    /// When the whole answer had arrived (or the error happened).
    pub done: Instant,
    /// The HTTP status (SMTP: the reply code), or why there was none.
    pub result: Result<u16, ErrorKind>,
    /// A re-send of an earlier payload (`--dup-ratio`).
    pub dup: bool,
    /// The gateway said `"duplicate": true` (events route).
    pub duplicate_answer: bool,
    /// Keys of the records this 2xx answer acknowledged (see `--acked`).
    pub acked: Vec<String>,
}

impl Outcome {
    pub fn latency_us(&self) -> u64 {
        let d = self.done.saturating_duration_since(self.intended);
        (d.as_micros().min(u128::from(u64::MAX)) as u64).max(1)
    }

    /// 2xx: an HTTP success, or SMTP 250 after the final dot.
    pub fn ok(&self) -> bool {
        matches!(self.result, Ok(s) if (200..300).contains(&s))
    }
}

/// Counts and latencies of one channel (or of all of them).
#[derive(Debug, Clone)]
pub struct ChannelStats {
    /// Latency of every HTTP answer (any status); transport errors have none.
    pub hist: Histogram<u64>,
    /// Requests with an outcome: answers plus errors (including `client_overload`).
    pub count: u64,
    /// 2xx answers.
    pub ok: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: BTreeMap<&'static str, u64>,
    pub dup_sent: u64,
    pub duplicate_answers: u64,
}

impl Default for ChannelStats {
    fn default() -> Self {
        Self {
            hist: new_hist(),
            count: 0,
            ok: 0,
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            dup_sent: 0,
            duplicate_answers: 0,
        }
    }
}

impl ChannelStats {
    pub fn record(&mut self, o: &Outcome) {
        self.count += 1;
        if o.dup {
            self.dup_sent += 1;
        }
        if o.duplicate_answer {
            self.duplicate_answers += 1;
        }
        match o.result {
            Ok(status) => {
                *self.statuses.entry(status).or_default() += 1;
                if o.ok() {
                    self.ok += 1;
                }
                self.hist.saturating_record(o.latency_us());
            }
            Err(kind) => *self.errors.entry(kind.as_str()).or_default() += 1,
        }
    }

    /// Everything that was not a 2xx answer.
    pub fn errors_total(&self) -> u64 {
        self.count - self.ok
    }

    #[cfg(test)]
    pub fn percentile(&self, q: f64) -> u64 {
        if self.hist.is_empty() {
            0
        } else {
            self.hist.value_at_quantile(q)
        }
    }
}

/// One second of the measured run (bucketed by completion time).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SecondPoint {
    /// Seconds since the end of warm-up.
    pub second: u64,
    /// Outcomes completed in this second (answers and errors): the achieved throughput.
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// The gateway's RSS and CPU and the harness's CPU in this second (filled by the report).
    #[serde(flatten)]
    pub resources: crate::resources::ResourceSample,
}

impl SecondPoint {
    /// A second in which nothing completed.
    pub fn empty(second: u64) -> Self {
        Bucket::new().point(second)
    }
}

#[derive(Debug)]
struct Bucket {
    hist: Histogram<u64>,
    requests: u64,
    ok: u64,
}

impl Bucket {
    fn new() -> Self {
        Self {
            hist: new_hist(),
            requests: 0,
            ok: 0,
        }
    }

    fn point(&self, second: u64) -> SecondPoint {
        let q = |q| {
            if self.hist.is_empty() {
                0
            } else {
                self.hist.value_at_quantile(q)
            }
        };
        SecondPoint {
            second,
            requests: self.requests,
            ok: self.ok,
            errors: self.requests - self.ok,
            p50_us: q(0.5),
            p99_us: q(0.99),
            max_us: if self.hist.is_empty() {
                0
            } else {
                self.hist.max()
            },
            resources: Default::default(),
        }
    }
}

/// Per-second buckets; only the last few are kept as histograms, older ones as points.
#[derive(Debug, Default)]
pub struct Series {
    live: BTreeMap<u64, Bucket>,
    done: Vec<SecondPoint>,
}

impl Series {
    pub fn record(&mut self, second: u64, ok: bool, latency_us: Option<u64>) {
        if self.done.last().is_some_and(|p| p.second >= second) {
            // A straggler for a second already closed: count it in the newest live second.
            return self.record(self.done.last().map_or(0, |p| p.second) + 1, ok, latency_us);
        }
        let b = self.live.entry(second).or_insert_with(Bucket::new);
        b.requests += 1;
        if ok {
            b.ok += 1;
        }
        if let Some(l) = latency_us {
            b.hist.saturating_record(l);
        }
    }

    /// Closes every second before `second`, filling gaps with empty points.
    pub fn close_before(&mut self, second: u64) {
        let keys: Vec<u64> = self.live.range(..second).map(|(k, _)| *k).collect();
        for k in keys {
            if let Some(b) = self.live.remove(&k) {
                let next = self.done.last().map_or(0, |p| p.second + 1);
                for gap in next..k {
                    self.done.push(Bucket::new().point(gap));
                }
                self.done.push(b.point(k));
            }
        }
    }

    pub fn finish(mut self) -> Vec<SecondPoint> {
        self.close_before(u64::MAX);
        self.done
    }
}

/// Everything measured in a run.
#[derive(Debug)]
pub struct Stats {
    pub channels: Vec<ChannelStats>,
    pub total: ChannelStats,
    pub series: Vec<SecondPoint>,
    pub chat: Option<crate::chat::ChatStats>,
}

/// Counters shared with the load generators.
#[derive(Debug, Default)]
pub struct Shared {
    pub sent: std::sync::atomic::AtomicU64,
    pub in_flight: std::sync::atomic::AtomicUsize,
    pub chat: std::sync::Arc<crate::chat::ChatShared>,
}

/// The single owner of the statistics while a run is going.
pub struct Collector {
    channels: Vec<ChannelStats>,
    total: ChannelStats,
    series: Series,
    chat: Option<crate::chat::ChatStats>,
    chat_window: Histogram<u64>,
    chat_window_acks: u64,
    start: Instant,
    measure_start: Instant,
    acked: Option<AckWriter>,
    // Progress, over everything (warm-up included).
    all_ok: u64,
    all_err: u64,
    window: Histogram<u64>,
    window_count: u64,
    last_tick: Instant,
}

impl Collector {
    pub fn new(start: Instant, warmup: Duration, acked: Option<AckWriter>) -> Self {
        Self {
            channels: Channel::ALL
                .iter()
                .map(|_| ChannelStats::default())
                .collect(),
            total: ChannelStats::default(),
            series: Series::default(),
            chat: None,
            chat_window: new_hist(),
            chat_window_acks: 0,
            start,
            measure_start: start + warmup,
            acked,
            all_ok: 0,
            all_err: 0,
            window: new_hist(),
            window_count: 0,
            last_tick: start,
        }
    }

    /// Collects chat events too (sessions of `sessions` at `rate` messages/s each).
    pub fn with_chat(mut self, sessions: usize, rate: f64) -> Self {
        self.chat = Some(crate::chat::ChatStats::new(sessions, rate));
        self
    }

    /// One chat event; its acknowledged record id goes to `--acked`.
    pub fn record_chat(&mut self, e: crate::chat::ChatEvent) -> Result<(), String> {
        let Some(chat) = &mut self.chat else {
            return Ok(());
        };
        let (key, latency) = chat.record(e, self.measure_start);
        if let Some(l) = latency {
            self.chat_window.saturating_record(l);
            self.chat_window_acks += 1;
        }
        if let (Some(w), Some(k)) = (&mut self.acked, key) {
            w.write_name(crate::acked::CHAT, &k)?;
        }
        Ok(())
    }

    pub fn record(&mut self, o: Outcome) -> Result<(), String> {
        let ok = o.ok();
        if ok {
            self.all_ok += 1;
            if let Some(w) = &mut self.acked {
                for key in &o.acked {
                    w.write(o.channel, key)?;
                }
            }
        } else {
            self.all_err += 1;
        }
        self.window_count += 1;
        let latency = o.result.is_ok().then(|| o.latency_us());
        if let Some(l) = latency {
            self.window.saturating_record(l);
        }
        if o.intended < self.measure_start {
            return Ok(()); // warm-up
        }
        self.channels[o.channel.index()].record(&o);
        self.total.record(&o);
        let second = o
            .done
            .saturating_duration_since(self.measure_start)
            .as_secs();
        self.series.record(second, ok, latency);
        Ok(())
    }

    /// The progress line for the second just ended; closes finished seconds of the series.
    pub fn tick(&mut self, now: Instant, shared: &Shared) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let elapsed = now.saturating_duration_since(self.start).as_secs_f64();
        let span = now
            .saturating_duration_since(self.last_tick)
            .as_secs_f64()
            .max(1e-3);
        let rate = self.window_count as f64 / span;
        let p99 = if self.window.is_empty() {
            "-".to_string()
        } else {
            crate::util::fmt_us(self.window.value_at_quantile(0.99))
        };
        let phase = if now < self.measure_start {
            " (warm-up)"
        } else {
            ""
        };
        let mut line = format!(
            "[{elapsed:6.1}s] sent {} ok {} errors {} rate {rate:.0}/s p99(1s) {p99} in-flight {}{phase}",
            shared.sent.load(Relaxed),
            self.all_ok,
            self.all_err,
            shared.in_flight.load(Relaxed),
        );
        if let Some(chat) = &mut self.chat {
            let p99 = if self.chat_window.is_empty() {
                "-".to_string()
            } else {
                crate::util::fmt_us(self.chat_window.value_at_quantile(0.99))
            };
            line.push_str(&format!(
                " | chat sessions {} sent {} acks {:.0}/s p99(1s) {p99}",
                shared.chat.open.load(Relaxed),
                shared.chat.sent.load(Relaxed),
                self.chat_window_acks as f64 / span,
            ));
            self.chat_window.reset();
            self.chat_window_acks = 0;
            let current = now.saturating_duration_since(self.measure_start).as_secs();
            if now >= self.measure_start && current >= 1 {
                chat.series.close_before(current - 1);
            }
        }
        self.window.reset();
        self.window_count = 0;
        self.last_tick = now;
        // Answers complete within milliseconds of their `done` stamp; keep one spare second.
        let current = now.saturating_duration_since(self.measure_start).as_secs();
        if now >= self.measure_start && current >= 1 {
            self.series.close_before(current - 1);
        }
        line
    }

    /// Totals so far, for the end-of-run line.
    pub fn progress_totals(&self) -> (u64, u64) {
        (self.all_ok, self.all_err)
    }

    pub fn finish(mut self) -> Result<(Stats, u64), String> {
        if let Some(c) = &mut self.chat {
            c.points = std::mem::take(&mut c.series).finish();
        }
        let written = match self.acked {
            Some(w) => w.finish()?,
            None => 0,
        };
        Ok((
            Stats {
                channels: self.channels,
                total: self.total,
                series: self.series.finish(),
                chat: self.chat,
            },
            written,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(
        start: Instant,
        intended_ms: u64,
        latency_ms: u64,
        r: Result<u16, ErrorKind>,
    ) -> Outcome {
        let intended = start + Duration::from_millis(intended_ms);
        Outcome {
            channel: Channel::Events,
            intended,
            done: intended + Duration::from_millis(latency_ms),
            result: r,
            dup: false,
            duplicate_answer: false,
            acked: vec![],
        }
    }

    #[test]
    fn histogram_bounds_and_precision() {
        let mut h = new_hist();
        h.saturating_record(0);
        h.saturating_record(123_456);
        h.saturating_record(u64::MAX); // clamped to the top, never a panic
        assert_eq!(h.len(), 3);
        assert!(h.max() >= HIST_HIGH_US && h.max() <= HIST_HIGH_US + HIST_HIGH_US / 500);
        let q = h.value_at_quantile(0.5);
        assert!((123_000..=123_600).contains(&q), "{q}");
    }

    #[test]
    fn collector_skips_warmup_and_counts_by_status_and_kind() {
        let start = Instant::now();
        let mut c = Collector::new(start, Duration::from_secs(1), None);
        // Warm-up: not recorded.
        c.record(outcome(start, 500, 3, Ok(202))).unwrap();
        // Measured.
        for i in 0..98 {
            c.record(outcome(start, 1000 + i * 10, 2, Ok(202))).unwrap();
        }
        c.record(outcome(start, 1500, 40, Ok(503))).unwrap();
        c.record(outcome(start, 1600, 0, Err(ErrorKind::ClientOverload)))
            .unwrap();
        c.record(outcome(start, 2100, 10_000, Err(ErrorKind::Timeout)))
            .unwrap();
        let (s, written) = c.finish().unwrap();
        assert_eq!(written, 0);
        let t = &s.total;
        assert_eq!((t.count, t.ok, t.errors_total()), (101, 98, 3));
        assert_eq!(t.statuses.get(&202), Some(&98));
        assert_eq!(t.statuses.get(&503), Some(&1));
        assert_eq!(t.errors.get("client_overload"), Some(&1));
        assert_eq!(t.errors.get("timeout"), Some(&1));
        assert_eq!(t.hist.len(), 99, "answers only");
        let p50 = t.percentile(0.5);
        assert!((1_990..=2_010).contains(&p50), "{p50}");
        assert!(t.percentile(1.0) >= 39_900);
        assert_eq!(s.channels[Channel::Events.index()].count, 101);
        assert_eq!(s.channels[Channel::Meta.index()].count, 0);
        // Series by completion second after warm-up: 0 (most), then 11 (the timeout).
        assert_eq!(s.series.len(), 12);
        assert_eq!(s.series[0].second, 0);
        assert_eq!(s.series[0].requests, 100);
        assert_eq!(s.series[0].ok, 98);
        assert_eq!(s.series[5].requests, 0, "gaps are filled");
        assert_eq!(s.series[11].errors, 1);
    }

    #[test]
    fn series_stragglers_go_to_the_next_open_second() {
        let mut s = Series::default();
        s.record(0, true, Some(10));
        s.record(1, true, Some(20));
        s.close_before(2);
        s.record(1, false, None); // late
        let pts = s.finish();
        assert_eq!(pts.len(), 3);
        assert_eq!(pts[2].second, 2);
        assert_eq!(pts[2].errors, 1);
    }
}
