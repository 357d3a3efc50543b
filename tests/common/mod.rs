//! Shared helpers for the end-to-end tests: start the real `switchboard` binary, talk to it with a
//! real HTTP client, and read what it wrote to a real Kafka broker with a real consumer.
#![allow(dead_code)]

pub mod chat;
pub mod durability;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const SECRET: &str = "e2e-secret-0123456789";
pub const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchboard.toml");

/// The broker the test script started. Tests that need Kafka fail loudly without it: run them
/// through `scripts/test.sh`, which starts a real broker and sets this.
pub fn kafka_brokers() -> String {
    std::env::var("SWITCHBOARD_TEST_KAFKA").unwrap_or_else(|_| {
        panic!("SWITCHBOARD_TEST_KAFKA is not set: run the suite with scripts/test.sh (it starts a real Kafka broker)")
    })
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}.{}", ulid::Ulid::new().to_string().to_lowercase())
}

pub struct Gateway {
    pub child: Child,
    pub http: String,
    pub admin: String,
    /// host:port of the SMTP listener.
    pub smtp: String,
    /// The whole listening line (`smtps`, `tls`, ...).
    pub listening: serde_json::Value,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
}

impl Gateway {
    /// Starts the gateway with the shipped config plus `env` overrides, on ephemeral ports, with
    /// its own spool directory; returns once it printed its listening line.
    pub async fn start(env: &[(&str, String)]) -> Gateway {
        Self::start_in(tempfile::tempdir().unwrap(), env).await
    }

    /// Starts a gateway in `dir` (its spool included): a restart after `kill` or `terminate`.
    pub async fn start_in(dir: tempfile::TempDir, env: &[(&str, String)]) -> Gateway {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("gateway.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        cmd.arg("--config")
            .arg(CONFIG)
            .arg("serve")
            .current_dir(dir.path())
            .env("SWITCHBOARD_HTTP__LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD_ADMIN__LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD_EMAIL__SMTP_LISTEN", "127.0.0.1:0")
            .env(
                "SWITCHBOARD_EMAIL__ATTACHMENT_DIR",
                dir.path().join("attachments"),
            )
            .env("SWITCHBOARD_SPOOL__DIR", dir.path().join("spool"))
            .env("SWITCHBOARD_LOG__FORMAT", "json")
            .env("SWITCHBOARD_LOG__LEVEL", "debug")
            .env("SWITCHBOARD_API__SECRETS", format!("[\"{SECRET}\"]"))
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start switchboard");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("gateway did not start within 60 s")
            .unwrap()
            .unwrap_or_else(|| {
                let log =
                    std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
                panic!("gateway exited before listening:\n{log}")
            });
        let v: serde_json::Value = serde_json::from_str(&line).expect("listening line is JSON");
        assert_eq!(v["event"], "listening");
        Gateway {
            child,
            http: format!("http://{}", v["http"].as_str().unwrap()),
            admin: format!("http://{}", v["admin"].as_str().unwrap()),
            smtp: v["smtp"].as_str().unwrap_or_default().to_string(),
            listening: v.clone(),
            dir,
            // Idle pooled connections are dropped before the gateway's keep-alive timeout closes
            // them, so a request after a long wait never lands on a closed connection.
            client: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        }
    }

    /// SIGKILL: no shutdown of any kind. Returns the directory for a restart with `start_in`.
    pub async fn kill(mut self) -> tempfile::TempDir {
        self.child.start_kill().expect("kill");
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        self.dir
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// POSTs a body to /v1/events, signed now with the test secret.
    pub async fn post_signed(&self, body: &str) -> reqwest::Response {
        self.post_signed_at(body, chrono::Utc::now().timestamp())
            .await
    }

    pub async fn post_signed_at(&self, body: &str, ts: i64) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/events", self.http))
            .header("content-type", "application/json")
            .header("x-switchboard-timestamp", ts.to_string())
            .header("x-switchboard-signature", format!("v1={}", sign(body, ts)))
            .body(body.to_string())
            .send()
            .await
            .expect("request")
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        let r = self
            .client
            .get(format!("{}/readyz", self.admin))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    /// Polls /readyz until `want` (state changes are driven by the broker; bounded at 60 s).
    pub async fn wait_ready(&self, want: bool) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = self.readyz().await;
            if (status == 200) == want {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "readyz did not become {want}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics().await, name, labels)
    }

    /// SIGTERM, then wait for the exit (bounded).
    /// Waits (up to 30 s) until a metric reaches `want`; fails if it goes past it.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.metric(name, labels).await;
            if v == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}{labels:?} is {v}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running");
        let ok = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(ok.success());
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("gateway did not exit within 60 s of SIGTERM")
            .unwrap()
    }

    /// Personal data must never reach the log in full.
    pub fn assert_log_has_none_of(&self, needles: &[&str]) {
        let log = self.log();
        assert!(!log.is_empty(), "gateway wrote no log");
        for n in needles {
            assert!(!log.contains(n), "log contains personal data `{n}`");
        }
    }
}

pub fn sign(body: &str, ts: i64) -> String {
    switchboard::auth::sign_hex(SECRET, &[ts.to_string().as_bytes(), b".", body.as_bytes()])
}

/// Value of one sample in Prometheus text; 0 when absent. Labels must all match.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let metric = l.split([' ', '{']).next().unwrap_or("");
            metric == name
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let res = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create topic");
    for r in res {
        r.expect("topic created");
    }
}

/// A consumer reading `topic` from the beginning of every partition (no group coordination).
pub fn consumer(brokers: &str, topic: &str) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("e2e"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        assert!(
            !t.partitions().is_empty(),
            "topic {topic} has no partitions"
        );
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
    }
    c.assign(&tpl).unwrap();
    c
}

/// Reads records until `done` says the set is complete (bounded at 60 s).
pub async fn consume_until(
    brokers: &str,
    topic: &str,
    mut done: impl FnMut(&[OwnedMessage]) -> bool,
) -> Vec<OwnedMessage> {
    let c = consumer(brokers, topic);
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done(&out) {
        let m = tokio::time::timeout_at(deadline, c.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out with {} records from {topic}", out.len()))
            .expect("consume");
        out.push(m.detach());
    }
    out
}

pub fn record_json(m: &OwnedMessage) -> serde_json::Value {
    serde_json::from_slice(m.payload().expect("payload")).expect("record is JSON")
}

pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

pub fn key(m: &OwnedMessage) -> String {
    String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned()
}

pub fn schema_validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schema/complaint.v1.json"
    ))
    .expect("schema file");
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::validator_for(&schema).expect("schema compiles")
}

pub fn assert_valid(v: &jsonschema::Validator, record: &serde_json::Value) {
    let errors: Vec<String> = v.iter_errors(record).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "record violates complaint.v1: {errors:?}\n{record}"
    );
}

pub fn fixture(path: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(path),
    )
    .unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

/// The path of the broker script, for tests that run a broker of their own.
pub fn kafka_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh")
}

/// Used by the outage test: an offset reader that does not need a consumer group.
pub fn partition_count(brokers: &str, topic: &str) -> usize {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .unwrap();
    md.topics().iter().map(|t| t.partitions().len()).sum()
}

/// A gateway producing to a fresh topic of its own (so tests never see each other's records).
pub async fn gateway_with_topic(
    partitions: i32,
    extra: &[(&str, String)],
) -> (Gateway, String, String) {
    let brokers = kafka_brokers();
    let topic = unique("complaints.e2e");
    create_topic(&brokers, &topic, partitions).await;
    let mut env = vec![
        ("SWITCHBOARD_KAFKA__BROKERS", brokers.clone()),
        ("SWITCHBOARD_KAFKA__TOPIC", topic.clone()),
    ];
    env.extend(extra.iter().cloned());
    let gw = Gateway::start(&env).await;
    gw.wait_ready(true).await;
    (gw, brokers, topic)
}

/// A signed /v1/events body that marks the end of a test's records in a one-partition topic.
pub fn sentinel(n: u32) -> String {
    serde_json::json!({
        "event_id": format!("sentinel-{n}"),
        "customer": {"id": format!("sentinel-{n}")},
        "text": format!("sentinel {n}"),
    })
    .to_string()
}

pub fn has_text(msgs: &[rdkafka::message::OwnedMessage], text: &str) -> bool {
    msgs.iter()
        .any(|m| record_json(m)["content"]["text"] == text)
}

/// Posts the sentinel and reads the topic up to it: every record the test caused, in order.
pub async fn records_until_sentinel(
    gw: &Gateway,
    brokers: &str,
    topic: &str,
) -> Vec<serde_json::Value> {
    assert_eq!(gw.post_signed(&sentinel(99)).await.status(), 202);
    let msgs = consume_until(brokers, topic, |m| has_text(m, "sentinel 99")).await;
    msgs.iter()
        .map(record_json)
        .filter(|r| r["content"]["text"] != "sentinel 99")
        .collect()
}

impl Gateway {
    /// POSTs a body with a content type and extra headers to a public path.
    pub async fn post(
        &self,
        path: &str,
        content_type: &str,
        headers: &[(&str, String)],
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .post(format!("{}{path}", self.http))
            .header("content-type", content_type);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        req.body(body).send().await.expect("request")
    }
}
