//! Helpers for the durability tests: a private broker that can be stopped and resumed with its
//! data, a load generator that records every acknowledged record id across gateway restarts, and
//! a verifier that reads the topic back (`lost = |acked \ found|`).

use super::*;
use rdkafka::consumer::StreamConsumer;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A broker of the test's own, so stopping it does not disturb the other tests.
pub struct PrivateBroker {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

/// Two free ports in a row (broker, controller) below the ephemeral range, so a port cannot be
/// taken by an outgoing connection while the broker is stopped for a while.
fn free_port_pair() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id() as u64);
        let p = 20_000 + (h.finish() % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
        {
            return p;
        }
    }
}

impl PrivateBroker {
    pub async fn start() -> Self {
        kafka_brokers(); // the suite runs under scripts/test.sh, which fetched the broker jars
        let port = free_port_pair();
        let dir = tempfile::tempdir().unwrap();
        let b = PrivateBroker { dir, port };
        b.script(&["start", &b.dir_str(), &port.to_string()]).await;
        b
    }

    fn dir_str(&self) -> String {
        self.dir.path().display().to_string()
    }

    async fn script(&self, args: &[&str]) {
        let out = tokio::process::Command::new("bash")
            .arg(kafka_script())
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "kafka.sh {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn stop(&self) {
        self.script(&["stop", &self.dir_str()]).await;
    }

    /// Starts the stopped broker again with its data (the topic and its records survive).
    pub async fn resume(&self) {
        self.script(&["resume", &self.dir_str()]).await;
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(kafka_script())
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

/// A signed event for customer `c` carrying `seq` in its text, with a unique event id.
pub fn event(c: usize, seq: u64) -> String {
    serde_json::json!({
        "event_id": unique("ev"),
        "customer": {"phone": format!("1380013{c:04}")},
        "text": format!("no signal, report seq {seq}"),
    })
    .to_string()
}

/// The `seq` a record of `event` carries.
pub fn seq_of(record: &serde_json::Value) -> u64 {
    record["content"]["text"]
        .as_str()
        .and_then(|t| t.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a record of this test")
}

/// Closed-loop load through whichever gateway is current: every 202 is recorded with its id.
/// Requests to a dead gateway (or refused with 503) are simply not acknowledged. Run the gateway
/// with `SWITCHBOARD_LIMITS__ENABLED=false`: all of it comes from one address.
pub struct Load {
    stop: Arc<AtomicBool>,
    target: Arc<parking_lot::RwLock<Option<String>>>,
    acked: Arc<parking_lot::Mutex<Vec<String>>>,
    pub sent: Arc<AtomicU64>,
    pub refused: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(workers: usize, http: &str) -> Load {
        let load = Load {
            stop: Arc::default(),
            target: Arc::new(parking_lot::RwLock::new(Some(http.to_string()))),
            acked: Arc::default(),
            sent: Arc::default(),
            refused: Arc::default(),
            tasks: Vec::new(),
        };
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (stop, target, acked) =
                (load.stop.clone(), load.target.clone(), load.acked.clone());
            let (sent, refused) = (load.sent.clone(), load.refused.clone());
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .pool_idle_timeout(Duration::from_secs(2))
                    .build()
                    .unwrap();
                let mut seq = 0u64;
                // Bounded however the test goes: a few minutes at most.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
                while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                    let Some(http) = target.read().clone() else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    seq += 1;
                    // Many customers, so per-customer order holds over short runs of records.
                    let body = serde_json::json!({
                        "event_id": unique("load"),
                        "customer": {"id": format!("load-{w}-{}", seq % 200)},
                        "text": format!("load worker {w} seq {seq}"),
                    })
                    .to_string();
                    let ts = chrono::Utc::now().timestamp();
                    sent.fetch_add(1, Ordering::Relaxed);
                    let r = client
                        .post(format!("{http}/v1/events"))
                        .header("content-type", "application/json")
                        .header("x-switchboard-timestamp", ts.to_string())
                        .header("x-switchboard-signature", format!("v1={}", sign(&body, ts)))
                        .body(body)
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 202 => {
                            if let Ok(v) = r.json::<serde_json::Value>().await {
                                acked.lock().push(v["id"].as_str().unwrap().to_string());
                            }
                        }
                        _ => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }));
        }
        Load { tasks, ..load }
    }

    /// Points the load at another gateway (`None`: pause).
    pub fn retarget(&self, http: Option<&str>) {
        *self.target.write() = http.map(str::to_string);
    }

    pub fn acked(&self) -> usize {
        self.acked.lock().len()
    }

    /// Waits until `n` more records than now were acknowledged (bounded).
    pub async fn wait_more(&self, n: usize) {
        let want = self.acked() + n;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        while self.acked() < want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "load stalled at {} acknowledged",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the workers; returns every acknowledged record id.
    pub async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let acked = self.acked.lock().clone();
        acked
    }
}

/// What the topic holds, measured against what was acknowledged.
pub struct Verdict {
    pub acked: usize,
    pub found: usize,
    pub distinct: usize,
    pub lost: Vec<String>,
    pub duplicates: usize,
}

impl Verdict {
    pub fn report(&self, what: &str) -> String {
        format!(
            "{what}: acked={} found={} (distinct {}) lost={} duplicates={}",
            self.acked,
            self.found,
            self.distinct,
            self.lost.len(),
            self.duplicates
        )
    }
}

/// Reads `topic` from the beginning until every acknowledged id was seen or nothing new arrived
/// for 20 s (then what is missing is lost). Returns the verdict and every record read.
pub async fn verify(
    brokers: &str,
    topic: &str,
    acked: &[String],
) -> (Verdict, Vec<OwnedMessageJson>) {
    let c: StreamConsumer = consumer(brokers, topic);
    let want: HashSet<&str> = acked.iter().map(String::as_str).collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut records = Vec::new();
    let mut missing = want.len();
    while missing > 0 {
        match tokio::time::timeout(Duration::from_secs(20), c.recv()).await {
            Ok(m) => {
                let m = m.expect("consume").detach();
                let v = record_json(&m);
                let id = v["id"].as_str().unwrap().to_string();
                let n = seen.entry(id.clone()).or_default();
                *n += 1;
                if *n == 1 && want.contains(id.as_str()) {
                    missing -= 1;
                }
                records.push(OwnedMessageJson {
                    key: key(&m),
                    partition: m.partition(),
                    record: v,
                });
            }
            Err(_) => break,
        }
    }
    let lost: Vec<String> = acked
        .iter()
        .filter(|id| !seen.contains_key(id.as_str()))
        .cloned()
        .collect();
    let found: usize = seen.values().sum();
    let v = Verdict {
        acked: want.len(),
        found,
        distinct: seen.len(),
        lost,
        duplicates: found - seen.len(),
    };
    (v, records)
}

/// A consumed record: its key, partition and JSON.
pub struct OwnedMessageJson {
    pub key: String,
    pub partition: i32,
    pub record: serde_json::Value,
}

/// Runs `switchboard spool ...` and returns (exit success, stdout JSON or text, stderr).
pub async fn spool_cli(args: &[&str], env: &[(&str, String)]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.arg("--config").arg(CONFIG).arg("spool").args(args);
    cmd.env_remove("RUST_LOG")
        .env("SWITCHBOARD_LOG__FORMAT", "json");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("spool command finished")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `.seg` files in a spool directory.
pub fn segment_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".seg")
        })
        .count()
}
