//! Heartbeat policies declared in the track credentials file (ADR 0034): a track's entry may
//! carry `"heartbeat": {"interval_s": 60, "grace_s": 1800}`, so the policy lives with the track's
//! token, prefixes and seats and is deployed and rotated with them.
//!
//! The entry's policy and `HEARTBEAT_TRACKS` are merged once at start-up into the one
//! [`HeartbeatPolicies`] the allocation path reads; a track declared in both is refused rather
//! than one source silently winning, so what the operator reads in either place is what
//! applies. As with `HEARTBEAT_TRACKS`, the policy is recorded in each allocation, so a changed
//! file (picked up when the service starts with it) applies to new allocations only.

use domain::heartbeat::{HeartbeatPolicies, HeartbeatPolicy};
use serde_json::Value;

use crate::credentials::{CredentialsError, TrackCredentials};

/// The fields a `heartbeat` object may hold.
const FIELDS: [&str; 2] = ["interval_s", "grace_s"];

/// Reads a credentials entry's `heartbeat` object. The problem names the field and the rule,
/// for the caller to prefix with the track.
pub(crate) fn policy_of(raw: &Value) -> Result<HeartbeatPolicy, String> {
    let Some(object) = raw.as_object() else {
        return Err(
            "heartbeat must be an object such as {\"interval_s\": 60, \"grace_s\": 1800}".into(),
        );
    };
    if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "heartbeat.{unknown} is not a heartbeat field; use interval_s and grace_s"
        ));
    }
    let seconds = |field: &str| -> Result<Option<u32>, String> {
        match object.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0)
                .map(Some)
                .ok_or_else(|| {
                    format!("heartbeat.{field} must be a whole number of seconds above 0")
                }),
        }
    };
    let Some(interval_s) = seconds("interval_s")? else {
        return Err(
            "heartbeat.interval_s is required: how often the lab sends a heartbeat (seconds)"
                .into(),
        );
    };
    let grace_s = seconds("grace_s")?;
    HeartbeatPolicy::checked(interval_s, grace_s).map_err(|problem| {
        let field = if problem.starts_with("the interval") {
            "interval_s"
        } else {
            "grace_s"
        };
        format!("heartbeat.{field}: {problem}")
    })
}

/// The policies of `HEARTBEAT_TRACKS` (`from_setting`) with those the credentials declare; a
/// track in both is refused, naming it and what to remove.
pub fn merged_policies(
    from_setting: HeartbeatPolicies,
    credentials: &TrackCredentials,
) -> Result<HeartbeatPolicies, CredentialsError> {
    let mut policies = from_setting;
    for (track, policy) in credentials.heartbeat_policies() {
        policies
            .declare(track, policy)
            .map_err(|_| CredentialsError::Invalid {
                track: track.to_string(),
                problem: "heartbeat is declared both in this entry and in HEARTBEAT_TRACKS; \
                          keep one: remove the track from HEARTBEAT_TRACKS to keep its policy \
                          with its other settings"
                    .to_string(),
            })?;
    }
    Ok(policies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A valid object gives its policy, the grace defaulting as in `HEARTBEAT_TRACKS`.
    #[test]
    fn reads_a_policy() {
        assert_eq!(
            policy_of(&json!({"interval_s": 60, "grace_s": 1800})),
            Ok(HeartbeatPolicy {
                interval_s: 60,
                grace_s: 1800
            })
        );
        assert_eq!(
            policy_of(&json!({"interval_s": 30})).map(|p| p.grace_s),
            Ok(domain::heartbeat::DEFAULT_HEARTBEAT_GRACE_S)
        );
    }

    /// Every bad value is refused with the field it is about.
    #[test]
    fn bad_values_name_the_field() {
        for (raw, field) in [
            (json!({"interval_s": 0}), "heartbeat.interval_s"),
            (json!({"interval_s": "sixty"}), "heartbeat.interval_s"),
            (json!({"interval_s": -5}), "heartbeat.interval_s"),
            (json!({"grace_s": 1800}), "heartbeat.interval_s"),
            (
                json!({"interval_s": 60, "grace_s": 60}),
                "heartbeat.grace_s",
            ),
            (
                json!({"interval_s": 600, "grace_s": 900}),
                "heartbeat.grace_s",
            ),
            (
                json!({"interval_s": 60, "grace_s": 1.5}),
                "heartbeat.grace_s",
            ),
            (json!({"interval_s": 60, "every": 5}), "heartbeat.every"),
            (json!(60), "heartbeat"),
        ] {
            let problem = policy_of(&raw).err().unwrap_or_default();
            assert!(problem.starts_with(field), "{raw}: {problem}");
        }
    }

    fn document(heartbeat: serde_json::Value) -> String {
        json!({"tracks": [
            {"track": "hb-lab", "token": "hb-token-0123456789abcdefghijklmnopqr",
             "name_prefixes": ["hb-"], "max_concurrent_allocations": 5, "heartbeat": heartbeat},
            {"track": "plain", "token": "plain-token-0123456789abcdefghijklmno",
             "name_prefixes": ["plain-"], "max_concurrent_allocations": 5},
        ]})
        .to_string()
    }

    fn now() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default()
    }

    /// A declared policy reaches the merged policies; a bad one stops the load naming the
    /// track and the field; a track also in `HEARTBEAT_TRACKS` is refused, naming it.
    #[test]
    fn file_policies_merge_with_the_setting() {
        let credentials = TrackCredentials::parse(&document(json!({"interval_s": 60})), &[], now());
        let credentials = credentials.unwrap_or_default();
        let merged = merged_policies(
            HeartbeatPolicies::parse("other-lab=30").unwrap_or_default(),
            &credentials,
        )
        .unwrap_or_default();
        assert_eq!(
            merged.policy_for(Some("hb-lab")).map(|p| p.interval_s),
            Some(60)
        );
        assert_eq!(
            merged.policy_for(Some("other-lab")).map(|p| p.interval_s),
            Some(30)
        );
        assert_eq!(merged.policy_for(Some("plain")), None);

        let conflict = merged_policies(
            HeartbeatPolicies::parse("hb-lab=30").unwrap_or_default(),
            &credentials,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(conflict.contains("hb-lab"), "{conflict}");
        assert!(conflict.contains("HEARTBEAT_TRACKS"), "{conflict}");

        let bad = TrackCredentials::parse(
            &document(json!({"interval_s": 60, "grace_s": 100})),
            &[],
            now(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(bad.contains("hb-lab"), "{bad}");
        assert!(bad.contains("heartbeat.grace_s"), "{bad}");
    }
}
