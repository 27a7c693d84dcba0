//! A strong read of one (caller, key) claim without allocating: what the API's switch to
//! pseudonymised student ids asks before it lets a student's pseudonym allocate, so a claim made
//! under the clear id before the switch is replayed, never doubled (docs/personal-data.md).

use super::{Broker, BrokerError};

impl Broker {
    /// The sandbox the claim of (`caller`, `key`) holds right now, if any (strongly consistent).
    pub async fn held_by_claim(
        &self,
        caller: &str,
        key: &str,
    ) -> Result<Option<String>, BrokerError> {
        crate::erasure::claim_holder(self.events.as_ref(), caller, key).await
    }
}
