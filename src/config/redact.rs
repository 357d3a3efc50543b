//! The effective configuration as `switchboard check-config` prints it: every secret replaced by
//! [`MARKER`], so the output can go into a ticket or a chat without leaking credentials.
//!
//! Secrets are named in one place, [`SECRET_KEYS`]. A key added later whose name looks like a
//! secret (`password`, `secret`, `token`, `*_key(s)`) is redacted even before it is listed, and
//! the unit tests below fail until it is listed in [`SECRET_KEYS`] or, when it is not a secret
//! after all, in [`NOT_SECRET`]. Lists keep their length (`["<redacted>", "<redacted>"]`: two
//! secrets are set, as during a rotation) and empty values stay empty (nothing is set).

use super::Config;

pub const MARKER: &str = "<redacted>";

/// Dotted paths of every secret-bearing key. A string is redacted when not empty, every element
/// of a list is, and every value of a table.
pub const SECRET_KEYS: &[&str] = &[
    "api.secrets",
    "twilio.auth_tokens",
    "vonage.secrets",
    "alibaba.path_token",
    "alibaba.previous_path_token",
    "smpp.token",
    "smpp.previous_token",
    "email.inbound_tokens",
    "email.mailgun_signing_keys",
    "wechat.tokens",
    "wechat.encoding_aes_keys",
    "weibo.app_secrets",
    "meta.app_secrets",
    "meta.verify_token",
    "telegram.secret_tokens",
    "x.consumer_secrets",
    "chat.session_secrets",
    "chat.customer_token_secrets",
];

/// Addresses that may carry credentials in their user info (`redis://user:password@host`): the
/// whole user info is replaced (user name included, and a bare `redis://password@host`), the
/// host, port and database stay readable.
pub const SECRET_URLS: &[&str] = &["redis.url"];

/// Keys whose names look like secrets but hold none.
pub const NOT_SECRET: &[&str] = &["limits.max_keys", "email.tls_key_path"];

/// Pass-through maps (librdkafka properties) whose values are secret when their key says so:
/// `sasl.password`, `ssl.key.password`, `ssl.keystore.password`, `ssl.key.pem`,
/// `sasl.oauthbearer.client.secret`, `sasl.oauthbearer.config` (may embed a client secret), ...
pub const SECRET_MAPS: &[&str] = &["kafka.extra"];

fn map_key_is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "key.pem",
        "keystore",
        "oauthbearer.config",
        "jaas",
        "token",
    ]
    .iter()
    .any(|w| k.contains(w))
}

/// The heuristic behind the safety net: the last part of a key's path.
pub fn name_looks_secret(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ["secret", "token", "password", "passwd", "credential"]
        .iter()
        .any(|w| n.contains(w))
        || n.ends_with("_key")
        || n.ends_with("_keys")
        || n == "key"
}

fn is_secret_url(path: &str) -> bool {
    SECRET_URLS.contains(&path)
}

/// `scheme://userinfo@host...` → `scheme://<redacted>@host...`; unchanged without user info.
fn mask_url_userinfo(s: &str) -> Option<String> {
    let scheme_end = s.find("://")? + 3;
    let rest = &s[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some(format!("{}{MARKER}{}", &s[..scheme_end], &rest[at..]))
}

fn is_secret_path(path: &str) -> bool {
    if SECRET_KEYS.contains(&path) {
        return true;
    }
    if NOT_SECRET.contains(&path) {
        return false;
    }
    if let Some((parent, key)) = path.rsplit_once('.') {
        if SECRET_MAPS.contains(&parent) {
            return map_key_is_secret(key);
        }
    }
    name_looks_secret(path.rsplit('.').next().unwrap_or(path))
}

/// The effective configuration as pretty TOML, secrets redacted.
pub fn to_redacted_toml(cfg: &Config) -> Result<String, String> {
    let mut v = toml::Value::try_from(cfg).map_err(|e| e.to_string())?;
    redact_value(&mut v, "");
    toml::to_string_pretty(&v).map_err(|e| e.to_string())
}

/// Redacts `v` (whose dotted path is `path`) in place.
pub fn redact_value(v: &mut toml::Value, path: &str) {
    if is_secret_url(path) {
        if let toml::Value::String(s) = v {
            if let Some(masked) = mask_url_userinfo(s) {
                *s = masked;
            }
        }
        return;
    }
    if !path.is_empty() && is_secret_path(path) {
        blank(v);
        return;
    }
    match v {
        toml::Value::Table(t) => {
            for (k, child) in t.iter_mut() {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                redact_value(child, &p);
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(|e| redact_value(e, path)),
        toml::Value::String(s) => {
            if let Some(masked) = mask_url_password(s) {
                *s = masked;
            }
        }
        _ => {}
    }
}

/// Replaces every non-empty leaf under `v` with the marker, keeping list lengths.
fn blank(v: &mut toml::Value) {
    match v {
        toml::Value::String(s) if s.is_empty() => {}
        toml::Value::Array(a) => a.iter_mut().for_each(blank),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, e)| blank(e)),
        other => *other = toml::Value::String(MARKER.into()),
    }
}

/// `scheme://user:password@host/...` → `scheme://user:<redacted>@host/...`: a URL-shaped value
/// (a store's address, say) may carry a password in its user info whatever its key is called.
/// Hand-written: a URL parser would be a new dependency for a two-delimiter search.
fn mask_url_password(s: &str) -> Option<String> {
    let scheme_end = s.find("://")? + 3;
    let rest = &s[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    let colon = rest[..at].find(':')?;
    if colon + 1 == at {
        return None;
    }
    Some(format!(
        "{}{}:{MARKER}{}",
        &s[..scheme_end],
        &rest[..colon],
        &rest[at..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key path of the serialized default config (lists and tables included).
    fn paths(v: &toml::Value, path: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = v {
            for (k, child) in t {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                out.push(p.clone());
                paths(child, &p, out);
            }
        }
    }

    fn default_paths() -> Vec<String> {
        let mut out = Vec::new();
        paths(
            &toml::Value::try_from(Config::default()).unwrap(),
            "",
            &mut out,
        );
        out
    }

    /// A new key that looks like a secret makes this fail until someone decides: SECRET_KEYS or
    /// NOT_SECRET. (It is redacted in the meantime anyway.)
    #[test]
    fn every_secret_looking_key_is_classified() {
        let unlisted: Vec<String> = default_paths()
            .into_iter()
            .filter(|p| name_looks_secret(p.rsplit('.').next().unwrap()))
            .filter(|p| !SECRET_KEYS.contains(&p.as_str()) && !NOT_SECRET.contains(&p.as_str()))
            .filter(|p| !SECRET_MAPS.iter().any(|m| p.starts_with(&format!("{m}."))))
            .collect();
        assert!(
            unlisted.is_empty(),
            "list these in SECRET_KEYS (or NOT_SECRET): {unlisted:?}"
        );
    }

    #[test]
    fn every_listed_key_exists() {
        let all = default_paths();
        for k in SECRET_KEYS
            .iter()
            .chain(NOT_SECRET)
            .chain(SECRET_MAPS)
            .chain(SECRET_URLS)
        {
            assert!(all.iter().any(|p| p == k), "{k} is not a config key");
        }
    }

    /// A config with every secret set: none survives, the marker stands in for each, lists keep
    /// their lengths, and non-secret values (including harmless librdkafka properties) stay.
    #[test]
    fn no_secret_survives_and_shapes_stay() {
        let pairs = [
            (
                "api.secrets",
                r#"["api-secret-aaaaaaaa1", "api-secret-bbbbbbbb2"]"#,
            ),
            ("twilio.auth_tokens", r#"["twilio-token-1"]"#),
            (
                "vonage.secrets",
                r#"["vonage-secret-1", "vonage-secret-2"]"#,
            ),
            ("alibaba.path_token", r#""alibaba-path-token-1""#),
            ("alibaba.previous_path_token", r#""alibaba-path-token-0""#),
            ("smpp.token", r#""smpp-token-1""#),
            ("smpp.previous_token", r#""smpp-token-0""#),
            ("email.inbound_tokens", r#"["inbound-token-11111111"]"#),
            ("email.mailgun_signing_keys", r#"["mailgun-key-1"]"#),
            ("wechat.tokens", r#"["wechattoken1"]"#),
            (
                "wechat.encoding_aes_keys",
                r#"["abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"]"#,
            ),
            ("weibo.app_secrets", r#"["weibo-secret-1"]"#),
            ("meta.app_secrets", r#"["meta-secret-1"]"#),
            ("meta.verify_token", r#""meta-verify-1""#),
            ("telegram.secret_tokens", r#"["telegram-secret-1"]"#),
            ("x.consumer_secrets", r#"["x-secret-1"]"#),
            (
                "chat.session_secrets",
                r#"["chat-session-secret-0123456789abcdef"]"#,
            ),
            (
                "chat.customer_token_secrets",
                r#"["chat-customer-secret-1", "chat-customer-secret-2"]"#,
            ),
        ];
        assert_eq!(
            pairs.len(),
            SECRET_KEYS.len(),
            "a listed key has no case here"
        );
        let mut sections: std::collections::BTreeMap<&str, String> = Default::default();
        for (k, v) in pairs {
            let (section, key) = k.split_once('.').unwrap();
            sections
                .entry(section)
                .or_default()
                .push_str(&format!("{key} = {v}\n"));
        }
        let mut text: String = sections
            .iter()
            .map(|(s, body)| format!("[{s}]\n{body}"))
            .collect();
        text.push_str(concat!(
            "[kafka]\nbrokers = \"sasl://kafkauser:kafka-url-pass@broker:9093\"\n",
            "[kafka.extra]\n\"sasl.password\" = \"kafka-sasl-pass\"\n",
            "\"ssl.key.password\" = \"kafka-key-pass\"\n",
            "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.username\" = \"kafkauser\"\n",
        ));
        let cfg = Config::from_toml_str(&text, Vec::new()).unwrap();
        let out = to_redacted_toml(&cfg).unwrap();
        // Debug output (a `{:?}`, a panic message) is the same redacted text.
        assert_eq!(format!("{cfg:?}"), out);
        for secret in [
            "api-secret",
            "twilio-token",
            "vonage-secret",
            "alibaba-path",
            "smpp-token",
            "inbound-token",
            "mailgun-key",
            "wechattoken",
            "abcdefghijklmnop",
            "weibo-secret",
            "meta-secret",
            "meta-verify",
            "telegram-secret",
            "x-secret",
            "chat-session",
            "chat-customer",
            "kafka-sasl-pass",
            "kafka-key-pass",
            "kafka-url-pass",
        ] {
            assert!(!out.contains(secret), "{secret} survived:\n{out}");
        }
        let back: toml::Table = out.parse().unwrap();
        let red = toml::Value::String(MARKER.into());
        assert_eq!(
            back["api"]["secrets"],
            toml::Value::Array(vec![red.clone(), red.clone()])
        );
        assert_eq!(back["smpp"]["token"], red);
        assert_eq!(back["kafka"]["extra"]["sasl.password"], red);
        assert_eq!(
            back["kafka"]["extra"]["security.protocol"].as_str(),
            Some("SASL_SSL")
        );
        assert_eq!(
            back["kafka"]["extra"]["sasl.username"].as_str(),
            Some("kafkauser")
        );
        assert_eq!(
            back["kafka"]["brokers"].as_str(),
            Some("sasl://kafkauser:<redacted>@broker:9093")
        );
        assert_eq!(back["http"]["listen"].as_str(), Some("127.0.0.1:8080"));
        assert_eq!(back["limits"]["max_keys"].as_integer(), Some(1_000_000));
    }

    #[test]
    fn unset_secrets_stay_visibly_unset() {
        let out = to_redacted_toml(&Config::default()).unwrap();
        let back: toml::Table = out.parse().unwrap();
        assert_eq!(back["smpp"]["token"].as_str(), Some(""));
        assert_eq!(
            back["meta"]["app_secrets"].as_array().map(Vec::len),
            Some(0)
        );
        // The shipped dev-only defaults are secrets like any other.
        assert_eq!(back["api"]["secrets"][0].as_str(), Some(MARKER));
    }

    #[test]
    fn unlisted_secret_looking_keys_are_redacted_anyway() {
        let mut v: toml::Value = toml::from_str(
            "[redis]\npassword = \"pw1\"\nurl = \"redis://:pw2@cache:6379/0\"\n[tls]\nkey_path = \"/etc/k.pem\"\nprivate_key = \"pem\"\n",
        )
        .unwrap();
        redact_value(&mut v, "");
        let s = toml::to_string(&v).unwrap();
        assert!(
            !s.contains("pw1") && !s.contains("pw2") && !s.contains("\"pem\""),
            "{s}"
        );
        assert!(s.contains("/etc/k.pem"), "a path is no secret: {s}");
    }

    /// check-config with a Redis URL: the credentials go, the address stays.
    #[test]
    fn redis_url_credentials_are_redacted() {
        for (url, want) in [
            (
                "redis://switchboard:redis-pass-1@cache.internal:6379/2",
                "redis://<redacted>@cache.internal:6379/2",
            ),
            (
                "redis://:redis-pass-2@cache.internal:6379",
                "redis://<redacted>@cache.internal:6379",
            ),
            (
                "redis://redis-pass-3@cache.internal",
                "redis://<redacted>@cache.internal",
            ),
            (
                "redis://cache.internal:6379/0",
                "redis://cache.internal:6379/0",
            ),
        ] {
            let text = format!("[dedupe]\nbackend = \"redis\"\n[redis]\nurl = \"{url}\"\n");
            let cfg = Config::from_toml_str(&text, Vec::new()).unwrap();
            let out = to_redacted_toml(&cfg).unwrap();
            assert!(!out.contains("redis-pass"), "{out}");
            let back: toml::Table = out.parse().unwrap();
            assert_eq!(back["redis"]["url"].as_str(), Some(want));
            assert_eq!(format!("{cfg:?}"), out);
        }
    }

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(
            mask_url_password("redis://user:pw@host:6379/0").as_deref(),
            Some("redis://user:<redacted>@host:6379/0")
        );
        assert_eq!(
            mask_url_password("rediss://:pw@host").as_deref(),
            Some("rediss://:<redacted>@host")
        );
        assert_eq!(mask_url_password("redis://user@host"), None);
        assert_eq!(mask_url_password("http://host/a@b:c"), None);
        assert_eq!(mask_url_password("127.0.0.1:9092"), None);
    }
}
