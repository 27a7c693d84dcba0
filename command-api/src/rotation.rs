//! Secrets that rotate with an overlap (docs/security.md, "Rotating secrets"; ADR 0026).
//!
//! A lab runs for up to two days (longer with extensions), and its script holds the token and
//! caller secret it started with. A hard cut would fail every running lab's cleanup. So every
//! secret has a current value and, during a rotation, a previous value that is still accepted
//! until an explicit end time (`…_PREVIOUS` and `…_PREVIOUS_UNTIL`). New material is only ever
//! issued or signed with the current value; the previous one only verifies. Each secret rotates
//! on its own: the shared track token, the admin token, each per-track token and caller secret,
//! each webhook subscriber's secret (and the lease-token key, with its key id, in `lease`).
//!
//! Uses of a previous value are counted (`broker_previous_secret_used_total{secret}`), so an
//! operator can see when traffic has moved to the new value before the window closes.

use chrono::{DateTime, SubsecRound, Utc};
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// Longest accepted overlap: long enough for the longest lab (48 h plus extensions) to finish on
/// the old value, short enough that a forgotten previous value does not stay valid for good.
pub const MAX_OVERLAP_DAYS: i64 = 30;

/// Which value of a rotating secret matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched {
    /// The current value.
    Current,
    /// The previous value, inside its overlap window.
    Previous,
}

/// A secret with an optional previous value accepted until a set time.
#[derive(Clone, PartialEq, Eq)]
pub struct RotatingSecret {
    current: Secret,
    previous: Option<(Secret, DateTime<Utc>)>,
}

impl std::fmt::Debug for RotatingSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotatingSecret")
            .field("current", &self.current)
            .field(
                "previous_until",
                &self.previous.as_ref().map(|(_, until)| until),
            )
            .finish()
    }
}

impl RotatingSecret {
    /// A secret with no rotation in progress.
    pub fn new(current: impl Into<Secret>) -> Self {
        Self {
            current: current.into(),
            previous: None,
        }
    }

    /// During a rotation: `previous` is still accepted until `until`.
    pub fn with_previous(mut self, previous: impl Into<Secret>, until: DateTime<Utc>) -> Self {
        self.previous = Some((previous.into(), until));
        self
    }

    /// The value that issues and signs.
    pub fn current(&self) -> &str {
        self.current.expose()
    }

    /// The previous value and the end of its window, if a rotation is configured.
    pub fn previous(&self) -> Option<(&str, DateTime<Utc>)> {
        self.previous
            .as_ref()
            .map(|(secret, until)| (secret.expose(), *until))
    }

    /// Every value that verifies at `now`: the current one, then the previous one while its
    /// window is open.
    pub fn verifying_at(&self, now: DateTime<Utc>) -> impl Iterator<Item = (Matched, &str)> {
        std::iter::once((Matched::Current, self.current.expose())).chain(
            self.previous
                .as_ref()
                .filter(|(_, until)| now < *until)
                .map(|(secret, _)| (Matched::Previous, secret.expose())),
        )
    }

    /// Whether `candidate` equals a value accepted at `now`. Both values are always compared
    /// (each in constant time), so timing says neither which one matched nor whether a rotation
    /// is under way.
    pub fn matches(&self, candidate: &str, now: DateTime<Utc>) -> Option<Matched> {
        let current = equal(candidate, self.current.expose());
        let previous = self
            .previous
            .as_ref()
            .map(|(secret, until)| equal(candidate, secret.expose()) & (now < *until))
            .unwrap_or(false);
        if current {
            Some(Matched::Current)
        } else if previous {
            Some(Matched::Previous)
        } else {
            None
        }
    }

    /// Whether either value (current, or previous at any time) equals `other`: for the rule
    /// that no two roles share a token.
    pub fn holds(&self, other: &str) -> bool {
        self.current.expose() == other
            || self
                .previous
                .as_ref()
                .is_some_and(|(secret, _)| secret.expose() == other)
    }
}

/// Whether two secrets are equal, compared in constant time (for equal lengths).
pub(crate) fn equal(a: &str, b: &str) -> bool {
    // `ct_eq` on equal-length slices is constant-time; a length mismatch returns early, which
    // reveals only the length of the configured value.
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Parses and checks a previous value's end time (RFC 3339): it must be given with the value,
/// and lie at most [`MAX_OVERLAP_DAYS`] after `now`. A time already past is accepted (the
/// previous value is then simply refused), so a restart after the window needs no edit.
pub fn parse_until(
    name: &str,
    raw: Option<&str>,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, String> {
    let Some(raw) = raw.map(str::trim).filter(|r| !r.is_empty()) else {
        return Err(format!(
            "{name} is required with a previous value: the end of the overlap (RFC 3339, e.g. {})",
            (now + chrono::Duration::days(3)).format("%Y-%m-%dT%H:%M:%SZ")
        ));
    };
    // Whole seconds: caller signatures carry their time in seconds, so an end with a fraction
    // would keep the previous secret valid for part of a second longer than stated.
    let until = DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc).trunc_subsecs(0))
        .map_err(|e| format!("{name} is not an RFC 3339 time ({e}), e.g. 2026-12-10T09:00:00Z"))?;
    if until > now + chrono::Duration::days(MAX_OVERLAP_DAYS) {
        return Err(format!(
            "{name} lies more than {MAX_OVERLAP_DAYS} days ahead; an overlap only needs to outlast the longest running lab"
        ));
    }
    Ok(until)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// The previous value is accepted before its end and refused from then on; the current one
    /// always; anything else never.
    #[test]
    fn the_previous_value_verifies_until_its_end() {
        let until = at("2026-12-10T00:00:00Z");
        let secret = RotatingSecret::new("new-value").with_previous("old-value", until);
        let before = at("2026-12-09T23:59:59Z");
        assert_eq!(secret.matches("new-value", before), Some(Matched::Current));
        assert_eq!(secret.matches("old-value", before), Some(Matched::Previous));
        assert_eq!(secret.matches("old-value", until), None);
        assert_eq!(secret.matches("new-value", until), Some(Matched::Current));
        assert_eq!(secret.matches("other-value", before), None);
        assert_eq!(secret.verifying_at(before).count(), 2);
        assert_eq!(
            secret
                .verifying_at(until)
                .map(|(m, _)| m)
                .collect::<Vec<_>>(),
            [Matched::Current]
        );
        assert!(!format!("{secret:?}").contains("value"), "{secret:?}");
    }

    /// Comparison matches exactly, never on prefixes or lengths alone.
    #[test]
    fn tokens_compare_exactly() {
        assert!(equal("abc", "abc"));
        assert!(!equal("abc", "abd"));
        assert!(!equal("ab", "abc"));
        assert!(!equal("", "abc"));
    }

    /// An end time is required with a previous value, must parse, and may not lie more than
    /// the maximum overlap ahead; one already past is fine.
    #[test]
    fn overlap_ends_are_checked() {
        let now = at("2026-12-07T00:00:00Z");
        assert!(parse_until("X_UNTIL", None, now).is_err());
        assert!(parse_until("X_UNTIL", Some("tomorrow"), now).is_err());
        assert!(parse_until("X_UNTIL", Some("2027-03-01T00:00:00Z"), now).is_err());
        assert_eq!(
            parse_until("X_UNTIL", Some("2026-12-09T12:00:00Z"), now),
            Ok(at("2026-12-09T12:00:00Z"))
        );
        assert!(parse_until("X_UNTIL", Some("2026-01-01T00:00:00Z"), now).is_ok());
        assert_eq!(
            parse_until("X_UNTIL", Some("2026-12-09T12:00:00.900Z"), now),
            Ok(at("2026-12-09T12:00:00Z"))
        );
    }
}
