//! The `Prefer` request header (RFC 7240) as the allocation reads it. A preference the broker
//! does not know, or one with a value it cannot read, is ignored, as the RFC asks: a client
//! that sends `Prefer` never gets an error for it.

use axum::http::HeaderMap;

/// The preferences of one request that the allocation acts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Preferences {
    /// `wait=N`: the seconds the client is willing to wait for an answer.
    pub wait_s: Option<u64>,
    /// `respond-async` was asked for.
    pub respond_async: bool,
}

/// Reads every `Prefer` header of `headers` (several headers, or comma-separated lists; names
/// are case-insensitive; parameters after `;` are ignored). The first `wait` wins.
pub fn preferences(headers: &HeaderMap) -> Preferences {
    let mut found = Preferences::default();
    for value in headers.get_all("prefer") {
        let Ok(text) = value.to_str() else {
            continue;
        };
        for preference in text.split(',') {
            let token = preference.split(';').next().unwrap_or_default().trim();
            let (name, value) = match token.split_once('=') {
                Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
                None => (token, None),
            };
            if name.eq_ignore_ascii_case("wait") && found.wait_s.is_none() {
                found.wait_s = value.and_then(|v| v.parse::<u64>().ok());
            } else if name.eq_ignore_ascii_case("respond-async") {
                found.respond_async = true;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn of(values: &[&str]) -> Preferences {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("prefer", HeaderValue::from_str(v).expect("test header"));
        }
        preferences(&headers)
    }

    /// `wait` is read in any case, with or without quotes, beside other preferences.
    #[test]
    fn reads_wait_among_other_preferences() {
        assert_eq!(of(&["wait=10"]).wait_s, Some(10));
        assert_eq!(of(&["return=minimal, WAIT=\"7\""]).wait_s, Some(7));
        assert_eq!(of(&["handling=lenient", "wait=3; foo=bar"]).wait_s, Some(3));
        assert!(of(&["respond-async, wait=5"]).respond_async);
    }

    /// Values that are not a number of seconds are ignored, as is the absent header.
    #[test]
    fn ignores_what_it_cannot_read() {
        assert_eq!(of(&[]), Preferences::default());
        assert_eq!(of(&["wait=soon"]).wait_s, None);
        assert_eq!(of(&["wait=-1"]).wait_s, None);
        assert_eq!(of(&["wait"]).wait_s, None);
    }
}
