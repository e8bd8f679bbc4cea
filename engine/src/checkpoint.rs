//! Checkpoints of a tenant job, as records of `state.<tenant>` (the format is
//! `clickpulse_protocol::state`), and the scan that finds the one to restore.
//!
//! ```text
//!  write (every interval, and at a clean stop)        restore (a job starting on any engine)
//!   history changed ─deflate─▶ historylog/<e>.<n>/<i>     read state.<tenant> from the start:
//!     (or all of it, a snapshot, then tombstones           historylog/… ─▶ local store (newest wins)
//!      for the older logs)                                  chunk/…      ─▶ kept by checkpoint id
//!   operator state ─deflate─▶ chunk/<e>.<n>/<i> …          manifest/<e> ─▶ highest epoch complete
//!   manifest/<e>  (chunks, CRC-32, offsets, seq) ◀─last
//!   tombstones for the chunks of checkpoint n-1
//! ```
//!
//! No I/O here: the job moves the records; this module says what they are and what a scan of
//! them means.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};

use clickpulse_protocol::state::{
    CHUNK_BYTES, HISTORY_LOG_ENTRIES, Key, Manifest, VisitorHistory, decode_entries, encode_entries,
};

/// A record to write to `state.<tenant>`: its key and value (`None`: a tombstone).
pub type StateRecord = (String, Option<Vec<u8>>);

/// Why state bytes could not be packed or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint state does not deflate or inflate: {0}")]
    Codec(#[from] std::io::Error),
}

/// Deflates operator state for a checkpoint.
pub fn pack(state: &[u8]) -> Result<Vec<u8>, CheckpointError> {
    let mut encoder = flate2::write::ZlibEncoder::new(
        Vec::with_capacity(state.len() / 4),
        flate2::Compression::fast(),
    );
    encoder.write_all(state)?;
    Ok(encoder.finish()?)
}

/// Inflates what [`pack`] made.
pub fn unpack(packed: &[u8]) -> Result<Vec<u8>, CheckpointError> {
    let mut out = Vec::with_capacity(packed.len() * 4);
    flate2::read::ZlibDecoder::new(packed).read_to_end(&mut out)?;
    Ok(out)
}

/// The history-log records of checkpoint `n` of owner `epoch`: `entries` in records of up to
/// [`HISTORY_LOG_ENTRIES`], each deflated.
pub fn history_records(
    epoch: u64,
    n: u64,
    entries: &[(u64, VisitorHistory)],
) -> Result<Vec<(Key, Vec<u8>)>, CheckpointError> {
    entries
        .chunks(HISTORY_LOG_ENTRIES)
        .enumerate()
        .map(|(index, part)| {
            let key = Key::HistoryLog {
                epoch,
                n,
                index: u32::try_from(index).unwrap_or(u32::MAX),
            };
            Ok((key, pack(&encode_entries(part))?))
        })
        .collect()
}

/// CRC-32 (IEEE) of a checkpoint's packed state.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// The chunk records of a checkpoint, then its manifest (in this order: a manifest in the log
/// means every chunk before it is too), then tombstones for the chunks of `previous`.
/// `manifest.chunks`, `bytes` and `crc32` are filled in from `packed`.
pub fn records(
    manifest: &mut Manifest,
    packed: &[u8],
    previous: Option<&Manifest>,
) -> Vec<StateRecord> {
    let chunks: Vec<&[u8]> = packed.chunks(CHUNK_BYTES).collect();
    manifest.chunks = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
    manifest.bytes = packed.len() as u64;
    manifest.crc32 = crc32(packed);
    let mut out: Vec<StateRecord> = manifest
        .chunk_keys()
        .zip(chunks)
        .map(|(key, chunk)| (key.encode(), Some(chunk.to_vec())))
        .collect();
    out.push((
        Key::Manifest {
            epoch: manifest.epoch,
        }
        .encode(),
        Some(manifest.to_json()),
    ));
    if let Some(previous) = previous {
        out.extend(previous.chunk_keys().map(|key| (key.encode(), None)));
    }
    out
}

/// A complete checkpoint found by a [`Scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub manifest: Manifest,
    /// The packed operator state (see [`unpack`]).
    pub packed: Vec<u8>,
}

/// What reading `state.<tenant>` from its start found, record by record.
#[derive(Debug, Default)]
pub struct Scan {
    chunks: HashMap<(u64, u64), BTreeMap<u32, Vec<u8>>>,
    manifests: BTreeMap<u64, Manifest>,
    /// History entries read (handed to the caller), from logs and single-visitor records.
    pub history_records: u64,
    /// The history-log records on the topic (not deleted by a later tombstone).
    history_logs: BTreeSet<Key>,
    /// Records whose key or value is not of the format: skipped and counted.
    pub unreadable: u64,
}

impl Scan {
    /// Takes one record in log order; visitor history goes to `history`.
    pub fn add(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        mut history: impl FnMut(u64, VisitorHistory),
    ) {
        let Some(key) = key
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(Key::parse)
        else {
            self.unreadable += 1;
            return;
        };
        match (key, value) {
            (Key::History(visitor), Some(v)) => match VisitorHistory::decode(v) {
                Ok(h) => {
                    self.history_records += 1;
                    history(visitor, h);
                }
                Err(error) => {
                    tracing::warn!(visitor, %error, "unreadable history record skipped");
                    self.unreadable += 1;
                }
            },
            // A deleted visitor: nothing to restore (clickpulse writes none).
            (Key::History(_), None) => {}
            (key @ Key::HistoryLog { .. }, Some(v)) => {
                match unpack(v)
                    .map_err(|e| e.to_string())
                    .and_then(|raw| decode_entries(&raw).map_err(|e| e.to_string()))
                {
                    Ok(entries) => {
                        self.history_records += entries.len() as u64;
                        self.history_logs.insert(key);
                        for (visitor, h) in entries {
                            history(visitor, h);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(key = key.encode(), %error, "unreadable history log skipped");
                        self.unreadable += 1;
                    }
                }
            }
            (key @ Key::HistoryLog { .. }, None) => {
                self.history_logs.remove(&key);
            }
            (Key::Chunk { epoch, n, index }, Some(v)) => {
                self.chunks
                    .entry((epoch, n))
                    .or_default()
                    .insert(index, v.to_vec());
            }
            (Key::Chunk { epoch, n, index }, None) => {
                if let Some(chunks) = self.chunks.get_mut(&(epoch, n)) {
                    chunks.remove(&index);
                    if chunks.is_empty() {
                        self.chunks.remove(&(epoch, n));
                    }
                }
            }
            (Key::Manifest { epoch }, Some(v)) => match Manifest::from_json(v) {
                Ok(m) if m.epoch == epoch => {
                    self.manifests.insert(epoch, m);
                }
                Ok(m) => {
                    tracing::warn!(
                        key_epoch = epoch,
                        epoch = m.epoch,
                        "manifest under another epoch's key skipped"
                    );
                    self.unreadable += 1;
                }
                Err(error) => {
                    tracing::warn!(epoch, %error, "unreadable manifest skipped");
                    self.unreadable += 1;
                }
            },
            (Key::Manifest { epoch }, None) => {
                self.manifests.remove(&epoch);
            }
        }
    }

    /// The history-log records left on the topic, oldest first: what a job's next snapshot
    /// deletes.
    pub fn history_logs(&self) -> impl Iterator<Item = Key> + '_ {
        self.history_logs.iter().copied()
    }

    /// Manifests read, by epoch (the newest of each).
    pub fn manifests(&self) -> impl Iterator<Item = &Manifest> {
        self.manifests.values()
    }

    /// The checkpoint to restore: the manifest of the highest epoch whose chunks are all
    /// there and match its CRC. An incomplete one is logged and passed over.
    pub fn latest(&self) -> Option<Found> {
        for m in self.manifests.values().rev() {
            match self.assemble(m) {
                Ok(packed) => {
                    return Some(Found {
                        manifest: m.clone(),
                        packed,
                    });
                }
                Err(why) => {
                    tracing::warn!(
                        epoch = m.epoch,
                        n = m.n,
                        why,
                        "incomplete checkpoint ignored"
                    );
                }
            }
        }
        None
    }

    fn assemble(&self, m: &Manifest) -> Result<Vec<u8>, &'static str> {
        let chunks = self.chunks.get(&(m.epoch, m.n)).ok_or("no chunks")?;
        let mut packed = Vec::with_capacity(usize::try_from(m.bytes).unwrap_or(0));
        for index in 0..m.chunks {
            packed.extend_from_slice(chunks.get(&index).ok_or("a chunk is missing")?);
        }
        if packed.len() as u64 != m.bytes {
            return Err("chunks do not add up to the manifest's length");
        }
        if crc32(&packed) != m.crc32 {
            return Err("CRC-32 mismatch");
        }
        Ok(packed)
    }
}

#[cfg(test)]
mod tests {
    use clickpulse_protocol::Tenant;
    use clickpulse_protocol::state::{MANIFEST_VERSION, PartitionOffset};

    use super::*;

    fn manifest(epoch: u64, n: u64) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            tenant: Tenant::new("acme").unwrap(),
            epoch,
            n,
            run: 1,
            chunks: 0,
            bytes: 0,
            crc32: 0,
            offsets: vec![PartitionOffset {
                partition: 0,
                next: 10 * n as i64,
            }],
            seq: n,
            watermark_ms: 0,
            created_at_ms: 0,
            stopped: None,
        }
    }

    /// State big enough for several chunks, different per checkpoint.
    fn state(tag: u8) -> Vec<u8> {
        (0..CHUNK_BYTES * 5 / 2)
            .map(|i| (i as u8).wrapping_mul(31) ^ tag)
            .collect()
    }

    fn scan(records: &[StateRecord]) -> Scan {
        let mut scan = Scan::default();
        for (k, v) in records {
            scan.add(Some(k.as_bytes()), v.as_deref(), |_, _| {});
        }
        scan
    }

    #[test]
    fn the_newest_complete_checkpoint_is_found_and_its_state_comes_back() {
        let mut log = Vec::new();
        let mut m1 = manifest(3, 1);
        log.extend(records(&mut m1, &state(1), None));
        let mut m2 = manifest(3, 2);
        log.extend(records(&mut m2, &state(2), Some(&m1)));
        assert_eq!(m2.chunks, 3);
        let found = scan(&log).latest().unwrap();
        assert_eq!(found.manifest, m2);
        assert_eq!(found.packed, state(2));
        // The tombstones removed the first checkpoint's chunks.
        assert!(!scan(&log).chunks.contains_key(&(3, 1)));
    }

    #[test]
    fn an_incomplete_checkpoint_is_ignored() {
        let mut m1 = manifest(3, 1);
        let first = records(&mut m1, &state(1), None);
        // The second owner wrote its chunks but died before its manifest.
        let mut m2 = manifest(4, 1);
        let mut second = records(&mut m2, &state(2), None);
        second.pop();
        let log: Vec<StateRecord> = first.iter().chain(&second).cloned().collect();
        assert_eq!(scan(&log).latest().unwrap().manifest, m1);

        // A manifest whose chunk is missing, or corrupt, does not count either.
        let mut m3 = manifest(5, 1);
        let mut third = records(&mut m3, &state(3), None);
        let missing: Vec<StateRecord> = first.iter().chain(third.iter().skip(1)).cloned().collect();
        assert_eq!(scan(&missing).latest().unwrap().manifest, m1);
        if let Some(v) = third[1].1.as_mut() {
            v[7] ^= 1;
        }
        let corrupt: Vec<StateRecord> = first.iter().chain(&third).cloned().collect();
        assert_eq!(scan(&corrupt).latest().unwrap().manifest, m1);
        assert_eq!(scan(&third[..1]).latest(), None, "nothing complete at all");
    }

    #[test]
    fn a_fenced_owner_writing_late_does_not_replace_a_newer_epochs_checkpoint() {
        let mut new_owner = manifest(7, 1);
        let mut log = records(&mut new_owner, &state(7), None);
        // The old owner (epoch 6) wakes up and writes a later checkpoint after it.
        let mut zombie = manifest(6, 40);
        log.extend(records(&mut zombie, &state(6), None));
        assert_eq!(scan(&log).latest().unwrap().manifest, new_owner);
    }

    #[test]
    fn history_records_reach_the_caller_and_bad_records_are_counted() {
        let h = VisitorHistory {
            sessions: 1,
            views: 2,
            last_seen_ms: 3,
            first_close_ms: 4,
        };
        let mut got = Vec::new();
        let mut scan = Scan::default();
        let key = Key::History(9).encode();
        scan.add(Some(key.as_bytes()), Some(&h.encode()), |v, h| {
            got.push((v, h))
        });
        scan.add(Some(key.as_bytes()), Some(b"short"), |_, _| {});
        scan.add(Some(b"what"), Some(b"x"), |_, _| {});
        scan.add(None, Some(b"x"), |_, _| {});
        scan.add(
            Some(b"manifest/00000000000000000001"),
            Some(b"{"),
            |_, _| {},
        );
        assert_eq!(got, vec![(9, h)]);
        assert_eq!((scan.history_records, scan.unreadable), (1, 4));
    }

    #[test]
    fn history_logs_reach_the_caller_in_records_of_bounded_size() {
        let h = |v: u64| VisitorHistory {
            sessions: 1,
            views: 1,
            last_seen_ms: v as i64,
            first_close_ms: 0,
        };
        let entries: Vec<(u64, VisitorHistory)> = (0..(HISTORY_LOG_ENTRIES as u64 * 2 + 5))
            .map(|v| (v, h(v)))
            .collect();
        let records = history_records(3, 8, &entries).unwrap();
        assert_eq!(records.len(), 3);
        assert!(records.iter().all(|(_, v)| v.len() <= CHUNK_BYTES));
        let mut scan = Scan::default();
        let mut got = Vec::new();
        for (key, value) in &records {
            scan.add(Some(key.encode().as_bytes()), Some(value), |v, h| {
                got.push((v, h))
            });
        }
        assert_eq!(got, entries);
        assert_eq!(scan.history_records, entries.len() as u64);
        let keys: Vec<Key> = scan.history_logs().collect();
        assert_eq!(keys, records.iter().map(|(k, _)| *k).collect::<Vec<_>>());

        // A tombstone forgets a log; a damaged one is counted and its entries not used.
        scan.add(Some(keys[0].encode().as_bytes()), None, |_, _| {});
        let damaged = Key::HistoryLog {
            epoch: 3,
            n: 9,
            index: 0,
        }
        .encode();
        scan.add(Some(damaged.as_bytes()), Some(b"not deflated"), |_, _| {
            panic!("nothing from a damaged log")
        });
        let short = pack(&[0u8; 10]).unwrap();
        scan.add(Some(damaged.as_bytes()), Some(&short), |_, _| {
            panic!("nothing from a partial entry")
        });
        assert_eq!(scan.unreadable, 2);
        assert_eq!(scan.history_logs().collect::<Vec<_>>(), keys[1..]);
    }

    #[test]
    fn packing_round_trips() {
        let s = state(9);
        assert_eq!(unpack(&pack(&s).unwrap()).unwrap(), s);
        assert!(unpack(b"not zlib").is_err());
    }
}
