//! Sessions per visitor under an inactivity gap, with new vs returning visitors.
//!
//! Events arrive in event-time order (the pipeline guarantees it). A visitor's next view
//! belongs to the open session when it comes less than `gap` after the previous one; the
//! session closes at `last + gap`. Each open session has exactly one entry in a timer heap:
//! when it fires and the session has since been extended, it is re-armed at the new close
//! time — so memory is one map entry and one heap entry per *active* session, and a session's
//! state is freed the moment it closes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use clickpulse_protocol::results::SessionStats;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::history::{self as visitor_history, HistoryState, HistoryStore, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    start: i64,
    last: i64,
    views: u32,
    returning: bool,
}

/// Counts for the interval since the last `take_interval`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Interval {
    opened: u64,
    closed: u64,
    bounces: u64,
    new_visitors: u64,
    returning_visitors: u64,
    closed_views: u64,
    closed_duration_ms: u64,
}

/// What the sessions operator has seen since the job's first offset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTotals {
    pub sessions: u64,
    pub returning_sessions: u64,
    pub closed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sessions {
    gap_ms: i64,
    open: FxHashMap<u64, Session>,
    timers: BinaryHeap<Reverse<(i64, u64)>>,
    interval: Interval,
    totals: SessionTotals,
}

impl Sessions {
    pub fn new(gap_ms: i64) -> Self {
        Sessions {
            gap_ms,
            open: FxHashMap::default(),
            timers: BinaryHeap::new(),
            interval: Interval::default(),
            totals: SessionTotals::default(),
        }
    }

    pub fn active(&self) -> usize {
        self.open.len()
    }

    /// Whether there is anything to report at the next interval boundary.
    pub fn has_news(&self) -> bool {
        !self.open.is_empty() || self.interval != Interval::default()
    }

    /// Close time of the earliest armed timer.
    pub fn next_timer(&self) -> Option<i64> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Fires the earliest timer: closes its session, or re-arms it if the session went on.
    pub fn fire_timer(
        &mut self,
        history: &mut HistoryState,
        store: &mut dyn HistoryStore,
    ) -> Result<(), StoreError> {
        let Some(Reverse((due, visitor))) = self.timers.pop() else {
            return Ok(());
        };
        let Some(session) = self.open.get(&visitor).copied() else {
            return Ok(());
        };
        let close_at = session.last + self.gap_ms;
        if close_at > due {
            self.timers.push(Reverse((close_at, visitor)));
            return Ok(());
        }
        self.open.remove(&visitor);
        let i = &mut self.interval;
        i.closed += 1;
        i.bounces += u64::from(session.views == 1);
        i.closed_views += u64::from(session.views);
        i.closed_duration_ms += (session.last - session.start) as u64;
        self.totals.closed += 1;
        let prev = history.peek(store, visitor)?;
        match visitor_history::fold(prev, session.views, session.last, close_at) {
            Some(folded) => history.record(store, visitor, folded),
            // The store already holds this session (it is ahead of a restored checkpoint).
            None => {
                history.note(visitor);
                Ok(())
            }
        }
    }

    /// A view of `visitor` at `time_ms` (not before any earlier view: events come in order).
    pub fn on_event(
        &mut self,
        time_ms: i64,
        visitor: u64,
        history: &mut HistoryState,
        store: &mut dyn HistoryStore,
    ) -> Result<(), StoreError> {
        if let Some(s) = self.open.get_mut(&visitor) {
            // Timers due at or before this time fired first, so the gap has not passed.
            s.last = time_ms;
            s.views = s.views.saturating_add(1);
            return Ok(());
        }
        let returning = visitor_history::returning(history.lookup(store, visitor)?, time_ms);
        self.open.insert(
            visitor,
            Session {
                start: time_ms,
                last: time_ms,
                views: 1,
                returning,
            },
        );
        self.timers.push(Reverse((time_ms + self.gap_ms, visitor)));
        self.interval.opened += 1;
        self.totals.sessions += 1;
        if returning {
            self.interval.returning_visitors += 1;
            self.totals.returning_sessions += 1;
        } else {
            self.interval.new_visitors += 1;
        }
        Ok(())
    }

    /// Statistics of the interval just ended, and a fresh interval.
    pub fn take_interval(&mut self) -> SessionStats {
        let i = std::mem::take(&mut self.interval);
        let per_closed = |x: u64| {
            if i.closed == 0 {
                0.0
            } else {
                x as f64 / i.closed as f64
            }
        };
        SessionStats {
            active: self.open.len() as u64,
            opened: i.opened,
            closed: i.closed,
            bounces: i.bounces,
            bounce_rate: per_closed(i.bounces),
            new_visitors: i.new_visitors,
            returning_visitors: i.returning_visitors,
            avg_views: per_closed(i.closed_views),
            avg_duration_ms: per_closed(i.closed_duration_ms),
        }
    }

    pub fn totals(&self) -> SessionTotals {
        self.totals
    }

    /// Exact bytes held for open sessions: the map's buckets and control bytes, and the heap.
    pub fn bytes(&self) -> usize {
        self.open.capacity() * (std::mem::size_of::<(u64, Session)>() + 1)
            + self.timers.capacity() * std::mem::size_of::<Reverse<(i64, u64)>>()
    }
}
