//! Small shared helpers: duration parsing for the CLI, human formatting of latencies, the
//! current unix time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parses `30s`, `2m`, `1h`, `500ms`, `1.5s` or a bare number of seconds (`10`).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let s = raw.trim();
    if s.is_empty() {
        return Err("empty duration; use e.g. 30s, 2m, 500ms".into());
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "`{raw}`: unknown unit `{other}`; use ms, s, m or h (e.g. 30s, 2m)"
            ))
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{raw}` is not a duration; use e.g. 30s, 2m, 500ms"))?;
    let secs = value * scale;
    if !secs.is_finite() || secs > 31_536_000.0 {
        return Err(format!("`{raw}`: at most a year"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a byte size: `10240`, `10k` / `10KB` / `10KiB` (×1024), `1m` / `1MB` / `1MiB`.
pub fn parse_size(raw: &str) -> Result<usize, String> {
    let s = raw.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let scale: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        other => {
            return Err(format!(
                "`{raw}`: unknown unit `{other}`; use bytes, k or m (e.g. 10k)"
            ))
        }
    };
    let n: usize = num
        .parse()
        .map_err(|_| format!("`{raw}` is not a size; use e.g. 10240 or 10k"))?;
    n.checked_mul(scale)
        .ok_or_else(|| format!("`{raw}`: too large"))
}

/// A clap value parser for durations that must be above zero.
pub fn positive_duration(raw: &str) -> Result<Duration, String> {
    let d = parse_duration(raw)?;
    if d.is_zero() {
        return Err(format!("`{raw}`: must be more than zero"));
    }
    Ok(d)
}

/// Microseconds as a short human value: `850µs`, `12.3ms`, `1.25s`.
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 10_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

/// Seconds since the unix epoch (0 if the clock is before it).
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_with_suffixes() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(
            parse_duration(" 1.5s ").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    }

    #[test]
    fn bad_durations_are_errors_not_panics() {
        for bad in [
            "",
            "s",
            "abc",
            "10x",
            "-5s",
            "1..2s",
            "1e999s",
            "99999999999h",
            "5 d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(positive_duration("0s").is_err());
        assert!(positive_duration("1ms").is_ok());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10240").unwrap(), 10_240);
        assert_eq!(parse_size("10k").unwrap(), 10_240);
        assert_eq!(parse_size("10KiB").unwrap(), 10_240);
        assert_eq!(parse_size("2m").unwrap(), 2 * 1024 * 1024);
        for bad in ["", "k", "1.5k", "10x", "-1", "99999999999999999999m"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn latency_formatting() {
        assert_eq!(fmt_us(850), "850µs");
        assert_eq!(fmt_us(1_234), "1.23ms");
        assert_eq!(fmt_us(12_345), "12.3ms");
        assert_eq!(fmt_us(1_250_000), "1.25s");
    }
}
