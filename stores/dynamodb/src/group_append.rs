//! Grouped appends on DynamoDB (ADR 0025): the members of a group as one `TransactWriteItems`,
//! every event a conditional put of its own (stream, version) item, so each member keeps its own
//! conditions inside the shared transaction.
//!
//! DynamoDB cancels a transaction whole when one condition fails; its cancellation reasons (one
//! per item, in request order) say which items failed. The members owning those items are
//! answered with a version conflict naming the stream, the members that continue them are
//! orphaned, and the rest are sent again at once as a smaller group — so one conflict never
//! fails a whole group, and every round answers at least one member, which bounds the rounds.
//! Throttling and transaction conflicts are retried with backoff on the same members, as for a
//! lone append; an answer lost after the write (timeout, 5xx) is recognised on the next attempt
//! by the event ids a failed condition finds, exactly as `put_events` does.

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    CancellationReason, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
};

use super::items::{envelope_to_sharded_item, event_attr, key_s, Item};
use super::metering::transaction_units;
use super::retry::{classify, Failure, TRANSIENT_CANCELLATION_CODES};
use super::{build_error, n, refused, s, DynamoStore, CONDITIONAL_CHECK_FAILED};
use domain::model::events::EventEnvelope;
use domain::store::group::{continued_members, validate_group};
use domain::store::{MemberOutcome, StoreError};

/// The call name grouped appends are counted under.
const CALL: &str = "TransactWriteItems(events)";

/// Whether `old` (the item a failed condition found) carries `envelope`'s event id: an earlier
/// attempt of this very call stored it.
fn holds_own_event(old: Option<&Item>, envelope: &EventEnvelope) -> bool {
    old.and_then(|item| key_s(item, event_attr::EVENT_ID))
        .is_some_and(|id| id == envelope.event_id.to_string())
}

/// What one cancelled attempt says about the members it carried.
#[derive(Debug, PartialEq)]
enum Cancelled {
    /// A failed condition found one of our own events: an earlier attempt with these same
    /// members committed (its answer was lost), so every one of them is stored.
    AlreadyStored,
    /// These members (index into the attempt's members) lost a condition, on this stream.
    Conflicts(Vec<(usize, String)>),
    /// Nothing failed for good: retry the same members after a backoff.
    Transient(String),
    /// Reasons without a usable code (an emulator that omits them).
    NoReasons,
    /// Refused for good (e.g. a validation reason).
    Refused(String),
}

/// Reads the reasons of a cancelled attempt. `owner[k]` is the attempt member of item `k`;
/// `events[k]` the event item `k` puts.
fn read_reasons(
    reasons: &[CancellationReason],
    owner: &[usize],
    events: &[&EventEnvelope],
) -> Cancelled {
    let failed = |r: &CancellationReason| r.code() == Some(CONDITIONAL_CHECK_FAILED);
    if reasons
        .iter()
        .zip(events)
        .any(|(r, e)| failed(r) && holds_own_event(r.item(), e))
    {
        return Cancelled::AlreadyStored;
    }
    let mut conflicts: Vec<(usize, String)> = Vec::new();
    for (k, reason) in reasons.iter().enumerate() {
        if !failed(reason) {
            continue;
        }
        if let (Some(member), Some(e)) = (owner.get(k), events.get(k)) {
            if !conflicts.iter().any(|(m, _)| m == member) {
                conflicts.push((*member, e.stream_id.clone()));
            }
        }
    }
    if !conflicts.is_empty() {
        return Cancelled::Conflicts(conflicts);
    }
    let codes: Vec<&str> = reasons.iter().filter_map(|r| r.code()).collect();
    if codes
        .iter()
        .any(|c| TRANSIENT_CANCELLATION_CODES.contains(c))
    {
        return Cancelled::Transient(format!("transaction cancelled: {codes:?}"));
    }
    if codes.iter().all(|c| *c == "None") {
        return Cancelled::NoReasons;
    }
    Cancelled::Refused(format!("transaction cancelled: {codes:?}"))
}

impl DynamoStore {
    /// The members of a group as one transaction, re-sent without the members that conflicted
    /// (and the ones continuing them) until every member is answered.
    pub(super) async fn transact_group(
        &self,
        members: Vec<Vec<EventEnvelope>>,
    ) -> Vec<MemberOutcome> {
        let continued = continued_members(&members);
        let mut outcomes: Vec<Option<MemberOutcome>> = vec![None; members.len()];
        for (j, valid) in validate_group(&members).into_iter().enumerate() {
            if let Err(e) = valid {
                outcomes[j] = Some(MemberOutcome::Failed(e));
            }
        }
        let mut puts: Vec<Vec<TransactWriteItem>> = Vec::with_capacity(members.len());
        for member in &members {
            match member.iter().map(|e| self.event_put(e)).collect() {
                Ok(items) => puts.push(items),
                Err(e) => {
                    return members
                        .iter()
                        .map(|_| MemberOutcome::Failed(e.clone()))
                        .collect()
                }
            }
        }
        let mut retry = self.retry(CALL);
        loop {
            // A member continuing one that is answered but not stored can never be stored (in
            // member order, so the orphans of orphans follow in the same pass).
            for j in 0..members.len() {
                let void = continued[j]
                    .iter()
                    .any(|i| outcomes[*i].as_ref().is_some_and(|o| !o.is_stored()));
                if outcomes[j].is_none() && void {
                    outcomes[j] = Some(MemberOutcome::Orphaned);
                }
            }
            let active: Vec<usize> = (0..members.len())
                .filter(|j| outcomes[*j].is_none())
                .collect();
            if active.is_empty() {
                break;
            }
            let mut items = Vec::new();
            let mut owner = Vec::new();
            let mut events: Vec<&EventEnvelope> = Vec::new();
            for (a, j) in active.iter().enumerate() {
                items.extend(puts[*j].iter().cloned());
                owner.extend(std::iter::repeat_n(a, members[*j].len()));
                events.extend(members[*j].iter());
            }
            let (count, units) = transaction_units(&items);
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items))
                .send()
                .await;
            let err = match result {
                Ok(_) => {
                    self.requests.count_transaction_items(CALL, count, units);
                    for j in &active {
                        outcomes[*j] = Some(MemberOutcome::Stored);
                    }
                    break;
                }
                Err(err) => err,
            };
            let failure = match &err {
                SdkError::ServiceError(ctx) => match ctx.err() {
                    TransactWriteItemsError::TransactionCanceledException(cancelled) => {
                        let reasons = cancelled.cancellation_reasons();
                        self.requests.count_cancellation(CALL, reasons);
                        let read = match read_reasons(reasons, &owner, &events) {
                            Cancelled::NoReasons => self.taken_members(&active, &members).await,
                            read => read,
                        };
                        match read {
                            Cancelled::AlreadyStored => {
                                for j in &active {
                                    outcomes[*j] = Some(MemberOutcome::Stored);
                                }
                                break;
                            }
                            Cancelled::Conflicts(conflicts) => {
                                for (a, stream_id) in conflicts {
                                    outcomes[active[a]] =
                                        Some(MemberOutcome::Failed(StoreError::VersionConflict {
                                            stream_id,
                                        }));
                                }
                                // The rest go again at once: a smaller group, not a retry.
                                self.requests.count(CALL);
                                continue;
                            }
                            Cancelled::Transient(message) => Failure::Transient(message),
                            Cancelled::Refused(message) => {
                                Failure::Fatal(StoreError::InvalidAppend(message))
                            }
                            Cancelled::NoReasons => {
                                Failure::Transient("transaction cancelled without reasons".into())
                            }
                        }
                    }
                    _ => classify(&err, StoreError::InvalidAppend),
                },
                _ => classify(&err, StoreError::InvalidAppend),
            };
            if let Err(e) = retry.after(failure).await {
                for j in &active {
                    outcomes[*j] = Some(MemberOutcome::Failed(e.clone()));
                }
                break;
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(MemberOutcome::Orphaned))
            .collect()
    }

    /// One event as a transaction item: put on condition that its (stream, version) is free,
    /// returning the item found when it is not (whose event id tells our own earlier write).
    fn event_put(&self, e: &EventEnvelope) -> Result<TransactWriteItem, StoreError> {
        Put::builder()
            .table_name(&self.events)
            .set_item(Some(envelope_to_sharded_item(e, self.index_shards)))
            .condition_expression("attribute_not_exists(#sid)")
            .expression_attribute_names("#sid", event_attr::STREAM_ID)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map(|put| TransactWriteItem::builder().put(put).build())
            .map_err(build_error)
    }

    /// Without cancellation reasons: the members (index into `active`) whose first event's
    /// version is already taken, read strongly; an item holding our own event means an earlier
    /// attempt committed.
    async fn taken_members(&self, active: &[usize], members: &[Vec<EventEnvelope>]) -> Cancelled {
        let mut conflicts = Vec::new();
        for (a, j) in active.iter().enumerate() {
            let Some(first) = members[*j].first() else {
                continue;
            };
            let read = self
                .call("GetItem(event)", refused, || {
                    self.client
                        .get_item()
                        .table_name(&self.events)
                        .key(event_attr::STREAM_ID, s(&first.stream_id))
                        .key(event_attr::VERSION, n(first.version))
                        .consistent_read(true)
                        .send()
                })
                .await;
            match read {
                Ok(out) => match out.item {
                    Some(item) if holds_own_event(Some(&item), first) => {
                        return Cancelled::AlreadyStored
                    }
                    Some(_) => conflicts.push((a, first.stream_id.clone())),
                    None => {}
                },
                Err(e) => return Cancelled::Transient(e.to_string()),
            }
        }
        if conflicts.is_empty() {
            Cancelled::NoReasons
        } else {
            Cancelled::Conflicts(conflicts)
        }
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_dynamodb::types::AttributeValue;

    use super::super::items::envelope_to_item;
    use super::*;
    use domain::store::append::test_envelope as env;

    fn reason(code: &str, item: Option<Item>) -> CancellationReason {
        CancellationReason::builder()
            .code(code)
            .set_item(item)
            .build()
    }

    /// Failed conditions are pinned on the members owning the items, once per member, naming the
    /// stream; other codes are transient or refused; our own event means already stored.
    #[test]
    fn reasons_name_the_conflicting_members() {
        let events = [
            env("sandbox#a", 2),
            env("claim#a", 1),
            env("sandbox#b", 3),
            env("claim#b", 1),
        ];
        let refs: Vec<&EventEnvelope> = events.iter().collect();
        let owner = [0, 0, 1, 1];
        let mut stranger = envelope_to_item(&env("sandbox#b", 3));
        stranger.insert("extra".into(), AttributeValue::Bool(true));
        let reasons = [
            reason("None", None),
            reason("None", None),
            reason(CONDITIONAL_CHECK_FAILED, Some(stranger)),
            reason("None", None),
        ];
        assert_eq!(
            read_reasons(&reasons, &owner, &refs),
            Cancelled::Conflicts(vec![(1, "sandbox#b".into())])
        );
        let own = [
            reason(CONDITIONAL_CHECK_FAILED, Some(envelope_to_item(&events[0]))),
            reason("None", None),
            reason("None", None),
            reason("None", None),
        ];
        assert_eq!(read_reasons(&own, &owner, &refs), Cancelled::AlreadyStored);
        let busy = [
            reason("TransactionConflict", None),
            reason("None", None),
            reason("None", None),
            reason("None", None),
        ];
        assert!(matches!(
            read_reasons(&busy, &owner, &refs),
            Cancelled::Transient(_)
        ));
        let none = [reason("None", None)];
        assert_eq!(read_reasons(&none, &[0], &refs[..1]), Cancelled::NoReasons);
        let odd = [reason("ValidationError", None)];
        assert!(matches!(
            read_reasons(&odd, &[0], &refs[..1]),
            Cancelled::Refused(_)
        ));
    }
}
