//! The operator kit stays in step with the code: every metric the Grafana dashboard and the
//! Prometheus alert rules name is a documented Switchboard metric, every label and reason they
//! match on exists, and `switchboard check-config` never prints a secret.
//!
//! (`promtool check rules`, `promtool test rules`, `promtool check metrics` on a live scrape and
//! schemathesis against docs/openapi.yaml run in scripts/ops-check.sh.)

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Metrics the kit uses that another branch adds (the spool backlog gauges of the replay work).
/// Once they are in the README table this test fails until they are removed from here, so the
/// list cannot go stale.
const PENDING: &[&str] = &[];

/// Labels Prometheus adds itself, and `le` of histogram buckets.
const TARGET_LABELS: &[&str] = &["job", "instance", "le"];

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The README's "Metrics" table: metric names (first column) and every backticked word of the
/// labels column (label names, and their values, a harmless superset).
fn readme_metrics() -> (BTreeSet<String>, BTreeSet<String>) {
    let readme = read("README.md");
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .expect("README has a Metrics section");
    let section = section.split("\n## ").next().unwrap();
    let (mut names, mut labels) = (BTreeSet::new(), BTreeSet::new());
    for row in section.lines().filter(|l| l.starts_with("| `switchboard_")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        names.extend(backticked(cells[0]));
        if let Some(l) = cells.get(2) {
            labels.extend(backticked(l));
        }
    }
    assert!(
        names.len() > 30,
        "README metrics table not found: {names:?}"
    );
    (names, labels)
}

fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The metric names `src/telemetry.rs` defines.
fn telemetry_metrics() -> BTreeSet<String> {
    read("src/telemetry.rs")
        .lines()
        .filter(|l| l.starts_with("pub const ") && l.contains("\"switchboard_"))
        .filter_map(|l| l.split('"').nth(1).map(str::to_string))
        .collect()
}

/// Every `switchboard_…` token in a text (recording-rule names use colons and do not match).
fn metric_tokens(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("switchboard_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        // `switchboard_x` inside a longer identifier (a word before it) is no metric name.
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// Every PromQL expression of the dashboard: panel targets and template variable queries.
fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/switchboard.json")).expect("dashboard JSON");
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let targets = panel["targets"]
            .as_array()
            .expect("every panel has targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"], "prometheus",
                "panel {} must use the provisioned datasource",
                panel["title"]
            );
            let e = t["expr"].as_str().expect("target expr");
            assert!(!e.trim().is_empty());
            exprs.push(e.to_string());
        }
    }
    for var in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = var["query"]["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    exprs
}

/// The `expr:` of every rule in alerts.yml (folded `>-` blocks included).
fn alert_exprs() -> Vec<String> {
    let text = read("deploy/prometheus/alerts.yml");
    let mut exprs = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let mut expr = rest.trim().trim_start_matches(">-").to_string();
        while let Some(next) = lines.peek() {
            let ni = next.len() - next.trim_start().len();
            if next.trim().is_empty() || ni > indent {
                expr.push(' ');
                expr.push_str(next.trim());
                lines.next();
            } else {
                break;
            }
        }
        exprs.push(expr);
    }
    exprs
}

/// A referenced name is a metric, or a histogram's `_bucket`/`_sum`/`_count` series of one.
fn resolve(name: &str, known: &BTreeSet<String>) -> Option<String> {
    if known.contains(name) {
        return Some(name.to_string());
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|s| name.strip_suffix(s))
        .find(|base| known.contains(*base))
        .map(str::to_string)
}

#[test]
fn every_metric_of_the_dashboard_and_alerts_is_documented() {
    let (readme, _) = readme_metrics();
    let telemetry = telemetry_metrics();
    for p in PENDING {
        assert!(
            !readme.contains(*p) && !telemetry.contains(*p),
            "{p} is now documented: remove it from PENDING in tests/ops_kit.rs"
        );
    }
    let mut known = readme.clone();
    known.extend(PENDING.iter().map(|s| s.to_string()));
    let sources = [
        (
            "deploy/grafana/switchboard.json",
            dashboard_exprs().join("\n"),
        ),
        (
            "deploy/prometheus/alerts.yml",
            read("deploy/prometheus/alerts.yml"),
        ),
    ];
    for (file, text) in sources {
        let names = metric_tokens(&text);
        assert!(names.len() >= 6, "{file}: found only {names:?}");
        for n in &names {
            let base = resolve(n, &known).unwrap_or_else(|| {
                panic!("{file} names {n}, which is not in the README metrics table")
            });
            assert!(
                telemetry.contains(&base) || PENDING.contains(&base.as_str()),
                "{file} names {n}: documented but not defined in src/telemetry.rs"
            );
        }
    }
    // The panels the issue asks for are there.
    let dash = dashboard_exprs().join("\n");
    for m in [
        "switchboard_records_emitted_total",
        "switchboard_rejections_total",
        "switchboard_dedupe_hits_total",
        "switchboard_rate_limited_total",
        "switchboard_sink_write_duration_seconds_bucket",
        "switchboard_spool_backlog_records",
        "switchboard_kafka_queue_messages",
        "switchboard_chat_sessions",
        "switchboard_triage_incidents_active",
    ] {
        assert!(dash.contains(m), "the dashboard has no panel on {m}");
    }
}

/// Label names in selectors and `by (...)` clauses, and `reason` values, exist.
#[test]
fn labels_and_reasons_the_kit_matches_on_exist() {
    let (_, readme_labels) = readme_metrics();
    let reasons = reason_codes();
    assert!(reasons.contains("bad_signature") && reasons.len() > 10);
    let mut exprs = dashboard_exprs();
    exprs.extend(alert_exprs());
    assert!(exprs.len() > 20, "{exprs:?}");
    let mut seen_reason_values = 0;
    for e in &exprs {
        for label in label_names(e) {
            assert!(
                readme_labels.contains(&label) || TARGET_LABELS.contains(&label.as_str()),
                "`{label}` in `{e}` is no label of a Switchboard metric"
            );
        }
        for values in matcher_values(e, "reason") {
            for v in values.split('|') {
                seen_reason_values += 1;
                assert!(
                    reasons.contains(v),
                    "reason `{v}` in `{e}` is not a code in src/error.rs"
                );
            }
        }
    }
    assert!(seen_reason_values >= 4);
}

/// `Reason::code()`'s strings, from src/error.rs.
fn reason_codes() -> BTreeSet<String> {
    let src = read("src/error.rs");
    let body = src
        .split("pub fn code(&self)")
        .nth(1)
        .unwrap()
        .split("pub fn status")
        .next()
        .unwrap();
    body.lines()
        .filter(|l| l.contains("=> \""))
        .filter_map(|l| l.split('"').nth(1).map(str::to_string))
        .collect()
}

/// Label names used in `{name op "value"}` selectors and `by|on|without (a, b)` lists.
fn label_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find('{') {
        let Some(j) = rest[i..].find('}') else { break };
        let inner = &rest[i + 1..i + j];
        // `{{channel}}` legend templates are not selectors; `$__rate_interval` neither.
        if !inner.starts_with('{') {
            for m in inner.split(',') {
                let name: String = m
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        }
        rest = &rest[i + j + 1..];
    }
    for kw in ["by (", "on (", "without (", "group_left (", "group_right ("] {
        let mut rest = expr;
        while let Some(i) = rest.find(kw) {
            let after = &rest[i + kw.len()..];
            let end = after.find(')').unwrap_or(after.len());
            out.extend(
                after[..end]
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty()),
            );
            rest = &after[end..];
        }
    }
    out
}

/// The quoted values of `label=`, `label!=`, `label=~`, `label!~` matchers.
fn matcher_values(expr: &str, label: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find(label) {
        let after = &rest[i + label.len()..];
        let after_op = after
            .strip_prefix("=~")
            .or_else(|| after.strip_prefix("!~"))
            .or_else(|| after.strip_prefix("!="))
            .or_else(|| after.strip_prefix('='));
        if let Some(v) = after_op.and_then(|a| a.strip_prefix('"')) {
            if let Some(end) = v.find('"') {
                out.push(v[..end].to_string());
            }
        }
        rest = after;
    }
    out
}

#[test]
fn the_extractors_see_what_they_should() {
    assert_eq!(
        label_names(r#"sum by (channel, reason) (rate(x{instance=~"$i", reason!~"a|b"}[5m]))"#),
        ["instance", "reason", "channel", "reason"]
    );
    assert_eq!(
        matcher_values(r#"x{reason=~"a|b", reason="c"}"#, "reason"),
        ["a|b", "c"]
    );
    assert_eq!(
        metric_tokens("rate(switchboard_a_total[5m]) / my_switchboard_b + switchboard:rec"),
        BTreeSet::from(["switchboard_a_total".to_string()])
    );
    let (names, _) = readme_metrics();
    assert_eq!(
        resolve("switchboard_sink_write_duration_seconds_bucket", &names).as_deref(),
        Some("switchboard_sink_write_duration_seconds")
    );
    assert_eq!(resolve("switchboard_no_such_metric", &names), None);
    assert!(alert_exprs().iter().any(|e| e.contains("deriv(")));
}

/// Every secret set through the environment; `check-config` shows each as the marker, with list
/// lengths kept, and prints none of them, on stdout or stderr.
#[test]
fn check_config_redacts_every_secret() {
    let secrets: &[(&str, &str)] = &[
        (
            "SWITCHBOARD_API__SECRETS",
            r#"["cc-api-secret-one-1111","cc-api-secret-two-2222"]"#,
        ),
        (
            "SWITCHBOARD_TWILIO__AUTH_TOKENS",
            r#"["cc-twilio-token-1"]"#,
        ),
        (
            "SWITCHBOARD_VONAGE__SECRETS",
            r#"["cc-vonage-secret-1","cc-vonage-secret-2"]"#,
        ),
        ("SWITCHBOARD_ALIBABA__PATH_TOKEN", "cc-alibaba-path-token-1"),
        (
            "SWITCHBOARD_ALIBABA__PREVIOUS_PATH_TOKEN",
            "cc-alibaba-path-token-0",
        ),
        ("SWITCHBOARD_SMPP__TOKEN", "cc-smpp-token-1"),
        ("SWITCHBOARD_SMPP__PREVIOUS_TOKEN", "cc-smpp-token-0"),
        (
            "SWITCHBOARD_EMAIL__INBOUND_TOKENS",
            r#"["cc-inbound-token-111111"]"#,
        ),
        (
            "SWITCHBOARD_EMAIL__MAILGUN_SIGNING_KEYS",
            r#"["cc-mailgun-key-1"]"#,
        ),
        (
            "SWITCHBOARD_WECHAT__TOKENS",
            r#"["ccwechattoken1","ccwechattoken2"]"#,
        ),
        (
            "SWITCHBOARD_WECHAT__ENCODING_AES_KEYS",
            r#"["ccAESkey0123456789abcdefghijklmnopqrstuvwxy"]"#,
        ),
        ("SWITCHBOARD_WEIBO__APP_SECRETS", r#"["cc-weibo-secret-1"]"#),
        ("SWITCHBOARD_META__APP_SECRETS", r#"["cc-meta-secret-1"]"#),
        ("SWITCHBOARD_META__VERIFY_TOKEN", "cc-meta-verify-token"),
        (
            "SWITCHBOARD_TELEGRAM__SECRET_TOKENS",
            r#"["cc-telegram-secret-1"]"#,
        ),
        (
            "SWITCHBOARD_X__CONSUMER_SECRETS",
            r#"["cc-x-consumer-secret-1"]"#,
        ),
        (
            "SWITCHBOARD_CHAT__SESSION_SECRETS",
            r#"["cc-chat-session-secret-0123456789abcdef"]"#,
        ),
        (
            "SWITCHBOARD_CHAT__CUSTOMER_TOKEN_SECRETS",
            r#"["cc-chat-customer-secret-1"]"#,
        ),
        (
            "SWITCHBOARD_KAFKA__EXTRA",
            r#"{"sasl.password" = "cc-kafka-sasl-password", "ssl.key.password" = "cc-kafka-key-password", "sasl.username" = "cc-kafka-user", "security.protocol" = "SASL_SSL"}"#,
        ),
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("--config")
        .arg(Path::new(ROOT).join("config/switchboard.toml"))
        .arg("check-config")
        .envs(secrets.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .expect("run switchboard check-config");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "check-config failed:\n{stderr}");
    for needle in [
        "cc-api-secret",
        "cc-twilio-token",
        "cc-vonage-secret",
        "cc-alibaba-path-token",
        "cc-smpp-token",
        "cc-inbound-token",
        "cc-mailgun-key",
        "ccwechattoken",
        "ccAESkey",
        "cc-weibo-secret",
        "cc-meta-secret",
        "cc-meta-verify",
        "cc-telegram-secret",
        "cc-x-consumer",
        "cc-chat-session",
        "cc-chat-customer",
        "cc-kafka-sasl-password",
        "cc-kafka-key-password",
    ] {
        assert!(!stdout.contains(needle), "{needle} printed:\n{stdout}");
        assert!(!stderr.contains(needle), "{needle} in stderr:\n{stderr}");
    }
    let cfg: toml::Table = stdout.parse().expect("check-config prints TOML");
    let marker = |n: usize| toml::Value::Array(vec![toml::Value::String("<redacted>".into()); n]);
    let m1 = toml::Value::String("<redacted>".into());
    // Each secret took effect (the shapes follow the env) and is shown as the marker.
    assert_eq!(cfg["api"]["secrets"], marker(2));
    assert_eq!(cfg["vonage"]["secrets"], marker(2));
    assert_eq!(cfg["wechat"]["tokens"], marker(2));
    assert_eq!(cfg["twilio"]["auth_tokens"], marker(1));
    assert_eq!(cfg["meta"]["app_secrets"], marker(1));
    assert_eq!(cfg["meta"]["verify_token"], m1);
    assert_eq!(cfg["smpp"]["previous_token"], m1);
    assert_eq!(cfg["alibaba"]["path_token"], m1);
    assert_eq!(cfg["kafka"]["extra"]["sasl.password"], m1);
    assert_eq!(cfg["kafka"]["extra"]["ssl.key.password"], m1);
    // What is not secret stays readable.
    assert_eq!(
        cfg["kafka"]["extra"]["sasl.username"].as_str(),
        Some("cc-kafka-user")
    );
    assert_eq!(
        cfg["kafka"]["extra"]["security.protocol"].as_str(),
        Some("SASL_SSL")
    );
    assert_eq!(cfg["http"]["listen"].as_str(), Some("127.0.0.1:8080"));
    assert!(stderr.contains("configuration is valid"), "{stderr}");
}
