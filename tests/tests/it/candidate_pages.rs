//! Under a burst, the requests of one process share candidate pages: while one request reads
//! the next page of a prefix the others wait for its rows instead of each reading the same page
//! (from the same cursor) and throwing all but the last away. The property under test is the
//! allocator's, so it runs on the command service with a view that counts its page reads; the
//! view is never projected during the burst, so every row already allocated still shows as
//! available (the lag the allocator must see through).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::model::lifecycle::SandboxStatus;
use domain::model::projection::{PoolRow, PoolStats};
use domain::store::{CandidateQuery, ListFilter, PoolView, RowPage, StoreError};
use domain::{Actor, AllocateRequest, Broker, BrokerConfig, CommandMeta, ManualClock};
use store_embedded::EmbeddedStore;

/// Counts candidate pages and the rows they carried; everything else passes through.
struct CountsPages {
    inner: Arc<EmbeddedStore>,
    pages: AtomicUsize,
    rows: AtomicUsize,
}

#[async_trait]
impl PoolView for CountsPages {
    async fn get(&self, sandbox_id: &str) -> Result<Option<PoolRow>, StoreError> {
        self.inner.get(sandbox_id).await
    }

    async fn candidates(&self, query: &CandidateQuery) -> Result<Vec<PoolRow>, StoreError> {
        let rows = self.inner.candidates(query).await?;
        self.pages.fetch_add(1, Ordering::SeqCst);
        self.rows.fetch_add(rows.len(), Ordering::SeqCst);
        Ok(rows)
    }

    async fn list(
        &self,
        filter: &ListFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RowPage, StoreError> {
        self.inner.list(filter, limit, cursor).await
    }

    async fn due(
        &self,
        status: SandboxStatus,
        before: DateTime<Utc>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<RowPage, StoreError> {
        self.inner.due(status, before, limit, cursor).await
    }

    async fn stats(&self) -> Result<PoolStats, StoreError> {
        self.inner.stats().await
    }
}

fn meta() -> CommandMeta {
    CommandMeta {
        actor: Actor::Admin,
        request_id: None,
        correlation_id: Some("candidate-pages".into()),
    }
}

/// 300 concurrent allocations with a name prefix, from a pool of 600 whose view is never
/// projected meanwhile: every request gets its own sandbox, and the process reads fewer candidate
/// pages than a tenth of the allocations (one request reading, the others waiting for its rows)
/// instead of about one page per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_shares_candidate_pages() {
    let dir = std::env::temp_dir().join(format!("candidate-pages-{}", uuid::Uuid::new_v4()));
    let store = Arc::new(EmbeddedStore::open(&dir.join("db"), 4).expect("embedded store"));
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let registrar = Broker::new(
        store.clone(),
        store.clone(),
        clock.clone(),
        BrokerConfig::default(),
    );
    const POOL: usize = 600;
    const BURST: usize = 300;
    tests::pool::register_projected(&registrar, store.as_ref(), store.as_ref(), POOL, &meta())
        .await;
    let view = Arc::new(CountsPages {
        inner: store.clone(),
        pages: AtomicUsize::new(0),
        rows: AtomicUsize::new(0),
    });
    let broker = Arc::new(Broker::new(
        store.clone(),
        view.clone(),
        clock,
        BrokerConfig::default(),
    ));
    let burst = (0..BURST).map(|i| {
        let broker = broker.clone();
        tokio::spawn(async move {
            let request = AllocateRequest {
                caller: format!("student-{i}"),
                name_prefix: Some("lab-".into()),
                ..AllocateRequest::default()
            };
            broker.allocate(&request, &meta()).await
        })
    });
    let mut sandboxes = HashSet::new();
    for task in futures::future::join_all(burst).await {
        let allocation = task
            .expect("allocation task")
            .unwrap_or_else(|e| panic!("allocation failed: {e}"));
        assert!(!allocation.replayed);
        assert!(
            sandboxes.insert(allocation.sandbox.sandbox_id.clone()),
            "{} allocated twice",
            allocation.sandbox.sandbox_id
        );
    }
    assert_eq!(sandboxes.len(), BURST);
    let pages = view.pages.load(Ordering::SeqCst);
    let rows = view.rows.load(Ordering::SeqCst);
    eprintln!("{BURST} allocations read {pages} candidate pages, {rows} rows");
    assert!(
        pages <= BURST / 10,
        "{pages} candidate pages for {BURST} allocations: requests read pages side by side"
    );
    drop(broker);
    drop(view);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
