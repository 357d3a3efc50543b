//! Reports of a run: machine-readable JSON (`--out`), a self-contained HTML page with inline
//! SVG charts (`--html`: no scripts, no network), and a short table on stdout.

use crate::channels::Channel;
use crate::run::{Mode, RunConfig, RunResult};
use crate::stats::{ChannelStats, SecondPoint};
use crate::util::fmt_us;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub started_at_unix_ms: u64,
    pub config: ConfigReport,
    /// The measured window after warm-up, in seconds (shorter than `duration` if interrupted).
    pub measured_secs: f64,
    /// Requests attempted, warm-up included.
    pub sent: u64,
    pub interrupted: bool,
    pub total: ChannelReport,
    pub channels: BTreeMap<String, ChannelReport>,
    /// One point per second of the measured window, by completion time.
    pub timeseries: Vec<SecondPoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked: Option<AckedReport>,
}

/// The run's settings (secrets are left out).
#[derive(Debug, Serialize)]
pub struct ConfigReport {
    pub target: String,
    /// `open` (fixed rate) or `closed` (back-to-back workers).
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    pub duration_secs: f64,
    pub warmup_secs: f64,
    pub mix: String,
    pub dup_ratio: f64,
    pub timeout_secs: f64,
    pub max_in_flight: usize,
    pub meta_batch: usize,
    pub twilio_url: String,
    pub wechat_account: String,
}

#[derive(Debug, Serialize)]
pub struct AckedReport {
    pub path: String,
    pub lines: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct DistPoint {
    /// Quantile in [0, 1].
    pub quantile: f64,
    /// 1 / (1 - quantile): the x axis of an HdrHistogram percentile plot.
    pub inverse: f64,
    pub value_us: u64,
}

#[derive(Debug, Serialize)]
pub struct ChannelReport {
    /// Outcomes (answers and errors, `client_overload` included).
    pub count: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Everything else: non-2xx answers plus transport errors.
    pub errors: u64,
    /// Answers by HTTP status.
    pub status: BTreeMap<String, u64>,
    /// Requests with no answer, by kind: connect, timeout, client_overload, request, body.
    pub error_kinds: BTreeMap<String, u64>,
    /// Re-sent earlier payloads (`--dup-ratio`).
    pub dup_sent: u64,
    /// Answers saying `"duplicate": true` (only the events route reports it).
    pub duplicate_answers: u64,
    /// Outcomes per second over the measured window.
    pub throughput_rps: f64,
    /// 2xx answers per second.
    pub ok_rps: f64,
    /// Latency of every HTTP answer, microseconds (HdrHistogram, 3 significant digits).
    pub latency_us: Latency,
    /// The percentile distribution for plotting.
    pub distribution: Vec<DistPoint>,
}

fn latency(s: &ChannelStats) -> Latency {
    let h = &s.hist;
    if h.is_empty() {
        return Latency {
            count: 0,
            min: 0,
            mean: 0.0,
            p50: 0,
            p90: 0,
            p99: 0,
            p999: 0,
            max: 0,
        };
    }
    Latency {
        count: h.len(),
        min: h.min(),
        mean: (h.mean() * 10.0).round() / 10.0,
        p50: s.percentile(0.5),
        p90: s.percentile(0.9),
        p99: s.percentile(0.99),
        p999: s.percentile(0.999),
        max: h.max(),
    }
}

/// Points at 1/(1-q) = 10^(k/20), up to where the histogram runs out of samples, plus the max.
pub fn distribution(s: &ChannelStats) -> Vec<DistPoint> {
    let h = &s.hist;
    let mut out = Vec::new();
    if h.is_empty() {
        return out;
    }
    let limit = (h.len() as f64).clamp(1.0, 1e6);
    let mut k = 0u32;
    loop {
        let inverse = 10f64.powf(f64::from(k) / 20.0);
        if inverse > limit {
            break;
        }
        let quantile = 1.0 - 1.0 / inverse;
        out.push(DistPoint {
            quantile,
            inverse,
            value_us: h.value_at_quantile(quantile),
        });
        k += 1;
    }
    out.push(DistPoint {
        quantile: 1.0,
        inverse: limit.max(out.last().map_or(1.0, |p| p.inverse)),
        value_us: h.max(),
    });
    out
}

fn channel_report(s: &ChannelStats, secs: f64) -> ChannelReport {
    let per_sec = |n: u64| {
        if secs > 0.0 {
            ((n as f64 / secs) * 10.0).round() / 10.0
        } else {
            0.0
        }
    };
    ChannelReport {
        count: s.count,
        ok: s.ok,
        errors: s.errors_total(),
        status: s
            .statuses
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        error_kinds: s.errors.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        dup_sent: s.dup_sent,
        duplicate_answers: s.duplicate_answers,
        throughput_rps: per_sec(s.count),
        ok_rps: per_sec(s.ok),
        latency_us: latency(s),
        distribution: distribution(s),
    }
}

pub fn build(cfg: &RunConfig, r: &RunResult, started_at_unix_ms: u64) -> Report {
    let secs = r.measured.as_secs_f64();
    let (mode, rate, concurrency) = match cfg.mode {
        Mode::Open { rate } => ("open", Some(rate), None),
        Mode::Closed { concurrency } => ("closed", None, Some(concurrency)),
    };
    let channels = Channel::ALL
        .iter()
        .filter(|c| cfg.mix.contains(**c))
        .map(|c| {
            (
                c.name().to_string(),
                channel_report(&r.stats.channels[c.index()], secs),
            )
        })
        .collect();
    Report {
        tool: "switchboard-loadtest",
        version: env!("CARGO_PKG_VERSION"),
        started_at_unix_ms,
        config: ConfigReport {
            target: cfg.target.clone(),
            mode,
            rate,
            concurrency,
            duration_secs: cfg.duration.as_secs_f64(),
            warmup_secs: cfg.warmup.as_secs_f64(),
            mix: cfg.mix.describe(),
            dup_ratio: cfg.dup_ratio,
            timeout_secs: cfg.timeout.as_secs_f64(),
            max_in_flight: cfg.max_in_flight,
            meta_batch: cfg.meta_batch,
            twilio_url: cfg.secrets.twilio_url.clone(),
            wechat_account: cfg.wechat_account.clone(),
        },
        measured_secs: (secs * 1000.0).round() / 1000.0,
        sent: r.sent,
        interrupted: r.interrupted,
        total: channel_report(&r.stats.total, secs),
        channels,
        timeseries: r.stats.series.clone(),
        acked: cfg.acked.as_ref().map(|p| AckedReport {
            path: p.display().to_string(),
            lines: r.acked_written,
            error: r.acked_error.clone(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Text summary

fn kv(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// "open loop at R req/s" or "closed loop with N workers".
fn mode(c: &ConfigReport) -> String {
    match (c.rate, c.concurrency) {
        (Some(r), _) => format!("open loop at {r} req/s"),
        (_, Some(n)) => format!("closed loop with {n} workers"),
        _ => String::new(),
    }
}

pub fn summary(rep: &Report) -> String {
    let mut s = String::new();
    let c = &rep.config;
    let how = mode(c);
    let _ = writeln!(
        s,
        "\n{} → {how}, {:.1}s measured after {:.1}s warm-up, mix {}{}",
        c.target,
        rep.measured_secs,
        c.warmup_secs,
        c.mix,
        if rep.interrupted {
            " (interrupted)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "{:<8} {:>9} {:>9} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "channel", "count", "ok", "errors", "req/s", "p50", "p90", "p99", "p99.9", "max"
    );
    let mut row = |name: &str, r: &ChannelReport| {
        let l = &r.latency_us;
        let _ = writeln!(
            s,
            "{:<8} {:>9} {:>9} {:>7} {:>9.1} {:>8} {:>8} {:>8} {:>8} {:>8}",
            name,
            r.count,
            r.ok,
            r.errors,
            r.throughput_rps,
            fmt_us(l.p50),
            fmt_us(l.p90),
            fmt_us(l.p99),
            fmt_us(l.p999),
            fmt_us(l.max)
        );
    };
    for (name, r) in &rep.channels {
        row(name, r);
    }
    row("total", &rep.total);
    for (name, r) in rep
        .channels
        .iter()
        .chain(std::iter::once((&"total".to_string(), &rep.total)))
    {
        let mut parts = Vec::new();
        if !r.status.is_empty() {
            parts.push(format!("status {}", kv(&r.status)));
        }
        if !r.error_kinds.is_empty() {
            parts.push(format!("errors {}", kv(&r.error_kinds)));
        }
        if r.dup_sent > 0 || r.duplicate_answers > 0 {
            parts.push(format!(
                "dups sent {} answered duplicate {}",
                r.dup_sent, r.duplicate_answers
            ));
        }
        if !parts.is_empty() {
            let _ = writeln!(s, "  {name}: {}", parts.join("; "));
        }
    }
    if let Some(a) = &rep.acked {
        let _ = writeln!(s, "acked: {} lines in {}", a.lines, a.path);
        if let Some(e) = &a.error {
            let _ = writeln!(s, "acked: WRITE FAILED: {e}");
        }
    }
    s
}

/// Advice for answers that point at the gateway's configuration rather than at its capacity.
pub fn hints(rep: &Report) -> Vec<String> {
    let mut out = Vec::new();
    for (name, r) in &rep.channels {
        let n404 = r.status.get("404").copied().unwrap_or(0);
        let n403 =
            r.status.get("403").copied().unwrap_or(0) + r.status.get("401").copied().unwrap_or(0);
        if n404 > 0 && r.ok == 0 {
            let how = match name.as_str() {
                "meta" => "the gateway ships with Meta off: start it with SWITCHBOARD_META__APP_SECRETS='[\"<--meta-app-secret>\"]'",
                "wechat" => "the gateway ships with WeChat off: start it with SWITCHBOARD_WECHAT__TOKENS='[\"<--wechat-token>\"]'",
                _ => "check --target",
            };
            out.push(format!("{name}: every answer was 404; {how}"));
        }
        if n403 > 0 {
            let how = match name.as_str() {
                "events" => "--api-secret must be one of the gateway's api.secrets (SWITCHBOARD_API__SECRETS); clocks must agree within 300 s",
                "twilio" => "--twilio-auth-token must match twilio.auth_tokens and --twilio-url the gateway's twilio.public_url (SWITCHBOARD_TWILIO__PUBLIC_URL)",
                "meta" => "--meta-app-secret must be one of meta.app_secrets (SWITCHBOARD_META__APP_SECRETS)",
                "wechat" => "--wechat-token must be one of wechat.tokens (SWITCHBOARD_WECHAT__TOKENS) and wechat.encryption must be plain",
                _ => "",
            };
            out.push(format!(
                "{name}: {n403} answers refused the signature; {how}"
            ));
        }
    }
    if let Some(n) = rep.total.status.get("429").filter(|n| **n > 0) {
        out.push(format!(
            "{n} answers were 429 rate_limited: the gateway limits each source address (limits.per_source, 500/s burst 2000 by default); for load tests raise it (SWITCHBOARD_LIMITS__PER_SOURCE__PER_SECOND, ..._BURST) or set SWITCHBOARD_LIMITS__ENABLED=false"
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HTML

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Ticks at 1, 2 or 5 × 10^k covering `0..=max`; returns the ticks and the axis top.
pub fn nice_ticks(max: f64, target: usize) -> (Vec<f64>, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let top = (max / step).ceil() * step;
    let n = (top / step).round() as usize;
    ((0..=n).map(|i| i as f64 * step).collect(), top)
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
    dashed: bool,
}

struct Axis {
    label: String,
    min: f64,
    max: f64,
    ticks: Vec<(f64, String)>,
}

const COLORS: &[&str] = &["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728"];

/// A shaded band over part of the x axis, with a label.
struct Band<'a> {
    from: f64,
    to: f64,
    label: &'a str,
}

fn svg_chart(title: &str, x: &Axis, y: &Axis, series: &[Series], band: Option<Band>) -> String {
    let (w, h) = (860.0, 340.0);
    let (l, r, t, b) = (70.0, 150.0, 34.0, 48.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let sx = |v: f64| {
        let span = (x.max - x.min).max(1e-12);
        l + (v - x.min) / span * pw
    };
    let sy = |v: f64| {
        let span = (y.max - y.min).max(1e-12);
        t + ph - (v.clamp(y.min, y.max) - y.min) / span * ph
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{t_esc}"><rect width="100%" height="100%" fill="#fff"/><text x="{l}" y="20" font-size="15" font-weight="bold">{t_esc}</text>"##,
        t_esc = esc(title)
    );
    if let Some(b) = band {
        let (x0, x1) = (sx(b.from.max(x.min)), sx(b.to.min(x.max)));
        if x1 > x0 {
            let _ = write!(
                s,
                r##"<rect x="{x0:.1}" y="{t}" width="{w:.1}" height="{ph}" fill="#f0f0f0"/><text x="{tx:.1}" y="{ty}" font-size="10" fill="#777">{lab}</text>"##,
                w = x1 - x0,
                tx = x0 + 3.0,
                ty = t + 12.0,
                lab = esc(b.label)
            );
        }
    }
    for (v, label) in &y.ticks {
        let yy = sy(*v);
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e3e3e3"/><text x="{tx}" y="{ty:.1}" font-size="11" text-anchor="end">{lab}</text>"##,
            x2 = l + pw,
            tx = l - 6.0,
            ty = yy + 4.0,
            lab = esc(label)
        );
    }
    for (v, label) in &x.ticks {
        let xx = sx(*v);
        let _ = write!(
            s,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{t}" y2="{y2}" stroke="#eeeeee"/><text x="{xx:.1}" y="{ty}" font-size="11" text-anchor="middle">{lab}</text>"##,
            y2 = t + ph,
            ty = t + ph + 16.0,
            lab = esc(label)
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#888"/><text x="{cx}" y="{by}" font-size="12" text-anchor="middle">{xl}</text><text transform="translate(16,{cy}) rotate(-90)" font-size="12" text-anchor="middle">{yl}</text>"##,
        cx = l + pw / 2.0,
        by = h - 8.0,
        cy = t + ph / 2.0,
        xl = esc(&x.label),
        yl = esc(&y.label)
    );
    for (i, se) in series.iter().enumerate() {
        if !se.points.is_empty() {
            let pts: Vec<String> = se
                .points
                .iter()
                .map(|(a, b)| format!("{:.1},{:.1}", sx(*a), sy(*b)))
                .collect();
            let dash = if se.dashed {
                r#" stroke-dasharray="5,3""#
            } else {
                ""
            };
            let _ = write!(
                s,
                r##"<polyline fill="none" stroke="{c}" stroke-width="1.8"{dash} points="{p}"><title>{n}</title></polyline>"##,
                c = se.color,
                p = pts.join(" "),
                n = esc(se.name)
            );
        }
        let ly = t + 14.0 + i as f64 * 18.0;
        let lx = l + pw + 12.0;
        let _ = write!(
            s,
            r##"<line x1="{lx}" x2="{lx2}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2.5"/><text x="{tx}" y="{ty}" font-size="12">{n}</text>"##,
            lx2 = lx + 20.0,
            tx = lx + 26.0,
            ty = ly + 4.0,
            c = se.color,
            n = esc(se.name)
        );
    }
    s.push_str("</svg>");
    s
}

fn ms_axis(label: &str, max_us: u64) -> Axis {
    let (ticks, top) = nice_ticks(max_us as f64 / 1000.0, 6);
    Axis {
        label: label.into(),
        min: 0.0,
        max: top,
        ticks: ticks.into_iter().map(|v| (v, fmt_num(v))).collect(),
    }
}

fn seconds_axis(n: usize) -> Axis {
    let (ticks, top) = nice_ticks(n.max(1) as f64, 10);
    Axis {
        label: "seconds after warm-up (by completion time)".into(),
        min: 0.0,
        max: top,
        ticks: ticks.into_iter().map(|v| (v, fmt_num(v))).collect(),
    }
}

/// The seconds after the last send: only answers still in flight complete there.
fn drain(rep: &Report) -> Option<Band<'static>> {
    let last = rep.timeseries.last()?.second as f64 + 1.0;
    let from = rep.measured_secs.floor();
    (last > from).then_some(Band {
        from,
        to: last,
        label: "drain",
    })
}

fn latency_over_time(rep: &Report) -> String {
    let ts = &rep.timeseries;
    let max = ts.iter().map(|p| p.p99_us).max().unwrap_or(0).max(1);
    let pick = |f: fn(&SecondPoint) -> u64| -> Vec<(f64, f64)> {
        ts.iter()
            .filter(|p| p.requests > p.errors || p.p50_us > 0)
            .map(|p| (p.second as f64 + 0.5, f(p) as f64 / 1000.0))
            .collect()
    };
    svg_chart(
        "Latency over time (all channels, per second)",
        &seconds_axis(ts.len()),
        &ms_axis("latency (ms)", max),
        &[
            Series {
                name: "p50",
                color: COLORS[0],
                points: pick(|p| p.p50_us),
                dashed: false,
            },
            Series {
                name: "p99",
                color: COLORS[4],
                points: pick(|p| p.p99_us),
                dashed: false,
            },
        ],
        drain(rep),
    )
}

fn throughput_over_time(rep: &Report) -> String {
    let ts = &rep.timeseries;
    let max = ts.iter().map(|p| p.requests).max().unwrap_or(0).max(1);
    let (ticks, top) = nice_ticks(max as f64, 6);
    let y = Axis {
        label: "requests / s".into(),
        min: 0.0,
        max: top,
        ticks: ticks.into_iter().map(|v| (v, fmt_num(v))).collect(),
    };
    let pts = |f: fn(&SecondPoint) -> u64| -> Vec<(f64, f64)> {
        ts.iter()
            .map(|p| (p.second as f64 + 0.5, f(p) as f64))
            .collect()
    };
    svg_chart(
        "Throughput over time (completions per second)",
        &seconds_axis(ts.len()),
        &y,
        &[
            Series {
                name: "all answers",
                color: COLORS[0],
                points: pts(|p| p.requests),
                dashed: false,
            },
            Series {
                name: "2xx",
                color: COLORS[2],
                points: pts(|p| p.ok),
                dashed: true,
            },
            Series {
                name: "errors",
                color: COLORS[4],
                points: pts(|p| p.errors),
                dashed: false,
            },
        ],
        drain(rep),
    )
}

fn percentile_label(inverse: f64) -> String {
    let q = 100.0 * (1.0 - 1.0 / inverse);
    if inverse <= 1.0 {
        "0%".into()
    } else {
        let s = format!("{q:.5}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s}%")
    }
}

fn distribution_chart(rep: &Report) -> String {
    let mut all: Vec<(&str, &ChannelReport)> =
        rep.channels.iter().map(|(n, r)| (n.as_str(), r)).collect();
    all.push(("total", &rep.total));
    let max_inverse = all
        .iter()
        .flat_map(|(_, r)| r.distribution.iter().map(|p| p.inverse))
        .fold(10.0f64, f64::max);
    let decades = max_inverse.log10().ceil().max(1.0) as u32;
    let x = Axis {
        label: "percentile (log scale of 1/(1-q))".into(),
        min: 0.0,
        max: f64::from(decades),
        ticks: (0..=decades)
            .map(|d| (f64::from(d), percentile_label(10f64.powi(d as i32))))
            .collect(),
    };
    let max_us = all
        .iter()
        .map(|(_, r)| r.latency_us.max)
        .max()
        .unwrap_or(1)
        .max(1);
    let series: Vec<Series> = all
        .iter()
        .enumerate()
        .map(|(i, (name, r))| Series {
            name,
            color: if *name == "total" {
                "#000000"
            } else {
                COLORS[i % COLORS.len()]
            },
            points: r
                .distribution
                .iter()
                .map(|p| (p.inverse.log10(), p.value_us as f64 / 1000.0))
                .collect(),
            dashed: *name == "total",
        })
        .collect();
    svg_chart(
        "Latency by percentile",
        &x,
        &ms_axis("latency (ms)", max_us),
        &series,
        None,
    )
}

pub fn html(rep: &Report) -> String {
    let mut s = String::new();
    let c = &rep.config;
    let how = mode(c);
    let _ = write!(
        s,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>switchboard-loadtest report</title><style>
body{{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222}}
table{{border-collapse:collapse;margin:12px 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}
.small{{color:#555;font-size:13px}}svg{{display:block;margin:18px 0;max-width:100%;height:auto}}
</style></head><body><h1>Switchboard load test</h1>
<p>{target}: {how}, {measured:.1} s measured after {warmup:.1} s warm-up; mix <code>{mix}</code>; dup ratio {dup}; timeout {timeout} s{intr}.</p>
"#,
        target = esc(&c.target),
        how = esc(&how),
        measured = rep.measured_secs,
        warmup = c.warmup_secs,
        mix = esc(&c.mix),
        dup = c.dup_ratio,
        timeout = c.timeout_secs,
        intr = if rep.interrupted {
            " (interrupted)"
        } else {
            ""
        },
    );
    s.push_str("<table><tr><th>channel</th><th>count</th><th>2xx</th><th>errors</th><th>req/s</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th><th>statuses</th><th>errors by kind</th></tr>");
    let mut rows: Vec<(&str, &ChannelReport)> =
        rep.channels.iter().map(|(n, r)| (n.as_str(), r)).collect();
    rows.push(("total", &rep.total));
    for (name, r) in rows {
        let l = &r.latency_us;
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            r.count,
            r.ok,
            r.errors,
            r.throughput_rps,
            fmt_us(l.p50),
            fmt_us(l.p90),
            fmt_us(l.p99),
            fmt_us(l.p999),
            fmt_us(l.max),
            esc(&kv(&r.status)),
            esc(&kv(&r.error_kinds)),
        );
    }
    s.push_str("</table>");
    s.push_str(r#"<p class="small">Latency in open loop runs from each request's scheduled send time (coordinated-omission free); in closed loop from the actual send. Histograms: HdrHistogram, 1 µs – 60 s, 3 significant digits; every HTTP answer counts, transport errors do not.</p>"#);
    s.push_str(&latency_over_time(rep));
    s.push_str(&throughput_over_time(rep));
    s.push_str(&distribution_chart(rep));
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::{Mix, Secrets};
    use crate::stats::{Collector, ErrorKind, Outcome};
    use std::time::{Duration, Instant};

    fn sample() -> (RunConfig, RunResult) {
        let start = Instant::now();
        let mut c = Collector::new(start, Duration::ZERO, None);
        for i in 0..1000u64 {
            let intended = start + Duration::from_millis(i * 3);
            let channel = if i % 2 == 0 {
                Channel::Events
            } else {
                Channel::Twilio
            };
            c.record(Outcome {
                channel,
                intended,
                done: intended + Duration::from_micros(500 + i * 7),
                result: if i % 100 == 7 {
                    Err(ErrorKind::Timeout)
                } else {
                    Ok(if channel == Channel::Events { 202 } else { 200 })
                },
                dup: i % 20 == 0,
                duplicate_answer: i % 40 == 0,
                acked: vec![],
            })
            .unwrap();
        }
        let (stats, _) = c.finish().unwrap();
        let cfg = RunConfig {
            target: "http://127.0.0.1:8080".into(),
            mode: Mode::Open { rate: 333.0 },
            duration: Duration::from_secs(3),
            warmup: Duration::ZERO,
            mix: Mix::parse("events=1,twilio=1").unwrap(),
            dup_ratio: 0.05,
            timeout: Duration::from_secs(10),
            max_in_flight: 10_000,
            meta_batch: 1,
            wechat_account: "gh_<x>".into(),
            secrets: Secrets {
                api_secret: "SECRET-API".into(),
                twilio_auth_token: "SECRET-TW".into(),
                twilio_url: "http://127.0.0.1:8080".into(),
                meta_app_secret: "SECRET-META".into(),
                wechat_token: "SECRETWX".into(),
            },
            acked: None,
            progress: false,
            catch_interrupt: false,
        };
        let r = RunResult {
            stats,
            measured: Duration::from_secs(3),
            sent: 1000,
            acked_written: 0,
            acked_error: None,
            interrupted: false,
        };
        (cfg, r)
    }

    #[test]
    fn json_report_has_percentiles_counts_and_series() {
        let (cfg, r) = sample();
        let rep = build(&cfg, &r, 1);
        let v = serde_json::to_value(&rep).unwrap();
        assert_eq!(v["total"]["count"], 1000);
        assert_eq!(v["total"]["ok"], 990);
        assert_eq!(v["total"]["errors"], 10);
        assert_eq!(v["total"]["error_kinds"]["timeout"], 10);
        assert_eq!(v["channels"]["events"]["status"]["202"], 500);
        assert_eq!(v["channels"]["twilio"]["status"]["200"], 490);
        assert_eq!(v["total"]["dup_sent"], 50);
        assert_eq!(v["total"]["duplicate_answers"], 25);
        assert!(
            v["channels"].get("meta").is_none(),
            "only channels in the mix"
        );
        let l = &v["total"]["latency_us"];
        let p50 = l["p50"].as_u64().unwrap();
        // Latencies 500 + 7i µs, i < 1000 (minus the timeouts): median near 500 + 3500.
        assert!((3_900..=4_100).contains(&p50), "{p50}");
        assert!(l["p99"].as_u64().unwrap() >= l["p90"].as_u64().unwrap());
        assert!(l["max"].as_u64().unwrap() >= 7_380);
        assert!((v["total"]["throughput_rps"].as_f64().unwrap() - 333.3).abs() < 0.1);
        let ts = v["timeseries"].as_array().unwrap();
        assert!(ts.len() >= 3);
        assert!(ts[0]["p99_us"].as_u64().unwrap() >= ts[0]["p50_us"].as_u64().unwrap());
        let dist = v["total"]["distribution"].as_array().unwrap();
        assert_eq!(dist[0]["quantile"], 0.0);
        assert_eq!(dist.last().unwrap()["quantile"], 1.0);
        // Secrets never reach the report.
        let text = serde_json::to_string(&rep).unwrap();
        assert!(!text.contains("SECRET"));
    }

    #[test]
    fn html_is_self_contained_with_svg() {
        let (cfg, r) = sample();
        let rep = build(&cfg, &r, 1);
        let page = html(&rep);
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert_eq!(page.matches("<svg").count(), 3);
        assert!(page.contains("Latency by percentile"));
        assert!(page.contains("99.9%"));
        assert!(page.contains("<polyline"));
        assert!(
            page.contains(">drain</text>"),
            "the tail after the last send is marked"
        );
        assert!(!page.contains("<script"));
        assert!(!page.contains("src=\"http"));
        assert!(!page.contains("SECRET"));
        // User-supplied text is escaped.
        assert!(page.contains("gh_&lt;x&gt;") || !page.contains("gh_<x>"));
        let text = summary(&rep);
        assert!(text.contains("total"));
        assert!(text.contains("timeout=10"));
    }

    #[test]
    fn ticks_and_labels() {
        let (t, top) = nice_ticks(7.3, 6);
        assert_eq!(top, 8.0);
        assert_eq!(t, vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        let (t, top) = nice_ticks(0.0, 6);
        assert_eq!((t.len(), top), (6, 1.0));
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(100000.0), "99.999%");
    }

    #[test]
    fn empty_run_reports_without_panicking() {
        let (cfg, _) = sample();
        let c = Collector::new(Instant::now(), Duration::ZERO, None);
        let (stats, _) = c.finish().unwrap();
        let r = RunResult {
            stats,
            measured: Duration::ZERO,
            sent: 0,
            acked_written: 0,
            acked_error: None,
            interrupted: true,
        };
        let rep = build(&cfg, &r, 0);
        assert_eq!(rep.total.throughput_rps, 0.0);
        assert!(html(&rep).contains("<svg"));
        assert!(summary(&rep).contains("interrupted"));
    }
}
