//! Grouped appends (ADR 0025): several independent appends — *members* — written in one store
//! request, each on its own version conditions, each answered on its own.
//!
//! A member is exactly what [`EventStore::append`](super::EventStore::append) takes. Members may
//! *continue* each other: when one member's first version of a stream is another, earlier
//! member's last version of it plus one, the later one was decided on the earlier one's events
//! (the command service chains the quota slots of concurrent allocations this way), so it may be
//! stored only together with it. Anything else about the members is independent: one member's
//! conflict never refuses another that does not continue it.
//!
//! The rules here are pure, so both the adapters and the default sequential
//! [`EventStore::append_group`](super::EventStore::append_group) apply the same ones.

use std::collections::{HashMap, HashSet};

use crate::model::events::EventEnvelope;
use crate::store::{validate_append, StoreError, MAX_TRANSACTION_ITEMS};

/// What became of one member of a grouped append.
#[derive(Debug, Clone, PartialEq)]
pub enum MemberOutcome {
    /// Every event of the member is stored.
    Stored,
    /// The member failed as a lone append would have: a [`StoreError::VersionConflict`] naming
    /// the member's stream whose version was taken (nothing of it is stored), a refused member,
    /// or the store failing, in which case the outcome is unknown exactly as for
    /// [`EventStore::append`](super::EventStore::append).
    Failed(StoreError),
    /// Nothing of the member is stored because a member it continues was not stored (or its
    /// outcome is unknown): its events were decided on that member's, so they are void. The
    /// caller decides it again.
    Orphaned,
}

impl MemberOutcome {
    /// Whether the member's events are stored.
    pub fn is_stored(&self) -> bool {
        matches!(self, MemberOutcome::Stored)
    }
}

/// For every member, the earlier members it continues: member `j` continues member `i < j`
/// when, for some stream, `j`'s first version is `i`'s last version plus one.
pub fn continued_members(members: &[Vec<EventEnvelope>]) -> Vec<Vec<usize>> {
    // Stream → (the last version written by the group so far, the member that wrote it).
    let mut tails: HashMap<&str, (u64, usize)> = HashMap::new();
    let mut continued = Vec::with_capacity(members.len());
    for (j, member) in members.iter().enumerate() {
        let mut before: Vec<usize> = Vec::new();
        let mut firsts: HashMap<&str, u64> = HashMap::new();
        for e in member {
            firsts.entry(e.stream_id.as_str()).or_insert(e.version);
        }
        for (stream, first) in &firsts {
            if let Some((last, i)) = tails.get(stream) {
                if *last + 1 == *first && !before.contains(i) {
                    before.push(*i);
                }
            }
        }
        for e in member {
            let tail = tails.entry(e.stream_id.as_str()).or_insert((e.version, j));
            if e.version >= tail.0 {
                *tail = (e.version, j);
            }
        }
        before.sort_unstable();
        continued.push(before);
    }
    continued
}

/// Checks a group before anything is sent: each member by [`validate_append`], no two members
/// writing the same (stream, version) (one request cannot write an item twice, and two members
/// deciding the same version is the caller's error), and at most [`MAX_TRANSACTION_ITEMS`]
/// events in all. Per member: `Ok` or why it is refused; a group over the limit refuses every
/// member.
pub fn validate_group(members: &[Vec<EventEnvelope>]) -> Vec<Result<(), StoreError>> {
    let total: usize = members.iter().map(Vec::len).sum();
    if total > MAX_TRANSACTION_ITEMS {
        return members
            .iter()
            .map(|_| Err(StoreError::TooManyItems(total)))
            .collect();
    }
    let mut keys: HashSet<(&str, u64)> = HashSet::new();
    members
        .iter()
        .map(|member| {
            validate_append(member)?;
            if member.is_empty() {
                return Err(StoreError::InvalidAppend("an empty member".into()));
            }
            if let Some(e) = member
                .iter()
                .find(|e| keys.contains(&(e.stream_id.as_str(), e.version)))
            {
                return Err(StoreError::InvalidAppend(format!(
                    "{} v{} is written by an earlier member of the group",
                    e.stream_id, e.version
                )));
            }
            keys.extend(member.iter().map(|e| (e.stream_id.as_str(), e.version)));
            Ok(())
        })
        .collect()
}

/// Whether member `j` must be given up because a member it continues was not stored: the
/// outcomes decided so far (`None`: not decided yet, which counts as not stored).
pub fn orphaned_by(continued: &[usize], outcomes: &[Option<MemberOutcome>]) -> bool {
    continued.iter().any(|i| {
        !outcomes
            .get(*i)
            .and_then(Option::as_ref)
            .is_some_and(MemberOutcome::is_stored)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::append::test_envelope as env;

    /// A member continues the member whose last version of a stream precedes its first; a
    /// member writing a stream from a version nobody in the group wrote continues nobody.
    #[test]
    fn continuation_follows_versions() {
        let members = vec![
            vec![env("sandbox#a", 2), env("quota#t", 5)],
            vec![env("sandbox#b", 2), env("quota#t", 6)],
            vec![
                env("sandbox#c", 4),
                env("quota#t", 7),
                env("quota#caller#x", 1),
            ],
            vec![env("sandbox#d", 1), env("quota#caller#y", 3)],
        ];
        assert_eq!(
            continued_members(&members),
            vec![vec![], vec![0], vec![1], vec![]]
        );
    }

    /// Shared items, empty members and oversized groups are refused before anything is sent;
    /// the valid members of a group stay valid.
    #[test]
    fn group_validation() {
        let ok = validate_group(&[vec![env("a", 1)], vec![env("a", 2)], vec![env("a", 1)]]);
        assert!(ok[0].is_ok() && ok[1].is_ok());
        assert!(matches!(ok[2], Err(StoreError::InvalidAppend(_))));
        assert!(matches!(
            validate_group(&[vec![]])[0],
            Err(StoreError::InvalidAppend(_))
        ));
        let many: Vec<Vec<EventEnvelope>> = (1..=101).map(|v| vec![env("s", v)]).collect();
        assert!(validate_group(&many)
            .iter()
            .all(|r| *r == Err(StoreError::TooManyItems(101))));
    }

    /// An orphan is a member whose predecessor was not stored or is undecided.
    #[test]
    fn orphans() {
        let outcomes = vec![
            Some(MemberOutcome::Stored),
            Some(MemberOutcome::Failed(StoreError::VersionConflict {
                stream_id: "sandbox#b".into(),
            })),
            None,
        ];
        assert!(!orphaned_by(&[0], &outcomes));
        assert!(orphaned_by(&[0, 1], &outcomes));
        assert!(orphaned_by(&[2], &outcomes));
        assert!(!orphaned_by(&[], &outcomes));
    }
}
