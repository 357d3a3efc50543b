//! A real websocket client (tokio-tungstenite) speaking the chat protocol, for the e2e tests.

use super::*;
use futures_util::{SinkExt, StreamExt};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub struct ChatClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    Code(u16),
    /// The server dropped the connection without a close frame.
    Dropped,
}

pub fn ws_url(http: &str) -> String {
    format!("{}/v1/chat", http.replacen("http://", "ws://", 1))
}

impl ChatClient {
    pub async fn connect(http: &str) -> ChatClient {
        Self::try_connect(http).await.expect("websocket connect")
    }

    pub async fn try_connect(http: &str) -> Result<ChatClient, WsError> {
        let (ws, _) = tokio_tungstenite::connect_async(ws_url(http)).await?;
        Ok(ChatClient { ws })
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send frame");
    }

    /// The next text frame as JSON (pings are answered by the library), within 20 s.
    pub async fn recv(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("no frame within 20 s")
                .expect("connection ended")
                .expect("read frame");
            match m {
                Message::Text(t) => return serde_json::from_str(&t).expect("JSON frame"),
                Message::Close(c) => panic!("closed by the server: {c:?}"),
                _ => {}
            }
        }
    }

    /// The next frame of `type` `want`, failing on any other text frame.
    pub async fn expect(&mut self, want: &str) -> Value {
        let v = self.recv().await;
        assert_eq!(v["type"], want, "expected {want}, got {v}");
        v
    }

    /// Reads until the server closes; returns the close code.
    pub async fn closed(&mut self) -> Closed {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("not closed within 20 s")
            {
                None | Some(Err(_)) => return Closed::Dropped,
                Some(Ok(Message::Close(Some(f)))) => return Closed::Code(u16::from(f.code)),
                Some(Ok(Message::Close(None))) => return Closed::Code(1005),
                Some(Ok(_)) => {}
            }
        }
    }

    pub async fn hello(&mut self, fields: Value) -> Value {
        let mut v = json!({"type": "hello"});
        if let (Some(o), Some(f)) = (v.as_object_mut(), fields.as_object()) {
            for (k, x) in f {
                o.insert(k.clone(), x.clone());
            }
        }
        self.send(v).await;
        self.expect("welcome").await
    }

    pub async fn message(&mut self, id: &str, text: &str) -> Value {
        self.send(json!({"type": "message", "client_msg_id": id, "text": text}))
            .await;
        self.expect("ack").await
    }

    /// Sends `ping` and expects `pong` as the very next frame: proves nothing else was queued.
    pub async fn nothing_pending(&mut self) {
        self.send(json!({"type": "ping"})).await;
        self.expect("pong").await;
    }
}

pub fn close_code(c: CloseCode) -> u16 {
    u16::from(c)
}

pub const CUSTOMER_SECRET: &str = "operator-app-secret-0123";
pub const SESSION_SECRET: &str = "chat-session-secret-0123456789abcdef";

/// A gateway on fresh complaints and replies topics (one partition each, so order is total).
pub async fn chat_gateway(extra: &[(&str, String)]) -> (Gateway, String, String, String) {
    let brokers = kafka_brokers();
    let replies = unique("replies.e2e");
    create_topic(&brokers, &replies, 1).await;
    let mut env = vec![
        ("SWITCHBOARD_KAFKA__REPLIES_TOPIC", replies.clone()),
        (
            "SWITCHBOARD_CHAT__SESSION_SECRETS",
            format!("[\"{SESSION_SECRET}\"]"),
        ),
        (
            "SWITCHBOARD_CHAT__CUSTOMER_TOKEN_SECRETS",
            format!("[\"{CUSTOMER_SECRET}\"]"),
        ),
    ];
    env.extend(extra.iter().cloned());
    let (gw, brokers, topic) = gateway_with_topic(1, &env).await;
    (gw, brokers, topic, replies)
}

pub async fn produce_reply(brokers: &str, topic: &str, key: &str, body: Value) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let payload = body.to_string();
    p.send(
        FutureRecord::to(topic).key(key).payload(&payload),
        Duration::from_secs(10),
    )
    .await
    .expect("reply produced");
}

/// Produces many replies with one producer, all in flight at once.
pub async fn produce_replies(brokers: &str, topic: &str, key: &str, bodies: Vec<Value>) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let payloads: Vec<String> = bodies.iter().map(|b| b.to_string()).collect();
    let sends = payloads.iter().map(|payload| {
        p.send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(30),
        )
    });
    for r in futures_util::future::join_all(sends).await {
        r.expect("reply produced");
    }
}
