//! Triage end to end: signed events in over HTTP, records out of Kafka with category, severity,
//! major level, SLA deadlines on the business calendar, language, repeat escalation, a shared
//! storm incident with its gauge, and the rule file reloaded on SIGHUP (a bad file keeping the
//! old rules). Needs SWITCHBOARD_TEST_KAFKA (scripts/test.sh).

mod common;

use chrono::{DateTime, Utc};
use common::*;
use serde_json::{json, Value};
use switchboard::triage::rules::{Rules, Severity};
use switchboard::triage::DEFAULT_RULES;

fn event(id: &str, customer: &str, text: &str) -> Value {
    json!({"event_id": id, "customer": {"id": customer}, "text": text})
}

async fn post(gw: &Gateway, body: &Value) -> Value {
    let r = gw.post_signed(&body.to_string()).await;
    assert_eq!(r.status(), 202, "{body}");
    r.json().await.unwrap()
}

fn by_text<'a>(records: &'a [Value], text: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["content"]["text"] == text)
        .unwrap_or_else(|| panic!("no record with text {text:?}"))
}

fn at(v: &Value) -> DateTime<Utc> {
    v.as_str().unwrap().parse().unwrap()
}

/// The shipped rules with some policy values changed, written to a file the gateway reads.
fn rules_file(dir: &std::path::Path, edits: &[(&str, &str)]) -> std::path::PathBuf {
    let mut text = DEFAULT_RULES.to_string();
    for (from, to) in edits {
        assert!(text.contains(from), "the shipped rules have no {from:?}");
        text = text.replacen(from, to, 1);
    }
    let path = dir.join("triage.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn records_carry_category_severity_sla_and_language() {
    let (gw, brokers, topic) = gateway_with_topic(1, &[]).await;
    let rules = Rules::from_toml(DEFAULT_RULES).unwrap();
    let cases = [
        (
            "家里的手机一直没信号，打电话也打不出去，麻烦尽快处理",
            "network",
            "general",
            None,
            "zh",
        ),
        (
            "You charged me twice for the same month. If it is not refunded this week I will file a complaint with the regulator.",
            "billing",
            "major",
            Some(2),
            "en",
        ),
        (
            "我家整栋楼从早上开始都上不了网，邻居也一样",
            "network",
            "major",
            Some(1),
            "zh",
        ),
        (
            "有人冒充客服打电话骗我，现在银行卡的钱被转走了，赶紧帮我冻结",
            "privacy",
            "urgent",
            None,
            "zh",
        ),
    ];
    for (n, (text, ..)) in cases.iter().enumerate() {
        post(&gw, &event(&format!("t-{n}"), &format!("c-{n}"), text)).await;
    }
    // A trusted operator system may escalate on its own (metadata.escalation).
    let mut flagged = event("t-flag", "c-flag", "客户要求经理回电");
    flagged["metadata"] = json!({"escalation": "major1"});
    post(&gw, &flagged).await;

    let records = records_until_sentinel(&gw, &brokers, &topic).await;
    let validator = schema_validator();
    for (text, category, severity, level, language) in cases {
        let r = by_text(&records, text);
        assert_valid(&validator, r);
        let t = &r["triage"];
        assert_eq!(t["category"], category, "{text}: {t}");
        assert_eq!(t["severity"], severity, "{text}: {t}");
        assert_eq!(t["major_level"].as_u64(), level, "{text}: {t}");
        assert_eq!(r["content"]["language"], language, "{text}");
        assert!(!t["reasons"].as_array().unwrap().is_empty());
        // The deadlines are the rule file's, on its calendar, from received_at.
        let sev = match (severity, level) {
            ("general", _) => Severity::General,
            ("urgent", _) => Severity::Urgent,
            ("major", Some(1)) => Severity::Major1,
            ("major", Some(2)) => Severity::Major2,
            other => panic!("{other:?}"),
        };
        let received = at(&r["received_at"]);
        let (fr, res) = rules.sla(sev);
        assert_eq!(
            at(&t["sla"]["first_response_due"]),
            rules.calendar.due(received, fr)
        );
        assert_eq!(
            at(&t["sla"]["resolution_due"]),
            rules.calendar.due(received, res)
        );
    }
    let r = by_text(&records, "客户要求经理回电");
    assert_eq!(r["triage"]["major_level"], 1);
    assert!(r["triage"]["reasons"]
        .as_array()
        .unwrap()
        .contains(&json!("escalation:major1")));
    let m = gw.metrics().await;
    assert!(
        metric_value(
            &m,
            "switchboard_triage_records_total",
            &[("category", "network")]
        ) >= 2.0
    );
}

#[tokio::test]
async fn repeat_complaints_escalate_and_storms_share_an_incident() {
    let dir = tempfile::tempdir().unwrap();
    // Small thresholds so the test stays short: a storm of 5 customers, no minimum gap between
    // repeat complaints.
    let path = rules_file(
        dir.path(),
        &[
            ("min_customers = 20", "min_customers = 5"),
            ("min_gap_minutes = 60", "min_gap_minutes = 0"),
        ],
    );
    let (gw, brokers, topic) = gateway_with_topic(
        1,
        &[("SWITCHBOARD_TRIAGE__RULES_FILE", path.display().to_string())],
    )
    .await;

    // The same customer, three separate network complaints.
    let repeat = [
        "网速太慢了，根本用不了",
        "今天网速还是很慢",
        "网速依然很慢，怎么还没修好",
    ];
    for (n, text) in repeat.iter().enumerate() {
        post(&gw, &event(&format!("r-{n}"), "repeat-customer", text)).await;
    }
    // Eight customers in one area report the same thing; one in another area too.
    for n in 0..8 {
        let mut e = event(
            &format!("s-{n}"),
            &format!("storm-{n}"),
            &format!("我们小区突然没信号了 ({n})"),
        );
        e["metadata"] = json!({"area": "Haidian"});
        post(&gw, &e).await;
    }
    let mut elsewhere = event("s-x", "storm-x", "我们小区突然没信号了 (x)");
    elsewhere["metadata"] = json!({"area": "Pudong"});
    post(&gw, &elsewhere).await;
    gw.wait_metric("switchboard_triage_incidents_active", &[], 1.0)
        .await;
    assert_eq!(
        gw.metric("switchboard_triage_incidents_total", &[]).await,
        1.0
    );

    let records = records_until_sentinel(&gw, &brokers, &topic).await;
    let severities: Vec<(&Value, &Value)> = repeat
        .iter()
        .map(|t| {
            let r = &by_text(&records, t)["triage"];
            (&r["severity"], &r["major_level"])
        })
        .collect();
    assert_eq!(severities[0].0, "general");
    assert_eq!(severities[1].0, "complex");
    assert_eq!(severities[2].0, "major");
    assert_eq!(severities[2].1, 3);
    assert!(by_text(&records, repeat[2])["triage"]["reasons"]
        .as_array()
        .unwrap()
        .contains(&json!("repeat:3")));

    let incidents: Vec<Option<&str>> = (0..8)
        .map(|n| {
            by_text(&records, &format!("我们小区突然没信号了 ({n})"))["triage"]["incident"].as_str()
        })
        .collect();
    assert!(incidents[..4].iter().all(Option::is_none), "{incidents:?}");
    let id = incidents[4].expect("the fifth customer opens the incident");
    assert!(id.starts_with("INC-"));
    assert!(
        incidents[4..].iter().all(|i| *i == Some(id)),
        "{incidents:?}"
    );
    let joined = by_text(&records, "我们小区突然没信号了 (7)");
    assert_eq!(joined["triage"]["severity"], "major");
    assert_eq!(joined["triage"]["major_level"], 2);
    assert!(by_text(&records, "我们小区突然没信号了 (x)")["triage"]["incident"].is_null());
}

#[tokio::test]
async fn sighup_reloads_the_rules_and_a_bad_file_keeps_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = rules_file(dir.path(), &[]);
    let (gw, brokers, topic) = gateway_with_topic(
        1,
        &[("SWITCHBOARD_TRIAGE__RULES_FILE", path.display().to_string())],
    )
    .await;
    let hup = || {
        let pid = gw.child.id().unwrap();
        assert!(std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success());
    };
    post(&gw, &event("h-1", "h-1", "zorblax one")).await;

    // A new rule: "zorblax" is a network word now.
    let new_rule = "\n[[rule]]\nid = \"network.zorblax\"\ncategory = \"network\"\nweight = 5\nkeywords = [\"zorblax\"]\n";
    std::fs::write(&path, format!("{DEFAULT_RULES}{new_rule}")).unwrap();
    hup();
    gw.wait_metric("switchboard_triage_reloads_total", &[("result", "ok")], 1.0)
        .await;
    post(&gw, &event("h-2", "h-2", "zorblax two")).await;

    // A broken file: refused, the rules in force stay.
    std::fs::write(
        &path,
        "[[rule]]\nid = \"x\"\ncategory = \"nonsense\"\nkeywords = [\"a\"]\n",
    )
    .unwrap();
    hup();
    gw.wait_metric(
        "switchboard_triage_reloads_total",
        &[("result", "error")],
        1.0,
    )
    .await;
    post(&gw, &event("h-3", "h-3", "zorblax three")).await;

    let records = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(
        by_text(&records, "zorblax one")["triage"]["category"],
        "other"
    );
    assert_eq!(
        by_text(&records, "zorblax two")["triage"]["category"],
        "network"
    );
    assert_eq!(
        by_text(&records, "zorblax three")["triage"]["category"],
        "network"
    );
    assert!(by_text(&records, "zorblax three")["triage"]["reasons"]
        .as_array()
        .unwrap()
        .contains(&json!("network.zorblax")));
    let log = gw.log();
    assert!(log.contains("unknown category"), "the log says why: {log}");
    assert!(log.contains("previous rules stay in force"));
}
