//! Voice IVR and SMS channels end to end against a real Kafka broker: provider-format requests
//! in (signed as each provider signs), provider-format replies out, records in `complaints.v1`.

mod common;

use common::*;
use switchboard::channels::{alibaba, smpp, twilio, vonage};

const FORM: &str = "application/x-www-form-urlencoded";
const TOKEN: &str = "12345";
const PUBLIC: &str = "https://gateway.example.com";

fn pairs(s: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(s.as_bytes()).into_owned().collect()
}

fn encode(p: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(p)
        .finish()
}

async fn twilio_post(
    gw: &Gateway,
    path_and_query: &str,
    body: &str,
    token: &str,
) -> reqwest::Response {
    let sig = twilio::compute_signature(token, &format!("{PUBLIC}{path_and_query}"), &pairs(body));
    gw.post(
        path_and_query,
        FORM,
        &[("x-twilio-signature", sig)],
        body.to_string(),
    )
    .await
}

fn twilio_env() -> Vec<(&'static str, String)> {
    vec![
        ("SWITCHBOARD_TWILIO__AUTH_TOKENS", format!("[\"{TOKEN}\"]")),
        ("SWITCHBOARD_TWILIO__PUBLIC_URL", PUBLIC.into()),
        (
            "SWITCHBOARD_TWILIO__SMS_AUTO_REPLY",
            "\"已收到您的投诉，编号 {ref}\"".into(),
        ),
    ]
}

#[tokio::test]
async fn twilio_sms_records_replies_dedupes_and_rejects_bad_signatures() {
    let (gw, brokers, topic) = gateway_with_topic(1, &twilio_env()).await;
    let validator = schema_validator();
    let t2 = fixture("twilio/sms_t2.form");
    let t2 = t2.trim();

    let r = twilio_post(&gw, "/hooks/twilio/sms", t2, TOKEN).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/xml");
    let reply = r.text().await.unwrap();
    assert!(
        reply.starts_with(
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Message>已收到您的投诉，编号 "#
        ),
        "{reply}"
    );

    // Twilio's connection retry: same MessageSid, same answer, no second record.
    let again = twilio_post(&gw, "/hooks/twilio/sms", t2, TOKEN)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(again, reply);

    // A Chinese MMS with two media items.
    let mms = encode(&[
        (
            "MessageSid".into(),
            "MM5ef8732a3c49700934481addd5ce1659".into(),
        ),
        (
            "AccountSid".into(),
            "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX".into(),
        ),
        ("From".into(), "+8613800138000".into()),
        ("To".into(), "+14155550100".into()),
        (
            "Body".into(),
            "家里宽带断网三天了😡，客服电话一直打不通！".into(),
        ),
        ("NumMedia".into(), "2".into()),
        ("MediaContentType0".into(), "image/jpeg".into()),
        (
            "MediaUrl0".into(),
            "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1".into(),
        ),
        ("MediaContentType1".into(), "image/png".into()),
        (
            "MediaUrl1".into(),
            "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME2".into(),
        ),
    ]);
    assert_eq!(
        twilio_post(&gw, "/hooks/twilio/sms", &mms, TOKEN)
            .await
            .status(),
        200
    );

    // Forged: signed with another token; and a body changed after signing.
    let r = twilio_post(&gw, "/hooks/twilio/sms", t2, "not-the-token").await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["content-type"], "text/xml");
    let sig = twilio::compute_signature(TOKEN, &format!("{PUBLIC}/hooks/twilio/sms"), &pairs(t2));
    let tampered = t2.replace("3+days", "4+days");
    let r = gw
        .post(
            "/hooks/twilio/sms",
            FORM,
            &[("x-twilio-signature", sig)],
            tampered,
        )
        .await;
    assert_eq!(r.status(), 403);
    let r = gw
        .post("/hooks/twilio/sms", FORM, &[], t2.to_string())
        .await;
    assert_eq!(r.status(), 403);

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 2, "{recs:?}");
    for r in &recs {
        assert_valid(&validator, r);
        assert_eq!(r["channel"], "sms");
        assert_eq!(r["provider"], "twilio");
    }
    let sms = &recs[0];
    assert_eq!(
        sms["provider_message_id"],
        "SM1b3c5e7a9d1f3b5c7e9a1c3e5f7b9d1a"
    );
    assert_eq!(sms["customer"]["key"], "+14155550123");
    assert_eq!(
        sms["content"]["text"],
        "My broadband has been down for 3 days"
    );
    let reference = &sms["id"].as_str().unwrap()[18..];
    assert!(
        reply.contains(reference),
        "reply carries the record reference"
    );
    let mms = &recs[1];
    assert_eq!(
        mms["content"]["text"],
        "家里宽带断网三天了😡，客服电话一直打不通！"
    );
    assert_eq!(mms["customer"]["key"], "+8613800138000");
    assert_eq!(mms["content"]["attachments"].as_array().unwrap().len(), 2);
    assert_eq!(
        mms["content"]["attachments"][1]["content_type"],
        "image/png"
    );

    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "switchboard_rejections_total",
            &[("channel", "twilio"), ("reason", "bad_signature")]
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &m,
            "switchboard_rejections_total",
            &[("channel", "twilio"), ("reason", "missing_signature")]
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "switchboard_dedupe_hits_total",
            &[("channel", "twilio")]
        ),
        1.0
    );
    gw.assert_log_has_none_of(&["4155550123", "13800138000", "宽带断网"]);
}

#[tokio::test]
async fn twilio_json_body_variant_is_verified_by_body_hash() {
    let (gw, brokers, topic) = gateway_with_topic(1, &twilio_env()).await;
    let body = r#"{"MessageSid":"SMjson0000000000000000000000000001","AccountSid":"AC1","From":"+14155552671","Body":"json variant"}"#;
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes()));
    let path = format!("/hooks/twilio/sms?bodySHA256={hash}");
    let sig = twilio::compute_signature(TOKEN, &format!("{PUBLIC}{path}"), &[]);
    let r = gw
        .post(
            &path,
            "application/json",
            &[("x-twilio-signature", sig.clone())],
            body,
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = gw
        .post(
            &path,
            "application/json",
            &[("x-twilio-signature", sig)],
            body.replace("variant", "VARIANT"),
        )
        .await;
    assert_eq!(r.status(), 403, "body no longer matches bodySHA256");
    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["content"]["text"], "json variant");
}

#[tokio::test]
async fn twilio_ivr_call_steps_become_records_with_twiml_replies() {
    let (gw, brokers, topic) = gateway_with_topic(1, &twilio_env()).await;
    let call = |extra: &[(&str, &str)]| {
        let mut p: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("AccountSid", "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"),
            ("From", "+8613900139000"),
            ("To", "+8610000"),
            ("CallStatus", "in-progress"),
            ("Direction", "inbound"),
            ("ApiVersion", "2010-04-01"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        p.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        encode(&p)
    };

    // The call comes in: a menu.
    let r = twilio_post(&gw, "/hooks/twilio/voice", &call(&[]), TOKEN).await;
    assert_eq!(r.status(), 200);
    let twiml = r.text().await.unwrap();
    assert!(
        twiml.contains(r#"<Gather input="dtmf speech""#)
            && twiml.contains(r#"action="/hooks/twilio/voice/gather""#),
        "{twiml}"
    );

    // Key 1 (network): asked to record, with the menu choice carried on the callbacks.
    let twiml = twilio_post(
        &gw,
        "/hooks/twilio/voice/gather",
        &call(&[("Digits", "1")]),
        TOKEN,
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(
        twiml.contains(r#"<Record action="/hooks/twilio/voice/record?menu=1""#),
        "{twiml}"
    );
    assert!(twiml.contains(r#"transcribeCallback="/hooks/twilio/voice/transcription?menu=1""#));

    // The recording: a record, and the caller hears the reference.
    let rec = call(&[
        ("RecordingSid", "RE0123456789abcdef0123456789abcdef"),
        ("RecordingUrl", "https://api.twilio.com/2010-04-01/Accounts/AC1/Recordings/RE0123456789abcdef0123456789abcdef"),
        ("RecordingDuration", "42"),
        ("Digits", "#"),
    ]);
    let r = twilio_post(&gw, "/hooks/twilio/voice/record?menu=1", &rec, TOKEN).await;
    let twiml = r.text().await.unwrap();
    assert!(
        twiml.contains("您的投诉已受理，编号 ") && twiml.ends_with("<Hangup/></Response>"),
        "{twiml}"
    );
    // The recording status callback for the same recording collapses into that record.
    let status = call(&[
        ("RecordingSid", "RE0123456789abcdef0123456789abcdef"),
        ("RecordingUrl", "https://api.twilio.com/2010-04-01/Accounts/AC1/Recordings/RE0123456789abcdef0123456789abcdef"),
        ("RecordingStatus", "completed"),
        ("RecordingDuration", "42"),
    ]);
    assert_eq!(
        twilio_post(
            &gw,
            "/hooks/twilio/voice/recording-status?menu=1",
            &status,
            TOKEN
        )
        .await
        .status(),
        200
    );
    // The transcription: a second record of the same call, with the text.
    let tr = call(&[
        ("TranscriptionSid", "TR0123456789abcdef0123456789abcdef"),
        ("TranscriptionText", "My internet is down since Monday"),
        ("TranscriptionStatus", "completed"),
        ("RecordingSid", "RE0123456789abcdef0123456789abcdef"),
    ]);
    assert_eq!(
        twilio_post(&gw, "/hooks/twilio/voice/transcription?menu=1", &tr, TOKEN)
            .await
            .status(),
        200
    );
    assert_eq!(
        twilio_post(&gw, "/hooks/twilio/voice/transcription?menu=1", &tr, TOKEN)
            .await
            .status(),
        200
    );

    // Another call, where the caller speaks the complaint at the menu after pressing 2.
    let speech = call(&[
        ("CallSid", "CA99"),
        ("SpeechResult", "这个月话费多扣了五十元"),
        ("Confidence", "0.92"),
        ("Digits", "2"),
    ])
    .replace("CallSid=CA1234567890ABCDE&", "");
    let twiml = twilio_post(&gw, "/hooks/twilio/voice/gather", &speech, TOKEN)
        .await
        .text()
        .await
        .unwrap();
    assert!(twiml.contains("<Hangup/>"), "{twiml}");

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 3, "recording, transcription, speech: {recs:#?}");
    let validator = schema_validator();
    for r in &recs {
        assert_valid(&validator, r);
        assert_eq!(r["channel"], "voice");
        assert_eq!(r["customer"]["key"], "+8613900139000");
    }
    let (recording, transcription, spoken) = (&recs[0], &recs[1], &recs[2]);
    assert_eq!(
        recording["provider_message_id"],
        "RE0123456789abcdef0123456789abcdef"
    );
    assert_eq!(recording["conversation"]["thread_id"], "CA1234567890ABCDE");
    assert_eq!(recording["triage"]["category"], "network");
    assert_eq!(recording["triage"]["reasons"][0], "ivr_menu:1");
    assert!(recording["content"]["voice"]["recording_url"]
        .as_str()
        .unwrap()
        .ends_with("RE0123456789abcdef0123456789abcdef"));
    assert_eq!(
        recording["content"]["voice"]["call_id"],
        "CA1234567890ABCDE"
    );
    assert!(twiml_reference_matches(&recording["id"]));
    assert_eq!(
        transcription["content"]["text"],
        "My internet is down since Monday"
    );
    assert_eq!(
        transcription["conversation"]["thread_id"],
        "CA1234567890ABCDE"
    );
    assert_eq!(transcription["triage"]["category"], "network");
    assert_eq!(spoken["content"]["text"], "这个月话费多扣了五十元");
    assert_eq!(
        spoken["content"]["voice"]["speech"],
        "这个月话费多扣了五十元"
    );
    assert_eq!(spoken["triage"]["category"], "billing");
    assert_eq!(spoken["provider_message_id"], "CA99:gather");
}

fn twiml_reference_matches(id: &serde_json::Value) -> bool {
    id.as_str().is_some_and(|s| s.len() == 26)
}

fn vonage_signed(params: &[(&str, &str)], secret: &str) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    p.push((
        "timestamp".into(),
        chrono::Utc::now().timestamp().to_string(),
    ));
    p.push(("nonce".into(), ulid::Ulid::new().to_string()));
    let sig = hex::encode(vonage::compute("sha256", secret, &p));
    p.push(("sig".into(), sig));
    p
}

#[tokio::test]
async fn vonage_form_json_get_and_long_messages() {
    let secret = "vonage-test-secret";
    let (gw, brokers, topic) = gateway_with_topic(
        1,
        &[
            ("SWITCHBOARD_VONAGE__SECRETS", format!("[\"{secret}\"]")),
            ("SWITCHBOARD_SMS__CONCAT_WAIT_MS", "20000".into()),
        ],
    )
    .await;
    let base = [
        ("msisdn", "447911123456"),
        ("to", "447700900000"),
        ("type", "unicode"),
        ("message-timestamp", "2026-11-22 12:00:00"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        base.iter().chain(extra).cloned().collect()
    };

    // Form POST, Chinese text (unicode type, UTF-8 decoded by Vonage).
    let form = encode(&vonage_signed(
        &with(&[
            ("messageId", "0A0000000123ABCD1"),
            ("text", "手机信号很差，经常掉线。"),
        ]),
        secret,
    ));
    let r = gw.post("/hooks/vonage/sms", FORM, &[], form.clone()).await;
    assert_eq!(r.status(), 200);
    // Vonage resends until it gets 200: the same messageId is a duplicate.
    assert_eq!(
        gw.post("/hooks/vonage/sms", FORM, &[], form).await.status(),
        200
    );

    // JSON body.
    let json: serde_json::Map<String, serde_json::Value> = vonage_signed(
        &with(&[
            ("messageId", "0A0000000123ABCD2"),
            ("text", "JSON complaint"),
        ]),
        secret,
    )
    .into_iter()
    .map(|(k, v)| (k, serde_json::Value::String(v)))
    .collect();
    assert_eq!(
        gw.post(
            "/hooks/vonage/sms",
            "application/json",
            &[],
            serde_json::Value::Object(json).to_string()
        )
        .await
        .status(),
        200
    );

    // GET with the parameters in the query.
    let q = encode(&vonage_signed(
        &with(&[
            ("messageId", "0A0000000123ABCD3"),
            ("text", "GET complaint"),
        ]),
        secret,
    ));
    assert_eq!(
        gw.client
            .get(format!("{}/hooks/vonage/sms?{q}", gw.http))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // A long message in two parts, second part first; both requests answer once joined.
    let p2 = encode(&vonage_signed(
        &with(&[
            ("messageId", "0A00000000000PART2"),
            ("text", "第二部分。"),
            ("concat", "true"),
            ("concat-ref", "77"),
            ("concat-total", "2"),
            ("concat-part", "2"),
        ]),
        secret,
    ));
    let p1 = encode(&vonage_signed(
        &with(&[
            ("messageId", "0A00000000000PART1"),
            ("text", "第一部分，"),
            ("concat", "true"),
            ("concat-ref", "77"),
            ("concat-total", "2"),
            ("concat-part", "1"),
        ]),
        secret,
    ));
    let (a, b) = tokio::join!(gw.post("/hooks/vonage/sms", FORM, &[], p2), async {
        tokio::task::yield_now().await;
        gw.post("/hooks/vonage/sms", FORM, &[], p1).await
    });
    assert_eq!(
        (a.status(), b.status()),
        (reqwest::StatusCode::OK, reqwest::StatusCode::OK)
    );

    // Bad signature, and a stale timestamp.
    let mut forged = vonage_signed(
        &with(&[("messageId", "X1"), ("text", "forged")]),
        "wrong-secret",
    );
    assert_eq!(
        gw.post("/hooks/vonage/sms", FORM, &[], encode(&forged))
            .await
            .status(),
        403
    );
    forged.retain(|(k, _)| k != "sig");
    assert_eq!(
        gw.post("/hooks/vonage/sms", FORM, &[], encode(&forged))
            .await
            .status(),
        403
    );

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 4, "{recs:#?}");
    assert_eq!(recs[0]["content"]["text"], "手机信号很差，经常掉线。");
    assert_eq!(recs[0]["customer"]["key"], "+447911123456");
    assert_eq!(recs[0]["provider"], "vonage");
    assert_eq!(
        recs[0]["metadata"]["occurred_at"],
        "2026-11-22T12:00:00.000Z"
    );
    assert_eq!(recs[1]["content"]["text"], "JSON complaint");
    assert_eq!(recs[2]["content"]["text"], "GET complaint");
    assert_eq!(recs[3]["content"]["text"], "第一部分，第二部分。");
    assert_eq!(recs[3]["metadata"]["segments"], "2/2");
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "switchboard_rejections_total",
            &[("channel", "vonage"), ("reason", "bad_signature")]
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "switchboard_rejections_total",
            &[("channel", "vonage"), ("reason", "missing_signature")]
        ),
        1.0
    );
}

#[tokio::test]
async fn alibaba_uplink_batches_answer_the_exact_success_body() {
    let token = "alibaba-e2e-path-token-0001";
    let (gw, brokers, topic) =
        gateway_with_topic(1, &[("SWITCHBOARD_ALIBABA__PATH_TOKEN", token.into())]).await;
    let path = format!("/hooks/alibaba/sms/{token}");
    let batch = fixture("alibaba/uplink_batch.json");
    let r = gw
        .post(&path, "application/json; charset=utf-8", &[], batch.clone())
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), r#"{"code":0,"msg":"接收成功"}"#);
    // Alibaba retries the same push: success again, nothing new.
    assert_eq!(
        gw.post(&path, "application/json", &[], batch)
            .await
            .text()
            .await
            .unwrap(),
        alibaba::SUCCESS
    );
    assert_eq!(
        gw.post(&path, "application/json", &[], "[]")
            .await
            .text()
            .await
            .unwrap(),
        alibaba::SUCCESS
    );
    // Wrong or missing path token.
    let r = gw
        .post(
            "/hooks/alibaba/sms/guess",
            "application/json",
            &[],
            fixture("alibaba/uplink_a1.json"),
        )
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        gw.post("/hooks/alibaba/sms", "application/json", &[], "[]")
            .await
            .status(),
        403
    );

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[0]["customer"]["key"], "+8613800138000");
    assert_eq!(recs[0]["content"]["text"], "宽带又断了，请尽快处理");
    assert_eq!(recs[0]["provider_message_id"], "1234567891");
    assert_eq!(
        recs[0]["metadata"]["occurred_at"],
        "2024-05-20T02:15:03.000Z"
    );
    assert_eq!(recs[1]["content"]["text"], "本月话费多扣了50元，要求退还。");
    assert_eq!(recs[2]["customer"]["key"], "+8613700137000");

    // A source outside the allowlist is refused even with the right token.
    let closed = Gateway::start(&[
        ("SWITCHBOARD_ALIBABA__PATH_TOKEN", token.into()),
        (
            "SWITCHBOARD_ALIBABA__ALLOW_NETWORKS",
            "[\"10.0.0.0/8\"]".into(),
        ),
    ])
    .await;
    let r = closed.post(&path, "application/json", &[], "[]").await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        closed
            .metric(
                "switchboard_rejections_total",
                &[("channel", "alibaba"), ("reason", "forbidden")]
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn smpp_bridge_acks_exactly_and_keeps_ucs2_chinese() {
    let (gw, brokers, topic) =
        gateway_with_topic(1, &[("SWITCHBOARD_SMPP__TOKEN", "bridge-token".into())]).await;
    let j1 = fixture("smpp/jasmin_mo_j1.form");
    let hdr = [("x-switchboard-token", "bridge-token".to_string())];
    let r = gw
        .post("/hooks/smpp", FORM, &hdr, j1.trim().to_string())
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), smpp::ACK);
    assert_eq!(
        gw.post("/hooks/smpp", FORM, &hdr, j1.trim().to_string())
            .await
            .text()
            .await
            .unwrap(),
        smpp::ACK
    );

    // UCS-2 (coding=8): raw big-endian UTF-16 bytes in `content`.
    let text = "宽带断网三天了，请尽快处理！";
    let ucs2: Vec<u8> = text.encode_utf16().flat_map(|u| u.to_be_bytes()).collect();
    let body = format!(
        "id=2b1f0000-0000-4000-8000-000000000002&from=8613900139000&to=10086&origin-connector=smppc_cm&coding=8&token=bridge-token&content={}",
        percent_encoding::percent_encode(&ucs2, percent_encoding::NON_ALPHANUMERIC)
    );
    assert_eq!(
        gw.post("/hooks/smpp", FORM, &[], body)
            .await
            .text()
            .await
            .unwrap(),
        smpp::ACK
    );

    // Missing token.
    let r = gw
        .post("/hooks/smpp", FORM, &[], j1.trim().replace("1a0e", "ffff"))
        .await;
    assert_eq!(r.status(), 403);

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 2);
    assert_eq!(
        recs[0]["content"]["text"],
        "Network down since this morning"
    );
    assert_eq!(recs[0]["customer"]["key"], "+8613800138000");
    assert_eq!(recs[0]["provider"], "smpp");
    assert_eq!(recs[1]["content"]["text"], text);
    assert_eq!(recs[1]["customer"]["key"], "+8613900139000");
}
