//! Which partitions of a job's input are idle: they stop holding the watermark back.
//!
//! The watermark is the least of the partitions' event times, so a partition with nothing to
//! say would stop every result; one declared idle too early has its records counted late once
//! the others move the watermark past them. The rules:
//!
//! - A partition that reported its end (partition EOF) and stayed silent for the idle timeout
//!   is idle. One that reports its end having delivered nothing since the start is idle at
//!   once (a starting job's first results do not wait for the timeout).
//! - A partition that has delivered nothing and reported no end either (a batch-serving broker
//!   such as tansu reports no end for a position inside its last batch) must not hold the
//!   watermark forever, but one not fetched yet must not be passed either. It is idle only
//!   once every other partition has been quiet (at its end, or idle) for a grace long enough
//!   for its fetch. While the others deliver it holds the watermark, and after five graces
//!   the job warns about it once.
//! - A record from an idle partition ends the lull for all: every partition holds the
//!   watermark again until it is silent at its end anew (the others' share of a burst may be a
//!   batch behind).
//!
//! ```
//! use std::time::{Duration, Instant};
//! use clickpulse_engine::idleness::Idleness;
//!
//! let t0 = Instant::now();
//! let mut idleness = Idleness::new(2, Duration::from_millis(300), t0);
//! let ms = |ms| t0 + Duration::from_millis(ms);
//! idleness.on_record(0, ms(0));
//! // Partition 1 is not fetched yet while 0 delivers: it holds the watermark.
//! idleness.on_record(0, ms(9_000));
//! assert!(idleness.check(ms(9_100)).idle.is_empty());
//! // Partition 0 reaches its end and is silent: idle after the timeout.
//! idleness.on_end(0);
//! assert_eq!(idleness.check(ms(9_400)).idle, vec![0]);
//! // Partition 1 goes once 0 has been quiet for the grace (2 s here).
//! assert!(idleness.check(ms(11_000)).idle.is_empty());
//! assert_eq!(idleness.check(ms(11_500)).idle, vec![1]);
//! ```

use std::time::{Duration, Instant};

/// The idle state of a job's partitions (indexed from 0).
#[derive(Debug, Clone)]
pub struct Idleness {
    timeout: Duration,
    grace: Duration,
    started: Instant,
    parts: Vec<Part>,
    /// Since when no partition that delivered has been delivering.
    quiet_since: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Part {
    last_seen: Instant,
    seen_any: bool,
    at_end: bool,
    idle: bool,
    warned: bool,
}

/// What an idle check found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Check {
    /// Partitions idle from now on.
    pub idle: Vec<usize>,
    /// Partitions that have delivered nothing since the start, reported no end, and hold the
    /// watermark back while the others deliver (each told once).
    pub waiting: Vec<usize>,
}

impl Idleness {
    /// `partitions` partitions, none idle, with the idle timeout `timeout`, starting at `now`.
    pub fn new(partitions: usize, timeout: Duration, now: Instant) -> Idleness {
        Idleness {
            timeout,
            grace: (timeout * 4).max(Duration::from_secs(2)),
            started: now,
            parts: vec![
                Part {
                    last_seen: now,
                    seen_any: false,
                    at_end: false,
                    idle: false,
                    warned: false,
                };
                partitions
            ],
            quiet_since: None,
        }
    }

    /// The start-up grace: how long a partition that never delivered may take to.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// A record of partition `p` at `now`. True when it ends a lull: every partition holds the
    /// watermark back again (the caller tells the pipeline).
    pub fn on_record(&mut self, p: usize, now: Instant) -> bool {
        let Some(part) = self.parts.get(p) else {
            return false;
        };
        let lull_ended = part.idle;
        if lull_ended {
            for q in self.parts.iter_mut().filter(|q| q.idle) {
                q.idle = false;
                q.last_seen = now;
            }
        }
        let part = &mut self.parts[p];
        part.last_seen = now;
        part.seen_any = true;
        part.at_end = false;
        part.idle = false;
        lull_ended
    }

    /// Partition `p` reported its end. True when that makes it idle at once: it delivered
    /// nothing since the start.
    pub fn on_end(&mut self, p: usize) -> bool {
        let Some(part) = self.parts.get_mut(p) else {
            return false;
        };
        part.at_end = true;
        if !part.seen_any && !part.idle {
            part.idle = true;
            return true;
        }
        false
    }

    /// Every partition has reported its end since its last record.
    pub fn all_at_end(&self) -> bool {
        self.parts.iter().all(|p| p.at_end)
    }

    /// The idle check at `now`: which partitions go idle (the caller tells the pipeline), and
    /// which never-delivering ones to warn about.
    pub fn check(&mut self, now: Instant) -> Check {
        let delivering = self
            .parts
            .iter()
            .any(|p| p.seen_any && !p.at_end && !p.idle);
        if delivering {
            self.quiet_since = None;
        } else {
            self.quiet_since.get_or_insert(now);
        }
        let since_start = now.saturating_duration_since(self.started);
        let given_up = since_start >= self.grace
            && self
                .quiet_since
                .is_some_and(|t| now.saturating_duration_since(t) >= self.grace);
        let mut check = Check::default();
        for (p, part) in self.parts.iter_mut().enumerate() {
            if part.idle {
                continue;
            }
            let never = !part.seen_any && !part.at_end;
            if never && !part.warned && since_start >= self.grace * 5 && !given_up {
                part.warned = true;
                check.waiting.push(p);
            }
            let silent = part.at_end || (never && given_up);
            if silent && now.saturating_duration_since(part.last_seen) >= self.timeout {
                part.idle = true;
                check.idle.push(p);
            }
        }
        check
    }

    /// Whether partition `p` is idle.
    pub fn is_idle(&self, p: usize) -> bool {
        self.parts.get(p).is_some_and(|part| part.idle)
    }

    /// Whether partition `p` has reported its end since its last record.
    pub fn at_end(&self, p: usize) -> bool {
        self.parts.get(p).is_some_and(|part| part.at_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(300);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_partition_at_its_end_is_idle_after_the_timeout() {
        let t0 = Instant::now();
        let mut idleness = Idleness::new(2, TIMEOUT, t0);
        idleness.on_record(0, at(t0, 0));
        idleness.on_record(1, at(t0, 0));
        assert!(!idleness.on_end(0), "it delivered: not at once");
        assert!(idleness.check(at(t0, 200)).idle.is_empty());
        idleness.on_record(1, at(t0, 250));
        assert_eq!(idleness.check(at(t0, 300)).idle, vec![0]);
        assert!(idleness.is_idle(0));
        // Once idle, not again.
        assert!(idleness.check(at(t0, 900)).idle.is_empty());
    }

    #[test]
    fn a_silent_partition_without_an_end_is_not_idle() {
        let t0 = Instant::now();
        let mut idleness = Idleness::new(2, TIMEOUT, t0);
        idleness.on_record(0, at(t0, 0));
        idleness.on_record(1, at(t0, 60_000));
        // Partition 0 delivered once and then nothing, but never reported its end: it may
        // still be fetching (a busy consumer).
        assert!(idleness.check(at(t0, 60_000)).idle.is_empty());
    }

    #[test]
    fn an_end_with_nothing_since_the_start_idles_at_once() {
        let t0 = Instant::now();
        let mut idleness = Idleness::new(3, TIMEOUT, t0);
        assert!(idleness.on_end(2));
        assert!(idleness.is_idle(2));
        assert!(!idleness.on_end(2), "once");
    }

    #[test]
    fn a_partition_never_fetched_holds_the_watermark_while_the_others_deliver() {
        // The chaos test's failure: one partition not fetched for 70 s while the other two
        // caught up. It was declared idle after the 2 s grace and all its records were late.
        let t0 = Instant::now();
        let mut idleness = Idleness::new(3, TIMEOUT, t0);
        let mut waiting = Vec::new();
        for ms in (0..70_000).step_by(150) {
            idleness.on_record((ms / 150 % 2) as usize, at(t0, ms));
            let check = idleness.check(at(t0, ms));
            assert!(check.idle.is_empty(), "at {ms} ms: {check:?}");
            waiting.extend(check.waiting);
        }
        assert_eq!(waiting, vec![2], "told once, after five graces");
        // Its first records arrive: it delivers like any other.
        assert!(!idleness.on_record(2, at(t0, 70_000)));
        assert!(!idleness.is_idle(2));
    }

    #[test]
    fn a_partition_never_delivering_idles_once_the_others_are_quiet_for_the_grace() {
        let t0 = Instant::now();
        let mut idleness = Idleness::new(3, TIMEOUT, t0);
        idleness.on_record(0, at(t0, 0));
        idleness.on_record(1, at(t0, 0));
        idleness.on_record(0, at(t0, 5_000));
        idleness.on_record(1, at(t0, 5_000));
        idleness.on_end(0);
        idleness.on_end(1);
        let first = idleness.check(at(t0, 5_300));
        assert_eq!(first.idle, vec![0, 1]);
        // The grace (2 s) counts from when the others went quiet, not from the start.
        assert!(idleness.check(at(t0, 7_000)).idle.is_empty());
        assert_eq!(idleness.check(at(t0, 7_300)).idle, vec![2]);
    }

    #[test]
    fn others_delivering_again_restart_the_grace() {
        let t0 = Instant::now();
        let mut idleness = Idleness::new(2, TIMEOUT, t0);
        idleness.on_record(0, at(t0, 0));
        idleness.on_end(0);
        assert_eq!(idleness.check(at(t0, 1_000)).idle, vec![0]);
        // Partition 0 delivers again before the grace is over: 1 keeps waiting.
        assert!(idleness.on_record(0, at(t0, 2_500)), "a lull ended");
        assert!(idleness.check(at(t0, 3_200)).idle.is_empty());
        idleness.on_end(0);
        assert_eq!(idleness.check(at(t0, 3_400)).idle, vec![0]);
        assert!(idleness.check(at(t0, 5_000)).idle.is_empty());
        assert_eq!(idleness.check(at(t0, 5_400)).idle, vec![1]);
    }

    #[test]
    fn a_record_from_an_idle_partition_ends_the_lull_for_all() {
        let t0 = Instant::now();
        let mut idleness = Idleness::new(2, TIMEOUT, t0);
        idleness.on_record(0, at(t0, 0));
        idleness.on_record(1, at(t0, 0));
        idleness.on_end(0);
        idleness.on_end(1);
        assert_eq!(idleness.check(at(t0, 400)).idle, vec![0, 1]);
        assert!(idleness.on_record(1, at(t0, 1_000)));
        assert!(!idleness.is_idle(0) && !idleness.is_idle(1));
        // Partition 0 is still at its end: idle again after a fresh timeout.
        assert!(idleness.check(at(t0, 1_200)).idle.is_empty());
        assert_eq!(idleness.check(at(t0, 1_300)).idle, vec![0]);
    }

    #[test]
    fn unknown_partitions_are_ignored() {
        let t0 = Instant::now();
        let mut idleness = Idleness::new(1, TIMEOUT, t0);
        assert!(!idleness.on_record(5, t0));
        assert!(!idleness.on_end(5));
        assert!(!idleness.is_idle(5));
    }
}
