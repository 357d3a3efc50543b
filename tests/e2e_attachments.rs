//! The attachment store end to end: real mails (lettre) with real attachments, records in a real
//! Kafka broker, a real (tmpfs) volume that fills. Over a quota, or when the volume is full, the
//! mail is still recorded, its attachment entry says `stored: false` and why, and no temp file
//! is left behind; the retention sweep deletes old files.

mod common;

use common::*;
use lettre::message::{header::ContentType, Attachment, MultiPart, SinglePart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

const INTAKE: &str = "complaints@operator.example";

fn smtp_client(addr: &str) -> AsyncSmtpTransport<Tokio1Executor> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(port.parse().unwrap())
        .build()
}

/// `len` bytes nobody else sends (a distinct sha256 per call).
fn blob(len: usize) -> Vec<u8> {
    let seed = ulid::Ulid::new().0;
    let mut x = seed as u64 ^ (seed >> 64) as u64 | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A complaint mail from `from` with one PDF attachment per entry of `sizes`.
fn mail(from: &str, subject: &str, sizes: &[usize]) -> Message {
    let mut parts = MultiPart::mixed().singlepart(SinglePart::plain(format!(
        "Complaint {subject}: see the attached bill."
    )));
    for (i, n) in sizes.iter().enumerate() {
        parts = parts.singlepart(
            Attachment::new(format!("bill-{i}.pdf"))
                .body(blob(*n), ContentType::parse("application/pdf").unwrap()),
        );
    }
    Message::builder()
        .from(from.parse().unwrap())
        .to(INTAKE.parse().unwrap())
        .subject(subject)
        .multipart(parts)
        .unwrap()
}

fn env(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut v = vec![
        (
            "SWITCHBOARD_EMAIL__INTAKE_ADDRESSES",
            format!("[\"{INTAKE}\"]"),
        ),
        ("SWITCHBOARD_EMAIL__MAX_MESSAGE_BYTES", "4000000".into()),
    ];
    v.extend(extra.iter().cloned());
    v
}

/// The files in `dir` (not below), sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            e.file_type()
                .unwrap()
                .is_file()
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    v.sort();
    v
}

fn attachments(r: &serde_json::Value) -> Vec<serde_json::Value> {
    r["content"]["attachments"].as_array().unwrap().clone()
}

/// Asserts an attachment entry kept its metadata and says it was not stored, and why.
fn assert_omitted(a: &serde_json::Value, why: &str) {
    assert_eq!(a["stored"], false, "{a}");
    assert_eq!(a["omitted"], why, "{a}");
    assert!(
        a.get("url").is_none(),
        "no reference to bytes never stored: {a}"
    );
    assert!(a["sha256"].as_str().unwrap().len() == 64, "{a}");
    assert!(a["size"].as_u64().unwrap() > 0, "{a}");
    assert_eq!(a["content_type"], "application/pdf");
}

fn assert_stored(a: &serde_json::Value, dir: &Path) {
    assert_eq!(a["stored"], true, "{a}");
    assert!(a.get("omitted").is_none(), "{a}");
    let sha = a["sha256"].as_str().unwrap();
    assert_eq!(a["url"], format!("attachment:sha256:{sha}"));
    let bytes = std::fs::read(dir.join(sha)).expect("stored file");
    assert_eq!(bytes.len() as u64, a["size"].as_u64().unwrap());
}

#[tokio::test]
async fn over_a_quota_the_mail_is_recorded_without_the_attachment_body() {
    let (gw, brokers, topic) = gateway_with_topic(
        1,
        &env(&[
            (
                "SWITCHBOARD_EMAIL__ATTACHMENT_MAX_MESSAGE_BYTES",
                "150000".into(),
            ),
            (
                "SWITCHBOARD_EMAIL__ATTACHMENT_SENDER_BYTES_PER_HOUR",
                "250000".into(),
            ),
            (
                "SWITCHBOARD_EMAIL__ATTACHMENT_MAX_TOTAL_BYTES",
                "400000".into(),
            ),
        ]),
    )
    .await;
    let store = gw.dir.path().join("attachments");
    let smtp = smtp_client(&gw.smtp);
    for (from, subject, sizes) in [
        // Two of 100 KB in one mail: the second is over the 150 KB per message.
        ("a@example.cn", "m1", &[100_000, 100_000][..]),
        // 200 KB from a@ this hour; 100 KB more is over its 250 KB.
        ("a@example.cn", "m2", &[100_000]),
        ("a@example.cn", "m3", &[100_000]),
        // 300 KB stored in all; 120 KB more is over the 400 KB total.
        ("b@example.cn", "m4", &[100_000]),
        ("c@example.cn", "m5", &[120_000]),
    ] {
        let r = smtp.send(mail(from, subject, sizes)).await.unwrap();
        assert_eq!(r.code().to_string(), "250", "{subject}");
    }
    let validator = schema_validator();
    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 5, "every mail recorded: {recs:#?}");
    for r in &recs {
        assert_valid(&validator, r);
    }
    let subject = |r: &serde_json::Value| r["content"]["subject"].as_str().unwrap().to_string();
    let by: std::collections::HashMap<String, Vec<serde_json::Value>> =
        recs.iter().map(|r| (subject(r), attachments(r))).collect();
    assert_eq!(by["m1"].len(), 2);
    assert_stored(&by["m1"][0], &store);
    assert_omitted(&by["m1"][1], "quota_message");
    assert_stored(&by["m2"][0], &store);
    assert_omitted(&by["m3"][0], "quota_sender");
    assert_stored(&by["m4"][0], &store);
    assert_omitted(&by["m5"][0], "quota_total");
    assert_eq!(files(&store).len(), 3, "three stored, no temp file");

    for (outcome, n) in [
        ("stored", 3.0),
        ("quota_message", 1.0),
        ("quota_sender", 1.0),
        ("quota_total", 1.0),
    ] {
        assert_eq!(
            gw.metric("switchboard_attachments_total", &[("outcome", outcome)])
                .await,
            n,
            "{outcome}"
        );
    }
    assert_eq!(
        gw.metric("switchboard_attachment_store_bytes", &[]).await,
        300_000.0
    );
    let (status, ready) = gw.readyz().await;
    assert_eq!(status, 200);
    assert!(
        ready["disk"]["attachments"]["free_bytes"].as_u64().unwrap() > 0,
        "{ready}"
    );
    assert!(
        gw.metric("switchboard_disk_free_bytes", &[("volume", "attachments")])
            .await
            > 0.0
    );
}

/// A tmpfs mounted for the test, unmounted on drop (even when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// CI runs as root: a test that cannot mount fails, it does not skip.
    fn mount(path: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_full_volume_records_the_mail_leaves_no_temp_file_and_defers_a_large_one() {
    let base = tempfile::tempdir().unwrap();
    let store = Tmpfs::mount(base.path().join("attachments"), "1m");
    let spill = Tmpfs::mount(base.path().join("spill"), "256k");
    let (gw, brokers, topic) = gateway_with_topic(
        1,
        &env(&[
            (
                "SWITCHBOARD_EMAIL__ATTACHMENT_DIR",
                store.0.display().to_string(),
            ),
            (
                "SWITCHBOARD_EMAIL__DATA_SPILL_DIR",
                spill.0.display().to_string(),
            ),
            // No headroom kept: the write itself meets the full disk (ENOSPC).
            ("SWITCHBOARD_EMAIL__ATTACHMENT_MIN_FREE_BYTES", "0".into()),
            (
                "SWITCHBOARD_EMAIL__ATTACHMENT_MAX_MESSAGE_BYTES",
                "4000000".into(),
            ),
            // Mails stay in memory, except the one meant to spill.
            ("SWITCHBOARD_EMAIL__DATA_MEMORY_BYTES", "1500000".into()),
        ]),
    )
    .await;
    let smtp = smtp_client(&gw.smtp);
    // 600 KB fits on the 1 MB volume; the next 600 KB does not: ENOSPC mid-write.
    for subject in ["fits", "full"] {
        let r = smtp
            .send(mail("d@example.cn", subject, &[600_000]))
            .await
            .unwrap();
        assert_eq!(r.code().to_string(), "250", "{subject}");
    }
    // Larger than data_memory_bytes: streamed to the 256 KB spill volume, which fills. 452 4.3.1
    // (insufficient storage): transient, the sender keeps the mail and retries.
    let e = smtp
        .send(mail("e@example.cn", "spilled", &[1_200_000]))
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(
        e.to_string().contains("4.3.1") || format!("{e:?}").contains("452"),
        "{e:?}"
    );

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 2, "{recs:#?}");
    assert_stored(&attachments(&recs[0])[0], &store.0);
    assert_omitted(&attachments(&recs[1])[0], "disk_full");
    let validator = schema_validator();
    assert_valid(&validator, &recs[1]);
    assert_eq!(
        files(&store.0),
        vec![attachments(&recs[0])[0]["sha256"]
            .as_str()
            .unwrap()
            .to_string()],
        "the stored file only: the failed write's temp file is gone"
    );
    assert!(
        files(&spill.0).is_empty(),
        "the failed spill's file is gone"
    );
    assert_eq!(
        gw.metric("switchboard_attachments_total", &[("outcome", "disk_full")])
            .await,
        1.0
    );
    assert_eq!(
        gw.metric(
            "switchboard_smtp_data_spilled_total",
            &[("result", "error")]
        )
        .await,
        1.0
    );
    assert_eq!(
        gw.metric("switchboard_smtp_replies_total", &[("code", "452")])
            .await,
        1.0
    );
    // Every channel still takes complaints.
    assert_eq!(gw.post_signed(&sentinel(7)).await.status(), 202);
    drop(gw);
}

#[tokio::test]
async fn the_retention_sweep_deletes_old_attachments_and_stale_temp_files() {
    let gw = Gateway::start(&env(&[
        ("SWITCHBOARD_EMAIL__ATTACHMENT_MAX_AGE_HOURS", "1".into()),
        (
            "SWITCHBOARD_EMAIL__ATTACHMENT_SWEEP_INTERVAL_SECS",
            "1".into(),
        ),
    ]))
    .await;
    let store = gw.dir.path().join("attachments");
    let r = smtp_client(&gw.smtp)
        .send(mail("f@example.cn", "fresh", &[50_000]))
        .await
        .unwrap();
    assert_eq!(r.code().to_string(), "250");
    let fresh = files(&store);
    assert_eq!(fresh.len(), 1);

    // An attachment last referenced two hours ago, and a temp file a crash left an hour ago.
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    let old = "ab".repeat(32);
    for (name, when) in [
        (old.as_str(), two_hours_ago),
        (".crash.tmp", SystemTime::now() - Duration::from_secs(3600)),
    ] {
        let f = std::fs::File::create(store.join(name)).unwrap();
        f.set_len(1000).unwrap();
        f.set_modified(when).unwrap();
    }
    gw.wait_metric(
        "switchboard_attachments_deleted_total",
        &[("reason", "expired")],
        1.0,
    )
    .await;
    gw.wait_metric(
        "switchboard_attachments_deleted_total",
        &[("reason", "stale_temp")],
        1.0,
    )
    .await;
    assert_eq!(files(&store), fresh, "the fresh attachment stays");
    gw.wait_metric("switchboard_attachment_store_files", &[], 1.0)
        .await;
}
