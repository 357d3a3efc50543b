//! Alibaba Cloud SMS uplink (上行短信) HTTP batch push: `POST /hooks/alibaba/sms/<path_token>`.
//!
//! The push is a JSON array of `{phone_number, content, send_time, dest_code, sequence_id,
//! sign_name}`. Alibaba signs nothing, so the route carries a secret path token and the source
//! must be in `alibaba.allow_networks`. The whole array is made durable before the exact success
//! body `{"code":0,"msg":"接收成功"}`; anything else makes Alibaba retry (1, 5, 10 min).
//! Dedupe on `sequence_id`. `send_time` is China time (UTC+8).

use super::{network_and_token, provider_status, Allowlist, Channel, Inbound};
use crate::config::AlibabaConfig;
use crate::error::{Reason, Rejection};
use crate::http::{json_response, Resp};
use crate::pipeline::{Pipeline, RequestCtx};
use crate::record::{ChannelKind, Intake};
use futures_util::future::BoxFuture;
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use serde::Deserialize;

pub const NAME: &str = "alibaba";
pub const ROUTE: &str = "/hooks/alibaba/sms";
pub const SUCCESS: &str = r#"{"code":0,"msg":"接收成功"}"#;
const MAX_BATCH: usize = 1000;

#[derive(Debug, Deserialize)]
struct Uplink {
    phone_number: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    send_time: Option<String>,
    #[serde(default)]
    dest_code: Option<String>,
    sequence_id: serde_json::Value,
    #[serde(default)]
    sign_name: Option<String>,
}

pub struct Alibaba {
    cfg: AlibabaConfig,
    tokens: Vec<String>,
    allow: Allowlist,
    normalizer: crate::identity::Normalizer,
}

impl Alibaba {
    pub fn new(
        cfg: AlibabaConfig,
        normalizer: crate::identity::Normalizer,
    ) -> Result<Self, String> {
        let allow = Allowlist::parse(&cfg.allow_networks)
            .map_err(|e| format!("alibaba.allow_networks: {e}"))?;
        let tokens = vec![cfg.path_token.clone(), cfg.previous_path_token.clone()];
        Ok(Self {
            cfg,
            tokens,
            allow,
            normalizer,
        })
    }

    fn intake(&self, u: Uplink) -> Result<Intake, Rejection> {
        let seq = match &u.sequence_id {
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::String(s) if !s.is_empty() => s.clone(),
            _ => {
                return Err(Rejection::new(
                    Reason::InvalidEvent,
                    "sequence_id must be a number or string",
                ))
            }
        };
        let mut i = Intake::new(ChannelKind::Sms, NAME, u.content);
        i.provider_message_id = Some(seq);
        i.identity = super::sms_identity(&u.phone_number, &self.normalizer, NAME, None);
        i.occurred_at = u.send_time.as_deref().and_then(|t| {
            chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S")
                .ok()
                .and_then(|n| {
                    n.and_local_timezone(chrono::FixedOffset::east_opt(8 * 3600)?)
                        .single()
                })
                .map(|t| t.with_timezone(&chrono::Utc))
        });
        if let Some(d) = u.dest_code {
            i.metadata.insert("dest_code".into(), d);
        }
        if let Some(s) = u.sign_name {
            i.metadata.insert("sign_name".into(), s);
        }
        Ok(i)
    }
}

impl Channel for Alibaba {
    fn name(&self) -> &'static str {
        NAME
    }

    fn precheck(&self, parts: &Parts, ctx: &RequestCtx) -> Result<(), Rejection> {
        if parts.method != Method::POST {
            return Err(Rejection::new(Reason::MethodNotAllowed, "use POST"));
        }
        let token = parts
            .uri
            .path()
            .strip_prefix(ROUTE)
            .and_then(|t| t.strip_prefix('/'))
            .filter(|t| !t.is_empty());
        network_and_token(
            self.cfg.auth_mode,
            NAME,
            &self.allow,
            ctx.peer,
            Some((&self.tokens, token)),
        )?;
        super::require_content_type(&parts.headers, &["application/json"])
    }

    fn handle<'a>(
        &'a self,
        inbound: Inbound,
        pipeline: &'a Pipeline,
    ) -> BoxFuture<'a, Result<Resp, Rejection>> {
        Box::pin(async move {
            let v: serde_json::Value = serde_json::from_slice(&inbound.body)
                .map_err(|e| Rejection::new(Reason::MalformedJson, e.to_string()))?;
            // The documented push is an array; a lone object is taken as a batch of one.
            let items = match v {
                serde_json::Value::Array(a) => a,
                o @ serde_json::Value::Object(_) => vec![o],
                _ => {
                    return Err(Rejection::new(
                        Reason::InvalidEvent,
                        "body must be a JSON array",
                    ))
                }
            };
            if items.len() > MAX_BATCH {
                return Err(Rejection::new(
                    Reason::BatchTooLarge,
                    format!("at most {MAX_BATCH} per push"),
                ));
            }
            let mut intakes = Vec::with_capacity(items.len());
            for (n, item) in items.into_iter().enumerate() {
                let u: Uplink = serde_json::from_value(item)
                    .map_err(|e| Rejection::new(Reason::InvalidEvent, format!("[{n}] {e}")))?;
                intakes.push(self.intake(u).map_err(|r| {
                    Rejection::new(r.reason.clone(), format!("[{n}] {}", r.message))
                })?);
            }
            if !intakes.is_empty() {
                pipeline.submit(&inbound.ctx, intakes).await?;
            }
            Ok(json_response(StatusCode::OK, SUCCESS.to_string()))
        })
    }

    /// Alibaba reads `code`; anything but 0 (or a non-200) is retried.
    fn reject(&self, r: &Rejection) -> Resp {
        let status = provider_status(r);
        let body = serde_json::json!({"code": status.as_u16(), "msg": r.reason.code()}).to_string();
        super::with_retry_after(json_response(status, body), r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_maps_to_an_sms_intake_in_china_time() {
        let v: Vec<Uplink> =
            serde_json::from_str(include_str!("../../tests/fixtures/alibaba/uplink_a1.json"))
                .unwrap();
        let a = Alibaba::new(Default::default(), crate::identity::Normalizer::new("CN")).unwrap();
        let i = a.intake(v.into_iter().next().unwrap()).unwrap();
        assert_eq!(i.provider_message_id.as_deref(), Some("1234567890"));
        assert_eq!(i.identity.phone.as_deref(), Some("+8613800138000"));
        assert_eq!(i.text, "宽带又断了，请尽快处理");
        assert_eq!(
            crate::record::rfc3339_ms(i.occurred_at.unwrap()),
            "2024-05-20T02:15:03.000Z"
        );
        assert_eq!(i.metadata["sign_name"], "某某电信");
    }
}
