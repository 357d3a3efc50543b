//! Hot-path benchmarks. Each group has a baseline measured in the same run, so results read as
//! ratios (e.g. "the whole pipeline costs N× a bare serde_json parse of the same body").
//!
//!   cargo bench --bench pipeline

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::sync::Arc;
use switchboard::config::{Config, SpoolConfig};
use switchboard::identity::Normalizer;
use switchboard::pipeline::{trace_id, Pipeline, RequestCtx};
use switchboard::record::{ChannelKind, Intake};
use switchboard::sink::memory::MemorySink;
use switchboard::sink::spool::Spool;

const BODY: &str = r#"{"event_id":"crm-1","source":"crm","customer":{"phone":"13800138000","name":"张伟"},"text":"从昨天晚上开始家里宽带一直断网，客服电话打了三次都没人解决。","metadata":{"area":"shenzhen"}}"#;

fn intake(i: u64) -> Intake {
    let mut it = Intake::new(
        ChannelKind::Api,
        "api",
        format!("宽带断网 complaint number {i}"),
    );
    it.provider_message_id = Some(format!("crm-{i}"));
    it.account = Some("crm".into());
    it.identity.phone = Some(format!("138{:08}", i % 100_000_000));
    it
}

fn pipeline_bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = Config::default();
    cfg.limits.enabled = false;
    let pipeline =
        rt.block_on(async { Pipeline::new(&cfg, Arc::new(MemorySink::default())).unwrap() });
    let ctx = RequestCtx {
        peer: "127.0.0.1".parse().unwrap(),
        channel: "api",
        trace_id: trace_id(None),
    };
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(1));
    g.bench_function("baseline_serde_json_parse", |b| {
        b.iter(|| serde_json::from_str::<serde_json::Value>(std::hint::black_box(BODY)).unwrap())
    });
    let mut n = 0u64;
    g.bench_function("submit_new_record_memory_sink", |b| {
        b.to_async(&rt).iter_batched(
            || {
                n += 1;
                vec![intake(n)]
            },
            |batch| async { pipeline.submit(&ctx, batch).await.unwrap() },
            BatchSize::SmallInput,
        )
    });
    rt.block_on(pipeline.submit(&ctx, vec![intake(0)])).unwrap();
    g.bench_function("submit_duplicate", |b| {
        b.to_async(&rt).iter_batched(
            || vec![intake(0)],
            |batch| async { pipeline.submit(&ctx, batch).await.unwrap() },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let norm = Normalizer::new("CN");
    norm.warm_up();
    let mut g = c.benchmark_group("identity");
    g.bench_function("baseline_lowercase_email", |b| {
        b.iter(|| std::hint::black_box("Zhang.Wei@Example.COM").to_lowercase())
    });
    g.bench_function("phone_to_e164", |b| {
        b.iter(|| norm.phone(std::hint::black_box("138 0013 8000")).unwrap())
    });
    g.finish();
}

/// A Twilio inbound SMS as the form body Twilio posts (the fields a real one carries).
const TWILIO_FORM: &str = "ToCountry=CN&ToState=&SmsMessageSid=SM0123456789abcdef0123456789abcdef&NumMedia=0&ToCity=&FromZip=&SmsSid=SM0123456789abcdef0123456789abcdef&FromState=&SmsStatus=received&FromCity=&Body=%E5%AE%BD%E5%B8%A6%E4%BB%8E%E6%98%A8%E5%A4%A9%E5%BC%80%E5%A7%8B%E6%96%AD%E7%BD%91+broadband+down+since+yesterday&FromCountry=CN&To=%2B8610690000&MessagingServiceSid=MG0123456789abcdef0123456789abcdef&ToZip=&NumSegments=1&MessageSid=SM0123456789abcdef0123456789abcdef&AccountSid=AC0123456789abcdef0123456789abcdef&From=%2B8613800138000&ApiVersion=2010-04-01";

/// Authentication and body parsing on the hot path, each against a baseline in the same run:
/// a bare SHA-256 of the same bytes (the floor of any HMAC) and a serde_json parse of the
/// events body.
fn auth_bench(c: &mut Criterion) {
    use sha2::Digest;
    use std::hint::black_box;
    use switchboard::{auth, channels};

    let secrets = vec!["current-secret".to_string(), "previous-secret".to_string()];
    let ts = b"1764400000";
    let sig = auth::sign_hex(&secrets[0], &[ts, b".", BODY.as_bytes()]);
    let mut g = c.benchmark_group("auth");
    g.throughput(Throughput::Elements(1));
    g.bench_function("baseline_sha256_of_body", |b| {
        b.iter(|| sha2::Sha256::digest(black_box(BODY.as_bytes())))
    });
    g.bench_function("events_hmac_sha256_two_secrets", |b| {
        b.iter(|| {
            auth::verify_hmac_sha256_hex(&secrets, &[ts, b".", black_box(BODY.as_bytes())], &sig)
                .unwrap()
        })
    });
    let url = "https://switchboard.example.cn/hooks/twilio/sms";
    let params = channels::form_pairs(TWILIO_FORM.as_bytes());
    let tokens = vec!["twilio-auth-token".to_string()];
    let twilio_sig = channels::twilio::compute_signature(&tokens[0], url, &params);
    g.bench_function("twilio_hmac_sha1_url_and_params", |b| {
        b.iter(|| {
            assert!(channels::twilio::verify(
                &tokens,
                url,
                black_box(&params),
                &twilio_sig
            ))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("baseline_serde_json_parse", |b| {
        b.iter(|| serde_json::from_str::<serde_json::Value>(black_box(BODY)).unwrap())
    });
    g.bench_function("twilio_form_pairs", |b| {
        b.iter(|| channels::form_pairs(black_box(TWILIO_FORM.as_bytes())))
    });
    g.finish();
}

fn spool_bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(
        Spool::open(&SpoolConfig {
            dir: dir.path().to_path_buf(),
            segment_bytes: 64 << 20,
            max_batch_records: 4096,
            ..SpoolConfig::default()
        })
        .unwrap(),
    );
    let payload = Bytes::from(BODY);
    let mut g = c.benchmark_group("spool");
    g.sample_size(20);
    // One record per fsync (the floor), then 64 concurrent appends sharing group commits.
    g.throughput(Throughput::Elements(1));
    g.bench_function("append_1_sequential", |b| {
        b.to_async(&rt)
            .iter(|| async { spool.append(vec![payload.clone()]).await.unwrap() })
    });
    g.throughput(Throughput::Elements(64));
    g.bench_function("append_64_concurrent_group_commit", |b| {
        b.to_async(&rt).iter(|| async {
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let s = spool.clone();
                    let p = payload.clone();
                    tokio::spawn(async move { s.append(vec![p]).await })
                })
                .collect();
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline_bench, auth_bench, spool_bench);
criterion_main!(benches);
