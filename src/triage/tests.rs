use super::*;
use crate::config::TriageConfig;
use chrono::TimeZone;

fn triager() -> Triager {
    Triager::new(&TriageConfig::default()).expect("built-in rules")
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn input<'a>(text: &'a str, customer: &'a str, meta: &'a BTreeMap<String, String>) -> Input<'a> {
    Input {
        received_at: at("2026-11-24T02:00:00Z"),
        channel: "sms",
        customer_key: customer,
        thread: None,
        subject: None,
        text,
        category_hint: None,
        metadata: meta,
    }
}

#[test]
fn built_in_rules_load() {
    let t = triager();
    assert!(t.rules().rules.len() > 20);
    assert!(t.summary().contains("built-in"));
}

#[test]
fn categorizes_and_sets_sla_from_severity() {
    let t = triager();
    let m = BTreeMap::new();
    let o = t.assess(&input(
        "家里手机一直没信号，打电话也打不出去",
        "+8613800000001",
        &m,
    ));
    assert_eq!(o.triage.category, "network");
    assert_eq!(o.triage.severity, "general");
    assert_eq!(o.language, Some("zh"));
    assert!(o.triage.reasons.iter().any(|r| &**r == "network.no_signal"));
    // Tuesday 10:00 Shanghai + 3 working days → Friday 10:00.
    assert_eq!(o.triage.sla.first_response_due, "2026-11-27T02:00:00.000Z");
    assert_eq!(o.triage.sla.resolution_due, "2026-12-03T02:00:00.000Z");

    let o = t.assess(&input(
        "You charged me twice this month. If this is not refunded I will report you to the regulator.",
        "+8613800000002",
        &m,
    ));
    assert_eq!(o.triage.category, "billing");
    assert_eq!(o.triage.severity, "major");
    assert_eq!(o.triage.major_level, Some(2));
    assert_eq!(o.language, Some("en"));
    assert_eq!(o.triage.sla.first_response_due, "2026-11-24T04:00:00.000Z");
}

#[test]
fn nothing_fired_is_other_general_default() {
    let t = triager();
    let m = BTreeMap::new();
    let o = t.assess(&input("12345678", "+8613800000003", &m));
    assert_eq!(o.triage.category, "other");
    assert_eq!(o.triage.severity, "general");
    assert_eq!(o.triage.reasons, [Arc::from("default")]);
    assert_eq!(o.language, None);
}

#[test]
fn channel_hint_and_trusted_escalation_flag() {
    let t = triager();
    let mut m = BTreeMap::new();
    m.insert("escalation".to_string(), "major1".to_string());
    let mut i = input("", "+8613800000004", &m);
    i.category_hint = Some(("billing", "ivr_menu:2"));
    let o = t.assess(&i);
    assert_eq!(o.triage.category, "billing");
    assert_eq!(&*o.triage.reasons[0], "ivr_menu:2");
    assert_eq!(o.triage.severity, "general", "sms may not escalate itself");
    i.channel = "api";
    let o = t.assess(&i);
    assert_eq!(o.triage.major_level, Some(1));
    assert!(o.triage.reasons.iter().any(|r| &**r == "escalation:major1"));
}

#[test]
fn repeat_complaints_escalate_once_durable() {
    let t = triager();
    let m = BTreeMap::new();
    let mut i = input("网速太慢了", "+8613800000005", &m);
    let day = chrono::Duration::days(1);
    let first = t.assess(&i);
    assert_eq!(first.triage.severity, "general");
    t.commit(first.mark);
    i.received_at += day;
    let second = t.assess(&i);
    assert_eq!(second.triage.severity, "complex");
    assert!(second.triage.reasons.iter().any(|r| &**r == "repeat:2"));
    t.commit(second.mark);
    i.received_at += day;
    let third = t.assess(&i);
    assert_eq!(third.triage.severity, "major");
    assert_eq!(third.triage.major_level, Some(3));
    // Another category is another matter.
    let other = t.assess(&Input {
        text: "账单多扣了话费",
        ..i
    });
    assert_eq!(other.triage.severity, "general");
}

#[test]
fn storms_share_an_incident_id() {
    let t = triager();
    let m: BTreeMap<String, String> = [("area".to_string(), "Haidian".to_string())]
        .into_iter()
        .collect();
    let keys: Vec<String> = (0..30).map(|i| format!("+86138000001{i:02}")).collect();
    let mut incidents = Vec::new();
    for (n, k) in keys.iter().enumerate() {
        let mut i = input("我们这里突然没信号了", k, &m);
        i.received_at += chrono::Duration::seconds(n as i64);
        incidents.push(t.assess(&i).triage.incident);
    }
    assert!(incidents[..19].iter().all(Option::is_none));
    let id = incidents[19]
        .clone()
        .expect("the 20th customer opens the incident");
    assert!(incidents[19..]
        .iter()
        .all(|i| i.as_deref() == Some(id.as_str())));
    // Another area is not part of it.
    let other: BTreeMap<String, String> = [("area".to_string(), "Chaoyang".to_string())]
        .into_iter()
        .collect();
    let o = t.assess(&input("我们这里突然没信号了", "+8613900000000", &other));
    assert_eq!(o.triage.incident, None);
}

#[test]
fn reload_keeps_old_rules_on_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(
        &path,
        "version = \"a\"\n[[rule]]\nid = \"x\"\ncategory = \"network\"\nweight = 2\nkeywords = [\"zzz\"]\n",
    )
    .unwrap();
    let cfg = TriageConfig {
        rules_file: path.clone(),
        ..Default::default()
    };
    let t = Triager::new(&cfg).unwrap();
    let m = BTreeMap::new();
    assert_eq!(
        t.assess(&input("zzz", "a@b.cn", &m)).triage.category,
        "network"
    );
    std::fs::write(
        &path,
        "[[rule]]\nid = \"x\"\ncategory = \"nope\"\nkeywords = [\"zzz\"]\n",
    )
    .unwrap();
    let e = t.reload().unwrap_err();
    assert!(e.contains("unknown category"), "{e}");
    assert_eq!(
        t.assess(&input("zzz", "a@b.cn", &m)).triage.category,
        "network"
    );
    std::fs::write(
        &path,
        "version = \"b\"\n[[rule]]\nid = \"x\"\ncategory = \"billing\"\nweight = 2\nkeywords = [\"zzz\"]\n",
    )
    .unwrap();
    assert!(t.reload().unwrap().contains("triage rules b"));
    assert_eq!(
        t.assess(&input("zzz", "a@b.cn", &m)).triage.category,
        "billing"
    );
}

#[test]
fn holidays_push_working_day_clocks() {
    let t = triager();
    let m = BTreeMap::new();
    let mut i = input("套餐资费有问题", "+8613800000006", &m);
    // Wednesday 2026-09-30 10:00 Shanghai; Oct 1-7 are holidays, Oct 10 (Sat) is a workday.
    i.received_at = chrono_tz::Asia::Shanghai
        .with_ymd_and_hms(2026, 9, 30, 10, 0, 0)
        .unwrap()
        .with_timezone(&Utc);
    let o = t.assess(&i);
    assert_eq!(o.triage.severity, "general");
    // 3 working days: Oct 8, Oct 9, Oct 10 (make-up Saturday).
    assert_eq!(o.triage.sla.first_response_due, "2026-10-10T02:00:00.000Z");
}
