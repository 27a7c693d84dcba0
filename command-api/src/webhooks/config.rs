//! Webhook subscribers (`WEBHOOKS_FILE` / `WEBHOOKS_JSON`) and the notification kinds.

use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::config::Secret;

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookKind {
    /// `EXPIRY_WARNING_MINUTES` before an allocation's `expires_at`.
    ExpiringSoon,
    /// A student got a sandbox.
    Allocation,
    /// The owner gave the sandbox back (mark-for-deletion).
    Release,
    /// An allocation ended at its lab window's end.
    Expiry,
    /// The sandbox left the pool (CSP account deleted, or retired).
    Deletion,
    /// CSP deletion failed past its budget: quarantined.
    Quarantine,
    /// A name prefix group dropped below its `POOL_LOW_WATER` threshold.
    PoolLow,
}

impl WebhookKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExpiringSoon => "expiring_soon",
            Self::Allocation => "allocation",
            Self::Release => "release",
            Self::Expiry => "expiry",
            Self::Deletion => "deletion",
            Self::Quarantine => "quarantine",
            Self::PoolLow => "pool_low",
        }
    }
}

/// Which recorded event raises which notification: one line per event type. Events added later
/// (e.g. a lease extension) become notifications by adding their line here.
pub const KIND_OF_EVENT: &[(&str, WebhookKind)] = &[
    ("SandboxAllocated", WebhookKind::Allocation),
    ("DeletionRequested", WebhookKind::Release),
    ("AllocationExpired", WebhookKind::Expiry),
    ("SandboxDeleted", WebhookKind::Deletion),
    ("SandboxRetired", WebhookKind::Deletion),
    ("DeletionFailed", WebhookKind::Quarantine),
];

/// The notification an event type raises, if any.
pub fn kind_of_event(event_type: &str) -> Option<WebhookKind> {
    KIND_OF_EVENT
        .iter()
        .find(|(t, _)| *t == event_type)
        .map(|(_, kind)| *kind)
}

/// One subscriber.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// A short unique name (its delivery state is kept under it).
    pub name: String,
    /// Where notifications are POSTed.
    pub url: String,
    /// The HMAC-SHA256 key of its signatures (at least 32 characters).
    pub secret: Secret,
    /// During a rotation of `secret`: the old key and the end of the overlap. Until then every
    /// delivery carries a second signature made with it, so a receiver that still checks with
    /// the old key keeps accepting (docs/security.md, "Rotating secrets").
    pub previous_secret: Option<(Secret, chrono::DateTime<chrono::Utc>)>,
    /// Only sandboxes (and prefix groups) whose name starts with one of these; empty: all.
    pub prefixes: Vec<String>,
    /// Only these kinds; empty: all.
    pub kinds: Vec<WebhookKind>,
}

/// A subscriber as written in the file (the secret still plain text).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubscriber {
    name: String,
    url: String,
    secret: String,
    #[serde(default)]
    previous_secret: Option<String>,
    #[serde(default)]
    previous_secret_until: Option<String>,
    #[serde(default)]
    prefixes: Vec<String>,
    #[serde(default)]
    kinds: Vec<WebhookKind>,
}

impl Subscriber {
    /// Whether this subscriber wants `kind` about a sandbox (or group) named `name`.
    pub fn wants(&self, kind: WebhookKind, name: &str) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&kind))
            && (self.prefixes.is_empty() || self.prefixes.iter().any(|p| name.starts_with(p)))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribersFile {
    subscribers: Vec<RawSubscriber>,
}

/// Shortest secret accepted.
const MIN_SECRET_CHARS: usize = 32;

/// Reads subscribers from the file or the JSON text (not both); none configured: empty.
pub fn load_subscribers(
    file: Option<&Path>,
    json: Option<&Secret>,
) -> anyhow::Result<Vec<Subscriber>> {
    let text = match (file, json) {
        (Some(_), Some(_)) => bail!("set WEBHOOKS_FILE or WEBHOOKS_JSON, not both"),
        (Some(path), None) => std::fs::read_to_string(path)
            .with_context(|| format!("read WEBHOOKS_FILE {}", path.display()))?,
        (None, Some(json)) => json.expose().to_string(),
        (None, None) => return Ok(Vec::new()),
    };
    let parsed: SubscribersFile = serde_json::from_str(&text).context("webhook subscribers")?;
    let mut names = std::collections::HashSet::new();
    for s in &parsed.subscribers {
        if s.name.is_empty() || !names.insert(s.name.clone()) {
            bail!(
                "webhook subscriber names must be non-empty and unique: {:?}",
                s.name
            );
        }
        if !(s.url.starts_with("https://") || s.url.starts_with("http://")) {
            bail!("webhook subscriber {}: url must be http(s)", s.name);
        }
        if s.secret.len() < MIN_SECRET_CHARS {
            bail!(
                "webhook subscriber {}: secret shorter than {MIN_SECRET_CHARS} characters",
                s.name
            );
        }
    }
    let now = chrono::Utc::now();
    parsed
        .subscribers
        .into_iter()
        .map(|raw| {
            let previous_secret = match (raw.previous_secret, raw.previous_secret_until) {
                (None, None) => None,
                (None, Some(_)) => bail!(
                    "webhook subscriber {}: previous_secret_until is set without previous_secret",
                    raw.name
                ),
                (Some(previous), until) => {
                    if previous.len() < MIN_SECRET_CHARS || previous == raw.secret {
                        bail!(
                            "webhook subscriber {}: previous_secret must be at least {MIN_SECRET_CHARS} characters and differ from secret",
                            raw.name
                        );
                    }
                    let until = crate::rotation::parse_until(
                        "previous_secret_until",
                        until.as_deref(),
                        now,
                    )
                    .map_err(|problem| anyhow::anyhow!("webhook subscriber {}: {problem}", raw.name))?;
                    Some((Secret::from(previous), until))
                }
            };
            Ok(Subscriber {
                name: raw.name,
                url: raw.url,
                secret: Secret::from(raw.secret),
                previous_secret,
                prefixes: raw.prefixes,
                kinds: raw.kinds,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Subscribers parse; filters on kind and prefix apply; bad ones are refused.
    #[test]
    fn parses_and_filters() {
        let json = Secret::from(
            r#"{"subscribers":[{"name":"a","url":"http://x/h","secret":"0123456789abcdef0123456789abcdef","prefixes":["aws-lab"],"kinds":["allocation","pool_low"]}]}"#,
        );
        let subs = load_subscribers(None, Some(&json)).unwrap_or_default();
        assert_eq!(subs.len(), 1);
        assert!(subs[0].wants(WebhookKind::Allocation, "aws-lab-001"));
        assert!(!subs[0].wants(WebhookKind::Allocation, "lab-001"));
        assert!(!subs[0].wants(WebhookKind::Expiry, "aws-lab-001"));
        let short =
            Secret::from(r#"{"subscribers":[{"name":"a","url":"http://x/h","secret":"short"}]}"#);
        assert!(load_subscribers(None, Some(&short)).is_err());
        assert_eq!(
            kind_of_event("DeletionFailed"),
            Some(WebhookKind::Quarantine)
        );
        assert_eq!(kind_of_event("ClaimGranted"), None);
    }
}
