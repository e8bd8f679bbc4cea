//! Job checkpoints on `state.<tenant>`: what any engine needs to resume a tenant's job exactly.
//!
//! One partition, `cleanup.policy=compact`. These kinds of record, told apart by the key:
//!
//! | key                                   | value                                        |
//! |---------------------------------------|----------------------------------------------|
//! | `historylog/<epoch>.<n>/<i>` (zero-padded) | history entries written with checkpoint *n* of owner *epoch*, zlib-deflated ([`encode_entries`]) |
//! | `chunk/<epoch>.<n>/<i>` (zero-padded) | bytes `i·CHUNK_BYTES…` of checkpoint *n* of owner *epoch* |
//! | `manifest/<epoch>` (zero-padded)      | the [`Manifest`] of that owner's newest checkpoint, JSON |
//! | `history/<visitor, 16 hex digits>`    | one visitor's history, 25 bytes ([`VisitorHistory`]); written by earlier versions, still read |
//!
//! **History** is a log of visitor summaries that a restore merges into its store, the newest
//! `last_seen_ms` of each visitor winning, so the order of entries does not matter. With each
//! checkpoint the job writes the summaries it changed since the last, up to
//! [`HISTORY_LOG_ENTRIES`] per record (a restore reads a few large records, not one per
//! visitor: the broker's cost is per record). When the log holds more entries than twice the
//! visitors it describes, the job writes every visitor's summary as one log (a snapshot) and
//! then deletes the logs it knew of (tombstones), so the topic stays about as large as the
//! history. Updates are idempotent (a session is folded in only when it ends after the
//! summary's `last_seen_ms`), so a store that holds updates made *after* the checkpoint being
//! restored gives the same results as one that does not.
//!
//! **A checkpoint** is the job's operator state (the engine's own serde encoding, postcard;
//! deflated with zlib) cut into chunks under the
//! broker's message size, followed by its manifest, written last: a checkpoint whose manifest is
//! missing, or whose chunks are missing or fail the manifest's CRC-32, is ignored. Manifests are
//! keyed by epoch, so a fenced-off owner (older epoch) writing late can never replace a newer
//! owner's manifest; a restore takes the manifest of the highest epoch that is complete. After a
//! manifest lands, the chunks of the checkpoint before it are deleted (tombstones).
//!
//! Example manifest (owner epoch 4, its 17th checkpoint, operator state in 2 chunks):
//!
//! ```json
//! {"version":1,"tenant":"acme","epoch":4,"n":17,"run":2,"chunks":2,"bytes":1500000,
//!  "crc32":3735928559,"offsets":[{"partition":0,"next":120400},{"partition":1,"next":119872}],
//!  "seq":5120,"watermark_ms":938480100000,"created_at_ms":1764570000000,"stopped":null}
//! ```
//!
//! ```
//! use clickpulse_protocol::state::{Key, VisitorHistory};
//! assert_eq!(Key::History(42).encode(), "history/000000000000002a");
//! assert_eq!(Key::Chunk { epoch: 4, n: 17, index: 1 }.encode(),
//!            "chunk/00000000000000000004.0000000017/000001");
//! assert_eq!(Key::parse("manifest/00000000000000000004"), Some(Key::Manifest { epoch: 4 }));
//! let h = VisitorHistory { sessions: 2, views: 9, last_seen_ms: 938_476_900_000,
//!                          first_close_ms: 938_478_000_000 };
//! assert_eq!(VisitorHistory::decode(&h.encode()), Ok(h));
//! assert_eq!(Key::HistoryLog { epoch: 4, n: 17, index: 0 }.encode(),
//!            "historylog/00000000000000000004.0000000017/000000");
//! let entries = clickpulse_protocol::state::encode_entries(&[(42, h)]);
//! assert_eq!(entries.len(), 33); // visitor (u64 LE) + the 25-byte summary
//! assert_eq!(clickpulse_protocol::state::decode_entries(&entries), Ok(vec![(42, h)]));
//! ```

use serde::{Deserialize, Serialize};

use crate::tenant::Tenant;

/// Largest chunk of operator state in one record: well under Kafka's default 1 MiB message limit
/// with room for the key and batch overhead.
pub const CHUNK_BYTES: usize = 512 * 1024;

/// Version of the manifest layout.
pub const MANIFEST_VERSION: u32 = 1;

/// First byte of a v1 visitor-history value.
pub const HISTORY_V1: u8 = 0xB1;

/// Length of a v1 visitor-history value.
pub const HISTORY_LEN: usize = 25;

/// Length of one entry of a history log: the visitor id, then its summary.
pub const HISTORY_ENTRY_LEN: usize = 8 + HISTORY_LEN;

/// Most entries in one history-log record: 396,000 bytes before deflating, under
/// [`CHUNK_BYTES`] even if nothing compresses.
pub const HISTORY_LOG_ENTRIES: usize = 12_000;
const _: () = assert!(HISTORY_LOG_ENTRIES * HISTORY_ENTRY_LEN < CHUNK_BYTES);

/// The key of a `state.<tenant>` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    History(u64),
    HistoryLog { epoch: u64, n: u64, index: u32 },
    Chunk { epoch: u64, n: u64, index: u32 },
    Manifest { epoch: u64 },
}

impl Key {
    pub fn encode(&self) -> String {
        match self {
            Key::History(visitor) => format!("history/{visitor:016x}"),
            Key::HistoryLog { epoch, n, index } => {
                format!("historylog/{epoch:020}.{n:010}/{index:06}")
            }
            Key::Chunk { epoch, n, index } => format!("chunk/{epoch:020}.{n:010}/{index:06}"),
            Key::Manifest { epoch } => format!("manifest/{epoch:020}"),
        }
    }

    /// The key of a record, or `None` for a key that is not one of the kinds.
    pub fn parse(key: &str) -> Option<Key> {
        if let Some(rest) = key.strip_prefix("historylog/") {
            let (epoch, n, index) = numbered(rest)?;
            return Some(Key::HistoryLog { epoch, n, index });
        }
        if let Some(hex) = key.strip_prefix("history/") {
            return (hex.len() == 16)
                .then(|| u64::from_str_radix(hex, 16).ok())
                .flatten()
                .map(Key::History);
        }
        if let Some(rest) = key.strip_prefix("chunk/") {
            let (epoch, n, index) = numbered(rest)?;
            return Some(Key::Chunk { epoch, n, index });
        }
        key.strip_prefix("manifest/")
            .and_then(|e| e.parse().ok())
            .map(|epoch| Key::Manifest { epoch })
    }
}

/// `<epoch>.<n>/<index>` of a chunk or history-log key.
fn numbered(rest: &str) -> Option<(u64, u64, u32)> {
    let (id, index) = rest.split_once('/')?;
    let (epoch, n) = id.split_once('.')?;
    Some((epoch.parse().ok()?, n.parse().ok()?, index.parse().ok()?))
}

/// The entries of a history-log record before deflating: per visitor, its id (u64 LE) and
/// its [`VisitorHistory`] (25 bytes), back to back.
pub fn encode_entries(entries: &[(u64, VisitorHistory)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * HISTORY_ENTRY_LEN);
    for (visitor, h) in entries {
        out.extend_from_slice(&visitor.to_le_bytes());
        out.extend_from_slice(&h.encode());
    }
    out
}

/// What [`encode_entries`] made; an error for a length that is not whole entries or an entry
/// that does not decode.
pub fn decode_entries(bytes: &[u8]) -> Result<Vec<(u64, VisitorHistory)>, StateError> {
    if !bytes.len().is_multiple_of(HISTORY_ENTRY_LEN) {
        return Err(StateError::LogLength(bytes.len()));
    }
    bytes
        .chunks_exact(HISTORY_ENTRY_LEN)
        .map(|e| {
            let mut id = [0u8; 8];
            id.copy_from_slice(&e[..8]);
            Ok((u64::from_le_bytes(id), VisitorHistory::decode(&e[8..])?))
        })
        .collect()
}

/// A visitor's lifetime summary, as the history log carries it.
///
/// ```text
/// offset  size  field
///      0     1  version, always 0xB1
///      1     4  sessions (u32 LE)
///      5     4  views (u32 LE)
///      9     8  last_seen_ms: last view of the newest session folded in (i64 LE)
///     17     8  first_close_ms: when the visitor's first session closed (i64 LE)
/// ```
///
/// A session opening at `t` is a returning visitor's when `first_close_ms <= t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisitorHistory {
    pub sessions: u32,
    pub views: u32,
    pub last_seen_ms: i64,
    pub first_close_ms: i64,
}

/// Why bytes are not a visitor-history value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("history value has {0} bytes; expected {HISTORY_LEN}")]
    HistoryLength(usize),
    #[error("history value version byte is {0:#04x}; expected {HISTORY_V1:#04x}")]
    HistoryVersion(u8),
    #[error("history log of {0} bytes is not whole {HISTORY_ENTRY_LEN}-byte entries")]
    LogLength(usize),
}

impl VisitorHistory {
    pub fn encode(&self) -> [u8; HISTORY_LEN] {
        let mut out = [0u8; HISTORY_LEN];
        out[0] = HISTORY_V1;
        out[1..5].copy_from_slice(&self.sessions.to_le_bytes());
        out[5..9].copy_from_slice(&self.views.to_le_bytes());
        out[9..17].copy_from_slice(&self.last_seen_ms.to_le_bytes());
        out[17..25].copy_from_slice(&self.first_close_ms.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let b: &[u8; HISTORY_LEN] = bytes
            .try_into()
            .map_err(|_| StateError::HistoryLength(bytes.len()))?;
        if b[0] != HISTORY_V1 {
            return Err(StateError::HistoryVersion(b[0]));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let i64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            i64::from_le_bytes(a)
        };
        Ok(VisitorHistory {
            sessions: u32_at(1),
            views: u32_at(5),
            last_seen_ms: i64_at(9),
            first_close_ms: i64_at(17),
        })
    }
}

/// Where a checkpoint's job had read to in one partition of `clicks.<tenant>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOffset {
    pub partition: i32,
    /// The first offset not yet processed: a restored job reads from here.
    pub next: i64,
}

/// How the job that wrote a checkpoint ended, if it was its last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stopped {
    /// Nobody watched after the linger: a later job reading one window back starts afresh.
    Linger,
    /// The engine shut down and handed the job to another: the next owner resumes it.
    HandOff,
}

/// The commit record of one checkpoint (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub tenant: Tenant,
    /// Ownership epoch of the job that wrote it.
    pub epoch: u64,
    /// Its number among that owner's checkpoints, from 1.
    pub n: u64,
    /// The run the state belongs to: the epoch of the owner that started its numbering (see
    /// [`crate::results`]).
    pub run: u64,
    pub chunks: u32,
    /// Length of the operator state, all chunks together.
    pub bytes: u64,
    /// CRC-32 (IEEE) of the operator state.
    pub crc32: u32,
    pub offsets: Vec<PartitionOffset>,
    /// Sequence number of the last result emitted before the checkpoint.
    pub seq: u64,
    pub watermark_ms: i64,
    pub created_at_ms: i64,
    /// Set on the last checkpoint of a job that stopped cleanly.
    pub stopped: Option<Stopped>,
}

impl Manifest {
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of plain fields always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The keys of this checkpoint's chunks.
    pub fn chunk_keys(&self) -> impl Iterator<Item = Key> + '_ {
        (0..self.chunks).map(|index| Key::Chunk {
            epoch: self.epoch,
            n: self.n,
            index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_by_epoch_and_number() {
        let keys = [
            Key::History(0),
            Key::History(u64::MAX),
            Key::Chunk {
                epoch: 1,
                n: 2,
                index: 3,
            },
            Key::Manifest { epoch: 99 },
            Key::HistoryLog {
                epoch: u64::MAX,
                n: 7,
                index: 11,
            },
        ];
        for k in keys {
            assert_eq!(Key::parse(&k.encode()), Some(k));
        }
        let a = Key::Manifest { epoch: 9 }.encode();
        let b = Key::Manifest { epoch: 10 }.encode();
        assert!(a < b, "zero-padded: text order is epoch order");
        for bad in [
            "history/2a",
            "history/zzzzzzzzzzzzzzzz",
            "chunk/1/2",
            "historylog/1.2",
            "manifest/x",
            "other",
        ] {
            assert_eq!(Key::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn history_values_round_trip_and_bad_ones_are_errors() {
        let h = VisitorHistory {
            sessions: 3,
            views: u32::MAX,
            last_seen_ms: -5,
            first_close_ms: i64::MAX,
        };
        assert_eq!(VisitorHistory::decode(&h.encode()), Ok(h));
        assert_eq!(
            VisitorHistory::decode(&[HISTORY_V1; 3]),
            Err(StateError::HistoryLength(3))
        );
        let mut wrong = h.encode();
        wrong[0] = 0;
        assert_eq!(
            VisitorHistory::decode(&wrong),
            Err(StateError::HistoryVersion(0))
        );
    }

    #[test]
    fn history_logs_round_trip_and_partial_entries_are_errors() {
        let h = |v| VisitorHistory {
            sessions: v,
            views: 2 * v,
            last_seen_ms: i64::from(v),
            first_close_ms: -1,
        };
        let entries: Vec<(u64, VisitorHistory)> =
            (0..100).map(|v| (u64::from(v) << 40, h(v))).collect();
        let bytes = encode_entries(&entries);
        assert_eq!(bytes.len(), 100 * HISTORY_ENTRY_LEN);
        assert_eq!(decode_entries(&bytes), Ok(entries));
        assert_eq!(decode_entries(&bytes[..40]), Err(StateError::LogLength(40)));
        let mut bad = bytes.clone();
        bad[8] = 0;
        assert_eq!(decode_entries(&bad), Err(StateError::HistoryVersion(0)));
        assert_eq!(decode_entries(&[]), Ok(vec![]));
    }

    #[test]
    fn documented_manifest_parses() {
        let doc = r#"{"version":1,"tenant":"acme","epoch":4,"n":17,"run":2,"chunks":2,"bytes":1500000,
 "crc32":3735928559,"offsets":[{"partition":0,"next":120400},{"partition":1,"next":119872}],
 "seq":5120,"watermark_ms":938480100000,"created_at_ms":1764570000000,"stopped":null}"#;
        let m = Manifest::from_json(doc.as_bytes()).unwrap();
        assert_eq!(m.chunk_keys().count(), 2);
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        let stopped = Manifest {
            stopped: Some(Stopped::Linger),
            ..m
        };
        assert!(
            String::from_utf8(stopped.to_json())
                .unwrap()
                .contains(r#""stopped":"linger""#)
        );
    }
}
