//! Wiring: from a [`Config`] to a running set of adapters, broker, jobs and (in-process)
//! projector. Binaries stay thin: `main` calls [`build`] and serves `crate::app`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use domain::adapters::embedded::EmbeddedStore;
use domain::store::{EventStore, PoolView, ViewStore};
use domain::{Broker, BrokerConfig, SharedClock};
use projector::{Projector, ProjectorMetrics};
use prometheus::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, StoreKind};
use crate::credentials::TrackCredentials;
use crate::metrics::ApiMetrics;
use crate::rate_limit::RateLimiter;
use crate::state::{AppState, SharedState};

/// The built service: shared state plus the background tasks it started.
pub struct Service {
    /// Handler state.
    pub state: SharedState,
    /// The embedded store, when that is the store (tests tail it).
    pub embedded: Option<EmbeddedStore>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Service {
    /// Signals the background tasks to stop and waits for them (they finish the current item).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }
}

/// Sets up JSON (default) or text logs, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if format == "text" {
        builder.try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    };
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The adapters a configuration selects: the ports, plus the concrete store where a source
/// needs it (the embedded log tail, the DynamoDB stream).
struct Stores {
    events: Arc<dyn EventStore>,
    view: Arc<dyn ViewStore>,
    embedded: Option<EmbeddedStore>,
    dynamo: Option<domain::adapters::dynamo::DynamoStore>,
}

/// Builds everything the configuration asks for and starts the background tasks; job settings
/// come from the environment (the embedded dev mode defaults to the mock CSP).
pub async fn build(config: &Config, clock: SharedClock) -> anyhow::Result<Service> {
    let mut jobs_config = jobs::JobsConfig::from_env().context("jobs configuration")?;
    if config.store == StoreKind::Embedded && std::env::var_os("CSP_MODE").is_none() {
        // The embedded dev mode talks to the mock CSP unless told otherwise.
        jobs_config.csp.mode = jobs::CspMode::Mock;
    }
    let service = build_with(config, clock, jobs_config).await?;
    // Live streams never end by themselves: close them as shutdown begins, so the drain can end.
    service.state.feed.close_on(shutdown_signal());
    Ok(service)
}

/// [`build`] with explicit job settings (tests point them at a fake CSP).
pub async fn build_with(
    config: &Config,
    clock: SharedClock,
    mut jobs_config: jobs::JobsConfig,
) -> anyhow::Result<Service> {
    if !config.api_base_path.starts_with('/') || config.api_base_path.len() < 2 {
        bail!("API_BASE_PATH must start with '/' and not be '/' alone");
    }
    if let Err(problem) = config.check_tokens() {
        bail!(problem);
    }
    let credentials = TrackCredentials::load(
        config.track_credentials_file.as_deref(),
        config.track_credentials_json.as_ref(),
        &[config.track_token(), config.admin_token()],
    )
    .context("track credentials")?;
    if !credentials.is_empty() {
        tracing::info!(target: "startup", tracks = credentials.len(), shared_token = config.shared_track_token_enabled, "per-track credentials loaded");
    }
    let registry = Registry::new();
    let Stores {
        events,
        view,
        embedded,
        dynamo,
    } = match config.store {
        StoreKind::Embedded => {
            let store = EmbeddedStore::open(&config.embedded_path, config.stats_shards)
                .with_context(|| format!("open {}", config.embedded_path.display()))?;
            Stores {
                events: Arc::new(store.clone()),
                view: Arc::new(store.clone()),
                embedded: Some(store),
                dynamo: None,
            }
        }
        StoreKind::Dynamodb => {
            let store = domain::adapters::dynamo::DynamoStore::connect(
                domain::adapters::dynamo::DynamoConfig {
                    table_prefix: config.table_prefix.clone(),
                    endpoint_url: config.ddb_endpoint_url.clone(),
                    region: config.aws_region.clone(),
                    stats_shards: config.stats_shards,
                    max_retries: config.ddb_max_retries,
                },
            )
            .await
            .context("connect to DynamoDB")?;
            if config.ensure_tables {
                store.ensure_tables().await.context("create tables")?;
            }
            let shared = Arc::new(store.clone());
            Stores {
                events: shared.clone(),
                view: shared,
                embedded: None,
                dynamo: Some(store),
            }
        }
    };
    // Trait upcasting: the broker only reads the view.
    let pool_view: Arc<dyn PoolView> = view.clone();
    let mut broker = Broker::new(
        events.clone(),
        pool_view,
        clock.clone(),
        BrokerConfig {
            lab_duration: chrono::Duration::hours(config.lab_duration_hours),
            expiry_grace: chrono::Duration::minutes(config.grace_period_minutes),
            k_candidates: config.k_candidates.max(1),
            allocate_rounds: config.allocate_rounds.max(1),
            max_sweeps: config.allocate_max_sweeps.max(1),
            max_sweep_rows: config.allocate_max_sweep_rows.max(100),
            allocate_concurrency: config.allocate_concurrency.max(1),
            ..BrokerConfig::default()
        },
    );
    if config.read_repair {
        broker = broker.with_read_repair(view.clone());
    }
    let broker = Arc::new(broker);

    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let (feed, feed_tail) = crate::routes::events::start_live_feed(
        embedded.as_ref(),
        dynamo.as_ref(),
        clock.clone(),
        stopped(stop_rx.clone()),
    )?;
    tasks.push(feed_tail);

    let projector_metrics = if config.runs_projector() {
        let metrics = ProjectorMetrics::new(&registry)?;
        let projector = Projector::new(events.clone(), view.clone(), metrics.clone());
        match &embedded {
            Some(store) => {
                // Apply what earlier runs left unprojected before serving.
                projector::embedded::catch_up(&projector, store).await?;
                tasks.push(tokio::spawn(projector::embedded::run(
                    projector,
                    store.clone(),
                    stopped(stop_rx.clone()),
                )));
            }
            None => {
                let Some(store) = &dynamo else {
                    bail!("the DynamoDB projector needs the DynamoDB store");
                };
                let streams = projector::dynamo_streams::DynamoStreams::for_store(store)
                    .await
                    .context("find the events table's stream")?;
                let poller = projector::poller::StreamPoller::new(
                    streams,
                    projector,
                    projector::poller::PollerConfig {
                        idle_min: Duration::from_millis(20),
                        idle_max: Duration::from_millis(250),
                        ..projector::poller::PollerConfig::default()
                    },
                );
                tasks.push(tokio::spawn(poller.run(stopped(stop_rx.clone()))));
            }
        }
        Some(metrics)
    } else {
        None
    };

    jobs_config.expiry_grace = Duration::from_secs(config.grace_period_minutes.max(0) as u64 * 60);
    let jobs = Arc::new(
        jobs::Jobs::from_config(broker.clone(), jobs_config, clock.clone(), &registry)
            .context("jobs")?,
    );

    if let (Some(store), true) = (&embedded, config.seed_demo_pool) {
        if view.stats().await?.total() == 0 {
            let summary = jobs.sync().await.context("seed the demo pool")?;
            tracing::info!(target: "startup", synced = ?summary, "seeded the demo pool from the mock CSP");
            if let Some(metrics) = &projector_metrics {
                let projector = Projector::new(events.clone(), view.clone(), metrics.clone());
                projector::embedded::catch_up(&projector, store).await?;
            }
        }
    }
    if config.runs_jobs() {
        tasks.push(tokio::spawn(jobs::worker::run(
            jobs.clone(),
            stopped(stop_rx.clone()),
        )));
    }

    let store_requests = match &dynamo {
        Some(store) => Some(crate::store_metrics::StoreRequestMetrics::new(
            &registry,
            store.request_counts(),
        )?),
        None => None,
    };
    let state = Arc::new(AppState {
        broker,
        jobs,
        metrics: ApiMetrics::new(&registry)?,
        registry,
        projector_metrics,
        limiter: RateLimiter::new(
            config.rate_limit_rps,
            config.rate_limit_burst,
            config.rate_limit_max_keys,
        ),
        address_limiter: RateLimiter::new(
            config.unauth_rate_limit_rps,
            config.unauth_rate_limit_burst,
            config.rate_limit_max_keys,
        ),
        trusted_proxy_hops: config.trusted_proxy_hops,
        in_flight: Arc::new(tokio::sync::Semaphore::new(
            config.max_concurrent_requests.max(1),
        )),
        readiness: crate::routes::ops::ReadinessCache::new(Duration::from_millis(
            config.ready_cache_ms,
        )),
        credentials,
        shared_track_token_enabled: config.shared_track_token_enabled,
        track_token: config.track_token().to_string(),
        admin_token: config.admin_token().to_string(),
        cors_origins: config
            .cors_allowed_origins
            .split(',')
            .map(|o| o.trim().to_string())
            .filter(|o| !o.is_empty())
            .collect(),
        ready_max_lag_ms: config.ready_max_lag_ms,
        base_path: config.api_base_path.trim_end_matches('/').to_string(),
        store_requests,
        feed,
    });
    Ok(Service {
        state,
        embedded,
        stop,
        tasks,
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!(target: "startup", "shutdown requested; draining");
}

/// Prints where the service listens and, in dev mode, the dev-only tokens.
pub fn print_banner(config: &Config, addr: SocketAddr) {
    let base = config.api_base_path.trim_end_matches('/');
    println!("Sandbox Broker listening on http://{addr}");
    println!("  API docs:  http://{addr}{base}/docs");
    println!(
        "  store:     {:?}{}",
        config.store,
        match config.store {
            StoreKind::Embedded => format!(" ({})", config.embedded_path.display()),
            StoreKind::Dynamodb => format!(" (tables {}-*)", config.table_prefix),
        }
    );
    if config.uses_dev_tokens() {
        println!(
            "  DEV-ONLY tokens (set BROKER_API_TOKEN / BROKER_ADMIN_TOKEN for anything real):"
        );
        // Only the built-in ones: a configured token is never printed.
        if config.api_token.is_none() {
            println!("    track: {}", config.track_token());
        }
        if config.admin_token.is_none() {
            println!("    admin: {}", config.admin_token());
        }
    }
}
