//! The NIOSXaaS pre-delete step: the hook cleanup calls before it deletes a CSP account.
//!
//! The reference signed in to NIOSXaaS, switched into the sandbox account, and deleted the
//! universal services named `NIOSXAAS_SERVICE_NAME` (in shadow mode it only counted them) before
//! the CSP delete (seed-behaviour §8.2). This build ships the hook point only: [`PreDeleteHook`]
//! is called for every sandbox before its CSP delete, and [`NoopPreDelete`] — used whether
//! `NIOSXAAS_ENABLED` is on or off — does nothing. Live mode (`NIOSXAAS_SHADOW_MODE=false`) is
//! refused at start-up rather than silently skipped.
//!
//! Follow-up (the real implementation): a `NiosxaasPreDelete` behind its own circuit breaker,
//! with one sign-in per run (not per sandbox), the service filter, shadow mode counting, and a
//! result recorded on the sandbox's stream so a retried deletion does not repeat finished work
//! — the reference set `niosxaas_cleaned_at` even on failure and so never retried (§12 B8).

use async_trait::async_trait;

use domain::model::sandbox::Sandbox;

use crate::config::NiosxaasConfig;

/// What the pre-delete step did for one sandbox. The CSP delete proceeds in every case (as in
/// the reference); the outcome is counted in the cleanup summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreDeleteOutcome {
    /// Nothing to do (disabled, or no matching services).
    Skipped,
    /// Services cleaned (or, in shadow mode, counted).
    Cleaned {
        /// How many services were (or would have been) deleted.
        services: u32,
    },
    /// The step failed; logged, and the CSP delete goes ahead.
    Failed {
        /// Why.
        error: String,
    },
}

/// Called before each CSP delete. Implementations must be idempotent: a failed CSP delete is
/// retried, and the hook runs again with it.
#[async_trait]
pub trait PreDeleteHook: Send + Sync + 'static {
    /// Prepares `sandbox` for deletion.
    async fn before_delete(&self, sandbox: &Sandbox) -> PreDeleteOutcome;
}

/// The hook of this build: does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopPreDelete;

#[async_trait]
impl PreDeleteHook for NoopPreDelete {
    async fn before_delete(&self, _sandbox: &Sandbox) -> PreDeleteOutcome {
        PreDeleteOutcome::Skipped
    }
}

/// The hook the configuration selects. With `NIOSXAAS_ENABLED` it logs once that only the hook
/// point exists (shadow mode: nothing would have been deleted anyway).
pub fn hook_for(config: &NiosxaasConfig) -> std::sync::Arc<dyn PreDeleteHook> {
    if config.enabled {
        tracing::warn!(
            target: "niosxaas",
            shadow_mode = config.shadow_mode,
            "NIOSXAAS_ENABLED is set, but this build only has the pre-delete hook point; NIOSXaaS services are not inspected"
        );
    }
    std::sync::Arc::new(NoopPreDelete)
}
