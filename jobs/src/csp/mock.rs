//! An in-memory CSP for demos and local runs (`CSP_MODE=mock`): a seeded list of sandbox
//! accounts named `lab-demo-NNN` whose deletes always succeed. Each deleted account is replaced
//! by a fresh one, the way the upstream provisioner refills the real pool, so a demo pool never
//! runs dry.

use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{Duration, Utc};
use uuid::Uuid;

use super::{account_uuid, CspAccount, CspApi, CspError, Deleted, Listing};

/// The mock CSP.
#[derive(Debug)]
pub struct MockCsp {
    state: Mutex<MockState>,
}

#[derive(Debug)]
struct MockState {
    accounts: Vec<CspAccount>,
    next: u32,
    replenish: bool,
}

impl MockCsp {
    /// `count` accounts `lab-demo-001…`, refilled after each delete.
    pub fn seeded(count: u32) -> Self {
        Self {
            state: Mutex::new(MockState {
                accounts: (1..=count).map(account).collect(),
                next: count + 1,
                replenish: true,
            }),
        }
    }

    /// Turns refilling on or off (off: deleted accounts simply disappear).
    pub fn with_replenish(self, replenish: bool) -> Self {
        self.lock().replenish = replenish;
        self
    }

    /// The accounts listed right now.
    pub fn accounts(&self) -> Vec<CspAccount> {
        self.lock().accounts.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MockState> {
        // Plain data changed in single steps: usable after a panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Mock account `n`: stable ids, so restarts of a demo see the same pool.
fn account(n: u32) -> CspAccount {
    let uuid = Uuid::from_u128(0x6d6f_636b_0000_4000_8000_0000_0000_0000 | u128::from(n));
    CspAccount {
        sandbox_id: format!("mock-{n:03}"),
        name: format!("lab-demo-{n:03}"),
        external_id: format!("identity/accounts/{uuid}"),
        created_at: Some(Utc::now() - Duration::hours(i64::from(n))),
        sfdc_account_id: None,
    }
}

#[async_trait]
impl CspApi for MockCsp {
    async fn list_sandboxes(&self) -> Listing {
        Listing {
            accounts: self.accounts(),
            pages: 1,
            error: None,
        }
    }

    async fn delete_sandbox(&self, external_id: &str) -> Result<Deleted, CspError> {
        let uuid = account_uuid(external_id)
            .ok_or_else(|| CspError::InvalidRequest(format!("{external_id:?} names no account")))?;
        let mut state = self.lock();
        let before = state.accounts.len();
        state
            .accounts
            .retain(|a| account_uuid(&a.external_id) != Some(uuid));
        if state.accounts.len() == before {
            return Ok(Deleted { status: 404 });
        }
        if state.replenish {
            let n = state.next;
            state.next += 1;
            state.accounts.push(account(n));
        }
        Ok(Deleted { status: 204 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeded list is `lab-demo-001…050`; a delete succeeds, a repeat is a 404, and the pool
    /// is refilled.
    #[tokio::test]
    async fn seeded_and_deletes_succeed() {
        let csp = MockCsp::seeded(50);
        let listing = csp.list_sandboxes().await;
        assert!(listing.is_complete());
        assert_eq!(listing.accounts.len(), 50);
        assert_eq!(listing.accounts[0].name, "lab-demo-001");
        assert_eq!(listing.accounts[49].name, "lab-demo-050");
        let first = listing.accounts[0].external_id.clone();
        assert_eq!(
            csp.delete_sandbox(&first).await,
            Ok(Deleted { status: 204 })
        );
        assert_eq!(
            csp.delete_sandbox(&first).await,
            Ok(Deleted { status: 404 })
        );
        let names: Vec<String> = csp.accounts().into_iter().map(|a| a.name).collect();
        assert_eq!(names.len(), 50);
        assert!(names.contains(&"lab-demo-051".to_string()));
        assert!(!names.contains(&"lab-demo-001".to_string()));
    }
}
