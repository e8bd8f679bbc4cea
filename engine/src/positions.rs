//! Where a job is in each partition of its input, and what it does with each record its
//! consumer hands it.
//!
//! A job counts every offset once. Its consumer can hand it a record it must not count: after a
//! resume, the records of the stored batch before the checkpoint's offset (a broker that serves
//! fetches only from a batch's start, such as tansu, sends them), and, rarely, a stretch of
//! records it handed out already (seen against tansu shortly after a resume: offsets a few
//! hundred back, all of them counted before). Offsets only grow within a partition, so each
//! record is taken by its offset against the partition's position:
//!
//! ```
//! use clickpulse_engine::positions::{Positions, Take};
//!
//! // Resumed at offset 100 of partition 0; the consumer starts at the batch holding 90.
//! let mut at = Positions::new([(0, 100)]);
//! assert_eq!(at.take(0, 90), Take::Before);
//! assert_eq!(at.take(0, 100), Take::Process);
//! assert_eq!(at.take(0, 101), Take::Process);
//! // Handed out again: counted already.
//! assert_eq!(at.take(0, 95), Take::Again { next: 102 });
//! assert_eq!(at.take(0, 101), Take::Again { next: 102 });
//! // Jumped over 102..105: processed, and the jump is told.
//! assert_eq!(at.take(0, 105), Take::Jumped { missing: 3 });
//! assert_eq!(at.next(0), Some(106));
//! ```

use std::collections::HashMap;

/// What to do with a record, by its offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// The next record of the partition: process it.
    Process,
    /// Before the partition's first offset to process, read only because reading started
    /// earlier (the batch holding a checkpoint's offset starts before it): skip it.
    Before,
    /// Below the partition's position `next` after records were processed there: handed out
    /// again, and already counted. Skip it.
    Again { next: i64 },
    /// Past the partition's position: `missing` offsets were never handed out. Process it
    /// (the offsets jumped over may be a compacted or transactional topic's gaps, or records
    /// the consumer skipped; either way they are not this record's to count).
    Jumped { missing: i64 },
}

/// Per partition, the first offset to process and the next one.
#[derive(Debug, Clone, Default)]
pub struct Positions {
    parts: HashMap<i32, Position>,
}

#[derive(Debug, Clone, Copy)]
struct Position {
    first: i64,
    next: i64,
}

impl Positions {
    /// Positions starting at each partition's first offset to process.
    pub fn new(starts: impl IntoIterator<Item = (i32, i64)>) -> Positions {
        Positions {
            parts: starts
                .into_iter()
                .map(|(p, first)| (p, Position { first, next: first }))
                .collect(),
        }
    }

    /// What to do with the record at `offset` of `partition`; a record to process moves the
    /// position past it. A partition not known yet starts at this record.
    pub fn take(&mut self, partition: i32, offset: i64) -> Take {
        let at = self.parts.entry(partition).or_insert(Position {
            first: offset,
            next: offset,
        });
        if offset < at.next {
            return if at.next == at.first {
                Take::Before
            } else {
                Take::Again { next: at.next }
            };
        }
        let missing = offset - at.next;
        at.next = offset + 1;
        if missing == 0 {
            Take::Process
        } else {
            Take::Jumped { missing }
        }
    }

    /// The next offset to process in `partition`.
    pub fn next(&self, partition: i32) -> Option<i64> {
        self.parts.get(&partition).map(|at| at.next)
    }

    /// Every partition's next offset to process, by partition.
    pub fn offsets(&self) -> Vec<(i32, i64)> {
        let mut all: Vec<(i32, i64)> = self.parts.iter().map(|(&p, at)| (p, at.next)).collect();
        all.sort_unstable();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_start_processes_from_its_first_offset() {
        let mut at = Positions::new([(0, 0), (1, 7)]);
        assert_eq!(at.take(0, 0), Take::Process);
        assert_eq!(at.take(1, 7), Take::Process);
        assert_eq!(at.take(1, 8), Take::Process);
        assert_eq!(at.offsets(), vec![(0, 1), (1, 9)]);
    }

    #[test]
    fn records_before_the_first_offset_are_skipped_until_the_first_is_processed() {
        let mut at = Positions::new([(2, 1_000)]);
        for offset in 990..1_000 {
            assert_eq!(at.take(2, offset), Take::Before, "offset {offset}");
        }
        assert_eq!(at.take(2, 1_000), Take::Process);
        // Once processing began, an offset before the first is a record handed out again.
        assert_eq!(at.take(2, 995), Take::Again { next: 1_001 });
        assert_eq!(at.next(2), Some(1_001));
    }

    #[test]
    fn a_stretch_handed_out_again_is_skipped_and_the_position_does_not_move_back() {
        let mut at = Positions::new([(0, 242_000)]);
        for offset in 242_000..242_780 {
            assert_eq!(at.take(0, offset), Take::Process);
        }
        // The consumer goes back 265 records, then on past where it was.
        for offset in 242_515..242_780 {
            assert_eq!(
                at.take(0, offset),
                Take::Again { next: 242_780 },
                "offset {offset}"
            );
        }
        assert_eq!(at.next(0), Some(242_780));
        assert_eq!(at.take(0, 242_780), Take::Process);
        assert_eq!(at.next(0), Some(242_781));
    }

    #[test]
    fn each_offset_is_processed_once_whatever_the_order_handed_out() {
        // Any sequence of offsets: the processed ones are exactly the distinct offsets at or
        // after the first, in increasing order, each once.
        let handed: Vec<i64> = [
            5, 6, 7, 3, 4, 5, 6, 7, 8, 9, 6, 7, 10, 11, 12, 2, 13, 13, 14,
        ]
        .to_vec();
        let mut at = Positions::new([(0, 5)]);
        let processed: Vec<i64> = handed
            .iter()
            .copied()
            .filter(|&o| matches!(at.take(0, o), Take::Process | Take::Jumped { .. }))
            .collect();
        assert_eq!(processed, (5..=14).collect::<Vec<_>>());
    }

    #[test]
    fn a_jump_is_processed_and_says_how_many_offsets_were_missing() {
        let mut at = Positions::new([(0, 10)]);
        assert_eq!(at.take(0, 10), Take::Process);
        assert_eq!(at.take(0, 14), Take::Jumped { missing: 3 });
        assert_eq!(at.next(0), Some(15));
        // The missing offsets, handed out late, are below the position: not counted twice,
        // nor at all (that is what the jump's warning is for).
        assert_eq!(at.take(0, 12), Take::Again { next: 15 });
    }

    #[test]
    fn an_unknown_partition_starts_at_its_first_record() {
        let mut at = Positions::default();
        assert_eq!(at.take(3, 40), Take::Process);
        assert_eq!(at.take(3, 41), Take::Process);
        assert_eq!(at.take(3, 40), Take::Again { next: 42 });
        assert_eq!(at.offsets(), vec![(3, 42)]);
    }
}
