//! One tenant's operators, driven in event-time order.
//!
//! ```text
//!  on_click(partition, visitor, page, t)
//!     │  late (t < watermark)? ──▶ counted, dropped
//!     ▼
//!  reorder buffer (min-heap on t, visitor, page) ── released once t < watermark ──┐
//!                                                                                 ▼
//!       one logical clock over three kinds of instants, at equal times in this order:
//!         1. boundaries   tick ends (pageviews) · slide ends (window, topn, sessions, totals)
//!         2. timers       session close times (last view + gap)
//!         3. events       ticks · window panes · sessions (history lookup on open)
//! ```
//!
//! Because the operators see every accepted event in event-time order, a result depends only
//! on the set of accepted events and the configuration — not on how partitions interleaved —
//! and it is final when emitted: its `watermark_ms` is the event time up to which its input was
//! complete (the window end). Results are numbered 1, 2, 3… in emission order (`seq`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use clickpulse_protocol::pages::PAGE_COUNT;
use clickpulse_protocol::results::{ResultBody, ResultMsg, Totals};
use clickpulse_protocol::{PageId, Tenant};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, OperatorConfig};
use crate::history::{HistoryState, HistoryStats, HistoryStore, StoreError};
use crate::sessions::Sessions;
use crate::watermark::Watermark;
use crate::window::{PageCounts, SlidingWindow, Ticks, page_index, to_page_counts, top_n};

/// Event times outside ±2^53 ms (±285 000 years) are rejected, so time arithmetic never
/// overflows.
pub const MAX_ABS_TIME_MS: i64 = 1 << 53;

/// What happened to a click.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Accepted,
    /// Older than the watermark: counted and dropped.
    Late,
    /// A page outside the catalogue: counted; the job dead-letters it.
    UnknownPage,
    /// An event time outside ±[`MAX_ABS_TIME_MS`]: counted; the job dead-letters it.
    BadTime,
}

/// Why the pipeline cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("snapshot does not encode or decode: {0}")]
    Snapshot(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Pending {
    time_ms: i64,
    visitor: u64,
    page: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
struct TotalCounts {
    pages: PageCounts,
    views: u64,
    late: u64,
    dead_lettered: u64,
    /// Time of the first released event (start of the totals' span).
    first_ms: i64,
    /// `views + late + dead_lettered + sessions` when totals were last emitted.
    emitted_at: u64,
}

/// The reorder buffer. Each partition is nearly in order, so most arrivals are appends to the
/// sorted run; an arrival older than its newest (another partition behind, or a partition far
/// ahead of the others: a resumed job re-reading, a broker serving one partition first) goes
/// to a heap, so it costs O(log n), not a shift of everything after it. Releases take the
/// smaller of the two heads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Reorder {
    run: VecDeque<Pending>,
    rest: BinaryHeap<Reverse<Pending>>,
}

impl Reorder {
    fn push(&mut self, p: Pending) {
        if self.run.back().is_none_or(|last| *last <= p) {
            self.run.push_back(p);
        } else {
            self.rest.push(Reverse(p));
        }
    }

    fn first(&self) -> Option<&Pending> {
        match (self.run.front(), self.rest.peek()) {
            (Some(a), Some(Reverse(b))) => Some(if b < a { b } else { a }),
            (a, b) => a.or(b.map(|Reverse(b)| b)),
        }
    }

    fn pop(&mut self) -> Option<Pending> {
        let from_rest = match (self.run.front(), self.rest.peek()) {
            (Some(a), Some(Reverse(b))) => b < a,
            (None, Some(_)) => true,
            _ => false,
        };
        if from_rest {
            self.rest.pop().map(|Reverse(p)| p)
        } else {
            self.run.pop_front()
        }
    }

    fn len(&self) -> usize {
        self.run.len() + self.rest.len()
    }
}

/// Everything a checkpoint needs to resume the operators exactly (serde).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineState {
    config: OperatorConfig,
    watermark: Watermark,
    /// Accepted events not yet released, in (time, visitor, page) order.
    buffer: Reorder,
    ticks: Ticks,
    window: SlidingWindow,
    sessions: Sessions,
    history: HistoryState,
    next_slide: Option<i64>,
    totals: TotalCounts,
    newest_ms: i64,
    /// The run this state belongs to (the epoch of the owner that started it afresh) and the
    /// last sequence number emitted in it.
    run: u64,
    seq: u64,
    /// Windows starting before this instant are closed but not emitted: a job that started
    /// from a point in the log has not seen their beginning (see [`Pipeline::backfill_from`]).
    windows_from_ms: i64,
}

impl PipelineState {
    /// The state as bytes: postcard (compact and fast: a checkpoint holds megabytes of
    /// buffered events, Bloom filter bits and open sessions, which JSON took seconds to write).
    pub fn to_bytes(&self) -> Result<Vec<u8>, EngineError> {
        postcard::to_stdvec(self).map_err(|e| EngineError::Snapshot(e.to_string()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<PipelineState, EngineError> {
        postcard::from_bytes(bytes).map_err(|e| EngineError::Snapshot(e.to_string()))
    }
}

/// One tenant's operators over a history store `S`.
pub struct Pipeline<S> {
    tenant: Tenant,
    epoch: u64,
    state: PipelineState,
    store: S,
    out: Vec<ResultMsg>,
}

impl<S: HistoryStore> Pipeline<S> {
    pub fn new(
        tenant: Tenant,
        epoch: u64,
        partitions: usize,
        config: OperatorConfig,
        store: S,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        let state = PipelineState {
            watermark: Watermark::new(partitions, config.allowed_lateness_ms),
            buffer: Reorder::default(),
            ticks: Ticks::new(config.tick_ms),
            window: SlidingWindow::new(config.window_ms, config.slide_ms),
            sessions: Sessions::new(config.session_gap_ms),
            history: HistoryState::new(
                config.expected_visitors,
                config.bloom_fp_rate,
                config.history_batch,
            ),
            next_slide: None,
            totals: TotalCounts {
                first_ms: i64::MAX,
                ..TotalCounts::default()
            },
            newest_ms: i64::MIN,
            run: epoch,
            seq: 0,
            windows_from_ms: i64::MIN,
            config,
        };
        Ok(Pipeline {
            tenant,
            epoch,
            state,
            store,
            out: Vec::new(),
        })
    }

    /// Resumes from a snapshot; `epoch` is the restoring owner's. The run and its numbering go
    /// on: results re-emitted after the snapshot carry the same `run` and `seq` as before.
    pub fn restore(tenant: Tenant, epoch: u64, state: PipelineState, store: S) -> Self {
        Pipeline {
            tenant,
            epoch,
            state,
            store,
            out: Vec::new(),
        }
    }

    /// Forgets which partitions were idle. Idleness is a fact about processing time, not
    /// about the input: a job resuming a checkpoint re-reads and skips what came before it,
    /// and a partition still doing so must hold the watermark back, or its first records
    /// after the checkpoint would come in late.
    pub fn forget_idleness(&mut self) {
        self.state.watermark.clear_idle();
    }

    /// Declares that input starts at `start_ms` (a job seeking to the newest event time minus
    /// one window): sliding windows that began earlier would be partial, so they are not
    /// emitted, and the first window a dashboard sees is a complete one. Earlier events (a
    /// seek lands at or before the start) still count: for a tenant quiet in its last window
    /// they are all there is to show.
    pub fn backfill_from(&mut self, start_ms: i64) {
        self.state.windows_from_ms = start_ms;
    }

    /// The state to checkpoint. Pending history updates travel with it, so the store need not
    /// be flushed first.
    pub fn snapshot(&self) -> PipelineState {
        self.state.clone()
    }

    /// The snapshot as bytes, ready for a checkpoint record.
    pub fn snapshot_bytes(&self) -> Result<Vec<u8>, EngineError> {
        self.state.to_bytes()
    }

    pub fn state_from_bytes(bytes: &[u8]) -> Result<PipelineState, EngineError> {
        PipelineState::from_bytes(bytes)
    }

    pub fn watermark(&self) -> i64 {
        self.state.watermark.current()
    }

    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// Per partition, the newest event time seen and whether it is idle.
    pub fn partitions(&self) -> Vec<(Option<i64>, bool)> {
        self.state.watermark.partitions()
    }

    /// Accepted events waiting for the watermark.
    pub fn buffered(&self) -> usize {
        self.state.buffer.len()
    }

    pub fn run(&self) -> u64 {
        self.state.run
    }

    /// Sequence number of the last result emitted.
    pub fn seq(&self) -> u64 {
        self.state.seq
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Takes the results emitted since the last call.
    pub fn take_results(&mut self) -> Vec<ResultMsg> {
        std::mem::take(&mut self.out)
    }

    /// Results waiting to be taken.
    pub fn results(&self) -> &[ResultMsg] {
        &self.out
    }

    /// One page view read from `partition`.
    pub fn on_click(
        &mut self,
        partition: usize,
        visitor: u64,
        page: PageId,
        time_ms: i64,
    ) -> Result<Admission, EngineError> {
        let Some(index) = page_index(page) else {
            self.state.totals.dead_lettered += 1;
            return Ok(Admission::UnknownPage);
        };
        if !(-MAX_ABS_TIME_MS..=MAX_ABS_TIME_MS).contains(&time_ms) {
            self.state.totals.dead_lettered += 1;
            return Ok(Admission::BadTime);
        }
        let s = &mut self.state;
        if time_ms < s.watermark.current() {
            s.totals.late += 1;
            return Ok(Admission::Late);
        }
        let pending = Pending {
            time_ms,
            visitor,
            page: index as u8,
        };
        s.buffer.push(pending);
        s.newest_ms = s.newest_ms.max(time_ms);
        if s.watermark.observe(partition, time_ms) {
            self.drain()?;
        }
        Ok(Admission::Accepted)
    }

    /// A record that could not be decoded (the job dead-letters it); counted in the totals.
    pub fn on_dead_letter(&mut self) {
        self.state.totals.dead_lettered += 1;
    }

    /// `partition` delivered nothing for the job's idle timeout.
    pub fn on_idle(&mut self, partition: usize) -> Result<(), EngineError> {
        if self.state.watermark.set_idle(partition) {
            self.drain()?;
        }
        Ok(())
    }

    /// End of a bounded input: everything open closes and every result is emitted.
    pub fn finish(&mut self) -> Result<(), EngineError> {
        let c = &self.state.config;
        let horizon = self.state.newest_ms.max(0)
            + c.session_gap_ms
            + c.window_ms
            + c.tick_ms
            + c.slide_ms
            + c.allowed_lateness_ms
            + 1;
        self.state.watermark.advance_to(horizon);
        self.drain()?;
        // Late or dead-lettered records after the last boundary still reach the totals.
        self.emit_totals_if_changed(horizon);
        Ok(())
    }

    /// Writes pending history updates to the store (the job calls this at checkpoints).
    pub fn flush_history(&mut self) -> Result<(), EngineError> {
        Ok(self.state.history.flush(&mut self.store)?)
    }

    pub fn history_stats(&self) -> HistoryStats {
        self.state.history.stats()
    }

    pub fn active_sessions(&self) -> usize {
        self.state.sessions.active()
    }

    /// Exact bytes of session state (map and timers).
    pub fn session_bytes(&self) -> usize {
        self.state.sessions.bytes()
    }

    /// Bytes of visitor history: the store plus the in-memory Bloom filter and pending updates.
    pub fn history_bytes(&self) -> u64 {
        self.store.bytes() + self.state.history.bytes() as u64
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    fn next_boundary(&self) -> Option<i64> {
        match (self.state.ticks.next_boundary(), self.state.next_slide) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Processes every instant the watermark has made final, in order.
    fn drain(&mut self) -> Result<(), EngineError> {
        let w = self.state.watermark.current();
        loop {
            // Events strictly before the next boundary and timer go first, in a tight loop:
            // that is nearly every instant. A release can open a tick or a slide or arm a
            // timer, so both are looked up again after each one.
            while let Some(t) = self.state.buffer.first().map(|p| p.time_ms) {
                let before_boundary = self.next_boundary().is_none_or(|b| t < b);
                let before_timer = self.state.sessions.next_timer().is_none_or(|c| t < c);
                if t >= w || !before_boundary || !before_timer {
                    break;
                }
                self.release()?;
            }
            // Then the earliest boundary or timer; at equal times the boundary first.
            let boundary = self.next_boundary().filter(|b| *b <= w);
            let timer = self.state.sessions.next_timer().filter(|c| *c <= w);
            match (boundary, timer) {
                (None, None) => {
                    // Only events can remain, and none is final.
                    if self.state.buffer.first().is_none_or(|p| p.time_ms >= w) {
                        return Ok(());
                    }
                }
                (Some(b), Some(c)) if c < b => self
                    .state
                    .sessions
                    .fire_timer(&mut self.state.history, &mut self.store)?,
                (Some(b), _) => self.on_boundary(b),
                (None, Some(_)) => self
                    .state
                    .sessions
                    .fire_timer(&mut self.state.history, &mut self.store)?,
            }
        }
    }

    fn release(&mut self) -> Result<(), EngineError> {
        let s = &mut self.state;
        let Some(p) = s.buffer.pop() else {
            return Ok(());
        };
        let page = usize::from(p.page);
        s.ticks.add(p.time_ms, page);
        s.window.add(p.time_ms, page);
        s.totals.pages[page] += 1;
        s.totals.first_ms = s.totals.first_ms.min(p.time_ms);
        s.totals.views += 1;
        if s.next_slide.is_none() {
            let slide = s.config.slide_ms;
            s.next_slide = Some(p.time_ms.div_euclid(slide) * slide + slide);
        }
        s.sessions
            .on_event(p.time_ms, p.visitor, &mut s.history, &mut self.store)?;
        Ok(())
    }

    fn on_boundary(&mut self, at: i64) {
        if self.state.ticks.next_boundary() == Some(at)
            && let Some((start, end, counts)) = self.state.ticks.close()
        {
            let pages = to_page_counts(&counts);
            self.emit(start, end, ResultBody::PageViews { pages });
        }
        if self.state.next_slide == Some(at) {
            self.on_slide(at);
        }
    }

    fn on_slide(&mut self, end: i64) {
        let c = &self.state.config;
        let (window_ms, slide_ms, n) = (c.window_ms, c.slide_ms, c.top_n);
        if let Some(counts) = self.state.window.close(end)
            && end - window_ms >= self.state.windows_from_ms
        {
            self.emit(
                end - window_ms,
                end,
                ResultBody::Window {
                    pages: to_page_counts(&counts),
                },
            );
            self.emit(
                end - window_ms,
                end,
                ResultBody::TopN {
                    n,
                    pages: top_n(&counts, n as usize),
                },
            );
        }
        if self.state.sessions.has_news() {
            let stats = self.state.sessions.take_interval();
            self.emit(end - slide_ms, end, ResultBody::Sessions(stats));
        }
        self.emit_totals_if_changed(end);
        let more = !self.state.window.is_empty() || self.state.sessions.has_news();
        self.state.next_slide = more.then_some(end + slide_ms);
    }

    /// Totals cover everything since the job's first event; emitted when anything changed.
    fn emit_totals_if_changed(&mut self, end: i64) {
        let t = &self.state.totals;
        let sessions = self.state.sessions.totals();
        let mark = t.views + t.late + t.dead_lettered + sessions.sessions;
        if mark == t.emitted_at {
            return;
        }
        self.state.totals.emitted_at = mark;
        let t = &self.state.totals;
        let totals = Totals {
            views: t.views,
            pages: to_page_counts(&t.pages),
            sessions: sessions.sessions,
            returning_sessions: sessions.returning_sessions,
            late: t.late,
            dead_lettered: t.dead_lettered,
        };
        let start = t.first_ms.min(end);
        self.emit(start, end, ResultBody::Totals(totals));
    }

    fn emit(&mut self, start: i64, end: i64, body: ResultBody) {
        self.state.seq += 1;
        self.out.push(ResultMsg {
            tenant: self.tenant.clone(),
            epoch: self.epoch,
            run: self.state.run,
            seq: self.state.seq,
            window_start_ms: start,
            window_end_ms: end,
            watermark_ms: end,
            body,
        });
    }
}

/// The newest totals among `results` (emission order), if any.
pub fn last_totals(results: &[ResultMsg]) -> Option<&Totals> {
    results.iter().rev().find_map(|r| match &r.body {
        ResultBody::Totals(t) => Some(t),
        _ => None,
    })
}

/// Page views per page of a totals result, in catalogue order (for checks from outside).
pub fn totals_by_page(totals: &Totals) -> [u64; PAGE_COUNT] {
    let mut out = [0; PAGE_COUNT];
    for p in &totals.pages {
        if let Some(i) = clickpulse_protocol::pages::page_id(&p.page).and_then(page_index) {
            out[i] = p.views;
        }
    }
    out
}
