//! A sandbox named in a path by its broker id (`mock-001`) or by its CSP name (`lab-demo-001`).
//!
//! Lab authors see the name in the CSP console and in the allocation's body, and pass it where
//! the broker id belongs; every per-sandbox route therefore accepts either. The id wins: a
//! segment that is a sandbox's id is that sandbox. Otherwise it is looked up as a name in the
//! read view, which costs reads only when the segment is not an id:
//! * a track caller sees only names of sandboxes it holds or held (the sparse `by-owner` index,
//!   a handful of rows), so a name never reveals another student's sandbox;
//! * an operator's name is found in the `by-status-name` index, one row per status (a name is
//!   the first key of its own prefix range).
//!
//! A name that matches nothing is returned as it came, and the route answers 404 for it.

use domain::store::ListFilter;
use domain::SandboxStatus;

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
        Visibility::Owner(owner) => {
            let filter = ListFilter {
                status: None,
                owner: Some(owner.to_string()),
                prefix: Some(segment.clone()),
            };
            let mut cursor: Option<String> = None;
            let mut found = None;
            for _ in 0..OWNER_PAGES {
                let page = view.list(&filter, 100, cursor.as_deref()).await?;
                found = page.rows.into_iter().find(|row| row.name == segment);
                match (&found, page.cursor) {
                    (None, Some(next)) => cursor = Some(next),
                    _ => break,
                }
            }
            found
        }
        Visibility::Operator => {
            let mut found = None;
            for status in SandboxStatus::ALL {
                let filter = ListFilter {
                    status: Some(status),
                    owner: None,
                    prefix: Some(segment.clone()),
                };
                // Rows of one status come in name order: the name itself is the first row of
                // its own prefix range, if a sandbox has it.
                let page = view.list(&filter, 1, None).await?;
                found = page.rows.into_iter().find(|row| row.name == segment);
                if found.is_some() {
                    break;
                }
            }
            found
        }
    };
    Ok(found.map_or(segment, |row| row.sandbox_id))
}
