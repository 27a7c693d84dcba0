//! The jobs against a fake CSP over real HTTP, on the embedded store, with a manual clock: sync's
//! paging and stale debounce, incomplete listings, races with allocation, auto-expiry, stale
//! removal, cleanup's retries, quarantine, circuit breaker, `429`, and two workers at once.
//! The view is brought up to date between steps by applying the event log (the projector's
//! embedded catch-up), exactly as the in-process projector would.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::Registry;

use domain::model::events::SandboxEvent;
use domain::model::sandbox::{Sandbox, SandboxCommand};
use domain::store::ListFilter;
use domain::{
    Actor, AllocateRequest, Broker, BrokerConfig, CommandMeta, DomainError, EventStore,
    ManualClock, PoolView, SandboxStatus, ViewStore,
};
use jobs::{CircuitState, CspMode, JobError, Jobs, JobsConfig, RunStatus};
use projector::{Projector, ProjectorMetrics};
use store_embedded::EmbeddedStore;
use tests::fake_csp::{FailureRate, FakeAccount, FakeCsp, Fault};

/// One test's world: an in-memory embedded store, the broker over it, a manual clock, the fake CSP.
struct World {
    store: EmbeddedStore,
    clock: ManualClock,
    broker: Arc<Broker>,
    projector: Projector,
    csp: FakeCsp,
}

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-02T09:00:00Z")
        .map(|t| t.with_timezone(&Utc))
        .expect("a valid start time")
}

impl World {
    async fn new() -> Self {
        let store = EmbeddedStore::open_in_memory(4).expect("in-memory store");
        let clock = ManualClock::new(t0());
        let events: Arc<dyn EventStore> = Arc::new(store.clone());
        let view: Arc<dyn ViewStore> = Arc::new(store.clone());
        let pool: Arc<dyn PoolView> = Arc::new(store.clone());
        let broker = Arc::new(Broker::new(
            events.clone(),
            pool,
            Arc::new(clock.clone()),
            BrokerConfig::default(),
        ));
        let projector = Projector::new(events, view, ProjectorMetrics::unregistered());
        Self {
            store,
            clock,
            broker,
            projector,
            csp: FakeCsp::start().await,
        }
    }

    /// Jobs settings pointed at the fake: small pages, no client-side pacing. Timeouts are 1 s
    /// here (a loaded CI box must not turn a scripted 100 ms delay into a timeout); the tests
    /// about timeouts set 200 ms themselves.
    fn config(&self) -> JobsConfig {
        let mut c = JobsConfig::default();
        c.csp.mode = CspMode::Real;
        c.csp.base_url = self.csp.base_url();
        c.csp.api_token = self.csp.token().into();
        c.csp.connect_timeout = Duration::from_secs(1);
        c.csp.read_timeout = Duration::from_secs(1);
        c.csp.page_size = 10;
        c.csp.max_pages = 20;
        c.csp.rate_limit_rps = 0.0;
        c.csp.retry_after_max = Duration::from_secs(2);
        // Small view pages, so every job pages through the index.
        c.page_size = 7;
        c
    }

    /// Jobs with `config`, their metrics in a registry the test can read.
    fn jobs_with(&self, config: JobsConfig) -> (Jobs, Registry) {
        let registry = Registry::new();
        let jobs = Jobs::from_config(
            self.broker.clone(),
            config,
            Arc::new(self.clock.clone()),
            &registry,
        )
        .expect("jobs from config");
        (jobs, registry)
    }

    fn jobs(&self) -> Jobs {
        self.jobs_with(self.config()).0
    }

    /// Applies every event not yet in the view.
    async fn catch_up(&self) {
        projector::embedded::catch_up(&self.projector, &self.store)
            .await
            .expect("catch up the view");
    }

    /// A sandbox's state from its own events (strong).
    async fn sandbox(&self, id: &str) -> Sandbox {
        self.broker
            .load_sandbox(id)
            .await
            .expect("load sandbox")
            .sandbox
    }

    async fn status(&self, id: &str) -> Option<SandboxStatus> {
        self.sandbox(id).await.status
    }

    /// The sandbox's events, decoded.
    async fn events_of(&self, id: &str) -> Vec<SandboxEvent> {
        self.broker
            .history(id)
            .await
            .expect("history")
            .iter()
            .filter_map(|e| e.sandbox_event().ok().flatten())
            .collect()
    }

    async fn count_events(&self, id: &str, kind: &str) -> usize {
        self.broker
            .history(id)
            .await
            .expect("history")
            .iter()
            .filter(|e| e.event_type == kind)
            .count()
    }

    /// `n` accounts listed by the fake and registered by a sync; the view is caught up.
    async fn registered(&self, n: u32) -> Vec<FakeAccount> {
        let accounts: Vec<FakeAccount> = (1..=n).map(FakeAccount::sandbox).collect();
        self.csp.set_accounts(accounts.clone());
        let summary = self.jobs().sync().await.expect("sync");
        assert_eq!(summary.registered, u64::from(n));
        self.catch_up().await;
        accounts
    }

    /// Allocates the sandbox named `name` to `caller` (the prefix is the full, unique name).
    async fn allocate(&self, caller: &str, name: &str) -> Sandbox {
        let request = AllocateRequest {
            caller: caller.into(),
            name_prefix: Some(name.into()),
            ..AllocateRequest::default()
        };
        let allocation = self
            .broker
            .allocate(&request, &track(caller))
            .await
            .expect("allocate");
        assert_eq!(allocation.sandbox.name, name);
        allocation.sandbox
    }

    /// `n` registered sandboxes, each allocated and marked for deletion by its student.
    async fn pending(&self, n: u32) -> Vec<FakeAccount> {
        let accounts = self.registered(n).await;
        for (i, account) in accounts.iter().enumerate() {
            let caller = format!("student-{i}");
            let name = account.name.clone().unwrap_or_default();
            let sandbox = self.allocate(&caller, &name).await;
            self.broker
                .mark_for_deletion(&sandbox.sandbox_id, &caller, &track(&caller))
                .await
                .expect("mark for deletion");
        }
        self.catch_up().await;
        accounts
    }

    /// Runs cleanup rounds — advancing the clock past the longest backoff in between — until no
    /// sandbox is pending, at most `rounds` times. Returns the rounds used.
    async fn cleanup_until_done(&self, jobs: &Jobs, rounds: u32) -> u32 {
        for round in 1..=rounds {
            jobs.cleanup().await.expect("cleanup");
            self.catch_up().await;
            if self.view_count(SandboxStatus::PendingDeletion).await == 0 {
                return round;
            }
            self.clock.advance(chrono::Duration::hours(2));
        }
        rounds
    }

    async fn view_count(&self, status: SandboxStatus) -> i64 {
        self.store.stats().await.expect("stats").get(status)
    }

    async fn listed(&self, status: SandboxStatus) -> Vec<String> {
        let filter = ListFilter {
            status: Some(status),
            ..ListFilter::default()
        };
        self.store
            .list(&filter, 100, None)
            .await
            .expect("list")
            .rows
            .into_iter()
            .map(|r| r.sandbox_id)
            .collect()
    }
}

fn track(caller: &str) -> CommandMeta {
    CommandMeta {
        actor: Actor::Track(caller.into()),
        request_id: None,
        correlation_id: None,
    }
}

/// The value of one sample of a gathered metric with the given labels.
fn metric(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().to_vec())
        .find(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        // A sample holds either a counter or a gauge; the other reads as the default 0.
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .unwrap_or(0.0)
}

/// Sync pages through a three-page listing, keeps only active sandboxes, maps a null `csp_id`
/// to the `id`, sends the token, and a second run registers nothing new.
#[tokio::test]
async fn sync_registers_every_page() {
    let w = World::new().await;
    let mut accounts: Vec<FakeAccount> = (1..=25).map(FakeAccount::sandbox).collect();
    let mut null_csp_id = FakeAccount::sandbox(26);
    null_csp_id.csp_id = serde_json::Value::Null;
    null_csp_id.name = None;
    accounts.push(null_csp_id.clone());
    w.csp.set_accounts(accounts.clone());
    let mut regular = FakeAccount::sandbox(27);
    regular.account_type = "regular".into();
    let mut inactive = FakeAccount::sandbox(28);
    inactive.state = "deleted".into();
    w.csp.add_account(&regular);
    w.csp.add_account(&inactive);

    let (jobs, registry) = w.jobs_with(w.config());
    let summary = jobs.sync().await.expect("sync");
    assert_eq!(summary.status, RunStatus::Completed);
    assert_eq!(summary.pages, 3, "28 items in pages of 10");
    assert!(summary.listing_complete);
    assert_eq!(summary.listed, 26);
    assert_eq!(summary.registered, 26);
    assert_eq!(summary.synced, 26);
    let requests = w.csp.requests();
    let offsets: Vec<Option<u64>> = requests.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, vec![Some(0), Some(10), Some(20)]);
    assert!(requests.iter().all(|r| r.limit == Some(10)));
    assert!(requests
        .iter()
        .all(|r| r.authorization.as_deref() == Some(format!("Token {}", w.csp.token()).as_str())));

    for account in &accounts {
        assert_eq!(
            w.status(&account.sandbox_id()).await,
            Some(SandboxStatus::Available)
        );
    }
    let fallback = w.sandbox(&null_csp_id.sandbox_id()).await;
    assert_eq!(fallback.sandbox_id, null_csp_id.id);
    assert_eq!(fallback.name, format!("sandbox-{}", null_csp_id.id));
    assert_eq!(fallback.sfdc_account_id, None);
    assert_eq!(w.status(&regular.sandbox_id()).await, None);
    assert_eq!(w.status(&inactive.sandbox_id()).await, None);

    w.catch_up().await;
    let again = jobs.sync().await.expect("second sync");
    assert_eq!((again.registered, again.synced, again.missing), (0, 26, 0));
    assert_eq!(
        metric(&registry, "broker_sync_total", &[("outcome", "success")]),
        2.0
    );
    assert_eq!(
        metric(&registry, "broker_sync_sandboxes_synced_total", &[]),
        52.0
    );
    assert_eq!(
        metric(
            &registry,
            "broker_csp_requests_total",
            &[("op", "list"), ("outcome", "success")]
        ),
        6.0
    );
}

/// An available sandbox missing from one listing stays available; missing from two consecutive
/// complete listings it becomes stale; listed again it is restored. A miss, a return and a miss
/// again is no longer two consecutive misses.
#[tokio::test]
async fn stale_needs_two_consecutive_misses_and_restores() {
    let w = World::new().await;
    let accounts = w.registered(5).await;
    let gone = &accounts[2];
    let id = gone.sandbox_id();
    let jobs = w.jobs();

    w.csp.remove_account(gone);
    let first = jobs.sync().await.expect("sync");
    assert_eq!((first.missing, first.marked_stale), (1, 0));
    assert_eq!(w.status(&id).await, Some(SandboxStatus::Available));
    w.catch_up().await;

    let second = jobs.sync().await.expect("sync");
    assert_eq!((second.missing, second.marked_stale), (1, 1));
    assert_eq!(w.status(&id).await, Some(SandboxStatus::Stale));
    w.catch_up().await;

    w.csp.add_account(gone);
    let back = jobs.sync().await.expect("sync");
    assert_eq!((back.restored, back.marked_stale), (1, 0));
    assert_eq!(w.status(&id).await, Some(SandboxStatus::Available));
    w.catch_up().await;

    // miss, present, miss: never two in a row.
    w.csp.remove_account(gone);
    jobs.sync().await.expect("sync");
    w.catch_up().await;
    w.csp.add_account(gone);
    jobs.sync().await.expect("sync");
    w.catch_up().await;
    w.csp.remove_account(gone);
    let lone = jobs.sync().await.expect("sync");
    assert_eq!(lone.marked_stale, 0);
    assert_eq!(w.status(&id).await, Some(SandboxStatus::Available));

    let kinds: Vec<&str> = w
        .broker
        .history(&id)
        .await
        .expect("history")
        .iter()
        .map(|e| e.event_type.as_str())
        .map(|t| match t {
            "SandboxRegistered" => "registered",
            "SandboxMarkedStale" => "stale",
            "SandboxRestored" => "restored",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, vec!["registered", "stale", "restored"]);
}

/// A complete but empty listing (a CSP fault or a token of the wrong scope) while the pool has
/// available sandboxes marks nothing stale, however often it repeats.
#[tokio::test]
async fn empty_listing_marks_nothing_stale() {
    let w = World::new().await;
    let accounts = w.registered(3).await;
    let jobs = w.jobs();
    w.csp.set_accounts(Vec::new());
    for _ in 0..3 {
        let run = jobs.sync().await.expect("sync");
        assert_eq!((run.listed, run.marked_stale), (0, 0));
        w.catch_up().await;
    }
    for account in &accounts {
        assert_eq!(
            w.status(&account.sandbox_id()).await,
            Some(SandboxStatus::Available)
        );
    }
}

/// Listings that fail mid-way (500, malformed JSON, timeout) or never end (hard page cap) mark
/// nothing stale and do not count as a "miss"; the next two complete listings do.
#[tokio::test]
async fn incomplete_listings_mark_nothing_stale() {
    let w = World::new().await;
    let accounts = w.registered(25).await;
    let gone = &accounts[0];
    let id = gone.sandbox_id();
    let mut config = w.config();
    config.csp.max_pages = 4;
    config.csp.read_timeout = Duration::from_millis(200);
    let (jobs, registry) = w.jobs_with(config);
    w.csp.remove_account(gone);

    let faults = [
        Fault::Status(500),
        Fault::MalformedJson,
        Fault::Delay(Duration::from_millis(500)),
    ];
    for fault in faults {
        for _ in 0..2 {
            w.csp.fail_list_at_offset(10, fault.clone());
            match jobs.sync().await {
                Err(JobError::Listing { summary, cause }) => {
                    assert_eq!(summary.pages, 1, "{fault:?}: {cause}");
                    assert!(!summary.listing_complete);
                    assert_eq!(summary.marked_stale, 0);
                    assert_eq!(summary.status, RunStatus::Failed);
                }
                other => panic!("{fault:?}: expected an incomplete listing, got {other:?}"),
            }
            w.catch_up().await;
        }
        w.csp.clear_faults();
    }
    // A server that ignores `_offset` never sends a short page: the cap ends the listing.
    w.csp.set_ignore_offset(true);
    for _ in 0..2 {
        match jobs.sync().await {
            Err(JobError::Listing { summary, cause }) => {
                assert_eq!(summary.pages, 4);
                assert!(matches!(
                    cause,
                    jobs::CspError::TooManyPages { max_pages: 4 }
                ));
            }
            other => panic!("expected the page cap, got {other:?}"),
        }
    }
    w.csp.clear_faults();
    assert_eq!(w.status(&id).await, Some(SandboxStatus::Available));
    assert_eq!(w.view_count(SandboxStatus::Stale).await, 0);
    assert_eq!(
        metric(&registry, "broker_sync_total", &[("outcome", "error")]),
        8.0
    );
    assert!(
        metric(
            &registry,
            "broker_csp_requests_total",
            &[("op", "list"), ("outcome", "timeout")]
        ) >= 2.0
    );

    let first = jobs.sync().await.expect("complete sync");
    assert_eq!(
        (first.missing, first.marked_stale),
        (1, 0),
        "the first complete miss"
    );
    w.catch_up().await;
    let second = jobs.sync().await.expect("complete sync");
    assert_eq!(second.marked_stale, 1);
    assert_eq!(w.status(&id).await, Some(SandboxStatus::Stale));
    for account in &accounts[1..] {
        assert_eq!(
            w.status(&account.sandbox_id()).await,
            Some(SandboxStatus::Available)
        );
    }
}

/// A sandbox allocated while sync is listing stays allocated: sync's `MarkStale` is refused on
/// the strong load (counted as a skipped conflict), even though the lagging view still says
/// "available, missing twice".
#[tokio::test]
async fn allocation_during_sync_wins() {
    let w = World::new().await;
    let solo = FakeAccount::sandbox(1).named("solo-001");
    let others: Vec<FakeAccount> = (2..=3).map(FakeAccount::sandbox).collect();
    let mut all = vec![solo.clone()];
    all.extend(others);
    w.csp.set_accounts(all);
    let jobs = w.jobs();
    jobs.sync().await.expect("sync");
    w.catch_up().await;

    w.csp.remove_account(&solo);
    jobs.sync().await.expect("first miss");
    w.catch_up().await;

    // The listing is held in flight while the student allocates solo.
    w.csp.pause_lists();
    let (summary, sandbox) = tokio::join!(jobs.sync(), async {
        w.csp.wait_for_requests(3).await;
        let sandbox = w.allocate("student-1", "solo-001").await;
        w.csp.resume_lists();
        sandbox
    });
    let summary = summary.expect("sync");
    assert_eq!(summary.marked_stale, 0);
    assert_eq!(summary.skipped_conflicts, 1);
    assert_eq!(
        w.status(&sandbox.sandbox_id).await,
        Some(SandboxStatus::Allocated)
    );
    assert_eq!(
        w.count_events(&sandbox.sandbox_id, "SandboxMarkedStale")
            .await,
        0
    );
}

/// Auto-expiry ends exactly the allocations past `expires_at + grace`, paged through the index,
/// and releases the students' claims; a second run finds nothing.
#[tokio::test]
async fn auto_expire_ends_overdue_allocations() {
    let w = World::new().await;
    w.registered(9).await;
    for n in 1..=8 {
        w.allocate(&format!("early-{n}"), &format!("lab-{n:03}"))
            .await;
    }
    w.clock.advance(chrono::Duration::hours(47));
    let late = w.allocate("late", "lab-009").await;
    w.catch_up().await;
    w.clock
        .advance(chrono::Duration::hours(1) + chrono::Duration::minutes(31));

    let (jobs, registry) = w.jobs_with(w.config());
    let summary = jobs.auto_expire().await.expect("auto-expire");
    assert_eq!(
        (summary.checked, summary.expired, summary.skipped_conflicts),
        (8, 8, 0)
    );
    assert_eq!(summary.pages, 2, "8 rows in pages of 7");
    assert_eq!(
        w.status(&late.sandbox_id).await,
        Some(SandboxStatus::Allocated)
    );
    for n in 1..=8 {
        let id = FakeAccount::sandbox(n).sandbox_id();
        assert_eq!(w.status(&id).await, Some(SandboxStatus::PendingDeletion));
        assert!(w.sandbox(&id).await.expired);
    }
    assert_eq!(metric(&registry, "broker_expiry_orphaned_total", &[]), 8.0);
    // The claim was released: the same student may allocate again.
    w.catch_up().await;
    let again = w
        .broker
        .allocate(
            &AllocateRequest {
                caller: "early-1".into(),
                ..AllocateRequest::default()
            },
            &track("early-1"),
        )
        .await;
    assert!(matches!(
        again,
        Err(domain::BrokerError::NoSandboxAvailable { .. })
    ));

    let second = jobs.auto_expire().await.expect("auto-expire");
    assert_eq!(second.expired, 0);
}

/// Stale removal retires sandboxes stale for longer than the grace (store only: no CSP call)
/// and leaves younger stale ones; an explicit grace overrides the default; a negative one is
/// refused.
#[tokio::test]
async fn stale_removal_retires_after_grace_only() {
    let w = World::new().await;
    let accounts = w.registered(3).await;
    let jobs = w.jobs();
    let (a, b) = (&accounts[0], &accounts[1]);
    w.csp.remove_account(a);
    for _ in 0..2 {
        jobs.sync().await.expect("sync");
        w.catch_up().await;
    }
    assert_eq!(w.status(&a.sandbox_id()).await, Some(SandboxStatus::Stale));
    w.clock.advance(chrono::Duration::hours(20));
    w.csp.remove_account(b);
    for _ in 0..2 {
        jobs.sync().await.expect("sync");
        w.catch_up().await;
    }
    assert_eq!(w.status(&b.sandbox_id()).await, Some(SandboxStatus::Stale));
    w.clock.advance(chrono::Duration::hours(5));

    let summary = jobs.delete_stale(None).await.expect("delete stale");
    assert_eq!((summary.deleted, summary.grace_period_hours), (1, 24));
    assert_eq!(
        w.status(&a.sandbox_id()).await,
        Some(SandboxStatus::Deleted)
    );
    assert_eq!(w.status(&b.sandbox_id()).await, Some(SandboxStatus::Stale));
    let retired = w.events_of(&a.sandbox_id()).await;
    assert!(matches!(
        retired.last(),
        Some(SandboxEvent::SandboxRetired { reason }) if reason == "stale_grace_expired"
    ));
    assert_eq!(
        w.csp.total_delete_calls(),
        0,
        "the CSP account is untouched"
    );

    w.catch_up().await;
    assert!(matches!(
        jobs.delete_stale(Some(chrono::Duration::hours(-1))).await,
        Err(JobError::InvalidRequest(_))
    ));
    let now = jobs
        .delete_stale(Some(chrono::Duration::zero()))
        .await
        .expect("delete stale");
    assert_eq!(now.deleted, 1);
    assert_eq!(
        w.status(&b.sandbox_id()).await,
        Some(SandboxStatus::Deleted)
    );
}

/// With half of all CSP deletes failing transiently, every pending sandbox ends deleted within
/// the retry budget (advancing the clock past `next_attempt_at` between runs); none is
/// quarantined, and each failure was recorded with its backoff.
#[tokio::test]
async fn transient_failures_all_end_deleted() {
    let w = World::new().await;
    let accounts = w.pending(20).await;
    w.csp.set_delete_failure_rate(Some(FailureRate {
        rate: 0.5,
        seed: 7,
        max_streak: 4,
    }));
    let mut config = w.config();
    // Keep the breaker out of this test (it has its own): only retries are under test here.
    config.csp.breaker_threshold = 1_000;
    let (jobs, registry) = w.jobs_with(config);

    let first = jobs.cleanup().await.expect("cleanup");
    assert_eq!(first.candidates, 20);
    assert_eq!(first.deleted + first.failed, 20);
    assert_eq!(first.quarantined, 0);
    let failed_id = {
        let mut found = None;
        for a in &accounts {
            let s = w.sandbox(&a.sandbox_id()).await;
            if s.status == Some(SandboxStatus::PendingDeletion) {
                found = Some(s);
                break;
            }
        }
        found.expect("with a 50 % failure rate some delete failed in round one")
    };
    assert_eq!(failed_id.attempts, 1);
    assert_eq!(
        failed_id.next_attempt_at,
        Some(t0() + chrono::Duration::seconds(60)),
        "first backoff = DELETION_BACKOFF_BASE_SEC"
    );
    w.catch_up().await;

    w.clock.advance(chrono::Duration::hours(2));
    let rounds = 1 + w.cleanup_until_done(&jobs, 10).await;
    assert!(
        rounds <= 5,
        "within the retry budget of 5 attempts, took {rounds}"
    );
    assert_eq!(w.view_count(SandboxStatus::Deleted).await, 20);
    assert_eq!(w.view_count(SandboxStatus::DeletionFailed).await, 0);
    let failures = w.csp.total_delete_failures();
    let calls = w.csp.total_delete_calls();
    assert_eq!(
        calls,
        20 + failures,
        "each sandbox: its failures plus one success"
    );
    assert!(
        failures >= 5,
        "a 50 % rate produced only {failures} failures in {calls} calls"
    );
    for a in &accounts {
        let id = a.sandbox_id();
        assert_eq!(w.count_events(&id, "SandboxDeleted").await, 1);
        assert_eq!(
            w.count_events(&id, "DeletionAttemptFailed").await as u32,
            w.csp.delete_calls(a) - 1
        );
    }
    assert_eq!(metric(&registry, "broker_cleanup_deleted_total", &[]), 20.0);
    assert_eq!(
        metric(&registry, "broker_cleanup_failed_total", &[]),
        f64::from(failures)
    );
    println!(
        "transient failures: {failures} of {calls} DELETE calls failed; done in {rounds} rounds"
    );
}

/// A sandbox whose delete CSP always refuses (403) is quarantined after
/// DELETION_RETRY_MAX_ATTEMPTS CSP calls with doubling backoff, is then left alone by cleanup and
/// listed for operators, and an admin retry re-queues it.
#[tokio::test]
async fn permanent_failure_is_quarantined_after_budget() {
    let w = World::new().await;
    let accounts = w.pending(3).await;
    let doomed = &accounts[1];
    let id = doomed.sandbox_id();
    w.csp.fail_deletes_of(doomed, Fault::Status(403));
    let mut config = w.config();
    config.csp.breaker_threshold = 1_000;
    let jobs = w.jobs_with(config).0;

    let rounds = w.cleanup_until_done(&jobs, 10).await;
    assert_eq!(rounds, 5);
    assert_eq!(w.status(&id).await, Some(SandboxStatus::DeletionFailed));
    assert_eq!(w.csp.delete_calls(doomed), 5);
    let waits: Vec<i64> = w
        .broker
        .history(&id)
        .await
        .expect("history")
        .iter()
        .filter_map(|e| match e.sandbox_event().ok().flatten() {
            Some(SandboxEvent::DeletionAttemptFailed {
                next_attempt_at, ..
            }) => Some((next_attempt_at - e.occurred_at).num_seconds()),
            _ => None,
        })
        .collect();
    assert_eq!(waits, vec![60, 120, 240, 480], "base·2^failures");
    assert!(matches!(
        w.events_of(&id).await.last(),
        Some(SandboxEvent::DeletionFailed { attempts: 5, last_error, transient: false })
            if last_error.contains("403")
    ));
    assert!(w.events_of(&id).await.iter().all(|e| !matches!(
        e,
        SandboxEvent::DeletionAttemptFailed {
            transient: true,
            ..
        }
    )));

    w.clock.advance(chrono::Duration::days(3));
    let idle = jobs.cleanup().await.expect("cleanup");
    assert_eq!((idle.candidates, idle.quarantined), (0, 0));
    assert_eq!(
        w.csp.delete_calls(doomed),
        5,
        "quarantine is excluded from automatic work"
    );
    assert_eq!(
        w.listed(SandboxStatus::DeletionFailed).await,
        vec![id.clone()]
    );

    w.csp.clear_faults();
    let requeued = jobs.retry_deletion(&id).await.expect("retry deletion");
    assert_eq!(requeued.status, Some(SandboxStatus::PendingDeletion));
    assert_eq!(requeued.attempts, 0);
    assert!(matches!(
        jobs.retry_deletion(&id).await,
        Err(JobError::Domain(DomainError::InvalidTransition { .. }))
    ));
    w.catch_up().await;
    let done = jobs.cleanup().await.expect("cleanup");
    assert_eq!(done.deleted, 1);
    assert_eq!(w.status(&id).await, Some(SandboxStatus::Deleted));
}

/// The reference incident replayed on the manual clock: for 16 minutes CSP answers DELETEs with
/// bursts of HTTP 500 HTML pages (partial recovery in between), some DELETEs are slow, one times
/// out, one is rate limited briefly and one for long. 56 sandboxes pending, a refusal budget of
/// only 3: every 500 is recorded as transient, many sandboxes fail more than 3 times, and yet
/// the incident ends with all 56 deleted and none quarantined.
#[tokio::test]
async fn reference_incident_ends_with_everything_deleted() {
    let w = World::new().await;
    let accounts = w.pending(56).await;
    let mut config = w.config();
    // An operator who wants steady retries through an incident (as in the measurement).
    config.csp.breaker_threshold = 1_000;
    config.deletion_max_attempts = 3;
    let jobs = w.jobs_with(config).0;

    for minute in 0..16 {
        w.csp.clear_faults();
        if minute % 5 < 3 {
            w.csp.fail_all_deletes(Fault::Html(500));
        } else {
            w.csp.set_delete_failure_rate(Some(FailureRate {
                rate: 0.5,
                seed: minute,
                max_streak: 100,
            }));
        }
        // Queued faults are served before the burst: slow but successful DELETEs, and now
        // and then a timeout or a 429.
        w.csp.queue_delete_faults([
            Fault::Delay(Duration::from_millis(300)),
            Fault::Delay(Duration::from_millis(200)),
        ]);
        match minute {
            2 => w.csp.queue_delete_faults([Fault::RetryAfter(1)]),
            5 => w.csp.queue_delete_faults([Fault::RetryAfter(120)]),
            9 => w
                .csp
                .queue_delete_faults([Fault::Delay(Duration::from_millis(1_500))]),
            _ => {}
        }
        jobs.cleanup().await.expect("cleanup during the incident");
        w.catch_up().await;
        w.clock.advance(chrono::Duration::minutes(1));
    }
    assert_eq!(w.view_count(SandboxStatus::DeletionFailed).await, 0);

    w.csp.clear_faults();
    let rounds = w.cleanup_until_done(&jobs, 10).await;
    assert!(rounds <= 2, "after the incident, took {rounds} rounds");
    assert_eq!(w.view_count(SandboxStatus::Deleted).await, 56);
    assert_eq!(w.view_count(SandboxStatus::DeletionFailed).await, 0);
    let mut most_failures = 0;
    let mut recorded = 0;
    for a in &accounts {
        let id = a.sandbox_id();
        let events = w.events_of(&id).await;
        assert_eq!(w.count_events(&id, "SandboxDeleted").await, 1, "{id}");
        let failures: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                SandboxEvent::DeletionAttemptFailed {
                    transient, error, ..
                } => Some((*transient, error.clone())),
                _ => None,
            })
            .collect();
        assert!(
            failures.iter().all(|(transient, _)| *transient),
            "{id}: every incident failure is transient: {failures:?}"
        );
        most_failures = most_failures.max(failures.len());
        recorded += failures.len();
    }
    assert!(
        most_failures > 3,
        "the incident should outlast the refusal budget for some sandbox (max {most_failures})"
    );
    println!(
        "incident replay: {recorded} transient failures recorded, at most {most_failures} for one \
         sandbox, {} DELETE calls; 56 deleted, 0 quarantined",
        w.csp.total_delete_calls()
    );
}

/// An outage of HTTP 500s longer than DELETION_RETRY_WINDOW_HOURS quarantines: the sandbox is
/// retried beyond DELETION_RETRY_MAX_ATTEMPTS while the window lasts, and the failure that comes
/// after the window has passed records `DeletionFailed` marked transient.
#[tokio::test]
async fn outage_longer_than_the_window_quarantines() {
    let w = World::new().await;
    let accounts = w.pending(3).await;
    w.csp.fail_all_deletes(Fault::Status(500));
    let mut config = w.config();
    config.csp.breaker_threshold = 1_000;
    config.deletion_retry_window = Duration::from_secs(3600);
    let jobs = w.jobs_with(config).0;

    let mut elapsed = chrono::Duration::zero();
    while w.view_count(SandboxStatus::DeletionFailed).await < 3 {
        assert!(
            elapsed <= chrono::Duration::hours(3),
            "still not quarantined after {elapsed}"
        );
        jobs.cleanup().await.expect("cleanup");
        w.catch_up().await;
        w.clock.advance(chrono::Duration::minutes(10));
        elapsed += chrono::Duration::minutes(10);
    }
    for a in &accounts {
        let id = a.sandbox_id();
        let history = w.broker.history(&id).await.expect("history");
        let first_failure = history
            .iter()
            .find(|e| e.event_type == "DeletionAttemptFailed")
            .map(|e| e.occurred_at)
            .expect("a recorded failure");
        let quarantine = history.last().expect("events");
        assert_eq!(quarantine.event_type, "DeletionFailed");
        assert!(
            quarantine.occurred_at - first_failure >= chrono::Duration::hours(1),
            "quarantined only after the window"
        );
        let sandbox = w.sandbox(&id).await;
        assert!(
            sandbox.attempts > 5,
            "transient failures do not spend DELETION_RETRY_MAX_ATTEMPTS ({} attempts)",
            sandbox.attempts
        );
        assert!(matches!(
            quarantine.sandbox_event(),
            Ok(Some(SandboxEvent::DeletionFailed {
                transient: true,
                ..
            }))
        ));
    }
}

/// After CIRCUIT_BREAKER_THRESHOLD consecutive 5xx the circuit opens: the rest of the run is
/// deferred with nothing recorded against those sandboxes, later runs send nothing, and after
/// the open period one probe closes the circuit again.
#[tokio::test]
async fn open_circuit_defers_and_closes_after_open_period() {
    let w = World::new().await;
    let accounts = w.pending(6).await;
    w.csp.fail_all_deletes(Fault::Status(503));
    let mut config = w.config();
    config.csp.breaker_threshold = 3;
    config.cleanup_concurrency = 1;
    let (jobs, registry) = w.jobs_with(config);

    let first = jobs.cleanup().await.expect("cleanup");
    assert_eq!((first.failed, first.deferred, first.deleted), (3, 3, 0));
    assert_eq!(first.circuit_state, Some(CircuitState::Open));
    assert_eq!(metric(&registry, "broker_csp_circuit_state", &[]), 1.0);
    assert_eq!(w.csp.total_delete_calls(), 3);
    let mut untouched = 0;
    for a in &accounts {
        let s = w.sandbox(&a.sandbox_id()).await;
        assert_eq!(s.status, Some(SandboxStatus::PendingDeletion));
        if w.csp.delete_calls(a) == 0 {
            untouched += 1;
            assert_eq!(s.attempts, 0, "a deferral records nothing");
            assert_eq!(
                w.count_events(&a.sandbox_id(), "DeletionAttemptFailed")
                    .await,
                0
            );
        }
    }
    assert_eq!(untouched, 3);
    w.catch_up().await;

    let still_open = jobs.cleanup().await.expect("cleanup");
    assert_eq!((still_open.deferred, still_open.failed), (3, 0));
    assert_eq!(
        w.csp.total_delete_calls(),
        3,
        "an open circuit sends nothing"
    );
    assert!(
        metric(
            &registry,
            "broker_csp_requests_total",
            &[("op", "delete"), ("outcome", "circuit_open")]
        ) >= 1.0
    );

    w.csp.clear_faults();
    w.clock.advance(chrono::Duration::seconds(61));
    assert_eq!(jobs.csp().circuit_state(), CircuitState::HalfOpen);
    let closed = jobs.cleanup().await.expect("cleanup");
    assert_eq!((closed.deleted, closed.deferred), (6, 0));
    assert_eq!(closed.circuit_state, Some(CircuitState::Closed));
    assert_eq!(metric(&registry, "broker_csp_circuit_state", &[]), 0.0);
    assert_eq!(
        metric(&registry, "broker_cleanup_total", &[("outcome", "success")]),
        3.0
    );
}

/// Timeouts (a delete answered after the client's read timeout) count toward the breaker and
/// are recorded as transient failures.
#[tokio::test]
async fn timeouts_count_toward_the_breaker() {
    let w = World::new().await;
    let accounts = w.pending(3).await;
    w.csp
        .fail_all_deletes(Fault::Delay(Duration::from_millis(500)));
    let mut config = w.config();
    config.csp.read_timeout = Duration::from_millis(200);
    config.csp.breaker_threshold = 2;
    config.cleanup_concurrency = 1;
    let (jobs, registry) = w.jobs_with(config);

    let summary = jobs.cleanup().await.expect("cleanup");
    assert_eq!((summary.failed, summary.deferred), (2, 1));
    assert_eq!(summary.circuit_state, Some(CircuitState::Open));
    assert_eq!(
        metric(
            &registry,
            "broker_csp_requests_total",
            &[("op", "delete"), ("outcome", "timeout")]
        ),
        2.0
    );
    let mut timed_out = 0;
    for a in &accounts {
        if let Some(error) = w.sandbox(&a.sandbox_id()).await.last_error {
            assert!(error.contains("timeout"), "{error}");
            timed_out += 1;
        }
    }
    assert_eq!(timed_out, 2);
}

/// A `429` with a short `Retry-After` is waited out and retried (no failure recorded); one with
/// a wait beyond CSP_RETRY_AFTER_MAX_SEC defers the sandbox with nothing recorded.
#[tokio::test]
async fn retry_after_is_honoured() {
    let w = World::new().await;
    let accounts = w.pending(2).await;
    w.csp.queue_delete_faults([Fault::RetryAfter(1)]);
    let mut config = w.config();
    config.cleanup_concurrency = 1;
    let (jobs, registry) = w.jobs_with(config);

    let summary = jobs.cleanup().await.expect("cleanup");
    assert_eq!(
        (summary.deleted, summary.failed, summary.deferred),
        (2, 0, 0)
    );
    let deletes: Vec<_> = w
        .csp
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .collect();
    assert_eq!(deletes.len(), 3);
    assert_eq!(
        deletes[0].path, deletes[1].path,
        "the 429'd request is retried"
    );
    assert!(
        deletes[1].at.duration_since(deletes[0].at) >= Duration::from_millis(950),
        "Retry-After: 1 was waited out"
    );
    assert_eq!(
        metric(
            &registry,
            "broker_csp_requests_total",
            &[("op", "delete"), ("outcome", "rate_limited")]
        ),
        1.0
    );
    for a in &accounts {
        assert_eq!(
            w.count_events(&a.sandbox_id(), "DeletionAttemptFailed")
                .await,
            0
        );
    }

    let w2 = World::new().await;
    let accounts = w2.pending(1).await;
    w2.csp.queue_delete_faults([Fault::RetryAfter(120)]);
    let jobs = w2.jobs_with(w2.config()).0;
    let deferred = jobs.cleanup().await.expect("cleanup");
    assert_eq!((deferred.deferred, deferred.failed), (1, 0));
    let s = w2.sandbox(&accounts[0].sandbox_id()).await;
    assert_eq!(
        (s.status, s.attempts),
        (Some(SandboxStatus::PendingDeletion), 0)
    );
}

/// Two Jobs instances (separate CSP clients and breakers, as two worker processes) clean up the
/// same 30 pending sandboxes at the same time: every sandbox's history holds exactly one
/// `SandboxDeleted`; the CSP may see a DELETE twice (at-least-once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_delete_each_sandbox_exactly_once() {
    let w = World::new().await;
    let accounts = w.pending(30).await;
    // A little latency per DELETE, so that the two runs overlap for real.
    for _ in 0..60 {
        w.csp
            .queue_delete_faults([Fault::Delay(Duration::from_millis(15))]);
    }
    let a = w.jobs();
    let b = w.jobs();
    let (ra, rb) = tokio::join!(a.cleanup(), b.cleanup());
    let (ra, rb) = (ra.expect("worker a"), rb.expect("worker b"));
    w.catch_up().await;

    assert_eq!(ra.deleted + rb.deleted, 30, "a: {ra:?}\nb: {rb:?}");
    for account in &accounts {
        let id = account.sandbox_id();
        assert_eq!(w.count_events(&id, "SandboxDeleted").await, 1, "{id}");
        assert_eq!(w.status(&id).await, Some(SandboxStatus::Deleted));
    }
    let deletes = w.csp.total_delete_calls();
    assert!((30..=60).contains(&deletes));
    assert!(w.csp.delete_counts().values().all(|n| (1..=2).contains(n)));
    println!(
        "two workers: {deletes} DELETE calls for 30 sandboxes (a deleted {}, b deleted {}, skipped {} + {})",
        ra.deleted, rb.deleted, ra.skipped_conflicts, rb.skipped_conflicts
    );
}

/// With the deletion lease, two workers racing over the same 30 pending sandboxes send exactly
/// one CSP DELETE per sandbox (no faults, no lapsed lease): the loser of each race skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_gives_one_delete_per_sandbox_across_two_workers() {
    let w = World::new().await;
    let accounts = w.pending(30).await;
    w.csp
        .fail_all_deletes(Fault::Delay(Duration::from_millis(10)));
    let a = w.jobs();
    let b = w.jobs();
    let (ra, rb) = tokio::join!(a.cleanup(), b.cleanup());
    let (ra, rb) = (ra.expect("worker a"), rb.expect("worker b"));
    w.catch_up().await;

    assert_eq!(ra.deleted + rb.deleted, 30, "a: {ra:?}\nb: {rb:?}");
    assert_eq!(w.csp.total_delete_calls(), 30);
    for account in &accounts {
        let id = account.sandbox_id();
        assert_eq!(w.csp.delete_calls(account), 1, "{id}");
        assert_eq!(w.count_events(&id, "SandboxDeleted").await, 1, "{id}");
        assert_eq!(w.count_events(&id, "DeletionLeased").await, 1, "{id}");
    }
    assert_eq!(w.view_count(SandboxStatus::Deleted).await, 30);
    assert_eq!(w.view_count(SandboxStatus::PendingDeletion).await, 0);
}

/// A worker that leased a deletion and died holds the sandbox only until the lease lapses: a
/// live worker skips it (no DELETE) meanwhile, then deletes it once DELETION_LEASE_SEC have passed.
#[tokio::test]
async fn lapsed_lease_of_a_crashed_worker_is_retried() {
    let w = World::new().await;
    let accounts = w.pending(2).await;
    let crashed = &accounts[0];
    let id = crashed.sandbox_id();
    let meta = CommandMeta::job("cleanup", "crashed-run");
    let leased = w
        .broker
        .execute(
            &id,
            SandboxCommand::LeaseDeletion {
                worker: "worker-that-crashed".into(),
                until: t0() + chrono::Duration::seconds(300),
            },
            &meta,
        )
        .await
        .expect("lease");
    assert_eq!(leased.status, Some(SandboxStatus::PendingDeletion));
    w.catch_up().await;
    assert_eq!(w.view_count(SandboxStatus::PendingDeletion).await, 2);
    let jobs = w.jobs();

    let first = jobs.cleanup().await.expect("cleanup");
    assert_eq!((first.deleted, first.skipped_conflicts), (1, 1));
    assert_eq!(w.csp.delete_calls(crashed), 0, "a live lease is respected");
    w.catch_up().await;

    w.clock.advance(chrono::Duration::seconds(301));
    let second = jobs.cleanup().await.expect("cleanup");
    assert_eq!(second.deleted, 1);
    assert_eq!(w.csp.delete_calls(crashed), 1);
    assert_eq!(w.status(&id).await, Some(SandboxStatus::Deleted));
    assert_eq!(w.count_events(&id, "DeletionLeased").await, 2);
}

/// Bulk delete retires every sandbox of an explicit status (store only) and refuses `allocated`.
#[tokio::test]
async fn bulk_delete_by_explicit_status() {
    let w = World::new().await;
    w.registered(10).await;
    let held = w.allocate("student", "lab-001").await;
    w.catch_up().await;
    let jobs = w.jobs();

    assert!(matches!(
        jobs.bulk_delete(SandboxStatus::Allocated).await,
        Err(JobError::InvalidRequest(message)) if message.contains("allocated")
    ));
    assert!(jobs.bulk_delete(SandboxStatus::Deleted).await.is_err());
    let summary = jobs
        .bulk_delete(SandboxStatus::Available)
        .await
        .expect("bulk delete");
    assert_eq!((summary.deleted, summary.pages), (9, 2));
    assert_eq!(
        w.status(&held.sandbox_id).await,
        Some(SandboxStatus::Allocated)
    );
    w.catch_up().await;
    assert_eq!(w.view_count(SandboxStatus::Available).await, 0);
    assert_eq!(w.csp.total_delete_calls(), 0);
    // Retired accounts are never re-registered, though CSP still lists them.
    let again = jobs.sync().await.expect("sync");
    assert_eq!((again.registered, again.untouched), (0, 10));
}

/// `CSP_MODE=mock` runs the same jobs against the in-memory CSP: 50 `lab-demo-NNN` accounts,
/// deletes succeed.
#[tokio::test]
async fn mock_mode_runs_the_same_jobs() {
    let w = World::new().await;
    let mut config = JobsConfig::default();
    config.csp.mode = CspMode::Mock;
    let jobs = w.jobs_with(config).0;
    let summary = jobs.sync().await.expect("sync");
    assert_eq!(summary.registered, 50);
    w.catch_up().await;
    let sandbox = w.allocate("student", "lab-demo-007").await;
    w.broker
        .mark_for_deletion(&sandbox.sandbox_id, "student", &track("student"))
        .await
        .expect("mark");
    w.catch_up().await;
    let cleaned = jobs.cleanup().await.expect("cleanup");
    assert_eq!(cleaned.deleted, 1);
    assert_eq!(
        w.status(&sandbox.sandbox_id).await,
        Some(SandboxStatus::Deleted)
    );
}

/// On shutdown the worker lets the item in flight finish — the CSP delete that was sent gets
/// its `SandboxDeleted` recorded — and starts no new one.
#[tokio::test]
async fn worker_finishes_the_item_in_flight_on_shutdown() {
    let w = World::new().await;
    let accounts = w.pending(3).await;
    w.csp
        .fail_all_deletes(Fault::Delay(Duration::from_millis(100)));
    let mut config = w.config();
    config.cleanup_concurrency = 1;
    let jobs = Arc::new(w.jobs_with(config).0);
    let shutdown = {
        let csp = &w.csp;
        async move { csp.wait_for_deletes(1).await }
    };
    jobs::worker::run(jobs.clone(), shutdown).await;
    assert!(jobs.is_stopping());
    assert_eq!(
        w.csp.total_delete_calls(),
        1,
        "no new item after the stop request"
    );
    let mut statuses = Vec::new();
    for a in &accounts {
        statuses.push(w.status(&a.sandbox_id()).await);
    }
    statuses.sort();
    assert_eq!(
        statuses,
        vec![
            Some(SandboxStatus::PendingDeletion),
            Some(SandboxStatus::PendingDeletion),
            Some(SandboxStatus::Deleted),
        ],
        "the delete in flight was recorded"
    );
}

/// CSP rejecting the token (401) defers cleanup — it says nothing about the sandboxes, so no
/// retry budget is spent — and makes sync fail without touching the pool.
#[tokio::test]
async fn bad_token_defers_instead_of_failing() {
    let w = World::new().await;
    let accounts = w.pending(2).await;
    let mut config = w.config();
    config.csp.api_token = "wrong".into();
    config.cleanup_concurrency = 1;
    let (jobs, registry) = w.jobs_with(config);

    let summary = jobs.cleanup().await.expect("cleanup");
    assert_eq!((summary.deferred, summary.failed), (2, 0));
    let sent = w
        .csp
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE")
        .count();
    assert_eq!(sent, 1, "the run stops at the first 401");
    for a in &accounts {
        assert_eq!(w.sandbox(&a.sandbox_id()).await.attempts, 0);
    }
    assert_eq!(
        metric(
            &registry,
            "broker_csp_requests_total",
            &[("op", "delete"), ("outcome", "unauthorized")]
        ),
        1.0
    );
    assert!(matches!(
        jobs.sync().await,
        Err(JobError::Listing {
            cause: jobs::CspError::Unauthorized,
            ..
        })
    ));
}
