//! Triage at intake: category, severity (with major levels), SLA clocks on a business calendar,
//! repeat complaints, storm incidents and the text's language, from a rule file that reloads on
//! SIGHUP.
//!
//! `assess` is pure with respect to the record being built (it claims nothing); `commit` counts
//! the complaint for repeat detection once the record is durable.

pub mod calendar;
pub mod repeat;
pub mod rules;
pub mod storm;
pub mod text;

use crate::config::TriageConfig;
use crate::record::{rfc3339_ms, Sla, Triage};
use crate::telemetry;
use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use rules::{Category, Rules, Severity};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

/// The shipped rule file, compiled in: used when `triage.rules_file` is empty.
pub const DEFAULT_RULES: &str = include_str!("../../config/triage.toml");

/// One complaint as triage sees it.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub received_at: DateTime<Utc>,
    /// `voice`, `sms`, `email`, `chat`, `social`, `api`.
    pub channel: &'a str,
    pub customer_key: &'a str,
    /// The conversation (thread id, call id, chat session), if any.
    pub thread: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub text: &'a str,
    /// A category the channel already knows, with the rule that set it (`ivr_menu:1`).
    pub category_hint: Option<(&'a str, &'a str)>,
    pub metadata: &'a BTreeMap<String, String>,
}

/// The assessment of one complaint.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub triage: Triage,
    pub severity: Severity,
    pub category: Category,
    /// `zh`, `en`, `ja`, `ko`, `other`; `None` when the text is too short to tell.
    pub language: Option<&'static str>,
    /// To `commit` once the record is durable.
    pub mark: Option<repeat::Mark>,
    pub first_response_due: DateTime<Utc>,
}

pub struct Triager {
    rules: ArcSwap<Rules>,
    file: Option<PathBuf>,
    repeats: repeat::Repeats,
    storms: storm::Storms,
    /// Seeded per process. Customer keys come from outside, but the hashes only key bounded
    /// tables (moka, capped storm buckets), and guessing a 64-bit collision without the seed is
    /// impractical; foldhash is several times faster than SipHash on these short keys.
    hasher: foldhash::quality::RandomState,
}

thread_local! {
    static SCRATCH: RefCell<rules::Scratch> = RefCell::new(rules::Scratch::default());
}

/// Where rules come from, for logs: the file, or the compiled-in default.
fn load(file: Option<&PathBuf>) -> Result<Rules, String> {
    match file {
        Some(p) => {
            let src = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            Rules::from_toml(&src).map_err(|e| format!("{}: {e}", p.display()))
        }
        None => Rules::from_toml(DEFAULT_RULES).map_err(|e| format!("built-in rules: {e}")),
    }
}

impl Triager {
    pub fn new(cfg: &TriageConfig) -> Result<Self, String> {
        let file = (!cfg.rules_file.as_os_str().is_empty()).then(|| cfg.rules_file.clone());
        let rules = load(file.as_ref())?;
        let t = Self {
            repeats: repeat::Repeats::new(cfg.max_repeat_customers),
            storms: storm::Storms::new(storm::Limits {
                max_buckets: cfg.max_storm_buckets,
                max_customers_per_bucket: cfg.max_storm_customers_per_bucket,
            }),
            rules: ArcSwap::from_pointee(rules),
            file,
            hasher: Default::default(),
        };
        t.publish();
        Ok(t)
    }

    /// Checks a rule file without loading it (`switchboard check-config`).
    pub fn check(cfg: &TriageConfig) -> Result<String, String> {
        let file = (!cfg.rules_file.as_os_str().is_empty()).then(|| cfg.rules_file.clone());
        let r = load(file.as_ref())?;
        Ok(describe(&r, file.as_ref()))
    }

    /// Re-reads the rule file; a file that does not check out leaves the current rules in place.
    pub fn reload(&self) -> Result<String, String> {
        match load(self.file.as_ref()) {
            Ok(r) => {
                let summary = describe(&r, self.file.as_ref());
                self.rules.store(Arc::new(r));
                self.publish();
                metrics::counter!(telemetry::TRIAGE_RELOADS, "result" => "ok").increment(1);
                Ok(summary)
            }
            Err(e) => {
                metrics::counter!(telemetry::TRIAGE_RELOADS, "result" => "error").increment(1);
                Err(e)
            }
        }
    }

    fn publish(&self) {
        let r = self.rules.load();
        metrics::gauge!(telemetry::TRIAGE_RULES).set(r.rules.len() as f64);
    }

    /// A one-line description of the rules in force.
    pub fn summary(&self) -> String {
        describe(&self.rules.load(), self.file.as_ref())
    }

    pub fn rules(&self) -> arc_swap::Guard<Arc<Rules>> {
        self.rules.load()
    }

    fn hash(&self, parts: &[&str]) -> u64 {
        let mut h = self.hasher.build_hasher();
        for p in parts {
            p.hash(&mut h);
        }
        h.finish()
    }

    pub fn assess(&self, i: &Input<'_>) -> Outcome {
        let rules = self.rules.load();
        let m = SCRATCH.with(|b| {
            let mut b = b.borrow_mut();
            let parts = [i.subject.unwrap_or(""), i.text];
            let m = rules.scan(&parts, &mut b);
            // A huge text does not pin its buffer to the thread.
            if b.text.capacity() > 64 * 1024 {
                b.text = String::new();
            }
            m
        });
        let hint = i.category_hint.and_then(|(c, _)| Category::parse(c));
        let decision = rules.categorize(&m.fired, &m.hits, hint);
        let category = decision.category;
        let mut reasons: Vec<Arc<str>> = Vec::with_capacity(m.fired.len() + 2);
        let mut severity = Severity::General;
        let mut terms = 0u128;
        if let (Some(h), Some((_, why))) = (hint, i.category_hint) {
            reasons.push(why.into());
            if h == category {
                terms |= 1 << storm::HINT_BIT;
            }
        }
        for &r in &m.fired {
            let rule = &rules.rules[r as usize];
            reasons.push(rule.id.clone());
            if let Some(s) = rule.severity {
                severity = severity.max(s);
            }
            if rule.category == Some(category) {
                terms |= 1 << (u32::from(r) % (storm::TERMS - 1));
            }
        }
        if decision.multi_topic && severity < Severity::Complex {
            severity = Severity::Complex;
            reasons.push("multi_topic".into());
        }
        if rules.vip.contains(i.customer_key) && severity < rules.vip_severity {
            severity = rules.vip_severity;
            reasons.push("vip".into());
        }
        if rules.flag_channels.iter().any(|c| c == i.channel) {
            if let Some(flag) = i.metadata.get(&rules.flag_key) {
                match Severity::parse(flag, None) {
                    Ok(s) => {
                        if s > severity {
                            severity = s;
                        }
                        reasons.push(format!("escalation:{}", s.key()).into());
                    }
                    Err(_) => {
                        metrics::counter!(telemetry::TRIAGE_BAD_FLAGS, "channel" => channel_label(i.channel))
                            .increment(1);
                    }
                }
            }
        }

        // Repeat complaints.
        let now_ms = i.received_at.timestamp_millis();
        let key = if rules.repeat.same_category {
            self.hash(&[i.customer_key, category.as_str()])
        } else {
            self.hash(&[i.customer_key])
        };
        let thread = i.thread.map_or(0, |t| self.hash(&[t]).max(1));
        let count = self.repeats.assess(&rules.repeat, key, now_ms, thread);
        if let Some(s) = rules.repeat.severity_for(count.count) {
            reasons.push(format!("repeat:{}", count.count).into());
            severity = severity.max(s);
        }

        // Storms.
        let mut incident = None;
        if rules.storm.enabled && terms != 0 {
            let area = rules
                .storm
                .area_keys
                .iter()
                .find_map(|k| i.metadata.get(k))
                .map(|a| a.trim().to_lowercase())
                .filter(|a| !a.is_empty())
                .map_or(0, |a| self.hash(&[&a]));
            let joined = self.storms.observe(
                storm::Report {
                    now_ms,
                    category: category as u8,
                    area,
                    customer: self.hash(&[i.customer_key]),
                    terms,
                },
                rules.storm.window_ms,
                rules.storm.min_customers,
            );
            if let storm::Joined::Existing(id) | storm::Joined::Opened(id) = joined {
                severity = severity.max(rules.storm.severity);
                reasons.push("storm".into());
                incident = Some(id.to_string());
            }
        }

        if reasons.is_empty() {
            reasons.push("default".into());
        }
        let (fr, res) = rules.sla(severity);
        let first_response_due = rules.calendar.due(i.received_at, fr);
        let triage = Triage {
            category: Cow::Borrowed(category.as_str()),
            severity: Cow::Borrowed(severity.name()),
            major_level: severity.level(),
            sla: Sla {
                first_response_due: rfc3339_ms(first_response_due),
                resolution_due: rfc3339_ms(rules.calendar.due(i.received_at, res)),
            },
            reasons,
            incident,
        };
        metrics::counter!(telemetry::TRIAGE_RECORDS, "category" => category.as_str(), "severity" => severity.key())
            .increment(1);
        Outcome {
            triage,
            severity,
            category,
            language: m.scripts.language(),
            mark: count.mark,
            first_response_due,
        }
    }

    /// Counts durable complaints for repeat detection.
    pub fn commit(&self, marks: impl IntoIterator<Item = repeat::Mark>) {
        let rules = self.rules.load();
        for m in marks {
            self.repeats.commit(&rules.repeat, m);
        }
    }

    /// Ends quiet incidents and publishes the gauges.
    pub fn sweep(&self, now: DateTime<Utc>) {
        let rules = self.rules.load();
        self.storms
            .sweep(now.timestamp_millis(), rules.storm.window_ms);
        metrics::gauge!(telemetry::TRIAGE_REPEAT_CUSTOMERS).set(self.repeats.len() as f64);
    }
}

fn describe(r: &Rules, file: Option<&PathBuf>) -> String {
    format!(
        "triage rules {} ({}): {} rules, {} keywords ({} KiB automaton), calendar {}",
        if r.version.is_empty() {
            "-"
        } else {
            &r.version
        },
        file.map_or("built-in".to_string(), |p| p.display().to_string()),
        r.rules.len(),
        r.keywords,
        r.memory() / 1024,
        r.calendar.time_zone(),
    )
}

/// Channel names are a fixed vocabulary; anything else is labelled `other`.
fn channel_label(c: &str) -> &'static str {
    match c {
        "voice" => "voice",
        "sms" => "sms",
        "email" => "email",
        "chat" => "chat",
        "social" => "social",
        "api" => "api",
        _ => "other",
    }
}

#[cfg(test)]
mod tests;
