//! Email end to end: real SMTP clients (lettre, swaks, raw TCP) against the listener, the
//! inbound-parse webhook, records in a real Kafka broker, and the acknowledgement mail captured
//! by an SMTP server on another port (our own listener with a capturing handler).

mod common;

use common::*;
use futures_util::future::BoxFuture;
use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::sync::Arc;
use std::time::Duration;
use switchboard::smtp::{Delivery, MailHandler, Reply, SmtpLimits};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

const INTAKE: &str = "complaints@operator.example";

/// An SMTP server that keeps every message it gets: where acknowledgements land.
struct Capture(mpsc::UnboundedSender<String>);

impl MailHandler for Capture {
    fn accept_recipient(&self, _: &str) -> bool {
        true
    }
    fn deliver(&self, d: Delivery) -> BoxFuture<'static, Reply> {
        let data = d.data.load().expect("captured message");
        let _ = self.0.send(String::from_utf8_lossy(&data).into_owned());
        Box::pin(async { Reply::new(250, "2.0.0", "captured") })
    }
}

async fn capture_server() -> (String, mpsc::UnboundedReceiver<String>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (tx, rx) = mpsc::unbounded_channel();
    let limits = SmtpLimits {
        tls: None,
        implicit_tls: false,
        hostname: "capture.test".into(),
        max_message_bytes: 1 << 20,
        max_recipients: 10,
        max_line_bytes: 10_000,
        command_timeout: Duration::from_secs(30),
        data_timeout: Duration::from_secs(30),
        max_connections: 10,
        max_errors: 5,
        max_junk_commands: 100,
        data_memory_bytes: 1 << 20,
        data_spill_dir: std::env::temp_dir(),
    };
    let token = tokio_util::sync::CancellationToken::new();
    tokio::spawn(switchboard::smtp::serve(
        l,
        limits,
        Arc::new(Capture(tx)),
        token,
        Duration::from_secs(1),
    ));
    (addr, rx)
}

fn email_env(relay: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "SWITCHBOARD_EMAIL__INTAKE_ADDRESSES",
            format!("[\"{INTAKE}\"]"),
        ),
        ("SWITCHBOARD_EMAIL__ACK__ENABLED", "true".into()),
        ("SWITCHBOARD_EMAIL__ACK__RELAY", relay.into()),
        (
            "SWITCHBOARD_EMAIL__ACK__FROM",
            "Complaints <complaints@operator.example>".into(),
        ),
        ("SWITCHBOARD_EMAIL__MAX_MESSAGE_BYTES", "200000".into()),
        (
            "SWITCHBOARD_EMAIL__INBOUND_TOKENS",
            "[\"inbound-token-0123456789\"]".into(),
        ),
    ]
}

fn smtp_client(addr: &str) -> AsyncSmtpTransport<Tokio1Executor> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(port.parse().unwrap())
        .build()
}

/// Sends a fixture file as is, from `from` to the intake address.
async fn send_fixture(
    client: &AsyncSmtpTransport<Tokio1Executor>,
    from: &str,
    file: &str,
) -> Result<lettre::transport::smtp::response::Response, lettre::transport::smtp::Error> {
    let envelope =
        lettre::address::Envelope::new(Some(from.parse().unwrap()), vec![INTAKE.parse().unwrap()])
            .unwrap();
    let raw = std::fs::read(format!("tests/fixtures/email/{file}")).unwrap();
    client.send_raw(&envelope, &raw).await
}

async fn next_ack(rx: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("acknowledgement within 30 s")
        .unwrap()
}

#[tokio::test]
async fn smtp_mail_becomes_a_record_and_is_acknowledged_in_thread() {
    let (relay, mut acks) = capture_server().await;
    let (gw, brokers, topic) = gateway_with_topic(1, &email_env(&relay)).await;
    let client = smtp_client(&gw.smtp);
    let validator = schema_validator();

    let mail = Message::builder()
        .from("Li Na <Li.Na@Example.com>".parse().unwrap())
        .to(INTAKE.parse().unwrap())
        .subject("宽带断网三天")
        .message_id(Some("<complaint-1@example.com>".into()))
        .in_reply_to("<ticket-77@operator.example>".into())
        .references("<ticket-77@operator.example>".into())
        .header(ContentType::TEXT_PLAIN)
        .body("您好，我家宽带已经断网三天了，请尽快处理。".to_string())
        .unwrap();
    client.send(mail.clone()).await.expect("250 after DATA");
    // The MTA retries the same message: accepted, no second record, no second acknowledgement.
    client.send(mail).await.expect("duplicate is accepted too");

    // An auto-reply is recorded but never acknowledged; a GBK mail decodes.
    send_fixture(&client, "ooo@example.com", "auto_reply.eml")
        .await
        .unwrap();
    send_fixture(&client, "zhang.wei@example.cn", "gbk.eml")
        .await
        .unwrap();

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 3, "{recs:#?}");
    for r in &recs {
        assert_valid(&validator, r);
        assert_eq!(r["channel"], "email");
    }
    let first = &recs[0];
    assert_eq!(first["customer"]["key"], "li.na@example.com");
    assert_eq!(first["customer"]["name"], "Li Na");
    assert_eq!(first["content"]["subject"], "宽带断网三天");
    assert_eq!(
        first["content"]["text"],
        "您好，我家宽带已经断网三天了，请尽快处理。"
    );
    assert_eq!(first["provider_message_id"], "complaint-1@example.com");
    assert_eq!(
        first["conversation"]["in_reply_to"],
        "ticket-77@operator.example"
    );
    assert_eq!(
        first["conversation"]["thread_id"],
        "ticket-77@operator.example"
    );
    assert_eq!(first["metadata"]["intake_address"], INTAKE);
    assert_eq!(
        recs[1]["metadata"]["auto_submitted"],
        "auto-submitted:auto-replied"
    );
    assert!(recs[2]["content"]["text"]
        .as_str()
        .unwrap()
        .contains("我家宽带从昨天开始断网"));

    // Acknowledgements: the first mail and the GBK one (not the duplicate, not the auto-reply).
    let mut got = [next_ack(&mut acks).await, next_ack(&mut acks).await];
    got.sort_by_key(|a| !a.contains("complaint-1@example.com"));
    let ack = &got[0];
    let reference = &first["id"].as_str().unwrap()[18..];
    assert!(
        ack.contains("In-Reply-To: <complaint-1@example.com>"),
        "{ack}"
    );
    assert!(
        ack.contains("References: <ticket-77@operator.example> <complaint-1@example.com>"),
        "{ack}"
    );
    assert!(ack.contains("Auto-Submitted: auto-replied"), "{ack}");
    assert!(ack.contains("To: li.na@example.com"), "{ack}");
    assert!(
        ack.contains(reference),
        "the acknowledgement carries the reference {reference}: {ack}"
    );
    assert!(
        got[1].contains("In-Reply-To: <gbk-1@example.cn>"),
        "{}",
        got[1]
    );
    assert!(
        acks.try_recv().is_err(),
        "no acknowledgement for the auto-reply or the duplicate"
    );
    gw.assert_log_has_none_of(&["li.na@example.com", "Li.Na@Example.com", "宽带已经断网"]);
}

/// Reads one (possibly multi-line) SMTP reply.
async fn read_reply(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> String {
    let mut out = String::new();
    loop {
        let mut l = String::new();
        let n = tokio::time::timeout(Duration::from_secs(30), r.read_line(&mut l))
            .await
            .expect("reply within 30 s")
            .unwrap();
        out.push_str(&l);
        if n == 0 || (l.len() >= 4 && l.as_bytes()[3] == b' ') {
            return out;
        }
    }
}

/// Sends raw SMTP lines and returns the server's replies (the greeting, then one per command).
async fn raw_session(addr: &str, script: &[&[u8]]) -> Vec<String> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut replies = vec![read_reply(&mut r).await];
    for cmd in script {
        w.write_all(cmd).await.unwrap();
        replies.push(read_reply(&mut r).await);
    }
    replies
}

#[tokio::test]
async fn smtp_limits_relay_smuggling_and_swaks() {
    let (relay, _acks) = capture_server().await;
    let (gw, brokers, topic) = gateway_with_topic(1, &email_env(&relay)).await;

    let replies = raw_session(
        &gw.smtp,
        &[
            b"EHLO client.test\r\n",
            b"MAIL FROM:<a@example.com> SIZE=999999999\r\n",
            b"MAIL FROM:<a@example.com>\r\n",
            b"RCPT TO:<someone@elsewhere.example>\r\n",
            b"RCPT TO:<complaints@operator.example>\r\n",
            b"DATA\r\n",
            b"Subject: smuggle\r\n\r\nfirst\n.\r\nMAIL FROM:<evil@example.com>\r\n.\r\n",
            b"MAIL FROM:<a@example.com>\r\n",
            b"RCPT TO:<complaints@operator.example>\r\n",
            b"DATA\r\n",
            b".\r\n",
            b"QUIT\r\n",
        ],
    )
    .await;
    assert!(replies[0].starts_with("220 "), "{replies:?}");
    assert!(
        replies[1].contains("250-PIPELINING")
            && replies[1].contains("250-SIZE 200000")
            && replies[1].contains("ENHANCEDSTATUSCODES"),
        "{replies:?}"
    );
    assert!(replies[2].starts_with("552 5.3.4"), "{replies:?}");
    assert!(replies[3].starts_with("250 2.1.0"), "{replies:?}");
    assert!(
        replies[4].starts_with("550 5.1.1"),
        "no open relay: {replies:?}"
    );
    assert!(replies[5].starts_with("250 2.1.5"), "{replies:?}");
    assert!(replies[6].starts_with("354"), "{replies:?}");
    assert!(
        replies[7].starts_with("550 5.5.2"),
        "bare LF refused: {replies:?}"
    );
    assert!(
        replies[8].starts_with("250 2.1.0") && replies[9].starts_with("250 2.1.5"),
        "{replies:?}"
    );
    assert!(
        replies[10].starts_with("354 End"),
        "no enhanced code on 354: {replies:?}"
    );
    // An empty message ends at once (no hang until the data timeout) and is refused.
    assert!(replies[11].starts_with("554 5.6.0"), "{replies:?}");
    assert!(replies[12].starts_with("221"), "{replies:?}");

    // Oversized message (the test caps messages at 200000 bytes).
    let client = smtp_client(&gw.smtp);
    let e = send_fixture(&client, "big@example.cn", "oversized.eml")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("552") || e.is_permanent(), "{e}");

    // swaks, a real SMTP test client.
    let out = tokio::process::Command::new("swaks")
        .args([
            "--server",
            &gw.smtp,
            "--to",
            INTAKE,
            "--from",
            "wang.fang@example.cn",
            "--header",
            "Subject: swaks complaint",
            "--body",
            "My 5G signal drops every evening.",
            "--header",
            "Message-Id: <swaks-1@example.cn>",
        ])
        .output()
        .await
        .expect("swaks is installed by scripts/test.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("<-  250 2.0.0 Queued as"));

    // Attachments: metadata in the record, bytes in the attachment store.
    send_fixture(&client, "wang.fang@example.cn", "attachments.eml")
        .await
        .unwrap();

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(
        recs.len(),
        2,
        "the swaks mail and the one with attachments: {recs:#?}"
    );
    assert_eq!(
        recs[0]["content"]["text"],
        "My 5G signal drops every evening."
    );
    assert_eq!(recs[0]["customer"]["key"], "wang.fang@example.cn");
    let atts = recs[1]["content"]["attachments"].as_array().unwrap();
    assert_eq!(atts.len(), 2);
    assert_eq!(atts[0]["name"], "bill.pdf");
    assert_eq!(atts[1]["name"], "信号截图.png");
    let sha = atts[0]["sha256"].as_str().unwrap();
    let stored =
        std::fs::read(gw.dir.path().join("attachments").join(sha)).expect("attachment stored");
    assert_eq!(stored.len() as u64, atts[0]["size"].as_u64().unwrap());
    assert_eq!(atts[0]["url"], format!("attachment:sha256:{sha}"));
}

#[tokio::test]
async fn inbound_parse_webhooks_sendgrid_raw_and_mailgun_mime() {
    let key = "key-test-signing";
    let mut env = email_env("127.0.0.1:9");
    env.push(("SWITCHBOARD_EMAIL__ACK__ENABLED", "false".into()));
    env.push((
        "SWITCHBOARD_EMAIL__MAILGUN_SIGNING_KEYS",
        format!("[\"{key}\"]"),
    ));
    let (gw, brokers, topic) = gateway_with_topic(1, &env).await;
    let url = "/hooks/email/inbound?token=inbound-token-0123456789";
    let body = std::fs::read("tests/fixtures/email/sendgrid_raw_e1.multipart").unwrap();
    let ct = "multipart/form-data; boundary=xYzZY";
    let r = gw.post(url, ct, &[], body.clone()).await;
    assert_eq!(r.status(), 200);
    let first: serde_json::Value = r.json().await.unwrap();
    assert_eq!(first["duplicate"], false);
    let again: serde_json::Value = gw
        .post(url, ct, &[], body.clone())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["duplicate"], true);
    assert_eq!(
        gw.post("/hooks/email/inbound?token=wrong", ct, &[], body)
            .await
            .status(),
        403
    );

    // Mailgun `mime` route, form-encoded, signed.
    let ts = chrono::Utc::now().timestamp().to_string();
    let token = "a8ce0edb2dd8301dee6c2405235584e45aa91d1e9f979f3de0";
    let sig = switchboard::auth::sign_hex(key, &[ts.as_bytes(), token.as_bytes()]);
    let mime = std::fs::read_to_string("tests/fixtures/email/html_only_reply.eml").unwrap();
    let form = |sig: &str| {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("recipient", INTAKE)
            .append_pair("sender", "alice@example.org")
            .append_pair("body-mime", &mime)
            .append_pair("timestamp", &ts)
            .append_pair("token", token)
            .append_pair("signature", sig)
            .finish()
    };
    let r = gw
        .post(url, "application/x-www-form-urlencoded", &[], form(&sig))
        .await;
    assert_eq!(r.status(), 200);
    let r = gw
        .post(url, "application/x-www-form-urlencoded", &[], form("00"))
        .await;
    assert_eq!(r.status(), 403);

    let recs = records_until_sentinel(&gw, &brokers, &topic).await;
    assert_eq!(recs.len(), 2);
    assert_eq!(
        recs[0]["provider_message_id"],
        "CAN_P_JNa25--hzm5=-ES9cnxgWa+h+E49OOAS7sPpV0gsoXCOw@mail.gmail.com"
    );
    assert_eq!(
        recs[0]["content"]["text"].as_str().unwrap().trim(),
        "Test #1 broadband outage complaint"
    );
    assert_eq!(recs[0]["customer"]["key"], "example@example.com");
    assert!(recs[1]["content"]["text"]
        .as_str()
        .unwrap()
        .contains("Still no dial tone"));
    assert_eq!(
        recs[1]["conversation"]["in_reply_to"],
        "ticket-12345@support.example.com"
    );
}

/// Reads one SMTP reply from any stream (plain or TLS).
async fn reply_of<S: tokio::io::AsyncRead + Unpin>(r: &mut BufReader<S>) -> String {
    let mut out = String::new();
    loop {
        let mut l = String::new();
        let n = tokio::time::timeout(Duration::from_secs(30), r.read_line(&mut l))
            .await
            .expect("reply within 30 s")
            .unwrap();
        out.push_str(&l);
        if n == 0 || (l.len() >= 4 && l.as_bytes()[3] == b' ') {
            return out;
        }
    }
}

async fn say<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    line: &[u8],
) -> String {
    s.get_mut().write_all(line).await.unwrap();
    reply_of(s).await
}

#[tokio::test]
async fn starttls_upgrades_with_rustls_and_drops_pipelined_commands() {
    // A test CA and a certificate for localhost signed by it.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, leaf.pem()).unwrap();
    std::fs::write(&key_path, leaf_key.serialize_pem()).unwrap();
    let gw = Gateway::start(&[
        (
            "SWITCHBOARD_EMAIL__INTAKE_ADDRESSES",
            format!("[\"{INTAKE}\"]"),
        ),
        (
            "SWITCHBOARD_EMAIL__TLS_CERT_PATH",
            cert_path.display().to_string(),
        ),
        (
            "SWITCHBOARD_EMAIL__TLS_KEY_PATH",
            key_path.display().to_string(),
        ),
    ])
    .await;

    let mut plain = BufReader::new(tokio::net::TcpStream::connect(&gw.smtp).await.unwrap());
    assert!(reply_of(&mut plain).await.starts_with("220 "));
    assert!(say(&mut plain, b"EHLO client.test\r\n")
        .await
        .contains("250-STARTTLS"));
    // A command pipelined behind STARTTLS must not survive into the TLS session.
    let r = say(
        &mut plain,
        b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n",
    )
    .await;
    assert!(r.starts_with("220 2.0.0"), "{r}");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector
        .connect(name, plain.into_inner())
        .await
        .expect("TLS handshake");
    let mut tls = BufReader::new(tls);
    let ehlo = say(&mut tls, b"EHLO client.test\r\n").await;
    assert!(
        ehlo.starts_with("250-") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    let r = say(&mut tls, b"RCPT TO:<complaints@operator.example>\r\n").await;
    assert!(
        r.starts_with("503"),
        "the injected MAIL FROM was dropped: {r}"
    );
    assert!(say(&mut tls, b"MAIL FROM:<secure@example.cn>\r\n")
        .await
        .starts_with("250"));
    assert!(say(&mut tls, b"RCPT TO:<complaints@operator.example>\r\n")
        .await
        .starts_with("250"));
    assert!(say(&mut tls, b"DATA\r\n").await.starts_with("354"));
    let r = say(
        &mut tls,
        b"From: secure@example.cn\r\nSubject: over TLS\r\nMessage-ID: <tls-1@example.cn>\r\n\r\nSent over STARTTLS.\r\n.\r\n",
    )
    .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    assert!(say(&mut tls, b"QUIT\r\n").await.starts_with("221"));

    let (records, _) = switchboard::sink::spool::read_all(&gw.spool_dir()).unwrap();
    assert_eq!(records.len(), 1);
    let rec: serde_json::Value = serde_json::from_slice(&records[0]).unwrap();
    assert_eq!(
        rec["content"]["text"].as_str().unwrap().trim(),
        "Sent over STARTTLS."
    );
    assert_eq!(rec["customer"]["key"], "secure@example.cn");
}
