//! Telegram, X and Weibo end to end against a real Kafka broker: provider-format requests in
//! (authenticated as each provider does it), provider-format replies out, records in Kafka.

mod common;

use common::*;

const JSON: &str = "application/json";

// ---------------------------------------------------------------------------------------------
// Telegram

const TG_SECRET: &str = "S3cr3t_Token-123";
const TG_OLD: &str = "previous_token-0";
const TG_BOT: &str = "123456789";

fn tg_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "SWITCHBOARD_TELEGRAM__SECRET_TOKENS",
            format!("[\"{TG_SECRET}\",\"{TG_OLD}\"]"),
        ),
        ("SWITCHBOARD_TELEGRAM__BOT_ID", format!("\"{TG_BOT}\"")),
    ]
}

async fn tg_post(gw: &Gateway, body: &str, secret: Option<&str>) -> reqwest::Response {
    let headers: Vec<(&str, String)> = secret
        .map(|s| vec![("x-telegram-bot-api-secret-token", s.to_string())])
        .unwrap_or_default();
    gw.post("/hooks/telegram", JSON, &headers, body.to_string())
        .await
}

#[tokio::test]
async fn telegram_updates_are_recorded_deduped_and_authenticated() {
    let (gw, brokers, topic) = gateway_with_topic(1, &tg_env()).await;
    let validator = schema_validator();
    let msg = fixture("telegram/message_zh.json");

    // Forged or missing secret: 403, nothing recorded (a distinct update, so dedupe can't hide it).
    let forged = msg.replace("10001", "19999").replace("三天", "五天");
    for secret in [Some("S3cr3t_Token-124"), None, Some("")] {
        let r = tg_post(&gw, &forged, secret).await;
        assert_eq!(r.status(), 403, "{secret:?}");
    }

    let r = tg_post(&gw, &msg, Some(TG_SECRET)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "");
    // Telegram's redelivery (same update_id): same answer, no second record.
    let r = tg_post(&gw, &msg, Some(TG_SECRET)).await;
    assert_eq!(r.status(), 200);
    for f in [
        "edited",
        "voice",
        "photo_caption",
        "contact_own",
        "channel_post",
    ] {
        // The previous secret is still accepted during rotation.
        let r = tg_post(&gw, &fixture(&format!("telegram/{f}.json")), Some(TG_OLD)).await;
        assert_eq!(r.status(), 200, "{f}");
    }
    // The edit redelivered: still one record of it.
    let r = tg_post(&gw, &fixture("telegram/edited.json"), Some(TG_SECRET)).await;
    assert_eq!(r.status(), 200);
    // Wrong method and type.
    let r = gw
        .post(
            "/hooks/telegram",
            "text/plain",
            &[("x-telegram-bot-api-secret-token", TG_SECRET.to_string())],
            msg.clone(),
        )
        .await;
    assert_eq!(r.status(), 415);

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 5, "{recs:#?}");
    for r in &recs {
        assert_valid(&validator, r);
        assert_eq!(r["channel"], "social");
        assert_eq!(r["provider"], "telegram");
        assert_eq!(r["customer"]["social"]["platform"], "telegram");
        assert_eq!(r["customer"]["social"]["account"], TG_BOT);
    }
    let m = &recs[0];
    assert_eq!(m["provider_message_id"], "update:10001");
    assert_eq!(m["content"]["text"], "宽带断网了，已经三天");
    assert_eq!(m["customer"]["key"], "telegram:123456789:1111111");
    assert_eq!(m["customer"]["social"]["id"], "1111111");
    assert_eq!(m["customer"]["social"]["handle"], "Test");
    assert_eq!(m["customer"]["name"], "Test Test Lastname");
    assert_eq!(m["conversation"]["thread_id"], "1111111");
    assert_eq!(m["metadata"]["occurred_at"], "2023-11-14T22:13:20.000Z");
    assert_eq!(m["metadata"]["chat_type"], "private");

    let e = &recs[1];
    assert_eq!(e["provider_message_id"], "edit:1111111:1366:1700000100");
    assert_eq!(e["content"]["text"], "宽带断网了，已经三天（更正：四天）");
    assert_eq!(e["conversation"]["thread_id"], "1111111");
    assert_eq!(e["metadata"]["edited"], "true");
    assert_eq!(e["customer"]["key"], m["customer"]["key"]);

    let v = &recs[2];
    assert_eq!(v["provider_message_id"], "update:10003");
    assert_eq!(v["content"]["text"], "");
    assert_eq!(
        v["content"]["voice"]["recording_url"],
        "tg-file:AwACAgIAAxkBAAIBVoice"
    );
    assert_eq!(v["content"]["attachments"][0]["content_type"], "audio/ogg");
    assert_eq!(v["customer"]["name"], "李 雷");

    let p = &recs[3];
    assert_eq!(p["content"]["text"], "路由器指示灯一直闪红灯 🔴");
    assert_eq!(p["content"]["attachments"][0]["url"], "tg-file:PHOTO-LARGE");
    assert_eq!(p["content"]["attachments"][1]["name"], "账单.pdf");
    assert_eq!(p["customer"]["social"]["handle"], "lilei");

    let c = &recs[4];
    assert_eq!(c["customer"]["key"], "+8613800138000");
    assert_eq!(c["customer"]["phone"], "+8613800138000");
    assert_eq!(c["customer"]["social"]["id"], "2222222");
    assert_eq!(c["metadata"]["contact"], "own");

    gw.assert_log_has_none_of(&["宽带断网", "13800138000", "1111111", "2222222", TG_SECRET]);
}

// ---------------------------------------------------------------------------------------------
// X

const X_SECRET: &str = "z3ZX4v7mAAUGykl3EcmkqbartmuW8VFOOzCloLx9Q45P0hLrFu";
const X_OLD: &str = "previous-consumer-secret-0123456789";

fn x_env() -> Vec<(&'static str, String)> {
    vec![(
        "SWITCHBOARD_X__CONSUMER_SECRETS",
        format!("[\"{X_SECRET}\",\"{X_OLD}\"]"),
    )]
}

async fn x_post(gw: &Gateway, body: &str, secret: &str) -> reqwest::Response {
    let sig = switchboard::channels::x::sign(secret, body.as_bytes());
    gw.post(
        "/hooks/x",
        JSON,
        &[("x-twitter-webhooks-signature", sig)],
        body.to_string(),
    )
    .await
}

#[tokio::test]
async fn x_crc_and_direct_messages() {
    let (gw, brokers, topic) = gateway_with_topic(1, &x_env()).await;
    let validator = schema_validator();

    // CRC: CHANNELS.md X0, exact body.
    let r = gw
        .client
        .get(format!(
            "{}/hooks/x?crc_token=9b4507b3-9040-4669-9ca3-6b94edb50553",
            gw.http
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"response_token":"sha256=Cytd4Sq+NvEcV3MMrXxWJGJx5A+y/lXzzU2Maartkx8="}"#
    );
    let r = gw
        .client
        .get(format!("{}/hooks/x", gw.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // X1 with its documented signature header, byte for byte.
    let x1 = fixture("x/dm_x1.json");
    let r = gw
        .post(
            "/hooks/x",
            JSON,
            &[(
                "x-twitter-webhooks-signature",
                "sha256=G2bUGiFy7cbMVIEgVAUw6eirgeqyenZxllvwY48Vm3c=".to_string(),
            )],
            x1.clone(),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "");
    // Retry: same event id, still 200, no second record.
    assert_eq!(x_post(&gw, &x1, X_SECRET).await.status(), 200);

    // Forgeries: another secret, tampered body, missing header, wrong scheme.
    let batch = fixture("x/dm_batch.json");
    assert_eq!(x_post(&gw, &batch, "not-the-secret").await.status(), 403);
    let sig = switchboard::channels::x::sign(X_SECRET, batch.as_bytes());
    let tampered = batch.replace("三天", "四天");
    let r = gw
        .post(
            "/hooks/x",
            JSON,
            &[("x-twitter-webhooks-signature", sig.clone())],
            tampered,
        )
        .await;
    assert_eq!(r.status(), 403);
    let r = gw.post("/hooks/x", JSON, &[], batch.clone()).await;
    assert_eq!(r.status(), 403);
    let r = gw
        .post(
            "/hooks/x",
            JSON,
            &[(
                "x-twitter-webhooks-signature",
                sig.replace("sha256=", "sha1="),
            )],
            batch.clone(),
        )
        .await;
    assert_eq!(r.status(), 403);

    // The batch, signed with the previous secret (rotation), then redelivered.
    assert_eq!(x_post(&gw, &batch, X_OLD).await.status(), 200);
    assert_eq!(x_post(&gw, &batch, X_SECRET).await.status(), 200);
    // Events without DMs are acknowledged.
    let likes = r#"{"for_user_id":"4337869213","favorite_events":[{"id":"a1"}]}"#;
    assert_eq!(x_post(&gw, likes, X_SECRET).await.status(), 200);

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 4, "{recs:#?}");
    for r in &recs {
        assert_valid(&validator, r);
        assert_eq!(r["channel"], "social");
        assert_eq!(r["provider"], "x");
        assert_eq!(r["customer"]["social"]["platform"], "x");
        assert_eq!(r["customer"]["social"]["account"], "4337869213");
    }
    let ids: Vec<&str> = recs
        .iter()
        .map(|r| r["provider_message_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "954491830116155396",
            "1800000000000000001",
            "1800000000000000003",
            "1800000000000000004"
        ]
    );
    assert_eq!(recs[0]["content"]["text"], "Hello World!");
    assert_eq!(recs[0]["customer"]["key"], "x:4337869213:3001969357");
    assert_eq!(
        recs[0]["conversation"]["thread_id"],
        "3001969357-4337869213"
    );
    assert_eq!(
        recs[0]["metadata"]["occurred_at"],
        "2018-01-19T23:12:40.557Z"
    );
    assert_eq!(recs[1]["content"]["text"], "家里宽带断网三天了😡");
    assert_eq!(recs[1]["customer"]["social"]["handle"], "zhang_wei");
    assert_eq!(recs[1]["customer"]["name"], "张伟");
    assert_eq!(recs[2]["content"]["text"], "الإنترنت لا يعمل منذ يومين");
    assert_eq!(recs[2]["customer"]["name"], "سارة");
    assert_eq!(
        recs[3]["content"]["text"],
        "Billing is wrong again 💸 https://t.co/abc123"
    );
    assert_eq!(
        recs[3]["content"]["attachments"][0]["url"],
        "https://ton.twitter.com/1.1/ton/data/dm/1111/2222/abc.jpg"
    );
    assert!(recs
        .iter()
        .all(|r| r["customer"]["social"]["id"] != "4337869213"));

    gw.assert_log_has_none_of(&["宽带断网", "3001969357", "1111111111", X_SECRET]);
}

// ---------------------------------------------------------------------------------------------
// Weibo

const WB_SECRET: &str = "xyz123xyz";
const WB_QUERY: &str =
    "nonce=57155157&timestamp=1397022061823&signature=90e4c22c90a58f26526c2dd5b6c56c8822edeaa1";

fn wb_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "SWITCHBOARD_WEIBO__APP_SECRETS",
            format!("[\"{WB_SECRET}\",\"previous-app-secret\"]"),
        ),
        // The documented example query is from 2014; the freshness window is a unit test.
        ("SWITCHBOARD_WEIBO__TIMESTAMP_TOLERANCE_SECS", "0".into()),
    ]
}

async fn wb_post(gw: &Gateway, query: &str, body: &str) -> reqwest::Response {
    gw.post(
        &format!("/hooks/weibo?{query}"),
        JSON,
        &[],
        body.to_string(),
    )
    .await
}

#[tokio::test]
async fn weibo_verification_and_message_push() {
    let (gw, brokers, topic) = gateway_with_topic(1, &wb_env()).await;
    let validator = schema_validator();

    // WB0: echo, verbatim.
    let r = gw
        .client
        .get(format!(
            "{}/hooks/weibo?nonce=57155157&timestamp=1397022061823&echostr=dnPdpTZz85&signature=90e4c22c90a58f26526c2dd5b6c56c8822edeaa1",
            gw.http
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "dnPdpTZz85");
    let r = gw
        .client
        .get(format!(
            "{}/hooks/weibo?nonce=57155158&timestamp=1397022061823&echostr=dnPdpTZz85&signature=90e4c22c90a58f26526c2dd5b6c56c8822edeaa1",
            gw.http
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Forged pushes: nothing recorded.
    let wb1 = fixture("weibo/text_wb1.json");
    let forged = wb1.replace("私信或留言内容", "伪造的投诉");
    let bad_sig = WB_QUERY.replace("90e4c22c", "90e4c22d");
    assert_eq!(wb_post(&gw, &bad_sig, &forged).await.status(), 403);
    assert_eq!(wb_post(&gw, "", &forged).await.status(), 403);
    let other = format!(
        "nonce=1&timestamp=2&signature={}",
        switchboard::channels::weibo::signature("not-the-secret", "2", "1")
    );
    assert_eq!(wb_post(&gw, &other, &forged).await.status(), 403);

    // WB1, then Weibo's retry of it: one record, both answered with an empty 200.
    let r = wb_post(&gw, WB_QUERY, &wb1).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "");
    assert_eq!(wb_post(&gw, WB_QUERY, &wb1).await.status(), 200);
    // Other types; the previous secret signs the mention (rotation).
    for f in ["voice", "position", "event_follow"] {
        let r = wb_post(&gw, WB_QUERY, &fixture(&format!("weibo/{f}.json"))).await;
        assert_eq!(r.status(), 200, "{f}");
    }
    let rotated = format!(
        "nonce=777&timestamp=1700000000&signature={}",
        switchboard::channels::weibo::signature("previous-app-secret", "1700000000", "777")
    );
    let r = wb_post(&gw, &rotated, &fixture("weibo/mention.json")).await;
    assert_eq!(r.status(), 200);

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 4, "{recs:#?}");
    for r in &recs {
        assert_valid(&validator, r);
        assert_eq!(r["channel"], "social");
        assert_eq!(r["provider"], "weibo");
        assert_eq!(r["customer"]["social"]["platform"], "weibo");
        assert_eq!(r["customer"]["social"]["account"], "1902538057");
        assert_eq!(r["metadata"]["provider_message_id_source"], "content_hash");
        assert!(r["provider_message_id"]
            .as_str()
            .unwrap()
            .starts_with("hash:"));
    }
    let t = &recs[0];
    assert_eq!(t["content"]["text"], "私信或留言内容");
    assert_eq!(t["customer"]["key"], "weibo:1902538057:2489518277");
    assert_eq!(t["conversation"]["thread_id"], "1902538057:2489518277");
    assert_eq!(t["metadata"]["occurred_at"], "2012-07-16T10:09:20.000Z");
    assert_eq!(
        t["provider_message_id"],
        switchboard::channels::weibo::content_id(
            "2489518277",
            "Mon Jul 16 18:09:20 +0800 2012",
            "text",
            "私信或留言内容",
            "{}"
        )
    );
    assert_eq!(
        recs[1]["content"]["voice"]["recording_url"],
        "weibo-file:821804469"
    );
    assert_eq!(recs[2]["metadata"]["data.longitude"], "116.308586");
    assert_eq!(
        recs[2]["content"]["text"],
        "我在这里，这里完全没有信号：http://t.cn/zQgLLMx"
    );
    assert_eq!(
        recs[3]["content"]["text"],
        "@某某电信客服 5G信号太差了，打电话一直掉线📵 #投诉#"
    );
    assert_eq!(recs[3]["customer"]["social"]["id"], "3210987654");

    gw.assert_log_has_none_of(&["私信或留言内容", "2489518277", "3210987654", WB_SECRET]);
}

/// A provider nobody configured is off: its route is not mounted (no shipped secret can be used).
#[tokio::test]
async fn unconfigured_social_providers_answer_404() {
    let gw = Gateway::start(&[]).await;
    for path in [
        "/hooks/meta",
        "/hooks/telegram",
        "/hooks/x",
        "/hooks/weibo",
        "/hooks/wechat",
    ] {
        let r = gw.post(path, JSON, &[], "{}".to_string()).await;
        assert_eq!(r.status(), 404, "{path}");
    }
}
