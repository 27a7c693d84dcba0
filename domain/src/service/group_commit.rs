//! Group commit of allocations (ADR 0025): concurrent allocations of one process written by one
//! grouped append ([`EventStore::append_group`]), on stores that write a group in one request.
//!
//! Each allocation request decides its own sandbox and claim events, exactly as it would alone,
//! and hands them over as a [`Member`] with the quota slots it must take (the track quota, the
//! fair-share caps). One committer task writes the members:
//!
//! * **No linger.** The committer sends whatever is queued the moment the previous group is
//!   answered; a lone request is sent at once, and a group only grows while one is in flight.
//! * **Slots are decided by the committer, in order.** A slot stream's events each carry the
//!   holders after them, so two allocations that read the same count would write the same
//!   version and one would lose. The committer instead applies the members' takes in queue order
//!   to the slot streams as it knows them (the last state it wrote or read), so the members of
//!   one group take consecutive versions of a track's quota stream — one transaction moves the
//!   quota for many students. A member continuing another member's slot stream is stored only
//!   together with it (the store's rule); when the earlier one fails, the later one comes back
//!   orphaned and is decided again in the next group, against what was actually stored.
//! * **A slot refusal rests on a strong read.** What the committer knows may be stale (another
//!   instance, a release): a take written at a stale version fails on its condition, the stream
//!   is read again, and the member is decided again; a member is refused ([`Committed::Full`])
//!   only by a count read strongly in the same round (pruned of ended allocations for the caps).
//! * **Every other conflict is the request's.** A member whose sandbox or claim version was taken
//!   is answered with that conflict, and the request goes on as it would alone (next candidate,
//!   or the claim again). An unknown outcome is answered as unknown, and the request settles it
//!   with its strong read of the sandbox stream, as alone.
//! * **A cap stream never seen is assumed empty (ADR 0037).** A fair-share cap's stream is
//!   almost always new (one per caller), so its first take is written at version 1 on condition
//!   it does not exist instead of after a strong read; a stream that has events fails that
//!   condition, is read strongly and the member decided again, as any moved slot stream. The
//!   assumption never refuses anyone: a refusal still rests on a strong read.
//! * **Members with the same item wait.** Two members that would write the same sandbox or
//!   claim version are never in one group; the later one waits for the next group, where the
//!   store tells whether it lost.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::{decode_for_command, envelopes, fair_share, BrokerError, QUOTA_RETRIES};
use crate::model::events::{BrokerEvent, CommandMeta, EventEnvelope};
use crate::model::quota::QuotaUsage;
use crate::store::{EventStore, MemberOutcome, StoreError};

/// Bound on remembered slot streams (one per caller under the per-caller cap); beyond it the
/// memory is cleared, which only costs strong reads.
const MAX_REMEMBERED_STREAMS: usize = 10_000;

/// A quota slot an allocation takes in its own transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SlotTake {
    /// The quota stream (a track's quota or a fair-share cap).
    pub(super) stream_id: String,
    /// Holders allowed.
    pub(super) limit: u32,
    /// A fair-share cap: holders whose allocation ended may be dropped when it is full
    /// ([`fair_share::prune`]); a track quota is released by the command that ends the
    /// allocation instead.
    pub(super) prunable: bool,
}

/// One allocation's append, as the request decided it.
#[derive(Debug)]
pub(super) struct Member {
    /// The sandbox's and the claim's events, at the versions the request read.
    pub(super) fixed: Vec<EventEnvelope>,
    /// The sandbox that takes the slots.
    pub(super) sandbox_id: String,
    /// The slots, in the order they are taken.
    pub(super) takes: Vec<SlotTake>,
    /// The command's metadata (the slot events carry it too).
    pub(super) meta: CommandMeta,
    /// The command's time.
    pub(super) now: DateTime<Utc>,
}

impl Member {
    fn items(&self) -> usize {
        self.fixed.len() + self.takes.len()
    }
}

/// What became of a member.
#[derive(Debug)]
pub(super) enum Committed {
    /// Every event of it is stored, the slot events included.
    Stored,
    /// Not stored: a version conflict on the sandbox or the claim, or the store failing (the
    /// outcome is then unknown), as a lone append would answer.
    Failed(StoreError),
    /// Take number `take` (index into [`Member::takes`]) found its stream at its limit, by a
    /// strong read.
    Full {
        /// Index into [`Member::takes`].
        take: usize,
    },
}

/// What group commit did since start, for `/metrics`.
#[derive(Debug, Default)]
pub struct GroupCommitStats {
    /// Grouped appends sent (each one `TransactWriteItems`, before the store's own re-sends).
    pub groups: AtomicU64,
    /// Members in those groups (an allocation decided again counts again).
    pub members: AtomicU64,
    /// Members decided again because a member they continued failed or their slot stream had
    /// moved.
    pub redecided: AtomicU64,
    /// Members refused because a slot stream was full.
    pub full: AtomicU64,
}

/// A queued member and where its answer goes.
struct Queued {
    member: Member,
    reply: oneshot::Sender<Committed>,
    /// Times it was decided again.
    rounds: usize,
}

/// The slot streams as this process last wrote or read them.
#[derive(Debug, Default)]
struct SlotMemory {
    streams: Mutex<HashMap<String, QuotaUsage>>,
}

impl SlotMemory {
    fn get(&self, stream_id: &str) -> Option<QuotaUsage> {
        self.lock().get(stream_id).cloned()
    }

    /// Remembers `usage` unless a newer version is remembered already (a prune keeps the
    /// version, so an equal version replaces).
    fn offer(&self, stream_id: &str, usage: QuotaUsage) {
        let mut streams = self.lock();
        if streams.len() >= MAX_REMEMBERED_STREAMS && !streams.contains_key(stream_id) {
            streams.clear();
        }
        match streams.get_mut(stream_id) {
            Some(known) if known.version > usage.version => {}
            Some(known) => *known = usage,
            None => {
                streams.insert(stream_id.to_string(), usage);
            }
        }
    }

    fn forget(&self, stream_id: &str) {
        self.lock().remove(stream_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, QuotaUsage>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How large groups get and how many are written at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GroupLimits {
    /// Most events in one group (the store's limit).
    pub(super) max_items: usize,
    /// Groups written at once: the next group is formed while fewer are in flight, so a slow
    /// write holds up only the members that need what it writes.
    pub(super) in_flight: usize,
    /// How long a group write may take before its members are answered as unknown outcomes
    /// (the write is abandoned, as a request that timed out during its append).
    pub(super) deadline: std::time::Duration,
}

/// The group committer of one broker.
pub(super) struct GroupCommit {
    events: Arc<dyn EventStore>,
    limits: GroupLimits,
    /// Started on first use, on the runtime of the first request.
    queue: OnceLock<mpsc::UnboundedSender<Queued>>,
    slots: Arc<SlotMemory>,
    stats: Arc<GroupCommitStats>,
}

/// A slot stream's holders now (strong read of its latest event). A stream this release cannot
/// fully read refuses the command (ADR 0023), as the per-request reads do.
async fn read_slots(events: &dyn EventStore, stream_id: &str) -> Result<QuotaUsage, BrokerError> {
    let Some(latest) = events.load_latest(stream_id).await? else {
        return Ok(QuotaUsage::default());
    };
    let mut usage = QuotaUsage::default();
    if let BrokerEvent::Quota(event) = decode_for_command(&latest)? {
        usage.fold(&event);
    }
    usage.version = latest.version;
    Ok(usage)
}

/// A strong read of a slot stream, pruned of ended allocations when it is a full cap.
async fn read_fresh(
    events: &dyn EventStore,
    stream_id: &str,
    prune_at: Option<u32>,
) -> Result<QuotaUsage, BrokerError> {
    let usage = read_slots(events, stream_id).await?;
    match prune_at {
        Some(limit) if usage.in_use() >= limit as usize => {
            fair_share::prune(events, usage, limit).await
        }
        _ => Ok(usage),
    }
}

impl GroupCommit {
    /// A committer over `events` writing groups within `limits`.
    pub(super) fn new(events: Arc<dyn EventStore>, limits: GroupLimits) -> Self {
        Self {
            events,
            limits,
            queue: OnceLock::new(),
            slots: Arc::default(),
            stats: Arc::default(),
        }
    }

    /// What it did since start.
    pub(super) fn stats(&self) -> Arc<GroupCommitStats> {
        Arc::clone(&self.stats)
    }

    /// The slot stream's holders as this process knows them; with `assume_unseen`, a cap stream
    /// it has never seen is assumed empty (its take is written on condition the stream has no
    /// events); any other stream is read strongly (and remembered, so the committer uses it).
    /// Good enough to refuse nothing: a full count is read again with [`GroupCommit::reload`]
    /// before a refusal.
    pub(super) async fn usage(
        &self,
        take: &SlotTake,
        assume_unseen: bool,
    ) -> Result<QuotaUsage, BrokerError> {
        if let Some(usage) = self.slots.get(&take.stream_id) {
            return Ok(usage);
        }
        if take.prunable && assume_unseen {
            return Ok(QuotaUsage::default());
        }
        self.reload(take).await
    }

    /// The slot stream's holders by a strong read now (pruned when it is a full cap), remembered.
    pub(super) async fn reload(&self, take: &SlotTake) -> Result<QuotaUsage, BrokerError> {
        let prune_at = take.prunable.then_some(take.limit);
        let usage = read_fresh(self.events.as_ref(), &take.stream_id, prune_at).await?;
        self.slots.offer(&take.stream_id, usage.clone());
        Ok(usage)
    }

    /// Forgets what this process knows of a slot stream (another command of this process wrote
    /// it; the next use reads it again).
    pub(super) fn forget(&self, stream_id: &str) {
        self.slots.forget(stream_id);
    }

    /// Queues `member` for the next group and waits for its answer. A request dropped before its
    /// group is formed is not written; once sent, its outcome stands whether anyone waits or not.
    pub(super) async fn commit(&self, member: Member) -> Committed {
        let queue = self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            let leader = Leader {
                events: Arc::clone(&self.events),
                limits: GroupLimits {
                    in_flight: self.limits.in_flight.max(1),
                    ..self.limits
                },
                slots: Arc::clone(&self.slots),
                stats: Arc::clone(&self.stats),
                pending: VecDeque::new(),
                stale: HashSet::new(),
                busy_streams: HashSet::new(),
                busy_keys: HashSet::new(),
            };
            tokio::spawn(leader.run(receiver));
            sender
        });
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            member,
            reply,
            rounds: 0,
        };
        if queue.send(queued).is_err() {
            return Committed::Failed(StoreError::Unavailable(
                "the group committer has stopped".into(),
            ));
        }
        answer.await.unwrap_or_else(|_| {
            Committed::Failed(StoreError::Unavailable(
                "the group committer has stopped".into(),
            ))
        })
    }
}

/// A member placed in the group being formed.
struct Placed {
    queued: Queued,
    /// Its events: the fixed ones, then its slot events.
    events: Vec<EventEnvelope>,
    /// Each slot stream it writes, with the holders after its take.
    after: Vec<(String, QuotaUsage)>,
}

/// One round's group.
#[derive(Default)]
struct Formed {
    placed: Vec<Placed>,
    /// Members refused: (member, the take that found its stream full).
    full: Vec<(Queued, usize)>,
}

/// The committer task: forms groups and writes up to `in_flight` of them at once.
struct Leader {
    events: Arc<dyn EventStore>,
    limits: GroupLimits,
    slots: Arc<SlotMemory>,
    stats: Arc<GroupCommitStats>,
    /// Members waiting for a group, oldest first.
    pending: VecDeque<Queued>,
    /// Slot streams to read strongly before their next use.
    stale: HashSet<String>,
    /// Slot streams a group in flight writes: nobody else takes them until it is answered.
    busy_streams: HashSet<String>,
    /// Items (stream, version) a group in flight writes.
    busy_keys: HashSet<(String, u64)>,
}

/// A written group: its members and their outcomes.
type Written = (Vec<Placed>, Vec<MemberOutcome>);

impl Leader {
    async fn run(mut self, mut receiver: mpsc::UnboundedReceiver<Queued>) {
        let mut writing: JoinSet<Written> = JoinSet::new();
        let mut open = true;
        loop {
            while let Ok(queued) = receiver.try_recv() {
                self.pending.push_back(queued);
            }
            // A request that went away before its group was formed is not written, as a lone
            // request dropped before its append.
            self.pending.retain(|q| !q.reply.is_closed());
            if writing.len() < self.limits.in_flight && !self.pending.is_empty() {
                let fresh = self.refresh().await;
                let formed = self.form(&fresh);
                for (queued, take) in formed.full {
                    self.stats.full.fetch_add(1, Ordering::Relaxed);
                    let _ = queued.reply.send(Committed::Full { take });
                }
                if !formed.placed.is_empty() {
                    self.send(&mut writing, formed.placed);
                    continue;
                }
                if writing.is_empty() && !self.pending.is_empty() {
                    // Nothing placed and nothing in flight: the members wait for slot streams
                    // marked for a strong read, which the next round makes.
                    continue;
                }
            }
            tokio::select! {
                queued = receiver.recv(), if open => match queued {
                    Some(queued) => self.pending.push_back(queued),
                    // The broker is gone: finish what is queued and in flight, then stop.
                    None => open = false,
                },
                Some(written) = writing.join_next(), if !writing.is_empty() => match written {
                    Ok(written) => self.answer(written),
                    // The write task cannot panic short of a bug; its members' requests then
                    // see the committer gone and treat the outcome as unknown.
                    Err(e) => tracing::error!(target: "allocate", error = %e, "a group write task failed"),
                },
                else => {
                    if self.pending.is_empty() {
                        return;
                    }
                }
            }
        }
    }

    /// Sends one group on its own task (bounded by the group deadline), marking what it writes
    /// as busy.
    fn send(&mut self, writing: &mut JoinSet<Written>, placed: Vec<Placed>) {
        self.stats.groups.fetch_add(1, Ordering::Relaxed);
        self.stats
            .members
            .fetch_add(placed.len() as u64, Ordering::Relaxed);
        for p in &placed {
            self.busy_keys
                .extend(p.events.iter().map(|e| (e.stream_id.clone(), e.version)));
            self.busy_streams
                .extend(p.queued.member.takes.iter().map(|t| t.stream_id.clone()));
        }
        let members: Vec<Vec<EventEnvelope>> = placed.iter().map(|p| p.events.clone()).collect();
        let events = Arc::clone(&self.events);
        let deadline = self.limits.deadline;
        writing.spawn(async move {
            let count = members.len();
            let outcomes = match tokio::time::timeout(deadline, events.append_group(members)).await
            {
                Ok(outcomes) => outcomes,
                // Abandoned, like a request that timed out during its append: the write may
                // still land, so every member's outcome is unknown.
                Err(_) => (0..count)
                    .map(|_| {
                        MemberOutcome::Failed(StoreError::Unavailable(format!(
                            "a group write took longer than {deadline:?}; outcome unknown"
                        )))
                    })
                    .collect(),
            };
            (placed, outcomes)
        });
    }

    /// Reads strongly every slot stream a waiting member needs that is stale or unknown (and
    /// not being written by a group in flight), all at once; returns the streams read. A member
    /// whose stream cannot be read is answered with the error (nothing of it was written).
    async fn refresh(&mut self) -> HashSet<String> {
        let mut wanted: HashMap<String, Option<u32>> = HashMap::new();
        for queued in &self.pending {
            for take in &queued.member.takes {
                let stale = self.stale.contains(&take.stream_id);
                let unseen = self.slots.get(&take.stream_id).is_none();
                // A cap stream never seen is assumed empty; it is read once it proves otherwise
                // (marked stale).
                let unknown = stale || (unseen && !take.prunable);
                if unknown && !self.busy_streams.contains(&take.stream_id) {
                    wanted
                        .entry(take.stream_id.clone())
                        .or_insert(take.prunable.then_some(take.limit));
                }
            }
        }
        let events = self.events.as_ref();
        let reads = wanted.into_iter().map(|(stream_id, prune_at)| async move {
            let read = read_fresh(events, &stream_id, prune_at).await;
            (stream_id, read)
        });
        let mut fresh = HashSet::new();
        for (stream_id, read) in futures::future::join_all(reads).await {
            match read {
                Ok(usage) => {
                    self.slots.offer(&stream_id, usage);
                    self.stale.remove(&stream_id);
                    fresh.insert(stream_id);
                }
                Err(e) => {
                    let error = match e {
                        BrokerError::Store(e) => e,
                        other => StoreError::Unavailable(other.to_string()),
                    };
                    let (failed, kept): (VecDeque<Queued>, VecDeque<Queued>) =
                        std::mem::take(&mut self.pending)
                            .into_iter()
                            .partition(|q| q.member.takes.iter().any(|t| t.stream_id == stream_id));
                    self.pending = kept;
                    for queued in failed {
                        let _ = queued.reply.send(Committed::Failed(error.clone()));
                    }
                }
            }
        }
        fresh
    }

    /// Forms the next group from the waiting members, in order: members that fit the item
    /// limit and write no item another member of the group (or a group in flight) writes, each
    /// taking its slots after the members before it. `fresh`: slot streams read strongly this
    /// round, the only counts that may refuse a member.
    fn form(&mut self, fresh: &HashSet<String>) -> Formed {
        let mut formed = Formed::default();
        let mut tails: HashMap<String, QuotaUsage> = HashMap::new();
        let mut keys: HashSet<(String, u64)> = HashSet::new();
        let mut items = 0usize;
        let mut later: VecDeque<Queued> = VecDeque::new();
        while let Some(queued) = self.pending.pop_front() {
            let member = &queued.member;
            // A member alone is always tried (the store refuses one that is too large itself).
            if items > 0 && items + member.items() > self.limits.max_items {
                later.push_back(queued);
                later.extend(self.pending.drain(..));
                break;
            }
            let collides = member.fixed.iter().any(|e| {
                let key = (e.stream_id.clone(), e.version);
                keys.contains(&key) || self.busy_keys.contains(&key)
            }) || member
                .takes
                .iter()
                .any(|t| self.busy_streams.contains(&t.stream_id));
            if collides {
                later.push_back(queued);
                continue;
            }
            let mut after: Vec<(String, QuotaUsage)> = Vec::new();
            let mut slot_events = Vec::new();
            let mut refusal: Option<usize> = None;
            let mut wait = false;
            for (i, take) in member.takes.iter().enumerate() {
                let known = after
                    .iter()
                    .rev()
                    .find(|(s, _)| *s == take.stream_id)
                    .map(|(_, u)| u.clone())
                    .or_else(|| tails.get(&take.stream_id).cloned())
                    .or_else(|| {
                        (!self.stale.contains(&take.stream_id))
                            .then(|| {
                                self.slots
                                    .get(&take.stream_id)
                                    .or_else(|| take.prunable.then(QuotaUsage::default))
                            })
                            .flatten()
                    });
                let Some(mut usage) = known else {
                    self.stale.insert(take.stream_id.clone());
                    wait = true;
                    break;
                };
                match usage.take(&member.sandbox_id, take.limit) {
                    Ok(event) => {
                        slot_events.extend(envelopes(
                            &take.stream_id,
                            usage.version,
                            std::slice::from_ref(&event),
                            &member.meta,
                            member.now,
                        ));
                        usage.fold(&event);
                        after.push((take.stream_id.clone(), usage));
                    }
                    Err(_) => {
                        if tails.contains_key(&take.stream_id) {
                            // Full only counting members of this group, which may yet fail:
                            // read it again once the group is answered (a busy stream is not
                            // read before), so the next round decides this member at once.
                            self.stale.insert(take.stream_id.clone());
                            wait = true;
                        } else if fresh.contains(&take.stream_id) {
                            refusal = Some(i);
                        } else {
                            self.stale.insert(take.stream_id.clone());
                            wait = true;
                        }
                        break;
                    }
                }
            }
            if let Some(take) = refusal {
                formed.full.push((queued, take));
                continue;
            }
            if wait {
                later.push_back(queued);
                continue;
            }
            items += member.items();
            keys.extend(
                member
                    .fixed
                    .iter()
                    .map(|e| (e.stream_id.clone(), e.version)),
            );
            for (stream_id, usage) in &after {
                tails.insert(stream_id.clone(), usage.clone());
            }
            let mut events = member.fixed.clone();
            events.extend(slot_events);
            formed.placed.push(Placed {
                queued,
                events,
                after,
            });
        }
        self.pending = later;
        formed
    }

    /// Answers (or queues again) each member of a written group, and frees what it wrote.
    fn answer(&mut self, (placed, outcomes): Written) {
        let mut again: Vec<Queued> = Vec::new();
        for (placed, outcome) in placed.into_iter().zip(outcomes) {
            let Placed {
                queued,
                events,
                after,
            } = placed;
            for e in &events {
                self.busy_keys.remove(&(e.stream_id.clone(), e.version));
            }
            for take in &queued.member.takes {
                self.busy_streams.remove(&take.stream_id);
            }
            let slot_conflict = match &outcome {
                MemberOutcome::Failed(StoreError::VersionConflict { stream_id }) => queued
                    .member
                    .takes
                    .iter()
                    .any(|t| t.stream_id == *stream_id)
                    .then(|| stream_id.clone()),
                _ => None,
            };
            match (outcome, slot_conflict) {
                (MemberOutcome::Stored, _) => {
                    for (stream_id, usage) in after {
                        self.slots.offer(&stream_id, usage);
                    }
                    let _ = queued.reply.send(Committed::Stored);
                }
                (MemberOutcome::Failed(_), Some(stream_id)) => {
                    // The stream moved (another instance, a release): read it again and decide
                    // this member again; its sandbox and claim are untouched.
                    self.stale.insert(stream_id);
                    again.push(queued);
                }
                (MemberOutcome::Orphaned, _) => again.push(queued),
                (MemberOutcome::Failed(e), None) => {
                    if !matches!(e, StoreError::VersionConflict { .. }) {
                        // The outcome is unknown: what this process knows of the member's slot
                        // streams may be wrong either way.
                        for take in &queued.member.takes {
                            self.stale.insert(take.stream_id.clone());
                        }
                    }
                    let _ = queued.reply.send(Committed::Failed(e));
                }
            }
        }
        // Decided again first, in their order, ahead of the members that arrived meanwhile.
        for mut queued in again.into_iter().rev() {
            queued.rounds += 1;
            if queued.rounds > QUOTA_RETRIES {
                let _ = queued.reply.send(Committed::Failed(StoreError::Unavailable(
                    "the quota streams of this allocation kept changing".into(),
                )));
                continue;
            }
            self.stats.redecided.fetch_add(1, Ordering::Relaxed);
            self.pending.push_front(queued);
        }
    }
}
