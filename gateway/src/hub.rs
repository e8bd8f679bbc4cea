//! Fan-out of results to clients: ordering per tenant, a cache of recent results per tenant
//! stream, and one conflating mailbox per client.
//!
//! ```text
//!  ResultFrame ─▶ Hub::publish ─▶ older epoch, or (run, seq) already seen? ─▶ dropped (counted)
//!                     │
//!                     ├─▶ cache[tenant][stream] += result     (snapshots for new subscribers:
//!                     │                                        the latest, or a series' newest
//!                     │                                        SERIES_KEPT, of the current run)
//!                     └─▶ for each subscriber of (tenant, stream): Mailbox::offer
//!                              a bounded queue per stream: a newer result replaces an
//!                              unsent older one (conflation; a series keeps its newest
//!                              SERIES_KEPT), so a slow client gets fewer, fresher
//!                              results and its memory stays bounded
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use clickpulse_protocol::Tenant;
use clickpulse_protocol::results::{Admit, Order, Stream};
use clickpulse_protocol::ws::{Position, SERIES_KEPT};
use clickpulse_protocol::zmq::ResultFrame;
use futures_util::task::AtomicWaker;
use rustc_hash::FxHashMap;

/// Capacity up to which an emptied stream queue is kept for the next message.
const KEPT_CAPACITY: usize = 4;

/// How long a tenant nobody watches keeps its series' recent results (for a page reload, a
/// reconnect) before they are trimmed to the latest one: every tenant a gateway has served
/// would otherwise hold up to [`SERIES_KEPT`] results per series for good.
const UNWATCHED_HISTORY: Duration = Duration::from_secs(60);
/// How often the hub looks for such tenants (on its next call after that long).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// What became of a published frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Accepted; offered to this many subscribers.
    Delivered(usize),
    /// Its `(run, seq)` was already delivered (a result re-emitted after a restore).
    Duplicate,
    /// It comes from an older epoch than the tenant's newest: a fenced-off engine.
    StaleEpoch,
}

/// One message for a client: its stream, and the text sent for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub stream: Stream,
    /// The WebSocket text sent for it (`ServerMsg::Result` around the engine's JSON),
    /// rendered once and shared by every client it goes to (one reference count per client,
    /// where a copy of the JSON beside it, read by nothing but tests, was a second).
    pub text: Utf8Bytes,
}

/// What [`Outgoing::new`] puts before the engine's JSON, by `snapshot`.
const RESULT_HEAD: [&str; 2] = [
    r#"{"type":"result","snapshot":false,"result":"#,
    r#"{"type":"result","snapshot":true,"result":"#,
];

impl Outgoing {
    /// The engine's result `json` as the protocol's `ServerMsg::Result`, built around it
    /// without re-parsing it.
    pub fn new(stream: Stream, json: &str, snapshot: bool) -> Self {
        let head = RESULT_HEAD[usize::from(snapshot)];
        let mut text = String::with_capacity(head.len() + json.len() + 1);
        text.push_str(head);
        text.push_str(json);
        text.push('}');
        Outgoing {
            stream,
            text: text.into(),
        }
    }

    /// The engine's JSON inside the text, and whether it is a snapshot.
    #[cfg(test)]
    fn result(&self) -> (&str, bool) {
        let text = self.text.as_str();
        let snapshot = text.starts_with(RESULT_HEAD[1]);
        let json = &text[RESULT_HEAD[usize::from(snapshot)].len()..text.len() - 1];
        (json, snapshot)
    }

    /// The engine's JSON inside the text.
    #[cfg(test)]
    fn json(&self) -> &str {
        self.result().0
    }
}

impl Slots {
    fn queue(&mut self, stream: Stream) -> Option<&mut VecDeque<Outgoing>> {
        self.pending
            .iter_mut()
            .find(|(s, _)| *s == stream)
            .map(|(_, queue)| queue)
    }

    /// The stream's queue, made when it has none: room for one message, which is all a
    /// stream that is not a series ever holds.
    fn queue_or_new(&mut self, stream: Stream) -> &mut VecDeque<Outgoing> {
        let at = match self.pending.iter().position(|(s, _)| *s == stream) {
            Some(at) => at,
            None => {
                self.pending.reserve_exact(1);
                self.pending.push((stream, VecDeque::with_capacity(1)));
                self.pending.len() - 1
            }
        };
        &mut self.pending[at].1
    }

    fn remove_queue(&mut self, stream: Stream) -> bool {
        let before = self.pending.len();
        self.pending.retain(|(s, _)| *s != stream);
        self.pending.len() != before
    }
}

#[derive(Debug, Default)]
struct Slots {
    /// Streams with something pending, the one waiting longest first.
    order: VecDeque<Stream>,
    /// Unsent messages per stream, oldest first: one at most, or [`SERIES_KEPT`] for a
    /// series ([`Stream::is_series`]); an emptied queue stays for the stream's next message
    /// unless a burst grew it past [`KEPT_CAPACITY`]. A list looked through, not a map: a
    /// client has a few streams, and every client that has had a result keeps it (a map's
    /// smallest table was 192 bytes, this is 48 a stream).
    /// A client that falls behind holds at most 2 × [`SERIES_KEPT`] + 3 [`Outgoing`]s of 40
    /// bytes here (24 KB; the texts are shared with every other client).
    pending: Vec<(Stream, VecDeque<Outgoing>)>,
    /// Since when messages have been pending without one being taken: how long the client
    /// has made no progress.
    backlog_since: Option<Instant>,
    /// The client's rate cap: at most one message per stream per interval.
    min_interval: Option<Duration>,
    /// When each stream was last sent, kept only under a rate cap (a stream not in it may
    /// go at once).
    last_sent: FxHashMap<Stream, Instant>,
    closed: bool,
    /// Closed because the gateway is shutting down (not because the client left).
    going_away: bool,
}

/// A client's outgoing queue: at most one pending message per stream, or the newest
/// [`SERIES_KEPT`] of a series (so a bounded number in all); streams are served in turn.
#[derive(Debug, Default)]
pub struct Mailbox {
    slots: Mutex<Slots>,
    signal: Signal,
    conflated: AtomicU64,
}

/// Wakes the one task reading a mailbox: a flag and that task's waker. (tokio's `Notify`
/// keeps a list of waiters under a lock, taken to register and again to drop a waiter:
/// about 6 % of the gateway's CPU in a fan-out to 10,000 clients, for a single reader.)
#[derive(Debug, Default)]
struct Signal {
    raised: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    /// Wakes the reader, or makes its next wait return at once.
    fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Forgets an earlier raise: called before the reader looks at the slots, so that only
    /// a change after that look ends its next wait.
    fn lower(&self) {
        self.raised.store(false, Ordering::Release);
    }

    /// Waits for a raise (since the last [`Signal::lower`] or wait).
    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.raised.swap(false, Ordering::AcqRel) {
                return std::task::Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A raise between the check and the registration woke nobody: look again.
            if self.raised.swap(false, Ordering::AcqRel) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the data half-updated in a way that
    // matters (plain inserts), so a poisoned lock is still used.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Mailbox {
    pub fn new() -> Arc<Self> {
        Arc::new(Mailbox::default())
    }

    /// Queues a message, replacing an unsent one of the same stream; true when it replaced
    /// one (conflation).
    pub fn offer(&self, msg: Outgoing) -> bool {
        self.offer_at(msg, Instant::now())
    }

    /// [`Mailbox::offer`] at `now`: a result offered to thousands reads the clock once.
    fn offer_at(&self, msg: Outgoing, now: Instant) -> bool {
        let mut s = lock(&self.slots);
        if s.closed {
            return false;
        }
        if s.order.is_empty() {
            s.backlog_since = Some(now);
        }
        let stream = msg.stream;
        let keep = if stream.is_series() { SERIES_KEPT } else { 1 };
        let queue = s.queue_or_new(stream);
        let was_empty = queue.is_empty();
        let replaced = queue.len() >= keep;
        if replaced {
            queue.pop_front();
            self.conflated.fetch_add(1, Ordering::Relaxed);
        }
        queue.push_back(msg);
        // A stream is in `order` exactly while it has something pending.
        if was_empty {
            s.order.push_back(stream);
        }
        drop(s);
        self.signal.raise();
        replaced
    }

    /// Drops pending messages of `stream` (after an unsubscribe).
    pub fn discard(&self, stream: Stream) {
        let mut s = lock(&self.slots);
        if s.remove_queue(stream) {
            s.order.retain(|x| *x != stream);
        }
        if s.order.is_empty() {
            s.backlog_since = None;
        }
    }

    /// Caps how often each stream is sent to this client (`None`: as fast as it reads).
    pub fn set_min_interval(&self, interval: Option<Duration>) {
        let mut s = lock(&self.slots);
        s.min_interval = interval;
        if interval.is_none() {
            s.last_sent = FxHashMap::default();
        }
        drop(s);
        self.signal.raise();
    }

    /// The oldest pending message whose stream may be sent at `now`; otherwise, when the
    /// next one may be (if any is pending).
    fn take_due(&self, now: Instant) -> (Option<Outgoing>, Option<Instant>) {
        let mut s = lock(&self.slots);
        let mut next_due: Option<Instant> = None;
        let mut pick = None;
        for (i, stream) in s.order.iter().enumerate() {
            let due = s
                .min_interval
                .and_then(|iv| s.last_sent.get(stream).map(|t| *t + iv))
                .filter(|due| *due > now);
            match due {
                Some(due) => next_due = Some(next_due.map_or(due, |n| n.min(due))),
                None => {
                    pick = Some(i);
                    break;
                }
            }
        }
        let Some(i) = pick else {
            return (None, next_due);
        };
        let Some(stream) = s.order.remove(i) else {
            return (None, None);
        };
        let (msg, more, grown) = match s.queue(stream) {
            Some(queue) => (
                queue.pop_front(),
                !queue.is_empty(),
                queue.capacity() > KEPT_CAPACITY,
            ),
            None => (None, false, false),
        };
        if more {
            // Its next one waits behind the other streams' (and the rate cap).
            s.order.push_back(stream);
        } else if grown {
            // A burst's queue goes: kept, every client that had one would hold its size
            // (up to SERIES_KEPT results) while idle again.
            s.remove_queue(stream);
        }
        // Otherwise an emptied queue stays, allocated, for the stream's next message:
        // dropping and reallocating it was a free and a malloc per result per client.
        // Without a cap nothing reads it: no map per client, no insert per result.
        if msg.is_some() && s.min_interval.is_some() {
            s.last_sent.insert(stream, now);
        }
        s.backlog_since = (!s.order.is_empty()).then_some(now);
        (msg, None)
    }

    /// The oldest pending message that may be sent now, if any.
    pub fn take(&self) -> Option<Outgoing> {
        self.take_due(Instant::now()).0
    }

    /// Waits for the next message that may be sent; `None` once closed.
    pub async fn next(&self) -> Option<Outgoing> {
        loop {
            self.signal.lower();
            let (msg, next_due) = self.take_due(Instant::now());
            if let Some(msg) = msg {
                return Some(msg);
            }
            if lock(&self.slots).closed {
                return None;
            }
            match next_due {
                Some(due) => {
                    // Boxed: only a rate-capped client waits on a timer here, and this future
                    // is part of every client's (counted in bytes while idle).
                    let sleep = Box::pin(tokio::time::sleep_until(due.into()));
                    tokio::select! {
                        () = self.signal.wait() => {}
                        () = sleep => {}
                    }
                }
                None => self.signal.wait().await,
            }
        }
    }

    /// How long the client has had unsent messages without catching up.
    pub fn backlog_age(&self) -> Option<Duration> {
        lock(&self.slots).backlog_since.map(|t| t.elapsed())
    }

    pub fn conflated(&self) -> u64 {
        self.conflated.load(Ordering::Relaxed)
    }

    pub fn close(&self) {
        lock(&self.slots).closed = true;
        self.signal.raise();
    }

    /// Closes the mailbox because the gateway shuts down: [`Mailbox::next`] hands out what
    /// is pending, then `None`, and [`Mailbox::going_away`] says why.
    pub fn shut_down(&self) {
        lock(&self.slots).going_away = true;
        self.close();
    }

    /// Whether [`Mailbox::shut_down`] closed it.
    pub fn going_away(&self) -> bool {
        lock(&self.slots).going_away
    }
}

/// A set of streams, a bit each: what a client is subscribed to, kept by every client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamSet(u8);

// One bit per stream.
const _: () = assert!(Stream::ALL.len() <= 8);

impl StreamSet {
    fn bit(stream: Stream) -> u8 {
        1 << (stream as u8)
    }

    pub fn contains(self, stream: Stream) -> bool {
        self.0 & Self::bit(stream) != 0
    }

    pub fn insert(&mut self, stream: Stream) {
        self.0 |= Self::bit(stream);
    }

    pub fn remove(&mut self, stream: Stream) {
        self.0 &= !Self::bit(stream);
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The streams in the set, in [`Stream::ALL`]'s order.
    pub fn to_vec(self) -> Vec<Stream> {
        Stream::ALL
            .into_iter()
            .filter(|&s| self.contains(s))
            .collect()
    }
}

impl FromIterator<Stream> for StreamSet {
    fn from_iter<I: IntoIterator<Item = Stream>>(streams: I) -> Self {
        let mut set = StreamSet::default();
        for s in streams {
            set.insert(s);
        }
        set
    }
}

/// A client of the hub: joined while it is connected, subscribed to none or more streams.
#[derive(Debug)]
struct Client {
    streams: StreamSet,
    mailbox: Arc<Mailbox>,
    /// A resuming client's last result: nothing at or before it is sent to it.
    after: Option<Position>,
}

impl Client {
    fn has(&self, at: Position) -> bool {
        self.after.is_some_and(|after| at <= after)
    }
}

#[derive(Debug, Default)]
struct TenantState {
    /// The newest epoch heard from and the last `(run, seq)` accepted.
    order: Order,
    /// Results of the current run kept for new subscribers, oldest first, as snapshot texts.
    cache: Cache,
    /// Since when the tenant has had no clients, as the last sweep saw it.
    unwatched_since: Option<Instant>,
    /// Every connected client of the tenant, by id (the gateway's own numbers: no hash
    /// flooding to fear, here or in the per-stream maps).
    clients: FxHashMap<u64, Client>,
}

/// A tenant's recent results, the snapshots a subscriber gets: of the run of the newest
/// result only (runs only grow), the latest of each stream and the newest [`SERIES_KEPT`] of a
/// series.
#[derive(Debug, Default)]
struct Cache {
    run: u64,
    streams: FxHashMap<Stream, VecDeque<(Position, Utf8Bytes)>>,
}

impl Cache {
    fn keep(&mut self, stream: Stream, at: Position, json: &str) {
        if at.run != self.run {
            // A job started afresh: the last one's results are not what the tenant shows now.
            self.streams.clear();
            self.run = at.run;
        }
        let kept = self.streams.entry(stream).or_default();
        if kept.len() >= if stream.is_series() { SERIES_KEPT } else { 1 } {
            kept.pop_front();
        }
        kept.push_back((at, Outgoing::new(stream, json, true).text));
    }

    /// Trims each series to its latest result, and gives the memory back.
    fn trim(&mut self) {
        for kept in self.streams.values_mut() {
            let surplus = kept.len().saturating_sub(1);
            kept.drain(..surplus);
            kept.shrink_to_fit();
        }
    }
}

#[derive(Debug)]
struct Tenants {
    by_name: HashMap<Tenant, TenantState>,
    /// Set by [`Hub::shut_down`]: a client joining later is shut down at once.
    shutting_down: bool,
    last_sweep: Instant,
}

impl Default for Tenants {
    fn default() -> Self {
        Tenants {
            by_name: HashMap::new(),
            shutting_down: false,
            last_sweep: Instant::now(),
        }
    }
}

impl Tenants {
    /// Trims the cache of every tenant that has had no clients for [`UNWATCHED_HISTORY`];
    /// at most once per [`SWEEP_EVERY`], so that it costs nothing per call. A tenant counts as
    /// unwatched from the first sweep that finds it so.
    fn sweep(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        for t in self.by_name.values_mut() {
            if !t.clients.is_empty() {
                t.unwatched_since = None;
                continue;
            }
            let since = *t.unwatched_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= UNWATCHED_HISTORY {
                t.cache.trim();
            }
        }
    }
}

/// Counters of the hub, for metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    pub accepted: AtomicU64,
    /// Results that replaced an unsent older one in a client's mailbox.
    pub conflated: AtomicU64,
    pub duplicates: AtomicU64,
    pub stale_epochs: AtomicU64,
}

/// All tenants' results and connected clients of one gateway: the one registry of clients
/// (fan-out reaches them through it, and so does shutdown).
#[derive(Debug, Default)]
pub struct Hub {
    tenants: Mutex<Tenants>,
    pub stats: HubStats,
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Hub::default())
    }

    /// Accepts a result frame if it is newer than what the tenant has seen, caches it, and
    /// offers it to the subscribers of its stream.
    pub fn publish(&self, frame: &ResultFrame) -> Published {
        let mut tenants = lock(&self.tenants);
        let t = tenants.by_name.entry(frame.tenant.clone()).or_default();
        match t.order.admit(frame.epoch, frame.run, frame.seq) {
            Admit::Deliver => {}
            Admit::StaleEpoch => {
                self.stats.stale_epochs.fetch_add(1, Ordering::Relaxed);
                return Published::StaleEpoch;
            }
            Admit::Duplicate => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return Published::Duplicate;
            }
        }
        let at = Position {
            run: frame.run,
            seq: frame.seq,
        };
        let json = String::from_utf8_lossy(&frame.json);
        t.cache.keep(frame.stream, at, &json);
        let mut delivered = 0;
        let live = Outgoing::new(frame.stream, &json, false);
        let now = Instant::now();
        for sub in t.clients.values() {
            if sub.streams.contains(frame.stream) && !sub.has(at) {
                let replaced = sub.mailbox.offer_at(live.clone(), now);
                if replaced {
                    self.stats.conflated.fetch_add(1, Ordering::Relaxed);
                }
                delivered += 1;
            }
        }
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        tenants.sweep(now);
        Published::Delivered(delivered)
    }

    /// Adds a connected client, subscribed to nothing yet; once [`Hub::shut_down`] has run,
    /// its mailbox is shut down at once (under the same lock as the sweep: none is missed).
    pub fn join(&self, tenant: &Tenant, client: u64, mailbox: &Arc<Mailbox>) {
        let mut tenants = lock(&self.tenants);
        if tenants.shutting_down {
            mailbox.shut_down();
        }
        let t = tenants.by_name.entry(tenant.clone()).or_default();
        t.clients.insert(
            client,
            Client {
                streams: StreamSet::default(),
                mailbox: mailbox.clone(),
                after: None,
            },
        );
    }

    /// Adds streams to a joined client's subscription and queues their snapshots at once: of
    /// the tenant's current run, the latest result of each stream and the newest
    /// [`SERIES_KEPT`] of a series. `after` (a resuming client's last result) holds back
    /// everything up to it. A client that has not joined (or has left) is ignored.
    pub fn subscribe(
        &self,
        tenant: &Tenant,
        client: u64,
        streams: &[Stream],
        after: Option<Position>,
    ) {
        let mut tenants = lock(&self.tenants);
        let Some(t) = tenants.by_name.get_mut(tenant) else {
            return;
        };
        let Some(sub) = t.clients.get_mut(&client) else {
            return;
        };
        if after.is_some() {
            sub.after = after.max(sub.after);
        }
        for &stream in streams {
            sub.streams.insert(stream);
            for (at, text) in t.cache.streams.get(&stream).into_iter().flatten() {
                if !sub.has(*at) {
                    sub.mailbox.offer(Outgoing {
                        stream,
                        text: text.clone(),
                    });
                }
            }
        }
    }

    pub fn unsubscribe(&self, tenant: &Tenant, client: u64, streams: &[Stream]) {
        let mut tenants = lock(&self.tenants);
        if let Some(sub) = tenants
            .by_name
            .get_mut(tenant)
            .and_then(|t| t.clients.get_mut(&client))
        {
            for &s in streams {
                sub.streams.remove(s);
                sub.mailbox.discard(s);
            }
        }
    }

    /// Forgets a client that left.
    pub fn remove(&self, tenant: &Tenant, client: u64) {
        let mut tenants = lock(&self.tenants);
        if let Some(t) = tenants.by_name.get_mut(tenant) {
            t.clients.remove(&client);
        }
        tenants.sweep(Instant::now());
    }

    /// Shuts down every client's mailbox, and those of clients joining from now on: each
    /// client gets what is pending, then 1001 (the gateway is shutting down). Shutdown
    /// reaches clients through their mailboxes because a shutdown waiter in each client's
    /// loop was registered and dropped with every result sent: a lock that all 10,000
    /// clients of a fan-out took twice per update.
    pub fn shut_down(&self) {
        let mut tenants = lock(&self.tenants);
        tenants.shutting_down = true;
        for t in tenants.by_name.values() {
            for sub in t.clients.values() {
                sub.mailbox.shut_down();
            }
        }
    }

    /// Clients of a tenant subscribed to at least one stream.
    pub fn subscribers(&self, tenant: &Tenant) -> usize {
        lock(&self.tenants).by_name.get(tenant).map_or(0, |t| {
            t.clients.values().filter(|s| !s.streams.is_empty()).count()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tenant: &str, epoch: u64, seq: u64, stream: Stream, body: &str) -> ResultFrame {
        in_run(tenant, epoch, 1, seq, stream, body)
    }

    fn in_run(
        tenant: &str,
        epoch: u64,
        run: u64,
        seq: u64,
        stream: Stream,
        body: &str,
    ) -> ResultFrame {
        ResultFrame {
            tenant: Tenant::new(tenant).unwrap(),
            epoch,
            run,
            seq,
            stream,
            json: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn duplicates_and_older_epochs_are_dropped() {
        let hub = Hub::new();
        assert_eq!(
            hub.publish(&frame("acme", 2, 5, Stream::TopN, "a")),
            Published::Delivered(0)
        );
        assert_eq!(
            hub.publish(&frame("acme", 2, 5, Stream::TopN, "a")),
            Published::Duplicate
        );
        assert_eq!(
            hub.publish(&frame("acme", 2, 4, Stream::TopN, "a")),
            Published::Duplicate
        );
        assert_eq!(
            hub.publish(&frame("acme", 1, 9, Stream::TopN, "a")),
            Published::StaleEpoch
        );
        // A new owner resumed the run from a checkpoint: what it re-emits is dropped, what is
        // new goes out, and the old owner is fenced off from then on.
        assert_eq!(
            hub.publish(&frame("acme", 3, 4, Stream::TopN, "a")),
            Published::Duplicate
        );
        assert_eq!(
            hub.publish(&frame("acme", 3, 6, Stream::TopN, "b")),
            Published::Delivered(0)
        );
        assert_eq!(
            hub.publish(&frame("acme", 2, 7, Stream::TopN, "zombie")),
            Published::StaleEpoch
        );
        // A fresh start begins a new run, numbered from 1.
        assert_eq!(
            hub.publish(&in_run("acme", 4, 4, 1, Stream::TopN, "c")),
            Published::Delivered(0)
        );
        // tenants are independent
        assert_eq!(
            hub.publish(&frame("globex", 1, 1, Stream::TopN, "c")),
            Published::Delivered(0)
        );
    }

    #[test]
    fn a_stream_set_holds_each_stream_once_in_a_fixed_order() {
        let mut set: StreamSet = [Stream::Totals, Stream::TopN, Stream::Totals]
            .into_iter()
            .collect();
        assert_eq!(set.to_vec(), [Stream::TopN, Stream::Totals]);
        assert!(set.contains(Stream::TopN) && !set.contains(Stream::Window));
        set.remove(Stream::TopN);
        set.remove(Stream::Window);
        assert_eq!(set.to_vec(), [Stream::Totals]);
        set.remove(Stream::Totals);
        assert!(set.is_empty());
        let all: StreamSet = Stream::ALL.into_iter().collect();
        assert_eq!(all.to_vec(), Stream::ALL);
    }

    #[test]
    fn a_subscriber_gets_the_latest_value_at_once_then_live_results_of_its_streams_only() {
        let hub = Hub::new();
        let acme = Tenant::new("acme").unwrap();
        hub.publish(&frame("acme", 1, 1, Stream::TopN, "old"));
        hub.publish(&frame("acme", 1, 2, Stream::TopN, "latest"));
        let mailbox = Mailbox::new();
        hub.join(&acme, 7, &mailbox);
        hub.subscribe(&acme, 7, &[Stream::TopN, Stream::Sessions], None);
        let snap = mailbox.take().unwrap();
        assert_eq!(
            (snap.stream, snap.result()),
            (Stream::TopN, ("latest", true))
        );
        assert_eq!(mailbox.take(), None, "no sessions result yet");
        hub.publish(&frame("acme", 1, 3, Stream::Window, "not subscribed"));
        hub.publish(&frame("globex", 1, 4, Stream::TopN, "other tenant"));
        assert_eq!(mailbox.take(), None);
        hub.publish(&frame("acme", 1, 5, Stream::Sessions, "live"));
        let live = mailbox.take().unwrap();
        assert_eq!(live.result(), ("live", false));
        hub.unsubscribe(&acme, 7, &[Stream::Sessions]);
        hub.publish(&frame("acme", 1, 6, Stream::Sessions, "after"));
        assert_eq!(mailbox.take(), None);
    }

    /// Everything in a mailbox, as (stream, JSON, snapshot).
    fn drain(mailbox: &Mailbox) -> Vec<(Stream, String, bool)> {
        std::iter::from_fn(|| mailbox.take())
            .map(|m| {
                let (json, snapshot) = m.result();
                (m.stream, json.to_owned(), snapshot)
            })
            .collect()
    }

    #[test]
    fn a_subscriber_gets_a_series_newest_results_and_the_latest_of_the_rest() {
        let hub = Hub::new();
        let acme = Tenant::new("acme").unwrap();
        let total = SERIES_KEPT + 25;
        for seq in 1..=total {
            hub.publish(&frame(
                "acme",
                1,
                seq as u64,
                Stream::PageViews,
                &format!("tick {seq}"),
            ));
        }
        hub.publish(&frame("acme", 1, 1_000, Stream::TopN, "top 1"));
        hub.publish(&frame("acme", 1, 1_001, Stream::TopN, "top 2"));
        let mailbox = Mailbox::new();
        hub.join(&acme, 7, &mailbox);
        hub.subscribe(&acme, 7, &[Stream::PageViews, Stream::TopN], None);
        let got = drain(&mailbox);
        let ticks: Vec<&str> = got
            .iter()
            .filter(|(s, _, snapshot)| *s == Stream::PageViews && *snapshot)
            .map(|(_, json, _)| json.as_str())
            .collect();
        let expected: Vec<String> = (26..=total).map(|seq| format!("tick {seq}")).collect();
        assert_eq!(
            ticks, expected,
            "the newest {SERIES_KEPT} ticks, oldest first"
        );
        let tops: Vec<_> = got.iter().filter(|(s, ..)| *s == Stream::TopN).collect();
        assert_eq!(tops, [&(Stream::TopN, "top 2".to_owned(), true)]);
        assert_eq!(got.len(), SERIES_KEPT + 1);
        assert_eq!(
            std::mem::size_of::<Outgoing>(),
            40,
            "the bound in `Slots::pending`'s doc"
        );
        // A client reconnecting after tick 320 gets the five it missed, and nothing twice.
        let back = Mailbox::new();
        hub.join(&acme, 8, &back);
        let after = Some(Position { run: 1, seq: 320 });
        hub.subscribe(&acme, 8, &[Stream::PageViews], after);
        let missed: Vec<String> = drain(&back).into_iter().map(|(_, json, _)| json).collect();
        assert_eq!(
            missed,
            (321..=total)
                .map(|seq| format!("tick {seq}"))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_job_started_afresh_replaces_what_the_last_one_left() {
        let hub = Hub::new();
        let acme = Tenant::new("acme").unwrap();
        for seq in 1..=3 {
            hub.publish(&in_run("acme", 1, 1, seq, Stream::PageViews, "run 1 tick"));
        }
        hub.publish(&in_run("acme", 1, 1, 4, Stream::TopN, "run 1 top"));
        // A takeover continues the run: its results join the cache.
        hub.publish(&in_run(
            "acme",
            2,
            1,
            5,
            Stream::PageViews,
            "run 1 tick, new owner",
        ));
        let mailbox = Mailbox::new();
        hub.join(&acme, 1, &mailbox);
        hub.subscribe(&acme, 1, &[Stream::PageViews, Stream::TopN], None);
        assert_eq!(drain(&mailbox).len(), 5);
        // The job stopped; the next viewer's job starts a new run.
        hub.publish(&in_run("acme", 3, 3, 1, Stream::PageViews, "run 3 tick"));
        let mailbox = Mailbox::new();
        hub.join(&acme, 2, &mailbox);
        hub.subscribe(&acme, 2, &[Stream::PageViews, Stream::TopN], None);
        assert_eq!(
            drain(&mailbox),
            [(Stream::PageViews, "run 3 tick".to_owned(), true)],
            "nothing of run 1, not even its top-N"
        );
    }

    #[test]
    fn an_unwatched_tenant_keeps_its_series_for_a_while_then_only_the_latest() {
        let hub = Hub::new();
        let acme = Tenant::new("acme").unwrap();
        let mailbox = Mailbox::new();
        hub.join(&acme, 1, &mailbox);
        for seq in 1..=10 {
            hub.publish(&frame(
                "acme",
                1,
                seq,
                Stream::PageViews,
                &format!("tick {seq}"),
            ));
        }
        hub.publish(&frame("acme", 1, 11, Stream::TopN, "top"));
        hub.remove(&acme, 1);
        let kept = |hub: &Hub| {
            let tenants = lock(&hub.tenants);
            let cache = &tenants.by_name[&acme].cache;
            (
                cache.streams[&Stream::PageViews].len(),
                cache.streams[&Stream::TopN].len(),
            )
        };
        let start = Instant::now() + SWEEP_EVERY;
        let sweep = |hub: &Hub, after: Duration| lock(&hub.tenants).sweep(start + after);
        sweep(&hub, Duration::ZERO);
        sweep(&hub, UNWATCHED_HISTORY - SWEEP_EVERY);
        assert_eq!(
            kept(&hub),
            (10, 1),
            "a reload soon after still gets the chart"
        );
        sweep(&hub, UNWATCHED_HISTORY);
        assert_eq!(kept(&hub), (1, 1));
        // A watched tenant is never trimmed.
        let mailbox = Mailbox::new();
        hub.join(&acme, 2, &mailbox);
        for seq in 12..=20 {
            hub.publish(&frame("acme", 1, seq, Stream::PageViews, "tick"));
        }
        sweep(&hub, UNWATCHED_HISTORY * 3);
        sweep(&hub, UNWATCHED_HISTORY * 5);
        assert_eq!(kept(&hub), (10, 1));
    }

    #[test]
    fn shutdown_reaches_every_client_and_those_joining_after_it() {
        let hub = Hub::new();
        let (acme, globex) = (Tenant::new("acme").unwrap(), Tenant::new("globex").unwrap());
        let (watching, quiet, late) = (Mailbox::new(), Mailbox::new(), Mailbox::new());
        hub.join(&acme, 1, &watching);
        hub.subscribe(&acme, 1, &[Stream::TopN], None);
        hub.join(&globex, 2, &quiet);
        hub.publish(&frame("acme", 1, 1, Stream::TopN, "pending"));
        assert_eq!(hub.subscribers(&acme), 1);
        assert_eq!(hub.subscribers(&globex), 0, "joined, subscribed to nothing");
        hub.shut_down();
        hub.join(&acme, 3, &late);
        for mailbox in [&watching, &quiet, &late] {
            assert!(mailbox.going_away());
        }
        // What was pending still goes out before the close.
        assert_eq!(
            watching.take().map(|m| m.json().to_owned()),
            Some("pending".to_owned())
        );
        hub.remove(&acme, 1);
        assert_eq!(hub.subscribers(&acme), 0);
    }

    #[test]
    fn a_resuming_client_gets_nothing_it_already_has() {
        let hub = Hub::new();
        let acme = Tenant::new("acme").unwrap();
        hub.publish(&frame("acme", 1, 1, Stream::TopN, "seen"));
        hub.publish(&frame("acme", 1, 2, Stream::Totals, "unseen"));
        let mailbox = Mailbox::new();
        let after = Some(Position { run: 1, seq: 1 });
        hub.join(&acme, 7, &mailbox);
        hub.subscribe(&acme, 7, &[Stream::TopN, Stream::Totals], after);
        let snap = mailbox.take().unwrap();
        assert_eq!(
            snap.json(),
            "unseen",
            "only the snapshot after its last result"
        );
        assert_eq!(mailbox.take(), None);
        // Re-emitted by a new owner after a restore: dropped for everyone.
        hub.publish(&frame("acme", 2, 2, Stream::Totals, "unseen"));
        assert_eq!(mailbox.take(), None);
        hub.publish(&frame("acme", 2, 3, Stream::TopN, "new"));
        assert_eq!(mailbox.take().unwrap().json(), "new");
    }

    #[test]
    fn the_rendered_text_is_the_protocols_result_message() {
        use clickpulse_protocol::results::{ResultBody, ResultMsg};
        use clickpulse_protocol::ws::ServerMsg;
        let result = ResultMsg {
            tenant: Tenant::new("acme").unwrap(),
            epoch: 3,
            run: 3,
            seq: 9,
            window_start_ms: 0,
            window_end_ms: 1_000,
            watermark_ms: 1_000,
            body: ResultBody::PageViews { pages: vec![] },
        };
        let json = serde_json::to_string(&result).unwrap();
        for snapshot in [true, false] {
            let out = Outgoing::new(Stream::PageViews, &json, snapshot);
            let parsed: ServerMsg = serde_json::from_str(&out.text).unwrap();
            assert_eq!(
                parsed,
                ServerMsg::Result {
                    snapshot,
                    result: result.clone()
                }
            );
        }
    }

    #[test]
    fn a_slow_mailbox_conflates_to_the_newest_value_per_stream() {
        let mailbox = Mailbox::new();
        for i in 0..1000 {
            for stream in [Stream::TopN, Stream::Window] {
                mailbox.offer(Outgoing::new(stream, &format!("{i}"), false));
            }
        }
        assert!(mailbox.backlog_age().is_some());
        let a = mailbox.take().unwrap();
        let b = mailbox.take().unwrap();
        assert_eq!((a.stream, a.json()), (Stream::TopN, "999"));
        assert_eq!((b.stream, b.json()), (Stream::Window, "999"));
        assert_eq!(mailbox.take(), None, "bounded: one message per stream");
        assert_eq!(mailbox.conflated(), 1998);
        assert_eq!(mailbox.backlog_age(), None);
    }

    #[test]
    fn a_drained_burst_gives_its_queue_back_and_a_steady_stream_keeps_its_own() {
        let mailbox = Mailbox::new();
        let series = Stream::PageViews;
        assert!(series.is_series());
        for i in 0..SERIES_KEPT {
            mailbox.offer(Outgoing::new(series, &format!("{i}"), false));
        }
        while mailbox.take().is_some() {}
        assert!(lock(&mailbox.slots).queue(series).is_none());
        for i in 0..3 {
            mailbox.offer(Outgoing::new(Stream::TopN, &format!("{i}"), false));
            assert!(mailbox.take().is_some());
        }
        let mut slots = lock(&mailbox.slots);
        let kept = slots.queue(Stream::TopN).expect("kept for the next result");
        assert!(
            kept.is_empty() && kept.capacity() == 1,
            "room for one: {kept:?}"
        );
        assert!(slots.order.is_empty());
    }

    #[test]
    fn a_series_keeps_its_newest_unsent_results_and_streams_take_turns() {
        let mailbox = Mailbox::new();
        let total = SERIES_KEPT + 10;
        for i in 0..total {
            mailbox.offer(Outgoing::new(Stream::PageViews, &format!("{i}"), false));
        }
        mailbox.offer(Outgoing::new(Stream::TopN, "t", false));
        assert_eq!(
            mailbox.conflated(),
            10,
            "only the oldest ticks were dropped"
        );
        let first = mailbox.take().unwrap();
        assert_eq!(first.json(), "10");
        assert_eq!(
            mailbox.take().map(|m| m.stream),
            Some(Stream::TopN),
            "a burst of one stream does not hold the others back"
        );
        let rest: Vec<String> = std::iter::from_fn(|| mailbox.take())
            .map(|m| m.json().to_owned())
            .collect();
        let expected: Vec<String> = (11..total).map(|i| i.to_string()).collect();
        assert_eq!(rest, expected, "in order, none twice");
        assert_eq!(mailbox.backlog_age(), None);

        // A replaced latest-value result keeps its stream's one turn: nothing stalls behind it.
        for i in 0..3 {
            mailbox.offer(Outgoing::new(Stream::Totals, &format!("{i}"), false));
            mailbox.offer(Outgoing::new(Stream::PageViews, &format!("p{i}"), false));
        }
        let sent: Vec<String> = std::iter::from_fn(|| mailbox.take())
            .map(|m| m.json().to_owned())
            .collect();
        assert_eq!(sent, ["2", "p0", "p1", "p2"]);
    }

    #[test]
    fn a_rate_cap_holds_a_stream_back_and_lets_others_through() {
        let mailbox = Mailbox::new();
        mailbox.set_min_interval(Some(Duration::from_secs(3600)));
        let msg = |stream, json: &str| Outgoing::new(stream, json, false);
        mailbox.offer(msg(Stream::TopN, "1"));
        assert_eq!(
            mailbox.take().map(|m| m.json().to_owned()),
            Some("1".to_owned())
        );
        mailbox.offer(msg(Stream::TopN, "2"));
        mailbox.offer(msg(Stream::Window, "w"));
        assert_eq!(
            mailbox.take().map(|m| m.json().to_owned()),
            Some("w".to_owned()),
            "topn is not due yet"
        );
        assert_eq!(mailbox.take(), None);
        mailbox.offer(msg(Stream::TopN, "3"));
        assert_eq!(
            mailbox.conflated(),
            1,
            "the held-back topn was replaced by the newer one"
        );
        mailbox.set_min_interval(None);
        assert_eq!(
            mailbox.take().map(|m| m.json().to_owned()),
            Some("3".to_owned())
        );
    }
}
