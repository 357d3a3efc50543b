//! Chat frames (docs/chat-protocol.md): JSON text frames tagged by `type`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Hello {
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        customer_token: Option<String>,
        #[serde(default)]
        last_seq: Option<u64>,
        #[serde(default)]
        lang: Option<String>,
    },
    Message {
        client_msg_id: String,
        text: String,
    },
    Typing,
    Ping,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        session_id: &'a str,
        token: &'a str,
        resumed: bool,
        customer: &'static str,
        last_seq: u64,
        heartbeat_ms: u64,
        max_text_chars: usize,
    },
    Ack {
        client_msg_id: &'a str,
        record_id: String,
        reference: String,
        duplicate: bool,
    },
    Reply {
        seq: u64,
        text: &'a str,
        at: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reply_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        in_reply_to: Option<&'a str>,
    },
    Error {
        code: &'static str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    Pong,
}

impl ServerFrame<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("frames serialise")
    }
}

/// Why a text frame is not a valid client frame (the message names the problem, never the text).
pub fn parse(text: &str) -> Result<ClientFrame, String> {
    serde_json::from_str(text).map_err(|e| {
        let msg = e.to_string();
        // serde's messages quote field names and variants, not the input's values.
        if msg.contains("unknown variant") {
            "unknown frame type (hello, message, typing, ping)".into()
        } else if msg.contains("missing field") || msg.contains("unknown field") {
            msg.split(" at line")
                .next()
                .unwrap_or("bad frame")
                .to_string()
        } else {
            "frame is not a JSON object with a known `type`".into()
        }
    })
}

/// `client_msg_id`: 1–64 characters of `A-Z a-z 0-9 . _ : -`.
pub fn valid_client_msg_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_client_frame() {
        assert_eq!(
            parse(r#"{"type":"hello"}"#).unwrap(),
            ClientFrame::Hello {
                token: None,
                customer_token: None,
                last_seq: None,
                lang: None
            }
        );
        assert_eq!(
            parse(r#"{"type":"hello","token":"t","last_seq":7}"#).unwrap(),
            ClientFrame::Hello {
                token: Some("t".into()),
                customer_token: None,
                last_seq: Some(7),
                lang: None
            }
        );
        assert_eq!(
            parse(r#"{"type":"message","client_msg_id":"m-1","text":"光猫红灯 📶"}"#).unwrap(),
            ClientFrame::Message {
                client_msg_id: "m-1".into(),
                text: "光猫红灯 📶".into()
            }
        );
        assert_eq!(parse(r#"{"type":"typing"}"#).unwrap(), ClientFrame::Typing);
        assert_eq!(parse(r#"{"type":"ping"}"#).unwrap(), ClientFrame::Ping);
    }

    #[test]
    fn bad_frames_say_why_without_echoing_input() {
        let e = parse(r#"{"type":"message","text":"secret 13800138000"}"#).unwrap_err();
        assert!(e.contains("client_msg_id"), "{e}");
        assert!(!e.contains("13800138000"));
        let e = parse(r#"{"type":"shout"}"#).unwrap_err();
        assert!(e.contains("unknown frame type"), "{e}");
        for bad in ["", "null", "[1]", "{", "\"hello\"", r#"{"type":1}"#] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let e = parse(r#"{"type":"message","client_msg_id":5,"text":"13800138000"}"#).unwrap_err();
        assert!(!e.contains("13800138000"), "{e}");
    }

    #[test]
    fn client_msg_ids_are_short_and_plain() {
        assert!(valid_client_msg_id("m-1716171303123_ab:c.d"));
        assert!(!valid_client_msg_id(""));
        assert!(!valid_client_msg_id(&"a".repeat(65)));
        assert!(!valid_client_msg_id("has space"));
        assert!(!valid_client_msg_id("中文"));
    }

    #[test]
    fn server_frames_have_the_documented_shape() {
        let f = ServerFrame::Ack {
            client_msg_id: "m-1",
            record_id: "01ARZ3NDEKTSV4RRFFQ69G5FAV".into(),
            reference: "Q69G5FAV".into(),
            duplicate: false,
        };
        let v: serde_json::Value = serde_json::from_str(&f.to_json()).unwrap();
        assert_eq!(v["type"], "ack");
        assert_eq!(v["reference"], "Q69G5FAV");
        let e = ServerFrame::Error {
            code: "rate_limited",
            message: "slow down",
            client_msg_id: Some("m-2"),
            retry_after_ms: Some(1500),
        };
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["retry_after_ms"], 1500);
        assert_eq!(ServerFrame::Pong.to_json(), r#"{"type":"pong"}"#);
    }
}
