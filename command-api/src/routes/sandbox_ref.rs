//! A sandbox named in a path by its broker id (`mock-001`) or by its CSP name (`lab-demo-001`).
//!
//! Lab authors see the name in the CSP console and in the allocation's body, and pass it where
//! the broker id belongs; every per-sandbox route therefore accepts either. The id wins: a
//! segment that is a sandbox's id is that sandbox. Otherwise it is looked up as a name in the
//! read view, which costs reads only when the segment is not an id:
//! * a track caller sees only names of sandboxes it holds or held (the sparse `by-owner` index,
//!   a handful of rows), so a name never reveals another student's sandbox. That index is
//!   projected, so right after an allocation it may not list the sandbox yet: then the name is
//!   looked up as an operator's would be, and the sandbox's own events (a strong read) decide
//!   whether this caller holds or held it;
//! * an operator's name is found in the `by-status-name` index, one row per status (a name is
//!   the first key of its own prefix range). Names never change, and a sandbox has a row from
//!   its registration on, so a lagging status only changes which status's range holds it.
//!
//! A name that matches nothing is returned as it came, and the route answers 404 for it.

use domain::store::{ListFilter, PoolView};
use domain::{PoolRow, SandboxStatus};

use crate::error::ApiError;
use crate::routes::sandboxes::path_id;
use crate::state::SharedState;

/// Most pages of one caller's rows read while looking for a name (a caller holds a few).
const OWNER_PAGES: usize = 10;

/// Whose names a lookup may see.
#[derive(Debug, Clone, Copy)]
pub enum Visibility<'a> {
    /// A track caller: only sandboxes it holds or held.
    Owner(&'a str),
    /// An operator: every sandbox.
    Operator,
}

/// The broker id a path segment names: the segment when it is an id (or names nothing), else
/// the id of the sandbox with that name visible to the caller. The segment is validated first
/// (400 `VALIDATION_ERROR`).
pub async fn resolve_sandbox_id(
    state: &SharedState,
    raw: &str,
    visibility: Visibility<'_>,
) -> Result<String, ApiError> {
    let segment = path_id(raw)?;
    let view = state.broker.view();
    if view.get(&segment).await?.is_some() {
        return Ok(segment);
    }
    let found = match visibility {
        Visibility::Owner(owner) => match owned_row(view.as_ref(), owner, &segment).await? {
            Some(row) => Some(row),
            None => match named_row(view.as_ref(), &segment).await? {
                Some(row) if held_by(state, &row.sandbox_id, owner).await? => Some(row),
                _ => None,
            },
        },
        Visibility::Operator => named_row(view.as_ref(), &segment).await?,
    };
    Ok(found.map_or(segment, |row| row.sandbox_id))
}

/// The caller's row named `name` in the `by-owner` index, if the view lists it there yet.
async fn owned_row(
    view: &dyn PoolView,
    owner: &str,
    name: &str,
) -> Result<Option<PoolRow>, ApiError> {
    let filter = ListFilter {
        status: None,
        owner: Some(owner.to_string()),
        prefix: Some(name.to_string()),
    };
    let mut cursor: Option<String> = None;
    for _ in 0..OWNER_PAGES {
        let page = view.list(&filter, 100, cursor.as_deref()).await?;
        if let Some(row) = page.rows.into_iter().find(|row| row.name == name) {
            return Ok(Some(row));
        }
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(None)
}

/// The row of the sandbox named `name`, whatever its status and owner.
async fn named_row(view: &dyn PoolView, name: &str) -> Result<Option<PoolRow>, ApiError> {
    for status in SandboxStatus::ALL {
        let filter = ListFilter {
            status: Some(status),
            owner: None,
            prefix: Some(name.to_string()),
        };
        // Rows of one status come in name order: the name itself is the first row of its own
        // prefix range, if a sandbox has it.
        let page = view.list(&filter, 1, None).await?;
        if let Some(row) = page.rows.into_iter().find(|row| row.name == name) {
            return Ok(Some(row));
        }
    }
    Ok(None)
}

/// Whether `caller` holds or held `sandbox_id`, from the sandbox's events (strong). An owner is
/// never reassigned: a released sandbox is deleted, not returned to the pool.
async fn held_by(state: &SharedState, sandbox_id: &str, caller: &str) -> Result<bool, ApiError> {
    let loaded = state
        .broker
        .load_sandbox(sandbox_id)
        .await
        .map_err(|e| ApiError::from_broker(e, sandbox_id))?;
    Ok(loaded.sandbox.owner.as_deref() == Some(caller))
}
