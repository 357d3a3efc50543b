//! Process resources: the file-descriptor limit of the harness, and per-second samples of the
//! gateway's memory (VmRSS from `/proc/PID/status`) and CPU time (utime + stime from
//! `/proc/PID/stat`), plus the harness's own CPU time (`/proc/self/stat`).
//!
//! Linux only; elsewhere the samples are empty. The /proc parsing is a few lines of text
//! splitting, written here rather than pulling in a procfs crate for two fields.

use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Clock ticks per second of the CPU times in `/proc/PID/stat` (`USER_HZ`). The kernel reports
/// them in USER_HZ, which is 100 on every Linux architecture the harness runs on (x86, arm);
/// reading sysconf(_SC_CLK_TCK) would need libc and `unsafe`.
pub const USER_HZ: f64 = 100.0;

/// Raises the soft RLIMIT_NOFILE to the hard limit; `(before, after, hard)`.
pub fn raise_nofile() -> Result<(u64, u64, u64), String> {
    let (soft, hard) = rlimit::Resource::NOFILE
        .get()
        .map_err(|e| format!("cannot read RLIMIT_NOFILE: {e}"))?;
    let after = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("cannot raise RLIMIT_NOFILE: {e}"))?;
    Ok((soft, after, hard))
}

/// `VmRSS` of a `/proc/PID/status` text, in KiB.
pub fn parse_rss_kb(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// utime + stime (clock ticks) of a `/proc/PID/stat` line. The command name (field 2) is in
/// parentheses and may hold spaces or parentheses itself: fields are counted after the last `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Least-squares slope of `(x, y)` points, in y per x; `None` below two distinct x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= f64::EPSILON {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    Some(sxy / sxx)
}

fn read_proc(pid: &str, file: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()
}

/// One reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Seconds since the start of the measured window.
    pub t: f64,
    pub rss_kb: Option<u64>,
    pub gateway_ticks: Option<u64>,
    pub self_ticks: Option<u64>,
}

/// Reads the gateway's (if any) and this process's figures now.
pub fn read(pid: Option<u32>, t: f64) -> Reading {
    let (rss_kb, gateway_ticks) = match pid {
        Some(p) => {
            let p = p.to_string();
            (
                read_proc(&p, "status").as_deref().and_then(parse_rss_kb),
                read_proc(&p, "stat").as_deref().and_then(parse_cpu_ticks),
            )
        }
        None => (None, None),
    };
    Reading {
        t,
        rss_kb,
        gateway_ticks,
        self_ticks: read_proc("self", "stat")
            .as_deref()
            .and_then(parse_cpu_ticks),
    }
}

/// Whether `/proc/PID` is there (the gateway runs and this is Linux).
pub fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
}

/// Reads a pid file: the first line, a positive number.
pub fn read_pid_file(path: &std::path::Path) -> Result<u32, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--gateway-pid-file {}: {e}", path.display()))?;
    text.lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            format!(
                "--gateway-pid-file {}: the first line is not a process id",
                path.display()
            )
        })
}

/// Samples once a second from `from` until `stop`; the readings (the first at t = 0).
pub async fn sample(pid: Option<u32>, from: Instant, stop: Arc<AtomicBool>) -> Vec<Reading> {
    let mut out = Vec::new();
    let mut ticker = tokio::time::interval_at(from.into(), Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let t = Instant::now().saturating_duration_since(from).as_secs_f64();
        // /proc reads are in-memory and take microseconds: fine on the runtime.
        let r = read(pid, t);
        let gone = pid.is_some() && r.rss_kb.is_none();
        out.push(r);
        if gone || stop.load(Ordering::Relaxed) {
            return out;
        }
    }
}

/// One second's figures: the gateway's RSS at its end and the CPU used in it.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct ResourceSample {
    /// The gateway's RSS at the end of the second, MB (with `--gateway-pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_rss_mb: Option<f64>,
    /// CPU cores the gateway used in the second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_cpu_cores: Option<f64>,
    /// CPU cores the harness used in the second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loadgen_cpu_cores: Option<f64>,
}

/// Per second of the measured window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ResourcePoint {
    pub second: u64,
    #[serde(flatten)]
    pub sample: ResourceSample,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RssSummary {
    pub start: f64,
    pub end: f64,
    pub min: f64,
    pub max: f64,
    /// Least-squares slope over the measured window, MB per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slope_mb_per_min: Option<f64>,
}

/// What the report says about the gateway process and the harness.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ResourceReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_pid: Option<u32>,
    pub samples: usize,
    /// RSS in MB (10^6 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_rss_mb: Option<RssSummary>,
    /// CPU time used over wall time: 1.0 is one core busy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_cpu_cores: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loadgen_cpu_cores: Option<f64>,
    /// The gateway process disappeared during the run.
    pub gateway_exited: bool,
    pub series: Vec<ResourcePoint>,
}

fn mb(kb: u64) -> f64 {
    (kb as f64 * 1024.0 / 1e6 * 100.0).round() / 100.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn cores(a: Option<u64>, b: Option<u64>, secs: f64) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if secs > 0.0 && b >= a => Some(round3((b - a) as f64 / USER_HZ / secs)),
        _ => None,
    }
}

/// Summarises readings taken by [`sample`].
pub fn summarise(pid: Option<u32>, r: &[Reading]) -> ResourceReport {
    let mut series = Vec::new();
    for w in r.windows(2) {
        let secs = w[1].t - w[0].t;
        series.push(ResourcePoint {
            second: w[0].t.round() as u64,
            sample: ResourceSample {
                gateway_rss_mb: w[1].rss_kb.map(mb),
                gateway_cpu_cores: cores(w[0].gateway_ticks, w[1].gateway_ticks, secs),
                loadgen_cpu_cores: cores(w[0].self_ticks, w[1].self_ticks, secs),
            },
        });
    }
    let rss: Vec<(f64, f64)> = r
        .iter()
        .filter_map(|x| x.rss_kb.map(|kb| (x.t, mb(kb))))
        .collect();
    let gateway_rss_mb = (!rss.is_empty()).then(|| RssSummary {
        start: rss[0].1,
        end: rss[rss.len() - 1].1,
        min: rss.iter().map(|p| p.1).fold(f64::INFINITY, f64::min),
        max: rss.iter().map(|p| p.1).fold(0.0, f64::max),
        slope_mb_per_min: slope(&rss).map(|s| round3(s * 60.0)),
    });
    let span = |f: fn(&Reading) -> Option<u64>| {
        let pts: Vec<(f64, u64)> = r.iter().filter_map(|x| f(x).map(|v| (x.t, v))).collect();
        match (pts.first(), pts.last()) {
            (Some(a), Some(b)) => cores(Some(a.1), Some(b.1), b.0 - a.0),
            _ => None,
        }
    };
    ResourceReport {
        gateway_pid: pid,
        samples: r.len(),
        gateway_rss_mb,
        gateway_cpu_cores: span(|x| x.gateway_ticks),
        loadgen_cpu_cores: span(|x| x.self_ticks),
        gateway_exited: pid.is_some() && r.last().is_some_and(|x| x.rss_kb.is_none()),
        series,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tswitchboard\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\nVmPeak:\t  912344 kB\nVmSize:\t  850112 kB\nVmHWM:\t   98304 kB\nVmRSS:\t   81920 kB\nRssAnon:\t   61440 kB\nThreads:\t12\n";
    // A command name with a space and a parenthesis, as /proc shows it.
    const STAT: &str = "4242 (switch (board) x) S 1 4242 4242 0 -1 4194560 12345 0 0 0 1500 250 0 0 20 0 12 0 987654 870514688 20480 18446744073709551615 1 1 0 0 0 0 0 4096 17647 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn proc_files_parse() {
        assert_eq!(parse_rss_kb(STATUS), Some(81_920));
        assert_eq!(parse_rss_kb("Name:\tx\n"), None);
        assert_eq!(parse_rss_kb("VmRSS:\tlots kB\n"), None);
        assert_eq!(parse_cpu_ticks(STAT), Some(1_750));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_cpu_ticks(""), None);
        // This very process, on Linux.
        if cfg!(target_os = "linux") {
            let r = read(Some(std::process::id()), 0.0);
            assert!(r.rss_kb.unwrap() > 0);
            assert!(r.gateway_ticks.is_some() && r.self_ticks.is_some());
            assert!(process_exists(std::process::id()));
        }
    }

    #[test]
    fn slopes_by_least_squares() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 + 2.0 * i as f64)).collect();
        assert!((slope(&line).unwrap() - 2.0).abs() < 1e-9);
        let flat = [(0.0, 5.0), (1.0, 7.0), (2.0, 5.0), (3.0, 7.0)];
        assert!((slope(&flat).unwrap() - 0.4).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 1.0)]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }

    #[test]
    fn summaries_per_second_and_over_the_run() {
        // RSS grows 1 MiB every second; the gateway uses half a core, the harness a quarter.
        let r: Vec<Reading> = (0..=60)
            .map(|i| Reading {
                t: i as f64,
                rss_kb: Some(100 * 1024 + i * 1024),
                gateway_ticks: Some(1000 + i * 50),
                self_ticks: Some(i * 25),
            })
            .collect();
        let s = summarise(Some(7), &r);
        assert_eq!(s.samples, 61);
        assert_eq!(s.series.len(), 60);
        assert_eq!(s.series[0].sample.gateway_cpu_cores, Some(0.5));
        assert_eq!(s.series[0].sample.loadgen_cpu_cores, Some(0.25));
        let rss = s.gateway_rss_mb.unwrap();
        assert_eq!(rss.start, 104.86);
        assert_eq!(rss.max, rss.end);
        // 1 MiB/s = 62.9 MB/min.
        assert!(
            (rss.slope_mb_per_min.unwrap() - 62.915).abs() < 0.01,
            "{rss:?}"
        );
        assert_eq!(s.gateway_cpu_cores, Some(0.5));
        assert!(!s.gateway_exited);
        // The gateway went away at the end.
        let mut r2 = r.clone();
        r2.push(Reading {
            t: 61.0,
            rss_kb: None,
            gateway_ticks: None,
            self_ticks: Some(1600),
        });
        assert!(summarise(Some(7), &r2).gateway_exited);
        // No pid: only the harness's own CPU.
        let s = summarise(None, &[]);
        assert_eq!((s.samples, s.gateway_rss_mb.is_none()), (0, true));
    }

    #[test]
    fn pid_files() {
        let p = std::env::temp_dir().join(format!("lt-pid-{}", ulid::Ulid::new()));
        std::fs::write(&p, "4242\n").unwrap();
        assert_eq!(read_pid_file(&p).unwrap(), 4242);
        std::fs::write(&p, "nope\n").unwrap();
        assert!(read_pid_file(&p).is_err());
        std::fs::remove_file(&p).ok();
        assert!(read_pid_file(&p).is_err());
    }

    #[test]
    fn the_fd_limit_can_be_raised_to_the_hard_limit() {
        let (before, after, hard) = raise_nofile().unwrap();
        assert!(after >= before);
        assert!(after <= hard);
    }
}
