//! Per-track credentials: a bearer token that names its track, the sandbox name prefixes the
//! track may allocate from, an optional cap on its live allocations, and an optional secret with
//! which the track signs each caller id (`X-Caller-Signature`), so that one student cannot act
//! as another even though every student of the track runs the same script.
//!
//! Loaded once at start-up from `TRACK_CREDENTIALS_FILE` or `TRACK_CREDENTIALS_JSON` (the same
//! JSON a Secrets Manager secret holds):
//!
//! ```json
//! {"tracks": [{"track": "aws-lab", "token": "<at least 32 characters>",
//!              "name_prefixes": ["aws-lab-"], "max_concurrent_allocations": 200,
//!              "max_allocations_per_caller": 1,
//!              "caller_secret": "<at least 32 characters>", "require_caller_signature": true}]}
//! ```
//!
//! Each track rotates on its own: `previous_token` with `previous_token_until`, and
//! `previous_caller_secret` with `previous_caller_secret_until` (RFC 3339, at most 30 days ahead)
//! keep the old value accepted while labs started with it finish ([`crate::rotation`]).
//!
//! A track may declare its heartbeat policy in its entry, `"heartbeat": {"interval_s": 60,
//! "grace_s": 1800}` ([`crate::track_heartbeats`], ADR 0034).

use std::sync::Arc;

use hmac::{KeyInit, Mac};
use serde::Deserialize;

use crate::config::{Secret, MIN_TOKEN_CHARS};
use crate::rotation::{parse_until, Matched, RotatingSecret};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Why a credentials document was refused at start-up.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not the expected JSON (the message names the field, never a token).
    #[error("invalid track credentials JSON: {0}")]
    Json(String),
    /// A credential breaks a rule (weak token, duplicate, no prefix, …).
    #[error("track credential {track:?}: {problem}")]
    Invalid {
        /// The track it belongs to.
        track: String,
        /// What is wrong.
        problem: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    tracks: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    track: String,
    token: String,
    name_prefixes: Vec<String>,
    #[serde(default)]
    max_concurrent_allocations: Option<u32>,
    #[serde(default)]
    max_allocations_per_caller: Option<u32>,
    #[serde(default)]
    caller_secret: Option<String>,
    #[serde(default)]
    require_caller_signature: bool,
    #[serde(default)]
    previous_token: Option<String>,
    #[serde(default)]
    previous_token_until: Option<String>,
    #[serde(default)]
    previous_caller_secret: Option<String>,
    #[serde(default)]
    previous_caller_secret_until: Option<String>,
    #[serde(default)]
    heartbeat: Option<serde_json::Value>,
}

/// One track's credential.
#[derive(Debug)]
pub struct TrackCredential {
    /// The track's name; sandboxes it allocates carry it as `track_name`.
    pub track: String,
    token: RotatingSecret,
    /// Sandbox names the track may allocate start with one of these.
    pub name_prefixes: Vec<String>,
    /// Most sandboxes the track holds at once: enforced as the track's quota (the lower of it
    /// and `TRACK_QUOTAS`/`DEFAULT_TRACK_QUOTA`), in the allocation's own transaction.
    pub max_concurrent_allocations: Option<u32>,
    /// Live allocations one caller id may hold in this track (overrides
    /// `MAX_ALLOCATIONS_PER_CALLER`).
    pub max_allocations_per_caller: Option<u32>,
    caller_secret: Option<RotatingSecret>,
    /// Whether every request must carry a valid `X-Caller-Signature`.
    pub require_caller_signature: bool,
    /// The track's heartbeat policy, when its entry declares one (ADR 0034).
    pub heartbeat: Option<domain::heartbeat::HeartbeatPolicy>,
}

/// What a caller signature check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureCheck {
    /// Valid, or not required and not sent.
    Accepted,
    /// Valid under the previous caller secret of a rotation in progress.
    AcceptedWithPrevious,
    /// Required but absent.
    Missing,
    /// Present but not the HMAC of the caller id.
    Invalid,
    /// Well-formed and correct, but its time lies outside the accepted window.
    Expired,
}

/// What a signature covers and how it is checked (`X-Caller-Signature: t=<unix s>,v1=<hex>`).
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    /// The request method.
    pub method: &'a str,
    /// The request path as the server receives it.
    pub path: &'a str,
    /// The caller id the request names.
    pub caller: &'a str,
    /// Now, unix seconds.
    pub now: i64,
    /// Largest accepted distance between `t` and now, seconds (`CALLER_SIGNATURE_WINDOW_SEC`).
    pub window_s: i64,
    /// Whether the old form (HMAC of the caller id alone) is still accepted
    /// (`ALLOW_LEGACY_CALLER_SIGNATURE`, for migration only).
    pub allow_legacy: bool,
}

/// The string a v1 signature is the HMAC of: time, method, path and caller, newline-separated.
fn signed_text(t: i64, method: &str, path: &str, caller: &str) -> String {
    format!("{t}\n{method}\n{path}\n{caller}")
}

/// `t=<t>,v1=<hex HMAC-SHA256(secret, t \n METHOD \n path \n caller)>`: what a track script sends
/// as `X-Caller-Signature`.
pub fn caller_signature_v1(secret: &str, t: i64, method: &str, path: &str, caller: &str) -> String {
    let mut mac = match HmacSha256::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        // HMAC accepts keys of any length; this arm is unreachable.
        Err(_) => return String::new(),
    };
    mac.update(signed_text(t, method, path, caller).as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl TrackCredential {
    /// Whether `name_prefix` (the `X-Sandbox-Name-Prefix` a request asked for) lies inside one
    /// of the track's prefixes.
    pub fn allows_prefix(&self, name_prefix: &str) -> bool {
        self.name_prefixes
            .iter()
            .any(|p| name_prefix.starts_with(p.as_str()))
    }

    /// Whether requests of this track carry signatures (it has a caller secret).
    pub fn signs_callers(&self) -> bool {
        self.caller_secret.is_some()
    }

    /// Checks a `t=<unix s>,v1=<hex>` signature over time, method, path and caller, within the
    /// window; the old form (hex HMAC of the caller id alone) only when `allow_legacy`. A
    /// signature sent to a track that has a secret is always checked, even when not required.
    pub fn check_request_signature(
        &self,
        request: &SignedRequest<'_>,
        signature: Option<&str>,
    ) -> SignatureCheck {
        let Some(secret) = &self.caller_secret else {
            return SignatureCheck::Accepted;
        };
        let Some(signature) = signature.map(str::trim).filter(|s| !s.is_empty()) else {
            return if self.require_caller_signature {
                SignatureCheck::Missing
            } else {
                SignatureCheck::Accepted
            };
        };
        if !signature.starts_with("t=") {
            return if request.allow_legacy {
                self.check_signature(request.caller, Some(signature), request.now)
            } else {
                SignatureCheck::Invalid
            };
        }
        let mut t = None;
        let mut v1 = None;
        for part in signature.split(',') {
            match part.trim().split_once('=') {
                Some(("t", value)) => t = value.parse::<i64>().ok(),
                Some(("v1", value)) => v1 = hex::decode(value).ok(),
                _ => {}
            }
        }
        let (Some(t), Some(sent)) = (t, v1) else {
            return SignatureCheck::Invalid;
        };
        let text = signed_text(t, request.method, request.path, request.caller);
        let Some(matched) = verify_with(secret, request.now, text.as_bytes(), &sent) else {
            return SignatureCheck::Invalid;
        };
        if (request.now - t).abs() > request.window_s {
            return SignatureCheck::Expired;
        }
        accepted(matched)
    }

    /// Checks the old form of signature (hex HMAC-SHA256 of `caller` with the track's secret),
    /// accepted only with `ALLOW_LEGACY_CALLER_SIGNATURE=true`; `now` is unix seconds (it
    /// decides whether a previous secret is still in its window).
    pub fn check_signature(
        &self,
        caller: &str,
        signature: Option<&str>,
        now: i64,
    ) -> SignatureCheck {
        let Some(secret) = &self.caller_secret else {
            return SignatureCheck::Accepted;
        };
        let Some(signature) = signature.filter(|s| !s.is_empty()) else {
            return if self.require_caller_signature {
                SignatureCheck::Missing
            } else {
                SignatureCheck::Accepted
            };
        };
        let Ok(sent) = hex::decode(signature) else {
            return SignatureCheck::Invalid;
        };
        match verify_with(secret, now, caller.as_bytes(), &sent) {
            Some(matched) => accepted(matched),
            None => SignatureCheck::Invalid,
        }
    }
}

/// Which value of `secret` (current, or previous inside its window at `now`, unix seconds)
/// signed `text` as `sent`, if any.
fn verify_with(secret: &RotatingSecret, now: i64, text: &[u8], sent: &[u8]) -> Option<Matched> {
    let now = chrono::DateTime::from_timestamp(now, 0).unwrap_or_default();
    secret.verifying_at(now).find_map(|(matched, key)| {
        let mut mac = HmacSha256::new_from_slice(key.as_bytes()).ok()?;
        mac.update(text);
        // `verify_slice` compares in constant time.
        mac.verify_slice(sent).is_ok().then_some(matched)
    })
}

fn accepted(matched: Matched) -> SignatureCheck {
    match matched {
        Matched::Current => SignatureCheck::Accepted,
        Matched::Previous => SignatureCheck::AcceptedWithPrevious,
    }
}

/// Hex HMAC-SHA256 of `caller` with `secret`: the old form of `X-Caller-Signature`, accepted only
/// with `ALLOW_LEGACY_CALLER_SIGNATURE=true` (it has no time in it and covers no request).
pub fn caller_signature(secret: &str, caller: &str) -> String {
    let mut mac = match HmacSha256::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        // HMAC accepts keys of any length; this arm is unreachable.
        Err(_) => return String::new(),
    };
    mac.update(caller.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Every per-track credential, looked up by token.
#[derive(Debug, Default, Clone)]
pub struct TrackCredentials {
    credentials: Vec<Arc<TrackCredential>>,
}

impl TrackCredentials {
    /// Parses and checks a credentials document; `reserved` are tokens no track may reuse
    /// (the shared track token and the admin token, current and previous); `now` checks the
    /// ends of rotation overlaps.
    pub fn parse(
        json: &str,
        reserved: &[&str],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Self, CredentialsError> {
        let document: Document = serde_json::from_str(json)
            .map_err(|e| CredentialsError::Json(crate::config::json_problem(&e)))?;
        let mut credentials: Vec<Arc<TrackCredential>> = Vec::new();
        for entry in document.tracks {
            let invalid = |problem: &str| CredentialsError::Invalid {
                track: entry.track.clone(),
                problem: problem.to_string(),
            };
            if domain::model::ids::validate_id("track", &entry.track).is_err() {
                return Err(invalid("the track name must be a plain id"));
            }
            if entry.token.chars().count() < MIN_TOKEN_CHARS {
                return Err(invalid(&format!(
                    "the token must be at least {MIN_TOKEN_CHARS} characters"
                )));
            }
            let token = Secret::from(entry.token.as_str());
            runtime::secret::check_strength("the token", &token).map_err(|p| invalid(&p))?;
            if let Some(previous) = &entry.previous_token {
                runtime::secret::check_strength("previous_token", &Secret::from(previous.as_str()))
                    .map_err(|p| invalid(&p))?;
                if *previous == entry.token {
                    return Err(invalid(
                        "previous_token equals token; a rotation needs a new one",
                    ));
                }
            }
            let tokens =
                std::iter::once(entry.token.as_str()).chain(entry.previous_token.as_deref());
            if tokens.clone().any(|t| reserved.contains(&t))
                || credentials
                    .iter()
                    .any(|c| c.track == entry.track || tokens.clone().any(|t| c.token.holds(t)))
            {
                return Err(invalid(
                    "the token and the track name must be unique (and differ from the shared tokens)",
                ));
            }
            if entry.name_prefixes.is_empty()
                || entry
                    .name_prefixes
                    .iter()
                    .any(|p| domain::model::ids::validate_id("prefix", p).is_err())
            {
                return Err(invalid("name_prefixes must list at least one plain prefix"));
            }
            // Caller ids are the client's choice: without a seat-sized quota one script could
            // invent ids until the pool is empty.
            if entry.max_concurrent_allocations.is_none_or(|n| n == 0) {
                return Err(invalid(
                    "max_concurrent_allocations is required: set it to the track's seats (the most students who run the lab at once)",
                ));
            }
            if let Some(secret) = &entry.caller_secret {
                if secret.chars().count() < MIN_TOKEN_CHARS {
                    return Err(invalid(&format!(
                        "caller_secret must be at least {MIN_TOKEN_CHARS} characters"
                    )));
                }
                runtime::secret::check_strength("caller_secret", &Secret::from(secret.as_str()))
                    .map_err(|p| invalid(&p))?;
            } else if entry.require_caller_signature {
                return Err(invalid("require_caller_signature needs a caller_secret"));
            }
            if entry.previous_caller_secret.is_some() && entry.caller_secret.is_none() {
                return Err(invalid("previous_caller_secret needs a caller_secret"));
            }
            if let Some(previous) = &entry.previous_caller_secret {
                if previous.chars().count() < MIN_TOKEN_CHARS {
                    return Err(invalid(&format!(
                        "previous_caller_secret must be at least {MIN_TOKEN_CHARS} characters"
                    )));
                }
                runtime::secret::check_strength(
                    "previous_caller_secret",
                    &Secret::from(previous.as_str()),
                )
                .map_err(|p| invalid(&p))?;
            }
            let rotating = |current: String,
                            previous: Option<String>,
                            until: Option<&str>,
                            name: &str|
             -> Result<RotatingSecret, CredentialsError> {
                let secret = RotatingSecret::new(current);
                match previous {
                    None if until.is_some() => {
                        Err(invalid(&format!("{name}_until is set without {name}")))
                    }
                    None => Ok(secret),
                    Some(previous) => {
                        let until = parse_until(&format!("{name}_until"), until, now)
                            .map_err(|problem| invalid(&problem))?;
                        Ok(secret.with_previous(Secret::from(previous), until))
                    }
                }
            };
            let token = rotating(
                entry.token,
                entry.previous_token,
                entry.previous_token_until.as_deref(),
                "previous_token",
            )?;
            let heartbeat = entry
                .heartbeat
                .as_ref()
                .map(crate::track_heartbeats::policy_of)
                .transpose()
                .map_err(|problem| invalid(&problem))?;
            let caller_secret = match entry.caller_secret {
                Some(current) => Some(rotating(
                    current,
                    entry.previous_caller_secret,
                    entry.previous_caller_secret_until.as_deref(),
                    "previous_caller_secret",
                )?),
                None => None,
            };
            credentials.push(Arc::new(TrackCredential {
                track: entry.track,
                token,
                name_prefixes: entry.name_prefixes,
                max_concurrent_allocations: entry.max_concurrent_allocations,
                max_allocations_per_caller: entry.max_allocations_per_caller,
                caller_secret,
                require_caller_signature: entry.require_caller_signature,
                heartbeat,
            }));
        }
        Ok(Self { credentials })
    }

    /// Reads the file, else the JSON text, else none.
    pub fn load(
        file: Option<&std::path::Path>,
        json: Option<&Secret>,
        reserved: &[&str],
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Self, CredentialsError> {
        match (file, json) {
            (Some(path), _) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
                        path: path.display().to_string(),
                        source,
                    })?;
                Self::parse(&text, reserved, now)
            }
            (None, Some(json)) => Self::parse(json.expose(), reserved, now),
            (None, None) => Ok(Self::default()),
        }
    }

    /// How many tracks have their own credential.
    pub fn len(&self) -> usize {
        self.credentials.len()
    }

    /// Whether no track has its own credential.
    pub fn is_empty(&self) -> bool {
        self.credentials.is_empty()
    }

    /// The track names that have a credential.
    pub fn tracks(&self) -> impl Iterator<Item = &str> {
        self.credentials.iter().map(|c| c.track.as_str())
    }

    /// Whether a credential's track is `track`.
    pub fn owns_track(&self, track: &str) -> bool {
        self.credentials.iter().any(|c| c.track == track)
    }

    /// Whether a sandbox (its `track_name` and name) lies in a credential's lane: allocated for
    /// a credential's track, or named inside one of its prefixes.
    pub fn owns(&self, track_name: Option<&str>, sandbox_name: &str) -> bool {
        track_name.is_some_and(|t| self.owns_track(t))
            || self.credentials.iter().any(|c| {
                c.name_prefixes
                    .iter()
                    .any(|p| sandbox_name.starts_with(p.as_str()))
            })
    }

    /// Whether a requested name prefix reaches into a credential's prefixes (inside one, or
    /// broader than one).
    pub fn prefix_overlaps(&self, prefix: &str) -> bool {
        self.credentials.iter().any(|c| {
            c.name_prefixes
                .iter()
                .any(|p| prefix.starts_with(p.as_str()) || p.starts_with(prefix))
        })
    }

    /// The maximum of concurrent allocations the credential of `track` sets, if any.
    pub fn max_concurrent_of(&self, track: &str) -> Option<u32> {
        self.credentials
            .iter()
            .find(|c| c.track == track)
            .and_then(|c| c.max_concurrent_allocations)
    }

    /// The heartbeat policies the credentials declare, by track.
    pub fn heartbeat_policies(
        &self,
    ) -> impl Iterator<Item = (&str, domain::heartbeat::HeartbeatPolicy)> {
        self.credentials
            .iter()
            .filter_map(|c| c.heartbeat.map(|p| (c.track.as_str(), p)))
    }

    /// The credential whose token (current, or previous inside its overlap at `now`) is
    /// `token`, and which value matched. Every credential is compared (each value in constant
    /// time), so the time taken does not say which one matched.
    pub fn find(
        &self,
        token: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<(Arc<TrackCredential>, Matched)> {
        let mut found = None;
        for credential in &self.credentials {
            if let Some(matched) = credential.token.matches(token, now) {
                found = Some((credential.clone(), matched));
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "tok-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const SECRET: &str = "sec-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const OLD_TOKEN: &str = "old-tok-cccccccccccccccccccccccccccccc";
    const OLD_SECRET: &str = "old-sec-dddddddddddddddddddddddddddddd";

    /// The fixed "now" of these tests.
    fn now() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default()
    }

    fn parse(json: &str, reserved: &[&str]) -> Result<TrackCredentials, CredentialsError> {
        TrackCredentials::parse(json, reserved, now())
    }

    fn one(extra: &str) -> Result<TrackCredentials, CredentialsError> {
        parse(
            &format!(
                r#"{{"tracks":[{{"track":"lab","token":"{TOKEN}","name_prefixes":["lab-"],"max_concurrent_allocations":5{extra}}}]}}"#
            ),
            &[],
        )
    }

    /// Weak tokens, missing prefixes and a required signature without a secret are refused.
    #[test]
    fn weak_documents_are_refused() {
        assert!(one("").is_ok());
        assert!(
            parse(
                &format!(
                    r#"{{"tracks":[{{"track":"lab","token":"{TOKEN}","name_prefixes":["lab-"]}}]}}"#
                ),
                &[]
            )
            .err()
            .is_some_and(|e| e
                .to_string()
                .contains("max_concurrent_allocations is required")),
            "a credential without a seat-sized quota"
        );
        assert!(parse(
            r#"{"tracks":[{"track":"lab","token":"short","name_prefixes":["lab-"]}]}"#,
            &[]
        )
        .is_err());
        assert!(parse(
            &format!(r#"{{"tracks":[{{"track":"lab","token":"{TOKEN}","name_prefixes":[]}}]}}"#),
            &[]
        )
        .is_err());
        assert!(one(r#","require_caller_signature":true"#).is_err());
        assert!(parse(
            &format!(
                r#"{{"tracks":[{{"track":"lab","token":"{TOKEN}","name_prefixes":["lab-"]}}]}}"#
            ),
            &[TOKEN]
        )
        .is_err());
    }

    /// Errors about a document never echo its tokens.
    #[test]
    fn errors_do_not_echo_tokens() {
        let err = parse(
            &format!(r#"{{"tracks":[{{"track":"lab","token":"{TOKEN}","name_prefixes":["lab-"],"oops":1}}]}}"#),
            &[],
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(!err.is_empty());
        assert!(!err.contains(TOKEN), "{err}");
    }

    /// A signature is the HMAC of the caller id: another caller's signature does not fit.
    #[test]
    fn signatures_bind_the_caller() {
        let creds = one(&format!(
            r#","caller_secret":"{SECRET}","require_caller_signature":true"#
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let credential = creds
            .find(TOKEN, now())
            .map(|(credential, _)| credential)
            .unwrap_or_else(|| panic!("not found"));
        let alice = caller_signature(SECRET, "alice");
        assert_eq!(
            credential.check_signature("alice", Some(&alice), 0),
            SignatureCheck::Accepted
        );
        assert_eq!(
            credential.check_signature("bob", Some(&alice), 0),
            SignatureCheck::Invalid
        );
        assert_eq!(
            credential.check_signature("bob", None, 0),
            SignatureCheck::Missing
        );
        assert_eq!(
            credential.check_signature("bob", Some("zz"), 0),
            SignatureCheck::Invalid
        );
        assert!(credential.allows_prefix("lab-eu"));
        assert!(!credential.allows_prefix("other-"));
    }

    /// A v1 signature covers time, method, path and caller, and expires outside the window.
    #[test]
    fn v1_signatures_cover_the_request_and_expire() {
        let creds = one(&format!(
            r#","caller_secret":"{SECRET}","require_caller_signature":true"#
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let credential = creds
            .find(TOKEN, now())
            .map(|(credential, _)| credential)
            .unwrap_or_else(|| panic!("not found"));
        let now = 1_700_000_000;
        let request = SignedRequest {
            method: "POST",
            path: "/v1/allocate",
            caller: "alice",
            now,
            window_s: 300,
            allow_legacy: false,
        };
        let check = |sig: &str, request: &SignedRequest<'_>| {
            credential.check_request_signature(request, Some(sig))
        };
        let good = caller_signature_v1(SECRET, now - 10, "POST", "/v1/allocate", "alice");
        assert_eq!(check(&good, &request), SignatureCheck::Accepted);
        for (method, path, caller) in [
            ("GET", "/v1/allocate", "alice"),
            ("POST", "/v1/sandboxes/x", "alice"),
            ("POST", "/v1/allocate", "bob"),
        ] {
            let other = SignedRequest {
                method,
                path,
                caller,
                ..request
            };
            assert_eq!(check(&good, &other), SignatureCheck::Invalid);
        }
        let old = caller_signature_v1(SECRET, now - 301, "POST", "/v1/allocate", "alice");
        assert_eq!(check(&old, &request), SignatureCheck::Expired);
        let legacy = caller_signature(SECRET, "alice");
        assert_eq!(check(&legacy, &request), SignatureCheck::Invalid);
        let migrating = SignedRequest {
            allow_legacy: true,
            ..request
        };
        assert_eq!(check(&legacy, &migrating), SignatureCheck::Accepted);
    }

    /// A track rotates on its own: its previous token and previous caller secret are accepted
    /// (and reported as previous) until their ends, then refused; the current ones throughout.
    #[test]
    fn a_track_rotates_with_an_overlap() {
        let until = now() + chrono::Duration::hours(48);
        let creds = one(&format!(
            r#","previous_token":"{OLD_TOKEN}","previous_token_until":"{}","caller_secret":"{SECRET}","previous_caller_secret":"{OLD_SECRET}","previous_caller_secret_until":"{}","require_caller_signature":true"#,
            until.to_rfc3339(),
            until.to_rfc3339()
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let matched = |token: &str, at| creds.find(token, at).map(|(_, m)| m);
        assert_eq!(matched(TOKEN, now()), Some(Matched::Current));
        assert_eq!(matched(OLD_TOKEN, now()), Some(Matched::Previous));
        assert_eq!(matched(OLD_TOKEN, until), None);
        assert_eq!(matched(TOKEN, until), Some(Matched::Current));

        let credential = creds
            .find(TOKEN, now())
            .map(|(credential, _)| credential)
            .unwrap_or_else(|| panic!("not found"));
        let at = now().timestamp();
        let request = SignedRequest {
            method: "POST",
            path: "/v1/allocate",
            caller: "alice",
            now: at,
            window_s: 300,
            allow_legacy: false,
        };
        let old = caller_signature_v1(OLD_SECRET, at, "POST", "/v1/allocate", "alice");
        let new = caller_signature_v1(SECRET, at, "POST", "/v1/allocate", "alice");
        assert_eq!(
            credential.check_request_signature(&request, Some(&old)),
            SignatureCheck::AcceptedWithPrevious
        );
        assert_eq!(
            credential.check_request_signature(&request, Some(&new)),
            SignatureCheck::Accepted
        );
        let later = until.timestamp();
        let old_late = caller_signature_v1(OLD_SECRET, later, "POST", "/v1/allocate", "alice");
        let after = SignedRequest {
            now: later,
            ..request
        };
        assert_eq!(
            credential.check_request_signature(&after, Some(&old_late)),
            SignatureCheck::Invalid
        );
    }

    /// A rotation is refused without an end, with an end too far ahead, with the old value
    /// equal to the new, and with a previous value another track or role holds.
    #[test]
    fn bad_rotations_are_refused() {
        let soon = (now() + chrono::Duration::hours(1)).to_rfc3339();
        let far = (now() + chrono::Duration::days(90)).to_rfc3339();
        assert!(one(&format!(r#","previous_token":"{OLD_TOKEN}""#)).is_err());
        assert!(one(&format!(
            r#","previous_token":"{OLD_TOKEN}","previous_token_until":"{far}""#
        ))
        .is_err());
        assert!(one(&format!(
            r#","previous_token":"{TOKEN}","previous_token_until":"{soon}""#
        ))
        .is_err());
        assert!(one(&format!(r#","previous_token_until":"{soon}""#)).is_err());
        assert!(parse(
            &format!(
                r#"{{"tracks":[{{"track":"lab","token":"{TOKEN}","previous_token":"{OLD_TOKEN}","previous_token_until":"{soon}","name_prefixes":["lab-"],"max_concurrent_allocations":5}}]}}"#
            ),
            &[OLD_TOKEN]
        )
        .is_err());
        assert!(one(&format!(
            r#","previous_caller_secret":"{OLD_SECRET}","previous_caller_secret_until":"{soon}""#
        ))
        .is_err());
    }
}
