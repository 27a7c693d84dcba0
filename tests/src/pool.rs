//! A pool registered straight through the command service, for tests that drive the
//! [`Broker`] without a running service or projector.

use domain::model::sandbox::SandboxCommand;
use domain::store::{repair_row, EventStore, ViewStore};
use domain::{Broker, CommandMeta};

/// Registers sandboxes `lab-id-{i}` named `lab-{i:04}` for each `i` in `0..n` through `broker`,
/// and projects each row at once with the projector's own version-conditioned repair, so the
/// view shows them available without a projector running.
pub async fn register_projected(
    broker: &Broker,
    events: &dyn EventStore,
    view: &dyn ViewStore,
    n: usize,
    meta: &CommandMeta,
) {
    for i in 0..n {
        let id = format!("lab-id-{i}");
        broker
            .execute(
                &id,
                SandboxCommand::Register {
                    sandbox_id: id.clone(),
                    name: format!("lab-{i:04}"),
                    external_id: format!("identity/accounts/{i}"),
                    sfdc_account_id: None,
                    csp_created_at: None,
                },
                meta,
            )
            .await
            .unwrap_or_else(|e| panic!("append the registration of {id}: {e}"));
        repair_row(events, view, &id)
            .await
            .unwrap_or_else(|e| panic!("project the registration of {id}: {e}"));
    }
}
