//! WeChat Official Account callbacks end to end against a real Kafka broker: URL verification,
//! plaintext pushes signed as WeChat signs them, safe-mode (AES) pushes including the
//! CHANNELS.md W3 fixture verbatim, encrypted passive replies decrypted here, dedupe on MsgId.

mod common;

use common::*;
use std::time::{Duration, Instant};
use switchboard::channels::wechat;

const XML: &str = "text/xml";
const PATH: &str = "/hooks/wechat";
const TOKEN: &str = "e2eWechatToken01";
const OPENID: &str = "oia2TjuEGTNoeX76QEjQNrcURxG8";
const OA: &str = "gh_7f083739789a";
const ZH_TEXT: &str = "家里宽带断网三天了😡，客服电话一直打不通！";

// CHANNELS.md W3.
const W3_TOKEN: &str = "pamtest";
const W3_APP: &str = "wxb11529c136998cb6";
const W3_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
const W3_QUERY: &str = "signature=76480565cbe296026c53aaacd1ad523a1ddba24f&timestamp=1409304348&nonce=xxxxxx&openid=oia2TjuEGTNoeX76QEjQNrcURxG8&encrypt_type=aes&msg_signature=a00ba440393ec2c109fcf41b1d761490322bf951";
const REPLY: &str = "已收到您的投诉，编号 {ref}";

fn now() -> String {
    chrono::Utc::now().timestamp().to_string()
}

/// `?signature=…&timestamp=…&nonce=…&openid=…` for a plaintext push, signed with `token`.
fn plain_query(token: &str, ts: &str, nonce: &str) -> String {
    let sig = wechat::sha1_signature(&[token, ts, nonce]);
    format!("signature={sig}&timestamp={ts}&nonce={nonce}&openid={OPENID}")
}

async fn post(gw: &Gateway, query: &str, body: &str) -> reqwest::Response {
    gw.post(&format!("{PATH}?{query}"), XML, &[], body.to_string())
        .await
}

async fn get(gw: &Gateway, query: &str) -> reqwest::Response {
    gw.client
        .get(format!("{}{PATH}?{query}", gw.http))
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn plaintext_mode_verifies_records_dedupes_and_rejects_forgeries() {
    let env = [("SWITCHBOARD_WECHAT__TOKENS", format!("[\"{TOKEN}\"]"))];
    let (gw, brokers, topic) = gateway_with_topic(1, &env).await;
    let validator = schema_validator();

    // URL verification (接入验证): echostr back verbatim; a wrong signature gets 403.
    let ts = now();
    let q = format!(
        "{}&echostr=6571340843491738129",
        plain_query(TOKEN, &ts, "1320562132")
    );
    let r = get(&gw, &q).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "6571340843491738129");
    let q = format!(
        "{}&echostr=6571340843491738129",
        plain_query("wrongToken", &ts, "1320562132")
    );
    let r = get(&gw, &q).await;
    assert_eq!(r.status(), 403);
    assert_ne!(r.text().await.unwrap(), "6571340843491738129");

    // A Chinese complaint with an emoji: `success`, well within WeChat's 5 s.
    let text = fixture("wechat/text_zh.xml");
    let started = Instant::now();
    let r = post(&gw, &plain_query(TOKEN, &now(), "77001"), &text).await;
    let elapsed = started.elapsed();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(r.text().await.unwrap(), "success");
    assert!(
        elapsed < Duration::from_secs(2),
        "reply took {elapsed:?}; WeChat gives up at 5 s"
    );

    // WeChat's retries (same MsgId, new nonce): `success` again, no second record.
    for n in ["77002", "77003"] {
        let r = post(&gw, &plain_query(TOKEN, &now(), n), &text).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "success");
    }

    // The other message types, each recorded.
    for name in [
        "voice.xml",
        "image.xml",
        "location.xml",
        "link.xml",
        "shortvideo.xml",
    ] {
        let body = fixture(&format!("wechat/{name}"));
        let r = post(&gw, &plain_query(TOKEN, &now(), "77100"), &body).await;
        assert_eq!(r.status(), 200, "{name}");
        assert_eq!(r.text().await.unwrap(), "success", "{name}");
    }

    // A subscribe event: acknowledged and counted, not a complaint.
    let r = post(
        &gw,
        &plain_query(TOKEN, &now(), "77200"),
        &fixture("wechat/subscribe.xml"),
    )
    .await;
    assert_eq!(r.text().await.unwrap(), "success");

    // Forgeries and junk: nothing recorded.
    let forged = text.replace("24571203348830123", "24571203348830999");
    let ts = now();
    let cases = [
        (plain_query("wrongToken", &ts, "1"), 403),
        (format!("timestamp={ts}&nonce=1&openid={OPENID}"), 403),
        // Correctly signed, but ten minutes old.
        (
            plain_query(
                TOKEN,
                &(chrono::Utc::now().timestamp() - 600).to_string(),
                "1",
            ),
            403,
        ),
    ];
    for (q, want) in cases {
        let r = post(&gw, &q, &forged).await;
        assert_eq!(r.status(), want, "{q}");
        assert_ne!(r.text().await.unwrap(), "success");
    }
    let r = post(
        &gw,
        &plain_query(TOKEN, &now(), "2"),
        "<xml><Content>unclosed",
    )
    .await;
    assert_eq!(r.status(), 400);
    let r = post(
        &gw,
        &plain_query(TOKEN, &now(), "3"),
        "<!DOCTYPE x [<!ENTITY e \"x\">]><xml><Content>&e;</Content></xml>",
    )
    .await;
    assert_eq!(r.status(), 400);

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 6, "{recs:#?}");
    for r in &recs {
        assert_valid(&validator, r);
        assert_eq!(r["channel"], "social");
        assert_eq!(r["provider"], "wechat");
        assert_eq!(r["customer"]["key"], format!("wechat:{OA}:{OPENID}"));
        assert_eq!(r["customer"]["social"]["platform"], "wechat");
        assert_eq!(r["customer"]["social"]["account"], OA);
        assert_eq!(r["customer"]["social"]["id"], OPENID);
    }
    let t = &recs[0];
    assert_eq!(t["provider_message_id"], "24571203348830123");
    assert_eq!(t["content"]["text"], ZH_TEXT);
    assert_eq!(
        t["content"]["text"].as_str().unwrap().as_bytes(),
        ZH_TEXT.as_bytes()
    );
    assert_eq!(t["metadata"]["occurred_at"], "2024-05-20T02:15:03.000Z");
    assert_eq!(t["metadata"]["msg_type"], "text");

    let v = &recs[1];
    assert_eq!(v["provider_message_id"], "24571203348830124");
    assert_eq!(v["content"]["text"], "手机没有信号，打不了电话");
    assert_eq!(
        v["content"]["voice"]["transcription"],
        "手机没有信号，打不了电话"
    );
    assert_eq!(
        v["metadata"]["media_id"],
        "Wv7K3mVhU0LtQe2w0yXbJ8aSgK1pZrTnGfD4cE5hB6iM9oN"
    );
    let img = &recs[2];
    assert_eq!(
        img["content"]["attachments"][0]["url"],
        "http://mmbiz.qpic.cn/mmbiz_jpg/abc123/0"
    );
    let loc = &recs[3];
    assert_eq!(loc["metadata"]["location_lat"], "23.134521");
    assert_eq!(loc["metadata"]["location_label"], "广州市天河区体育西路");
    let link = &recs[4];
    assert_eq!(
        link["metadata"]["link_url"],
        "https://example.com/bill?id=1&month=5"
    );
    assert_eq!(recs[5]["metadata"]["msg_type"], "shortvideo");

    assert_eq!(
        gw.metric(
            "switchboard_dedupe_hits_total",
            &[("channel", "wechat"), ("kind", "provider_id")]
        )
        .await,
        2.0
    );
    assert_eq!(
        gw.metric(
            wechat::IGNORED,
            &[("channel", "wechat"), ("kind", "event_subscribe")]
        )
        .await,
        1.0
    );
    gw.assert_log_has_none_of(&[OPENID, ZH_TEXT, "宽带断网"]);
}

/// Reads the encrypted passive reply: checks its MsgSignature, decrypts it, returns the inner
/// fields.
fn open_reply(body: &str) -> wechat::Fields {
    let env = wechat::parse_xml(body).expect("reply is XML");
    let enc = env.get("Encrypt").expect("Encrypt");
    let ts = env.get("TimeStamp").expect("TimeStamp");
    let nonce = env.get("Nonce").expect("Nonce");
    assert_eq!(
        env.get("MsgSignature").expect("MsgSignature"),
        wechat::sha1_signature(&[W3_TOKEN, ts, nonce, enc]),
        "reply signature"
    );
    let age = chrono::Utc::now().timestamp() - ts.parse::<i64>().unwrap();
    assert!((0..60).contains(&age), "reply TimeStamp is now");
    let key = wechat::decode_aes_key(W3_KEY).unwrap();
    let inner = wechat::decrypt(&key, W3_APP, enc).expect("reply decrypts");
    assert!(inner.len() <= 2048);
    wechat::parse_xml(&inner).expect("inner reply is XML")
}

/// A safe-mode push of `xml`, signed now.
fn safe_push(xml: &str, app_id: &str) -> (String, String) {
    let key = wechat::decode_aes_key(W3_KEY).unwrap();
    let enc = wechat::encrypt(&key, app_id, xml).unwrap();
    let ts = now();
    let nonce = "4815162342";
    let sig = wechat::sha1_signature(&[W3_TOKEN, &ts, nonce]);
    let msig = wechat::sha1_signature(&[W3_TOKEN, &ts, nonce, &enc]);
    (
        format!("signature={sig}&timestamp={ts}&nonce={nonce}&openid={OPENID}&encrypt_type=aes&msg_signature={msig}"),
        format!("<xml><ToUserName><![CDATA[{OA}]]></ToUserName><Encrypt><![CDATA[{enc}]]></Encrypt></xml>"),
    )
}

#[tokio::test]
async fn safe_mode_decrypts_and_answers_with_an_encrypted_passive_reply() {
    let env = [
        ("SWITCHBOARD_WECHAT__TOKENS", format!("[\"{W3_TOKEN}\"]")),
        ("SWITCHBOARD_WECHAT__APP_ID", W3_APP.to_string()),
        (
            "SWITCHBOARD_WECHAT__ENCODING_AES_KEYS",
            format!("[\"{W3_KEY}\"]"),
        ),
        ("SWITCHBOARD_WECHAT__ENCRYPTION", "safe".to_string()),
        ("SWITCHBOARD_WECHAT__PASSIVE_REPLY", format!("\"{REPLY}\"")),
        // The W3 fixture is signed with a 2014 timestamp and is replayed verbatim below.
        ("SWITCHBOARD_WECHAT__TIMESTAMP_TOLERANCE_SECS", "0".into()),
    ];
    let (gw, brokers, topic) = gateway_with_topic(1, &env).await;
    let validator = schema_validator();

    // CHANNELS.md W3 exactly as documented.
    let w3 = fixture("wechat/safe_w3.xml");
    let started = Instant::now();
    let r = post(&gw, W3_QUERY, &w3).await;
    let elapsed = started.elapsed();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/xml"));
    assert!(elapsed < Duration::from_secs(2), "reply took {elapsed:?}");
    let reply = open_reply(&r.text().await.unwrap());
    assert_eq!(reply.get("ToUserName"), Some(OPENID));
    assert_eq!(reply.get("FromUserName"), Some(OA));
    assert_eq!(reply.get("MsgType"), Some("text"));
    let content = reply.get("Content").unwrap().to_string();
    let w3_ref = content
        .strip_prefix("已收到您的投诉，编号 ")
        .unwrap_or_else(|| panic!("{content}"))
        .to_string();
    assert_eq!(w3_ref.len(), 8);

    // A retry of W3: the same reference, no second record.
    let r = post(&gw, W3_QUERY, &w3).await;
    assert_eq!(r.status(), 200);
    let again = open_reply(&r.text().await.unwrap());
    assert_eq!(again.get("Content"), Some(content.as_str()));

    // A fresh encrypted complaint with an emoji.
    let xml = format!(
        "<xml><ToUserName><![CDATA[{OA}]]></ToUserName><FromUserName><![CDATA[{OPENID}]]></FromUserName><CreateTime>1716171303</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[{ZH_TEXT}]]></Content><MsgId>24571203348830500</MsgId></xml>"
    );
    let (q, body) = safe_push(&xml, W3_APP);
    let r = post(&gw, &q, &body).await;
    assert_eq!(r.status(), 200);
    let fresh_ref = open_reply(&r.text().await.unwrap())
        .get("Content")
        .unwrap()
        .trim_start_matches("已收到您的投诉，编号 ")
        .to_string();

    // Refused: msg_signature computed without Encrypt; a tampered ciphertext; another AppID;
    // a plaintext push (safe mode takes only ciphertext).
    let tampered_xml = xml.replace("24571203348830500", "24571203348830501");
    let (q, body) = safe_push(&tampered_xml, W3_APP);
    let ts = now();
    let no_encrypt_sig = wechat::sha1_signature(&[W3_TOKEN, &ts, "1"]);
    let r = post(
        &gw,
        &format!("timestamp={ts}&nonce=1&encrypt_type=aes&msg_signature={no_encrypt_sig}"),
        &body,
    )
    .await;
    assert_eq!(r.status(), 403);
    let flipped = body.replacen("<Encrypt><![CDATA[", "<Encrypt><![CDATA[A", 1);
    let r = post(&gw, &q, &flipped).await;
    assert_eq!(r.status(), 403);
    let (q, body) = safe_push(&tampered_xml, "wx0000000000000000");
    let r = post(&gw, &q, &body).await;
    assert_eq!(r.status(), 403);
    let r = post(
        &gw,
        &plain_query(W3_TOKEN, &now(), "5"),
        &fixture("wechat/text_zh.xml"),
    )
    .await;
    assert_eq!(r.status(), 403);
    assert_ne!(r.text().await.unwrap(), "success");

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 2, "{recs:#?}");
    for r in &recs {
        assert_valid(&validator, r);
        assert_eq!(r["channel"], "social");
        assert_eq!(r["provider"], "wechat");
        assert_eq!(r["customer"]["key"], format!("wechat:{OA}:{OPENID}"));
        assert_eq!(r["metadata"]["wechat_encrypted"], "true");
    }
    assert_eq!(recs[0]["provider_message_id"], "6054768590064713728");
    assert_eq!(recs[0]["content"]["text"], "宽带断网三天了");
    assert_eq!(
        recs[0]["metadata"]["occurred_at"],
        "2014-08-11T07:50:23.000Z"
    );
    assert!(recs[0]["id"].as_str().unwrap().ends_with(&w3_ref));
    assert_eq!(recs[1]["provider_message_id"], "24571203348830500");
    assert_eq!(recs[1]["content"]["text"], ZH_TEXT);
    assert!(recs[1]["id"].as_str().unwrap().ends_with(&fresh_ref));
    gw.assert_log_has_none_of(&[OPENID, ZH_TEXT, "宽带断网"]);
}
