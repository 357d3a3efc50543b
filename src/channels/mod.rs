//! Channel adapters: each turns one authenticated request into `Intake`s for the pipeline and
//! formats the reply its sender expects. One provider, one file.
//!
//! A channel sees the request head before the body is read (`precheck`: method, content type,
//! source network) and then the raw bytes (`handle`). It never talks to a sink; it hands
//! `Intake`s to the pipeline and turns the pipeline's answer (or a `Rejection`) into the
//! provider's response format.

pub mod alibaba;
pub mod api;
pub mod chat;
pub mod email;
pub mod email_intake;
pub mod meta;
pub mod segments;
pub mod smpp;
pub mod telegram;
pub mod twilio;
pub mod vonage;
pub mod wechat;
pub mod weibo;
pub mod x;

use crate::error::{Reason, Rejection};
use crate::http::{rejection_response, Resp};
use crate::pipeline::{Pipeline, RequestCtx};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use hyper::header::CONTENT_TYPE;
use hyper::http::request::Parts;
use hyper::HeaderMap;
use ipnet::IpNet;
use std::net::IpAddr;

/// One request as a channel sees it after the listener read it within its limits.
pub struct Inbound {
    pub parts: Parts,
    pub body: Bytes,
    pub ctx: RequestCtx,
}

pub trait Channel: Send + Sync + 'static {
    /// The channel's name: metric label and log field.
    fn name(&self) -> &'static str;

    /// Methods accepted, for `Allow` on 405.
    fn allow(&self) -> &'static str {
        "POST"
    }

    /// A body cap of the channel's own (mail carries attachments); `http.max_body_bytes` if none.
    fn max_body(&self) -> Option<usize> {
        None
    }

    /// Cheap checks on the request head, before the body is read.
    fn precheck(&self, parts: &Parts, ctx: &RequestCtx) -> Result<(), Rejection>;

    fn handle<'a>(
        &'a self,
        inbound: Inbound,
        pipeline: &'a Pipeline,
    ) -> BoxFuture<'a, Result<Resp, Rejection>>;

    /// The provider's expected shape for an error; the JSON error body by default.
    fn reject(&self, r: &Rejection) -> Resp {
        rejection_response(r)
    }
}

/// Providers expect 403 for a failed signature or token (our own API answers 401).
pub fn provider_status(r: &Rejection) -> hyper::StatusCode {
    match r.reason {
        Reason::MissingSignature
        | Reason::BadSignature
        | Reason::StaleTimestamp
        | Reason::Forbidden => hyper::StatusCode::FORBIDDEN,
        ref other => other.status(),
    }
}

/// A provider-facing error: the JSON error body, 403 for authentication failures, and
/// `Retry-After` where the rejection carries one.
pub fn provider_json_reject(r: &Rejection) -> Resp {
    with_retry_after(
        crate::http::json_response(provider_status(r), r.body_json()),
        r,
    )
}

/// Adds `Retry-After` when the rejection says how long to wait.
pub fn with_retry_after(mut resp: Resp, r: &Rejection) -> Resp {
    if let Some(s) = r.retry_after_secs() {
        resp.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from(s),
        );
    }
    resp
}

/// Record reference read to callers and sent in auto-replies: the last 8 characters of the
/// record id (its random part), enough to find the record downstream.
pub fn reference(id: &ulid::Ulid) -> String {
    let s = id.to_string();
    s[s.len() - 8..].to_string()
}

/// Constant-time equality for tokens.
pub fn token_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Source network and token check shared by the providers that sign nothing.
pub fn network_and_token(
    mode: crate::config::SignatureMode,
    channel: &'static str,
    allow: &Allowlist,
    peer: IpAddr,
    token: Option<(&[String], Option<&str>)>,
) -> Result<(), Rejection> {
    let outcome = if !allow.allows(peer) {
        Err(Reason::Forbidden)
    } else {
        match token {
            // Every accepted token is compared (current and previous, during rotation).
            Some((wants, Some(got)))
                if wants
                    .iter()
                    .fold(false, |ok, w| ok | (!w.is_empty() && token_eq(w, got))) =>
            {
                Ok(())
            }
            Some((_, None)) => Err(Reason::MissingSignature),
            Some(_) => Err(Reason::BadSignature),
            None => Ok(()),
        }
    };
    crate::auth::apply_mode(mode, channel, outcome)
}

/// The essence of the Content-Type (`application/json; charset=utf-8` → `application/json`).
pub fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

pub fn require_content_type(headers: &HeaderMap, allowed: &[&str]) -> Result<(), Rejection> {
    let ct = content_type(headers);
    if allowed.contains(&ct.as_str()) {
        Ok(())
    } else {
        Err(Rejection::new(
            Reason::UnsupportedMediaType,
            format!("Content-Type must be one of: {}", allowed.join(", ")),
        ))
    }
}

/// Webhooks that take GET (parameters in the query) or POST with one of `types`.
pub fn get_or_post(parts: &Parts, types: &[&str]) -> Result<(), Rejection> {
    match parts.method {
        hyper::Method::GET => Ok(()),
        hyper::Method::POST => require_content_type(&parts.headers, types),
        _ => Err(Rejection::new(Reason::MethodNotAllowed, "use POST or GET")),
    }
}

/// A flat JSON object's values as strings (numbers and booleans in their JSON form), the way
/// form-posting providers send the same fields as JSON.
pub fn json_params(body: &[u8]) -> Result<Vec<(String, String)>, Rejection> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Rejection::new(Reason::MalformedJson, e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| Rejection::new(Reason::InvalidEvent, "JSON body must be an object"))?;
    Ok(obj
        .iter()
        .map(|(k, v)| {
            let s = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), s)
        })
        .collect())
}

/// Decoded `application/x-www-form-urlencoded` pairs, in order, repeated names kept.
pub fn form_pairs(bytes: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(bytes).into_owned().collect()
}

pub fn form_get<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Networks a source address must come from (empty list: any).
#[derive(Debug, Clone, Default)]
pub struct Allowlist(Vec<IpNet>);

impl Allowlist {
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| {
                e.parse::<IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("`{e}` is not an address or CIDR network"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Allowlist)
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.is_empty() || self.0.iter().any(|n| n.contains(&ip))
    }
}

/// A phone number from an SMS platform, in E.164: SMSCs often send international numbers
/// without `+` (`8613800138000`, `447700900001`), so when the number is not valid as written (in
/// the default region) it is tried with `+`.
pub fn msisdn(raw: &str, region: &crate::identity::Normalizer) -> Option<String> {
    let t = raw.trim();
    region.phone(t).ok().or_else(|| {
        let digits = t.trim_start_matches('+');
        region.phone(&format!("+{digits}")).ok()
    })
}

/// The sender of an SMS: its phone when valid; otherwise (short codes, alphanumeric senders,
/// numbers outside any plan) the raw sender scoped to the provider, so the complaint is kept.
pub fn sms_identity(
    raw: &str,
    region: &crate::identity::Normalizer,
    provider: &str,
    account: Option<&str>,
) -> crate::identity::RawIdentity {
    match msisdn(raw, region) {
        Some(p) => crate::identity::RawIdentity {
            phone: Some(p),
            ..Default::default()
        },
        None => crate::identity::RawIdentity {
            social: Some(crate::identity::SocialId {
                platform: provider.to_string(),
                account: account.map(str::to_string),
                id: raw.trim().to_string(),
                handle: None,
            }),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist_matches_networks_and_mapped_v4() {
        let a = Allowlist::parse(&["10.0.0.0/8".into(), "192.0.2.7".into()]).unwrap();
        assert!(a.allows("10.1.2.3".parse().unwrap()));
        assert!(a.allows("192.0.2.7".parse().unwrap()));
        assert!(a.allows("::ffff:10.9.9.9".parse().unwrap()));
        assert!(!a.allows("192.0.2.8".parse().unwrap()));
        assert!(Allowlist::default().allows("203.0.113.1".parse().unwrap()));
        assert!(Allowlist::parse(&["nonsense".into()]).is_err());
    }

    #[test]
    fn msisdns_without_plus_are_international() {
        let n = crate::identity::Normalizer::new("CN");
        assert_eq!(msisdn("13800138000", &n).unwrap(), "+8613800138000");
        assert_eq!(msisdn("8613800138000", &n).unwrap(), "+8613800138000");
        assert_eq!(msisdn("447911123456", &n).unwrap(), "+447911123456");
        assert_eq!(msisdn("+14155552671", &n).unwrap(), "+14155552671");
        assert_eq!(msisdn("10086", &n), None);
        let id = sms_identity("10086", &n, "smpp", Some("smppc"));
        assert_eq!(id.social.unwrap().id, "10086");
        assert!(id.phone.is_none());
    }

    #[test]
    fn tokens_rotate_and_networks_gate() {
        use crate::config::SignatureMode::*;
        let tokens = vec!["current-token".to_string(), "previous-token".to_string()];
        let any = Allowlist::default();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        for got in ["current-token", "previous-token"] {
            network_and_token(Enforce, "t", &any, lo, Some((&tokens, Some(got)))).unwrap();
        }
        let e =
            network_and_token(Enforce, "t", &any, lo, Some((&tokens, Some("nope")))).unwrap_err();
        assert_eq!(e.reason, Reason::BadSignature);
        let e = network_and_token(Enforce, "t", &any, lo, Some((&tokens, None))).unwrap_err();
        assert_eq!(e.reason, Reason::MissingSignature);
        // An unset previous token never matches an empty one.
        let one = vec!["current-token".to_string(), String::new()];
        assert!(network_and_token(Enforce, "t", &any, lo, Some((&one, Some("")))).is_err());
        let tenet = Allowlist::parse(&["10.0.0.0/8".into()]).unwrap();
        let e = network_and_token(Enforce, "t", &tenet, lo, None).unwrap_err();
        assert_eq!(e.reason, Reason::Forbidden);
        assert_eq!(provider_status(&e), hyper::StatusCode::FORBIDDEN);
        network_and_token(LogOnly, "t", &tenet, lo, None).unwrap();
        network_and_token(Off, "t", &tenet, lo, None).unwrap();
    }

    #[test]
    fn form_pairs_decode_plus_and_percent() {
        let p = form_pairs(b"Body=My+broadband+%E6%96%AD%E7%BD%91&From=%2B1415&Body=2");
        assert_eq!(form_get(&p, "Body"), Some("My broadband 断网"));
        assert_eq!(form_get(&p, "From"), Some("+1415"));
        assert_eq!(p.len(), 3);
    }
}
