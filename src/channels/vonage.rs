//! Vonage (Nexmo) SMS API inbound: `GET|POST /hooks/vonage/sms`, form or JSON.
//!
//! Signed webhooks: `sig` over every other parameter sorted by name, as `&key=value` with `&` and
//! `=` inside values replaced by `_`; `md5hash` = md5(string + secret), the others
//! HMAC-<alg>(secret, string), hex compared case-insensitively (SDKs differ on case). The signed
//! `timestamp` must be within `vonage.timestamp_tolerance_secs`. Vonage resends for 24 h until
//! it gets 200/204; dedupe on `messageId`. Long messages (`concat-ref/total/part`) are joined.

use super::segments::{Assembler, Part};
use super::{form_get, form_pairs, sms_identity, Channel, Inbound};
use crate::config::{SignatureMode, VonageConfig};
use crate::error::{Reason, Rejection};
use crate::http::{text_response, Resp};
use crate::identity::Normalizer;
use crate::pipeline::{Pipeline, RequestCtx};
use crate::record::{ChannelKind, Intake};
use futures_util::future::BoxFuture;
use hmac::{Hmac, Mac};
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use md5::{Digest, Md5};

pub const NAME: &str = "vonage";

/// The string Vonage signs.
pub fn signing_string(params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().filter(|(k, _)| k != "sig").collect();
    sorted.sort();
    let mut s = String::new();
    for (k, v) in sorted {
        s.push('&');
        s.push_str(k);
        s.push('=');
        s.push_str(&v.replace(['&', '='], "_"));
    }
    s
}

fn hmac_hex<M: Mac + hmac::digest::KeyInit>(secret: &str, data: &str) -> Vec<u8> {
    let mut m = <M as hmac::digest::KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key");
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// The raw signature bytes for one secret.
pub fn compute(method: &str, secret: &str, params: &[(String, String)]) -> Vec<u8> {
    let s = signing_string(params);
    match method {
        "md5hash" => Md5::digest(format!("{s}{secret}").as_bytes()).to_vec(),
        "md5" => hmac_hex::<Hmac<Md5>>(secret, &s),
        "sha1" => hmac_hex::<Hmac<sha1::Sha1>>(secret, &s),
        "sha512" => hmac_hex::<Hmac<sha2::Sha512>>(secret, &s),
        _ => hmac_hex::<Hmac<sha2::Sha256>>(secret, &s),
    }
}

pub struct Vonage {
    cfg: VonageConfig,
    normalizer: Normalizer,
    assembler: Assembler,
}

impl Vonage {
    pub fn new(cfg: VonageConfig, normalizer: Normalizer, assembler: Assembler) -> Self {
        Self {
            cfg,
            normalizer,
            assembler,
        }
    }

    fn check(&self, params: &[(String, String)]) -> Result<(), Rejection> {
        if self.cfg.signature_mode == SignatureMode::Off {
            return Ok(());
        }
        let outcome = (|| {
            let sig = form_get(params, "sig").ok_or(Reason::MissingSignature)?;
            let provided =
                hex::decode(sig.trim().to_ascii_lowercase()).map_err(|_| Reason::BadSignature)?;
            let ts: i64 = form_get(params, "timestamp")
                .and_then(|t| t.parse().ok())
                .ok_or(Reason::BadSignature)?;
            let mut ok = false;
            for secret in &self.cfg.secrets {
                let want = compute(&self.cfg.signature_method, secret, params);
                ok |= super::token_eq(&hex::encode(want), &hex::encode(&provided));
            }
            if !ok {
                return Err(Reason::BadSignature);
            }
            if !crate::auth::timestamp_fresh(
                ts,
                chrono::Utc::now().timestamp(),
                self.cfg.timestamp_tolerance_secs,
            ) {
                return Err(Reason::StaleTimestamp);
            }
            Ok(())
        })();
        crate::auth::apply_mode(self.cfg.signature_mode, NAME, outcome)
    }

    fn intake(&self, p: &[(String, String)]) -> Result<Intake, Rejection> {
        Self::intake_of(&self.normalizer, p)
    }

    pub(crate) fn intake_of(
        normalizer: &Normalizer,
        p: &[(String, String)],
    ) -> Result<Intake, Rejection> {
        let id = form_get(p, "messageId")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Rejection::new(Reason::InvalidEvent, "messageId is missing"))?;
        let from = form_get(p, "msisdn")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Rejection::new(Reason::InvalidEvent, "msisdn is missing"))?;
        let kind = form_get(p, "type").unwrap_or("text");
        let text = match kind {
            "binary" => String::new(),
            _ => form_get(p, "text").unwrap_or("").to_string(),
        };
        let mut i = Intake::new(ChannelKind::Sms, NAME, text);
        i.provider_message_id = Some(id.to_string());
        i.identity = sms_identity(from, normalizer, NAME, None);
        if let Some(to) = form_get(p, "to") {
            i.metadata.insert("to".into(), to.to_string());
        }
        if kind == "binary" {
            for k in ["data", "udh"] {
                if let Some(v) = form_get(p, k) {
                    i.metadata.insert(format!("binary_{k}"), v.to_string());
                }
            }
            i.text = "(binary SMS)".into();
        }
        i.occurred_at = form_get(p, "message-timestamp")
            .and_then(|t| chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S").ok())
            .map(|t| t.and_utc());
        Ok(i)
    }
}

fn json_or_form(parts: &Parts, body: &[u8]) -> Result<Vec<(String, String)>, Rejection> {
    if parts.method == Method::GET {
        Ok(form_pairs(parts.uri.query().unwrap_or("").as_bytes()))
    } else if super::content_type(&parts.headers) == "application/json" {
        super::json_params(body)
    } else {
        Ok(form_pairs(body))
    }
}

impl Channel for Vonage {
    fn name(&self) -> &'static str {
        NAME
    }

    fn allow(&self) -> &'static str {
        "POST, GET"
    }

    fn precheck(&self, parts: &Parts, _ctx: &RequestCtx) -> Result<(), Rejection> {
        super::get_or_post(
            parts,
            &["application/x-www-form-urlencoded", "application/json"],
        )
    }

    fn handle<'a>(
        &'a self,
        inbound: Inbound,
        _pipeline: &'a Pipeline,
    ) -> BoxFuture<'a, Result<Resp, Rejection>> {
        Box::pin(async move {
            let params = json_or_form(&inbound.parts, &inbound.body)?;
            self.check(&params)?;
            let intake = self.intake(&params)?;
            let concat = form_get(&params, "concat").is_some_and(|c| c == "true");
            let num = |k| form_get(&params, k).and_then(|v| v.parse::<u8>().ok());
            let part = Part {
                reference: form_get(&params, "concat-ref").unwrap_or("").to_string(),
                total: if concat {
                    num("concat-total").unwrap_or(1)
                } else {
                    1
                },
                index: if concat {
                    num("concat-part").unwrap_or(1)
                } else {
                    1
                },
                intake,
            };
            self.assembler.submit(&inbound.ctx, part).await?;
            Ok(text_response(StatusCode::OK, "text/plain", ""))
        })
    }

    fn reject(&self, r: &Rejection) -> Resp {
        super::provider_json_reject(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Known answers from Vonage's SDK signature tests.
    #[test]
    fn known_answer_vectors() {
        let params = p(&[("a", "1"), ("b", "2"), ("timestamp", "1461605396")]);
        assert_eq!(
            hex::encode(compute("md5hash", "secret", &params)),
            "6af838ef94998832dbfc29020b564830"
        );
        assert_eq!(
            hex::encode(compute("sha256", "secret", &params)),
            "a321e824b9b816be7c3f28859a31749a098713d39f613c80d455bbaffae1cd24"
        );
    }

    #[test]
    fn inbound_fixture_v2_signature() {
        let body = include_str!("../../tests/fixtures/vonage/inbound_signed_v2.form");
        let params = form_pairs(body.trim().as_bytes());
        assert_eq!(
            signing_string(&params),
            "&keyword=BROADBAND&message-timestamp=2020-01-01 12:00:00&messageId=0A0000000123ABCD1&msisdn=447700900001&nonce=aaaaaaaa-bbbb-cccc-dddd-0123456789ab&text=Broadband down since Monday&timestamp=1577880000&to=447700900000&type=text"
        );
        assert_eq!(
            hex::encode(compute("sha256", "secret", &params)),
            form_get(&params, "sig").unwrap()
        );
        assert_eq!(
            hex::encode(compute("md5hash", "secret", &params)),
            "bedad2d8c6d6025e3c0c26e65cc3055d"
        );
    }

    #[test]
    fn values_with_ampersand_and_equals_are_underscored() {
        let s = signing_string(&p(&[("text", "a&b=c"), ("sig", "x")]));
        assert_eq!(s, "&text=a_b_c");
    }
}
