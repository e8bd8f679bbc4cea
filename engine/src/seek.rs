//! Finding Kafka offsets by the click records' own event times: where a job starts one
//! window back from the newest records ([`Probe::newest`], [`Probe::first_at_or_after`]),
//! and where a resumed job can be assigned so that it reads its checkpoint's offsets again
//! ([`Probe::at_or_before`]). Blocking; a job runs it on a blocking thread.

use std::collections::HashMap;
use std::time::Duration;

use clickpulse_protocol::ClickRef;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::job::{JobContext, JobError};

/// Bound on each blocking metadata or offset look-up.
pub(crate) const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds offsets by event time, reading the records' own event times. Kafka's
/// `offsets_for_times` would answer from record timestamps, but brokers differ in what those
/// are (create time, log-append time, or the storage's write time in tansu), so the search
/// reads the click records themselves: an interpolation search (event times grow nearly
/// linearly with offsets within a partition) alternating with bisection, all partitions at
/// once, one short-lived consumer per look-up (a re-assigned consumer can still hand out
/// records fetched before).
///
/// A position is only ever one a consumer really lands on: Kafka serves a fetch from any
/// offset, but some brokers (tansu 0.6) only from the start of a stored batch, and answer
/// nothing for an offset inside the last one. A look-up without an answer within
/// the look-up wait counts as "nothing there" and the search keeps to positions that answered.
/// Every "nothing" costs the whole wait, so it stays short ([`PROBE_WAIT`]); on a loaded
/// machine a slow answer can pass for "nothing", which only makes the job read a little more
/// than needed. (A wait that grew with the answers' latency was tried: it tripled the start
/// time in `scripts/bench jobs`.) The one answer the start position cannot do without — a
/// partition's newest records — is asked for again patiently when it did not come.
pub(crate) struct Probe {
    brokers: String,
    topic: String,
}

/// A look-up's (or the state read's) consumer. Dropped, it stops fetching, throws away what
/// it fetched, and is destroyed on a thread of its own: librdkafka's destroy waits for every
/// reference to the partition to go, which on a live topic was seen to take many seconds (the
/// seek, and with it the job's start, must not wait for that).
pub(crate) struct ProbeConsumer(Option<BaseConsumer<JobContext>>);

impl ProbeConsumer {
    pub(crate) fn new(consumer: BaseConsumer<JobContext>) -> Self {
        ProbeConsumer(Some(consumer))
    }
}

impl std::ops::Deref for ProbeConsumer {
    type Target = BaseConsumer<JobContext>;
    fn deref(&self) -> &BaseConsumer<JobContext> {
        self.0.as_ref().expect("a probe consumer until dropped")
    }
}

impl Drop for ProbeConsumer {
    fn drop(&mut self) {
        let Some(consumer) = self.0.take() else {
            return;
        };
        if let Err(error) = consumer.unassign() {
            tracing::debug!(%error, "probe consumer unassign");
        }
        // Unassigned, it fetches no more: what is queued is finite (bounded all the same).
        for _ in 0..100_000 {
            if consumer.poll(Duration::ZERO).is_none() {
                break;
            }
        }
        let destroy = std::thread::Builder::new()
            .name("probe-destroy".into())
            .spawn(move || drop(consumer));
        if let Err(error) = destroy {
            tracing::warn!(%error, "no thread to destroy a probe consumer on; leaking it");
        }
    }
}

/// How long the search for the newest records reads towards the partitions' ends, when no
/// end-of-partition comes (the topic is being written).
const CHASE_LIMIT: Duration = Duration::from_secs(3);

/// How long the look-up of resume positions waits at most (see [`Probe::at_or_before`]).
const RESUME_PROBE_WAIT: Duration = Duration::from_secs(3);

/// How far back from a checkpoint offset its resume position is first looked up (see
/// [`ResumeSearch`]): more than a batch of the replayer's on tansu (8–11 thousand records
/// there), and little to read again where any offset can be read.
const RESUME_BACK: i64 = 16_384;

/// How much farther back each further resume look-up of a partition is than the one before:
/// at most 16 batches' worth of records to read again.
const RESUME_STEP: i64 = 16;

/// How long the farthest resume look-up of a partition may stay unanswered before one farther
/// back is added (the first answers took 0.2–0.4 s on tansu).
const RESUME_ESCALATE: Duration = Duration::from_millis(600);

/// How long one look-up waits for its record (see [`Probe`]).
const PROBE_WAIT: Duration = Duration::from_millis(500);

/// What reading each partition's tail found ([`Probe::newest`]).
pub(crate) struct Tails {
    /// Newest event time per partition (none: empty).
    pub(crate) newest: HashMap<i32, i64>,
    /// Each partition's `(partition, low, end)`, the end as read, not as reported.
    pub(crate) bounds: Vec<(i32, i64, i64)>,
    /// Where each partition's tail read started (a position that answers) and the event time
    /// of its first record: every record before it is at or before that time.
    pub(crate) starts: HashMap<i32, (i64, i64)>,
}

/// What a probe consumer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// The first record at a position.
    First,
    /// Everything from a position to the end.
    ToTheEnd,
}

/// What a consumer assigned at an offset finds first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Landing {
    /// The first record it gets: its offset (at or after the asked one) and event time.
    Record { offset: i64, time: i64 },
    /// The partition ends there, or nothing came within the look-up wait.
    Nothing,
}

/// A partition's search state: `lo` is known to be before the time, `hi` a landing position
/// at or after it (or the end).
#[derive(Debug, Clone, Copy)]
struct Range {
    partition: i32,
    lo: i64,
    lo_time: Option<i64>,
    hi: i64,
    hi_time: Option<i64>,
    /// Where seeking to `hi` lands.
    hi_landing: Option<i64>,
    /// The last landing position before the time.
    lo_landing: Option<i64>,
    /// Look-ups that found nothing (each costs the look-up wait).
    nothings: u32,
    round: u32,
    /// The last look-up landed where `hi` already did: one batch may span the whole range.
    same_landing: bool,
    /// The last look-up was the check just after `lo` and found a batch start before the
    /// time: bisect next (interpolating would land on `hi`'s batch again).
    bisect_next: bool,
}

impl Range {
    fn done(&self) -> bool {
        self.hi - self.lo <= 1 || self.nothings >= 2
    }

    fn next_probe(&self, target: i64) -> i64 {
        // Where only batch starts can be read, every position inside a batch lands on the
        // next one, and bisecting such a range takes a look-up per halving to learn nothing
        // new (13 of them, 200 ms, seen in `scripts/bench jobs`). Just after `lo` says at once
        // whether a batch start lies in between.
        if self.same_landing {
            return (self.lo + 1).clamp(self.lo + 1, self.hi - 1);
        }
        let mid = self.lo + (self.hi - self.lo) / 2;
        let guess = match (self.lo_time, self.hi_time) {
            (Some(lt), Some(ht))
                if ht > lt && self.round.is_multiple_of(2) && !self.bisect_next =>
            {
                let span = (self.hi - self.lo) as f64;
                let frac = (target - lt) as f64 / (ht - lt) as f64;
                self.lo + (span * frac).round() as i64
            }
            _ => mid,
        };
        guess.clamp(self.lo + 1, self.hi - 1)
    }
}

/// What a look-up assigned at `offset` has found so far: `None` while it waits.
fn landing(consumer: &ProbeConsumer, offset: i64) -> Result<Option<Landing>, JobError> {
    Ok(match consumer.poll(Duration::ZERO) {
        Some(Ok(m)) if m.offset() >= offset => Some(Landing::Record {
            offset: m.offset(),
            time: event_time(&m),
        }),
        Some(Err(KafkaError::PartitionEOF(_))) => Some(Landing::Nothing),
        Some(Err(e)) => return Err(e.into()),
        _ => None,
    })
}

/// The look-up of resume positions ([`Probe::at_or_before`]) as a state machine: which
/// positions to look up, and what their landings mean.
///
/// A position is good for a partition when a consumer assigned there gets a record at or
/// before the checkpoint's `next`. Per partition, the first look-ups are `next` itself (good
/// where any offset can be read, or where `next` starts a batch) and `next -`
/// [`RESUME_BACK`]; while none of them is good, each new one is [`RESUME_STEP`] times farther
/// back, added when the farthest so far landed after `next` or found nothing, or has not
/// answered for [`RESUME_ESCALATE`] (a position inside the last batch never answers). The
/// first good answer settles the partition. `low` is good without a look-up.
///
/// Few look-ups, because each costs the broker: tansu's time to answer grows with the
/// distance from the partition's end, and with how many are asked at once. In the recovery
/// bench the former look-up (seven per partition, all at once) took 1.7–2.2 s; one look-up
/// per partition at mid-topic answered in 0.2–0.3 s.
#[derive(Debug)]
struct ResumeSearch {
    parts: Vec<ResumePart>,
}

#[derive(Debug)]
struct ResumePart {
    partition: i32,
    next: i64,
    low: i64,
    /// The good position, once known.
    found: Option<i64>,
    /// The farthest back position looked up, and since when.
    farthest: i64,
    farthest_since: Duration,
    /// How far back from `next` the farthest look-up is.
    back: i64,
}

impl ResumePart {
    /// Adds the next look-up, farther back; at `low`, settles instead.
    fn escalate(&mut self, now: Duration) -> Option<(i32, i64)> {
        self.back = self.back.saturating_mul(RESUME_STEP);
        self.look_up_back(now)
    }

    fn look_up_back(&mut self, now: Duration) -> Option<(i32, i64)> {
        let at = self.next.saturating_sub(self.back);
        if at <= self.low {
            self.found = Some(self.low);
            return None;
        }
        self.farthest = at;
        self.farthest_since = now;
        Some((self.partition, at))
    }
}

impl ResumeSearch {
    /// The search for `(partition, next, low)`s, and its first look-ups.
    fn new(wanted: &[(i32, i64, i64)]) -> (Self, Vec<(i32, i64)>) {
        let mut first = Vec::new();
        let parts = wanted
            .iter()
            .map(|&(partition, next, low)| {
                let mut part = ResumePart {
                    partition,
                    next,
                    low,
                    found: None,
                    farthest: next,
                    farthest_since: Duration::ZERO,
                    back: RESUME_BACK,
                };
                if let Some(back) = part.look_up_back(Duration::ZERO) {
                    first.push((partition, next));
                    first.push(back);
                }
                part
            })
            .collect();
        (ResumeSearch { parts }, first)
    }

    fn part(&mut self, partition: i32) -> Option<&mut ResumePart> {
        self.parts.iter_mut().find(|p| p.partition == partition)
    }

    /// Whether `partition` is settled (its look-ups can go).
    fn found(&self, partition: i32) -> bool {
        self.parts
            .iter()
            .any(|p| p.partition == partition && p.found.is_some())
    }

    fn done(&self) -> bool {
        self.parts.iter().all(|p| p.found.is_some())
    }

    /// The look-up at `at` landed: the look-ups this adds.
    fn answer(
        &mut self,
        partition: i32,
        at: i64,
        landing: Landing,
        now: Duration,
    ) -> Option<(i32, i64)> {
        let part = self.part(partition)?;
        if part.found.is_some() {
            return None;
        }
        match landing {
            Landing::Record { offset, .. } if offset <= part.next => {
                part.found = Some(at);
                None
            }
            // After `next`, or nothing: only the farthest look-up's answer calls for one
            // farther back (a nearer one landing after `next` says nothing new).
            _ if at == part.farthest => part.escalate(now),
            _ => None,
        }
    }

    /// Look-ups to add because the farthest one of a partition has been silent too long.
    fn tick(&mut self, now: Duration) -> Vec<(i32, i64)> {
        self.parts
            .iter_mut()
            .filter(|p| p.found.is_none() && now >= p.farthest_since + RESUME_ESCALATE)
            .filter_map(|p| p.escalate(now))
            .collect()
    }

    /// Each partition's position: the good one, or `low`.
    fn positions(&self) -> Vec<(i32, i64)> {
        self.parts
            .iter()
            .map(|p| (p.partition, p.found.unwrap_or(p.low)))
            .collect()
    }
}

fn event_time(m: &rdkafka::message::BorrowedMessage<'_>) -> i64 {
    // An undecodable record counts as the start of time: searches move past it, and the job
    // dead-letters it.
    m.payload()
        .and_then(|b| ClickRef::decode(b).ok())
        .map_or(i64::MIN, |c| c.event_time_ms)
}

impl Probe {
    pub(crate) fn new(brokers: &str, topic: &str) -> Self {
        Probe {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
        }
    }

    /// A consumer of one partition from `offset`.
    fn open(&self, partition: i32, offset: i64, read: Read) -> Result<ProbeConsumer, KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", format!("clickpulse-probe.{}", self.topic))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "10")
            // Once a partition's queue holds `queued.min.messages`, librdkafka backs its next
            // fetch off by this much (1 s by default). A look-up's queue is that full after
            // its first fetch: eight look-ups started together took a second for their first
            // answers instead of 60 ms (measured on tansu), and with them every job start.
            .set("fetch.queue.backoff.ms", "1");
        if read == Read::First {
            // A few records per look-up: no prefetching of whole partitions.
            config
                .set("queued.min.messages", "1")
                .set("max.partition.fetch.bytes", "16384");
        } else {
            // To the end, fast: a partition's tail can be a whole large batch (16 KiB fetches
            // made reading it take seconds in `scripts/bench jobs`).
            config.set("max.partition.fetch.bytes", "4194304");
        }
        let consumer: BaseConsumer<JobContext> = config.create_with_context(JobContext)?;
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&self.topic, partition, Offset::Offset(offset))?;
        consumer.assign(&list)?;
        Ok(ProbeConsumer(Some(consumer)))
    }

    /// Where consumers assigned at these offsets land, all looked up at once, each waiting up
    /// to `wait` for an answer.
    fn land_within(&self, wanted: &[(i32, i64)], wait: Duration) -> Result<Vec<Landing>, JobError> {
        self.land_until(wanted, wait, |_, _| false)
    }

    /// [`Self::land_within`], stopping early once `enough(answers so far, time taken)` holds
    /// (unanswered positions count as [`Landing::Nothing`]).
    fn land_until(
        &self,
        wanted: &[(i32, i64)],
        wait: Duration,
        enough: impl Fn(&[Option<Landing>], Duration) -> bool,
    ) -> Result<Vec<Landing>, JobError> {
        let mut open = wanted
            .iter()
            .enumerate()
            .map(|(i, &(p, offset))| Ok((i, offset, self.open(p, offset, Read::First)?)))
            .collect::<Result<Vec<_>, KafkaError>>()?;
        let mut out: Vec<Option<Landing>> = vec![None; wanted.len()];
        let started = std::time::Instant::now();
        while !open.is_empty() && started.elapsed() < wait && !enough(&out, started.elapsed()) {
            let mut i = 0;
            while i < open.len() {
                let (slot, offset, consumer) = &open[i];
                if let Some(landing) = landing(consumer, *offset)? {
                    out[*slot] = Some(landing);
                    open.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(out
            .into_iter()
            .map(|l| l.unwrap_or(Landing::Nothing))
            .collect())
    }

    /// [`Self::land_within`] the usual look-up wait.
    fn land(&self, wanted: &[(i32, i64)]) -> Result<Vec<Landing>, JobError> {
        self.land_within(wanted, PROBE_WAIT)
    }

    /// The newest event time of each partition, and its true end: finds a position near the
    /// reported high watermark that answers (stepping back from it), then reads to the end
    /// (input is in event-time order per partition, and a broker can report a stale high
    /// watermark). Empty partitions have no newest time.
    pub(crate) fn newest(&self, bounds: &[(i32, i64, i64)]) -> Result<Tails, JobError> {
        // Several positions stepping back from the reported end (×4 each), all looked up at
        // once: the latest that answers is where to read from (on Kafka, the first one always
        // does; where only batch starts answer, it is at most about four last batches back).
        let mut wanted = Vec::new();
        for &(p, low, high) in bounds.iter().filter(|(_, low, high)| high > low) {
            let mut step = 1;
            loop {
                wanted.push((p, (high - step).max(low)));
                if high - step <= low {
                    break;
                }
                step = step.saturating_mul(4);
            }
        }
        // Any position that answers will do (the tail is read to the end from it); a later
        // one only saves reading. Positions inside a batch-serving broker's last batch never
        // answer, so rather than wait for them the whole look-up time, stop once every
        // partition has an answer and twice the time that took has passed.
        let partitions: std::collections::HashSet<i32> = wanted.iter().map(|&(p, _)| p).collect();
        let first_answer = std::cell::Cell::new(None::<Duration>);
        let enough = |answers: &[Option<Landing>], elapsed: Duration| {
            let answered: std::collections::HashSet<i32> = wanted
                .iter()
                .zip(answers)
                .filter(|(_, a)| matches!(a, Some(Landing::Record { .. })))
                .map(|(&(p, _), _)| p)
                .collect();
            if answered.len() < partitions.len() {
                return false;
            }
            let all_at = first_answer.get().unwrap_or(elapsed);
            first_answer.set(Some(all_at));
            elapsed >= all_at * 2 + Duration::from_millis(20)
        };
        let mut starts: HashMap<i32, i64> = HashMap::new();
        for (&(p, _), landing) in wanted
            .iter()
            .zip(self.land_until(&wanted, PROBE_WAIT, enough)?)
        {
            if let Landing::Record { offset, .. } = landing {
                let start = starts.entry(p).or_insert(offset);
                *start = (*start).max(offset);
            }
        }
        // A partition with records where nothing answered was slow, not empty (its first
        // offset always answers): ask there again, patiently. Taking it for empty would start
        // the job from the wrong place.
        let silent: Vec<(i32, i64)> = bounds
            .iter()
            .filter(|&&(p, low, high)| high > low && !starts.contains_key(&p))
            .map(|&(p, low, _)| (p, low))
            .collect();
        if !silent.is_empty() {
            tracing::debug!(?silent, "partitions slow to answer; asking again");
            for (&(p, low), landing) in silent
                .iter()
                .zip(self.land_within(&silent, LOOKUP_TIMEOUT)?)
            {
                match landing {
                    Landing::Record { offset, .. } => {
                        starts.insert(p, offset);
                    }
                    Landing::Nothing => {
                        return Err(JobError::Seek(format!(
                            "partition {p} of {} has records from offset {low} but answered no fetch within {LOOKUP_TIMEOUT:?}",
                            self.topic
                        )));
                    }
                }
            }
        }
        // Read each partition from there to its end (tansu's reported end can be stale). A
        // topic being written has no end to reach: once a reader is past the end reported
        // before the seek began, CHASE_LIMIT bounds how long it goes on, and what it read is
        // the tail. A reader still short of that end is not cut off, however long the broker
        // takes (a loaded machine): cutting it took an early record's time for the newest and
        // started the job hours back. Only a reader that stalls for LOOKUP_TIMEOUT is an error.
        let mut readers = starts
            .iter()
            .map(|(&p, &offset)| {
                Ok((
                    p,
                    self.open(p, offset, Read::ToTheEnd)?,
                    std::time::Instant::now(),
                ))
            })
            .collect::<Result<Vec<_>, KafkaError>>()?;
        let reported: HashMap<i32, i64> = bounds.iter().map(|&(p, _, high)| (p, high)).collect();
        let mut ends = reported.clone();
        let mut read_to: HashMap<i32, i64> = HashMap::new();
        let mut newest: HashMap<i32, i64> = HashMap::new();
        let mut tails: HashMap<i32, (i64, i64)> = HashMap::new();
        let started = std::time::Instant::now();
        while !readers.is_empty() {
            if started.elapsed() >= CHASE_LIMIT {
                readers.retain(|(p, _, _)| {
                    let end = reported.get(p).copied().unwrap_or(0);
                    let short = read_to.get(p).is_none_or(|&to| to < end);
                    short || !newest.contains_key(p)
                });
            }
            if let Some((p, _, _)) = readers
                .iter()
                .find(|(_, _, progress)| progress.elapsed() >= LOOKUP_TIMEOUT)
            {
                return Err(JobError::Seek(format!(
                    "partition {p} of {} stopped sending records before its end for {LOOKUP_TIMEOUT:?}",
                    self.topic
                )));
            }
            let mut i = 0;
            let mut idle = true;
            while i < readers.len() {
                let (p, consumer, progress) = &mut readers[i];
                match consumer.poll(Duration::ZERO) {
                    Some(Ok(m)) => {
                        idle = false;
                        *progress = std::time::Instant::now();
                        let to = read_to.entry(*p).or_insert(0);
                        *to = (*to).max(m.offset() + 1);
                        if let Some(&start) = starts.get(p)
                            && m.offset() >= start
                        {
                            tails.entry(*p).or_insert((start, event_time(&m)));
                        }
                        let t = newest.entry(*p).or_insert(i64::MIN);
                        *t = (*t).max(event_time(&m));
                        let end = ends.entry(*p).or_insert(0);
                        *end = (*end).max(m.offset() + 1);
                        i += 1;
                    }
                    Some(Err(KafkaError::PartitionEOF(_))) => {
                        readers.swap_remove(i);
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => i += 1,
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let bounds = bounds
            .iter()
            .map(|&(p, low, high)| (p, low, ends.get(&p).copied().unwrap_or(high)))
            .collect();
        Ok(Tails {
            newest,
            bounds,
            starts: tails,
        })
    }

    /// Per partition `(partition, next, low)`, a position to assign at from which a consumer
    /// gets `next` (and perhaps some records before it, which the job skips), found by
    /// [`ResumeSearch`]: where any offset can be read (Kafka), `next` or at most
    /// [`RESUME_BACK`] before it, whichever answers first; otherwise usually the batch start
    /// that `next - RESUME_BACK` lands on; `low` when nothing good answered within
    /// [`RESUME_PROBE_WAIT`].
    pub(crate) fn at_or_before(
        &self,
        wanted: &[(i32, i64, i64)],
    ) -> Result<Vec<(i32, i64)>, JobError> {
        let started = std::time::Instant::now();
        let (mut search, first) = ResumeSearch::new(wanted);
        let mut opened = first.len();
        let mut open = first
            .into_iter()
            .map(|(p, at)| Ok((p, at, self.open(p, at, Read::First)?)))
            .collect::<Result<Vec<_>, KafkaError>>()?;
        while !search.done() && started.elapsed() < RESUME_PROBE_WAIT {
            let mut more = search.tick(started.elapsed());
            let mut i = 0;
            while i < open.len() {
                let (p, at, consumer) = &open[i];
                if search.found(*p) {
                    open.swap_remove(i);
                    continue;
                }
                match landing(consumer, *at)? {
                    Some(landing) => {
                        more.extend(search.answer(*p, *at, landing, started.elapsed()));
                        open.swap_remove(i);
                    }
                    None => i += 1,
                }
            }
            for (p, at) in more {
                opened += 1;
                open.push((p, at, self.open(p, at, Read::First)?));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::debug!(topic = %self.topic, look_ups = opened, ms = started.elapsed().as_millis() as u64, "resume positions looked up");
        Ok(search.positions())
    }

    /// Per partition, the first position whose record's event time is `>= time` (the end
    /// when there is none).
    pub(crate) fn first_at_or_after(
        &self,
        bounds: &[(i32, i64, i64)],
        newest: &HashMap<i32, i64>,
        time: i64,
    ) -> Result<Vec<(i32, i64)>, JobError> {
        search(bounds, newest, time, |probes| self.land(probes))
    }
}

/// The search of [`Probe::first_at_or_after`], over any way of landing (`land` answers where
/// consumers assigned at offsets land, one answer per probe, in order).
fn search(
    bounds: &[(i32, i64, i64)],
    newest: &HashMap<i32, i64>,
    time: i64,
    mut land: impl FnMut(&[(i32, i64)]) -> Result<Vec<Landing>, JobError>,
) -> Result<Vec<(i32, i64)>, JobError> {
    let mut ranges: Vec<Range> = bounds
        .iter()
        .map(|&(partition, low, high)| Range {
            partition,
            lo: low - 1,
            lo_time: None,
            hi: high,
            hi_time: None,
            hi_landing: None,
            lo_landing: None,
            nothings: 0,
            round: 0,
            same_landing: false,
            bisect_next: false,
        })
        .collect();
    // About log2(n) rounds (fewer with interpolation); bounded for safety.
    for _ in 0..96 {
        let mut pending: Vec<&mut Range> = ranges.iter_mut().filter(|r| !r.done()).collect();
        if pending.is_empty() {
            break;
        }
        let probes: Vec<(i32, i64)> = pending
            .iter()
            .map(|r| (r.partition, r.next_probe(time)))
            .collect();
        let round_started = std::time::Instant::now();
        let landed = land(&probes)?;
        tracing::debug!(
            ?probes,
            ?landed,
            ms = round_started.elapsed().as_millis() as u64,
            "search round"
        );
        let answers = landed
            .into_iter()
            .chain(std::iter::repeat(Landing::Nothing));
        for ((r, &(_, probe)), landing) in pending.iter_mut().zip(&probes).zip(answers) {
            match landing {
                // Seeking to the probe lands on this record: at or after the time.
                Landing::Record { offset, time: t } if t >= time => {
                    r.bisect_next = false;
                    r.same_landing = r.hi_landing == Some(offset);
                    (r.hi, r.hi_time, r.hi_landing) = (probe, Some(t), Some(offset));
                }
                // Everything up to this record is before the time.
                Landing::Record { offset, time: t } => {
                    r.bisect_next = r.same_landing;
                    (r.lo, r.lo_time) = (offset.min(r.hi - 1), Some(t));
                    r.lo_landing = Some(offset);
                    r.same_landing = false;
                }
                // Seeking here finds nothing (Kafka: the end; a batch-serving broker:
                // inside its last batch): look before it.
                Landing::Nothing => {
                    (r.hi, r.hi_time, r.hi_landing) = (probe, None, None);
                    r.nothings += 1;
                    r.same_landing = false;
                    r.bisect_next = false;
                }
            }
            r.round += 1;
        }
    }
    let ends: HashMap<i32, (i64, i64)> = bounds
        .iter()
        .map(|&(p, low, high)| (p, (low, high)))
        .collect();
    Ok(ranges
        .iter()
        .map(|r| {
            let (low, end) = ends.get(&r.partition).copied().unwrap_or((0, r.hi));
            let has_later = newest.get(&r.partition).is_some_and(|&n| n >= time);
            let start = match (r.lo_landing, r.hi_landing) {
                // Where any offset can be read (Kafka), the last record before the time and
                // the first at or after it are neighbours: start exactly at the latter.
                (Some(before), Some(after)) if after == before + 1 => after,
                (None, Some(after)) if after == low => after,
                // Where only batch starts can be read, records at or after the time can sit in
                // the batch that starts before it: start there (or at the beginning). Reading
                // a little more is safe: earlier records only fill ticks, and partial windows
                // are not emitted.
                _ if has_later => r.lo_landing.unwrap_or(low),
                _ => end,
            };
            (r.partition, start)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One partition of `n` records, record `i` at time `10 * i`; consumers land on `batch`
    /// boundaries only (1 = Kafka, which serves any offset), nothing inside the last batch.
    fn run(n: i64, batch: i64, time: i64) -> (i64, usize) {
        let mut lookups = 0;
        let newest = HashMap::from([(0, 10 * (n - 1))]);
        let found = search(&[(0, 0, n)], &newest, time, |probes| {
            lookups += 1;
            Ok(probes
                .iter()
                .map(|&(_, offset)| {
                    let start = (offset + batch - 1) / batch * batch;
                    if start < n {
                        Landing::Record {
                            offset: start,
                            time: 10 * start,
                        }
                    } else {
                        Landing::Nothing
                    }
                })
                .collect())
        })
        .unwrap();
        (found[0].1, lookups)
    }

    #[test]
    fn the_search_finds_the_exact_offset_where_any_offset_can_be_read() {
        for (time, want) in [
            (0, 0),
            (5, 1),
            (10, 1),
            (123_456, 12_346),
            (999_990, 99_999),
        ] {
            let (got, lookups) = run(100_000, 1, time);
            assert_eq!(got, want, "time {time}");
            assert!(lookups <= 40, "{lookups} look-ups");
        }
        assert_eq!(
            run(100_000, 1, 2_000_000).0,
            100_000,
            "after the newest: the end"
        );
    }

    #[test]
    fn where_only_batch_starts_can_be_read_it_starts_at_the_batch_holding_the_time() {
        // Batches of 1,000: the record at time 123,450 is offset 12,345, in the batch at 12,000.
        assert_eq!(run(100_000, 1_000, 123_450).0, 12_000);
        // At a batch's first record, the batch before could end with records of the same time:
        // it is read too.
        assert_eq!(run(100_000, 1_000, 120_000).0, 11_000);
        // Inside the last batch, which cannot be reached from within: a batch start before it
        // (each look-up into the last batch waits for nothing, so they are capped).
        let (start, lookups) = run(100_000, 1_000, 995_000);
        assert!((50_000..=99_000).contains(&start), "{start}");
        assert!(lookups <= 40);
    }

    /// [`ResumeSearch`] over one partition of `n` records from `low`, landing on `batch`
    /// boundaries: `(position, look-ups)`. Look-ups answer at once, except inside the last
    /// batch, where they never do; time goes by 100 ms a round.
    fn resume(n: i64, batch: i64, low: i64, next: i64) -> (i64, usize) {
        let (mut search, first) = ResumeSearch::new(&[(0, next, low)]);
        let mut lookups = first.len();
        let mut pending = first;
        let last_batch = (n - 1) / batch * batch;
        let mut now = Duration::ZERO;
        while !search.done() && now < RESUME_PROBE_WAIT {
            let mut more = search.tick(now);
            for (p, at) in std::mem::take(&mut pending) {
                let start = (at + batch - 1) / batch * batch;
                if at > last_batch {
                    pending.push((p, at)); // silent
                } else {
                    let landing = Landing::Record {
                        offset: start,
                        time: 0,
                    };
                    more.extend(search.answer(p, at, landing, now));
                }
            }
            lookups += more.len();
            pending.extend(more);
            now += Duration::from_millis(100);
        }
        (search.positions()[0].1, lookups)
    }

    #[test]
    fn a_resume_position_is_next_itself_where_any_offset_can_be_read() {
        assert_eq!(resume(1_000_000, 1, 0, 654_321), (654_321, 2));
    }

    #[test]
    fn a_resume_position_is_a_batch_start_at_or_before_next_with_few_look_ups() {
        // Batches smaller than the first step back: two look-ups, the batch start
        // before `next - RESUME_BACK`'s.
        let (at, lookups) = resume(1_500_000, 10_000, 0, 775_038);
        assert_eq!((at, lookups), (775_038 - RESUME_BACK, 2));
        let (at, lookups) = resume(1_500_000, 10_000, 0, 770_000);
        assert_eq!((at, lookups), (770_000, 2), "next is a batch start");
        // Bigger batches: one step farther back.
        let (at, lookups) = resume(1_500_000, 100_000, 0, 777_777);
        assert_eq!((at, lookups), (777_777 - RESUME_BACK * RESUME_STEP, 3));
        // Whatever it lands on, a consumer assigned there gets `next` or an earlier record.
        for batch in [1, 777, 10_000, 65_536, 300_000] {
            for next in [1, 16_384, 500_000, 1_234_567] {
                let (at, _) = resume(1_500_000, batch, 0, next);
                let landing = (at + batch - 1) / batch * batch;
                assert!(
                    at <= next && landing <= next,
                    "batch {batch}, next {next}: {at}"
                );
            }
        }
    }

    #[test]
    fn inside_the_silent_last_batch_the_look_up_goes_farther_back_in_time() {
        // `next` and `next - RESUME_BACK` are both inside the last batch (800,000 on): neither
        // answers, and after RESUME_ESCALATE one farther back does.
        let (at, lookups) = resume(1_000_000, 200_000, 0, 900_000);
        assert_eq!((at, lookups), (900_000 - RESUME_BACK * RESUME_STEP, 3));
    }

    #[test]
    fn near_the_first_offset_the_resume_position_is_the_first_offset_without_look_ups() {
        assert_eq!(resume(1_000_000, 10_000, 5_000, 5_000), (5_000, 0));
        assert_eq!(resume(1_000_000, 10_000, 5_000, 20_000), (5_000, 0));
        // A step back past the first offset settles there.
        assert_eq!(resume(1_000_000, 300_000, 0, 100_000), (0, 2));
    }

    #[test]
    fn a_range_inside_one_batch_is_not_bisected_position_by_position() {
        // Batches of 4,096: once both sides of the time are found, every position between
        // lands on the same batch start; bisecting them took up to 24 look-ups in all.
        for time in [123_450, 500_000, 777_770, 5_000, 999_000] {
            let (start, lookups) = run(100_000, 4_096, time);
            assert_eq!(start, time / 10 / 4_096 * 4_096, "time {time}");
            assert!(lookups <= 10, "time {time}: {lookups} look-ups");
        }
    }
}
