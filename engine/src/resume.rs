//! Where a resumed job reads each partition from.
//!
//! A checkpoint says, per partition, the offset of the first record it does not hold (`next`).
//! Kafka serves a fetch from any offset, but a broker may serve only from the start of a stored
//! batch (tansu 0.6 lands a fetch on the first batch starting at or after the offset, and
//! answers nothing inside its last batch). A resumed job must read from a position that lands
//! at or before `next`, or the records between `next` and the landing are lost.
//!
//! Finding such a position with look-ups cost seconds: every look-up is a consumer of its own,
//! and tansu took 0.4–0.6 s to answer each in the middle of a million-record partition (2.5–3
//! s of `scripts/bench recovery`). Instead the job's own consumer starts [`MARGIN`] records
//! before `next` and checks where it lands: the first record of the partition at or before
//! `next` proves the position (the job skips the records before `next`); a first record after
//! `next` means the position sits inside a larger batch, and the partition is sought
//! [`FACTOR`] times farther back, down to its first offset. A partition that sends no record
//! for [`SILENCE`] (a position inside the last batch) is sought back too; an end reported
//! before the records that must come first is not believed. Until a partition is proven it
//! neither counts as idle nor as at its end, so the watermark cannot pass records it has yet
//! to read.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How many records before the checkpoint offset a resumed partition is first read from:
/// about 13 ms of re-reading at 1.2 M records/s.
pub const MARGIN: i64 = 16_384;

/// How much farther back each retry is than the one before.
pub const FACTOR: i64 = 16;

/// How long a partition being proven may send nothing, nor its end, before it is sought back.
/// A checkpoint of a job that had caught up is near the end, and its margin often inside the
/// last batch, so this is on the path of many a takeover: short. tansu answered a fetch in the
/// middle of a million-record partition in 0.4–0.6 s with 20 look-ups at once; one that takes
/// longer only makes the job re-read more.
pub const SILENCE: Duration = Duration::from_millis(500);

/// One partition not yet proven.
#[derive(Debug, Clone, Copy)]
struct Pending {
    next: i64,
    low: i64,
    at: i64,
    since: Instant,
}

/// What a record of a partition being proven means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// Not being proven (never was, or proven already): process the record.
    Proven,
    /// The first record at or before `next`: proven; process it (the job skips it if before).
    ProvenNow,
    /// The first record is after `next` though the partition's first offset is: records
    /// after the checkpoint are gone (retention). Process it; nothing earlier can be read.
    Gone { next: i64, first: i64 },
    /// The position lands after `next`: seek the partition to this offset and drop the record.
    SeekTo(i64),
}

/// The resumed partitions still to be proven.
#[derive(Debug, Default)]
pub struct ResumeChecks {
    pending: HashMap<i32, Pending>,
}

/// The first position to read a partition whose first offset is `low` from, to resume at
/// `next`: `margin` records before it ([`MARGIN`] by default).
pub fn first_position(next: i64, low: i64, margin: i64) -> i64 {
    next.saturating_sub(margin.max(0)).max(low)
}

fn farther(p: &Pending) -> i64 {
    let back = (p.next - p.at).max(1).saturating_mul(FACTOR);
    p.next.saturating_sub(back).max(p.low)
}

impl ResumeChecks {
    /// Proves `partition`, read from `at` to resume at `next`, its first offset `low`.
    pub fn add(&mut self, partition: i32, next: i64, low: i64, at: i64, now: Instant) {
        self.pending.insert(
            partition,
            Pending {
                next,
                low,
                at,
                since: now,
            },
        );
    }

    /// Whether `partition` is still being proven (it must not count as idle).
    pub fn is_pending(&self, partition: i32) -> bool {
        self.pending.contains_key(&partition)
    }

    /// Whether every partition is proven.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// A record of `partition` at `offset` arrived.
    pub fn on_record(&mut self, partition: i32, offset: i64, now: Instant) -> Landing {
        let Some(p) = self.pending.get_mut(&partition) else {
            return Landing::Proven;
        };
        if offset <= p.next {
            self.pending.remove(&partition);
            return Landing::ProvenNow;
        }
        if p.at <= p.low {
            let next = p.next;
            self.pending.remove(&partition);
            return Landing::Gone {
                next,
                first: offset,
            };
        }
        p.at = farther(p);
        p.since = now;
        Landing::SeekTo(p.at)
    }

    /// `partition` reported its end before any record. Read from its first offset, that
    /// proves it: nothing is there to be missed. Read from later, records before `next` are
    /// there and must come first: the end is a stale report (tansu's can lag), and the
    /// partition stays unproven until its records or its silence decide.
    pub fn on_end(&mut self, partition: i32) {
        if self.pending.get(&partition).is_some_and(|p| p.at <= p.low) {
            self.pending.remove(&partition);
        }
    }

    /// Partitions silent for [`SILENCE`] since their last seek, with where to seek them now.
    pub fn silent(&mut self, now: Instant) -> Vec<(i32, i64)> {
        let mut seeks = Vec::new();
        for (&partition, p) in &mut self.pending {
            if p.at > p.low && now.duration_since(p.since) >= SILENCE {
                p.at = farther(p);
                p.since = now;
                seeks.push((partition, p.at));
            }
        }
        seeks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where a broker serving batches of `batch` records from offset 0 lands a fetch at `at`
    /// (`None`: inside the last batch of a partition of `n` records, no answer).
    fn landing(at: i64, batch: i64, n: i64) -> Option<i64> {
        let start = (at + batch - 1) / batch * batch;
        (start < n).then_some(start)
    }

    /// Resumes at `next` against such a broker until proven: the position read from and the
    /// number of seeks.
    fn resume(next: i64, batch: i64, n: i64) -> (i64, usize) {
        let t0 = Instant::now();
        let mut checks = ResumeChecks::default();
        let mut at = first_position(next, 0, MARGIN);
        checks.add(0, next, 0, at, t0);
        let mut seeks = 0;
        let mut now = t0;
        while checks.is_pending(0) {
            assert!(seeks < 20, "no end of seeking");
            match landing(at, batch, n) {
                Some(first) => match checks.on_record(0, first, now) {
                    Landing::SeekTo(to) => {
                        (at, seeks) = (to, seeks + 1);
                    }
                    Landing::ProvenNow => assert!(first <= next),
                    other => panic!("{other:?}"),
                },
                None => {
                    now += SILENCE;
                    let s = checks.silent(now);
                    assert_eq!(s.len(), 1);
                    (at, seeks) = (s[0].1, seeks + 1);
                }
            }
        }
        (at, seeks)
    }

    #[test]
    fn a_broker_serving_any_offset_is_read_a_margin_before_the_checkpoint() {
        assert_eq!(resume(100_000, 1, 200_000), (100_000 - MARGIN, 0));
        assert_eq!(resume(5, 1, 200_000), (0, 0));
    }

    #[test]
    fn a_position_inside_a_larger_batch_is_sought_farther_back_until_it_lands_before() {
        // Batches of 100,000: 16,384 before 250,000 lands on 300,000, 16x farther on 200,000.
        let (at, seeks) = resume(250_000, 100_000, 1_000_000);
        assert_eq!(seeks, 1);
        assert!(landing(at, 100_000, 1_000_000).unwrap() <= 250_000);
    }

    #[test]
    fn a_position_inside_the_last_batch_is_sought_back_after_the_silence() {
        // 16,384 before 990,000 is inside the last batch (900,000 on): no answer. 16x farther
        // back lands on 800,000.
        let (at, seeks) = resume(990_000, 100_000, 1_000_000);
        assert_eq!(seeks, 1);
        assert_eq!(landing(at, 100_000, 1_000_000), Some(800_000));
    }

    #[test]
    fn records_gone_below_the_checkpoint_are_reported_not_sought_forever() {
        let mut checks = ResumeChecks::default();
        let now = Instant::now();
        checks.add(0, 10, 50, first_position(10, 50, MARGIN), now);
        assert_eq!(
            checks.on_record(0, 50, now),
            Landing::Gone {
                next: 10,
                first: 50
            }
        );
        assert!(checks.is_empty());
        assert_eq!(checks.on_record(0, 51, now), Landing::Proven);
    }

    #[test]
    fn an_end_proves_a_partition_read_from_its_first_offset_and_a_proven_one_is_left_alone() {
        let mut checks = ResumeChecks::default();
        let now = Instant::now();
        checks.add(1, 100, 0, 0, now);
        checks.on_end(1);
        assert!(!checks.is_pending(1));
        assert!(checks.silent(now + SILENCE * 2).is_empty());
    }

    #[test]
    fn an_end_before_the_records_that_must_come_first_is_not_believed() {
        let mut checks = ResumeChecks::default();
        let now = Instant::now();
        checks.add(1, 100_000, 0, first_position(100_000, 0, MARGIN), now);
        checks.on_end(1);
        assert!(checks.is_pending(1), "a stale end proved nothing");
        assert_eq!(checks.on_record(1, 100_500, now), Landing::SeekTo(0));
    }
}
