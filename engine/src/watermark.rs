//! Event-time watermark over the partitions of a job.
//!
//! The watermark is the minimum over partitions of their newest event time, minus the allowed
//! lateness; it never goes back. A partition marked idle (by the job, after a configurable time
//! without records) stops holding it back until it delivers again. A partition that has not
//! delivered anything yet holds it at the start, unless it is idle.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Partition {
    newest: Option<i64>,
    idle: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    lateness_ms: i64,
    partitions: Vec<Partition>,
    current: i64,
}

impl Watermark {
    pub fn new(partitions: usize, lateness_ms: i64) -> Self {
        Watermark {
            lateness_ms,
            partitions: vec![
                Partition {
                    newest: None,
                    idle: false,
                };
                partitions.max(1)
            ],
            current: i64::MIN,
        }
    }

    pub fn current(&self) -> i64 {
        self.current
    }

    /// Per partition, its newest event time and whether it is idle (for progress reports).
    pub fn partitions(&self) -> Vec<(Option<i64>, bool)> {
        self.partitions.iter().map(|p| (p.newest, p.idle)).collect()
    }

    fn slot(&mut self, partition: usize) -> &mut Partition {
        if partition >= self.partitions.len() {
            // A partition added to the topic while the job runs.
            self.partitions.resize(
                partition + 1,
                Partition {
                    newest: None,
                    idle: false,
                },
            );
        }
        &mut self.partitions[partition]
    }

    /// Notes an event; returns true when the watermark advanced.
    pub fn observe(&mut self, partition: usize, time_ms: i64) -> bool {
        let p = self.slot(partition);
        p.idle = false;
        p.newest = Some(p.newest.map_or(time_ms, |n| n.max(time_ms)));
        self.recompute()
    }

    /// Marks a partition idle; returns true when the watermark advanced.
    pub fn set_idle(&mut self, partition: usize) -> bool {
        self.slot(partition).idle = true;
        self.recompute()
    }

    /// Forgets which partitions were idle (they hold the watermark back again until marked
    /// idle anew); it does not move.
    pub fn clear_idle(&mut self) {
        for p in &mut self.partitions {
            p.idle = false;
        }
    }

    /// Moves the watermark to at least `to` (end of a bounded input).
    pub fn advance_to(&mut self, to: i64) {
        self.current = self.current.max(to);
    }

    fn recompute(&mut self) -> bool {
        let active = self.partitions.iter().filter(|p| !p.idle);
        let candidate = if self.partitions.iter().all(|p| p.idle) {
            self.partitions.iter().filter_map(|p| p.newest).max()
        } else {
            // An active partition without data yet holds the watermark back.
            active.map(|p| p.newest).min().flatten()
        };
        let Some(candidate) = candidate.map(|t| t.saturating_sub(self.lateness_ms)) else {
            return false;
        };
        if candidate > self.current {
            self.current = candidate;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slowest_partition_minus_lateness_and_never_backwards() {
        let mut w = Watermark::new(2, 5);
        assert!(!w.observe(0, 100), "partition 1 has not delivered yet");
        assert_eq!(w.current(), i64::MIN);
        assert!(w.observe(1, 50));
        assert_eq!(w.current(), 45);
        assert!(!w.observe(1, 20), "older events never move it back");
        assert_eq!(w.current(), 45);
        assert!(w.observe(1, 200));
        assert_eq!(w.current(), 95);
    }

    #[test]
    fn an_idle_partition_stops_holding_the_watermark() {
        let mut w = Watermark::new(2, 5);
        w.observe(0, 100);
        assert!(w.set_idle(1));
        assert_eq!(w.current(), 95);
        w.observe(1, 300); // active again
        w.observe(0, 400);
        assert_eq!(w.current(), 295);
    }
}
