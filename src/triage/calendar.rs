//! SLA clocks with a business calendar.
//!
//! A [`Calendar`] knows a time zone, the weekly non-working days, public holidays and make-up
//! working days (China's 调休: a weekend day that is worked to bridge a holiday). It turns an
//! intake instant plus an [`SlaDuration`] into a due instant with [`Calendar::due`].
//!
//! # Semantics of [`Calendar::due`]
//!
//! * `Minutes(n)` (written `30m`, `4h`): `start + n` minutes of wall-clock time. The calendar and
//!   the time zone are ignored, so DST changes neither add nor remove time.
//! * `WorkingDays(n)` (written `3wd`): `start` is converted to local time in the calendar's zone.
//!   If that local date is a working day the clock starts at that local instant; otherwise it
//!   starts at 00:00 local time of the next working day. The due time is the same local
//!   time-of-day `n` working days after the clock-start date, skipping non-working days.
//!   `WorkingDays(0)` is the clock-start instant itself (so `start` unchanged on a working day).
//!   Example (Asia/Shanghai, Saturday and Sunday off): Friday 15:00 + 1wd = Monday 15:00;
//!   Saturday 10:00 + 3wd = clock starts Monday 00:00, due Thursday 00:00.
//! * A working day is: a date listed in `workdays`; otherwise any date that is neither a weekend
//!   day nor listed in `holidays`. A date may not be both a holiday and a make-up workday; a
//!   make-up workday that falls on an ordinary weekday is accepted and changes nothing.
//! * If the local due time does not exist (DST gap, e.g. 02:30 on the spring-forward night) the
//!   first valid instant after the gap is used (03:00 after the jump). If it is ambiguous (DST
//!   fold) the earlier of the two instants is used.
//! * Termination guard: if [`MAX_IDLE_DAYS`] (about three years) consecutive non-working days
//!   are found while counting (only possible with adjoining huge holiday ranges, since a
//!   seven-day weekend is rejected), every remaining working day is counted as one calendar
//!   day from that point on.
//! * Results that would fall outside chrono's representable range saturate at
//!   `DateTime::<Utc>::MAX_UTC` (a working-day clock started within hours of
//!   `DateTime::<Utc>::MIN_UTC`, whose local time is unrepresentable, is due at `start`);
//!   `due` never panics and is never earlier than `start`.
//!
//! `due` does no allocation; long stretches without holidays or make-up days are skipped a
//! whole week at a time, so its cost depends on the number of listed dates in the interval,
//! not on `n`.

use std::fmt;
use std::str::FromStr;

use chrono::{
    DateTime, Datelike, Days, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeDelta,
    TimeZone, Utc, Weekday,
};
use chrono_tz::{GapInfo, Tz};
use serde::Deserialize;

/// Largest accepted wall-clock SLA: 365 days, in minutes.
pub const MAX_SLA_MINUTES: u32 = 365 * 24 * 60;
/// Largest accepted working-day SLA.
pub const MAX_SLA_WORKING_DAYS: u32 = 365;
/// Longest accepted holiday or workday range, inclusive, in days.
pub const MAX_RANGE_DAYS: i64 = 366;
/// Consecutive non-working days after which [`Calendar::due`] falls back to calendar days.
pub const MAX_IDLE_DAYS: u32 = 1096;

fn default_time_zone() -> String {
    "Asia/Shanghai".to_owned()
}

fn default_weekend() -> Vec<String> {
    vec!["sat".to_owned(), "sun".to_owned()]
}

/// A business calendar as written in the rule file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CalendarSpec {
    /// IANA zone, default "Asia/Shanghai".
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
    /// Non-working weekdays, default `["sat", "sun"]`; `mon`..`sun` or full names, any case.
    #[serde(default = "default_weekend")]
    pub weekend: Vec<String>,
    /// Public holidays: "YYYY-MM-DD" or an inclusive range "YYYY-MM-DD..YYYY-MM-DD".
    #[serde(default)]
    pub holidays: Vec<String>,
    /// Make-up working days on what would be weekend days (China's 调休), same syntax.
    #[serde(default)]
    pub workdays: Vec<String>,
}

impl Default for CalendarSpec {
    fn default() -> Self {
        Self {
            time_zone: default_time_zone(),
            weekend: default_weekend(),
            holidays: Vec::new(),
            workdays: Vec::new(),
        }
    }
}

/// An SLA time limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlaDuration {
    /// Wall-clock minutes; the calendar is ignored.
    Minutes(u32),
    /// Working days in the calendar's time zone.
    WorkingDays(u32),
}

impl FromStr for SlaDuration {
    type Err = String;

    /// Parses `30m`, `4h` (stored as 240 minutes) or `3wd`. Surrounding spaces are ignored, as
    /// are spaces between number and unit. Zero is allowed; negative, fractional, unit-less and
    /// over-long values (beyond 365 days or 365 working days) are rejected.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const HINT: &str =
            "expected a whole number followed by m, h or wd, e.g. \"30m\", \"4h\", \"3wd\"";
        let t = s.trim();
        if t.is_empty() {
            return Err(format!("empty SLA duration: {HINT}"));
        }
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(digits_end);
        let unit = unit.trim_start();
        if number.is_empty() {
            if t.starts_with('-') {
                return Err(format!(
                    "invalid SLA duration {t:?}: negative durations are not allowed"
                ));
            }
            return Err(format!("invalid SLA duration {t:?}: {HINT}"));
        }
        if unit.starts_with(['.', ',']) {
            return Err(format!(
                "invalid SLA duration {t:?}: fractions are not allowed, use a smaller unit (e.g. \"90m\")"
            ));
        }
        if unit.is_empty() {
            return Err(format!("invalid SLA duration {t:?}: missing unit; {HINT}"));
        }
        let too_long = || {
            format!(
                "invalid SLA duration {t:?}: too long (at most {}h or {MAX_SLA_WORKING_DAYS}wd)",
                MAX_SLA_MINUTES / 60
            )
        };
        // Only ASCII digits remain, so the only possible parse error is overflow.
        let value: u64 = number.parse().map_err(|_| too_long())?;
        match unit {
            "m" | "h" => {
                let minutes = if unit == "h" {
                    value.checked_mul(60).ok_or_else(too_long)?
                } else {
                    value
                };
                match u32::try_from(minutes) {
                    Ok(m) if m <= MAX_SLA_MINUTES => Ok(Self::Minutes(m)),
                    _ => Err(too_long()),
                }
            }
            "wd" => match u32::try_from(value) {
                Ok(n) if n <= MAX_SLA_WORKING_DAYS => Ok(Self::WorkingDays(n)),
                _ => Err(too_long()),
            },
            other => Err(format!(
                "invalid SLA duration {t:?}: unknown unit {other:?}; {HINT}"
            )),
        }
    }
}

impl fmt::Display for SlaDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Minutes(m) if m % 60 == 0 => write!(f, "{}h", m / 60),
            Self::Minutes(m) => write!(f, "{m}m"),
            Self::WorkingDays(n) => write!(f, "{n}wd"),
        }
    }
}

/// A validated business calendar; see the module documentation for the semantics of
/// [`Calendar::due`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calendar {
    tz: Tz,
    /// Indexed by `Weekday::num_days_from_monday()`; `true` = non-working.
    weekend: [bool; 7],
    /// Sorted, deduplicated.
    holidays: Vec<NaiveDate>,
    /// Sorted, deduplicated, disjoint from `holidays`.
    workdays: Vec<NaiveDate>,
}

impl Default for Calendar {
    /// Asia/Shanghai, Saturday and Sunday off, no holidays (same as
    /// `Calendar::from_spec(&CalendarSpec::default())`).
    fn default() -> Self {
        let mut weekend = [false; 7];
        weekend[Weekday::Sat.num_days_from_monday() as usize] = true;
        weekend[Weekday::Sun.num_days_from_monday() as usize] = true;
        Self {
            tz: chrono_tz::Asia::Shanghai,
            weekend,
            holidays: Vec::new(),
            workdays: Vec::new(),
        }
    }
}

impl Calendar {
    /// Validates a [`CalendarSpec`]. Errors name the field and the offending value.
    pub fn from_spec(spec: &CalendarSpec) -> Result<Self, String> {
        let zone = spec.time_zone.trim();
        let tz: Tz = zone.parse().map_err(|_| {
            format!(
                "time_zone: unknown IANA time zone {:?} (e.g. \"Asia/Shanghai\")",
                spec.time_zone
            )
        })?;

        let mut weekend = [false; 7];
        for name in &spec.weekend {
            let day = parse_weekday(name).ok_or_else(|| {
                format!("weekend: unknown weekday {name:?} (expected mon..sun or monday..sunday)")
            })?;
            weekend[day.num_days_from_monday() as usize] = true;
        }
        if weekend.iter().all(|&off| off) {
            return Err(
                "weekend: all seven days are non-working; at least one weekday must be a working day"
                    .to_owned(),
            );
        }

        let holidays = parse_date_list("holidays", &spec.holidays)?;
        let workdays = parse_date_list("workdays", &spec.workdays)?;
        if let Some(both) = workdays.iter().find(|d| holidays.binary_search(d).is_ok()) {
            return Err(format!(
                "{both} is listed both in holidays and in workdays; a date can only be one of them"
            ));
        }

        Ok(Self {
            tz,
            weekend,
            holidays,
            workdays,
        })
    }

    /// The calendar's time zone.
    pub fn time_zone(&self) -> Tz {
        self.tz
    }

    /// Whether `d` (a local date) is a working day: a listed make-up workday, or a day that is
    /// neither a weekend day nor a listed holiday.
    pub fn is_working_day(&self, d: NaiveDate) -> bool {
        if self.weekend[d.weekday().num_days_from_monday() as usize] {
            self.workdays.binary_search(&d).is_ok()
        } else {
            self.holidays.binary_search(&d).is_err()
        }
    }

    /// The due instant of an SLA clock started at `start`; see the module documentation.
    pub fn due(&self, start: DateTime<Utc>, d: SlaDuration) -> DateTime<Utc> {
        match d {
            SlaDuration::Minutes(m) => TimeDelta::try_minutes(i64::from(m))
                .and_then(|delta| start.checked_add_signed(delta))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            // `max`: a clock started inside a fold that spans midnight could otherwise resolve
            // the next midnight to its earlier, already past, occurrence.
            SlaDuration::WorkingDays(n) => self
                .due_working_days(start, n)
                .map_or(DateTime::<Utc>::MAX_UTC, |due| due.max(start)),
        }
    }

    /// `None` means the result is beyond the representable range.
    fn due_working_days(&self, start: DateTime<Utc>, n: u32) -> Option<DateTime<Utc>> {
        let utc = start.naive_utc();
        let offset = self.tz.offset_from_utc_datetime(&utc).fix();
        let Some(local) = utc.checked_add_offset(offset) else {
            // Only at the very ends of chrono's range.
            return if offset.local_minus_utc() > 0 {
                None
            } else {
                Some(start)
            };
        };
        let date = local.date();
        if self.is_working_day(date) {
            if n == 0 {
                return Some(start);
            }
            let due = self.advance(date, u64::from(n))?;
            self.resolve(due.and_time(local.time()))
        } else {
            // The first advance finds the clock-start day, whose 00:00 is the clock start.
            let due = self.advance(date, u64::from(n) + 1)?;
            self.resolve(due.and_time(NaiveTime::MIN))
        }
    }

    /// The date `n` working days after `from` (`from` itself is not counted).
    ///
    /// Walks day by day with cursors into the sorted lists (no binary search per day) and jumps
    /// whole weeks across stretches that contain no listed date.
    fn advance(&self, from: NaiveDate, n: u64) -> Option<NaiveDate> {
        // At least 1 because a seven-day weekend is rejected at construction; `max(1)` keeps
        // the arithmetic safe even so.
        let per_week = (self.weekend.iter().filter(|&&off| !off).count() as u64).max(1);
        let mut d = from;
        let mut weekday = from.weekday();
        // Invariant: every listed date before index `hi` / `wi` is <= `d`, every one from it on
        // is > `d`.
        let mut hi = self.holidays.partition_point(|h| *h <= from);
        let mut wi = self.workdays.partition_point(|w| *w <= from);
        let mut remaining = n;
        let mut idle: u32 = 0;
        while remaining > 0 {
            if remaining > per_week {
                let next_listed = match (self.holidays.get(hi), self.workdays.get(wi)) {
                    (Some(h), Some(w)) => Some(*h.min(w)),
                    (Some(x), None) | (None, Some(x)) => Some(*x),
                    (None, None) => None,
                };
                // Days d+1 ..= next_listed-1 follow the plain weekly pattern.
                let plain_weeks = match next_listed {
                    Some(e) => {
                        u64::try_from(e.signed_duration_since(d).num_days() - 1).unwrap_or(0) / 7
                    }
                    None => u64::MAX,
                };
                // Leave at least one working day for the day-by-day walk.
                let weeks = plain_weeks.min((remaining - 1) / per_week);
                if weeks > 0 {
                    d = d.checked_add_days(Days::new(weeks.checked_mul(7)?))?;
                    remaining -= weeks * per_week;
                    idle = 0;
                    continue;
                }
            }
            d = d.succ_opt()?;
            weekday = weekday.succ();
            let holiday = self.holidays.get(hi) == Some(&d);
            if holiday {
                hi += 1;
            }
            let makeup = self.workdays.get(wi) == Some(&d);
            if makeup {
                wi += 1;
            }
            let weekend = self.weekend[weekday.num_days_from_monday() as usize];
            if makeup || !(weekend || holiday) {
                remaining -= 1;
                idle = 0;
            } else {
                idle += 1;
                if idle >= MAX_IDLE_DAYS {
                    // Termination guard: count the rest as calendar days.
                    return d.checked_add_days(Days::new(remaining));
                }
            }
        }
        Some(d)
    }

    /// Local wall time → UTC: gap → first instant after the gap, fold → earlier instant.
    fn resolve(&self, local: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.tz.from_local_datetime(&local) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(a, b) => Some(a.min(b).with_timezone(&Utc)),
            // No gap information means the instant is outside chrono's range.
            LocalResult::None => GapInfo::new(&local, &self.tz)
                .and_then(|gap| gap.end)
                .map(|end| end.with_timezone(&Utc)),
        }
    }
}

fn parse_weekday(name: &str) -> Option<Weekday> {
    let name = name.trim().to_ascii_lowercase();
    let day = match name.as_str() {
        "mon" | "monday" => Weekday::Mon,
        "tue" | "tuesday" => Weekday::Tue,
        "wed" | "wednesday" => Weekday::Wed,
        "thu" | "thursday" => Weekday::Thu,
        "fri" | "friday" => Weekday::Fri,
        "sat" | "saturday" => Weekday::Sat,
        "sun" | "sunday" => Weekday::Sun,
        _ => return None,
    };
    Some(day)
}

/// Strict `YYYY-MM-DD` (four-digit year, zero-padded month and day).
fn parse_date(s: &str) -> Option<NaiveDate> {
    let &[y0, y1, y2, y3, b'-', m0, m1, b'-', d0, d1] = s.as_bytes() else {
        return None;
    };
    let num = |digits: &[u8]| {
        digits.iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let year = i32::try_from(num(&[y0, y1, y2, y3])?).ok()?;
    NaiveDate::from_ymd_opt(year, num(&[m0, m1])?, num(&[d0, d1])?)
}

/// Parses and expands dates and inclusive ranges; the result is sorted and deduplicated.
fn parse_date_list(field: &str, entries: &[String]) -> Result<Vec<NaiveDate>, String> {
    let bad_date = |entry: &str| {
        format!("{field}: invalid date {entry:?} (expected YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD)")
    };
    let mut dates = Vec::new();
    for entry in entries {
        let trimmed = entry.trim();
        match trimmed.split_once("..") {
            None => dates.push(parse_date(trimmed).ok_or_else(|| bad_date(entry))?),
            Some((first, last)) => {
                let first = parse_date(first.trim()).ok_or_else(|| bad_date(entry))?;
                let last = parse_date(last.trim()).ok_or_else(|| bad_date(entry))?;
                if last < first {
                    return Err(format!(
                        "{field}: reversed range {entry:?} (the end is before the start)"
                    ));
                }
                let len = last.signed_duration_since(first).num_days() + 1;
                if len > MAX_RANGE_DAYS {
                    return Err(format!(
                        "{field}: range {entry:?} spans {len} days (at most {MAX_RANGE_DAYS} allowed)"
                    ));
                }
                dates.extend(first.iter_days().take_while(|d| *d <= last));
            }
        }
    }
    dates.sort_unstable();
    dates.dedup();
    Ok(dates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(zone: &str, weekend: &[&str], holidays: &[&str], workdays: &[&str]) -> CalendarSpec {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        CalendarSpec {
            time_zone: zone.to_owned(),
            weekend: strings(weekend),
            holidays: strings(holidays),
            workdays: strings(workdays),
        }
    }

    fn cal(zone: &str, weekend: &[&str], holidays: &[&str], workdays: &[&str]) -> Calendar {
        Calendar::from_spec(&spec(zone, weekend, holidays, workdays)).unwrap()
    }

    fn spec_err(s: &CalendarSpec) -> String {
        Calendar::from_spec(s).unwrap_err()
    }

    fn utc(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn date(s: &str) -> NaiveDate {
        parse_date(s).unwrap()
    }

    /// Due time as RFC 3339 in the calendar's zone.
    fn due(c: &Calendar, start: &str, d: &str) -> String {
        c.due(utc(start), d.parse().unwrap())
            .with_timezone(&c.time_zone())
            .to_rfc3339()
    }

    fn china_2026() -> Calendar {
        cal(
            "Asia/Shanghai",
            &["sat", "sun"],
            &["2026-02-15..2026-02-23", "2026-10-01..2026-10-07"],
            &["2026-02-14", "2026-02-28", "2026-09-20", "2026-10-10"],
        )
    }

    // ---- SlaDuration parsing -------------------------------------------------------------

    #[test]
    fn parses_good_durations() {
        let ok = |s: &str| s.parse::<SlaDuration>().unwrap();
        assert_eq!(ok("30m"), SlaDuration::Minutes(30));
        assert_eq!(ok("90m"), SlaDuration::Minutes(90));
        assert_eq!(ok("4h"), SlaDuration::Minutes(240));
        assert_eq!(ok("24h"), SlaDuration::Minutes(1440));
        assert_eq!(ok("48h"), SlaDuration::Minutes(2880));
        assert_eq!(ok("3wd"), SlaDuration::WorkingDays(3));
        assert_eq!(ok("20wd"), SlaDuration::WorkingDays(20));
        assert_eq!(ok("  3wd \t"), SlaDuration::WorkingDays(3));
        assert_eq!(ok("4 h"), SlaDuration::Minutes(240));
        assert_eq!(ok("007m"), SlaDuration::Minutes(7));
        assert_eq!(ok("0h"), SlaDuration::Minutes(0));
        assert_eq!(ok("0m"), SlaDuration::Minutes(0));
        assert_eq!(ok("0wd"), SlaDuration::WorkingDays(0));
        assert_eq!(ok("525600m"), SlaDuration::Minutes(MAX_SLA_MINUTES));
        assert_eq!(ok("8760h"), SlaDuration::Minutes(MAX_SLA_MINUTES));
        assert_eq!(ok("365wd"), SlaDuration::WorkingDays(365));
    }

    #[test]
    fn rejects_bad_durations_naming_the_value() {
        for bad in [
            "3",
            "h",
            "wd",
            "3d",
            "3H",
            "3WD",
            "3 w d",
            "3wdx",
            "3hm",
            "1.5h",
            "1,5h",
            "-3h",
            "-0m",
            "+3h",
            "3h 30m",
            "525601m",
            "8761h",
            "366wd",
            "4294967296wd",
            "99999999999999999999999999h",
            "307445734561825861h",
            "３h",
            "h3",
            "0x10m",
        ] {
            let err = bad.parse::<SlaDuration>().unwrap_err();
            assert!(err.contains(bad.trim()), "{bad:?}: {err}");
        }
        assert!("".parse::<SlaDuration>().unwrap_err().contains("empty"));
        assert!("   ".parse::<SlaDuration>().unwrap_err().contains("empty"));
        assert!("-3h"
            .parse::<SlaDuration>()
            .unwrap_err()
            .contains("negative"));
        assert!("1.5h"
            .parse::<SlaDuration>()
            .unwrap_err()
            .contains("fraction"));
        assert!("3d"
            .parse::<SlaDuration>()
            .unwrap_err()
            .contains("unknown unit"));
        assert!("3"
            .parse::<SlaDuration>()
            .unwrap_err()
            .contains("missing unit"));
        assert!("366wd"
            .parse::<SlaDuration>()
            .unwrap_err()
            .contains("too long"));
    }

    #[test]
    fn display_round_trips() {
        assert_eq!(SlaDuration::Minutes(240).to_string(), "4h");
        assert_eq!(SlaDuration::Minutes(90).to_string(), "90m");
        assert_eq!(SlaDuration::Minutes(30).to_string(), "30m");
        assert_eq!(SlaDuration::Minutes(0).to_string(), "0h");
        assert_eq!(SlaDuration::WorkingDays(3).to_string(), "3wd");
        assert_eq!(SlaDuration::WorkingDays(0).to_string(), "0wd");
        for d in [
            SlaDuration::Minutes(0),
            SlaDuration::Minutes(1),
            SlaDuration::Minutes(59),
            SlaDuration::Minutes(60),
            SlaDuration::Minutes(61),
            SlaDuration::Minutes(1440),
            SlaDuration::Minutes(MAX_SLA_MINUTES),
            SlaDuration::WorkingDays(0),
            SlaDuration::WorkingDays(7),
            SlaDuration::WorkingDays(MAX_SLA_WORKING_DAYS),
        ] {
            assert_eq!(d.to_string().parse::<SlaDuration>(), Ok(d), "{d}");
        }
        for s in ["30m", "4h", "24h", "3wd", "90m", "0h"] {
            assert_eq!(s.parse::<SlaDuration>().unwrap().to_string(), s);
        }
    }

    // ---- CalendarSpec / from_spec --------------------------------------------------------

    #[test]
    fn spec_defaults_and_toml() {
        let empty: CalendarSpec = toml::from_str("").unwrap();
        assert_eq!(empty, CalendarSpec::default());
        assert_eq!(empty.time_zone, "Asia/Shanghai");
        assert_eq!(empty.weekend, ["sat", "sun"]);
        assert!(empty.holidays.is_empty() && empty.workdays.is_empty());
        assert_eq!(
            Calendar::from_spec(&CalendarSpec::default()).unwrap(),
            Calendar::default()
        );

        let full: CalendarSpec = toml::from_str(
            r#"
            time_zone = "Europe/London"
            weekend = ["Friday", "SAT"]
            holidays = ["2026-12-25", "2026-12-28..2026-12-31"]
            workdays = ["2026-12-19"]
            "#,
        )
        .unwrap();
        let c = Calendar::from_spec(&full).unwrap();
        assert_eq!(c.time_zone(), chrono_tz::Europe::London);
        assert!(!c.is_working_day(date("2026-12-18"))); // Friday
        assert!(c.is_working_day(date("2026-12-19"))); // Saturday, make-up
        assert!(c.is_working_day(date("2026-12-20"))); // Sunday works here
        assert!(!c.is_working_day(date("2026-12-25")));
        assert!(!c.is_working_day(date("2026-12-29")));
        assert!(c.is_working_day(date("2027-01-03")));

        let unknown = toml::from_str::<CalendarSpec>("timezone = \"UTC\"").unwrap_err();
        assert!(unknown.to_string().contains("timezone"), "{unknown}");
    }

    #[test]
    fn spec_errors() {
        let base = CalendarSpec::default;

        let mut s = base();
        s.time_zone = "Mars/Olympus_Mons".into();
        assert!(spec_err(&s).contains("Mars/Olympus_Mons"));
        s.time_zone = String::new();
        assert!(spec_err(&s).contains("time_zone"));
        s.time_zone = " UTC ".into();
        assert_eq!(Calendar::from_spec(&s).unwrap().time_zone(), chrono_tz::UTC);

        let mut s = base();
        s.weekend = vec!["sat".into(), "sonntag".into()];
        let e = spec_err(&s);
        assert!(e.contains("weekend") && e.contains("sonntag"), "{e}");
        s.weekend = vec!["".into()];
        assert!(spec_err(&s).contains("weekend"));
        s.weekend = ["mon", "tue", "wed", "thu", "fri", "sat", "SUNDAY"]
            .map(String::from)
            .to_vec();
        assert!(spec_err(&s).contains("seven"));
        s.weekend = vec![];
        assert!(Calendar::from_spec(&s).is_ok());
        s.weekend = ["sat", "Saturday", "SAT"].map(String::from).to_vec();
        let c = Calendar::from_spec(&s).unwrap();
        assert!(c.is_working_day(date("2026-03-08"))); // Sunday
        assert!(!c.is_working_day(date("2026-03-07"))); // Saturday

        for bad in [
            "2026-02-30",
            "2026-2-5",
            "20260205",
            "2026/02/05",
            "2026-02-05T00:00",
            "26-02-05",
            "",
            "..",
            "2026-02-01..",
            "..2026-02-01",
            "2026-02-01...2026-02-03",
            "2026-02-01..2026-02-03..2026-02-05",
            "+2026-02-05",
            "２０２６-02-05",
        ] {
            let mut s = base();
            s.holidays = vec![bad.into()];
            let e = spec_err(&s);
            assert!(
                e.starts_with("holidays:") && e.contains(bad),
                "{bad:?}: {e}"
            );
            let mut s = base();
            s.workdays = vec![bad.into()];
            let e = spec_err(&s);
            assert!(
                e.starts_with("workdays:") && e.contains(bad),
                "{bad:?}: {e}"
            );
        }

        let mut s = base();
        s.holidays = vec!["2026-02-23..2026-02-15".into()];
        let e = spec_err(&s);
        assert!(
            e.contains("reversed") && e.contains("2026-02-23..2026-02-15"),
            "{e}"
        );

        // A whole leap year (366 days) is fine, one more day is not.
        s.holidays = vec!["2028-01-01..2028-12-31".into()];
        assert!(Calendar::from_spec(&s).is_ok());
        s.holidays = vec!["2028-01-01..2029-01-01".into()];
        let e = spec_err(&s);
        assert!(e.contains("367 days"), "{e}");
        s.holidays = vec!["1000-01-01..9999-12-31".into()];
        assert!(spec_err(&s).contains("at most 366"));

        let mut s = base();
        s.holidays = vec!["2026-02-15..2026-02-23".into()];
        s.workdays = vec!["2026-02-14".into(), "2026-02-20".into()];
        let e = spec_err(&s);
        assert!(e.contains("2026-02-20") && e.contains("both"), "{e}");

        // Whitespace around entries and the range operator is tolerated; duplicates merge.
        let mut s = base();
        s.holidays = vec![
            " 2026-02-15 .. 2026-02-17 ".into(),
            "2026-02-16".into(),
            "2026-02-15..2026-02-15".into(),
        ];
        let c = Calendar::from_spec(&s).unwrap();
        assert_eq!(
            c.holidays,
            vec![date("2026-02-15"), date("2026-02-16"), date("2026-02-17")]
        );
    }

    // ---- is_working_day ------------------------------------------------------------------

    #[test]
    fn working_days() {
        let c = Calendar::default();
        assert!(c.is_working_day(date("2026-03-06"))); // Friday
        assert!(!c.is_working_day(date("2026-03-07"))); // Saturday
        assert!(!c.is_working_day(date("2026-03-08"))); // Sunday
        assert!(c.is_working_day(date("2026-03-09"))); // Monday

        let c = china_2026();
        assert!(c.is_working_day(date("2026-02-13")));
        assert!(c.is_working_day(date("2026-02-14"))); // make-up Saturday
        for d in date("2026-02-15").iter_days().take(9) {
            assert!(!c.is_working_day(d), "{d}");
        }
        assert!(c.is_working_day(date("2026-02-24")));
        assert!(!c.is_working_day(date("2026-02-21"))); // holiday Saturday
        assert!(!c.is_working_day(date("2026-02-22"))); // holiday Sunday
        assert!(c.is_working_day(date("2026-02-28"))); // make-up Saturday
        assert!(!c.is_working_day(date("2026-03-01"))); // plain Sunday
        assert!(c.is_working_day(date("2026-09-20"))); // make-up Sunday
        assert!(!c.is_working_day(date("2026-10-01"))); // holiday Thursday
        assert!(c.is_working_day(date("2026-10-10"))); // make-up Saturday
        assert!(!c.is_working_day(date("2026-10-11")));
    }

    // ---- due -----------------------------------------------------------------------------

    #[test]
    fn plain_weekends() {
        let c = Calendar::default();
        // Friday 15:00 + 1wd → Monday 15:00.
        assert_eq!(
            due(&c, "2026-03-06T15:00:00+08:00", "1wd"),
            "2026-03-09T15:00:00+08:00"
        );
        // Saturday 10:00 + 3wd → clock starts Monday 00:00 → Thursday 00:00.
        assert_eq!(
            due(&c, "2026-03-07T10:00:00+08:00", "3wd"),
            "2026-03-12T00:00:00+08:00"
        );
        assert_eq!(
            due(&c, "2026-03-08T23:59:59+08:00", "1wd"),
            "2026-03-10T00:00:00+08:00"
        );
        assert_eq!(
            due(&c, "2026-03-02T09:30:00+08:00", "5wd"),
            "2026-03-09T09:30:00+08:00"
        );
        // Seconds and sub-seconds of the intake are kept.
        assert_eq!(
            due(&c, "2026-03-04T09:30:15.250+08:00", "2wd"),
            "2026-03-06T09:30:15.250+08:00"
        );
    }

    #[test]
    fn zero_working_days_is_the_clock_start() {
        let c = china_2026();
        let start = utc("2026-03-04T09:30:15.123456789+08:00");
        assert_eq!(c.due(start, SlaDuration::WorkingDays(0)), start);
        assert_eq!(
            due(&c, "2026-03-07T10:00:00+08:00", "0wd"),
            "2026-03-09T00:00:00+08:00"
        );
        // On a holiday: the clock starts when the holiday is over.
        assert_eq!(
            due(&c, "2026-02-17T10:00:00+08:00", "0wd"),
            "2026-02-24T00:00:00+08:00"
        );
        assert_eq!(c.due(start, SlaDuration::Minutes(0)), start);
    }

    #[test]
    fn holiday_on_a_weekday_with_makeup_sunday() {
        // Thu–Sat off, Sunday worked instead.
        let c = cal(
            "Asia/Shanghai",
            &["sat", "sun"],
            &["2026-05-07..2026-05-09"],
            &["2026-05-10"],
        );
        assert_eq!(
            due(&c, "2026-05-06T09:00:00+08:00", "1wd"),
            "2026-05-10T09:00:00+08:00"
        );
        assert_eq!(
            due(&c, "2026-05-06T09:00:00+08:00", "2wd"),
            "2026-05-11T09:00:00+08:00"
        );
        // A single holiday on a Wednesday.
        let c = cal("Asia/Shanghai", &["sat", "sun"], &["2026-05-13"], &[]);
        assert_eq!(
            due(&c, "2026-05-12T11:00:00+08:00", "1wd"),
            "2026-05-14T11:00:00+08:00"
        );
        assert_eq!(
            due(&c, "2026-05-13T11:00:00+08:00", "1wd"),
            "2026-05-15T00:00:00+08:00"
        );
    }

    #[test]
    fn spring_festival_2026() {
        let c = china_2026();
        // Fri 13th 16:00: Sat 14th (make-up) = 1, 15th–23rd off, Tue 24th = 2, Wed 25th = 3.
        assert_eq!(
            due(&c, "2026-02-13T16:00:00+08:00", "1wd"),
            "2026-02-14T16:00:00+08:00"
        );
        assert_eq!(
            due(&c, "2026-02-13T16:00:00+08:00", "2wd"),
            "2026-02-24T16:00:00+08:00"
        );
        assert_eq!(
            due(&c, "2026-02-13T16:00:00+08:00", "3wd"),
            "2026-02-25T16:00:00+08:00"
        );
        // Same start given in UTC.
        assert_eq!(
            due(&c, "2026-02-13T08:00:00Z", "3wd"),
            "2026-02-25T16:00:00+08:00"
        );
        // On the make-up Saturday itself.
        assert_eq!(
            due(&c, "2026-02-14T10:00:00+08:00", "1wd"),
            "2026-02-24T10:00:00+08:00"
        );
        // Start on a holiday: clock starts Tue 24th 00:00.
        assert_eq!(
            due(&c, "2026-02-17T10:00:00+08:00", "1wd"),
            "2026-02-25T00:00:00+08:00"
        );
        assert_eq!(
            due(&c, "2026-02-15T00:00:00+08:00", "3wd"),
            "2026-02-27T00:00:00+08:00"
        );
        // Start on the second make-up Saturday: Sunday is off, Monday is day 1.
        assert_eq!(
            due(&c, "2026-02-28T10:00:00+08:00", "1wd"),
            "2026-03-02T10:00:00+08:00"
        );
        // Wed 25th + 3wd: Thu 26, Fri 27, Sat 28 (make-up).
        assert_eq!(
            due(&c, "2026-02-25T09:00:00+08:00", "3wd"),
            "2026-02-28T09:00:00+08:00"
        );
        // Complex-complaint resolution from Mon 2nd: 15wd.
        // Feb 3–6 (4), 9–13 (9), 14 (10), 24–27 (14), 28 (15).
        assert_eq!(
            due(&c, "2026-02-02T09:00:00+08:00", "15wd"),
            "2026-02-28T09:00:00+08:00"
        );
    }

    #[test]
    fn national_day_2026() {
        let c = china_2026();
        // Fri 18 Sep: Sat 19 off, Sun 20 is a make-up day.
        assert_eq!(
            due(&c, "2026-09-18T10:00:00+08:00", "1wd"),
            "2026-09-20T10:00:00+08:00"
        );
        assert_eq!(
            due(&c, "2026-09-19T10:00:00+08:00", "1wd"),
            "2026-09-21T00:00:00+08:00"
        );
        // Wed 30 Sep: 1–7 Oct off; Thu 8 = 1, Fri 9 = 2, Sat 10 (make-up) = 3, Mon 12 = 4.
        assert_eq!(
            due(&c, "2026-09-30T14:00:00+08:00", "1wd"),
            "2026-10-08T14:00:00+08:00"
        );
        assert_eq!(
            due(&c, "2026-09-30T14:00:00+08:00", "3wd"),
            "2026-10-10T14:00:00+08:00"
        );
        assert_eq!(
            due(&c, "2026-09-30T14:00:00+08:00", "4wd"),
            "2026-10-12T14:00:00+08:00"
        );
        // Start during the holiday.
        assert_eq!(
            due(&c, "2026-10-03T20:00:00+08:00", "3wd"),
            "2026-10-12T00:00:00+08:00"
        );
        // Start on the make-up Saturday.
        assert_eq!(
            due(&c, "2026-10-10T17:30:00+08:00", "1wd"),
            "2026-10-12T17:30:00+08:00"
        );
        // Wall-clock SLAs ignore the holiday.
        assert_eq!(
            due(&c, "2026-09-30T14:00:00+08:00", "24h"),
            "2026-10-01T14:00:00+08:00"
        );
    }

    #[test]
    fn local_date_differs_from_utc_date() {
        let c = Calendar::default();
        // Friday 17:00 UTC is Saturday 01:00 in Shanghai: clock starts Monday 00:00.
        assert_eq!(
            due(&c, "2026-11-27T17:00:00Z", "1wd"),
            "2026-12-01T00:00:00+08:00"
        );
        assert_eq!(
            c.due(utc("2026-11-27T17:00:00Z"), SlaDuration::WorkingDays(1)),
            utc("2026-11-30T16:00:00Z")
        );
        // Friday 15:59 UTC is still Friday 23:59 locally.
        assert_eq!(
            due(&c, "2026-11-27T15:59:00Z", "1wd"),
            "2026-11-30T23:59:00+08:00"
        );
        // Sunday 20:00 UTC is already Monday 04:00 in Shanghai.
        assert_eq!(
            due(&c, "2026-11-29T20:00:00Z", "1wd"),
            "2026-12-01T04:00:00+08:00"
        );
        // New York: Monday 03:00 UTC is still Sunday 22:00 locally.
        let ny = cal("America/New_York", &["sat", "sun"], &[], &[]);
        assert_eq!(
            due(&ny, "2026-11-30T03:00:00Z", "1wd"),
            "2026-12-01T00:00:00-05:00"
        );
    }

    #[test]
    fn london_dst_2026() {
        let c = cal("Europe/London", &["sat", "sun"], &[], &[]);
        // Across spring forward (Sun 29 Mar): same wall time, one hour less elapsed.
        assert_eq!(
            due(&c, "2026-03-27T09:00:00Z", "1wd"),
            "2026-03-30T09:00:00+01:00"
        );
        // Across fall back (Sun 25 Oct).
        assert_eq!(
            due(&c, "2026-10-23T09:00:00+01:00", "1wd"),
            "2026-10-26T09:00:00+00:00"
        );

        let all_week = cal("Europe/London", &[], &[], &[]);
        // Due 01:30 on 29 Mar does not exist (01:00 GMT → 02:00 BST): first instant after it.
        assert_eq!(
            due(&all_week, "2026-03-28T01:30:00Z", "1wd"),
            "2026-03-29T02:00:00+01:00"
        );
        assert_eq!(
            all_week.due(utc("2026-03-28T01:30:00Z"), SlaDuration::WorkingDays(1)),
            utc("2026-03-29T01:00:00Z")
        );
        // 00:59:59 still exists.
        assert_eq!(
            due(&all_week, "2026-03-28T00:59:59Z", "1wd"),
            "2026-03-29T00:59:59+00:00"
        );
        // 01:30 on 25 Oct happens twice: the earlier (BST) one.
        assert_eq!(
            due(&all_week, "2026-10-24T01:30:00+01:00", "1wd"),
            "2026-10-25T01:30:00+01:00"
        );
        // Starting in the second 01:30 of the fold, 0wd keeps the exact instant.
        let second = utc("2026-10-25T01:30:00Z");
        assert_eq!(all_week.due(second, SlaDuration::WorkingDays(0)), second);
        assert_eq!(
            due(&all_week, "2026-10-25T01:30:00Z", "1wd"),
            "2026-10-26T01:30:00+00:00"
        );
    }

    #[test]
    fn new_york_dst_2026() {
        let c = cal("America/New_York", &["sat", "sun"], &[], &[]);
        // Fri 6 Mar 17:00 EST → Mon 9 Mar 17:00 EDT.
        assert_eq!(
            due(&c, "2026-03-06T22:00:00Z", "1wd"),
            "2026-03-09T17:00:00-04:00"
        );
        // Fri 30 Oct 17:00 EDT → Mon 2 Nov 17:00 EST.
        assert_eq!(
            due(&c, "2026-10-30T21:00:00Z", "1wd"),
            "2026-11-02T17:00:00-05:00"
        );

        // Only Saturday off, so the due date can be the DST Sunday.
        let sat_off = cal("America/New_York", &["sat"], &[], &[]);
        // Sun 8 Mar 02:30 does not exist (02:00 EST → 03:00 EDT).
        assert_eq!(
            due(&sat_off, "2026-03-06T02:30:00-05:00", "1wd"),
            "2026-03-08T03:00:00-04:00"
        );
        assert_eq!(
            sat_off.due(utc("2026-03-06T07:30:00Z"), SlaDuration::WorkingDays(1)),
            utc("2026-03-08T07:00:00Z")
        );
        // Sun 1 Nov 01:30 happens twice: the earlier (EDT) one.
        assert_eq!(
            due(&sat_off, "2026-10-30T01:30:00-04:00", "1wd"),
            "2026-11-01T01:30:00-04:00"
        );
        assert_eq!(
            sat_off.due(utc("2026-10-30T05:30:00Z"), SlaDuration::WorkingDays(1)),
            utc("2026-11-01T05:30:00Z")
        );
    }

    #[test]
    fn gaps_at_midnight_and_half_hour() {
        // Havana springs forward at midnight: Sun 8 Mar 2026 00:00 CST → 01:00 CDT.
        let havana = cal("America/Havana", &["sat"], &[], &[]);
        assert_eq!(
            due(&havana, "2026-03-07T10:00:00-05:00", "0wd"),
            "2026-03-08T01:00:00-04:00"
        );
        // Falls back at 01:00 CDT → 00:00 CST on Sun 1 Nov: midnight is ambiguous, take CDT.
        assert_eq!(
            due(&havana, "2026-10-31T10:00:00-04:00", "0wd"),
            "2026-11-01T00:00:00-04:00"
        );
        // Lord Howe jumps 30 minutes: Sun 4 Oct 2026 02:00 → 02:30.
        let lord_howe = cal("Australia/Lord_Howe", &[], &[], &[]);
        assert_eq!(
            due(&lord_howe, "2026-10-03T02:15:00+10:30", "1wd"),
            "2026-10-04T02:30:00+11:00"
        );
    }

    #[test]
    fn minutes_are_wall_clock() {
        let ny = cal("America/New_York", &["sat", "sun"], &[], &[]);
        // 01:30 EST + 60m = 03:30 EDT (spring forward).
        assert_eq!(
            due(&ny, "2026-03-08T01:30:00-05:00", "60m"),
            "2026-03-08T03:30:00-04:00"
        );
        // 01:30 EDT + 60m = 01:30 EST (fall back).
        assert_eq!(
            due(&ny, "2026-11-01T01:30:00-04:00", "1h"),
            "2026-11-01T01:30:00-05:00"
        );
        // Weekends don't matter.
        assert_eq!(
            due(&ny, "2026-03-06T17:00:00-05:00", "24h"),
            "2026-03-07T17:00:00-05:00"
        );
        let london = cal("Europe/London", &["sat", "sun"], &[], &[]);
        assert_eq!(
            due(&london, "2026-03-28T12:00:00Z", "48h"),
            "2026-03-30T13:00:00+01:00"
        );
        assert_eq!(
            due(&Calendar::default(), "2026-02-13T23:45:00+08:00", "30m"),
            "2026-02-14T00:15:00+08:00"
        );
    }

    #[test]
    fn twenty_working_days() {
        let c = Calendar::default();
        assert_eq!(
            due(&c, "2026-03-02T09:00:00+08:00", "20wd"),
            "2026-03-30T09:00:00+08:00"
        );
        assert_eq!(
            due(&c, "2026-03-06T18:00:00+08:00", "20wd"),
            "2026-04-03T18:00:00+08:00"
        );
        let c = china_2026();
        // Feb 3–6 (4), 9–13 (9), 14 (10), 24–27 (14), 28 (15), Mar 2–6 (20).
        assert_eq!(
            due(&c, "2026-02-02T09:00:00+08:00", "20wd"),
            "2026-03-06T09:00:00+08:00"
        );
        // Sep 28–30 (3), Oct 8–10 (6), Oct 12–16 (11), 19–23 (16), 26–29 (20).
        assert_eq!(
            due(&c, "2026-09-25T11:00:00+08:00", "20wd"),
            "2026-10-29T11:00:00+08:00"
        );
    }

    /// Straightforward day-by-day implementation of the documented semantics.
    fn reference_due(c: &Calendar, start: DateTime<Utc>, n: u32) -> DateTime<Utc> {
        let local = start.with_timezone(&c.tz).naive_local();
        let next = |mut d: NaiveDate| loop {
            d = d.succ_opt().unwrap();
            if c.is_working_day(d) {
                return d;
            }
        };
        let (mut d, tod) = if c.is_working_day(local.date()) {
            if n == 0 {
                return start;
            }
            (local.date(), local.time())
        } else {
            (next(local.date()), NaiveTime::MIN)
        };
        for _ in 0..n {
            d = next(d);
        }
        c.resolve(d.and_time(tod)).unwrap()
    }

    #[test]
    fn matches_reference_implementation() {
        let calendars = [
            china_2026(),
            Calendar::default(),
            cal(
                "Europe/London",
                &["sun"],
                &["2026-03-27..2026-03-30", "2026-12-24..2027-01-01"],
                &["2026-04-05", "2027-01-03"],
            ),
            cal("America/New_York", &["fri", "sat"], &["2026-11-26"], &[]),
        ];
        for c in &calendars {
            let mut start = utc("2026-01-20T00:00:00Z");
            let end = utc("2027-01-10T00:00:00Z");
            while start < end {
                for n in [0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 15, 20, 25, 40] {
                    assert_eq!(
                        c.due(start, SlaDuration::WorkingDays(n)),
                        reference_due(c, start, n),
                        "{start} + {n}wd in {}",
                        c.tz
                    );
                }
                start += TimeDelta::minutes(13 * 60 + 7);
            }
        }
    }

    #[test]
    fn termination_guard_counts_calendar_days() {
        // Four adjoining whole-year holiday ranges: no working day 2026–2029.
        let c = cal(
            "Asia/Shanghai",
            &["sat", "sun"],
            &[
                "2026-01-01..2026-12-31",
                "2027-01-01..2027-12-31",
                "2028-01-01..2028-12-31",
                "2029-01-01..2029-12-31",
            ],
            &[],
        );
        let start = utc("2025-12-31T10:00:00+08:00"); // a Wednesday, working
        let guard_day = date("2025-12-31") + Days::new(u64::from(MAX_IDLE_DAYS));
        for n in [1u32, 5] {
            let expected = (guard_day + Days::new(u64::from(n)))
                .and_hms_opt(10, 0, 0)
                .unwrap()
                .and_local_timezone(chrono_tz::Asia::Shanghai)
                .unwrap()
                .with_timezone(&Utc);
            assert_eq!(c.due(start, SlaDuration::WorkingDays(n)), expected, "{n}wd");
        }
        // Starting inside the holidays: the clock-start search is guarded too.
        let inside = c.due(
            utc("2026-06-01T10:00:00+08:00"),
            SlaDuration::WorkingDays(0),
        );
        assert!(inside > utc("2026-06-01T10:00:00+08:00"));
        assert!(inside < utc("2030-01-01T00:00:00Z"));
    }

    #[test]
    fn never_panics_at_the_edges() {
        let zones = [
            "Asia/Shanghai",
            "America/New_York",
            "Pacific/Kiritimati",
            "UTC",
        ];
        let durations = [
            SlaDuration::Minutes(0),
            SlaDuration::Minutes(u32::MAX),
            SlaDuration::WorkingDays(0),
            SlaDuration::WorkingDays(1),
            SlaDuration::WorkingDays(20),
            SlaDuration::WorkingDays(u32::MAX),
        ];
        let starts = [
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MIN_UTC + TimeDelta::days(3),
            DateTime::<Utc>::MAX_UTC,
            DateTime::<Utc>::MAX_UTC - TimeDelta::days(3),
            DateTime::<Utc>::MAX_UTC - TimeDelta::hours(5),
            utc("2026-02-13T08:00:00Z"),
        ];
        for zone in zones {
            let c = cal(zone, &["sat", "sun"], &["2026-02-16"], &["2026-02-14"]);
            for start in starts {
                for d in durations {
                    let due = c.due(start, d);
                    assert!(due >= start, "{zone} {start} {d}: {due}");
                }
            }
        }
        // A huge count is O(1) thanks to week jumps and saturates.
        let c = Calendar::default();
        assert_eq!(
            c.due(
                utc("2026-02-13T08:00:00Z"),
                SlaDuration::WorkingDays(u32::MAX)
            ),
            DateTime::<Utc>::MAX_UTC
        );
        assert_eq!(
            c.due(DateTime::<Utc>::MAX_UTC, SlaDuration::Minutes(1)),
            DateTime::<Utc>::MAX_UTC
        );
        // 365 working days with a weekend-only calendar is still exact (73 weeks).
        assert_eq!(
            due(&c, "2026-03-02T09:00:00+08:00", "365wd"),
            "2027-07-26T09:00:00+08:00"
        );
    }
}
