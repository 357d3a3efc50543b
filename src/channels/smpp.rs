//! Generic SMPP-to-HTTP bridge, Jasmin style: `GET|POST /hooks/smpp` with form parameters
//! `id, from, to, origin-connector, priority, coding, validity, content` (and `binary`, hex).
//! The bridge requeues unless the body is exactly `ACK/Jasmin`, so that is sent only once the
//! record is durable. Dedupe on `id`. Bridges sign nothing: the source must be in
//! `smpp.allow_networks`, and `smpp.token` (if set) must come as `X-Switchboard-Token` or `token`.
//!
//! Text: `coding=8` is UCS-2: the raw bytes of `content` (or `binary` hex) are decoded as
//! UTF-16BE, so Chinese text arrives intact; other codings are taken as UTF-8. Bridges that pass
//! long SMS in parts send the SMPP `sar-msg-ref-num`, `sar-total-segments`, `sar-segment-seqnum`
//! values; those parts are joined.

use super::segments::{Assembler, Part};
use super::{form_get, form_pairs, network_and_token, sms_identity, Allowlist, Channel, Inbound};
use crate::config::SmppConfig;
use crate::error::{Reason, Rejection};
use crate::http::{text_response, Resp};
use crate::identity::Normalizer;
use crate::pipeline::{Pipeline, RequestCtx};
use crate::record::{ChannelKind, Intake};
use futures_util::future::BoxFuture;
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};

pub const NAME: &str = "smpp";
pub const ACK: &str = "ACK/Jasmin";

pub struct Smpp {
    cfg: SmppConfig,
    tokens: Vec<String>,
    allow: Allowlist,
    normalizer: Normalizer,
    assembler: Assembler,
}

/// The raw bytes of one form parameter (form_urlencoded's parser decodes lossily to UTF-8,
/// which would destroy UCS-2 content).
fn raw_param(form: &[u8], name: &str) -> Option<Vec<u8>> {
    form.split(|b| *b == b'&').find_map(|pair| {
        let (k, v) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        let key: Vec<u8> = percent_encoding::percent_decode(&plus_to_space(k)).collect();
        (key == name.as_bytes())
            .then(|| percent_encoding::percent_decode(&plus_to_space(v)).collect())
    })
}

fn plus_to_space(b: &[u8]) -> Vec<u8> {
    b.iter()
        .map(|c| if *c == b'+' { b' ' } else { *c })
        .collect()
}

/// Text from the bridge's bytes and SMPP data coding.
pub fn decode_text(bytes: &[u8], coding: u8) -> String {
    if coding == 8 && bytes.len().is_multiple_of(2) {
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        if let Ok(s) = String::from_utf16(&units) {
            return s;
        }
    }
    String::from_utf8_lossy(bytes).into_owned()
}

impl Smpp {
    pub fn new(
        cfg: SmppConfig,
        normalizer: Normalizer,
        assembler: Assembler,
    ) -> Result<Self, String> {
        let allow = Allowlist::parse(&cfg.allow_networks)
            .map_err(|e| format!("smpp.allow_networks: {e}"))?;
        let tokens = vec![cfg.token.clone(), cfg.previous_token.clone()];
        Ok(Self {
            cfg,
            tokens,
            allow,
            normalizer,
            assembler,
        })
    }
}

impl Channel for Smpp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn allow(&self) -> &'static str {
        "POST, GET"
    }

    fn precheck(&self, parts: &Parts, ctx: &RequestCtx) -> Result<(), Rejection> {
        super::get_or_post(parts, &["application/x-www-form-urlencoded"])?;
        // The token may also be in the body; checked in `handle` then. Network first.
        network_and_token(self.cfg.auth_mode, NAME, &self.allow, ctx.peer, None)
    }

    fn handle<'a>(
        &'a self,
        inbound: Inbound,
        _pipeline: &'a Pipeline,
    ) -> BoxFuture<'a, Result<Resp, Rejection>> {
        Box::pin(async move {
            let raw: &[u8] = if inbound.parts.method == Method::GET {
                inbound.parts.uri.query().unwrap_or("").as_bytes()
            } else {
                &inbound.body
            };
            let p = form_pairs(raw);
            if !self.cfg.token.is_empty() {
                let got = inbound
                    .parts
                    .headers
                    .get("x-switchboard-token")
                    .and_then(|v| v.to_str().ok())
                    .or_else(|| form_get(&p, "token"));
                network_and_token(
                    self.cfg.auth_mode,
                    NAME,
                    &self.allow,
                    inbound.ctx.peer,
                    Some((&self.tokens, got)),
                )?;
            }
            let id = form_get(&p, "id")
                .filter(|s| !s.is_empty())
                .ok_or_else(|| Rejection::new(Reason::InvalidEvent, "id is missing"))?;
            let from = form_get(&p, "from")
                .filter(|s| !s.is_empty())
                .ok_or_else(|| Rejection::new(Reason::InvalidEvent, "from is missing"))?;
            let coding: u8 = form_get(&p, "coding")
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let bytes = match form_get(&p, "binary").filter(|b| !b.is_empty()) {
                Some(h) => hex::decode(h.trim())
                    .map_err(|_| Rejection::new(Reason::InvalidEvent, "binary is not hex"))?,
                None => raw_param(raw, "content").unwrap_or_default(),
            };
            let mut i = Intake::new(ChannelKind::Sms, NAME, decode_text(&bytes, coding));
            i.provider_message_id = Some(id.to_string());
            i.account = form_get(&p, "origin-connector").map(str::to_string);
            i.identity = sms_identity(from, &self.normalizer, NAME, i.account.as_deref());
            for (k, m) in [
                ("to", "to"),
                ("origin-connector", "origin_connector"),
                ("coding", "coding"),
            ] {
                if let Some(v) = form_get(&p, k) {
                    i.metadata.insert(m.into(), v.to_string());
                }
            }
            let num = |k| form_get(&p, k).and_then(|v| v.parse::<u8>().ok());
            let part = Part {
                reference: form_get(&p, "sar-msg-ref-num").unwrap_or("").to_string(),
                total: num("sar-total-segments").unwrap_or(1),
                index: num("sar-segment-seqnum").unwrap_or(1),
                intake: i,
            };
            self.assembler.submit(&inbound.ctx, part).await?;
            Ok(text_response(StatusCode::OK, "text/plain", ACK))
        })
    }

    fn reject(&self, r: &Rejection) -> Resp {
        super::with_retry_after(
            text_response(
                super::provider_status(r),
                "text/plain",
                r.reason.code().to_string(),
            ),
            r,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ucs2_content_decodes_exactly() {
        let text = "宽带断网三天了，请尽快处理！";
        let ucs2: Vec<u8> = text.encode_utf16().flat_map(|u| u.to_be_bytes()).collect();
        assert_eq!(decode_text(&ucs2, 8), text);
        let form: String = format!(
            "id=x&coding=8&content={}",
            percent_encoding::percent_encode(&ucs2, percent_encoding::NON_ALPHANUMERIC)
        );
        let raw = raw_param(form.as_bytes(), "content").unwrap();
        assert_eq!(decode_text(&raw, 8), text);
        assert_eq!(decode_text("网络".as_bytes(), 0), "网络");
    }

    #[test]
    fn raw_param_handles_plus_and_missing() {
        assert_eq!(
            raw_param(b"a=1&content=Network+down", "content").unwrap(),
            b"Network down"
        );
        assert!(raw_param(b"a=1", "content").is_none());
    }
}
