//! Visitor history: what a visitor did in earlier sessions, to tell new from returning.
//!
//! ```text
//!  session opens ─▶ lookup(v): dirty map ─▶ Bloom "never seen"? ─skip─▶ new visitor
//!                                   │               │ maybe
//!                                   │               ▼
//!                                   │        HistoryStore::get (on disk: redb)
//!  session closes ─▶ record(v, h) ──┴─▶ dirty map ──(batch of N, or flush())──▶ HistoryStore::put_batch
//! ```
//!
//! Updates collect in memory and reach the store in one write transaction per batch, so a
//! session close costs a map insert, not a disk write. The store is chosen by the job:
//! [`RedbStore`] on disk, [`MemStore`] for tests and benchmarks of the operators alone.
//!
//! Why redb: a maintained, pure-Rust embedded store (no C++ build on 2 cores, unlike RocksDB),
//! ACID with a stable file format, one file per tenant, and fast point reads — the access
//! pattern here is batched upserts and point lookups, and a full scan only for a history
//! snapshot (rare: see `clickpulse_protocol::state`).
//!
//! **Idempotent by design**, so a job restored from a checkpoint can share a store that already
//! holds updates made after that checkpoint (a checkpoint's history log lands before its
//! manifest, and a snapshot holds everything the store had, so the history on
//! `state.<tenant>` can be ahead of the newest complete checkpoint): a closed session is folded in only if it ended
//! after the summary's `last_seen_ms` (a visitor's sessions never overlap), and a session
//! opening at `t` is a returning visitor's only if the first session closed at or before `t`.
//! In a run without restores both rules change nothing.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::bloom::Bloom;

/// A visitor's lifetime summary (on the wire: `clickpulse_protocol::state::VisitorHistory`).
pub type History = clickpulse_protocol::state::VisitorHistory;

/// Folds one session, closed at `closed_ms` with its last view at `last_ms`, into a summary;
/// `None` when the summary already holds it (it ended at or before `last_seen_ms`).
pub fn fold(prev: Option<History>, views: u32, last_ms: i64, closed_ms: i64) -> Option<History> {
    match prev {
        Some(h) if h.last_seen_ms >= last_ms => None,
        Some(h) => Some(History {
            sessions: h.sessions.saturating_add(1),
            views: h.views.saturating_add(views),
            last_seen_ms: last_ms,
            first_close_ms: h.first_close_ms.min(closed_ms),
        }),
        None => Some(History {
            sessions: 1,
            views,
            last_seen_ms: last_ms,
            first_close_ms: closed_ms,
        }),
    }
}

/// Whether a session opening at `t` is a returning visitor's.
pub fn returning(history: Option<History>, t: i64) -> bool {
    history.is_some_and(|h| h.first_close_ms <= t)
}

/// A failure of the history store. Retrying may help when the disk is full or busy; the job
/// decides.
#[derive(Debug, thiserror::Error)]
#[error("visitor history store: {0}")]
pub struct StoreError(pub String);

/// Where history lives.
pub trait HistoryStore {
    fn get(&mut self, visitor: u64) -> Result<Option<History>, StoreError>;
    fn put_batch(
        &mut self,
        batch: &mut dyn Iterator<Item = (u64, History)>,
    ) -> Result<(), StoreError>;
    /// Like [`Self::put_batch`], but keeps a stored summary that is newer (a later
    /// `last_seen_ms`): how a restore merges the history log into a store that may be ahead.
    fn merge_batch(
        &mut self,
        batch: &mut dyn Iterator<Item = (u64, History)>,
    ) -> Result<(), StoreError> {
        let mut newer = Vec::new();
        for (visitor, h) in batch {
            if self
                .get(visitor)?
                .is_none_or(|old| old.last_seen_ms < h.last_seen_ms)
            {
                newer.push((visitor, h));
            }
        }
        self.put_batch(&mut newer.into_iter())
    }
    /// Updates written since the last call, in write order: what the job's next checkpoint
    /// logs to `state.<tenant>` (empty for stores that keep none).
    fn take_changes(&mut self) -> Vec<(u64, History)> {
        Vec::new()
    }
    /// Bytes the store occupies (file size on disk, or exact heap use in memory).
    fn bytes(&self) -> u64;
    /// Visitors with history.
    fn visitors(&mut self) -> Result<u64, StoreError>;
    /// Every visitor's history, in visitor order (a history snapshot).
    fn all(&mut self) -> Result<Vec<(u64, History)>, StoreError>;
}

/// In-memory store (tests, benchmarks of the operators alone).
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    map: HashMap<u64, History>,
}

impl HistoryStore for MemStore {
    fn get(&mut self, visitor: u64) -> Result<Option<History>, StoreError> {
        Ok(self.map.get(&visitor).copied())
    }

    fn put_batch(
        &mut self,
        batch: &mut dyn Iterator<Item = (u64, History)>,
    ) -> Result<(), StoreError> {
        self.map.extend(batch);
        Ok(())
    }

    fn bytes(&self) -> u64 {
        (self.map.capacity() * (std::mem::size_of::<(u64, History)>() + 1)) as u64
    }

    fn visitors(&mut self) -> Result<u64, StoreError> {
        Ok(self.map.len() as u64)
    }

    fn all(&mut self) -> Result<Vec<(u64, History)>, StoreError> {
        let mut all: Vec<(u64, History)> = self.map.iter().map(|(v, h)| (*v, *h)).collect();
        all.sort_unstable_by_key(|(v, _)| *v);
        Ok(all)
    }
}

/// Visitor → (sessions, views, last_seen_ms, first_close_ms). (Files of an earlier version hold
/// a `visitor_history` table without the close time; it is left alone and history starts over.)
const TABLE: TableDefinition<u64, (u32, u32, i64, i64)> =
    TableDefinition::new("visitor_history_v2");

fn row(h: &History) -> (u32, u32, i64, i64) {
    (h.sessions, h.views, h.last_seen_ms, h.first_close_ms)
}

/// On-disk store: one redb file.
pub struct RedbStore {
    db: Database,
    path: std::path::PathBuf,
}

fn store_err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db =
            Database::create(path).map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        // Create the table up front so reads before the first write find it.
        let txn = db.begin_write().map_err(store_err)?;
        txn.open_table(TABLE).map_err(store_err)?;
        txn.commit().map_err(store_err)?;
        Ok(RedbStore {
            db,
            path: path.to_owned(),
        })
    }
}

impl RedbStore {
    /// One write transaction; with `keep_newer`, a stored summary with a later `last_seen_ms`
    /// stays.
    fn write(
        &mut self,
        batch: &mut dyn Iterator<Item = (u64, History)>,
        keep_newer: bool,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = txn.open_table(TABLE).map_err(store_err)?;
            for (visitor, h) in batch {
                if keep_newer
                    && table
                        .get(visitor)
                        .map_err(store_err)?
                        .is_some_and(|old| old.value().2 >= h.last_seen_ms)
                {
                    continue;
                }
                table.insert(visitor, row(&h)).map_err(store_err)?;
            }
        }
        txn.commit().map_err(store_err)
    }
}

impl HistoryStore for RedbStore {
    fn get(&mut self, visitor: u64) -> Result<Option<History>, StoreError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(TABLE).map_err(store_err)?;
        Ok(table.get(visitor).map_err(store_err)?.map(|v| {
            let (sessions, views, last_seen_ms, first_close_ms) = v.value();
            History {
                sessions,
                views,
                last_seen_ms,
                first_close_ms,
            }
        }))
    }

    fn put_batch(
        &mut self,
        batch: &mut dyn Iterator<Item = (u64, History)>,
    ) -> Result<(), StoreError> {
        self.write(batch, false)
    }

    fn merge_batch(
        &mut self,
        batch: &mut dyn Iterator<Item = (u64, History)>,
    ) -> Result<(), StoreError> {
        self.write(batch, true)
    }

    fn bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    fn visitors(&mut self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(TABLE).map_err(store_err)?;
        table.len().map_err(store_err)
    }

    fn all(&mut self) -> Result<Vec<(u64, History)>, StoreError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(TABLE).map_err(store_err)?;
        let mut all = Vec::new();
        for row in table.iter().map_err(store_err)? {
            let (visitor, value) = row.map_err(store_err)?;
            let (sessions, views, last_seen_ms, first_close_ms) = value.value();
            all.push((
                visitor.value(),
                History {
                    sessions,
                    views,
                    last_seen_ms,
                    first_close_ms,
                },
            ));
        }
        Ok(all)
    }
}

/// A store that also keeps every update it writes, for the job to send to `state.<tenant>`
/// (see [`HistoryStore::take_changes`]).
pub struct Changelog<S> {
    inner: S,
    changes: Vec<(u64, History)>,
}

impl<S> Changelog<S> {
    pub fn new(inner: S) -> Self {
        Changelog {
            inner,
            changes: Vec::new(),
        }
    }

    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: HistoryStore> HistoryStore for Changelog<S> {
    fn get(&mut self, visitor: u64) -> Result<Option<History>, StoreError> {
        self.inner.get(visitor)
    }

    fn put_batch(
        &mut self,
        batch: &mut dyn Iterator<Item = (u64, History)>,
    ) -> Result<(), StoreError> {
        let start = self.changes.len();
        self.changes.extend(batch);
        self.inner
            .put_batch(&mut self.changes[start..].iter().copied())
    }

    /// A restore's merge is not a change of this job's: not in the changelog.
    fn merge_batch(
        &mut self,
        batch: &mut dyn Iterator<Item = (u64, History)>,
    ) -> Result<(), StoreError> {
        self.inner.merge_batch(batch)
    }

    fn take_changes(&mut self) -> Vec<(u64, History)> {
        std::mem::take(&mut self.changes)
    }

    fn bytes(&self) -> u64 {
        self.inner.bytes()
    }

    fn visitors(&mut self) -> Result<u64, StoreError> {
        self.inner.visitors()
    }

    fn all(&mut self) -> Result<Vec<(u64, History)>, StoreError> {
        self.inner.all()
    }
}

/// Counters of the history path, reported by benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryStats {
    /// Session opens that asked for history.
    pub lookups: u64,
    /// Lookups the Bloom filter answered "never seen" (no store read).
    pub bloom_skips: u64,
    /// Store reads.
    pub store_reads: u64,
    /// Store reads for visitors the store did not have (Bloom false positives).
    pub false_positives: u64,
}

impl HistoryStats {
    pub fn skip_rate(&self) -> f64 {
        self.bloom_skips as f64 / self.lookups.max(1) as f64
    }

    /// False positives over all lookups of visitors without history.
    pub fn false_positive_rate(&self) -> f64 {
        self.false_positives as f64 / (self.bloom_skips + self.false_positives).max(1) as f64
    }
}

/// The serializable part of the history path: the Bloom filter, updates not yet written to
/// the store, and the counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryState {
    bloom: Bloom,
    dirty: FxHashMap<u64, History>,
    stats: HistoryStats,
    batch: usize,
}

impl HistoryState {
    pub fn new(expected: u64, fp: f64, batch: usize) -> Self {
        HistoryState {
            bloom: Bloom::new(expected, fp),
            dirty: FxHashMap::default(),
            stats: HistoryStats::default(),
            batch,
        }
    }

    pub fn lookup(
        &mut self,
        store: &mut dyn HistoryStore,
        visitor: u64,
    ) -> Result<Option<History>, StoreError> {
        self.stats.lookups += 1;
        if let Some(h) = self.dirty.get(&visitor) {
            return Ok(Some(*h));
        }
        if !self.bloom.may_contain(visitor) {
            self.stats.bloom_skips += 1;
            return Ok(None);
        }
        self.stats.store_reads += 1;
        let found = store.get(visitor)?;
        if found.is_none() {
            self.stats.false_positives += 1;
        }
        Ok(found)
    }

    /// The current history of a visitor, without counting a lookup (a session close folds
    /// into it).
    pub fn peek(
        &mut self,
        store: &mut dyn HistoryStore,
        visitor: u64,
    ) -> Result<Option<History>, StoreError> {
        if let Some(h) = self.dirty.get(&visitor) {
            return Ok(Some(*h));
        }
        if !self.bloom.may_contain(visitor) {
            return Ok(None);
        }
        store.get(visitor)
    }

    /// Notes that the store has history for `visitor` (a session already folded in), so later
    /// lookups go past the Bloom filter.
    pub fn note(&mut self, visitor: u64) {
        self.bloom.insert(visitor);
    }

    pub fn record(
        &mut self,
        store: &mut dyn HistoryStore,
        visitor: u64,
        history: History,
    ) -> Result<(), StoreError> {
        self.bloom.insert(visitor);
        self.dirty.insert(visitor, history);
        if self.dirty.len() >= self.batch {
            self.flush(store)?;
        }
        Ok(())
    }

    /// Writes pending updates to the store, in visitor order (deterministic, and sequential
    /// for the B-tree).
    pub fn flush(&mut self, store: &mut dyn HistoryStore) -> Result<(), StoreError> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let mut pending: Vec<(u64, History)> = self.dirty.drain().collect();
        pending.sort_unstable_by_key(|(v, _)| *v);
        store.put_batch(&mut pending.into_iter())
    }

    pub fn stats(&self) -> HistoryStats {
        self.stats
    }

    /// In-memory bytes: the Bloom filter and the pending updates.
    pub fn bytes(&self) -> usize {
        self.bloom.bytes() + self.dirty.capacity() * (std::mem::size_of::<(u64, History)>() + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(store: &mut dyn HistoryStore) {
        let mut state = HistoryState::new(1000, 0.01, 2);
        assert_eq!(state.lookup(store, 7).unwrap(), None);
        let h = fold(None, 3, 100, 130).unwrap();
        state.record(store, 7, h).unwrap();
        assert_eq!(
            state.lookup(store, 7).unwrap(),
            Some(h),
            "served from pending updates"
        );
        state
            .record(store, 8, fold(None, 1, 5, 35).unwrap())
            .unwrap(); // batch of 2: flushed
        assert_eq!(store.get(7).unwrap(), Some(h));
        assert_eq!(
            state.lookup(store, 7).unwrap(),
            Some(h),
            "served from the store"
        );
        let h2 = fold(Some(h), 2, 200, 230).unwrap();
        assert_eq!(
            h2,
            History {
                sessions: 2,
                views: 5,
                last_seen_ms: 200,
                first_close_ms: 130,
            }
        );
        let stats = state.stats();
        assert_eq!(stats.lookups, 3);
        assert_eq!(stats.bloom_skips, 1);
        assert_eq!(stats.store_reads, 1);

        // Merging keeps whichever summary is newer.
        let older = fold(None, 1, 50, 80).unwrap();
        store
            .merge_batch(&mut [(7, older), (9, older)].into_iter())
            .unwrap();
        assert_eq!(store.get(7).unwrap(), Some(h), "the stored one is newer");
        assert_eq!(store.get(9).unwrap(), Some(older));
        assert_eq!(store.visitors().unwrap(), 3);
        let all = store.all().unwrap();
        assert_eq!(
            all.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
            [7, 8, 9],
            "every visitor, in order"
        );
        assert_eq!(all[0].1, h);
    }

    #[test]
    fn history_round_trips_through_memory_and_redb() {
        roundtrip(&mut MemStore::default());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.redb");
        roundtrip(&mut RedbStore::open(&path).unwrap());
        // and survives reopening
        let mut reopened = RedbStore::open(&path).unwrap();
        assert_eq!(reopened.get(7).unwrap().map(|h| h.views), Some(3));
        assert!(reopened.bytes() > 0);
    }

    #[test]
    fn folding_is_idempotent_and_returning_follows_the_first_close() {
        let first = fold(None, 4, 1_000, 2_800).unwrap();
        let second = fold(Some(first), 2, 5_000, 6_800).unwrap();
        // A store ahead of the replay (it holds both sessions) folds neither again.
        assert_eq!(fold(Some(second), 4, 1_000, 2_800), None);
        assert_eq!(fold(Some(second), 2, 5_000, 6_800), None);
        // The first session, opening at 0 while the store already knows the visitor, is new.
        assert!(!returning(Some(second), 0));
        assert!(
            returning(Some(second), 2_800),
            "the close fires before views at that time"
        );
        assert!(!returning(None, 10_000));
    }

    #[test]
    fn the_changelog_store_hands_out_every_update_once() {
        let mut store = Changelog::new(MemStore::default());
        let h = fold(None, 1, 1, 2).unwrap();
        store.put_batch(&mut [(1, h), (2, h)].into_iter()).unwrap();
        assert_eq!(store.get(2).unwrap(), Some(h));
        assert_eq!(store.take_changes(), vec![(1, h), (2, h)]);
        assert_eq!(store.take_changes(), vec![]);
    }
}
