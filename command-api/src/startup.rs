//! Wiring: from a [`Config`] to a running set of adapters, broker, jobs and (in-process)
//! projector. Store opening, logs and signals come from the shared `runtime` crate; this is the one
//! place that wires the embedded projector tail. `main` calls [`build`] and serves `crate::app`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use domain::store::{EventFeed, PoolView};
use domain::{Broker, BrokerConfig, SharedClock};
use projector::{Projector, ProjectorMetrics};
use prometheus::Registry;
use runtime::{Stop, Stores};
use store_embedded::EmbeddedStore;
use tokio::task::JoinHandle;

use crate::config::{Config, Secret, StoreKind};
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
    stop: Stop,
    tasks: Vec<JoinHandle<()>>,
}

impl Service {
    /// Signals the background tasks to stop and waits for them (they finish the current item),
    /// then closes the embedded store so its write-ahead log is folded into the database file
    /// and the file is whole on its own (a copy, a size limit or the next start sees no WAL).
    pub async fn stop(self) {
        self.stop.stop();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
        if let Some(store) = &self.embedded {
            match store.close(Duration::from_secs(10)).await {
                Ok(()) => tracing::info!(target: "startup", "embedded store closed, WAL empty"),
                Err(e) => tracing::warn!(
                    target: "startup",
                    error = %e,
                    "embedded store closed with its WAL not empty; the next start replays it"
                ),
            }
        }
    }
}

/// Builds everything the configuration asks for and starts the background tasks; job settings
/// come from the environment (the embedded dev mode defaults to the mock CSP).
pub async fn build(config: &Config, clock: SharedClock) -> anyhow::Result<Service> {
    let mut jobs_config = config.jobs.config().context("jobs configuration")?;
    if config.store.store == StoreKind::Embedded && config.jobs.csp_mode.is_none() {
        // The embedded dev mode talks to the mock CSP unless told otherwise.
        jobs_config.csp.mode = jobs::CspMode::Mock;
    }
    let service = build_with(config, clock, jobs_config).await?;
    // Live streams never end by themselves: close them as shutdown begins, so the drain can end.
    service.state.feed.close_on(runtime::shutdown_signal());
    // Waiting requests are answered at once too (409 with Retry-After; the client retries).
    service
        .state
        .waiting_line
        .close_on(runtime::shutdown_signal());
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
    let mut config = config.clone();
    config.read_secret_files().map_err(|p| anyhow::anyhow!(p))?;
    let config = &config;
    if let Err(problem) = config.check_tokens() {
        bail!(problem);
    }
    let lease_keys = config.lease_keys().map_err(|p| anyhow::anyhow!(p))?;
    let track_token = config
        .track_tokens(clock.now())
        .map_err(|p| anyhow::anyhow!(p))?;
    let admin_token = config
        .admin_tokens(clock.now())
        .map_err(|p| anyhow::anyhow!(p))?;
    for (name, secret) in [
        ("BROKER_API_TOKEN", &track_token),
        ("BROKER_ADMIN_TOKEN", &admin_token),
    ] {
        if let Some((_, until)) = secret.previous() {
            tracing::info!(target: "startup", secret = name, previous_until = %until.to_rfc3339(), "rotation in progress: the previous value is accepted until then");
        }
    }
    let credentials = TrackCredentials::load(
        config.track_credentials_file.as_deref(),
        config.track_credentials_json.as_ref(),
        &[
            config.track_token(),
            config.admin_token(),
            config
                .api_token_previous
                .as_ref()
                .map_or("", Secret::expose),
            config
                .admin_token_previous
                .as_ref()
                .map_or("", Secret::expose),
        ],
        clock.now(),
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
    } = runtime::open_stores(&config.store).await?;
    let expiry_grace = config.jobs.expiry_grace().context("jobs configuration")?;
    let quotas =
        domain::service::TrackQuotas::parse(&config.track_quotas, config.default_track_quota)
            .map_err(|problem| anyhow::anyhow!("TRACK_QUOTAS: {problem}"))?;
    // Trait upcasting: the broker only reads the view.
    let pool_view: Arc<dyn PoolView> = view.clone();
    let lab_duration = match config.dev_lab_duration_seconds {
        Some(seconds) => {
            tracing::warn!(
                seconds,
                "DEV_LAB_DURATION_SECONDS is set: labs last seconds, not hours (dev-only, never in production)"
            );
            chrono::Duration::seconds(i64::try_from(seconds.max(1)).unwrap_or(i64::MAX))
        }
        None => chrono::Duration::hours(config.lab_duration_hours),
    };
    let mut broker = Broker::new(
        events.clone(),
        pool_view,
        clock.clone(),
        BrokerConfig {
            lab_duration,
            expiry_grace: chrono::Duration::from_std(expiry_grace).unwrap_or(chrono::Duration::MAX),
            k_candidates: config.k_candidates.max(1),
            allocate_rounds: config.allocate_rounds.max(1),
            max_sweeps: config.allocate_max_sweeps.max(1),
            max_sweep_rows: config.allocate_max_sweep_rows.max(100),
            allocate_concurrency: config.allocate_concurrency.max(1),
            group_commit_in_flight: config.allocate_groups_in_flight.max(1) as usize,
            group_write_deadline: Duration::from_millis(config.allocate_group_deadline_ms.max(1)),
            max_extension: chrono::Duration::hours(i64::from(config.max_lab_extension_hours)),
            drain_cache_ttl: Duration::from_millis(config.drain_cache_ms),
            maintenance_retry_after_s: config.maintenance_retry_after_sec,
            quotas,
            unknown_outcome_hold: Duration::from_secs(config.unknown_outcome_hold_sec),
            heartbeats: crate::track_heartbeats::merged_policies(
                config.jobs.heartbeat_policies()?,
                &credentials,
            )
            .context("track credentials")?,
            ..BrokerConfig::default()
        },
    );
    if config.read_repair {
        broker = broker.with_read_repair(view.clone());
    }
    let broker = Arc::new(broker);

    let stop = Stop::new();
    let mut tasks = Vec::new();
    let event_feed: Arc<dyn EventFeed> = match (&embedded, &dynamo) {
        (Some(store), _) => Arc::new(store.clone()),
        (None, Some(store)) => Arc::new(store.clone()),
        (None, None) => bail!("the live feed needs the embedded or the DynamoDB store"),
    };
    let (feed, feed_tail) = crate::live_feed::start_live_feed(
        event_feed,
        clock.clone(),
        crate::live_feed::LiveLimits {
            max_subscribers: config.sse_max_subscribers.max(1),
            max_lifetime: Duration::from_secs(config.sse_max_lifetime_sec.max(1)),
        },
        stop.stopped(),
    );
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
                    stop.stopped(),
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
                tasks.push(tokio::spawn(poller.run(stop.stopped())));
            }
        }
        Some(metrics)
    } else {
        None
    };

    jobs_config.expiry_grace = expiry_grace;
    let jobs = Arc::new(
        jobs::Jobs::from_config(broker.clone(), jobs_config, clock.clone(), &registry)
            .context("jobs")?
            .with_heartbeats(Arc::new(domain::heartbeat::CheckpointHeartbeats::new(
                view.clone(),
            ))),
    );

    if let (Some(store), true) = (&embedded, config.seed_demo_pool) {
        if view.stats().await?.total() == 0 {
            let summary = jobs.sync().await.context("seed the demo pool")?;
            jobs::log_summary!(target: "startup", tracing::Level::INFO, jobs::log_fields::SummaryFields::of(&summary), "seeded the demo pool from the mock CSP");
            if let Some(metrics) = &projector_metrics {
                let projector = Projector::new(events.clone(), view.clone(), metrics.clone());
                projector::embedded::catch_up(&projector, store).await?;
            }
        }
    }
    if config.runs_jobs() {
        tasks.push(tokio::spawn(jobs::worker::run(
            jobs.clone(),
            stop.stopped(),
        )));
    }

    let store_requests = match &dynamo {
        Some(store) => Some(runtime::StoreRequestMetrics::new(
            &registry,
            store.request_counts(),
        )?),
        None => None,
    };
    if let Some(stats) = broker.group_commit_stats() {
        crate::metrics::GroupCommitMetrics::new(&registry, stats)?;
    }
    let pool_alerts = Arc::new(crate::pool_alerts::PoolAlerts::new(
        config.pool_low_water.clone(),
        &registry,
    )?);
    tasks.push(tokio::spawn(crate::pool_alerts::watch(
        pool_alerts.clone(),
        broker.clone(),
        Duration::from_secs(config.pool_watch_interval_sec),
        stop.stopped(),
    )));
    // The reservation gauges and the run-dry forecast sweep the view: only where reservations
    // are in use (the flag is on), not on every deployment.
    if jobs.config().reservations.write_events_reservations {
        tasks.push(tokio::spawn(crate::reservation_watch::watch(
            crate::reservation_watch::ReservationGauges::new(&registry)?,
            broker.clone(),
            jobs.config().reservations.settings(),
            jobs.config().reservations.low_water(),
            Duration::from_secs(config.pool_watch_interval_sec),
            stop.stopped(),
        )));
    }
    let admin_jobs = crate::admin_jobs::AdminJobs::new(
        broker.events().clone(),
        clock.clone(),
        Duration::from_millis(config.admin_job_progress_ms),
    );
    let targets = crate::webhooks::TargetPolicy {
        allow_http: config.webhook_allow_http,
        allow_private: config.webhook_allow_private_targets,
    };
    let subscribers = crate::webhooks::load_subscribers(
        config.webhooks_file.as_deref(),
        config.webhooks_json.as_ref(),
        targets,
    )
    .context("webhook subscribers")?;
    let webhooks = if subscribers.is_empty() {
        None
    } else {
        // The embedded store has a log (one total order, nothing late); DynamoDB's only order
        // over all events is the time index (ADR 0027).
        let source = match (&embedded, &dynamo) {
            (Some(store), _) => crate::webhooks::EventSource::Log(Arc::new(store.clone())),
            (None, Some(store)) => crate::webhooks::EventSource::TimeIndex(Arc::new(store.clone())),
            (None, None) => bail!("webhooks need the embedded or the DynamoDB store"),
        };
        let dispatcher = Arc::new(crate::webhooks::Dispatcher::new(
            subscribers,
            crate::webhooks::DeliverySettings {
                retry_base: Duration::from_millis(config.webhook_retry_base_ms.max(1)),
                retry_cap: Duration::from_secs(config.webhook_retry_cap_sec.max(1)),
                max_attempts: config.webhook_max_attempts.max(1),
                timeout: Duration::from_secs(config.webhook_timeout_sec.max(1)),
                poll: Duration::from_millis(config.webhook_poll_ms.max(10)),
                settle: Duration::from_millis(config.webhook_settle_ms),
                expiry_warning: chrono::Duration::minutes(config.expiry_warning_minutes.max(0)),
                low_water: config.pool_low_water.clone(),
                lease: Duration::from_millis(config.webhook_lease_ms),
                overlap: Duration::from_millis(config.webhook_overlap_ms),
                targets,
            },
            events.clone(),
            source,
            view.clone(),
            clock.clone(),
        )?);
        if config.run_webhooks.unwrap_or(true) {
            tasks.push(tokio::spawn(Arc::clone(&dispatcher).run(stop.stopped())));
        }
        Some(dispatcher)
    };
    let subject_store: Arc<dyn domain::store::SubjectStore> = match (&embedded, &dynamo) {
        (Some(store), _) => Arc::new(store.clone()),
        (None, Some(store)) => Arc::new(store.clone()),
        (None, None) => bail!("no store opened for the subject records"),
    };
    let subjects = Arc::new(
        crate::subjects::Subjects::from_config(config, subject_store, clock.clone(), &registry)
            .map_err(|p| anyhow::anyhow!(p))?,
    );
    if subjects.pseudonymised() {
        tracing::info!(target: "startup", fallback = subjects.fallback_active(), "student ids are pseudonymised");
    }
    let refusals = Arc::new(crate::refusals::RefusalCounter::new(clock.now()));
    tasks.push(tokio::spawn(crate::refusals::run(
        Arc::clone(&refusals),
        crate::refusals::SummaryWriter::new(
            events.clone(),
            clock.clone(),
            config.write_events_usage,
        ),
        Duration::from_secs(config.usage_summary_interval_sec.max(1)),
        stop.stopped(),
    )));
    // The waiting line follows this instance's live feed for the events that free supply.
    let waiting_line = Arc::new(crate::waiting_line::WaitingLine::new(
        crate::waiting_line::WaitSettings {
            max_wait: Duration::from_secs(
                config
                    .wait_max_sec
                    .min(config.request_timeout_sec.saturating_sub(1)),
            ),
            max_waiters: config.wait_max_waiters,
            settle: Duration::from_millis(config.wait_settle_ms),
            tickets: crate::waiting_line::tickets::TicketSettings {
                write: config.write_events_waiting_line,
                idle: Duration::from_secs(config.ticket_idle_sec.max(1)),
                max_wait: Duration::from_secs(config.ticket_max_wait_sec.max(1)),
            },
        },
        &registry,
    )?);
    tasks.push(tokio::spawn(Arc::clone(&waiting_line).follow(feed.clone())));
    waiting_line.close_on(stop.stopped());
    let state = Arc::new(AppState {
        refusals,
        webhooks,
        admin_jobs,
        pool_alerts,
        broker,
        jobs,
        metrics: ApiMetrics::new(&registry)?,
        outcomes: crate::outcomes::AllocationOutcomes::new(clock.clone()),
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
        trusted_proxies: config.trusted_proxies.clone(),
        in_flight: Arc::new(tokio::sync::Semaphore::new(
            config.max_concurrent_requests.max(1),
        )),
        readiness: crate::readiness::ReadinessCache::new(Duration::from_millis(
            config.ready_cache_ms,
        )),
        credentials,
        lease_keys,
        require_lease_token: config.require_lease_token,
        max_allocations_per_caller: config.max_allocations_per_caller,
        signature_window_s: i64::try_from(config.caller_signature_window_sec).unwrap_or(i64::MAX),
        allow_legacy_signature: config.allow_legacy_caller_signature,
        max_allocations_per_address: config.max_allocations_per_address,
        shared_token_quota: config.default_track_quota,
        shared_track_token_enabled: config.shared_track_token_enabled,
        track_token,
        admin_token,
        metrics_token: config.metrics_token.clone(),
        metrics_cache: crate::metrics::PoolGaugeCache::new(Duration::from_millis(
            config.metrics_cache_ms,
        )),
        body_read_timeout: Duration::from_secs(config.body_read_timeout_sec.max(1)),
        cors_origins: config
            .cors_allowed_origins
            .split(',')
            .map(|o| o.trim().to_string())
            .filter(|o| !o.is_empty())
            .collect(),
        ready_max_lag_ms: config.ready_max_lag_ms,
        base_path: config.api_base_path.trim_end_matches('/').to_string(),
        store_requests,
        feed: feed.clone(),
        subjects,
        waiting_line: waiting_line.clone(),
    });
    if config.wait_sync_on_line {
        tasks.push(tokio::spawn(
            crate::waiting_line::auto_sync::sync_when_lines_form(
                state.clone(),
                Duration::from_secs(config.wait_sync_min_interval_sec),
                stop.stopped(),
            ),
        ));
    }
    Ok(Service {
        state,
        embedded,
        stop,
        tasks,
    })
}

/// Binds the API's listener. `main` calls it before [`build`], so a port that is taken stops
/// start-up before a store is opened or a background job runs (a job that ran would have
/// synced, expired or deleted with no API in front of it); the message names the setting that
/// moves the API elsewhere.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(anyhow::anyhow!(
            "cannot listen on {addr}: the address is already in use (another broker, or another \
             program, holds the port); stop it, or set BIND_ADDR to a free address, e.g. \
             BIND_ADDR={}:{}",
            addr.ip(),
            addr.port().checked_add(1).unwrap_or(8081)
        )),
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "cannot listen on {addr} (BIND_ADDR): check that the address belongs to this machine"
        ))),
    }
}

/// Prints where the service listens and, in dev mode, the dev-only tokens.
pub fn print_banner(config: &Config, addr: SocketAddr) {
    let base = config.api_base_path.trim_end_matches('/');
    println!("Sandbox Broker listening on http://{addr}");
    println!("  dashboard: http://{addr}/dashboard (log in with the admin token)");
    println!("  API docs:  http://{addr}{base}/docs");
    println!(
        "  store:     {:?}{}",
        config.store.store,
        match config.store.store {
            StoreKind::Embedded => format!(" ({})", config.store.embedded_path.display()),
            StoreKind::Dynamodb => format!(
                " (tables {})",
                store_dynamodb::table_name(&config.store.table_prefix, "*")
            ),
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
    if config.lease_token_key.is_none() && config.lease_token_key_file.is_none() {
        println!("  DEV-ONLY lease-token key (set LEASE_TOKEN_KEY for anything real)");
    }
}
