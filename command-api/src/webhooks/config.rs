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
    /// An allocation's lab missed its heartbeats for half the grace: the reclaim follows at
    /// `reclaim_at` unless a heartbeat comes (ADR 0030). The reclaim itself is a `release` whose
    /// payload says `reason: heartbeat_missed`.
    HeartbeatMissed,
    /// A waiting-line ticket (`Prefer: respond-async`) was served: its sandbox is allocated.
    TicketServed,
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
            Self::HeartbeatMissed => "heartbeat_missed",
            Self::TicketServed => "ticket_served",
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
    ("HeartbeatMissed", WebhookKind::HeartbeatMissed),
    ("TicketServed", WebhookKind::TicketServed),
];

/// The notification an event type raises, if any.
pub fn kind_of_event(event_type: &str) -> Option<WebhookKind> {
    KIND_OF_EVENT
        .iter()
        .find(|(t, _)| *t == event_type)
        .map(|(_, kind)| *kind)
}

/// Which webhook targets are allowed (`WEBHOOK_ALLOW_HTTP`, `WEBHOOK_ALLOW_PRIVATE_TARGETS`;
/// both off by default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    /// Plain `http://` targets too (else `https://` only).
    pub allow_http: bool,
    /// Private, loopback, link-local and other non-public addresses too.
    pub allow_private: bool,
}

/// One subscriber.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// A short unique name (its delivery state is kept under it).
    pub name: String,
    /// Where notifications are POSTed. A secret: a webhook URL often carries its receiver's
    /// credential in its path or query, so it is never printed, logged or shown (see
    /// [`Subscriber::target`]).
    pub url: Secret,
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
    /// What an operator is shown of the URL: scheme, host and port, never the path, the query
    /// or a user name and password.
    pub fn target(&self) -> String {
        reqwest::Url::parse(self.url.expose())
            .ok()
            .map(|url| {
                let host = url.host_str().unwrap_or_default();
                match url.port() {
                    Some(port) => format!("{}://{host}:{port}", url.scheme()),
                    None => format!("{}://{host}", url.scheme()),
                }
            })
            .unwrap_or_default()
    }

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

/// Checks a subscriber's URL against the policy: `https` (or `http` when allowed), a host, and
/// a host given as an address must be public unless allowed. A host given as a name is checked
/// at every delivery, on every address it resolves to then (`super::PublicOnly`). The problem is
/// described without the URL.
fn check_target(url: &str, policy: TargetPolicy) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|_| "url is not a valid URL".to_string())?;
    match parsed.scheme() {
        "https" => {}
        "http" if policy.allow_http => {}
        "http" => {
            return Err(
                "url must be https (plain http only with WEBHOOK_ALLOW_HTTP=true)".to_string(),
            )
        }
        _ => return Err("url must be https".to_string()),
    }
    let host = parsed
        .host_str()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| "url has no host".to_string())?;
    // The URL parser has already normalised address forms (`0x7f.1`, `2130706433`) to dotted
    // quads; an IPv6 host keeps its brackets.
    let address = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .ok();
    if let Some(ip) = address {
        if !policy.allow_private && !crate::network::is_public(ip) {
            return Err("url names a private, loopback or link-local address (allowed only with WEBHOOK_ALLOW_PRIVATE_TARGETS=true)".to_string());
        }
    }
    Ok(())
}

/// Reads subscribers from the file or the JSON text (not both); none configured: empty. Every
/// URL must pass `policy`; errors name the subscriber, never its URL or secret.
pub fn load_subscribers(
    file: Option<&Path>,
    json: Option<&Secret>,
    policy: TargetPolicy,
) -> anyhow::Result<Vec<Subscriber>> {
    let text = match (file, json) {
        (Some(_), Some(_)) => bail!("set WEBHOOKS_FILE or WEBHOOKS_JSON, not both"),
        (Some(path), None) => std::fs::read_to_string(path)
            .with_context(|| format!("read WEBHOOKS_FILE {}", path.display()))?,
        (None, Some(json)) => json.expose().to_string(),
        (None, None) => return Ok(Vec::new()),
    };
    let parsed: SubscribersFile = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("webhook subscribers: {}", crate::config::json_problem(&e)))?;
    let mut names = std::collections::HashSet::new();
    for s in &parsed.subscribers {
        if s.name.is_empty() || !names.insert(s.name.clone()) {
            bail!(
                "webhook subscriber names must be non-empty and unique: {:?}",
                s.name
            );
        }
        if let Err(problem) = check_target(&s.url, policy) {
            bail!("webhook subscriber {}: {problem}", s.name);
        }
        if s.secret.len() < MIN_SECRET_CHARS {
            bail!(
                "webhook subscriber {}: secret shorter than {MIN_SECRET_CHARS} characters",
                s.name
            );
        }
        if let Err(problem) =
            runtime::secret::check_strength("its secret", &Secret::from(s.secret.as_str()))
        {
            bail!("webhook subscriber {}: {problem}", s.name);
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
                url: Secret::from(raw.url),
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

    const OPEN: TargetPolicy = TargetPolicy {
        allow_http: true,
        allow_private: true,
    };

    /// Subscribers parse; filters on kind and prefix apply; bad ones are refused.
    #[test]
    fn parses_and_filters() {
        let json = Secret::from(
            r#"{"subscribers":[{"name":"a","url":"http://x/h","secret":"0123456789abcdef0123456789abcdef","prefixes":["aws-lab"],"kinds":["allocation","pool_low"]}]}"#,
        );
        let subs = load_subscribers(None, Some(&json), OPEN).unwrap_or_default();
        assert_eq!(subs.len(), 1);
        assert!(subs[0].wants(WebhookKind::Allocation, "aws-lab-001"));
        assert!(!subs[0].wants(WebhookKind::Allocation, "lab-001"));
        assert!(!subs[0].wants(WebhookKind::Expiry, "aws-lab-001"));
        let short =
            Secret::from(r#"{"subscribers":[{"name":"a","url":"http://x/h","secret":"short"}]}"#);
        assert!(load_subscribers(None, Some(&short), OPEN).is_err());
        assert_eq!(
            kind_of_event("DeletionFailed"),
            Some(WebhookKind::Quarantine)
        );
        assert_eq!(kind_of_event("ClaimGranted"), None);
    }

    /// By default only https to a public host passes; each refusal names the subscriber and
    /// the setting, never the URL or the secret; the target shown keeps scheme, host and port.
    #[test]
    fn targets_follow_the_policy() {
        let strict = TargetPolicy::default();
        let secret = "0123456789abcdef0123456789abcdef";
        let one = |url: &str, policy| {
            let json = Secret::from(
                serde_json::json!({"subscribers": [{"name": "hook", "url": url, "secret": secret}]})
                    .to_string(),
            );
            load_subscribers(None, Some(&json), policy).map_err(|e| format!("{e:#}"))
        };
        assert!(one("https://hooks.example.com/T0/B0/tok3n", strict).is_ok());
        for (url, setting) in [
            ("http://hooks.example.com/tok3n", "WEBHOOK_ALLOW_HTTP"),
            ("https://127.0.0.1/tok3n", "WEBHOOK_ALLOW_PRIVATE_TARGETS"),
            (
                "https://169.254.169.254/tok3n",
                "WEBHOOK_ALLOW_PRIVATE_TARGETS",
            ),
            ("https://[::1]:8443/tok3n", "WEBHOOK_ALLOW_PRIVATE_TARGETS"),
            ("https://10.0.0.5/tok3n", "WEBHOOK_ALLOW_PRIVATE_TARGETS"),
        ] {
            let refused = one(url, strict).err().unwrap_or_default();
            assert!(
                refused.contains("hook") && refused.contains(setting),
                "{url}: {refused}"
            );
            assert!(
                !refused.contains("tok3n") && !refused.contains(secret),
                "{refused}"
            );
        }
        assert!(one("ftp://hooks.example.com/x", OPEN).is_err());
        assert!(one("http://127.0.0.1:9/x", OPEN).is_ok());
        let subs = one(
            "https://user:pw@hooks.example.com:8443/T0/tok3n?k=v",
            strict,
        )
        .unwrap_or_default();
        assert_eq!(subs[0].target(), "https://hooks.example.com:8443");
        assert!(
            !format!("{:?}", subs[0]).contains("tok3n"),
            "Debug hides the URL"
        );
    }
}
