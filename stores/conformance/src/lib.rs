//! The store conformance suite (DESIGN.md §9): every check is a public async function over the
//! ports of one store ([`Ports`]: `Arc<dyn EventStore>` and `Arc<dyn ViewStore>`), so the
//! embedded store and DynamoDB are held to the same semantics by the same code. The integration
//! tests instantiate all of them per adapter with [`conformance_tests!`]; checks that only make
//! sense for one adapter (reopening a file, DynamoDB item shapes) stay beside those tests.
//!
//! # Layout
//! - [`Ports`], [`CheckResult`] — what a check takes and returns;
//! - [`conformance_tests!`] — one `#[tokio::test]` per check for a store, so a check added here
//!   runs against every adapter without touching their tests;
//! - the fixtures [`event`], [`row`], [`delta`], [`now_ms`], shared with the adapter-specific checks;
//! - the checks, one function each: the event store (appends, conflicts, atomic batches, races,
//!   large streams, envelopes, refused batches, scans), then the view (conditional rows, stats,
//!   candidates, listings, the due index, checkpoints, fenced checkpoints).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use domain::model::events::truncate_to_millis;
use domain::store::{encode_cursor, CandidateQuery, EventStore, ListFilter, StoreError, ViewStore};
use domain::{EventEnvelope, PoolRow, SandboxStatus, StatsDelta};
use serde_json::json;

/// What every check returns: a store error ends it (assertions panic).
pub type CheckResult = Result<(), StoreError>;

/// Both ports of one store under test.
pub struct Ports {
    /// The event-store port.
    pub events: Arc<dyn EventStore>,
    /// The view port (reads and the projector's writes).
    pub view: Arc<dyn ViewStore>,
    /// Write shards of the view's indexes (1: unsharded, as the embedded store).
    pub index_shards: u32,
}

impl Ports {
    /// The ports of a store that implements both, with unsharded indexes.
    pub fn of<S: EventStore + ViewStore>(store: S) -> Ports {
        let store = Arc::new(store);
        Ports {
            events: store.clone(),
            view: store,
            index_shards: 1,
        }
    }

    /// The same ports on a store whose view indexes are write-sharded `index_shards` ways.
    pub fn with_index_shards(self, index_shards: u32) -> Ports {
        Ports {
            index_shards,
            ..self
        }
    }
}

/// One `#[tokio::test]` per conformance check, each on fresh ports from `$ports` (an expression
/// of a future that yields [`Ports`], evaluated once per test). Use it inside a module per
/// adapter: `mod embedded { store_conformance::conformance_tests!(super::embedded_ports()); }`.
#[macro_export]
macro_rules! conformance_tests {
    ($ports:expr) => {
        $crate::conformance_tests!(@cases $ports;
            append_and_load_round_trip,
            version_conflict_names_the_stream,
            multi_stream_batch_is_atomic,
            grouped_members_are_answered_one_by_one,
            concurrent_appenders_take_distinct_versions,
            large_stream_loads_completely,
            envelope_is_preserved_exactly,
            oversized_and_malformed_batches_are_refused,
            empty_stream_id_is_refused,
            scan_visits_every_event_once,
            write_row_is_conditional,
            stats_sum_over_shards,
            candidates_wrap_around_and_filter_by_prefix,
            list_pages_with_cursor,
            due_returns_oldest_first,
            checkpoints_and_clear,
            fenced_checkpoints_refuse_an_older_token
        );
    };
    (@cases $ports:expr; $($case:ident),+ $(,)?) => {
        $(
            #[doc = concat!("Store conformance: `", stringify!($case), "`.")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() -> $crate::CheckResult {
                $crate::$case($ports.await).await
            }
        )+
    };
}

/// Now, at the millisecond precision every store keeps.
pub fn now_ms() -> DateTime<Utc> {
    truncate_to_millis(Utc::now())
}

/// A probe event at `version` of `stream_id` (a type no aggregate knows, so no projection applies it).
pub fn event(stream_id: &str, version: u64) -> EventEnvelope {
    EventEnvelope {
        stream_id: stream_id.to_string(),
        version,
        event_type: "ConformanceProbe".into(),
        schema_version: 1,
        event_id: uuid::Uuid::now_v7(),
        occurred_at: now_ms(),
        actor: "admin".into(),
        request_id: None,
        correlation_id: None,
        payload: json!({"type": "ConformanceProbe", "n": version}),
    }
}

fn conflict(stream_id: &str) -> Result<(), StoreError> {
    Err(StoreError::VersionConflict {
        stream_id: stream_id.to_string(),
    })
}

/// An unowned pool row of `status` with the given candidate `pick` and row `version`.
pub fn row(id: &str, name: &str, status: SandboxStatus, pick: u32, version: u64) -> PoolRow {
    PoolRow {
        sandbox_id: id.to_string(),
        status,
        name: name.to_string(),
        external_id: format!("identity/accounts/{id}"),
        sfdc_account_id: None,
        owner: None,
        track_name: None,
        allocated_at: None,
        expires_at: None,
        deletion_requested_at: None,
        attempts: 0,
        last_error: None,
        due_at: None,
        pick,
        version,
        updated_at: now_ms(),
        held_by: None,
        earmark: None,
    }
}

/// Stats moves, one (status, count) per pair.
pub fn delta(pairs: &[(SandboxStatus, i64)]) -> StatsDelta {
    let mut d = StatsDelta::default();
    for (status, n) in pairs {
        d.0[status.index()] += n;
    }
    d
}

/// Appends one event and a batch, then reads them back whole, after a version, and the latest.
pub async fn append_and_load_round_trip(p: Ports) -> CheckResult {
    let s = "sandbox#round-trip";
    let first = event(s, 1);
    let batch = vec![event(s, 2), event(s, 3)];
    p.events.append(vec![first.clone()]).await?;
    p.events.append(batch.clone()).await?;
    let mut all = vec![first];
    all.extend(batch.clone());
    assert_eq!(p.events.load(s).await?, all);
    assert_eq!(p.events.load_after(s, 1).await?, batch);
    assert_eq!(p.events.load_after(s, 3).await?, vec![]);
    assert_eq!(p.events.load_latest(s).await?, all.last().cloned());
    assert_eq!(p.events.load("sandbox#never").await?, vec![]);
    assert_eq!(p.events.load_latest("sandbox#never").await?, None);
    p.events.append(vec![]).await?;
    Ok(())
}

/// A taken version is a VersionConflict naming the stream that lost, alone or in a batch.
pub async fn version_conflict_names_the_stream(p: Ports) -> CheckResult {
    let s = "sandbox#conflict";
    let other = "claim#5:other#k";
    p.events.append(vec![event(s, 1)]).await?;
    assert_eq!(p.events.append(vec![event(s, 1)]).await, conflict(s));
    assert_eq!(
        p.events.append(vec![event(other, 1), event(s, 1)]).await,
        conflict(s)
    );
    assert_eq!(
        p.events.append(vec![event(s, 1), event(s, 2)]).await,
        conflict(s)
    );
    assert_eq!(p.events.load(s).await?.len(), 1);
    assert_eq!(p.events.load(other).await?, vec![]);
    Ok(())
}

/// When one stream of a batch conflicts, nothing of the batch is visible in any stream.
pub async fn multi_stream_batch_is_atomic(p: Ports) -> CheckResult {
    let (a, b) = ("sandbox#atomic-a", "claim#1:x#atomic-b");
    let original = event(a, 1);
    p.events.append(vec![original.clone()]).await?;
    // The conflicting stream last, then first: the other stream's puts must be undone either way.
    assert_eq!(
        p.events
            .append(vec![event(b, 1), event(b, 2), event(a, 1)])
            .await,
        conflict(a)
    );
    assert_eq!(
        p.events.append(vec![event(a, 1), event(b, 1)]).await,
        conflict(a)
    );
    assert_eq!(p.events.load(a).await?, vec![original]);
    assert_eq!(p.events.load(b).await?, vec![]);
    p.events.append(vec![event(a, 2), event(b, 1)]).await?;
    assert_eq!(p.events.load(a).await?.len(), 2);
    assert_eq!(p.events.load(b).await?.len(), 1);
    Ok(())
}

/// A grouped append answers each member on its own (ADR 0025): a member whose version is taken
/// fails alone with the conflict naming its stream, a member continuing it on another stream is
/// orphaned, the independent members are stored; chained members are stored together; a member
/// repeating an earlier member's item is refused.
pub async fn grouped_members_are_answered_one_by_one(p: Ports) -> CheckResult {
    use domain::store::MemberOutcome::{Failed, Orphaned, Stored};
    let taken = "sandbox#group-taken";
    p.events.append(vec![event(taken, 1)]).await?;
    let members = vec![
        vec![event("sandbox#group-a", 1), event("claim#1:a#group", 1)],
        vec![event(taken, 1), event("quota#group", 1)],
        vec![event("sandbox#group-b", 1), event("quota#group", 2)],
        vec![event("sandbox#group-c", 1), event("claim#1:c#group", 1)],
    ];
    let outcomes = p.events.append_group(members).await;
    assert_eq!(
        outcomes,
        vec![
            Stored,
            Failed(StoreError::VersionConflict {
                stream_id: taken.to_string()
            }),
            Orphaned,
            Stored
        ]
    );
    assert_eq!(p.events.load("sandbox#group-a").await?.len(), 1);
    assert_eq!(p.events.load("claim#1:c#group").await?.len(), 1);
    assert_eq!(p.events.load("quota#group").await?, vec![]);
    assert_eq!(p.events.load("sandbox#group-b").await?, vec![]);
    assert_eq!(p.events.load(taken).await?.len(), 1);
    let chained = p
        .events
        .append_group(vec![
            vec![event("sandbox#group-b", 1), event("quota#group", 1)],
            vec![event("sandbox#group-d", 1), event("quota#group", 2)],
        ])
        .await;
    assert_eq!(chained, vec![Stored, Stored]);
    let versions: Vec<u64> = p
        .events
        .load("quota#group")
        .await?
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(versions, vec![1, 2]);
    let repeated = p
        .events
        .append_group(vec![
            vec![event("sandbox#group-e", 1)],
            vec![event("sandbox#group-e", 1)],
        ])
        .await;
    assert_eq!(repeated[0], Stored);
    assert!(
        matches!(repeated[1], Failed(StoreError::InvalidAppend(_))),
        "{repeated:?}"
    );
    Ok(())
}

/// 64 writers race on one stream (load latest, append next, retry on conflict) until each wrote
/// 5: versions 1..=320 each exactly once, no gap, and every writer's 5 events are all there.
pub async fn concurrent_appenders_take_distinct_versions(p: Ports) -> CheckResult {
    const WRITERS: usize = 64;
    const EACH: usize = 5;
    let s = "sandbox#contended";
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let events = p.events.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = 0;
            let mut conflicts = 0u64;
            while written < EACH {
                let latest = events.load_latest(s).await?.map_or(0, |e| e.version);
                let mut e = event(s, latest + 1);
                e.actor = format!("job:writer-{writer}");
                let id = e.event_id;
                match events.append(vec![e]).await {
                    Ok(()) => written += 1,
                    Err(StoreError::VersionConflict { stream_id }) => {
                        assert_eq!(stream_id, s);
                        conflicts += 1;
                    }
                    // An overloaded store (64 writers on one item) may time out after the write
                    // landed: the outcome is unknown, so read whether it did, as the command
                    // side does. The checks below still hold every version to one writer.
                    Err(StoreError::Unavailable(_)) => {
                        if events
                            .load(s)
                            .await?
                            .iter()
                            .any(|stored| stored.event_id == id)
                        {
                            written += 1;
                        }
                    }
                    Err(other) => return Err(other),
                }
            }
            Ok::<u64, StoreError>(conflicts)
        }));
    }
    for task in tasks {
        task.await.expect("writer task panicked")?;
    }
    let stored = p.events.load(s).await?;
    let versions: Vec<u64> = stored.iter().map(|e| e.version).collect();
    let expected: Vec<u64> = (1..=(WRITERS * EACH) as u64).collect();
    assert_eq!(versions, expected, "versions must be 1..=320, each once");
    let mut per_writer: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &stored {
        *per_writer.entry(e.actor.as_str()).or_default() += 1;
    }
    assert_eq!(per_writer.len(), WRITERS);
    assert!(per_writer.values().all(|n| *n == EACH), "{per_writer:?}");
    let ids: HashSet<_> = stored.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), WRITERS * EACH);
    Ok(())
}

/// A stream of ~2 MB (40 events of ~50 KB, more than one 1 MB DynamoDB page) loads completely.
pub async fn large_stream_loads_completely(p: Ports) -> CheckResult {
    let s = "sandbox#large";
    let filler = "ü".repeat(25_000); // 50,000 bytes of UTF-8
    let mut all = Vec::new();
    for chunk in 0..4u64 {
        let batch: Vec<_> = (1..=10u64)
            .map(|i| {
                let mut e = event(s, chunk * 10 + i);
                e.payload =
                    json!({"type": "ConformanceProbe", "filler": filler, "i": chunk * 10 + i});
                e
            })
            .collect();
        p.events.append(batch.clone()).await?;
        all.extend(batch);
    }
    let loaded = p.events.load(s).await?;
    assert_eq!(loaded.len(), 40, "every event of a 2 MB stream must load");
    assert_eq!(loaded, all);
    assert_eq!(p.events.load_after(s, 5).await?.len(), 35);
    assert_eq!(p.events.load_latest(s).await?.map(|e| e.version), Some(40));
    Ok(())
}

/// Every envelope field survives storage exactly: ids, unicode, optional ids, ms timestamps.
pub async fn envelope_is_preserved_exactly(p: Ports) -> CheckResult {
    let s = "claim#9:stü#1/✓#ключ 🔑";
    let full = EventEnvelope {
        stream_id: s.into(),
        version: 1,
        event_type: "ClaimGranted".into(),
        schema_version: 1,
        event_id: uuid::Uuid::now_v7(),
        occurred_at: DateTime::from_timestamp_millis(1_767_225_600_123).unwrap_or_default(),
        actor: "track:stü#1/✓".into(),
        request_id: Some("req-ß-1".into()),
        correlation_id: Some("corr/🔑".into()),
        payload: json!({
            "type": "ClaimGranted",
            "caller": "stü#1/✓",
            "nested": {"list": [1, 2.5, -3, null, true], "empty": {}, "text": "\"quoted\"\n"},
        }),
    };
    let mut bare = event(s, 2);
    bare.occurred_at = DateTime::from_timestamp_millis(1_767_225_600_999).unwrap_or_default();
    p.events.append(vec![full.clone(), bare.clone()]).await?;
    assert_eq!(p.events.load(s).await?, vec![full.clone(), bare.clone()]);
    assert_eq!(p.events.load_latest(s).await?, Some(bare));
    let mut cursor = None;
    let mut scanned = Vec::new();
    loop {
        let page = p.events.scan(0, 1, cursor, 100).await?;
        scanned.extend(page.events);
        cursor = page.cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert!(
        scanned.contains(&full),
        "scan must return the same envelope"
    );
    Ok(())
}

/// More than 100 events is TooManyItems, 100 is fine; gaps and version 0 are InvalidAppend;
/// nothing of a refused batch is stored.
pub async fn oversized_and_malformed_batches_are_refused(p: Ports) -> CheckResult {
    let s = "sandbox#sizes";
    let too_many: Vec<_> = (1..=101).map(|v| event(s, v)).collect();
    assert_eq!(
        p.events.append(too_many).await,
        Err(StoreError::TooManyItems(101))
    );
    assert!(matches!(
        p.events.append(vec![event(s, 1), event(s, 3)]).await,
        Err(StoreError::InvalidAppend(_))
    ));
    assert!(matches!(
        p.events.append(vec![event(s, 0)]).await,
        Err(StoreError::InvalidAppend(_))
    ));
    assert_eq!(p.events.load(s).await?, vec![]);
    let hundred: Vec<_> = (1..=100).map(|v| event(s, v)).collect();
    p.events.append(hundred).await?;
    assert_eq!(p.events.load(s).await?.len(), 100);
    Ok(())
}

/// An empty stream id is InvalidAppend on every store (DynamoDB cannot key it; the embedded
/// store once took it), alone or inside a batch, and the batch's other stream stays untouched.
pub async fn empty_stream_id_is_refused(p: Ports) -> CheckResult {
    assert!(matches!(
        p.events.append(vec![event("", 1)]).await,
        Err(StoreError::InvalidAppend(_))
    ));
    let other = "sandbox#beside-empty";
    assert!(matches!(
        p.events.append(vec![event(other, 1), event("", 1)]).await,
        Err(StoreError::InvalidAppend(_))
    ));
    assert_eq!(p.events.load(other).await?, vec![]);
    Ok(())
}

/// A paged, segmented scan returns every event exactly once, each stream whole within one
/// segment and in version order; a forged cursor is InvalidCursor.
pub async fn scan_visits_every_event_once(p: Ports) -> CheckResult {
    let mut appended = BTreeSet::new();
    for stream in 0..12u64 {
        let s = format!("sandbox#scan-{stream}");
        let batch: Vec<_> = (1..=stream % 5 + 1).map(|v| event(&s, v)).collect();
        appended.extend(batch.iter().map(|e| (e.stream_id.clone(), e.version)));
        p.events.append(batch).await?;
    }
    for segments in [1u32, 3] {
        let mut seen = BTreeSet::new();
        let mut segment_of: BTreeMap<String, u32> = BTreeMap::new();
        for segment in 0..segments {
            let mut cursor = None;
            let mut last: BTreeMap<String, u64> = BTreeMap::new();
            for _ in 0..1000 {
                let page = p.events.scan(segment, segments, cursor, 4).await?;
                for e in page.events {
                    let previous = last.insert(e.stream_id.clone(), e.version).unwrap_or(0);
                    assert_eq!(e.version, previous + 1, "{} out of order", e.stream_id);
                    assert_eq!(
                        *segment_of.entry(e.stream_id.clone()).or_insert(segment),
                        segment,
                        "{} split across segments",
                        e.stream_id
                    );
                    assert!(seen.insert((e.stream_id, e.version)), "seen twice");
                }
                cursor = page.cursor;
                if cursor.is_none() {
                    break;
                }
            }
            assert!(cursor.is_none(), "scan did not end");
        }
        assert_eq!(seen, appended, "{segments} segments");
    }
    assert_eq!(
        p.events
            .scan(0, 1, Some("definitely-not-a-cursor".into()), 4)
            .await
            .map(|page| page.events.len()),
        Err(StoreError::InvalidCursor)
    );
    Ok(())
}

/// write_row applies only on the expected version (None = no row yet); rows round-trip exactly.
pub async fn write_row_is_conditional(p: Ports) -> CheckResult {
    let v1 = row("w-1", "lab-w-1", SandboxStatus::Available, 7, 1);
    let register = delta(&[(SandboxStatus::Available, 1)]);
    assert_eq!(
        p.view.write_row(Some(1), &v1, &register).await,
        conflict("w-1")
    );
    p.view.write_row(None, &v1, &register).await?;
    assert_eq!(
        p.view.write_row(None, &v1, &register).await,
        conflict("w-1")
    );
    let at = now_ms();
    let v2 = PoolRow {
        status: SandboxStatus::Allocated,
        sfdc_account_id: Some("sf-ü".into()),
        owner: Some("stü#1".into()),
        track_name: Some("track/1".into()),
        allocated_at: Some(at),
        expires_at: Some(at + Duration::hours(48)),
        deletion_requested_at: Some(at + Duration::minutes(1)),
        attempts: 2,
        last_error: Some("boom ✗".into()),
        due_at: Some(at + Duration::hours(48)),
        pick: u32::MAX,
        version: 2,
        updated_at: at,
        held_by: None,
        earmark: None,
        ..v1.clone()
    };
    let allocate = delta(&[
        (SandboxStatus::Available, -1),
        (SandboxStatus::Allocated, 1),
    ]);
    assert_eq!(
        p.view.write_row(Some(5), &v2, &allocate).await,
        conflict("w-1")
    );
    assert_eq!(p.view.load_row("w-1").await?, Some(v1.clone()));
    p.view.write_row(Some(1), &v2, &allocate).await?;
    assert_eq!(p.view.load_row("w-1").await?, Some(v2.clone()));
    assert_eq!(p.view.get("w-1").await?, Some(v2.clone()));
    // A redelivered event (same expected version) is refused, and the stats do not move twice.
    assert_eq!(
        p.view.write_row(Some(1), &v2, &allocate).await,
        conflict("w-1")
    );
    let stats = p.view.stats().await?;
    assert_eq!(stats.get(SandboxStatus::Allocated), 1);
    assert_eq!(stats.get(SandboxStatus::Available), 0);
    assert_eq!(p.view.load_row("w-missing").await?, None);
    assert_eq!(p.view.get("w-missing").await?, None);
    Ok(())
}

/// Counters written to many shards add up: 20 registered, 7 allocated, zero deltas change nothing.
pub async fn stats_sum_over_shards(p: Ports) -> CheckResult {
    for i in 0..20 {
        let r = row(
            &format!("st-{i}"),
            &format!("lab-{i}"),
            SandboxStatus::Available,
            i,
            1,
        );
        p.view
            .write_row(None, &r, &delta(&[(SandboxStatus::Available, 1)]))
            .await?;
    }
    for i in 0..7 {
        let r = row(
            &format!("st-{i}"),
            &format!("lab-{i}"),
            SandboxStatus::Allocated,
            i,
            2,
        );
        let d = delta(&[
            (SandboxStatus::Available, -1),
            (SandboxStatus::Allocated, 1),
        ]);
        p.view.write_row(Some(1), &r, &d).await?;
    }
    let unchanged = row("st-0", "lab-0", SandboxStatus::Allocated, 0, 3);
    p.view
        .write_row(Some(2), &unchanged, &StatsDelta::default())
        .await?;
    let stats = p.view.stats().await?;
    assert_eq!(stats.get(SandboxStatus::Available), 13);
    assert_eq!(stats.get(SandboxStatus::Allocated), 7);
    assert_eq!(stats.total(), 20);
    Ok(())
}

/// Candidates run from the random start upwards and wrap below it, available rows only; a prefix
/// returns exactly the available rows whose names start with it, and pages on from `after_name`.
pub async fn candidates_wrap_around_and_filter_by_prefix(p: Ports) -> CheckResult {
    let add = |id: String, name: String, status, pick| {
        let view = p.view.clone();
        async move {
            let r = row(&id, &name, status, pick, 1);
            view.write_row(None, &r, &delta(&[(status, 1)])).await
        }
    };
    for k in 1..=10u32 {
        let prefix = if k % 2 == 0 { "lab-a" } else { "lab-b" };
        add(
            format!("c-{k}"),
            format!("{prefix}-{k:02}"),
            SandboxStatus::Available,
            k * 100,
        )
        .await?;
    }
    add(
        "c-x".into(),
        "lab-a-99".into(),
        SandboxStatus::Allocated,
        550,
    )
    .await?;
    add("c-y".into(), "other-1".into(), SandboxStatus::Stale, 50).await?;
    let picks = |rows: &[PoolRow]| rows.iter().map(|r| r.pick).collect::<Vec<_>>();
    let query = |start_pick, limit, prefix: Option<&str>| CandidateQuery {
        prefix: prefix.map(str::to_string),
        start_pick,
        after_name: None,
        limit,
    };
    // An unsharded view fills every page with `limit` distinct available rows while it has that
    // many, in the whole range's order. A sharded one serves a page from one shard, short or
    // not, so its pages hold between one and `limit` rows and their order is per shard (ADR
    // 0014; the shard walk is held to account in `index_shards.rs`).
    let distinct = |rows: &[PoolRow]| rows.iter().map(|r| r.pick).collect::<BTreeSet<_>>().len();
    let full = |len: usize, limit: usize| {
        if p.index_shards == 1 {
            len == limit
        } else {
            (1..=limit).contains(&len)
        }
    };
    let all_picks: Vec<u32> = (1..=10).map(|k| k * 100).collect();
    let rows = p.view.candidates(&query(650, 6, None)).await?;
    assert!(full(rows.len(), 6) && distinct(&rows) == rows.len());
    if p.index_shards == 1 {
        assert_eq!(picks(&rows), [700, 800, 900, 1000, 100, 200]);
    }
    let rows = p.view.candidates(&query(0, 50, None)).await?;
    let mut sorted = picks(&rows);
    sorted.sort_unstable();
    assert!(!sorted.is_empty() && sorted.iter().all(|pick| all_picks.contains(pick)));
    if p.index_shards == 1 {
        assert_eq!(picks(&rows), all_picks);
    }
    let rows = p.view.candidates(&query(u32::MAX, 3, None)).await?;
    assert!(full(rows.len(), 3) && distinct(&rows) == rows.len());
    assert!(rows.iter().all(|r| all_picks.contains(&r.pick)));
    if p.index_shards == 1 {
        assert_eq!(picks(&rows), [100, 200, 300]);
    }
    let rows = p.view.candidates(&query(0, 50, Some("lab-a"))).await?;
    let names: BTreeSet<_> = rows.iter().map(|r| r.name.clone()).collect();
    let expected: BTreeSet<_> = (1..=5).map(|k| format!("lab-a-{:02}", k * 2)).collect();
    assert!(!names.is_empty() && names.is_subset(&expected), "{names:?}");
    if p.index_shards == 1 {
        assert_eq!(names, expected);
    }
    assert!(rows.iter().all(|r| r.status == SandboxStatus::Available));
    assert!(full(
        p.view.candidates(&query(0, 2, Some("lab-b"))).await?.len(),
        2
    ));
    assert_eq!(p.view.candidates(&query(0, 5, Some("nope"))).await?, vec![]);
    // With `after_name`, a prefix page continues after that name and wraps to the range's start
    // (the allocated `lab-a-99` is never a candidate).
    let after = |after: &str, limit| CandidateQuery {
        after_name: Some(after.to_string()),
        ..query(0, limit, Some("lab-a"))
    };
    let names = |rows: &[PoolRow]| rows.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    for (after_name, limit, unsharded) in [
        ("lab-a-04", 2, vec!["lab-a-06", "lab-a-08"]),
        ("lab-a-08", 3, vec!["lab-a-10", "lab-a-02", "lab-a-04"]),
    ] {
        let rows = p.view.candidates(&after(after_name, limit)).await?;
        let got: BTreeSet<String> = names(&rows).into_iter().collect();
        assert!(full(got.len(), limit) && got.len() == rows.len(), "{got:?}");
        assert!(got.is_subset(&expected), "{got:?}");
        if p.index_shards == 1 {
            assert_eq!(names(&rows), unsharded);
        }
    }
    Ok(())
}

/// Follows a listing's cursors to the end: every matching row exactly once, pages never larger
/// than the limit, filters by status, owner and prefix; forged cursors are InvalidCursor.
pub async fn list_pages_with_cursor(p: Ports) -> CheckResult {
    let at = now_ms();
    for i in 0..25u32 {
        let mut r = row(
            &format!("l-{i:02}"),
            &format!("row-{i:02}"),
            SandboxStatus::Available,
            i,
            1,
        );
        if i % 2 == 1 {
            r.status = SandboxStatus::Allocated;
            r.owner = Some(if i % 4 == 1 { "stu-a" } else { "stu-b" }.into());
            r.allocated_at = Some(at + Duration::seconds(i64::from(i)));
            r.expires_at = Some(at + Duration::hours(48));
            r.due_at = r.expires_at;
        }
        p.view.write_row(None, &r, &delta(&[(r.status, 1)])).await?;
    }
    async fn all_pages(
        view: &Arc<dyn ViewStore>,
        filter: &ListFilter,
        limit: usize,
    ) -> Result<Vec<PoolRow>, StoreError> {
        let mut rows = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let page = view.list(filter, limit, cursor.as_deref()).await?;
            assert!(page.rows.len() <= limit, "page larger than the limit");
            rows.extend(page.rows);
            cursor = page.cursor;
            if cursor.is_none() {
                return Ok(rows);
            }
        }
        panic!("listing did not end");
    }
    let ids = |rows: &[PoolRow]| {
        rows.iter()
            .map(|r| r.sandbox_id.clone())
            .collect::<Vec<_>>()
    };
    let sorted = |rows: &[PoolRow]| {
        let mut v = ids(rows);
        v.sort();
        v
    };
    let expect = |pred: &dyn Fn(u32) -> bool| {
        (0..25u32)
            .filter(|i| pred(*i))
            .map(|i| format!("l-{i:02}"))
            .collect::<Vec<_>>()
    };

    let everything = all_pages(&p.view, &ListFilter::default(), 10).await?;
    assert_eq!(everything.len(), 25);
    assert_eq!(sorted(&everything), expect(&|_| true));

    let available = ListFilter {
        status: Some(SandboxStatus::Available),
        ..ListFilter::default()
    };
    let rows = all_pages(&p.view, &available, 5).await?;
    // One status lists in name order.
    assert_eq!(ids(&rows), expect(&|i| i % 2 == 0));

    let student = ListFilter {
        owner: Some("stu-a".into()),
        ..ListFilter::default()
    };
    let rows = all_pages(&p.view, &student, 4).await?;
    assert_eq!(sorted(&rows), expect(&|i| i % 4 == 1));
    let student_allocated = ListFilter {
        status: Some(SandboxStatus::Allocated),
        ..student.clone()
    };
    assert_eq!(
        sorted(&all_pages(&p.view, &student_allocated, 2).await?),
        expect(&|i| i % 4 == 1)
    );
    let student_available = ListFilter {
        status: Some(SandboxStatus::Available),
        ..student
    };
    assert_eq!(all_pages(&p.view, &student_available, 2).await?, vec![]);

    let prefixed = ListFilter {
        prefix: Some("row-1".into()),
        ..ListFilter::default()
    };
    let rows = all_pages(&p.view, &prefixed, 3).await?;
    assert_eq!(sorted(&rows), expect(&|i| (10..20).contains(&i)));
    let allocated_prefixed = ListFilter {
        status: Some(SandboxStatus::Allocated),
        prefix: Some("row-2".into()),
        ..ListFilter::default()
    };
    let rows = all_pages(&p.view, &allocated_prefixed, 1).await?;
    assert_eq!(ids(&rows), expect(&|i| i >= 20 && i % 2 == 1));

    let first = p.view.list(&available, 3, None).await?;
    assert_eq!(first.rows.len(), 3);
    assert!(first.cursor.is_some());
    let forged = [
        Some("not a cursor!".to_string()),
        encode_cursor(&json!({"x": 1})),
        encode_cursor(&json!([1, 2])),
        Some("e30".to_string()), // base64 of "{}"
    ];
    for cursor in forged.into_iter().flatten() {
        for filter in [&ListFilter::default(), &available, &prefixed] {
            assert_eq!(
                p.view
                    .list(filter, 3, Some(&cursor))
                    .await
                    .map(|r| r.rows.len()),
                Err(StoreError::InvalidCursor),
                "cursor {cursor:?} with {filter:?}"
            );
        }
        assert_eq!(
            p.view
                .due(SandboxStatus::Allocated, at, 3, Some(&cursor))
                .await
                .map(|r| r.rows.len()),
            Err(StoreError::InvalidCursor)
        );
    }
    Ok(())
}

/// due() returns the rows of one status due at or before a time, oldest first, across pages.
pub async fn due_returns_oldest_first(p: Ports) -> CheckResult {
    let t0 = now_ms();
    let offsets = [7i64, 3, 9, 1, 5, 2, 8, 4, 6, 0];
    for (i, minutes) in offsets.iter().enumerate() {
        let mut r = row(
            &format!("d-{i}"),
            &format!("due-{i}"),
            SandboxStatus::Allocated,
            1,
            1,
        );
        r.owner = Some(format!("stu-{i}"));
        r.allocated_at = Some(t0);
        r.expires_at = Some(t0 + Duration::minutes(*minutes));
        r.due_at = r.expires_at;
        p.view
            .write_row(None, &r, &delta(&[(SandboxStatus::Allocated, 1)]))
            .await?;
    }
    let mut pending = row("d-p", "due-p", SandboxStatus::PendingDeletion, 1, 1);
    pending.due_at = Some(t0 - Duration::minutes(10));
    p.view
        .write_row(
            None,
            &pending,
            &delta(&[(SandboxStatus::PendingDeletion, 1)]),
        )
        .await?;
    let available = row("d-a", "due-a", SandboxStatus::Available, 1, 1);
    p.view
        .write_row(None, &available, &delta(&[(SandboxStatus::Available, 1)]))
        .await?;

    let before = t0 + Duration::minutes(5);
    let mut due = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let page = p
            .view
            .due(SandboxStatus::Allocated, before, 2, cursor.as_deref())
            .await?;
        assert!(page.rows.len() <= 2);
        due.extend(page.rows);
        cursor = page.cursor;
        if cursor.is_none() {
            break;
        }
    }
    assert!(cursor.is_none(), "due() paging did not end");
    let minutes: Vec<i64> = due
        .iter()
        .map(|r| (r.due_at.unwrap_or(t0) - t0).num_minutes())
        .collect();
    assert_eq!(
        minutes,
        [0, 1, 2, 3, 4, 5],
        "due rows oldest first, none after `before`"
    );
    assert!(due.iter().all(|r| r.status == SandboxStatus::Allocated));
    let pending_due = p
        .view
        .due(SandboxStatus::PendingDeletion, t0, 10, None)
        .await?;
    assert_eq!(ids_of(&pending_due.rows), ["d-p"]);
    assert_eq!(
        p.view
            .due(SandboxStatus::Available, before, 10, None)
            .await?
            .rows,
        vec![],
        "rows without due_at are never due"
    );
    Ok(())
}

fn ids_of(rows: &[PoolRow]) -> Vec<String> {
    rows.iter().map(|r| r.sandbox_id.clone()).collect()
}

/// Checkpoints save and overwrite; clear() empties rows, stats and the view's checkpoints, never
/// events, and keeps the checkpoints of consumers that are not the view (the webhook
/// dispatcher's position and lease), so a rebuild in place loses no notification.
pub async fn checkpoints_and_clear(p: Ports) -> CheckResult {
    assert_eq!(p.view.checkpoint("shard-0001").await?, None);
    p.view.save_checkpoint("shard-0001", "100").await?;
    p.view.save_checkpoint("shard-0002", "7").await?;
    p.view.save_checkpoint("shard-0001", "205").await?;
    assert_eq!(
        p.view.checkpoint("shard-0001").await?.as_deref(),
        Some("205")
    );
    assert_eq!(p.view.checkpoint("shard-0002").await?.as_deref(), Some("7"));
    p.view
        .save_checkpoint("webhooks:ops", "{\"pos\":9}")
        .await?;
    p.view
        .save_checkpoint("webhooks:ops:lease", "lease-1")
        .await?;
    for i in 0..30 {
        let r = row(
            &format!("x-{i}"),
            &format!("x-{i}"),
            SandboxStatus::Available,
            i,
            1,
        );
        p.view
            .write_row(None, &r, &delta(&[(SandboxStatus::Available, 1)]))
            .await?;
    }
    p.events.append(vec![event("sandbox#x-0", 1)]).await?;
    p.view.clear().await?;
    assert_eq!(p.view.load_row("x-0").await?, None);
    assert_eq!(p.view.stats().await?.total(), 0);
    assert_eq!(p.view.checkpoint("shard-0001").await?, None);
    assert_eq!(p.view.checkpoint("shard-0002").await?, None);
    assert_eq!(
        p.view.checkpoint("webhooks:ops").await?.as_deref(),
        Some("{\"pos\":9}")
    );
    assert_eq!(
        p.view.checkpoint("webhooks:ops:lease").await?.as_deref(),
        Some("lease-1")
    );
    assert_eq!(
        p.view.list(&ListFilter::default(), 50, None).await?.rows,
        vec![]
    );
    assert_eq!(p.events.load("sandbox#x-0").await?.len(), 1);
    // The view is usable again after a clear (a rebuild writes into it from scratch).
    let r = row("x-0", "x-0", SandboxStatus::Available, 0, 1);
    p.view
        .write_row(None, &r, &delta(&[(SandboxStatus::Available, 1)]))
        .await?;
    assert_eq!(p.view.stats().await?.total(), 1);
    Ok(())
}

/// A fenced checkpoint save takes the token it is given and refuses, writing nothing, a token
/// below the stored one (a consumer whose lease a later holder took can no longer move its
/// position); an equal token saves again (a retried save of the same holder); a rebuild's clear
/// keeps the position and its token.
pub async fn fenced_checkpoints_refuse_an_older_token(p: Ports) -> CheckResult {
    let source = "webhooks:fenced";
    assert!(p.view.save_checkpoint_fenced(source, 5, "a").await?);
    assert_eq!(p.view.checkpoint(source).await?.as_deref(), Some("a"));
    assert!(p.view.save_checkpoint_fenced(source, 5, "b").await?);
    assert!(p.view.save_checkpoint_fenced(source, 7, "c").await?);
    assert!(
        !p.view.save_checkpoint_fenced(source, 6, "stale").await?,
        "an older token moved the position"
    );
    assert_eq!(p.view.checkpoint(source).await?.as_deref(), Some("c"));
    p.view.clear().await?;
    assert_eq!(p.view.checkpoint(source).await?.as_deref(), Some("c"));
    assert!(!p.view.save_checkpoint_fenced(source, 6, "stale").await?);
    assert!(p.view.save_checkpoint_fenced(source, 8, "d").await?);
    assert_eq!(p.view.checkpoint(source).await?.as_deref(), Some("d"));
    // Other sources are not fenced by it.
    assert!(
        p.view
            .save_checkpoint_fenced("webhooks:other", 1, "x")
            .await?
    );
    Ok(())
}
