//! The event set this process reads (ADR 0023, ADR 0033): every event type of this release,
//! unless the process was told, once at its start, to read like an earlier release that knows
//! only some of them.
//!
//! Restricting the set is how the forward direction of a rolling upgrade is tested for real: a
//! process that reads the current release's log knowing only the previous release's event types
//! (the event contract's baseline, `docs/events/baseline/`) decodes every other type as
//! [`super::events::UnknownEvent`], through the same tolerant path an older build takes — the
//! projector skips and counts it and holds the sandbox, the command side refuses the stream.
//! Production never restricts the set, and then [`knows`] is one read of an unset cell.

use std::collections::BTreeSet;
use std::sync::OnceLock;

static KNOWN: OnceLock<BTreeSet<String>> = OnceLock::new();

/// Makes this process read like a release that knows only `event_types` (a subset of this
/// release's). Once per process, before the first event is read: a second call, or a set that
/// names a type this release does not know, is refused with the reason.
pub fn read_only<I, S>(event_types: I) -> Result<(), String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let set: BTreeSet<String> = event_types.into_iter().map(Into::into).collect();
    if let Some(stranger) = set
        .iter()
        .find(|t| !super::events::EVENT_TYPES.contains(&t.as_str()))
    {
        return Err(format!(
            "{stranger} is not an event type of this release: a reader can only know fewer types than its build, not more"
        ));
    }
    KNOWN.set(set).map_err(|_| {
        "the event set of this process is already chosen; choose it once, at start-up".to_string()
    })
}

/// Whether this process reads `event_type` (every type of this release unless [`read_only`]
/// narrowed the set).
pub fn knows(event_type: &str) -> bool {
    KNOWN.get().is_none_or(|set| set.contains(event_type))
}

/// The narrowed event set, if [`read_only`] chose one.
pub fn narrowed() -> Option<&'static BTreeSet<String>> {
    KNOWN.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A set naming a type this release does not know is refused and narrows nothing (this test
    /// binary must keep reading every type, so no test here narrows the set for real).
    #[test]
    fn a_set_beyond_this_release_is_refused() {
        let refused = read_only(["SandboxRegistered", "SandboxTeleported"]);
        assert!(refused.is_err_and(|e| e.contains("SandboxTeleported")));
        assert!(narrowed().is_none());
        assert!(super::super::events::EVENT_TYPES.iter().all(|t| knows(t)));
    }
}
