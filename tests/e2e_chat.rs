//! Web chat end to end: real websocket clients (tokio-tungstenite) against the running gateway,
//! records read from a real Kafka broker, replies produced to a real `replies` topic.

mod common;

use common::chat::{chat_gateway, produce_reply, ChatClient, Closed, CUSTOMER_SECRET};
use common::*;
use serde_json::json;
use std::collections::HashSet;

/// Waits until the gateway counted `n` replies with `outcome` (the consumer is asynchronous).
async fn replies_counted(gw: &Gateway, outcome: &str, n: f64) {
    gw.wait_metric("switchboard_chat_replies_total", &[("outcome", outcome)], n)
        .await;
}

#[tokio::test]
async fn acks_come_after_kafka_and_resends_are_the_same_record() {
    let (mut gw, brokers, topic, _) = chat_gateway(&[]).await;
    let validator = schema_validator();
    let mut c = ChatClient::connect(&gw.http).await;
    let w = c.hello(json!({"lang": "zh-CN"})).await;
    assert_eq!(w["resumed"], false);
    assert_eq!(w["customer"], "anonymous");
    assert_eq!(w["last_seq"], 0);
    let sid = w["session_id"].as_str().unwrap().to_string();
    let token = w["token"].as_str().unwrap().to_string();

    // Chinese, emoji and right-to-left text, byte-exact.
    let text1 = "光猫一直红灯，网络断了 📶 الإنترنت لا يعمل";
    let a1 = c.message("m-1", text1).await;
    assert_eq!(a1["client_msg_id"], "m-1");
    assert_eq!(a1["duplicate"], false);
    let id1 = a1["record_id"].as_str().unwrap().to_string();
    assert_eq!(a1["reference"], id1[id1.len() - 8..]);

    // The same client_msg_id again: same record, flagged duplicate.
    let again = c.message("m-1", text1).await;
    assert_eq!(again["record_id"], id1.as_str());
    assert_eq!(again["duplicate"], true);

    let a2 = c.message("m-2", "Bill charged twice for October").await;
    let id2 = a2["record_id"].as_str().unwrap().to_string();
    assert_ne!(id1, id2);

    // Reconnect and resume: a resend of an already recorded message gets the same ack.
    drop(c);
    let mut c = ChatClient::connect(&gw.http).await;
    let w2 = c.hello(json!({"token": token, "last_seq": 0})).await;
    assert_eq!(w2["resumed"], true);
    assert_eq!(w2["session_id"], sid.as_str());
    let resent = c.message("m-2", "Bill charged twice for October").await;
    assert_eq!(resent["record_id"], id2.as_str());
    assert_eq!(resent["duplicate"], true);

    let records = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(records.len(), 2, "two messages, two records: {records:?}");
    for r in &records {
        assert_valid(&validator, r);
        assert_eq!(r["channel"], "chat");
        assert_eq!(r["provider"], "webchat");
        assert_eq!(r["conversation"]["thread_id"], sid.as_str());
        assert_eq!(r["customer"]["key"], format!("webchat:{sid}"));
        assert_eq!(r["metadata"]["ui_lang"], "zh-CN");
    }
    assert_eq!(records[0]["id"], id1.as_str());
    assert_eq!(records[0]["provider_message_id"], "m-1");
    assert_eq!(records[0]["content"]["text"], text1);
    assert_eq!(records[1]["id"], id2.as_str());
    assert_eq!(
        gw.metric(
            "switchboard_chat_messages_total",
            &[("outcome", "duplicate")]
        )
        .await,
        2.0
    );

    // Shutdown: the open session is told to go away (1001) and may resume elsewhere.
    let status = gw.terminate().await;
    assert!(status.success(), "{status:?}");
    assert_eq!(c.closed().await, Closed::Code(1001));
    gw.assert_log_has_none_of(&["光猫一直红灯", "Bill charged twice"]);
}

#[tokio::test]
async fn replies_arrive_live_and_missed_ones_exactly_once_on_resume() {
    let (gw, brokers, _, replies) = chat_gateway(&[]).await;
    let mut c = ChatClient::connect(&gw.http).await;
    let w = c.hello(json!({})).await;
    let sid = w["session_id"].as_str().unwrap().to_string();
    let token = w["token"].as_str().unwrap().to_string();
    let a = c.message("m-1", "宽带很慢").await;
    let record = a["record_id"].as_str().unwrap().to_string();

    produce_reply(
        &brokers,
        &replies,
        &sid,
        json!({"session_id": sid, "text": "您好，已为您安排工程师。", "reply_id": "r1", "in_reply_to": record}),
    )
    .await;
    let r1 = c.expect("reply").await;
    assert_eq!(r1["text"], "您好，已为您安排工程师。");
    assert_eq!(r1["in_reply_to"], record.as_str());
    let seq1 = r1["seq"].as_u64().unwrap();
    assert!(seq1 >= 1);
    assert!(r1["at"].as_str().unwrap().ends_with('Z'));

    // Offline: two replies and a producer retry of the second.
    drop(c);
    let second = json!({"session_id": sid, "text": "second", "reply_id": "r2"});
    let third = json!({"session_id": sid, "text": "third 🙏", "reply_id": "r3"});
    common::chat::produce_replies(
        &brokers,
        &replies,
        &sid,
        vec![second.clone(), second, third],
    )
    .await;
    replies_counted(&gw, "queued", 3.0).await;
    replies_counted(&gw, "duplicate", 1.0).await;

    let mut c = ChatClient::connect(&gw.http).await;
    let w = c.hello(json!({"token": token, "last_seq": seq1})).await;
    assert_eq!(w["resumed"], true);
    let last = w["last_seq"].as_u64().unwrap();
    let r2 = c.expect("reply").await;
    let r3 = c.expect("reply").await;
    assert_eq!(r2["text"], "second");
    assert_eq!(r3["text"], "third 🙏");
    assert!(seq1 < r2["seq"].as_u64().unwrap());
    assert!(r2["seq"].as_u64().unwrap() < r3["seq"].as_u64().unwrap());
    assert_eq!(r3["seq"].as_u64().unwrap(), last);
    c.nothing_pending().await;

    // Resuming with everything seen delivers nothing again.
    drop(c);
    let mut c = ChatClient::connect(&gw.http).await;
    c.hello(json!({"token": w["token"], "last_seq": last}))
        .await;
    c.nothing_pending().await;

    // A reply to a session this instance never saw is kept for when it connects.
    let later = "01KNEWSESSIONNOTSEENYET000";
    produce_reply(&brokers, &replies, later, json!({"text": "keyed only"})).await;
    // And garbage is counted, not fatal.
    produce_reply(&brokers, &replies, "x", json!({"session_id": "S"})).await;
    replies_counted(&gw, "invalid", 1.0).await;
    replies_counted(&gw, "queued", 4.0).await;
}

#[tokio::test]
async fn logged_in_customers_are_identified_by_the_operator_token() {
    let (gw, brokers, topic, replies) = chat_gateway(&[]).await;
    let exp = chrono::Utc::now().timestamp() + 600;
    let token = switchboard::channels::chat::token::sign_customer_token(
        CUSTOMER_SECRET,
        &json!({"phone": "138 0013 8000", "sub": "C-42", "name": "张三", "exp": exp}),
    );
    let mut c = ChatClient::connect(&gw.http).await;
    let w = c.hello(json!({"customer_token": token})).await;
    assert_eq!(w["customer"], "verified");
    let session_token = w["token"].as_str().unwrap().to_string();
    c.message("m-1", "手机没有信号").await;

    // A reply addressed to the customer reaches the customer's session.
    produce_reply(
        &brokers,
        &replies,
        "+8613800138000",
        json!({"customer_key": "+8613800138000", "text": "we are on it"}),
    )
    .await;
    assert_eq!(c.expect("reply").await["text"], "we are on it");

    // Resuming with the session token alone keeps the identity.
    drop(c);
    let mut c = ChatClient::connect(&gw.http).await;
    let w = c
        .hello(json!({"token": session_token, "last_seq": 1}))
        .await;
    assert_eq!(w["customer"], "verified");
    c.message("m-2", "still no signal").await;

    let records = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_eq!(r["customer"]["key"], "+8613800138000");
        assert_eq!(r["customer"]["phone"], "+8613800138000");
        assert_eq!(r["customer"]["customer_id"], "C-42");
        assert_eq!(r["customer"]["name"], "张三");
        assert_eq!(r["metadata"]["chat_customer"], "verified");
    }

    // Forged, expired and wrongly signed tokens are refused with 1008.
    let forged = switchboard::channels::chat::token::sign_customer_token(
        "not-the-operator-secret",
        &json!({"sub": "C-1", "exp": exp}),
    );
    let expired = switchboard::channels::chat::token::sign_customer_token(
        CUSTOMER_SECRET,
        &json!({"sub": "C-1", "exp": 1_000}),
    );
    for (bad, code) in [
        (json!({"customer_token": forged}), "bad_customer_token"),
        (json!({"customer_token": expired}), "bad_customer_token"),
        (json!({"token": "eyJhbGciOiJIUzI1NiJ9.e30.x"}), "bad_token"),
    ] {
        let mut c = ChatClient::connect(&gw.http).await;
        c.send({
            let mut h = bad.clone();
            h["type"] = json!("hello");
            h
        })
        .await;
        let e = c.expect("error").await;
        assert_eq!(e["code"], code);
        assert_eq!(c.closed().await, Closed::Code(1008));
    }

    // Another customer's token never takes over this customer's session: a new one starts.
    let other = switchboard::channels::chat::token::sign_customer_token(
        CUSTOMER_SECRET,
        &json!({"sub": "C-99", "exp": exp}),
    );
    let mut c = ChatClient::connect(&gw.http).await;
    let w2 = c
        .hello(json!({"token": w["token"], "customer_token": other}))
        .await;
    assert_eq!(w2["resumed"], false);
    assert_ne!(w2["session_id"], w["session_id"]);
    gw.assert_log_has_none_of(&["13800138000", "张三", "手机没有信号"]);
}

/// Limits need no Kafka: this gateway runs on its spool.
#[tokio::test]
async fn limits_sizes_and_bad_frames_are_enforced() {
    let gw = Gateway::start(&[
        ("SWITCHBOARD_CHAT__MESSAGES_PER_MINUTE", "60".into()),
        ("SWITCHBOARD_CHAT__MESSAGE_BURST", "3".into()),
        ("SWITCHBOARD_CHAT__MAX_VIOLATIONS", "3".into()),
        ("SWITCHBOARD_CHAT__MAX_FRAME_BYTES", "1024".into()),
        ("SWITCHBOARD_CHAT__MAX_MESSAGE_BYTES", "2048".into()),
        ("SWITCHBOARD_CHAT__MAX_TEXT_CHARS", "100".into()),
        ("SWITCHBOARD_CHAT__HELLO_TIMEOUT_SECS", "1".into()),
        ("SWITCHBOARD_CHAT__FRAMES_PER_SECOND", "20".into()),
        ("SWITCHBOARD_CHAT__MAX_SESSIONS", "4".into()),
    ])
    .await;

    // Message rate: the burst passes, then rate_limited with a wait, then 1008.
    let mut c = ChatClient::connect(&gw.http).await;
    c.hello(json!({})).await;
    c.message("a", "one").await;
    c.message("b", "two").await;
    c.message("b2", "two and a half").await;
    for i in 0..3 {
        c.send(json!({"type": "message", "client_msg_id": format!("c{i}"), "text": "three"}))
            .await;
        let e = c.expect("error").await;
        assert_eq!(e["code"], "rate_limited");
        assert_eq!(e["client_msg_id"], format!("c{i}"));
        assert!(e["retry_after_ms"].as_u64().unwrap() > 0);
    }
    assert_eq!(c.closed().await, Closed::Code(1008));

    // Bad frames are answered and the session goes on; bad content is refused per message
    // (three message frames: within the burst, which counts refused messages too).
    let mut c = ChatClient::connect(&gw.http).await;
    c.hello(json!({})).await;
    c.send(json!({"type": "shout"})).await;
    assert_eq!(c.expect("error").await["code"], "bad_frame");
    c.send(json!({"type": "message", "text": "no id"})).await;
    assert_eq!(c.expect("error").await["code"], "bad_frame");
    c.send(json!({"type": "message", "client_msg_id": "has space", "text": "x"}))
        .await;
    assert_eq!(c.expect("error").await["code"], "bad_client_msg_id");
    c.send(json!({"type": "message", "client_msg_id": "e", "text": "  "}))
        .await;
    assert_eq!(c.expect("error").await["code"], "text_empty");
    c.send(json!({"type": "message", "client_msg_id": "long", "text": "字".repeat(101)}))
        .await;
    assert_eq!(c.expect("error").await["code"], "text_too_long");
    c.send(json!({"type": "hello"})).await;
    assert_eq!(c.expect("error").await["code"], "already_hello");
    c.nothing_pending().await;
    drop(c);

    // An oversize frame closes with 1009; a binary frame with 1003.
    let mut c = ChatClient::connect(&gw.http).await;
    c.hello(json!({})).await;
    c.send(json!({"type": "message", "client_msg_id": "big", "text": "x".repeat(1500)}))
        .await;
    assert_eq!(c.closed().await, Closed::Code(1009));
    let mut c = ChatClient::connect(&gw.http).await;
    c.hello(json!({})).await;
    use futures_util::SinkExt;
    c.ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![
        1u8, 2, 3,
    ]))
    .await
    .unwrap();
    assert_eq!(c.expect("error").await["code"], "binary_unsupported");
    assert_eq!(c.closed().await, Closed::Code(1003));

    // No hello in time: 1008. A message before hello: 1008.
    let mut c = ChatClient::connect(&gw.http).await;
    assert_eq!(c.expect("error").await["code"], "hello_required");
    assert_eq!(c.closed().await, Closed::Code(1008));
    let mut c = ChatClient::connect(&gw.http).await;
    c.send(json!({"type": "message", "client_msg_id": "x", "text": "x"}))
        .await;
    assert_eq!(c.expect("error").await["code"], "hello_required");
    assert_eq!(c.closed().await, Closed::Code(1008));

    // A ping flood closes with 1008.
    let mut c = ChatClient::connect(&gw.http).await;
    c.hello(json!({})).await;
    for _ in 0..100 {
        if c.ws
            .send(tokio_tungstenite::tungstenite::Message::Ping(
                Vec::new().into(),
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(c.closed().await, Closed::Code(1008));

    // Session cap: the fifth concurrent session is refused before the upgrade with 503.
    drop(c);
    gw.wait_metric("switchboard_chat_sessions", &[], 0.0).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut c = ChatClient::connect(&gw.http).await;
        c.hello(json!({})).await;
        open.push(c);
    }
    match ChatClient::try_connect(&gw.http).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            assert!(resp.headers().contains_key("retry-after"));
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("fifth session accepted over max_sessions = 4"),
    }
    // Not a websocket upgrade at all.
    let r = gw
        .client
        .get(format!("{}/v1/chat", gw.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let m = gw.metrics().await;
    for (reason, n) in [
        ("abuse", 2.0),
        ("too_big", 1.0),
        ("binary", 1.0),
        ("no_hello", 2.0),
    ] {
        assert_eq!(
            metric_value(&m, "switchboard_chat_closes_total", &[("reason", reason)]),
            n,
            "{reason}"
        );
    }
    assert_eq!(
        metric_value(&m, "switchboard_chat_sessions", &[]),
        4.0,
        "the open sessions"
    );
}

#[tokio::test]
async fn the_widget_page_is_served_with_a_strict_policy() {
    let gw = Gateway::start(&[]).await;
    let r = gw
        .client
        .get(format!("{}/chat", gw.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "text/html; charset=utf-8"
    );
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let body = r.text().await.unwrap();
    assert!(
        body.contains("/v1/chat"),
        "the page speaks to the chat route"
    );
    let r = gw
        .client
        .post(format!("{}/chat", gw.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn a_thousand_concurrent_sessions_each_get_their_ack() {
    let (gw, brokers, topic, _) = chat_gateway(&[
        (
            "SWITCHBOARD_LIMITS__PER_SOURCE__PER_SECOND",
            "100000".into(),
        ),
        ("SWITCHBOARD_LIMITS__PER_SOURCE__BURST", "100000".into()),
    ])
    .await;
    const N: usize = 1000;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(N + 1));
    let mut tasks = Vec::new();
    for i in 0..N {
        let http = gw.http.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = ChatClient::connect(&http).await;
            let w = c.hello(json!({})).await;
            let a = c.message("m", &format!("concurrent complaint {i}")).await;
            assert_eq!(a["duplicate"], false);
            // Hold the session open until every other one is open too.
            barrier.wait().await;
            barrier.wait().await;
            (
                w["session_id"].as_str().unwrap().to_string(),
                a["record_id"].as_str().unwrap().to_string(),
            )
        }));
    }
    barrier.wait().await;
    assert_eq!(
        gw.metric("switchboard_chat_sessions", &[]).await,
        N as f64,
        "all sessions open at once"
    );
    // A figure for the record (debug build), not an assertion: memory with N sessions open.
    if let Some(pid) = gw.child.id() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if let Some(rss) = status.lines().find(|l| l.starts_with("VmRSS")) {
            eprintln!("{N} chat sessions open: gateway {rss}");
        }
    }
    barrier.wait().await;
    let mut sessions = HashSet::new();
    let mut ids = HashSet::new();
    for t in tasks {
        let (s, id) = t.await.unwrap();
        sessions.insert(s);
        ids.insert(id);
    }
    assert_eq!(sessions.len(), N);
    assert_eq!(ids.len(), N);
    let records = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(records.len(), N);
    let found: HashSet<String> = records
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(found, ids, "every acknowledged message is in Kafka, once");
}

/// Two instances on the same topics and session secret: a session started on one resumes on the
/// other, which read the same replies and numbers them alike.
#[tokio::test]
async fn a_session_resumes_on_another_instance() {
    let (a, brokers, topic, replies) = chat_gateway(&[]).await;
    let b = Gateway::start(&[
        ("SWITCHBOARD_KAFKA__BROKERS", brokers.clone()),
        ("SWITCHBOARD_KAFKA__TOPIC", topic.clone()),
        ("SWITCHBOARD_KAFKA__REPLIES_TOPIC", replies.clone()),
        (
            "SWITCHBOARD_CHAT__SESSION_SECRETS",
            format!("[\"{}\"]", common::chat::SESSION_SECRET),
        ),
    ])
    .await;
    b.wait_ready(true).await;

    let mut c = ChatClient::connect(&a.http).await;
    let w = c.hello(json!({})).await;
    let sid = w["session_id"].as_str().unwrap().to_string();
    c.message("m-1", "instance A").await;
    produce_reply(
        &brokers,
        &replies,
        &sid,
        json!({"session_id": sid, "text": "r1"}),
    )
    .await;
    let r1 = c.expect("reply").await;
    drop(c);

    // Both instances read the reply; B numbers it as A did.
    b.wait_metric(
        "switchboard_chat_replies_total",
        &[("outcome", "queued")],
        1.0,
    )
    .await;
    let mut c = ChatClient::connect(&b.http).await;
    let w = c
        .hello(json!({"token": w["token"], "last_seq": r1["seq"]}))
        .await;
    assert_eq!(w["session_id"], sid.as_str());
    assert_eq!(w["resumed"], true);
    assert_eq!(w["last_seq"], r1["seq"]);
    c.nothing_pending().await;
    produce_reply(
        &brokers,
        &replies,
        &sid,
        json!({"session_id": sid, "text": "r2"}),
    )
    .await;
    let r2 = c.expect("reply").await;
    assert_eq!(r2["text"], "r2");
    assert!(r2["seq"].as_u64() > r1["seq"].as_u64());
    let ack = c.message("m-2", "instance B").await;
    assert_eq!(ack["duplicate"], false);
    let records = records_until_sentinel(&a, &brokers, &topic).await;
    assert_eq!(records.len(), 2);
    assert!(records
        .iter()
        .all(|r| r["conversation"]["thread_id"] == sid.as_str()));
}

/// A client that stops reading is cut after the write timeout instead of being buffered for.
#[tokio::test]
async fn a_client_that_never_reads_is_cut_not_buffered() {
    let (gw, brokers, _, replies) = chat_gateway(&[
        ("SWITCHBOARD_CHAT__WRITE_TIMEOUT_MS", "300".into()),
        ("SWITCHBOARD_CHAT__OUTBOX_MAX_REPLIES", "1000".into()),
        ("SWITCHBOARD_CHAT__MAX_REPLY_CHARS", "200000".into()),
    ])
    .await;
    let mut c = ChatClient::connect(&gw.http).await;
    let w = c.hello(json!({})).await;
    let sid = w["session_id"].as_str().unwrap().to_string();
    // 25 MB of replies: more than the socket buffers on both sides hold.
    let big = "x".repeat(100_000);
    let bodies = (0..250)
        .map(|i| json!({"session_id": sid, "text": big, "reply_id": format!("big{i}")}))
        .collect();
    common::chat::produce_replies(&brokers, &replies, &sid, bodies).await;
    gw.wait_metric(
        "switchboard_chat_closes_total",
        &[("reason", "slow_reader")],
        1.0,
    )
    .await;
    gw.wait_metric("switchboard_chat_sessions", &[], 0.0).await;
    drop(c);
}

/// Heartbeats, the idle timeout and the per-source limit on upgrades (no Kafka needed).
#[tokio::test]
async fn idle_and_silent_peers_are_closed_and_upgrade_storms_get_429() {
    let gw = Gateway::start(&[
        ("SWITCHBOARD_CHAT__IDLE_TIMEOUT_SECS", "1".into()),
        ("SWITCHBOARD_CHAT__HEARTBEAT_SECS", "1".into()),
    ])
    .await;
    // A client that reads (and so answers pings) but says nothing: closed as idle with 1000.
    let mut c = ChatClient::connect(&gw.http).await;
    c.hello(json!({})).await;
    assert_eq!(c.closed().await, Closed::Code(1000));

    // A client that never reads never answers a ping: dropped as a dead peer.
    let gw = Gateway::start(&[("SWITCHBOARD_CHAT__HEARTBEAT_SECS", "1".into())]).await;
    let mut c = ChatClient::connect(&gw.http).await;
    c.hello(json!({})).await;
    gw.wait_metric(
        "switchboard_chat_closes_total",
        &[("reason", "dead_peer")],
        1.0,
    )
    .await;
    drop(c);

    // Upgrades count against the source address's limit: a storm gets 429 + Retry-After.
    let gw = Gateway::start(&[
        ("SWITCHBOARD_LIMITS__PER_SOURCE__PER_SECOND", "0.1".into()),
        ("SWITCHBOARD_LIMITS__PER_SOURCE__BURST", "2".into()),
    ])
    .await;
    let _a = ChatClient::connect(&gw.http).await;
    let _b = ChatClient::connect(&gw.http).await;
    match ChatClient::try_connect(&gw.http).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 429);
            assert!(resp.headers().contains_key("retry-after"));
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("third upgrade accepted over a burst of 2"),
    }
}
