//! Page cursors that name the listing which issued them.
//!
//! Each paged admin listing answers a `cursor` of the form `<listing>.<position>`: the listing's
//! name (`sandboxes`, `events`, `allocations`) and the store's opaque position (URL-safe base64
//! without padding, as both stores and the event feed encode it). The name turns "only a cursor
//! this listing returned continues it" into a rule the OpenAPI document can state, as each
//! cursor parameter's `pattern`, and that the server checks before any store reads the
//! position: a cursor of another listing is a 400 `VALIDATION_ERROR` on both stores, where it
//! used to be read as a position of the wrong kind (the event feed's cursors fit the caller
//! listing's, and the embedded store's fit any filter).
//!
//! The sandbox listing also binds its filters: its cursor carries a short fingerprint of
//! `status`, `owner` and `prefix` (`sandboxes.<16 hex>.<position>`), so a cursor sent with other
//! filters is refused the same way on both stores (a DynamoDB position names one index
//! partition; an embedded one would silently continue another listing).
//!
//! An empty `cursor` is the first page, as it always was.

use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Longest cursor accepted, in characters (all ASCII). A real one is a few hundred: a DynamoDB
/// index key holding a sandbox id and a name of 256 bytes each encodes to under 1,000. The
/// bound also keeps a request's URI far below the 64 KiB that HTTP parsing allows (beyond which
/// the request is refused with 414 before any route sees it), whatever a client sends in it.
pub const MAX_CURSOR_CHARS: usize = 2048;

/// Hex digits of the filter fingerprint in a sandbox listing's cursor.
const FINGERPRINT_HEX: usize = 16;

/// A paged listing that issues cursors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// `GET /admin/sandboxes` (its filters are bound into the cursor).
    Sandboxes,
    /// `GET /admin/events`.
    Events,
    /// `GET /admin/callers/{caller}/allocations`.
    Allocations,
}

impl Listing {
    /// The name that opens this listing's cursors.
    const fn name(self) -> &'static str {
        match self {
            Self::Sandboxes => "sandboxes",
            Self::Events => "events",
            Self::Allocations => "allocations",
        }
    }

    /// The OpenAPI `pattern` of this listing's `cursor` parameter (empty: the first page). The
    /// annotations repeat it as a literal (utoipa takes none other); a test checks they agree.
    pub const fn pattern(self) -> &'static str {
        match self {
            Self::Sandboxes => r"^(sandboxes\.[0-9a-f]{16}\.[A-Za-z0-9_-]+)?$",
            Self::Events => r"^(events\.[A-Za-z0-9_-]+)?$",
            Self::Allocations => r"^(allocations\.[A-Za-z0-9_-]+)?$",
        }
    }

    /// The cursor a page answers for the store's `position` (`None` at the end of the listing).
    /// `scope` is the filter fingerprint for [`Listing::Sandboxes`] ([`sandbox_scope`]), else "".
    pub fn issue(self, scope: &str, position: Option<String>) -> Option<String> {
        position.map(|position| match self {
            Self::Sandboxes => format!("{}.{scope}.{position}", self.name()),
            Self::Events | Self::Allocations => format!("{}.{position}", self.name()),
        })
    }

    /// The store position a `cursor` parameter carries: `None` when it is absent or empty (the
    /// first page). Anything this listing, with this `scope`, could not have issued is a 400
    /// `VALIDATION_ERROR` on `cursor`.
    pub fn accept(self, scope: &str, raw: Option<&String>) -> Result<Option<String>, ApiError> {
        let raw = match raw.map(String::as_str) {
            None | Some("") => return Ok(None),
            Some(raw) => raw,
        };
        let refuse = |problem: &str| ApiError::validation("query", "cursor", problem);
        if raw.len() > MAX_CURSOR_CHARS {
            return Err(refuse("too long"));
        }
        let rest = raw
            .strip_prefix(self.name())
            .and_then(|rest| rest.strip_prefix('.'))
            .ok_or_else(|| {
                refuse(&format!(
                    "not a cursor of this listing: use the cursor a `{}` page returned",
                    self.name()
                ))
            })?;
        let position = match self {
            Self::Sandboxes => match rest.split_once('.') {
                Some((fingerprint, position)) if fingerprint == scope => position,
                _ => return Err(refuse("the cursor belongs to a listing with other filters")),
            },
            Self::Events | Self::Allocations => rest,
        };
        let well_formed = !position.is_empty()
            && position
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !well_formed {
            return Err(refuse("invalid cursor"));
        }
        Ok(Some(position.to_string()))
    }
}

/// The fingerprint of a sandbox listing's filters that its cursors carry (16 hex digits of a
/// SHA-256 over the length-prefixed values: a guard against mixing up listings, not a secret).
pub fn sandbox_scope(status: Option<&str>, owner: Option<&str>, prefix: Option<&str>) -> String {
    let mut hasher = Sha256::new();
    for value in [status, owner, prefix] {
        match value {
            None => hasher.update(b"-"),
            Some(v) => {
                hasher.update(v.len().to_string().as_bytes());
                hasher.update(b":");
                hasher.update(v.as_bytes());
            }
        }
        hasher.update(b"|");
    }
    let digest = hasher.finalize();
    hex::encode(&digest[..FINGERPRINT_HEX / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTINGS: [Listing; 3] = [Listing::Sandboxes, Listing::Events, Listing::Allocations];

    fn scope_of(listing: Listing) -> String {
        match listing {
            Listing::Sandboxes => sandbox_scope(Some("available"), None, Some("lab")),
            _ => String::new(),
        }
    }

    /// A cursor goes back to the position it was issued for, and only to its own listing.
    #[test]
    fn cursors_round_trip_within_their_listing_only() {
        for listing in LISTINGS {
            let scope = scope_of(listing);
            let issued = listing.issue(&scope, Some("eyJhZnRlciI6IngifQ".into()));
            let back = listing.accept(&scope, issued.as_ref());
            assert_eq!(back.ok().flatten().as_deref(), Some("eyJhZnRlciI6IngifQ"));
            for other in LISTINGS.into_iter().filter(|o| *o != listing) {
                assert!(
                    other.accept(&scope_of(other), issued.as_ref()).is_err(),
                    "{listing:?} cursor accepted by {other:?}"
                );
            }
        }
    }

    /// The sandbox listing refuses its own cursor under other filters.
    #[test]
    fn sandbox_cursors_are_bound_to_their_filters() {
        let scope = sandbox_scope(Some("available"), None, None);
        let issued = Listing::Sandboxes.issue(&scope, Some("abc".into()));
        let other = sandbox_scope(Some("allocated"), None, None);
        assert!(Listing::Sandboxes.accept(&other, issued.as_ref()).is_err());
        // Values cannot run into each other: ("ab", "c") and ("a", "bc") differ.
        assert_ne!(
            sandbox_scope(None, Some("ab"), Some("c")),
            sandbox_scope(None, Some("a"), Some("bc"))
        );
        assert_ne!(
            sandbox_scope(None, None, Some("")),
            sandbox_scope(None, None, None)
        );
    }

    /// Empty is the first page; malformed positions and oversized values are refused.
    #[test]
    fn empty_is_the_first_page_and_garbage_is_refused() {
        let events = Listing::Events;
        assert_eq!(events.accept("", None).ok(), Some(None));
        assert_eq!(events.accept("", Some(&String::new())).ok(), Some(None));
        for bad in [
            "events.",
            "events.a b",
            "events.a=",
            " events.abc",
            "eventsabc",
            "garbage",
        ] {
            assert!(events.accept("", Some(&bad.to_string())).is_err(), "{bad}");
        }
        let long = format!("events.{}", "a".repeat(MAX_CURSOR_CHARS));
        assert!(events.accept("", Some(&long)).is_err());
    }

    /// What `issue` produces matches the pattern the document declares, as far as a check
    /// without a regex engine can tell: the listing name, the fingerprint's length, the alphabet.
    #[test]
    fn issued_cursors_have_the_declared_shape() {
        let scope = sandbox_scope(None, Some("student"), None);
        assert_eq!(scope.len(), FINGERPRINT_HEX);
        assert!(scope
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        let cursor = Listing::Sandboxes
            .issue(&scope, Some("x_y-Z9".into()))
            .unwrap_or_default();
        assert_eq!(cursor, format!("sandboxes.{scope}.x_y-Z9"));
        assert!(Listing::Sandboxes.pattern().contains("{16}"));
    }
}
