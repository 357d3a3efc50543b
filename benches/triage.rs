//! Triage per record on a 1 KB complaint (Chinese and English), with the shipped rules: fold,
//! one Aho-Corasick pass (character-wise automaton for the Chinese text, the interleaved DFA walk
//! for the ASCII one), category and severity, repeat lookup, storm bucket, SLA on the
//! business calendar, language. The baseline in the same run is `str::to_lowercase` of the same
//! text (one pass over the bytes that allocates), so the figures read as ratios too.
//!
//!   cargo bench --bench triage

use chrono::{DateTime, Duration, Utc};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::collections::BTreeMap;
use std::hint::black_box;
use switchboard::config::TriageConfig;
use switchboard::triage::{Input, Triager};

/// About 1 KB of UTF-8 (the size the target is stated for).
fn zh_text() -> String {
    let base = "您好，我家住在朝阳区某小区，从上周三开始家里的宽带每天晚上八点以后就频繁断网，光猫的LOS灯一直闪红，\
                手机4G信号也很差，经常显示无服务，打电话老是掉线。我已经打了三次客服电话，每次都说会派师傅上门，\
                结果一直没有人来，也没有任何回复。这个月的话费还照常扣了，我要求退还断网期间的费用。";
    let mut s = String::new();
    while s.len() < 1000 {
        s.push_str(base);
    }
    truncate(s, 1024)
}

fn en_text() -> String {
    let base = "Hello, since last Wednesday my home broadband drops every evening after eight, the router's LOS \
                light keeps flashing red and my mobile signal is poor too, calls drop all the time. I have called \
                customer service three times and every time I was promised an engineer visit, but nobody came and \
                nobody called back. You still charged my monthly fee in full and I want a refund for the days ";
    let mut s = String::new();
    while s.len() < 1000 {
        s.push_str(base);
    }
    truncate(s, 1024)
}

fn truncate(mut s: String, max: usize) -> String {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

fn bench(c: &mut Criterion) {
    let t = Triager::new(&TriageConfig::default()).unwrap();
    let meta: BTreeMap<String, String> = [("area".to_string(), "chaoyang".to_string())].into();
    let t0: DateTime<Utc> = "2026-11-24T02:00:00Z".parse().unwrap();
    for (name, text) in [("zh_1kb", zh_text()), ("en_1kb", en_text())] {
        let mut g = c.benchmark_group(format!("triage_{name}"));
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function("baseline_to_lowercase", |b| {
            b.iter(|| black_box(text.as_str()).to_lowercase())
        });
        let rules = t.rules();
        let mut buf = switchboard::triage::rules::Scratch::default();
        g.bench_function("part_fold", |b| {
            b.iter(|| {
                buf.text.clear();
                switchboard::triage::text::fold_into(&mut buf.text, black_box(&text))
            })
        });
        g.bench_function("part_scan", |b| {
            b.iter(|| rules.scan(&[black_box(&text)], &mut buf))
        });
        let mut n = 0u64;
        let keys: Vec<String> = (0..10_000).map(|i| format!("+86138{i:08}")).collect();
        g.bench_function("assess", |b| {
            b.iter(|| {
                n += 1;
                let o = t.assess(&Input {
                    received_at: t0 + Duration::milliseconds(n as i64),
                    channel: "api",
                    customer_key: &keys[(n % 10_000) as usize],
                    thread: None,
                    subject: None,
                    text: black_box(&text),
                    category_hint: None,
                    metadata: &meta,
                });
                black_box(o)
            })
        });
        g.finish();
    }
    // What a record costs besides its text: repeat lookup, SLA, storm (no key terms), record
    // fields. Subtract from the figures above to see the text's share.
    let mut g = c.benchmark_group("triage_fixed");
    let mut n = 0u64;
    g.bench_function("assess_empty_text", |b| {
        b.iter(|| {
            n += 1;
            black_box(t.assess(&Input {
                received_at: t0 + Duration::milliseconds(n as i64),
                channel: "api",
                customer_key: "+8613800000000",
                thread: None,
                subject: None,
                text: black_box(""),
                category_hint: None,
                metadata: &meta,
            }))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
