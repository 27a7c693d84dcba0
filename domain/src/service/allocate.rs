//! The allocation command (DESIGN.md §6): a strong read of the caller's claim (a live claim is
//! a replay), the drain and quota checks, then candidates from the process's queues or the view,
//! each tried with one conditional append of the sandbox's and the claim's next versions (and
//! the track's quota slot). A lost sandbox race moves on to the next candidate at once; only a
//! complete sweep that finds nothing untried answers "no sandbox available".

use std::time::Duration as StdDuration;

use chrono::Duration;

use super::candidates::{Fill, InFlight, MAX_PAGE, MAX_PAGE_WAITS, PAGE_WAIT};
use super::group_commit::{Committed, Member, SlotTake};
use super::reserved_draw::{open_pool, ReservedDraw};
use super::{
    envelopes, fair_share, quota, AllocateRequest, Allocation, AllocationLimits, Broker,
    BrokerError, CapKind, QUOTA_RETRIES,
};
use crate::model::claim::{Claim, ClaimCommand};
use crate::model::error::DomainError;
use crate::model::events::{BrokerEvent, CommandMeta, EventEnvelope};
use crate::model::ids::{claim_stream, quota_stream, sandbox_stream, validate_id};
use crate::model::lifecycle::SandboxStatus;
use crate::model::projection::PoolRow;
use crate::model::sandbox::{Sandbox, SandboxCommand};
use crate::store::{decode_stored, CandidateQuery, ListFilter, StoreError};

/// What a strong read says about an allocation append whose outcome was unknown.
enum Settled {
    /// This request's events are stored (these, from the tried version on).
    Landed(Vec<EventEnvelope>),
    /// Another writer's event holds the version this request tried.
    Lost,
    /// Nothing after the tried version: the write did not land (yet).
    NotLanded,
    /// The read failed too.
    Unknown,
}

/// What a full quota slot means for a grouped allocation.
enum SlotRefusal {
    /// A concurrent duplicate of the request holds the claim: read it again (a replay).
    Replay,
    /// The quota or cap refuses the request.
    Refuse(BrokerError),
}

/// Where one allocation request is in its search for a candidate.
#[derive(Debug, Default)]
struct Search {
    /// Random-offset pages read.
    random_pages: usize,
    /// Full sweeps of the view's available range.
    sweeps: usize,
    /// Waits for another request's page read.
    page_waits: usize,
}

impl Broker {
    /// Allocates a sandbox to `request.caller` (DESIGN.md §6), or replays the live allocation of
    /// the same (caller, key). No sandbox is ever allocated twice: the sandbox's next version is
    /// written on condition it does not exist. No (caller, key) holds two: the claim's next
    /// version is written in the same transaction.
    pub async fn allocate(
        &self,
        request: &AllocateRequest,
        meta: &CommandMeta,
    ) -> Result<Allocation, BrokerError> {
        self.allocate_within(request, meta, None).await
    }

    /// [`Broker::allocate`] with a further cap on the track's concurrent allocations (a per-track
    /// credential's maximum); the lower of it and the configured quota applies. A quota-bound
    /// allocation takes a slot in its track's quota stream in the same transaction, so the limit
    /// holds under any concurrency. A drained pool (or prefix) refuses new allocations; a replay
    /// of a live allocation is answered before either check.
    pub async fn allocate_within(
        &self,
        request: &AllocateRequest,
        meta: &CommandMeta,
        track_limit: Option<u32>,
    ) -> Result<Allocation, BrokerError> {
        let limits = AllocationLimits {
            track_limit,
            ..AllocationLimits::default()
        };
        self.allocate_limited(request, meta, &limits).await
    }

    /// [`Broker::allocate_within`] with fair-share caps (DESIGN.md §11): each cap's quota stream
    /// takes a slot in the allocation's own transaction, so a cap holds under any concurrency;
    /// the replay of a live allocation is answered before any cap is checked.
    pub async fn allocate_limited(
        &self,
        request: &AllocateRequest,
        meta: &CommandMeta,
        limits: &AllocationLimits,
    ) -> Result<Allocation, BrokerError> {
        let track_limit = limits.track_limit;
        let caps = &limits.caps;
        let caller = validate_id("caller id", &request.caller)?;
        let key = match request.idempotency_key.as_deref().map(str::trim) {
            Some(k) if !k.is_empty() => validate_id("Idempotency-Key", k)?,
            _ => caller.clone(),
        };
        let prefix = request
            .name_prefix
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| validate_id("X-Sandbox-Name-Prefix", p))
            .transpose()?;
        let claim_id = claim_stream(&caller, &key);
        let quota = request.track_name.as_deref().and_then(|track| {
            let configured = if limits.named_track_quota_only {
                self.config.quotas.per_track.get(track).copied()
            } else {
                self.config.quotas.limit_for(track)
            };
            let limit = match (configured, track_limit) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            limit.map(|limit| (track.to_string(), limit))
        });
        let cache_key = prefix.as_deref().unwrap_or("");
        // Waiting for a permit is fair (FIFO); the semaphore is never closed.
        let _permit = self
            .allocating
            .acquire()
            .await
            .map_err(|_| StoreError::Unavailable("allocation admission closed".into()))?;
        let mut conflicts = 0u32;
        let mut search = Search::default();
        let mut claim_reads = 0usize;
        let mut cap_conflicts = 0usize;
        // Grouped, the first pass assumes the claim empty instead of reading it (ADR 0037): the
        // grant is then written at the claim's version 1 on condition it does not exist, so a
        // claim with any history fails that condition and sends the request back here. Until a
        // strong read, no refusal is answered: a live claim (a replay) comes before any refusal.
        let mut first_pass_assumes = self.group.is_some();
        // Every other pass starts from a strong read of the claim, so a duplicate request that
        // lost the claim race comes back here and returns the winner's sandbox.
        'claim: loop {
            claim_reads += 1;
            let assumed = std::mem::take(&mut first_pass_assumes);
            let claim = if assumed {
                Claim::default()
            } else {
                self.load_claim(&claim_id).await?
            };
            if let Some(held) = &claim.active {
                let loaded = self.load_sandbox(held).await?;
                let allocation_event_id = loaded.allocation_event_id();
                let sandbox = loaded.sandbox;
                // The claim was read before the sandbox: a mark-for-deletion or expiry may have
                // ended the allocation (and released the claim in the same transaction) in
                // between. Only a sandbox still allocated under this very claim is a replay;
                // otherwise read the claim again, which now shows it released.
                let replay = sandbox.status == Some(SandboxStatus::Allocated)
                    && sandbox.claim_stream.as_deref() == Some(claim_id.as_str());
                if replay
                    && sandbox
                        .expires_at
                        .is_some_and(|end| self.clock.now() >= end)
                {
                    // The lab window has ended but the expiry job has not run yet: handing this
                    // sandbox back would start a lab that is over. Expire it now (grace zero, as
                    // extension is refused from `expires_at` on), which releases the claim in the
                    // same transaction, and answer as a fresh request would: a new sandbox, or
                    // 409 (docs/liveness.md, path 6). Lost to a concurrent expiry, mark or
                    // extension, the claim is simply read again.
                    match self
                        .execute(
                            held,
                            SandboxCommand::Expire {
                                grace: Duration::zero(),
                            },
                            meta,
                        )
                        .await
                    {
                        Ok(_) | Err(BrokerError::Domain(_)) => {}
                        Err(e) => return Err(e),
                    }
                    if claim_reads > self.config.command_retries {
                        return Err(StoreError::Unavailable(format!(
                            "claim {claim_id} kept changing while it was read"
                        ))
                        .into());
                    }
                    continue 'claim;
                }
                if replay {
                    return Ok(Allocation {
                        sandbox,
                        replayed: true,
                        conflicts,
                        allocation_event_id,
                    });
                }
                if claim_reads > self.config.command_retries {
                    return Err(StoreError::Unavailable(format!(
                        "claim {claim_id} kept changing while it was read"
                    ))
                    .into());
                }
                continue 'claim;
            }
            if let Some(drain) = self.drain_refusing(prefix.as_deref()).await? {
                if assumed {
                    continue 'claim;
                }
                return Err(BrokerError::Maintenance {
                    prefix: drain.prefix,
                    retry_after_s: self.config.maintenance_retry_after_s,
                });
            }
            let grouped = self.group.as_ref();
            // Alone, held until this pass ends: the track's other requests in this process wait
            // here instead of racing this one for the quota stream's next version. Grouped, the
            // committer decides the track's slots in order, so the requests need no turn.
            let _quota_turn = match (&quota, grouped) {
                (Some((track, _)), None) => Some(self.track_locks.lock(track).await),
                _ => None,
            };
            let mut usage = match (&quota, grouped) {
                (Some((track, _)), None) => {
                    Some(quota::load_usage(self.events.as_ref(), track).await?)
                }
                _ => None,
            };
            let mut quota_conflicts = 0usize;
            let mut cap_usage = Vec::with_capacity(caps.len());
            if grouped.is_none() {
                for cap in caps {
                    cap_usage.push(fair_share::load(self.events.as_ref(), &cap.stream_id).await?);
                }
            }
            // Grouped: the slots this allocation takes (the track quota first, then the caps),
            // checked before a candidate is taken against what the committer knows; a full count
            // is read strongly again before it refuses, as alone.
            let slots: Vec<(SlotTake, Option<CapKind>)> = quota
                .iter()
                .map(|(track, limit)| {
                    let take = SlotTake {
                        stream_id: quota_stream(track),
                        limit: *limit,
                        prunable: false,
                    };
                    (take, None)
                })
                .chain(caps.iter().map(|cap| {
                    let take = SlotTake {
                        stream_id: cap.stream_id.clone(),
                        limit: cap.limit,
                        prunable: true,
                    };
                    (take, Some(cap.kind))
                }))
                .collect();
            if let Some(group) = grouped {
                for (take, _) in &slots {
                    // A claim that proved to have history (a returning caller) likely
                    // has a cap stream with history too: read it rather than assume it.
                    let mut known = group.usage(take, assumed).await?;
                    if known.in_use() >= take.limit as usize {
                        known = group.reload(take).await?;
                    }
                    if known.in_use() >= take.limit as usize {
                        match self
                            .slot_refusal(&slots, take, &claim_id, claim_reads, quota.as_ref())
                            .await?
                        {
                            SlotRefusal::Replay => continue 'claim,
                            SlotRefusal::Refuse(_) if assumed => continue 'claim,
                            SlotRefusal::Refuse(e) => return Err(e),
                        }
                    }
                }
            }
            loop {
                for (cap, usage) in caps.iter().zip(cap_usage.iter_mut()) {
                    if usage.in_use() >= cap.limit as usize {
                        let full = std::mem::take(usage);
                        *usage = fair_share::prune(self.events.as_ref(), full, cap.limit).await?;
                        if usage.in_use() >= cap.limit as usize {
                            // A concurrent duplicate of this very request may have taken the
                            // cap's last slot with this claim: that is a replay, not a refusal.
                            if self.load_claim(&claim_id).await?.active.is_some()
                                && claim_reads <= self.config.command_retries
                            {
                                continue 'claim;
                            }
                            return Err(BrokerError::FairShareExceeded {
                                kind: cap.kind,
                                limit: cap.limit,
                                retry_after_s: self.config.no_sandbox_retry_after_s,
                            });
                        }
                    }
                }
                if let (Some((track, limit)), Some(usage)) = (&quota, &usage) {
                    if usage.in_use() >= *limit as usize {
                        return Err(BrokerError::QuotaExceeded {
                            track: track.clone(),
                            limit: *limit,
                            retry_after_s: self.config.no_sandbox_retry_after_s,
                        });
                    }
                }
                // A reservation's track draws from its earmarks first (ADR 0028); the open pool
                // never offers an earmarked row to anyone.
                let reserved = match request.track_name.as_deref() {
                    Some(track) => self.reserved_candidate(track, prefix.as_deref()).await?,
                    None => ReservedDraw::OpenPool,
                };
                let next = match reserved {
                    ReservedDraw::Candidate(candidate) => Some(*candidate),
                    ReservedDraw::ReservationOnly => None,
                    ReservedDraw::OpenPool => {
                        self.next_candidate(prefix.as_deref(), &mut search).await?
                    }
                };
                let Some(candidate) = next else {
                    if let Some(group) = grouped {
                        // Grouped requests of one caller or track may hold the last candidates
                        // while the committer decides their slots; when a slot filled meanwhile,
                        // its refusal (or the replay) is the true answer, not "none free".
                        for (take, _) in &slots {
                            if group.reload(take).await?.in_use() >= take.limit as usize {
                                match self
                                    .slot_refusal(
                                        &slots,
                                        take,
                                        &claim_id,
                                        claim_reads,
                                        quota.as_ref(),
                                    )
                                    .await?
                                {
                                    SlotRefusal::Replay => continue 'claim,
                                    SlotRefusal::Refuse(_) if assumed => continue 'claim,
                                    SlotRefusal::Refuse(e) => return Err(e),
                                }
                            }
                        }
                    }
                    if assumed {
                        continue 'claim;
                    }
                    return Err(BrokerError::NoSandboxAvailable {
                        retry_after_s: self.config.no_sandbox_retry_after_s,
                    });
                };
                let row = candidate.row().clone();
                let state = sandbox_from_row(&row);
                let now = self.clock.now();
                let events = match state.decide(
                    SandboxCommand::Allocate {
                        caller: caller.clone(),
                        track_name: request.track_name.clone(),
                        idempotency_key: key.clone(),
                        claim_stream: claim_id.clone(),
                        lab_duration: self.config.lab_duration,
                        waited_ms: limits.waited_ms,
                    },
                    now,
                ) {
                    Ok(events) => crate::heartbeat::with_policy(
                        events,
                        self.config
                            .heartbeats
                            .policy_for(request.track_name.as_deref()),
                    ),
                    // Earmarked for another track (the view showed the earmark after the row was
                    // queued): not taken, so the reservation's own track still finds it.
                    Err(DomainError::ReservedForTrack { .. }) => {
                        drop(candidate);
                        continue;
                    }
                    Err(_) => {
                        candidate.taken();
                        continue;
                    }
                };
                let grant = match claim.decide(ClaimCommand::Grant {
                    caller: caller.clone(),
                    idempotency_key: key.clone(),
                    sandbox_id: row.sandbox_id.clone(),
                }) {
                    Ok(grant) => grant,
                    Err(e) => {
                        candidate.give_back(cache_key);
                        return Err(e.into());
                    }
                };
                let sandbox_stream_id = sandbox_stream(&row.sandbox_id);
                let mut batch = envelopes(&sandbox_stream_id, state.version, &events, meta, now);
                batch.extend(envelopes(&claim_id, claim.version, &grant, meta, now));
                let quota_id = quota.as_ref().map(|(track, _)| quota_stream(track));
                if let (Some((track, limit)), Some(usage), Some(quota_id)) =
                    (&quota, &usage, &quota_id)
                {
                    match usage.take(&row.sandbox_id, *limit) {
                        Ok(taken) => {
                            batch.extend(envelopes(quota_id, usage.version, &[taken], meta, now));
                        }
                        Err(full) => {
                            candidate.give_back(cache_key);
                            return Err(BrokerError::QuotaExceeded {
                                track: track.clone(),
                                limit: full.limit,
                                retry_after_s: self.config.no_sandbox_retry_after_s,
                            });
                        }
                    }
                }
                let allocation_event_id = batch
                    .iter()
                    .find(|e| e.event_type == "SandboxAllocated")
                    .map(|e| e.event_id);
                for (cap, usage) in caps.iter().zip(&cap_usage) {
                    match usage.take(&row.sandbox_id, cap.limit) {
                        Ok(taken) => {
                            let taken =
                                envelopes(&cap.stream_id, usage.version, &[taken], meta, now);
                            batch.extend(taken);
                        }
                        Err(full) => {
                            candidate.give_back(cache_key);
                            return Err(BrokerError::FairShareExceeded {
                                kind: cap.kind,
                                limit: full.limit,
                                retry_after_s: self.config.no_sandbox_retry_after_s,
                            });
                        }
                    }
                }
                let first_event = batch.first().map(|e| e.event_id);
                let appended = match grouped {
                    None => self.events.append(batch).await,
                    Some(group) => {
                        let member = Member {
                            fixed: batch,
                            sandbox_id: row.sandbox_id.clone(),
                            takes: slots.iter().map(|(take, _)| take.clone()).collect(),
                            meta: meta.clone(),
                            now,
                        };
                        match group.commit(member).await {
                            Committed::Stored => Ok(()),
                            Committed::Failed(e) => Err(e),
                            Committed::Full { take } => {
                                // Decided on a strong read: the candidate is untouched.
                                candidate.give_back(cache_key);
                                let Some((take, _)) = slots.get(take) else {
                                    return Err(StoreError::Unavailable(
                                        "a slot refusal named no slot".into(),
                                    )
                                    .into());
                                };
                                match self
                                    .slot_refusal(
                                        &slots,
                                        take,
                                        &claim_id,
                                        claim_reads,
                                        quota.as_ref(),
                                    )
                                    .await?
                                {
                                    SlotRefusal::Replay => continue 'claim,
                                    SlotRefusal::Refuse(_) if assumed => continue 'claim,
                                    SlotRefusal::Refuse(e) => return Err(e),
                                }
                            }
                        }
                    }
                };
                match appended {
                    Ok(()) => {
                        candidate.taken();
                        let mut sandbox = state;
                        for event in &events {
                            sandbox.fold(event);
                        }
                        return Ok(Allocation {
                            sandbox,
                            replayed: false,
                            conflicts,
                            allocation_event_id,
                        });
                    }
                    Err(StoreError::VersionConflict { stream_id }) if stream_id == claim_id => {
                        // A concurrent duplicate holds the claim now; this candidate is untouched.
                        candidate.give_back(cache_key);
                        continue 'claim;
                    }
                    Err(StoreError::VersionConflict { stream_id })
                        if quota_id.as_deref() == Some(stream_id.as_str()) =>
                    {
                        // Another instance allocated (or released) for this track first: the
                        // candidate is untouched; read the new count and decide again.
                        candidate.give_back(cache_key);
                        quota_conflicts += 1;
                        if quota_conflicts > QUOTA_RETRIES {
                            return Err(StoreError::Unavailable(format!(
                                "quota of track {} kept changing",
                                quota.as_ref().map_or("", |(t, _)| t.as_str())
                            ))
                            .into());
                        }
                        if let Some((track, _)) = &quota {
                            usage = Some(quota::load_usage(self.events.as_ref(), track).await?);
                        }
                    }
                    Err(StoreError::VersionConflict { stream_id })
                        if caps.iter().any(|c| c.stream_id == stream_id) =>
                    {
                        // Another allocation under the same cap committed first — possibly a
                        // concurrent duplicate of this request, whose claim then answers it:
                        // start over from the claim (the candidate is untouched).
                        candidate.give_back(cache_key);
                        cap_conflicts += 1;
                        if cap_conflicts > QUOTA_RETRIES {
                            return Err(StoreError::Unavailable(format!(
                                "cap {stream_id} kept changing"
                            ))
                            .into());
                        }
                        continue 'claim;
                    }
                    Err(StoreError::VersionConflict { .. }) => {
                        // Someone else took (or changed) this sandbox: the view row is stale.
                        // Remember it as taken so no request of this process tries it again,
                        // repair its row in the background, and try the next candidate at once
                        // (no sleeping on the hot path).
                        conflicts += 1;
                        candidate.taken();
                        self.spawn_repair(&row.sandbox_id);
                    }
                    Err(e) => {
                        // Unknown outcome (throttled, unreachable, a failed group commit): the
                        // write may or may not have landed. A strong read of the sandbox's
                        // stream settles it (docs/liveness.md, path 1).
                        match self
                            .settle_unknown(&sandbox_stream_id, row.version, first_event)
                            .await
                        {
                            Settled::Landed(stored) => {
                                candidate.taken();
                                let mut sandbox = state;
                                for envelope in &stored {
                                    if let BrokerEvent::Sandbox(event) = decode_stored(envelope)? {
                                        sandbox.fold(&event);
                                    }
                                }
                                return Ok(Allocation {
                                    sandbox,
                                    replayed: false,
                                    conflicts,
                                    allocation_event_id,
                                });
                            }
                            Settled::Lost => {
                                // Someone else's write holds the next version: a plain conflict.
                                conflicts += 1;
                                candidate.taken();
                                self.spawn_repair(&row.sandbox_id);
                                continue;
                            }
                            Settled::NotLanded => {
                                // Usable again at once. Should the write still land later (a
                                // DynamoDB transaction the SDK gave up on), it takes this
                                // claim's next version, so no (caller, key) ends up with two
                                // allocations, and a retry of the request replays it.
                                candidate.give_back(cache_key);
                            }
                            Settled::Unknown => {
                                candidate.unsure(self.config.unknown_outcome_hold);
                            }
                        }
                        return Err(e.into());
                    }
                }
            }
        }
    }

    /// What a full slot means for this request (grouped allocations): a cap may have been filled
    /// by a concurrent duplicate of this very request, whose claim then answers it (a replay);
    /// otherwise the quota or cap refuses.
    async fn slot_refusal(
        &self,
        slots: &[(SlotTake, Option<CapKind>)],
        take: &SlotTake,
        claim_id: &str,
        claim_reads: usize,
        quota: Option<&(String, u32)>,
    ) -> Result<SlotRefusal, BrokerError> {
        let kind = slots
            .iter()
            .find(|(t, _)| t == take)
            .and_then(|(_, kind)| *kind);
        let retry_after_s = self.config.no_sandbox_retry_after_s;
        match kind {
            Some(kind) => {
                if self.load_claim(claim_id).await?.active.is_some()
                    && claim_reads <= self.config.command_retries
                {
                    return Ok(SlotRefusal::Replay);
                }
                Ok(SlotRefusal::Refuse(BrokerError::FairShareExceeded {
                    kind,
                    limit: take.limit,
                    retry_after_s,
                }))
            }
            None => Ok(SlotRefusal::Refuse(BrokerError::QuotaExceeded {
                track: quota.map(|(track, _)| track.clone()).unwrap_or_default(),
                limit: take.limit,
                retry_after_s,
            })),
        }
    }

    /// Reads the sandbox stream strongly after an append whose outcome the store could not tell:
    /// did the event this request wrote at `tried_at + 1` (its `event_id`) land?
    async fn settle_unknown(
        &self,
        stream_id: &str,
        tried_at: u64,
        first_event: Option<uuid::Uuid>,
    ) -> Settled {
        match self.events.load_after(stream_id, tried_at).await {
            Ok(stored) => match stored.first() {
                Some(e) if Some(e.event_id) == first_event => Settled::Landed(stored),
                Some(_) => Settled::Lost,
                None => Settled::NotLanded,
            },
            Err(e) => {
                tracing::warn!(target: "allocate", stream_id, error = %e, "unknown append outcome could not be read back");
                Settled::Unknown
            }
        }
    }

    /// The next candidate for this request: from the process's queue, else a random-offset page
    /// of the view, else a full sweep of the view's available range. `None` (a 409) only when a
    /// complete sweep finds nothing this process does not already know to be taken.
    async fn next_candidate(
        &self,
        prefix: Option<&str>,
        search: &mut Search,
    ) -> Result<Option<InFlight<'_>>, BrokerError> {
        let cache_key = prefix.unwrap_or("");
        loop {
            if let Some(candidate) = self.candidates.pop(cache_key) {
                return Ok(Some(candidate));
            }
            if search.random_pages < self.config.allocate_rounds {
                // Registered before asking for the turn, so a read that ends in between still
                // wakes this request.
                let fetched = self.candidates.fetched.notified();
                tokio::pin!(fetched);
                fetched.as_mut().enable();
                let turn = self.candidates.page_turn(cache_key);
                if turn.is_none() && search.page_waits < MAX_PAGE_WAITS {
                    // Another request is reading this prefix's next page: use its rows.
                    search.page_waits += 1;
                    let _ = tokio::time::timeout(PAGE_WAIT, fetched).await;
                    continue;
                }
                search.random_pages += 1;
                // Ask for enough rows that the ones this process took a moment ago (and the
                // view may still show as available) cannot crowd out fresh candidates; bounded,
                // so an allocation's reads stay O(K) whatever the pool size.
                let limit = (self.config.k_candidates + self.candidates.recently_taken())
                    .clamp(1, MAX_PAGE);
                let query = CandidateQuery {
                    prefix: prefix.map(str::to_string),
                    start_pick: rand::random(),
                    after_name: prefix.and_then(|_| self.candidates.cursor(cache_key)),
                    limit,
                };
                let rows = open_pool(self.view.candidates(&query).await?, self.clock.now());
                let last_name = rows.last().map(|r| r.name.clone());
                let filled = self.candidates.fill(cache_key, rows, last_name);
                drop(turn);
                if filled == Fill::Queued {
                    continue;
                }
                // A page with nothing usable proves nothing about the rest of the pool: sweep.
                search.random_pages = self.config.allocate_rounds;
            }
            if search.sweeps >= self.config.max_sweeps {
                tracing::warn!(target: "allocate", sweeps = search.sweeps, "candidate sweeps exhausted");
                return Ok(None);
            }
            search.sweeps += 1;
            match self.sweep(prefix).await? {
                Fill::Queued => continue,
                Fill::OnlyInFlight => {
                    // The only candidates left are being tried by other requests; one that turns
                    // out to be a replay gives its candidate back. Wait for a decision (bounded).
                    let decided = self.candidates.decided.notified();
                    let _ = tokio::time::timeout(StdDuration::from_millis(50), decided).await;
                }
                Fill::AllTaken => return Ok(None),
            }
        }
    }

    /// Reads the view's whole available range (for the prefix) page by page until a page has a
    /// usable candidate. Cost is proportional to the rows the view wrongly shows as available,
    /// which the projector keeps small; bounded by `max_sweep_rows`.
    async fn sweep(&self, prefix: Option<&str>) -> Result<Fill, BrokerError> {
        let cache_key = prefix.unwrap_or("");
        let filter = ListFilter {
            status: Some(SandboxStatus::Available),
            owner: None,
            prefix: prefix.map(str::to_string),
        };
        let mut cursor: Option<String> = None;
        let mut read = 0usize;
        let mut in_flight = false;
        loop {
            let page = self.view.list(&filter, 100, cursor.as_deref()).await?;
            read += page.rows.len();
            match self
                .candidates
                .fill(cache_key, open_pool(page.rows, self.clock.now()), None)
            {
                Fill::Queued => return Ok(Fill::Queued),
                Fill::OnlyInFlight => in_flight = true,
                Fill::AllTaken => {}
            }
            cursor = page.cursor;
            if cursor.is_none() || read >= self.config.max_sweep_rows {
                break;
            }
        }
        if read >= self.config.max_sweep_rows {
            tracing::warn!(target: "allocate", read, "sweep bound reached; the view lags far behind");
        }
        Ok(if in_flight {
            Fill::OnlyInFlight
        } else {
            Fill::AllTaken
        })
    }
}

/// The aggregate state a view row stands for. Valid for deciding an allocation because the
/// append is conditioned on the row's version: if the row is stale, the write conflicts.
pub(super) fn sandbox_from_row(row: &PoolRow) -> Sandbox {
    Sandbox {
        sandbox_id: row.sandbox_id.clone(),
        status: Some(row.status),
        name: row.name.clone(),
        external_id: row.external_id.clone(),
        sfdc_account_id: row.sfdc_account_id.clone(),
        version: row.version,
        earmark: row.earmark.clone(),
        ..Sandbox::default()
    }
}
