//! Chat tokens, both JWT (HS256) via `jsonwebtoken`:
//! - session tokens, signed by the gateway: the session id and the customer identity, so a
//!   reconnecting client resumes its session (on any instance sharing `chat.session_secrets`);
//! - customer tokens, signed by the operator's app for logged-in customers: `phone` and/or `sub`
//!   (the operator's customer id), `name`, `exp`.
//!
//! Several secrets verify (rotation); the first signs.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Who the customer is, as far as a token says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// The operator's customer id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When the operator's token expires: sessions carrying this identity expire with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

impl Verified {
    pub fn is_empty(&self) -> bool {
        self.phone.is_none() && self.cid.is_none()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SessionClaims {
    sid: String,
    /// Token kind: always `chat_session` (a customer token is never accepted as a session token).
    typ: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cust: Option<Verified>,
    iat: u64,
    exp: u64,
}

#[derive(Debug, Deserialize)]
struct CustomerClaims {
    exp: u64,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    phone: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    typ: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed, expired or not signed by a known secret")]
    Invalid,
    #[error("customer token carries neither phone nor sub")]
    NoIdentity,
    #[error("customer tokens are not configured")]
    NotConfigured,
}

pub struct Tokens {
    session_keys: Vec<(EncodingKey, DecodingKey)>,
    customer_keys: Vec<DecodingKey>,
    ttl_secs: u64,
    validation: Validation,
}

const SESSION_TYP: &str = "chat_session";

impl Tokens {
    /// `session_secrets` empty: a random secret for this process (logged by the caller).
    pub fn new(session_secrets: &[String], customer_secrets: &[String], ttl_secs: u64) -> Self {
        let mut secrets: Vec<Vec<u8>> = session_secrets
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect();
        if secrets.is_empty() {
            let random: Vec<u8> = (0..2)
                .flat_map(|_| ulid::Ulid::new().0.to_le_bytes())
                .collect();
            secrets.push(random);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 30;
        validation.validate_aud = false;
        Self {
            session_keys: secrets
                .iter()
                .map(|s| (EncodingKey::from_secret(s), DecodingKey::from_secret(s)))
                .collect(),
            customer_keys: customer_secrets
                .iter()
                .map(|s| DecodingKey::from_secret(s.as_bytes()))
                .collect(),
            ttl_secs,
            validation,
        }
    }

    pub fn issue(&self, session_id: &str, customer: Option<&Verified>) -> String {
        let now = now_secs();
        let claims = SessionClaims {
            sid: session_id.to_string(),
            typ: SESSION_TYP.into(),
            cust: customer.cloned(),
            iat: now,
            exp: (now + self.ttl_secs).min(customer.and_then(|c| c.until).unwrap_or(u64::MAX)),
        };
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.session_keys[0].0,
        )
        .expect("HS256 signing of plain claims cannot fail")
    }

    /// The session id and identity a session token carries.
    pub fn verify_session(&self, token: &str) -> Result<(String, Option<Verified>), TokenError> {
        for (_, key) in &self.session_keys {
            if let Ok(data) = decode::<SessionClaims>(token, key, &self.validation) {
                let c = data.claims;
                if c.typ != SESSION_TYP || c.sid.is_empty() || c.sid.len() > 64 {
                    return Err(TokenError::Invalid);
                }
                return Ok((c.sid, c.cust));
            }
        }
        Err(TokenError::Invalid)
    }

    pub fn customer_tokens_enabled(&self) -> bool {
        !self.customer_keys.is_empty()
    }

    /// Verifies a token from the operator's app (HS256, `exp` required).
    pub fn verify_customer(&self, token: &str) -> Result<Verified, TokenError> {
        if self.customer_keys.is_empty() {
            return Err(TokenError::NotConfigured);
        }
        for key in &self.customer_keys {
            if let Ok(data) = decode::<CustomerClaims>(token, key, &self.validation) {
                let c = data.claims;
                if c.typ.as_deref() == Some(SESSION_TYP) {
                    return Err(TokenError::Invalid);
                }
                let v = Verified {
                    phone: c.phone.filter(|p| !p.trim().is_empty()),
                    cid: c.sub.filter(|s| !s.trim().is_empty()),
                    name: c.name.filter(|n| !n.trim().is_empty()),
                    until: Some(c.exp),
                };
                if v.is_empty() {
                    return Err(TokenError::NoIdentity);
                }
                return Ok(v);
            }
        }
        Err(TokenError::Invalid)
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs a customer token the way an operator's app would (tests, `switchboard sign`).
pub fn sign_customer_token(secret: &str, claims: &serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing of plain claims cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    const S1: &str = "0123456789abcdef0123456789abcdef";
    const S2: &str = "fedcba9876543210fedcba9876543210";
    const C1: &str = "operator-app-secret-1";

    #[test]
    fn session_tokens_round_trip_and_rotate() {
        let old = Tokens::new(&[S2.into()], &[], 60);
        let t = old.issue("01SESSION", None);
        // After rotation the new secret signs, the old one still verifies.
        let rotated = Tokens::new(&[S1.into(), S2.into()], &[], 60);
        assert_eq!(rotated.verify_session(&t).unwrap().0, "01SESSION");
        let other = Tokens::new(&[S1.into()], &[], 60);
        assert_eq!(other.verify_session(&t), Err(TokenError::Invalid));
        let v = Verified {
            phone: Some("+8613800138000".into()),
            cid: None,
            name: None,
            until: None,
        };
        let t2 = rotated.issue("01S2", Some(&v));
        assert_eq!(old.verify_session(&t2), Err(TokenError::Invalid));
        assert_eq!(
            rotated.verify_session(&t2).unwrap(),
            ("01S2".into(), Some(v))
        );
    }

    #[test]
    fn tampered_and_expired_session_tokens_fail() {
        let t = Tokens::new(&[S1.into()], &[], 60);
        let tok = t.issue("01SESSION", None);
        // Another session's claims under this token's signature.
        let other = t.issue("01OTHERSESSION", None);
        let mut parts: Vec<&str> = tok.split('.').collect();
        parts[1] = other.split('.').nth(1).unwrap();
        assert_ne!(parts.join("."), tok);
        assert!(t.verify_session(&parts.join(".")).is_err());
        assert!(t.verify_session("not a token").is_err());
        let expired = sign_customer_token(
            S1,
            &serde_json::json!({"sid": "x", "typ": SESSION_TYP, "iat": 1, "exp": 2}),
        );
        assert_eq!(t.verify_session(&expired), Err(TokenError::Invalid));
    }

    #[test]
    fn customer_tokens_need_a_known_secret_an_identity_and_exp() {
        let t = Tokens::new(&[S1.into()], &[C1.into()], 60);
        let exp = now_secs() + 600;
        let good = sign_customer_token(
            C1,
            &serde_json::json!({"phone": "13800138000", "name": "张三", "exp": exp}),
        );
        let v = t.verify_customer(&good).unwrap();
        assert_eq!(v.phone.as_deref(), Some("13800138000"));
        assert_eq!(v.name.as_deref(), Some("张三"));
        let sub = sign_customer_token(C1, &serde_json::json!({"sub": "C-1", "exp": exp}));
        assert_eq!(t.verify_customer(&sub).unwrap().cid.as_deref(), Some("C-1"));
        let none = sign_customer_token(C1, &serde_json::json!({"name": "x", "exp": exp}));
        assert_eq!(t.verify_customer(&none), Err(TokenError::NoIdentity));
        let no_exp = sign_customer_token(C1, &serde_json::json!({"sub": "C-1"}));
        assert_eq!(t.verify_customer(&no_exp), Err(TokenError::Invalid));
        let wrong = sign_customer_token(S1, &serde_json::json!({"sub": "C-1", "exp": exp}));
        assert_eq!(t.verify_customer(&wrong), Err(TokenError::Invalid));
        // A session token is not a customer token, even when the secrets coincide.
        let same = Tokens::new(&[S1.into()], &[S1.into()], 60);
        let session = same.issue("01S", Some(&v));
        assert!(same.verify_customer(&session).is_err());
        // The session lives no longer than the operator's token.
        let short = sign_customer_token(
            C1,
            &serde_json::json!({"sub": "C-1", "exp": now_secs() + 5}),
        );
        let v = t.verify_customer(&short).unwrap();
        let session = t.issue("01S", Some(&v));
        let (_, cust) = t.verify_session(&session).unwrap();
        assert_eq!(cust.unwrap().until, v.until);
        let exp: u64 = {
            use base64::Engine;
            let claims = session.split('.').nth(1).unwrap();
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(claims)
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&raw).unwrap()["exp"]
                .as_u64()
                .unwrap()
        };
        assert_eq!(Some(exp), v.until);
        let unconfigured = Tokens::new(&[S1.into()], &[], 60);
        assert_eq!(
            unconfigured.verify_customer(&good),
            Err(TokenError::NotConfigured)
        );
    }
}
