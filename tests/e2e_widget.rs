//! The chat widget in a real browser: Debian's headless Chromium driven by Playwright
//! (`tests/browser/widget.mjs`, spawned here and steered over stdin/stdout), against the running
//! gateway with a real Kafka broker. A complaint typed in the page is acknowledged with its
//! reference, a reply produced to Kafka appears, and after the socket is killed the page resumes
//! its session: missed replies arrive once, an unacknowledged message is resent and recorded once.
//! Needs SWITCHBOARD_TEST_BROWSER=1 (scripts/test.sh installs Chromium and the driver).

mod common;

use common::chat::{chat_gateway, produce_reply};
use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

struct Driver {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    stderr: std::path::PathBuf,
}

impl Driver {
    fn start(page: &str, dir: &std::path::Path) -> Driver {
        let stderr = dir.join("widget-driver.log");
        let root = env!("CARGO_MANIFEST_DIR");
        let mut child = Command::new("node")
            .arg(format!("{root}/tests/browser/widget.mjs"))
            .arg(page)
            .env("SB_SCREENSHOT", dir.join("widget.png"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
            .kill_on_drop(true)
            .spawn()
            .expect("node runs tests/browser/widget.mjs");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Driver {
            child,
            stdin,
            lines,
            stderr,
        }
    }

    /// The driver's next event; fails with its log when it reports an error or exits.
    async fn event(&mut self, want: &str) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(90), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no `{want}` from the driver in 90 s:\n{}", self.log()))
            .unwrap();
        let Some(line) = line else {
            panic!("the driver exited before `{want}`:\n{}", self.log())
        };
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("driver printed a non-JSON line {line:?}"));
        assert_eq!(v["event"], want, "{v}\n{}", self.log());
        v
    }

    async fn command(&mut self, v: Value) {
        self.stdin
            .write_all(format!("{v}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

#[tokio::test]
async fn the_widget_chats_acknowledges_shows_replies_and_resumes_in_chromium() {
    assert!(
        std::env::var("SWITCHBOARD_TEST_BROWSER").is_ok(),
        "SWITCHBOARD_TEST_BROWSER is not set: run the suite with scripts/test.sh (it installs Chromium and the Playwright driver)"
    );
    let (gw, brokers, topic, replies) = chat_gateway(&[]).await;
    // Opened the way an operator's app embeds it for a logged-in customer: the token in the
    // fragment (never sent to a server), presented in the hello.
    let customer = switchboard::channels::chat::token::sign_customer_token(
        common::chat::CUSTOMER_SECRET,
        &json!({"phone": "13900139000", "name": "李雷", "exp": chrono::Utc::now().timestamp() + 600}),
    );
    let mut d = Driver::start(
        &format!("{}/chat#customer_token={customer}", gw.http),
        gw.dir.path(),
    );

    let ready = d.event("ready").await;
    let sid = ready["session_id"].as_str().unwrap().to_string();
    let first = d.event("acked").await;
    assert_eq!(first["n"], 1);
    let id1 = first["record_id"].as_str().unwrap().to_string();
    assert_eq!(first["reference"], id1[id1.len() - 8..]);

    let reply1 = "您好，工程师今天下午上门。";
    produce_reply(
        &brokers,
        &replies,
        &sid,
        json!({"session_id": sid, "text": reply1, "reply_id": "w1", "in_reply_to": id1}),
    )
    .await;
    d.command(json!({"cmd": "expect_reply", "text": reply1}))
        .await;
    assert_eq!(d.event("reply_seen").await["replies"], 1);

    // Offline: the page queues a message; a reply arrives meanwhile.
    d.command(json!({"cmd": "disconnect"})).await;
    d.event("disconnected").await;
    let reply2 = "second reply 第二条回复";
    produce_reply(
        &brokers,
        &replies,
        &sid,
        json!({"session_id": sid, "text": reply2, "reply_id": "w2"}),
    )
    .await;
    gw.wait_metric(
        "switchboard_chat_replies_total",
        &[("outcome", "queued")],
        2.0,
    )
    .await;
    d.command(json!({"cmd": "reconnect", "text": reply2})).await;
    let resumed = d.event("resumed").await;
    assert_eq!(resumed["session_id"], sid.as_str());
    assert_eq!(
        resumed["replies"], 2,
        "the missed reply once, the old one not again"
    );
    let id2 = resumed["record_id"].as_str().unwrap().to_string();

    // The socket dies right after a send: the page resends after resuming; one record.
    d.command(json!({"cmd": "drop_during_send"})).await;
    let third = d.event("acked").await;
    assert_eq!(third["session_id"], sid.as_str());
    let id3 = third["record_id"].as_str().unwrap().to_string();

    let done = d.event("done").await;
    assert_eq!(done["own"], 3);
    assert_eq!(done["replies"], 2);
    let shown: HashSet<String> = done["record_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let want: HashSet<String> = [id1, id2, id3].into_iter().collect();
    assert_eq!(shown, want);
    let status = tokio::time::timeout(Duration::from_secs(30), d.child.wait())
        .await
        .expect("driver exits")
        .unwrap();
    assert!(status.success(), "{}", d.log());

    let records = records_until_sentinel(&gw, &brokers, &topic).await;
    let ids: HashSet<String> = records
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        records.len(),
        3,
        "three messages, three records: {records:?}"
    );
    assert_eq!(ids, want);
    for r in &records {
        assert_eq!(r["conversation"]["thread_id"], sid.as_str());
        assert_eq!(r["channel"], "chat");
        assert_eq!(r["customer"]["phone"], "+8613900139000");
        assert_eq!(r["metadata"]["chat_customer"], "verified");
    }
    assert!(records
        .iter()
        .any(|r| r["content"]["text"] == "third: 信号很差 📶"));
}
