//! The lease capability (docs/tenancy.md, ADR 0021): a token that proves "this request comes from
//! whoever received the allocation", where a caller id proves nothing (the student is root on the
//! lab VM and every caller id of the track is known or guessable).
//!
//! * **Derived, never stored.** `lease_token = "lt1." + key_id + "." + base64url(HMAC-SHA256(key,
//!   event_id of the SandboxAllocated))`, 256 bits. The per-sandbox routes fold the sandbox's
//!   events anyway (strong read), so the current allocation's event id is at hand and the token is
//!   recomputed and compared in constant time. No event, export, log line or metric carries it.
//! * **Rotation overlaps.** The key id names the key that issued a token: `LEASE_TOKEN_KEY`
//!   (id `LEASE_TOKEN_KEY_ID`) issues, and `LEASE_TOKEN_KEY_PREVIOUS` (id
//!   `LEASE_TOKEN_KEY_PREVIOUS_ID`) still verifies during a rotation.
//! * **The idempotency key becomes a credential** where the capability applies: it must be a
//!   client-generated value of at least [`MIN_KEY_CHARS`] URL-safe characters (128 bits or more
//!   when random), and only its SHA-256 is stored ([`hashed_key`]).

use base64::Engine;
use hmac::{KeyInit, Mac};
use sha2::Digest;
use subtle::ConstantTimeEq;

use crate::config::Secret;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The request header that carries the token.
pub const LEASE_TOKEN_HEADER: &str = "x-lease-token";
/// Version tag of the token format.
const TOKEN_VERSION: &str = "lt1";
/// Shortest `Idempotency-Key` accepted where the capability applies: 32 characters of
/// `[A-Za-z0-9_-]` carry at least 128 bits when drawn at random (hex: 128, base64url: 192).
pub const MIN_KEY_CHARS: usize = 32;
/// The dev-only key used when `LEASE_TOKEN_KEY` is unset (refused on non-loopback addresses).
pub const DEV_LEASE_TOKEN_KEY: &str = "dev-lease-token-key-NOT-FOR-PRODUCTION";

/// One signing key with its id.
#[derive(Debug, Clone)]
struct LeaseKey {
    id: String,
    secret: Secret,
}

/// The keys that issue and verify lease tokens.
#[derive(Debug, Clone)]
pub struct LeaseKeys {
    current: LeaseKey,
    previous: Option<LeaseKey>,
}

/// A key id: a short plain id, because it is part of every token.
fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 16
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl LeaseKeys {
    /// Keys from settings (the secrets already read from env or file); refuses weak or
    /// ambiguous ones.
    pub fn new(
        current_id: &str,
        current: Secret,
        previous: Option<(String, Secret)>,
    ) -> Result<Self, String> {
        if !valid_key_id(current_id) {
            return Err("LEASE_TOKEN_KEY_ID must be 1-16 characters of [A-Za-z0-9_-]".into());
        }
        if current.expose().chars().count() < crate::config::MIN_TOKEN_CHARS {
            return Err(format!(
                "LEASE_TOKEN_KEY must be at least {} characters (e.g. `openssl rand -base64 32`)",
                crate::config::MIN_TOKEN_CHARS
            ));
        }
        runtime::secret::check_strength("LEASE_TOKEN_KEY", &current)?;
        let previous = match previous {
            None => None,
            Some((id, secret)) => {
                if !valid_key_id(&id) || id == current_id {
                    return Err("LEASE_TOKEN_KEY_PREVIOUS_ID must be a valid key id that differs from LEASE_TOKEN_KEY_ID".into());
                }
                if secret.expose().chars().count() < crate::config::MIN_TOKEN_CHARS {
                    return Err(format!(
                        "LEASE_TOKEN_KEY_PREVIOUS must be at least {} characters",
                        crate::config::MIN_TOKEN_CHARS
                    ));
                }
                runtime::secret::check_strength("LEASE_TOKEN_KEY_PREVIOUS", &secret)?;
                Some(LeaseKey { id, secret })
            }
        };
        Ok(Self {
            current: LeaseKey {
                id: current_id.to_string(),
                secret: current,
            },
            previous,
        })
    }

    /// The token of the allocation whose `SandboxAllocated` has `event_id`, under the current key.
    pub fn issue(&self, event_id: &uuid::Uuid) -> String {
        token_with(&self.current, event_id)
    }

    /// Whether `token` is the token of the allocation `event_id` under the key it names (the
    /// current or the previous one). The comparison is constant-time.
    pub fn verify(&self, token: &str, event_id: &uuid::Uuid) -> bool {
        let Some(key_id) = token
            .strip_prefix(TOKEN_VERSION)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|rest| rest.split_once('.'))
            .map(|(id, _)| id)
        else {
            return false;
        };
        let key = if key_id == self.current.id {
            &self.current
        } else {
            match &self.previous {
                Some(previous) if previous.id == key_id => previous,
                _ => return false,
            }
        };
        let expected = token_with(key, event_id);
        expected.len() == token.len() && bool::from(expected.as_bytes().ct_eq(token.as_bytes()))
    }
}

fn token_with(key: &LeaseKey, event_id: &uuid::Uuid) -> String {
    let mac = match HmacSha256::new_from_slice(key.secret.expose().as_bytes()) {
        Ok(mut mac) => {
            mac.update(b"lease-token\0");
            mac.update(event_id.as_bytes());
            mac.finalize().into_bytes()
        }
        // HMAC accepts keys of any length; this arm is unreachable.
        Err(_) => return String::new(),
    };
    format!(
        "{TOKEN_VERSION}.{}.{}",
        key.id,
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac)
    )
}

/// Why an `Idempotency-Key` does not qualify as a credential.
pub fn key_problem(key: &str) -> Option<String> {
    let well_formed = key.chars().count() >= MIN_KEY_CHARS
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    (!well_formed).then(|| {
        format!(
            "with this credential the Idempotency-Key proves the allocation: send at least {MIN_KEY_CHARS} random characters of [A-Za-z0-9_-], e.g. `openssl rand -hex 16` or `head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'`"
        )
    })
}

/// What is stored for a key that is a credential: its SHA-256, so the history never holds a value
/// that could replay the allocation.
pub fn hashed_key(key: &str) -> String {
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(key.as_bytes()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(previous: Option<(&str, &str)>) -> LeaseKeys {
        LeaseKeys::new(
            "k2",
            Secret::from("current-key-0123456789abcdefghijklmn"),
            previous.map(|(id, s)| (id.to_string(), Secret::from(s))),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A token verifies only for its own allocation, and carries at least 128 bits.
    #[test]
    fn tokens_bind_the_allocation() {
        let keys = keys(None);
        let a = uuid::Uuid::now_v7();
        let b = uuid::Uuid::now_v7();
        let token = keys.issue(&a);
        assert!(token.starts_with("lt1.k2."));
        assert!(token.len() - "lt1.k2.".len() >= 22, "{token}");
        assert!(keys.verify(&token, &a));
        assert!(!keys.verify(&token, &b));
        assert!(!keys.verify("", &a));
        assert!(!keys.verify(&token.replace("lt1.k2.", "lt1.k9."), &a));
        assert_eq!(keys.issue(&a), token, "derived again, never stored");
    }

    /// During a rotation the previous key still verifies the tokens it issued.
    #[test]
    fn previous_key_verifies_during_rotation() {
        let old = LeaseKeys::new(
            "k1",
            Secret::from("previous-key-0123456789abcdefghijklm"),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let event = uuid::Uuid::now_v7();
        let token = old.issue(&event);
        assert!(!keys(None).verify(&token, &event));
        assert!(keys(Some(("k1", "previous-key-0123456789abcdefghijklm"))).verify(&token, &event));
    }

    /// Short keys, foreign alphabets and equal key ids are refused.
    #[test]
    fn weak_settings_and_keys_are_refused() {
        assert!(LeaseKeys::new("k1", Secret::from("short"), None).is_err());
        assert!(LeaseKeys::new(
            "k1",
            Secret::from("current-key-0123456789abcdefghijklmn"),
            Some((
                "k1".into(),
                Secret::from("current-key-0123456789abcdefghijklmn")
            ))
        )
        .is_err());
        assert!(key_problem("0123456789abcdef0123456789abcdef").is_none());
        assert!(key_problem("0123456789abcdef").is_some());
        assert!(key_problem("0123456789abcdef0123456789abcde/").is_some());
        assert!(hashed_key("k").starts_with("sha256:"));
        assert!(!format!("{:?}", keys(None)).contains("current-key"));
    }
}
