//! Signature checks shared by channels: HMAC in constant time over raw bytes, timestamp windows,
//! two secrets for rotation, and the `enforce | log_only | off` modes.

use crate::config::SignatureMode;
use crate::error::{Reason, Rejection};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Checks `signature_hex` against HMAC-SHA256(secret, parts concatenated) for each secret.
/// Returns the index of the secret that matched (0 = current, 1 = previous), for the log.
/// `verify_slice` compares in constant time; every secret is tried so timing does not tell
/// which one matched.
pub fn verify_hmac_sha256_hex(
    secrets: &[String],
    parts: &[&[u8]],
    signature_hex: &str,
) -> Option<usize> {
    let provided = hex::decode(signature_hex.trim()).ok()?;
    if provided.len() != 32 {
        return None;
    }
    let mut matched = None;
    for (i, secret) in secrets.iter().enumerate() {
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
        for p in parts {
            mac.update(p);
        }
        if mac.verify_slice(&provided).is_ok() && matched.is_none() {
            matched = Some(i);
        }
    }
    matched
}

/// HMAC-SHA256 hex, for `switchboard sign` and tests.
pub fn sign_hex(secret: &str, parts: &[&[u8]]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    for p in parts {
        mac.update(p);
    }
    hex::encode(mac.finalize().into_bytes())
}

/// A timestamp (unix seconds) is acceptable when within `tolerance` of `now`, in both directions.
pub fn timestamp_fresh(ts: i64, now: i64, tolerance_secs: u64) -> bool {
    now.abs_diff(ts) <= tolerance_secs
}

/// Applies a channel's mode to the outcome of its check. In `log_only` a failure is logged and
/// counted but let through; in `off` nothing was checked.
pub fn apply_mode(
    mode: SignatureMode,
    channel: &'static str,
    outcome: Result<(), Reason>,
) -> Result<(), Rejection> {
    match (mode, outcome) {
        (_, Ok(())) | (SignatureMode::Off, _) => Ok(()),
        (SignatureMode::LogOnly, Err(reason)) => {
            tracing::warn!(
                channel,
                reason = reason.code(),
                "signature check failed; allowed (log_only)"
            );
            metrics::counter!(crate::telemetry::SIGNATURE_LOG_ONLY, "channel" => channel, "reason" => reason.code())
                .increment(1);
            Ok(())
        }
        (SignatureMode::Enforce, Err(reason)) => {
            tracing::info!(
                channel,
                reason = reason.code(),
                "signature check failed; rejected"
            );
            Err(Rejection::unauthorized(reason))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_of_two_secrets_verifies() {
        let secrets = vec![
            "current-secret-0001".to_string(),
            "previous-secret-01".to_string(),
        ];
        let sig_old = sign_hex("previous-secret-01", &[b"123", b".", b"{}"]);
        let sig_new = sign_hex("current-secret-0001", &[b"123", b".", b"{}"]);
        assert_eq!(
            verify_hmac_sha256_hex(&secrets, &[b"123.{}"], &sig_new),
            Some(0)
        );
        assert_eq!(
            verify_hmac_sha256_hex(&secrets, &[b"123.{}"], &sig_old),
            Some(1)
        );
        assert_eq!(
            verify_hmac_sha256_hex(&secrets, &[b"123.{ }"], &sig_new),
            None
        );
        assert_eq!(verify_hmac_sha256_hex(&secrets, &[b"123.{}"], "zz"), None);
        assert_eq!(
            verify_hmac_sha256_hex(&secrets, &[b"123.{}"], &sig_new[..62]),
            None
        );
        let upper = sig_new.to_uppercase();
        assert_eq!(
            verify_hmac_sha256_hex(&secrets, &[b"123.{}"], &upper),
            Some(0)
        );
    }

    #[test]
    fn timestamp_window_applies_both_ways() {
        assert!(timestamp_fresh(1000, 1300, 300));
        assert!(timestamp_fresh(1300, 1000, 300));
        assert!(!timestamp_fresh(1000, 1301, 300));
        assert!(!timestamp_fresh(1302, 1001, 300));
        assert!(
            !timestamp_fresh(i64::MIN, 1_800_000_000, 300),
            "no overflow"
        );
        assert!(!timestamp_fresh(i64::MAX, -5, 300));
    }

    #[test]
    fn modes() {
        assert!(apply_mode(SignatureMode::Enforce, "api", Err(Reason::BadSignature)).is_err());
        assert!(apply_mode(SignatureMode::LogOnly, "api", Err(Reason::BadSignature)).is_ok());
        assert!(apply_mode(SignatureMode::Off, "api", Err(Reason::BadSignature)).is_ok());
        let e = apply_mode(SignatureMode::Enforce, "api", Err(Reason::StaleTimestamp)).unwrap_err();
        assert_eq!(e.reason, Reason::StaleTimestamp);
        assert_eq!(e.message, "request authentication failed");
    }
}
