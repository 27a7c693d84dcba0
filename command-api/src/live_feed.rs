//! The live event stream of one API instance: a background task tails the store's [`EventFeed`]
//! (the same time-ordered index the paged audit feed reads) every [`TAIL_INTERVAL`] while somebody
//! listens and publishes each new event on a tokio broadcast channel; every open stream is a
//! `Session` state machine — replay from the feed when resuming or after falling behind, then
//! live — that sends what both deliver once. It works the same on both stores, and on DynamoDB it
//! does not take one of the two reader slots a stream shard allows (docs/adr/0005-live-feed.md).
//!
//! It knows the store only as `Arc<dyn EventFeed>`; the HTTP side (headers, status codes, the
//! paged audit endpoints) stays in `routes::events`.

use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::Event;
use chrono::{DateTime, Utc};
use domain::audit::{
    feed_key, position_time, EventFeed, FeedFilter, FeedQuery, FeedTail, FEED_PAGE, FUTURE_SLACK_S,
    TAIL_LOOKBACK_MS,
};
use domain::model::events::format_time;
use domain::store::StoreError;
use domain::{EventEnvelope, SharedClock};
use futures::Stream;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

/// How often the tail reads the feed for new events.
pub const TAIL_INTERVAL: Duration = Duration::from_millis(250);
/// Store calls one tail step may spend (a backlog is worked off over several steps).
const TAIL_MAX_PAGES: usize = 20;
/// Events buffered per subscriber before it counts as lagging (it then re-reads the feed).
pub const LIVE_CAPACITY: usize = 4096;
/// Keep-alive comment period of the stream (proxies drop idle connections).
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// A resumed stream remembers the keys it replayed this far behind the newest one, to drop
/// their live copies (a window well beyond the tail's lookback).
const REPLAY_DEDUP_WINDOW_MS: i64 = 60_000;
/// One event as the live stream sends it: its feed key (the SSE `id`) and its JSON (the `data`),
/// serialised once for every subscriber.
#[derive(Debug)]
pub struct LiveEvent {
    /// `{occurred_at}#{event_id}`.
    pub key: String,
    /// The envelope as JSON, with `key` added.
    pub json: String,
}

impl LiveEvent {
    fn new(envelope: &EventEnvelope) -> Self {
        let key = feed_key(envelope);
        let json = event_json(envelope, &key).to_string();
        Self { key, json }
    }

    fn to_sse(&self) -> Event {
        Event::default().id(&self.key).data(&self.json)
    }
}

/// The envelope as the feed endpoints return it: its fields plus `key`.
pub(crate) fn event_json(envelope: &EventEnvelope, key: &str) -> serde_json::Value {
    let mut value = serde_json::to_value(envelope).unwrap_or(serde_json::Value::Null);
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("key".into(), serde_json::Value::String(key.to_string()));
    }
    value
}

/// The audit feed of this instance: the store's [`EventFeed`] for paged reads, and the live
/// broadcast the tail task fills. Cheap to clone.
#[derive(Clone)]
pub struct EventsFeed {
    feed: Arc<dyn EventFeed>,
    live: broadcast::Sender<Arc<LiveEvent>>,
    closing: Arc<watch::Sender<bool>>,
    /// One permit per open stream (`SSE_MAX_SUBSCRIBERS`).
    subscribers: Arc<tokio::sync::Semaphore>,
    limits: LiveLimits,
}

/// Bounds on the live streams of one instance.
#[derive(Debug, Clone, Copy)]
pub struct LiveLimits {
    /// Open streams at once; one more is answered 503 with `Retry-After` (`SSE_MAX_SUBSCRIBERS`).
    pub max_subscribers: usize,
    /// A stream ends after this long; the client reconnects with its `Last-Event-ID` and loses
    /// nothing (`SSE_MAX_LIFETIME_SEC`).
    pub max_lifetime: Duration,
}

impl Default for LiveLimits {
    fn default() -> Self {
        Self {
            max_subscribers: 64,
            max_lifetime: Duration::from_secs(3600),
        }
    }
}

impl std::fmt::Debug for EventsFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsFeed")
            .field("subscribers", &self.live.receiver_count())
            .finish_non_exhaustive()
    }
}

impl EventsFeed {
    /// A feed over `feed` (the tail is started by [`start_live_feed`]).
    pub fn new(feed: Arc<dyn EventFeed>) -> Self {
        Self::with_limits(feed, LiveLimits::default())
    }

    /// A feed over `feed` with explicit stream limits.
    pub fn with_limits(feed: Arc<dyn EventFeed>, limits: LiveLimits) -> Self {
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        let (closing, _) = watch::channel(false);
        Self {
            feed,
            live,
            closing: Arc::new(closing),
            subscribers: Arc::new(tokio::sync::Semaphore::new(limits.max_subscribers.max(1))),
            limits,
        }
    }

    /// The store's feed.
    pub fn feed(&self) -> &Arc<dyn EventFeed> {
        &self.feed
    }

    /// Ends every open stream (at shutdown: the server's graceful drain waits for open responses,
    /// and a live stream never finishes by itself).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// The most streams open at once.
    pub fn max_subscribers(&self) -> usize {
        self.limits.max_subscribers
    }

    /// A receiver of the live broadcast, for an in-process reader (the waiting line): it keeps
    /// the tail reading the feed while it is held, and takes no stream slot.
    pub fn subscribe_live(&self) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.live.subscribe()
    }

    /// Opens one client's stream: replays the events after `resume` (when given) from the feed,
    /// then follows the live broadcast; without `resume` it starts at `clock`'s now. `None` when
    /// [`LiveLimits::max_subscribers`] streams are already open.
    pub async fn open(
        &self,
        clock: SharedClock,
        resume: Option<String>,
    ) -> Option<Result<impl Stream<Item = Result<Event, Infallible>>, StoreError>> {
        let Ok(permit) = Arc::clone(&self.subscribers).try_acquire_owned() else {
            return None;
        };
        // A resume point before the first event would make a store that reads the history bucket
        // by bucket (DynamoDB: one query per hour) walk every empty hour back to it: start just
        // before the first event instead, which replays exactly the same events.
        let resume = match resume {
            Some(position) => match self.clamp_to_history(position, clock.now()).await {
                Ok(position) => Some(position),
                Err(e) => return Some(Err(e)),
            },
            None => None,
        };
        // Subscribe before reading the replay, so nothing recorded in between is lost; what both
        // deliver is sent once (see `Session::next`).
        let session = Session {
            _permit: permit,
            ends_at: tokio::time::Instant::now() + self.limits.max_lifetime,
            feed: Arc::clone(&self.feed),
            live: self.live.subscribe(),
            closing: self.closing.subscribe(),
            pending: VecDeque::new(),
            position: resume.clone().unwrap_or_else(|| format_time(&clock.now())),
            resumed_after: resume.clone(),
            replay_from: resume,
            replayed: BTreeSet::new(),
            clock,
        };
        Some(Ok(futures::stream::unfold(session, Session::next)))
    }

    /// `position`, or a position just before the first event when it lies before all history
    /// (or the store is empty: then a minute before `now`).
    async fn clamp_to_history(
        &self,
        position: String,
        now: DateTime<Utc>,
    ) -> Result<String, StoreError> {
        let Some(at) = position_time(&position) else {
            return Ok(position);
        };
        let floor = match self.feed.first_event_time().await? {
            Some(first) => first - chrono::Duration::milliseconds(1),
            None => now - chrono::Duration::minutes(1),
        };
        Ok(if at < floor {
            format_time(&floor)
        } else {
            position
        })
    }

    /// Closes the streams once `signal` resolves.
    pub fn close_on(&self, signal: impl Future<Output = ()> + Send + 'static) {
        let feed = self.clone();
        tokio::spawn(async move {
            signal.await;
            feed.close();
        });
    }
}

/// Starts the tail of `feed` (whichever store serves it) and returns the instance's live feed;
/// the task stops (and closes the open streams) when `shutdown` resolves.
pub fn start_live_feed(
    feed: Arc<dyn EventFeed>,
    clock: SharedClock,
    limits: LiveLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (EventsFeed, JoinHandle<()>) {
    let events = EventsFeed::with_limits(feed, limits);
    let task = tokio::spawn(run_tail(events.clone(), clock, shutdown));
    (events, task)
}

/// Tails the feed and broadcasts each new event, until `shutdown`.
async fn run_tail(
    events: EventsFeed,
    clock: SharedClock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(shutdown);
    // The tail reads the store only while somebody listens: an idle instance makes no feed
    // requests. It (re)starts a second before the first subscriber was noticed — within one
    // interval of its subscription — so the subscriber misses nothing recorded after it
    // subscribed (a resuming subscriber replays the gap from the feed itself).
    let mut tail: Option<FeedTail> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TAIL_INTERVAL) => {}
            _ = &mut shutdown => {
                events.close();
                return;
            }
        }
        if events.live.receiver_count() == 0 {
            tail = None;
            continue;
        }
        let tail = tail.get_or_insert_with(|| {
            FeedTail::after(format_time(&(clock.now() - chrono::Duration::seconds(1))))
        });
        match tail
            .poll(events.feed.as_ref(), clock.now(), TAIL_MAX_PAGES)
            .await
        {
            Ok(fresh) => {
                for envelope in &fresh {
                    // No subscriber is not an error: the event is simply not sent anywhere.
                    let _ = events.live.send(Arc::new(LiveEvent::new(envelope)));
                }
            }
            Err(e) => {
                tracing::warn!(target: "live_feed", error = %e, "reading the event feed failed; retrying")
            }
        }
    }
}

/// One client's stream: replay (when resuming or after falling behind), then live.
struct Session {
    /// Held while the stream is open (the subscriber cap).
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// The stream ends here; the client reconnects with its `Last-Event-ID`.
    ends_at: tokio::time::Instant,
    feed: Arc<dyn EventFeed>,
    clock: SharedClock,
    live: broadcast::Receiver<Arc<LiveEvent>>,
    closing: watch::Receiver<bool>,
    /// Replayed events not sent yet.
    pending: VecDeque<Arc<LiveEvent>>,
    /// The last position sent (or the start).
    position: String,
    /// The client's resume position (`Last-Event-ID`), when it resumed: it had every event up to
    /// there before this stream opened.
    resumed_after: Option<String>,
    /// Where the replay continues; `None` once live.
    replay_from: Option<String>,
    /// Keys replayed recently: their live copies are dropped.
    replayed: BTreeSet<String>,
}

impl Session {
    /// The next event to send, or `None` when the stream ends (shutdown, lifetime, a failed
    /// replay read, or the broadcast closing).
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            if *self.closing.borrow() || tokio::time::Instant::now() >= self.ends_at {
                return None;
            }
            if let Some(item) = self.pending.pop_front() {
                self.position.clone_from(&item.key);
                return Some((Ok(item.to_sse()), self));
            }
            if let Some(after) = self.replay_from.take() {
                let query = FeedQuery {
                    after,
                    until: self.clock.now() + chrono::Duration::seconds(FUTURE_SLACK_S),
                    filter: FeedFilter::default(),
                };
                match self.feed.feed(&query, FEED_PAGE).await {
                    Ok(page) => {
                        for envelope in &page.events {
                            let item = Arc::new(LiveEvent::new(envelope));
                            self.replayed.insert(item.key.clone());
                            self.pending.push_back(item);
                        }
                        self.replay_from = page.next;
                        self.forget_old_replays();
                    }
                    Err(e) => {
                        // End the stream; the client reconnects with its Last-Event-ID.
                        tracing::warn!(target: "live_feed", error = %e, "replay failed; closing the stream");
                        return None;
                    }
                }
                continue;
            }
            tokio::select! {
                received = self.live.recv() => match received {
                    Ok(item) => {
                        if sent_before(&mut self.replayed, self.resumed_after.as_deref(), &item.key) {
                            continue;
                        }
                        self.position.clone_from(&item.key);
                        return Some((Ok(item.to_sse()), self));
                    }
                    // Fell behind the broadcast buffer: re-read the feed after what was sent.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.replay_from = Some(self.position.clone());
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                changed = self.closing.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(self.ends_at) => return None,
            }
        }
    }

    fn forget_old_replays(&mut self) {
        let newest = self.replayed.last().and_then(|k| position_time(k));
        if let Some(newest) = newest {
            let keep_from = format_time(
                &(newest
                    - chrono::Duration::milliseconds(REPLAY_DEDUP_WINDOW_MS.max(TAIL_LOOKBACK_MS))),
            );
            self.replayed = self.replayed.split_off(&keep_from);
        }
    }
}

/// Whether a live event was already sent to this client: replayed on this stream, or at or before
/// the position it resumed from. The tail publishes an event when it first reads it, which can be
/// after a stream that ended sent it from the replay; the client's next stream must not send it
/// again (its replay reads only after the resume position, so it never carries such an event).
fn sent_before(replayed: &mut BTreeSet<String>, resumed_after: Option<&str>, key: &str) -> bool {
    replayed.remove(key) || resumed_after.is_some_and(|after| key <= after)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A late broadcast of an event at or before the resume position is dropped, a replayed
    /// event's live copy is dropped once, and a new event goes out.
    #[test]
    fn a_resumed_stream_drops_what_the_client_already_had() {
        let t = format_time(&Utc::now());
        let key = |n: u8| format!("{t}#{n:02}");
        let mut replayed = BTreeSet::from([key(5)]);
        let resumed = Some(key(3));
        assert!(sent_before(&mut replayed, resumed.as_deref(), &key(1)));
        assert!(sent_before(&mut replayed, resumed.as_deref(), &key(3)));
        assert!(sent_before(&mut replayed, resumed.as_deref(), &key(5)));
        assert!(!sent_before(&mut replayed, resumed.as_deref(), &key(5)));
        assert!(!sent_before(&mut replayed, resumed.as_deref(), &key(7)));
        // A stream opened without a resume position drops only its replays' live copies.
        assert!(!sent_before(&mut BTreeSet::new(), None, &key(1)));
    }
}
