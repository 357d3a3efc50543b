//! The triage rule file: what it may say (serde, unknown keys refused), how it is checked, and
//! the compiled form that one Aho-Corasick pass over the folded text evaluates.
//!
//! Matching is deterministic: every keyword of every rule goes into one Aho-Corasick automaton
//! (overlapping matches, so nothing shadows anything); a rule's vote is its weight times the
//! separate places it matched (at most `MAX_HITS`); a category's score is the sum of its rules'
//! votes; the best score wins and ties go to the category listed first in `categories.order`.
//!
//! Two automata hold the patterns, and the folded text picks one:
//! - ASCII text (most English) can only match ASCII keywords. Those go into `aho-corasick`'s DFA
//!   (one table lookup per byte, no failure links), walked with the crate's low-level
//!   `Automaton` API rather than its iterators: the text is cut into up to four slices walked in
//!   the same loop, so the CPU overlaps their table loads instead of waiting on one load per
//!   byte. A slice starts early by the longest keyword's length minus one and reports only the
//!   matches ending inside it, so every match is found exactly once.
//! - Any other text goes through daachorse's character-wise double-array automaton of all the
//!   patterns: one step per character, so Chinese costs a third of the steps of a byte-wise walk.
//!
//! On this 2-core VM, for 1 KB with the shipped keywords: English 3.5–3.7 µs walking the DFA
//! as one stream, 1.5–1.8 µs as four, 2.5–3.1 µs with daachorse's byte-wise automaton. For
//! Chinese a DFA of all the patterns walked as four streams was fast alone (1.6–1.8 µs) but made
//! the whole text pass slower (3.4 µs against 2.8–3.0 µs with the character-wise automaton) and
//! took 16 MB instead of 3 MB + 0.5 MB.

use super::calendar::{Calendar, CalendarSpec, SlaDuration};
use super::text::{fold, fold_into, Scripts};
use aho_corasick::automaton::Automaton;
use aho_corasick::dfa::DFA;
use aho_corasick::{Anchored, MatchKind};
use daachorse::CharwiseDoubleArrayAhoCorasick;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Most rules a file may hold.
pub const MAX_RULES: usize = 512;
/// Separate matches of one rule that add to its category's score.
pub const MAX_HITS: u8 = 3;
/// Most keywords (before Traditional/Simplified expansion).
pub const MAX_KEYWORDS: usize = 20_000;
const MAX_KEYWORD_BYTES: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    Network,
    Billing,
    Service,
    Product,
    Privacy,
    Other,
}

impl Category {
    pub const ALL: [Category; 6] = [
        Category::Network,
        Category::Billing,
        Category::Service,
        Category::Product,
        Category::Privacy,
        Category::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Network => "network",
            Category::Billing => "billing",
            Category::Service => "service",
            Category::Product => "product",
            Category::Privacy => "privacy",
            Category::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// Severity, ordered from least to most severe (major level 1 is the most severe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    General,
    Complex,
    Urgent,
    Major3,
    Major2,
    Major1,
}

impl Severity {
    pub const ALL: [Severity; 6] = [
        Severity::General,
        Severity::Complex,
        Severity::Urgent,
        Severity::Major3,
        Severity::Major2,
        Severity::Major1,
    ];

    /// The record's `severity` field.
    pub fn name(self) -> &'static str {
        match self {
            Severity::General => "general",
            Severity::Complex => "complex",
            Severity::Urgent => "urgent",
            _ => "major",
        }
    }

    /// The record's `major_level` field.
    pub fn level(self) -> Option<u8> {
        match self {
            Severity::Major3 => Some(3),
            Severity::Major2 => Some(2),
            Severity::Major1 => Some(1),
            _ => None,
        }
    }

    /// The key used in `[sla]` and in metric labels: `general` … `major1`.
    pub fn key(self) -> &'static str {
        match self {
            Severity::General => "general",
            Severity::Complex => "complex",
            Severity::Urgent => "urgent",
            Severity::Major3 => "major3",
            Severity::Major2 => "major2",
            Severity::Major1 => "major1",
        }
    }

    /// `general`, `complex`, `urgent`, `major1`..`major3`, or `major` with a separate level.
    pub fn parse(s: &str, level: Option<u8>) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        let sev = match (s.as_str(), level) {
            ("general", None) => Severity::General,
            ("complex", None) => Severity::Complex,
            ("urgent", None) => Severity::Urgent,
            ("major", Some(3)) | ("major3", None) => Severity::Major3,
            ("major", Some(2)) | ("major2", None) => Severity::Major2,
            ("major", Some(1)) | ("major1", None) => Severity::Major1,
            ("major", None) => return Err("`major` needs `level = 1 | 2 | 3`".into()),
            (_, Some(_)) if !s.starts_with("major") => {
                return Err(format!("`level` only goes with `major`, not `{s}`"))
            }
            _ => {
                return Err(format!(
                    "unknown severity `{s}` (general, complex, urgent, major with level 1-3)"
                ))
            }
        };
        Ok(sev)
    }
}

// ---------------------------------------------------------------------------------------------
// The file as written.

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// Free text naming this revision of the rules; logged on load and exported as a metric label.
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub variants: VariantsSpec,
    #[serde(default)]
    pub categories: CategoriesSpec,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleSpec>,
    #[serde(default)]
    pub escalation: EscalationSpec,
    #[serde(default)]
    pub repeat: RepeatSpec,
    #[serde(default)]
    pub storm: StormSpec,
    #[serde(default)]
    pub sla: BTreeMap<String, SlaSpec>,
    #[serde(default)]
    pub calendar: CalendarSpec,
}

/// Traditional ↔ Simplified character pairs: `traditional` and `simplified` list the same number
/// of characters (whitespace ignored); every keyword is matched in both forms.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantsSpec {
    #[serde(default)]
    pub traditional: String,
    #[serde(default)]
    pub simplified: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoriesSpec {
    /// Tie-break order, most preferred first; must name all six categories.
    #[serde(default = "default_order")]
    pub order: Vec<String>,
    /// Score a channel's own category (an IVR menu choice) adds to that category.
    #[serde(default = "default_hint_weight")]
    pub hint_weight: u32,
    /// Least score a category needs to win; below it the record is `other`.
    #[serde(default = "one")]
    pub min_score: u32,
    /// When a second category also scores at least this much, the complaint is about several
    /// matters and is at least `complex`. 0 turns this off.
    #[serde(default)]
    pub multi_topic_score: u32,
}

impl Default for CategoriesSpec {
    fn default() -> Self {
        Self {
            order: default_order(),
            hint_weight: default_hint_weight(),
            min_score: 1,
            multi_topic_score: 0,
        }
    }
}

fn default_order() -> Vec<String> {
    [
        "privacy", "network", "billing", "product", "service", "other",
    ]
    .map(String::from)
    .to_vec()
}
fn default_hint_weight() -> u32 {
    4
}
fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique; named in the record's `reasons` when the rule fires.
    pub id: String,
    /// The category the rule votes for.
    #[serde(default)]
    pub category: Option<String>,
    /// How much the vote counts (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
    /// The least severity a complaint gets when the rule fires.
    #[serde(default)]
    pub severity: Option<String>,
    /// With `severity = "major"`: 1, 2 or 3.
    #[serde(default)]
    pub level: Option<u8>,
    /// Phrases. Chinese matches anywhere; a phrase starting (ending) with a Latin letter or digit
    /// matches only at a word start (end); a trailing `*` makes it a prefix (`charg*`).
    pub keywords: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationSpec {
    /// Customer keys (E.164 phone, lower-case email, `customer:<id>`) of VIP customers.
    #[serde(default)]
    pub vip_customers: Vec<String>,
    /// The least severity of a VIP's complaint (default `urgent`).
    #[serde(default)]
    pub vip_severity: Option<String>,
    /// Channels whose `metadata.<flag_key>` is trusted to set a severity (operator systems).
    #[serde(default)]
    pub flag_channels: Vec<String>,
    /// The metadata key carrying an internal escalation (`complex`, `urgent`, `major1`...).
    #[serde(default)]
    pub flag_key: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepeatSpec {
    /// The window repeat complaints are counted in.
    #[serde(default = "default_repeat_days")]
    pub days: u32,
    /// Complaints closer than this to the previous counted one (or in the same conversation)
    /// are the same contact, not a repeat.
    #[serde(default = "default_min_gap")]
    pub min_gap_minutes: u32,
    /// Count per customer and category (the same matter), or per customer.
    #[serde(default = "yes")]
    pub same_category: bool,
    /// Escalation steps: the `count`-th complaint within `days` gets at least `severity`.
    #[serde(default = "default_steps", rename = "step")]
    pub steps: Vec<RepeatStep>,
}

impl Default for RepeatSpec {
    fn default() -> Self {
        Self {
            days: default_repeat_days(),
            min_gap_minutes: default_min_gap(),
            same_category: true,
            steps: default_steps(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepeatStep {
    pub count: u32,
    pub severity: String,
    #[serde(default)]
    pub level: Option<u8>,
}

fn default_repeat_days() -> u32 {
    7
}
fn default_min_gap() -> u32 {
    60
}
fn yes() -> bool {
    true
}
fn default_steps() -> Vec<RepeatStep> {
    vec![
        RepeatStep {
            count: 2,
            severity: "complex".into(),
            level: None,
        },
        RepeatStep {
            count: 3,
            severity: "major".into(),
            level: Some(3),
        },
    ]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StormSpec {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The sliding window distinct customers are counted in.
    #[serde(default = "default_storm_window")]
    pub window_secs: u64,
    /// Distinct customers sharing a category and a key term (and area) that make a storm.
    #[serde(default = "default_storm_customers")]
    pub min_customers: u32,
    /// The least severity of a complaint that belongs to an incident.
    #[serde(default = "default_storm_severity")]
    pub severity: String,
    #[serde(default = "default_storm_level")]
    pub level: Option<u8>,
    /// Metadata keys holding an area or cell (first present wins); complaints from different
    /// areas are different incidents, complaints without one share the area "".
    #[serde(default = "default_area_keys")]
    pub area_keys: Vec<String>,
}

impl Default for StormSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            window_secs: default_storm_window(),
            min_customers: default_storm_customers(),
            severity: default_storm_severity(),
            level: default_storm_level(),
            area_keys: default_area_keys(),
        }
    }
}

fn default_storm_window() -> u64 {
    900
}
fn default_storm_customers() -> u32 {
    20
}
fn default_storm_severity() -> String {
    "major".into()
}
fn default_storm_level() -> Option<u8> {
    Some(2)
}
fn default_area_keys() -> Vec<String> {
    ["area", "cell_id", "cell", "district", "city"]
        .map(String::from)
        .to_vec()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlaSpec {
    pub first_response: String,
    pub resolution: String,
}

/// DOMAIN.md's table: working days where it says so, wall-clock hours for urgent and major.
fn default_sla(sev: Severity) -> (&'static str, &'static str) {
    match sev {
        Severity::General => ("3wd", "7wd"),
        Severity::Complex => ("3wd", "15wd"),
        Severity::Urgent => ("24h", "48h"),
        Severity::Major3 => ("4h", "20wd"),
        Severity::Major2 => ("2h", "20wd"),
        Severity::Major1 => ("1h", "20wd"),
    }
}

// ---------------------------------------------------------------------------------------------
// Compiled.

#[derive(Debug)]
pub struct Rule {
    pub id: Arc<str>,
    pub category: Option<Category>,
    pub weight: u32,
    pub severity: Option<Severity>,
}

/// One rule's use of a pattern: the rule (index into `rules`) and whether the match must start
/// (end) at a word boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Use {
    rule: u16,
    start_boundary: bool,
    end_boundary: bool,
}

#[derive(Debug, Clone)]
pub struct RepeatPolicy {
    pub window_ms: i64,
    pub min_gap_ms: i64,
    pub same_category: bool,
    /// Ascending by count.
    pub steps: Vec<(u32, Severity)>,
}

impl RepeatPolicy {
    /// Largest count any step needs: how many past complaints are worth remembering.
    pub fn depth(&self) -> usize {
        self.steps.iter().map(|s| s.0 as usize).max().unwrap_or(0)
    }

    pub fn severity_for(&self, count: u32) -> Option<Severity> {
        self.steps
            .iter()
            .filter(|s| count >= s.0)
            .map(|s| s.1)
            .max()
    }
}

#[derive(Debug, Clone)]
pub struct StormPolicy {
    pub enabled: bool,
    pub window_ms: i64,
    pub min_customers: u32,
    pub severity: Severity,
    pub area_keys: Vec<String>,
}

/// A rule file, checked and compiled.
pub struct Rules {
    pub version: String,
    /// The ASCII patterns, for ASCII text.
    dfa: DFA,
    /// The unanchored start state of `dfa`.
    start: aho_corasick::automaton::StateID,
    /// The longest ASCII pattern, in bytes (how far a slice of the text must start early).
    max_len: usize,
    /// `dfa`'s pattern ids → pattern (index into `patterns`).
    ascii_ids: Vec<u32>,
    /// Every pattern, for any other text.
    charwise: CharwiseDoubleArrayAhoCorasick<u32>,
    /// Per pattern (the automata's value `p`), the rules using it: `uses[first_use[p]..first_use[p + 1]]`
    /// (one flat array, so a match costs one lookup).
    uses: Vec<Use>,
    first_use: Vec<u32>,
    pub rules: Vec<Rule>,
    order: [Category; 6],
    rank: [u8; 6],
    pub hint_weight: u32,
    pub min_score: u32,
    pub multi_topic_score: u32,
    pub vip: HashSet<String>,
    pub vip_severity: Severity,
    pub flag_channels: Vec<String>,
    pub flag_key: String,
    pub repeat: RepeatPolicy,
    pub storm: StormPolicy,
    sla: [(SlaDuration, SlaDuration); 6],
    pub calendar: Calendar,
    pub keywords: usize,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("version", &self.version)
            .field("rules", &self.rules.len())
            .field("keywords", &self.keywords)
            .finish()
    }
}

/// How much of the folded text language detection looks at: about 35 English words or 65
/// Chinese characters, plenty to tell the language, and the cost stays flat for long texts
/// (the word count mispredicts a branch at every word end: ~1.5 ns per byte).
const LANGUAGE_SAMPLE: usize = 200;

/// Buffers `scan` reuses between calls (one per thread).
#[derive(Debug, Default)]
pub struct Scratch {
    /// The folded text of the last scan.
    pub text: String,
    count: Vec<u8>,
    last_end: Vec<usize>,
    /// Per slice of the text: (end, pattern) of each match, in order of `end`.
    found: [Vec<(usize, u32)>; STREAMS],
}

/// At most this many slices of a text are walked together (see the module doc).
const STREAMS: usize = 4;

/// What the text pass found.
#[derive(Debug, Clone, Default)]
pub struct TextMatch {
    /// Indexes of the rules that fired, ascending.
    pub fired: Vec<u16>,
    /// For each fired rule (same order), how many separate places of the text it matched,
    /// at most `MAX_HITS`: overlapping keywords of one rule ("网速", "网速慢") count once.
    pub hits: Vec<u8>,
    pub scripts: Scripts,
}

/// The category decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CategoryDecision {
    pub category: Category,
    pub score: u32,
    /// Another category scoring at least `multi_topic_score`.
    pub multi_topic: bool,
}

impl Rules {
    /// Parses and compiles a rule file; every error names what is wrong and where.
    pub fn from_toml(src: &str) -> Result<Self, String> {
        let file: RuleFile = toml::from_str(src).map_err(|e| e.to_string())?;
        Self::compile(file)
    }

    pub fn compile(file: RuleFile) -> Result<Self, String> {
        // Variants.
        let trad: Vec<char> = file
            .variants
            .traditional
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let simp: Vec<char> = file
            .variants
            .simplified
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if trad.len() != simp.len() {
            return Err(format!(
                "variants: `traditional` has {} characters and `simplified` {}; they pair up one to one",
                trad.len(),
                simp.len()
            ));
        }
        let mut to_simp: HashMap<char, char> = HashMap::new();
        let mut to_trad: HashMap<char, char> = HashMap::new();
        for (&t, &s) in trad.iter().zip(&simp) {
            if t == s {
                continue;
            }
            to_simp.insert(t, s);
            to_trad.entry(s).or_insert(t);
        }

        // Categories.
        let mut order = Vec::with_capacity(6);
        for name in &file.categories.order {
            let c = Category::parse(name)
                .ok_or_else(|| format!("categories.order: unknown category `{name}`"))?;
            if order.contains(&c) {
                return Err(format!("categories.order: `{name}` twice"));
            }
            order.push(c);
        }
        if order.len() != 6 {
            return Err(
                "categories.order: must list network, billing, service, product, privacy, other"
                    .into(),
            );
        }
        let order: [Category; 6] = [order[0], order[1], order[2], order[3], order[4], order[5]];
        let mut rank = [0u8; 6];
        for (i, c) in order.iter().enumerate() {
            rank[*c as usize] = i as u8;
        }

        // Rules and their keywords.
        if file.rules.len() > MAX_RULES {
            return Err(format!("more than {MAX_RULES} rules"));
        }
        let mut rules = Vec::with_capacity(file.rules.len());
        let mut ids = HashSet::new();
        let mut texts: Vec<String> = Vec::new();
        let mut patterns: Vec<Vec<Use>> = Vec::new();
        let mut by_text: HashMap<String, usize> = HashMap::new();
        let mut keywords = 0usize;
        for (i, r) in file.rules.iter().enumerate() {
            let at = format!("rule `{}`", r.id);
            if r.id.trim().is_empty()
                || r.id.len() > 64
                || !r
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
            {
                return Err(format!(
                    "rule #{}: id must be 1-64 characters of a-z, 0-9, '.', '_', '-', ':'",
                    i + 1
                ));
            }
            if !ids.insert(r.id.clone()) {
                return Err(format!("{at}: id used twice"));
            }
            let category = match &r.category {
                Some(c) => Some(
                    Category::parse(c).ok_or_else(|| format!("{at}: unknown category `{c}`"))?,
                ),
                None => None,
            };
            let severity = match &r.severity {
                Some(s) => Some(Severity::parse(s, r.level).map_err(|e| format!("{at}: {e}"))?),
                None if r.level.is_some() => {
                    return Err(format!("{at}: `level` without `severity = \"major\"`"))
                }
                None => None,
            };
            if category.is_none() && severity.is_none() {
                return Err(format!("{at}: needs a `category`, a `severity`, or both"));
            }
            if r.weight.is_some() && category.is_none() {
                return Err(format!("{at}: `weight` without `category`"));
            }
            let weight = r.weight.unwrap_or(1);
            if weight == 0 || weight > 1000 {
                return Err(format!("{at}: weight must be 1-1000"));
            }
            if r.keywords.is_empty() {
                return Err(format!("{at}: no keywords"));
            }
            for k in &r.keywords {
                keywords += 1;
                if keywords > MAX_KEYWORDS {
                    return Err(format!("more than {MAX_KEYWORDS} keywords"));
                }
                let (body, prefix) = match k.trim().strip_suffix('*') {
                    Some(b) => (b, true),
                    None => (k.trim(), false),
                };
                let folded = fold(body);
                if folded.is_empty() || folded.len() > MAX_KEYWORD_BYTES {
                    return Err(format!(
                        "{at}: keyword `{k}` is empty or longer than {MAX_KEYWORD_BYTES} bytes"
                    ));
                }
                let first = folded.as_bytes()[0];
                let last = folded.as_bytes()[folded.len() - 1];
                let start_boundary = first.is_ascii_alphanumeric();
                let end_boundary = !prefix && last.is_ascii_alphanumeric();
                let simplified: String = folded
                    .chars()
                    .map(|c| *to_simp.get(&c).unwrap_or(&c))
                    .collect();
                let traditional: String = simplified
                    .chars()
                    .map(|c| *to_trad.get(&c).unwrap_or(&c))
                    .collect();
                let u = Use {
                    rule: i as u16,
                    start_boundary,
                    end_boundary,
                };
                for form in [folded.clone(), simplified, traditional] {
                    let p = match by_text.get(&form) {
                        Some(&p) => p,
                        None => {
                            by_text.insert(form.clone(), texts.len());
                            texts.push(form);
                            patterns.push(Vec::new());
                            texts.len() - 1
                        }
                    };
                    if !patterns[p].contains(&u) {
                        patterns[p].push(u);
                    }
                }
            }
            rules.push(Rule {
                id: r.id.as_str().into(),
                category,
                weight,
                severity,
            });
        }
        if texts.is_empty() {
            // The automata need a pattern; this one (a control character) never occurs in
            // folded text.
            texts.push("\u{1}".into());
            patterns.push(Vec::new());
        }
        let mut uses = Vec::new();
        let mut first_use = vec![0u32];
        for p in &patterns {
            uses.extend_from_slice(p);
            first_use.push(uses.len() as u32);
        }
        // Pattern ids are indexes into `texts` (and `patterns`). No prefilter: with thousands of
        // patterns it would not skip anything, and it would make the start state special.
        let ascii_ids: Vec<u32> = (0..texts.len() as u32)
            .filter(|&i| texts[i as usize].is_ascii())
            .collect();
        let dfa = DFA::builder()
            .match_kind(MatchKind::Standard)
            .prefilter(false)
            .build(ascii_ids.iter().map(|&i| &texts[i as usize]))
            .map_err(|e| format!("cannot build the keyword matcher: {e}"))?;
        let start = dfa
            .start_state(Anchored::No)
            .map_err(|e| format!("cannot build the keyword matcher: {e}"))?;
        let max_len = ascii_ids
            .iter()
            .map(|&i| texts[i as usize].len())
            .max()
            .unwrap_or(1);
        let charwise = CharwiseDoubleArrayAhoCorasick::with_values(
            texts
                .iter()
                .enumerate()
                .map(|(i, t)| (t.as_str(), i as u32)),
        )
        .map_err(|e| format!("cannot build the keyword matcher: {e}"))?;

        // Escalation.
        let vip = file
            .escalation
            .vip_customers
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let vip_severity = match &file.escalation.vip_severity {
            Some(s) => {
                Severity::parse(s, None).map_err(|e| format!("escalation.vip_severity: {e}"))?
            }
            None => Severity::Urgent,
        };
        let flag_key = file
            .escalation
            .flag_key
            .clone()
            .unwrap_or_else(|| "escalation".into());

        // Repeat.
        let rs = &file.repeat;
        if rs.days == 0 || rs.days > 366 {
            return Err("repeat.days: 1-366".into());
        }
        let mut steps = Vec::new();
        for s in &rs.steps {
            if s.count < 2 || s.count as usize > super::repeat::DEPTH {
                return Err(format!(
                    "repeat.step.count: 2-{} (the 2nd complaint is the first repeat)",
                    super::repeat::DEPTH
                ));
            }
            let sev = Severity::parse(&s.severity, s.level)
                .map_err(|e| format!("repeat.step (count {}): {e}", s.count))?;
            steps.push((s.count, sev));
        }
        steps.sort();
        let repeat = RepeatPolicy {
            window_ms: i64::from(rs.days) * 86_400_000,
            min_gap_ms: i64::from(rs.min_gap_minutes) * 60_000,
            same_category: rs.same_category,
            steps,
        };

        // Storm.
        let ss = &file.storm;
        if ss.window_secs == 0 || ss.window_secs > 86_400 {
            return Err("storm.window_secs: 1-86400".into());
        }
        if ss.min_customers < 2 {
            return Err("storm.min_customers: at least 2".into());
        }
        let storm = StormPolicy {
            enabled: ss.enabled,
            window_ms: ss.window_secs as i64 * 1000,
            min_customers: ss.min_customers,
            severity: Severity::parse(&ss.severity, ss.level)
                .map_err(|e| format!("storm.severity: {e}"))?,
            area_keys: ss.area_keys.clone(),
        };

        // SLA.
        for k in file.sla.keys() {
            if !Severity::ALL.iter().any(|s| s.key() == k) {
                return Err(format!(
                    "sla.{k}: unknown severity (general, complex, urgent, major1, major2, major3)"
                ));
            }
        }
        let mut sla = [(SlaDuration::Minutes(0), SlaDuration::Minutes(0)); 6];
        for sev in Severity::ALL {
            let (f, r) = match file.sla.get(sev.key()) {
                Some(s) => (s.first_response.as_str(), s.resolution.as_str()),
                None => default_sla(sev),
            };
            let f: SlaDuration = f
                .parse()
                .map_err(|e| format!("sla.{}.first_response: {e}", sev.key()))?;
            let r: SlaDuration = r
                .parse()
                .map_err(|e| format!("sla.{}.resolution: {e}", sev.key()))?;
            sla[sev as usize] = (f, r);
        }
        let calendar = Calendar::from_spec(&file.calendar).map_err(|e| format!("calendar: {e}"))?;

        Ok(Self {
            version: file.version,
            dfa,
            start,
            max_len,
            ascii_ids,
            charwise,
            uses,
            first_use,
            rules,
            order,
            rank,
            hint_weight: file.categories.hint_weight,
            min_score: file.categories.min_score.max(1),
            multi_topic_score: file.categories.multi_topic_score,
            vip,
            vip_severity,
            flag_channels: file.escalation.flag_channels,
            flag_key,
            repeat,
            storm,
            sla,
            calendar,
            keywords,
        })
    }

    /// Folds `parts` into `buf` (cleared first) and runs the automaton over it.
    pub fn scan(&self, parts: &[&str], scratch: &mut Scratch) -> TextMatch {
        let Scratch {
            text: buf,
            count,
            last_end,
            found,
        } = scratch;
        buf.clear();
        for p in parts {
            if !buf.is_empty() && !buf.ends_with(' ') {
                buf.push(' ');
            }
            fold_into(buf, p);
        }
        let text = buf.as_str();
        let bytes = text.as_bytes();
        let scripts = Scripts::sample(bytes, LANGUAGE_SAMPLE);
        // Per rule: separate matches so far, and where its last counted match ended.
        count.clear();
        count.resize(self.rules.len(), 0);
        last_end.clear();
        last_end.resize(self.rules.len(), 0);
        let mut on_match = |start: usize, end: usize, value: u32| {
            let v = value as usize;
            for u in &self.uses[self.first_use[v] as usize..self.first_use[v + 1] as usize] {
                if u.start_boundary && start > 0 && is_word(bytes[start - 1]) {
                    continue;
                }
                if u.end_boundary && end < bytes.len() && is_word(bytes[end]) {
                    continue;
                }
                let r = u.rule as usize;
                if count[r] == 0 || start >= last_end[r] {
                    count[r] = count[r].saturating_add(1).min(MAX_HITS);
                }
                last_end[r] = last_end[r].max(end);
            }
        };
        if bytes.is_ascii() {
            for f in found.iter_mut() {
                f.clear();
            }
            // Slices only pay off when they are long next to the overlap each walks twice.
            if bytes.len() >= 8 * self.max_len {
                self.walk::<4>(bytes, found);
            } else if bytes.len() >= 4 * self.max_len {
                self.walk::<2>(bytes, found);
            } else {
                self.walk::<1>(bytes, found);
            }
            // The slices in order, each in order of end: every match in order of end.
            for &(end, p) in found.iter().flatten() {
                let p = aho_corasick::PatternID::new_unchecked(p as usize);
                on_match(end - self.dfa.pattern_len(p), end, self.ascii_ids[p]);
            }
        } else {
            for m in self.charwise.find_overlapping_iter(text) {
                on_match(m.start(), m.end(), m.value());
            }
        }
        let mut fired = Vec::new();
        let mut hits = Vec::new();
        for (r, &c) in count.iter().enumerate() {
            if c > 0 {
                fired.push(r as u16);
                hits.push(c);
            }
        }
        TextMatch {
            fired,
            hits,
            scripts,
        }
    }

    /// Walks the DFA over `bytes` as `N` slices in one loop and records each slice's matches in
    /// `found[k]`. Slice `k` reports the matches ending in `lo[k]..hi[k]` (the slices tile the
    /// text) and starts walking `max_len - 1` bytes before `lo[k]`, so it has seen the whole of
    /// any match ending there. Every slice walks about as many bytes, so the loop runs in step.
    fn walk<const N: usize>(&self, bytes: &[u8], found: &mut [Vec<(usize, u32)>; STREAMS]) {
        let overlap = self.max_len - 1;
        let per = (bytes.len() + (N - 1) * overlap).div_ceil(N);
        let (mut from, mut lo, mut hi) = ([0usize; N], [0usize; N], [0usize; N]);
        let mut at = 0;
        for k in 0..N {
            lo[k] = at;
            from[k] = at.saturating_sub(overlap);
            hi[k] = (from[k] + per).clamp(at, bytes.len());
            at = hi[k];
        }
        hi[N - 1] = bytes.len();
        let dfa = &self.dfa;
        let mut state = [self.start; N];
        let steps = (0..N).map(|k| hi[k] - from[k]).min().unwrap_or(0);
        for j in 0..steps {
            for k in 0..N {
                state[k] = dfa.next_state(Anchored::No, state[k], bytes[from[k] + j]);
            }
            for k in 0..N {
                if dfa.is_special(state[k]) {
                    self.report(state[k], from[k] + j + 1, lo[k], &mut found[k]);
                }
            }
        }
        for k in 0..N {
            let at = from[k] + steps;
            for (i, &b) in bytes[at..hi[k]].iter().enumerate() {
                state[k] = dfa.next_state(Anchored::No, state[k], b);
                if dfa.is_special(state[k]) {
                    self.report(state[k], at + i + 1, lo[k], &mut found[k]);
                }
            }
        }
    }

    /// Records the patterns matching in `state` at `end`, if `end` is past the slice's start.
    #[inline]
    fn report(
        &self,
        state: aho_corasick::automaton::StateID,
        end: usize,
        lo: usize,
        found: &mut Vec<(usize, u32)>,
    ) {
        if end > lo && self.dfa.is_match(state) {
            for i in 0..self.dfa.match_len(state) {
                found.push((end, self.dfa.match_pattern(state, i).as_u32()));
            }
        }
    }

    /// The winning category from the rules that fired and a channel's own hint.
    /// A rule's vote is its weight times the places it matched (`hits`, capped at `MAX_HITS`).
    pub fn categorize(
        &self,
        fired: &[u16],
        hits: &[u8],
        hint: Option<Category>,
    ) -> CategoryDecision {
        let mut score = [0u32; 6];
        for (&r, &h) in fired.iter().zip(hits) {
            let rule = &self.rules[r as usize];
            if let Some(c) = rule.category {
                score[c as usize] += rule.weight * u32::from(h);
            }
        }
        if let Some(h) = hint {
            score[h as usize] += self.hint_weight;
        }
        let mut best = Category::Other;
        let mut best_score = 0;
        for c in self.order {
            if score[c as usize] > best_score {
                best = c;
                best_score = score[c as usize];
            }
        }
        if best_score < self.min_score {
            return CategoryDecision {
                category: Category::Other,
                score: best_score,
                multi_topic: false,
            };
        }
        let multi_topic = self.multi_topic_score > 0
            && Category::ALL.iter().any(|&c| {
                c != best && c != Category::Other && score[c as usize] >= self.multi_topic_score
            });
        CategoryDecision {
            category: best,
            score: best_score,
            multi_topic,
        }
    }

    /// Heap bytes of the keyword automata.
    pub fn memory(&self) -> usize {
        self.dfa.memory_usage() + self.charwise.heap_bytes()
    }

    /// Tie-break rank of a category (0 = preferred).
    pub fn rank(&self, c: Category) -> u8 {
        self.rank[c as usize]
    }

    /// `(first_response, resolution)` for a severity.
    pub fn sla(&self, sev: Severity) -> (SlaDuration, SlaDuration) {
        self.sla[sev as usize]
    }
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
version = "t1"
[variants]
traditional = "網絡號訊"
simplified  = "网络号讯"

[[rule]]
id = "network.no_signal"
category = "network"
weight = 3
keywords = ["没信号", "网络断了", "no signal", "outage"]

[[rule]]
id = "billing.charge"
category = "billing"
weight = 2
keywords = ["扣费", "charg*", "bill"]

[[rule]]
id = "major.regulator"
severity = "major"
level = 2
keywords = ["工信部", "12300", "regulator"]
"#;

    fn ids(r: &Rules, s: &str) -> Vec<String> {
        let mut buf = Scratch::default();
        r.scan(&[s], &mut buf)
            .fired
            .iter()
            .map(|&i| r.rules[i as usize].id.to_string())
            .collect()
    }

    #[test]
    fn matches_folded_text_in_both_scripts() {
        let r = Rules::from_toml(SMALL).unwrap();
        assert_eq!(ids(&r, "家里网络断了"), ["network.no_signal"]);
        assert_eq!(
            ids(&r, "家裡網絡斷了"),
            Vec::<String>::new(),
            "斷 is not in the pairs"
        );
        assert_eq!(ids(&r, "我家網絡断了"), ["network.no_signal"]);
        assert_eq!(ids(&r, "ＮＯ　ＳＩＧＮＡＬ at home"), ["network.no_signal"]);
        assert_eq!(
            ids(&r, "I was charged twice, I will call the regulator"),
            ["billing.charge", "major.regulator"]
        );
    }

    /// The slices of the interleaved DFA walk tile the text: for every length around the
    /// thresholds and matches across every seam, four and two slices find exactly what one does.
    #[test]
    fn sliced_walk_finds_each_match_once() {
        let r = Rules::from_toml(include_str!("../../config/triage.toml")).unwrap();
        let words = [
            "no signal",
            "charged twice",
            "the ",
            "refund",
            "outage",
            "x",
            "complained multiple times",
            "  ",
            "my information was leaked",
            "billing",
            "a",
        ];
        let mut text = String::new();
        let mut seed = 7u64;
        for len in (0..1400).step_by(37) {
            while text.len() < len {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                text.push_str(words[(seed >> 33) as usize % words.len()]);
            }
            let bytes = &text.as_bytes()[..len];
            let mut one: [Vec<(usize, u32)>; STREAMS] = Default::default();
            r.walk::<1>(bytes, &mut one);
            for n in [2, 4] {
                let mut many: [Vec<(usize, u32)>; STREAMS] = Default::default();
                if n == 2 {
                    r.walk::<2>(bytes, &mut many);
                } else {
                    r.walk::<4>(bytes, &mut many);
                }
                let flat: Vec<_> = many.iter().flatten().copied().collect();
                assert_eq!(flat, one[0], "{n} slices over {len} bytes");
            }
            assert!(
                len < 200 || one[0].len() > 3,
                "{len} bytes found too little"
            );
        }
    }

    #[test]
    fn latin_keywords_respect_word_boundaries() {
        let r = Rules::from_toml(SMALL).unwrap();
        assert!(ids(&r, "billion").is_empty());
        assert_eq!(ids(&r, "my bill."), ["billing.charge"]);
        assert_eq!(ids(&r, "charges"), ["billing.charge"]);
        assert!(ids(&r, "discharge").is_empty());
        assert!(
            ids(&r, "call 13812300000").is_empty(),
            "12300 inside a number"
        );
        assert_eq!(ids(&r, "打12300投诉"), ["major.regulator"]);
    }

    #[test]
    fn categorize_scores_and_breaks_ties_by_order() {
        let r = Rules::from_toml(SMALL).unwrap();
        let mut buf = Scratch::default();
        let m = r.scan(&["no signal and I was charged"], &mut buf);
        let d = r.categorize(&m.fired, &m.hits, None);
        assert_eq!(d.category, Category::Network);
        assert_eq!(d.score, 3);
        let d = r.categorize(&m.fired, &m.hits, Some(Category::Billing));
        assert_eq!(d.category, Category::Billing, "hint 4 + 2 beats 3");
        let d = r.categorize(&[], &[], None);
        assert_eq!(d.category, Category::Other);
    }

    #[test]
    fn counts_english_words() {
        let r = Rules::from_toml(SMALL).unwrap();
        let mut buf = Scratch::default();
        let m = r.scan(&["The network is down since the morning"], &mut buf);
        assert_eq!(m.scripts.english, 4);
        assert_eq!(m.scripts.language(), Some("en"));
    }

    #[test]
    fn rejects_bad_files_with_clear_errors() {
        for (src, want) in [
            ("[[rule]]\nid = \"a\"\ncategory = \"net\"\nkeywords = [\"x\"]", "unknown category"),
            ("[[rule]]\nid = \"a\"\nkeywords = [\"x\"]", "needs a `category`"),
            ("[[rule]]\nid = \"a\"\nseverity = \"major\"\nkeywords = [\"x\"]", "level"),
            ("[[rule]]\nid = \"a\"\ncategory = \"network\"\nkeywords = []", "no keywords"),
            ("[[rule]]\nid = \"a\"\ncategory = \"network\"\nkeywords = [\" \"]", "empty"),
            (
                "[[rule]]\nid = \"a\"\ncategory = \"network\"\nkeywords = [\"x\"]\n[[rule]]\nid = \"a\"\ncategory = \"network\"\nkeywords = [\"y\"]",
                "twice",
            ),
            ("[variants]\ntraditional = \"網絡\"\nsimplified = \"网\"", "one to one"),
            ("[sla.major4]\nfirst_response = \"1h\"\nresolution = \"1h\"", "unknown severity"),
            ("[sla.urgent]\nfirst_response = \"1y\"\nresolution = \"1h\"", "sla.urgent.first_response"),
            ("[calendar]\ntime_zone = \"Mars/Olympus\"", "calendar"),
            ("[storm]\nmin_customers = 1", "storm.min_customers"),
            ("[repeat]\ndays = 0", "repeat.days"),
            ("[categories]\norder = [\"network\"]", "categories.order"),
            ("bogus = 1", "unknown field"),
        ] {
            let e = Rules::from_toml(src).unwrap_err();
            assert!(e.contains(want), "{src:?}: {e}");
        }
    }

    #[test]
    fn severity_parses_and_orders() {
        assert_eq!(Severity::parse("major", Some(1)).unwrap(), Severity::Major1);
        assert_eq!(Severity::parse("major3", None).unwrap(), Severity::Major3);
        assert!(Severity::parse("urgent", Some(1)).is_err());
        assert!(Severity::Major1 > Severity::Major3);
        assert!(Severity::Major3 > Severity::Urgent);
        assert_eq!(Severity::Major2.name(), "major");
        assert_eq!(Severity::Major2.level(), Some(2));
    }
}
