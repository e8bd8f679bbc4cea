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
//! pattern here is batched upserts and point lookups, no scans.

use std::collections::HashMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, TableDefinition};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::bloom::Bloom;

/// A visitor's lifetime summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub sessions: u32,
    pub views: u32,
    pub last_seen_ms: i64,
}

impl History {
    /// Folds one closed session into the summary.
    pub fn fold(prev: Option<History>, views: u32, last_ms: i64) -> History {
        let prev = prev.unwrap_or(History {
            sessions: 0,
            views: 0,
            last_seen_ms: i64::MIN,
        });
        History {
            sessions: prev.sessions.saturating_add(1),
            views: prev.views.saturating_add(views),
            last_seen_ms: prev.last_seen_ms.max(last_ms),
        }
    }
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
    /// Bytes the store occupies (file size on disk, or exact heap use in memory).
    fn bytes(&self) -> u64;
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
}

const TABLE: TableDefinition<u64, (u32, u32, i64)> = TableDefinition::new("visitor_history");

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

impl HistoryStore for RedbStore {
    fn get(&mut self, visitor: u64) -> Result<Option<History>, StoreError> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(TABLE).map_err(store_err)?;
        Ok(table.get(visitor).map_err(store_err)?.map(|v| {
            let (sessions, views, last_seen_ms) = v.value();
            History {
                sessions,
                views,
                last_seen_ms,
            }
        }))
    }

    fn put_batch(
        &mut self,
        batch: &mut dyn Iterator<Item = (u64, History)>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = txn.open_table(TABLE).map_err(store_err)?;
            for (visitor, h) in batch {
                table
                    .insert(visitor, (h.sessions, h.views, h.last_seen_ms))
                    .map_err(store_err)?;
            }
        }
        txn.commit().map_err(store_err)
    }

    fn bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
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
        let h = History::fold(None, 3, 100);
        state.record(store, 7, h).unwrap();
        assert_eq!(
            state.lookup(store, 7).unwrap(),
            Some(h),
            "served from pending updates"
        );
        state.record(store, 8, History::fold(None, 1, 5)).unwrap(); // batch of 2: flushed
        assert_eq!(store.get(7).unwrap(), Some(h));
        assert_eq!(
            state.lookup(store, 7).unwrap(),
            Some(h),
            "served from the store"
        );
        let h2 = History::fold(Some(h), 2, 200);
        assert_eq!(
            h2,
            History {
                sessions: 2,
                views: 5,
                last_seen_ms: 200
            }
        );
        let stats = state.stats();
        assert_eq!(stats.lookups, 3);
        assert_eq!(stats.bloom_skips, 1);
        assert_eq!(stats.store_reads, 1);
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
}
