//! The async shell around a tenant's [`Pipeline`]: Kafka in, results out.
//!
//! ```text
//!  clicks.<tenant> (all partitions, assigned, no group rebalancing)
//!      │ a queue per partition, read in turn (`Input`)
//!      ▼
//!  Positions::take: each offset once (what is read again is skipped and counted)
//!      │
//!      ▼
//!  ClickRef::decode ──bad──▶ dead.<tenant> (the record unchanged, reason, source offset)
//!      │
//!      ▼
//!  Pipeline::on_click ──▶ results ──▶ results.<tenant> (the durable record)
//!      │                         └──▶ bounded mpsc ──▶ publisher (ZeroMQ to gateways, tests)
//!      └─ unknown page, time out of range ──▶ dead.<tenant>
//!      ▲
//!  idle check: a partition that reached the end of its log (partition EOF) and stayed silent
//!  for `idle_timeout`, with nothing queued, stops holding the watermark back — never one that
//!  is merely slow to fetch, or its first records would arrive late (one that never delivered
//!  nor ended only once all the others are quiet)
//!
//!  start:      state.<tenant> ──▶ newest complete checkpoint? ──yes──▶ resume at its offsets
//!                                        │ no (or not resumable)        (skip what it has)
//!                                        ▼
//!                               seek (earliest, or one window back: see `seek`)
//!  every interval, and at a clean stop:  history log · state chunks · manifest
//!                                        ──▶ state.<tenant>  (see `checkpoint`)
//! ```
//!
//! The job only moves data; all semantics are in the pipeline. A full result channel blocks the
//! job (backpressure onto Kafka), never drops a result.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use clickpulse_protocol::dead::SourcePosition;
use clickpulse_protocol::results::ResultMsg;
use clickpulse_protocol::state::{Key, MANIFEST_VERSION, Manifest, PartitionOffset, Stopped};
use clickpulse_protocol::zk::now_ms;
use clickpulse_protocol::{ClickRef, Tenant, topics};
use futures_util::{FutureExt, StreamExt};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{self, CheckpointError, Scan};
use crate::config::OperatorConfig;
use crate::history::{Changelog, History, HistoryStore, RedbStore, StoreError};
use crate::idleness::Idleness;
use crate::output::{Output, OutputError};
use crate::pipeline::{Admission, EngineError, Pipeline, PipelineState};
use crate::positions::{Positions, Take};
use crate::seek::{LOOKUP_TIMEOUT, Probe, ProbeConsumer, Tails};

/// Where a starting job begins reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The first offset of every partition (audits, tests).
    Earliest,
    /// The first position at or after this event time in every partition, found by the
    /// records' own event times (not the broker's timestamps); windows starting before it are not emitted.
    Time(i64),
    /// One window before the newest event in the topic (aligned to the slide, less the allowed
    /// lateness), so the first window emitted is a full one and comes as soon as the backfill is
    /// read: what a dashboard that just opened wants.
    LatestWindow,
}

/// Everything a job needs.
#[derive(Debug, Clone)]
pub struct JobConfig {
    pub tenant: Tenant,
    pub epoch: u64,
    pub brokers: String,
    pub operators: OperatorConfig,
    pub start: StartFrom,
    /// A partition without records for this long stops holding the watermark back.
    pub idle_timeout: Duration,
    /// The visitor-history file of this tenant.
    pub history_path: PathBuf,
    /// How often the job checkpoints to `state.<tenant>`; `None`: never, and it resumes no
    /// checkpoint either.
    pub checkpoint_interval: Option<Duration>,
    /// A job reading one window back resumes a checkpoint only up to this old (older, it starts
    /// afresh from the newest window instead of catching up).
    pub resume_max_age: Duration,
    /// librdkafka debug contexts for the job's consumer (e.g. `fetch,topic`); `None`: off.
    pub kafka_debug: Option<String>,
    /// Why the job is being stopped, told before `shutdown` is cancelled: a job stopped after
    /// the linger or handed off writes a last checkpoint saying so; one stopped without a word
    /// (fenced: it may no longer own the tenant) writes nothing more.
    pub stop: StopNote,
    /// Set once the job is live: its first result is out, or it has read every partition to
    /// its end (a resumed job may have nothing new to say).
    pub live: Option<tokio::sync::watch::Sender<bool>>,
}

impl JobConfig {
    /// The defaults for everything but the tenant, epoch, brokers and history file.
    pub fn new(tenant: Tenant, epoch: u64, brokers: &str, history_path: PathBuf) -> Self {
        JobConfig {
            tenant,
            epoch,
            brokers: brokers.to_owned(),
            operators: OperatorConfig::default(),
            start: StartFrom::LatestWindow,
            idle_timeout: Duration::from_secs(2),
            history_path,
            checkpoint_interval: Some(Duration::from_secs(5)),
            resume_max_age: Duration::from_secs(600),
            kafka_debug: None,
            stop: StopNote::default(),
            live: None,
        }
    }
}

/// How a job is being stopped (see [`JobConfig::stop`]).
#[derive(Debug, Clone, Default)]
pub struct StopNote(Arc<Mutex<Option<Stopped>>>);

impl StopNote {
    pub fn set(&self, why: Stopped) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    pub fn get(&self) -> Option<Stopped> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a job stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("topic {0} does not exist or has no partitions")]
    NoTopic(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the result receiver is gone")]
    ResultsClosed,
    #[error("the look-up of where to start reading failed: {0}")]
    Seek(String),
    #[error("a blocking task of the job failed: {0}")]
    StartUp(String),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// What a job did, reported when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobReport {
    pub records: u64,
    pub accepted: u64,
    pub late: u64,
    pub dead_lettered: u64,
    pub results: u64,
    /// Records of `results.<tenant>` and `dead.<tenant>` the broker did not take.
    pub output_failures: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// The checkpoint it resumed, `(epoch, n)`, if any.
    pub resumed: Option<(u64, u64)>,
    /// Records read before a partition's first offset to process and skipped: after a resume,
    /// the stored batch's records before the checkpoint's offset (a broker that serves fetches
    /// from batch starts only). See [`crate::positions`].
    pub skipped: u64,
    /// Records the consumer handed out again at an offset this job had processed already,
    /// skipped: a partition's offsets only grow, so each counts once whatever the consumer
    /// does (the chaos test once saw 294 views counted twice after a resume).
    pub redelivered: u64,
    /// Offsets the consumer jumped over (never handed out) within the records it processed.
    pub jumped: u64,
}

/// The job's consumer of `clicks.<tenant>`, configured for brokers that serve fetches by
/// stored batch (tansu) as well as for Kafka.
fn input_consumer(config: &JobConfig) -> KafkaResult<StreamConsumer<JobContext>> {
    let mut client = ClientConfig::new();
    if let Some(contexts) = &config.kafka_debug {
        client.set("debug", contexts);
    }
    client
        .set("bootstrap.servers", &config.brokers)
        // Partitions are assigned explicitly; the group id only names the client.
        .set("group.id", format!("clickpulse-job.{}", config.tenant))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // End-of-partition events tell "caught up" from "not fetched yet" for idleness.
        .set("enable.partition.eof", "true")
        // Fetches of about 1 MiB: librdkafka puts another partition first in each fetch, and
        // a broker that fills a fetch from its first partition (tansu) then serves each in
        // turn; with the 50 MiB default, a partition with a backlog starved the others (and
        // the watermark waits for the slowest).
        .set("fetch.max.bytes", "1048576")
        .set("max.partition.fetch.bytes", "1048576")
        // How long the broker may hold a fetch with nothing new. Kafka answers as soon as
        // records arrive, so this only bounds idle polling; a broker that holds the first
        // fetch of a new consumer for the whole wait (tansu: 300–420 ms at the 500 ms default,
        // 100–150 ms at 50) adds it to every job start. tansu holds every fetch about this
        // long, so it also bounds catching up: one consumer of three partitions read 0.90 M
        // records/s at 50 ms, 1.26 M at 30, 0.52 M at 100.
        .set("fetch.wait.max.ms", "30")
        // librdkafka (2.4+) postpones a partition's next fetch by this much once its queue
        // holds `queued.min.messages`; at the 1 s default a job catching up, faster than the
        // broker but briefly behind its queue, sat idle most of each second (a consumer at a
        // 10 ms fetch wait read 0.21 M records/s instead of 1.30 M).
        .set("fetch.queue.backoff.ms", "10")
        // Per partition (each has its queue, see `split_partitions`): a partition stops being
        // fetched while this many of its records wait. With the 100,000 default, three
        // partitions could hold 3 × (100,000 + a fetch) records, about 40 MB each 100,000.
        .set("queued.min.messages", "30000")
        .create_with_context(JobContext)
}

/// Runs a tenant job until `shutdown` is cancelled.
pub async fn run_job(
    config: JobConfig,
    results: mpsc::Sender<ResultMsg>,
    shutdown: CancellationToken,
) -> Result<JobReport, JobError> {
    let topic = topics::clicks(&config.tenant);
    let consumer = input_consumer(&config)?;
    let seek_started = std::time::Instant::now();
    // Both block (metadata, offset look-ups, topic creation): off the async workers, and side
    // by side, as neither needs the other. The start reads the checkpoints first: a job that
    // resumes one needs no seek.
    let consumer = Arc::new(consumer);
    let seek = {
        let (config, consumer) = (config.clone(), consumer.clone());
        let name = topic.clone();
        tokio::task::spawn_blocking(move || {
            let started = start(&consumer, &config, &name)?;
            let queues = split_partitions(&consumer, &name, started.plan.partitions)?;
            Ok::<_, JobError>((started, queues))
        })
    };
    let output = {
        let (brokers, tenant) = (config.brokers.clone(), config.tenant.clone());
        tokio::task::spawn_blocking(move || Output::connect(&brokers, &tenant))
    };
    let (seek, output) = tokio::join!(seek, output);
    let (started, queues) = seek.map_err(|e| JobError::StartUp(e.to_string()))??;
    let Started {
        plan:
            Plan {
                partitions,
                from_ms,
                offsets,
                resumed,
                obsolete,
                history_logs,
                logged,
            },
        store,
    } = started;
    let output = output.map_err(|e| JobError::StartUp(e.to_string()))??;
    let mut input = Input::new(&consumer, &queues);
    let mut report = JobReport::default();
    let mut previous = None;
    let mut pipeline = match resumed {
        Some((manifest, state)) => {
            report.resumed = Some((manifest.epoch, manifest.n));
            previous = Some(manifest);
            let mut pipeline = Pipeline::restore(config.tenant.clone(), config.epoch, state, store);
            pipeline.forget_idleness();
            pipeline
        }
        None => Pipeline::new(
            config.tenant.clone(),
            config.epoch,
            partitions,
            config.operators.clone(),
            store,
        )?,
    };
    if let Some(from_ms) = from_ms {
        pipeline.backfill_from(from_ms);
    }
    let output = Arc::new(output);
    let mut checkpoints = Checkpoints {
        epoch: config.epoch,
        n: 0,
        positions: Positions::new(offsets),
        written: Some(Written {
            previous,
            obsolete,
            history_logs,
            logged,
        }),
        writing: None,
    };
    let seek_ms = seek_started.elapsed().as_millis() as u64;
    tracing::info!(
        tenant = %config.tenant,
        epoch = config.epoch,
        run = pipeline.run(),
        seq = pipeline.seq(),
        partitions,
        from_ms,
        resumed = ?report.resumed,
        seek_ms,
        "job started"
    );
    let mut checkpoint_tick = config.checkpoint_interval.map(|every| {
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });

    let mut idleness = Idleness::new(partitions, config.idle_timeout, std::time::Instant::now());
    let mut progress_report = Instant::now();
    let mut idle_check = tokio::time::interval(config.idle_timeout / 2);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let read: Result<(), JobError> = async {
        loop {
            // A job with records waiting never has to wait in `recv`: give the runtime back its
            // turn now and then, or the engine's coordinator (and its ZooKeeper contact) starves.
            tokio::task::coop::consume_budget().await;
            let turn = tokio::select! {
                _ = shutdown.cancelled() => Turn::Stop,
                message = input.recv() => Turn::Message(message),
                _ = tick_of(&mut checkpoint_tick) => Turn::Checkpoint,
                _ = idle_check.tick() => Turn::IdleCheck,
            };
            // Silence is only silence when nothing is queued: a job that fell behind (a busy
            // machine, a slow checkpoint) may have records of a "silent" partition waiting. Those
            // go first, and the next check looks again.
            if matches!(turn, Turn::IdleCheck) && progress_report.elapsed() >= PROGRESS_EVERY {
                progress_report = Instant::now();
                tracing::info!(
                    tenant = %config.tenant,
                    epoch = config.epoch,
                    records = report.records,
                    skipped = report.skipped,
                    redelivered = report.redelivered,
                    jumped = report.jumped,
                    late = report.late,
                    results = report.results,
                    watermark_ms = pipeline.watermark(),
                    buffered = pipeline.buffered(),
                    partitions = ?pipeline.partitions(),
                    positions = ?checkpoints.positions.offsets(),
                    "job progress"
                );
            }
            let turn = match turn {
                Turn::IdleCheck => input
                    .recv()
                    .now_or_never()
                    .map_or(Turn::IdleCheck, Turn::Message),
                other => other,
            };
            match turn {
                Turn::Stop => break,
                Turn::Message(message) => {
                    let message = match message {
                        Ok(m) => m,
                        Err(KafkaError::PartitionEOF(p)) => {
                            let Some(p) = usize::try_from(p).ok().filter(|&p| p < partitions) else {
                                continue;
                            };
                            let at_once = idleness.on_end(p);
                            if idleness.all_at_end()
                                && let Some(live) = &config.live
                            {
                                live.send_if_modified(|l| !std::mem::replace(l, true));
                            }
                            // A partition with nothing at all since the start position holds
                            // nothing back: idle at once, so a starting job's first results do
                            // not wait for the idle timeout.
                            if at_once {
                                pipeline.on_idle(p)?;
                                tracing::debug!(tenant = %config.tenant, partition = p, watermark_ms = pipeline.watermark(), "partition idle: at its end with nothing since the start");
                                emit(&mut pipeline, &output, &results, &mut report).await?;
                            }
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let partition = usize::try_from(message.partition()).unwrap_or(0);
                    // Data again after a lull: a burst is starting, and the other partitions'
                    // share of it may be a batch behind. Every partition holds the watermark back
                    // again until it is silent at its end for the idle timeout anew, or this
                    // partition's records would push the watermark past theirs.
                    if idleness.on_record(partition, std::time::Instant::now()) {
                        pipeline.forget_idleness();
                        tracing::debug!(tenant = %config.tenant, partition, offset = message.offset(), watermark_ms = pipeline.watermark(), "partition delivers again: every partition holds the watermark anew");
                    }
                    // A record skipped still counts as the partition delivering: one busy
                    // skipping is not idle, or the watermark would pass it and its records after
                    // the checkpoint be late.
                    match checkpoints.positions.take(message.partition(), message.offset()) {
                        Take::Process => {}
                        // Read again after a resume, before the checkpoint: the state has it.
                        Take::Before => {
                            report.skipped += 1;
                            continue;
                        }
                        Take::Again { next } => {
                            if report.redelivered == 0 {
                                tracing::warn!(tenant = %config.tenant, partition, offset = message.offset(), next, "record handed out again at an offset already processed; skipped (counted once)");
                            }
                            report.redelivered += 1;
                            continue;
                        }
                        Take::Jumped { missing } => {
                            if report.jumped == 0 {
                                tracing::warn!(tenant = %config.tenant, partition, offset = message.offset(), next = message.offset() - missing, missing, "offsets jumped over: the consumer never handed these out");
                            }
                            report.jumped += u64::try_from(missing).unwrap_or(0);
                        }
                    }
                    report.records += 1;
                    let rejected = match message.payload().map(ClickRef::decode) {
                        Some(Ok(click)) if click.tenant == config.tenant.as_str() => {
                            match pipeline.on_click(
                                partition,
                                click.visitor,
                                click.page,
                                click.event_time_ms,
                            )? {
                                Admission::Accepted => {
                                    report.accepted += 1;
                                    None
                                }
                                Admission::Late => {
                                    report.late += 1;
                                    None
                                }
                                // Counted by the pipeline already.
                                Admission::UnknownPage => {
                                    Some(format!("unknown page {:?}", click.page))
                                }
                                Admission::BadTime => Some(format!(
                                    "event time {} ms out of range",
                                    click.event_time_ms
                                )),
                            }
                        }
                        other => {
                            pipeline.on_dead_letter();
                            Some(match other {
                                None => "empty record".to_owned(),
                                Some(Err(e)) => e.to_string(),
                                Some(Ok(c)) => format!("record of tenant {} in {topic}", c.tenant),
                            })
                        }
                    };
                    if let Some(reason) = rejected {
                        tracing::warn!(%topic, partition, offset = message.offset(), %reason, "malformed click record dead-lettered");
                        report.dead_lettered += 1;
                        let source = SourcePosition {
                            topic: topic.clone(),
                            partition: message.partition(),
                            offset: message.offset(),
                        };
                        output
                            .dead_letter(message.key(), message.payload(), &reason, &source)
                            .await?;
                    }
                }
                Turn::Checkpoint => {
                    checkpoints.write(&mut pipeline, &output, None, false).await?;
                    report.checkpoints += 1;
                    // The next one a whole interval after this one ended: however long a
                    // checkpoint takes, the job spends most of its time on the stream.
                    if let Some(tick) = &mut checkpoint_tick {
                        tick.reset();
                    }
                }
                Turn::IdleCheck => {
                    // The rules are in `idleness`: at its end and silent for the idle timeout; a
                    // partition that never delivered nor ended only once the others are quiet.
                    let check = idleness.check(std::time::Instant::now());
                    for p in check.waiting {
                        tracing::warn!(tenant = %config.tenant, partition = p, secs = idleness.grace().as_secs() * 5, next = ?checkpoints.positions.next(i32::try_from(p).unwrap_or(i32::MAX)), "partition has delivered nothing since the start and reported no end while the others deliver; the watermark waits for it");
                    }
                    for p in check.idle {
                        pipeline.on_idle(p)?;
                        tracing::debug!(tenant = %config.tenant, partition = p, at_end = idleness.at_end(p), watermark_ms = pipeline.watermark(), "partition idle: silent for the idle timeout");
                    }
                }
            }
            emit(&mut pipeline, &output, &results, &mut report).await?;
        }
        Ok(())
    }
    .await;
    if let Err(error) = read {
        // A checkpoint being written lands (or fails) before the job is gone: the owner
        // node goes after this returns, and what the next owner restores must not change
        // after that.
        if let Err(e) = checkpoints.settle().await {
            tracing::warn!(tenant = %config.tenant, error = %e, "checkpoint being written at the job's failure failed too");
        }
        return Err(error);
    }
    match config.stop.get() {
        Some(why) if checkpoint_tick.is_some() => {
            checkpoints
                .write(&mut pipeline, &output, Some(why), true)
                .await?;
            report.checkpoints += 1;
        }
        _ => {
            checkpoints.settle().await?;
            pipeline.flush_history()?;
        }
    }
    report.output_failures = tokio::task::spawn_blocking(move || output.flush(OUTPUT_FLUSH))
        .await
        .unwrap_or(0);
    tracing::info!(tenant = %config.tenant, epoch = config.epoch, records = report.records, redelivered = report.redelivered, jumped = report.jumped, results = report.results, checkpoints = report.checkpoints, stopped = ?config.stop.get(), "job stopped");
    Ok(report)
}

/// What the job loop does next.
/// Each partition's records in a queue of its own ([`split_partitions`]), so that librdkafka
/// stops fetching a partition whose queue is full while it goes on fetching the others. With
/// one queue for all, every partition stopped together once it held `queued.min.messages`
/// and all started again in the same order; a broker that fills each fetch from the first
/// partition asked (tansu) then served the first partition alone until it reached its end. The
/// chaos test saw a partition fetched not at all for 70 s (its records counted late once the
/// others moved the watermark on).
type PartitionQueue = rdkafka::consumer::stream_consumer::StreamPartitionQueue<JobContext>;

/// Splits each partition of the job's input into its own queue. Right after the assignment:
/// what librdkafka fetched before goes to the consumer's own queue, which [`Input`] reads
/// first.
fn split_partitions(
    consumer: &Arc<StreamConsumer<JobContext>>,
    topic: &str,
    partitions: usize,
) -> Result<Vec<PartitionQueue>, JobError> {
    (0..partitions)
        .map(|p| {
            let partition = i32::try_from(p).unwrap_or(i32::MAX);
            consumer
                .split_partition_queue(topic, partition)
                .ok_or_else(|| {
                    JobError::StartUp(format!(
                        "no queue of its own for {topic} partition {partition}"
                    ))
                })
        })
        .collect()
}

/// The job's input: the consumer's own queue (events, and what was fetched before the split),
/// then the partitions' queues in turn, starting after the one that gave the last record.
///
/// The consumer's own queue is read first until it is empty: a partition's records there were
/// fetched before its queue was split off, so they come before any in that queue. After that
/// it only carries events (errors), and is read when every partition's queue is empty and
/// every [`MAIN_EVERY`] records: each read of an empty queue costs two polls and four clock
/// reads in rust-rdkafka. Read first at every record, it made a job catching up read the
/// whole topic of `scripts/bench recovery` in 12.1–14.5 s; read only when needed, 11.5–13.0 s.
/// (With one queue for all partitions: 9.2–9.4 s. The rest of the difference is the polls of
/// the partitions' queues, one per record, each with its own clock reads.)
struct Input<'a> {
    main: rdkafka::consumer::MessageStream<'a, JobContext>,
    partitions: Vec<rdkafka::consumer::MessageStream<'a, JobContext>>,
    next: usize,
    /// The consumer's own queue was found empty (twice in a row: once may be an event served).
    main_drained: bool,
    /// Records since the consumer's own queue was last read.
    since_main: u32,
}

/// How many records at most between two reads of the consumer's own queue once drained.
const MAIN_EVERY: u32 = 4_096;

impl<'a> Input<'a> {
    fn new(consumer: &'a StreamConsumer<JobContext>, queues: &'a [PartitionQueue]) -> Self {
        Input {
            main: consumer.stream(),
            partitions: queues.iter().map(PartitionQueue::stream).collect(),
            next: 0,
            main_drained: false,
            since_main: 0,
        }
    }

    /// The next record or event. Cancellation safe: a message is taken only when returned.
    async fn recv(&mut self) -> Result<rdkafka::message::BorrowedMessage<'a>, KafkaError> {
        std::future::poll_fn(|cx| {
            if !self.main_drained || self.since_main >= MAIN_EVERY {
                self.since_main = 0;
                for _ in 0..2 {
                    if let Poll::Ready(Some(message)) = self.main.poll_next_unpin(cx) {
                        return Poll::Ready(message);
                    }
                }
                self.main_drained = true;
            }
            let n = self.partitions.len();
            for i in 0..n {
                let at = (self.next + i) % n;
                if let Poll::Ready(Some(message)) = self.partitions[at].poll_next_unpin(cx) {
                    self.next = (at + 1) % n;
                    self.since_main += 1;
                    return Poll::Ready(message);
                }
            }
            // Nothing in any partition's queue: wait on the consumer's own queue too.
            if let Poll::Ready(Some(message)) = self.main.poll_next_unpin(cx) {
                return Poll::Ready(message);
            }
            Poll::Pending
        })
        .await
    }
}

enum Turn<'a> {
    Stop,
    Message(Result<rdkafka::message::BorrowedMessage<'a>, KafkaError>),
    Checkpoint,
    IdleCheck,
}

async fn tick_of(tick: &mut Option<tokio::time::Interval>) {
    match tick {
        Some(tick) => {
            tick.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The job's pipeline: visitor history in redb, every update also kept for the next history log.
type JobPipeline = Pipeline<Changelog<RedbStore>>;

/// The checkpoints a job writes (see [`crate::checkpoint`]).
///
/// A checkpoint is taken on the job loop: the history flushed, its changes taken, a copy of
/// the operator state, the offsets and sequence number. Writing it (history logs, packing
/// the state, chunks, the manifest and its acknowledgement, deleting what it replaces) then
/// goes on in a task of its own while the job reads on: those took 0.3–0.5 s of every
/// checkpoint of a tenant with a full day of history, a stall of the results every interval.
/// The next checkpoint, and the job's end (on any path), first wait for it: checkpoints land
/// in order, and nothing the next owner restores changes after this job is gone.
struct Checkpoints {
    epoch: u64,
    /// Checkpoints this job took.
    n: u64,
    /// Per partition, the first offset not yet processed.
    positions: Positions,
    /// What the last written checkpoint left; `None` while one is being written.
    written: Option<Written>,
    /// The checkpoint being written, giving back what it leaves.
    writing: Option<tokio::task::JoinHandle<Result<Written, JobError>>>,
}

/// What later checkpoints build on.
struct Written {
    /// The newest complete checkpoint on the topic: the one resumed, then this job's last.
    previous: Option<Manifest>,
    /// Older owners' manifests, deleted once this job's first checkpoint is in.
    obsolete: Vec<Manifest>,
    /// The history logs on the topic (read at the start or written since), and the entries
    /// in them: when those outnumber twice the visitors, the next checkpoint writes a
    /// snapshot and deletes these.
    history_logs: Vec<Key>,
    logged: u64,
}

/// A checkpoint as taken on the job loop, to be written.
struct Taken {
    /// History entries to log: every visitor (a snapshot) or what changed.
    entries: Vec<(u64, crate::history::History)>,
    snapshot: bool,
    state: crate::pipeline::PipelineState,
    manifest: Manifest,
    /// When it was taken, and how long the job loop spent on it.
    started: std::time::Instant,
    flush_ms: u64,
    loop_ms: u64,
}

impl Checkpoints {
    /// Waits for the checkpoint being written, if any.
    async fn settle(&mut self) -> Result<(), JobError> {
        if let Some(writing) = self.writing.take() {
            let written = writing
                .await
                .map_err(|e| JobError::StartUp(format!("checkpoint task: {e}")))??;
            self.written = Some(written);
        }
        Ok(())
    }

    /// Takes a checkpoint and writes it: in the background, or (`wait`) before returning.
    async fn write(
        &mut self,
        pipeline: &mut JobPipeline,
        output: &Arc<Output>,
        stopped: Option<Stopped>,
        wait: bool,
    ) -> Result<(), JobError> {
        self.settle().await?;
        let Some(written) = self.written.take() else {
            return Err(JobError::StartUp(
                "a failed checkpoint left nothing to build on".into(),
            ));
        };
        let started = std::time::Instant::now();
        pipeline.flush_history()?;
        let flush_ms = started.elapsed().as_millis() as u64;
        let changes = pipeline.store_mut().take_changes();
        let visitors = pipeline.store_mut().visitors().map_err(EngineError::from)?;
        let snapshot = written.logged + changes.len() as u64 > 2 * visitors.max(1);
        // Every visitor (the changes are in the store already), or what changed.
        let entries = if snapshot {
            pipeline.store_mut().all().map_err(EngineError::from)?
        } else {
            changes
        };
        let offsets: Vec<PartitionOffset> = self
            .positions
            .offsets()
            .into_iter()
            .map(|(partition, next)| PartitionOffset { partition, next })
            .collect();
        self.n += 1;
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            tenant: pipeline.tenant().clone(),
            epoch: self.epoch,
            n: self.n,
            run: pipeline.run(),
            chunks: 0,
            bytes: 0,
            crc32: 0,
            offsets,
            seq: pipeline.seq(),
            watermark_ms: pipeline.watermark(),
            created_at_ms: now_ms(),
            stopped,
        };
        let taken = Taken {
            entries,
            snapshot,
            state: pipeline.snapshot(),
            manifest,
            started,
            flush_ms,
            loop_ms: started.elapsed().as_millis() as u64,
        };
        let writing = write_checkpoint(taken, written, output.clone());
        if wait {
            self.written = Some(writing.await?);
        } else {
            self.writing = Some(tokio::spawn(writing));
        }
        Ok(())
    }
}

/// Writes a taken checkpoint: the history log (or a snapshot, then tombstones for the logs it
/// replaces), then the operator state, then the manifest (the order a restore relies on),
/// then deletes what the new manifest makes obsolete.
async fn write_checkpoint(
    taken: Taken,
    mut written: Written,
    output: Arc<Output>,
) -> Result<Written, JobError> {
    let Taken {
        entries,
        snapshot,
        state,
        mut manifest,
        started,
        flush_ms,
        loop_ms,
    } = taken;
    let (epoch, n) = (manifest.epoch, manifest.n);
    let history = entries.len();
    let phase = std::time::Instant::now();
    // Building the logs and packing megabytes of state take a while: on blocking threads.
    let logs = tokio::task::spawn_blocking(move || checkpoint::history_records(epoch, n, &entries))
        .await
        .map_err(|e| JobError::StartUp(e.to_string()))??;
    for (key, value) in &logs {
        output.state(&key.encode(), Some(value)).await?;
    }
    if snapshot {
        // The snapshot holds everything the older logs did: they can go.
        for key in std::mem::take(&mut written.history_logs) {
            output.state(&key.encode(), None).await?;
        }
        written.logged = 0;
    }
    written.logged += history as u64;
    let history_ms = phase.elapsed().as_millis() as u64;
    let phase = std::time::Instant::now();
    written
        .history_logs
        .extend(logs.into_iter().map(|(key, _)| key));
    let packed = tokio::task::spawn_blocking(move || {
        Ok::<_, JobError>(checkpoint::pack(&state.to_bytes()?)?)
    })
    .await
    .map_err(|e| JobError::StartUp(e.to_string()))??;
    let pack_ms = phase.elapsed().as_millis() as u64;
    // The previous checkpoint's chunks go once this one is in; another epoch's manifest goes
    // too (its key is not this job's).
    let previous = written.previous.take();
    let records = checkpoint::records(&mut manifest, &packed, previous.as_ref());
    // The manifest is waited for: the checkpoint is written once the broker has it (and so
    // everything before it), whatever happens to this job after.
    let manifest_key = Key::Manifest { epoch }.encode();
    for (key, value) in &records {
        if *key == manifest_key {
            output.state_acked(key, value.as_deref()).await?;
        } else {
            output.state(key, value.as_deref()).await?;
        }
    }
    let mut obsolete = std::mem::take(&mut written.obsolete);
    obsolete.extend(previous.filter(|p| p.epoch != epoch));
    for old in &obsolete {
        for key in old.chunk_keys() {
            output.state(&key.encode(), None).await?;
        }
        output
            .state(&Key::Manifest { epoch: old.epoch }.encode(), None)
            .await?;
    }
    tracing::info!(
        tenant = %manifest.tenant,
        epoch,
        n,
        seq = manifest.seq,
        bytes = manifest.bytes,
        chunks = manifest.chunks,
        history,
        snapshot,
        stopped = ?manifest.stopped,
        loop_ms,
        flush_ms,
        history_ms,
        pack_ms,
        ms = started.elapsed().as_millis() as u64,
        "checkpoint written"
    );
    written.previous = Some(manifest);
    Ok(written)
}

/// What a job starts from.
struct Started {
    plan: Plan,
    store: Changelog<RedbStore>,
}

/// Where a job starts, decided from its checkpoints (see [`plan`]).
struct Plan {
    partitions: usize,
    /// Windows before this are not emitted (a job reading one window back).
    from_ms: Option<i64>,
    /// Where each partition is read from.
    offsets: Vec<(i32, i64)>,
    /// The checkpoint resumed and its operator state.
    resumed: Option<(Manifest, PipelineState)>,
    obsolete: Vec<Manifest>,
    /// The history logs on `state.<tenant>` and how many entries they hold.
    history_logs: Vec<Key>,
    logged: u64,
}

/// History batches waiting for the merge thread during a start (a batch is [`MERGE_BATCH`]
/// entries of 32 bytes): room for a day of MSNBC visitors (990,000), 34 MB at the most, so the
/// state read does not wait for the merge (with room for 4 it did, and the positions were
/// looked up only once nearly all was merged).
const MERGE_QUEUE: usize = 64;

/// Reads the tenant's checkpoints (rebuilding the visitor history from its logs), then
/// either resumes the newest complete one or seeks as `config.start` says; assigns the
/// consumer. Blocking.
///
/// The history read back is merged into the store on a thread of its own while this one goes
/// on: the checkpoint's state decoded, its positions looked up. For a tenant with a day of
/// history each took about half a second of every takeover (620,000 visitors merged in 580 ms,
/// positions looked up in 540 ms), one after the other.
fn start(
    consumer: &StreamConsumer<JobContext>,
    config: &JobConfig,
    topic: &str,
) -> Result<Started, JobError> {
    let mut store =
        Changelog::new(RedbStore::open(&config.history_path).map_err(EngineError::from)?);
    let (plan, merged) = std::thread::scope(|s| {
        let (history, batches) = std::sync::mpsc::sync_channel::<HistoryBatch>(MERGE_QUEUE);
        let store = &mut store;
        let merger = std::thread::Builder::new()
            .name("history-merge".into())
            .spawn_scoped(s, move || {
                for mut batch in batches {
                    store.merge_batch(&mut batch.drain(..))?;
                }
                Ok::<(), StoreError>(())
            });
        let merger = match merger {
            Ok(merger) => merger,
            Err(e) => {
                return (
                    Err(JobError::StartUp(format!("no history merge thread: {e}"))),
                    Ok(()),
                );
            }
        };
        let plan = match config.checkpoint_interval {
            Some(_) => read_state(&config.brokers, &topics::state(&config.tenant), &history),
            None => Ok(Scan::default()),
        }
        .and_then(|scan| plan(consumer, config, topic, scan));
        drop(history);
        let merged = merger
            .join()
            .unwrap_or_else(|_| Err(StoreError("the history merge thread panicked".into())));
        (plan, merged)
    });
    // A failed merge first: the state read then stopped because of it.
    merged.map_err(EngineError::from)?;
    Ok(Started { plan: plan?, store })
}

/// Decides where the job starts from what `state.<tenant>` held, and assigns the consumer
/// there. Blocking.
fn plan(
    consumer: &StreamConsumer<JobContext>,
    config: &JobConfig,
    topic: &str,
    scan: Scan,
) -> Result<Plan, JobError> {
    let found = scan.latest();
    let history_logs: Vec<Key> = scan.history_logs().collect();
    let logged = scan.history_records;
    let wanted = found.as_ref().is_some_and(|f| {
        config.start == StartFrom::Earliest
            || (f.manifest.stopped != Some(Stopped::Linger)
                && now_ms().saturating_sub(f.manifest.created_at_ms)
                    <= i64::try_from(config.resume_max_age.as_millis()).unwrap_or(i64::MAX))
    });
    // A checkpoint whose state does not decode (written by an incompatible version, or
    // damaged despite its CRC) cannot be resumed: the job starts afresh instead of failing
    // at every start, and says so.
    let state = match &found {
        Some(f) if wanted => {
            match checkpoint::unpack(&f.packed)
                .map_err(JobError::from)
                .and_then(|bytes| Ok(Pipeline::<RedbStore>::state_from_bytes(&bytes)?))
            {
                Ok(state) => Some(state),
                Err(error) => {
                    tracing::warn!(
                        tenant = %config.tenant,
                        epoch = f.manifest.epoch,
                        n = f.manifest.n,
                        %error,
                        "checkpoint state unusable; starting afresh"
                    );
                    None
                }
            }
        }
        _ => None,
    };
    let resumable = state.is_some();
    if let Some(f) = &found {
        tracing::info!(
            tenant = %config.tenant,
            epoch = f.manifest.epoch,
            n = f.manifest.n,
            run = f.manifest.run,
            seq = f.manifest.seq,
            stopped = ?f.manifest.stopped,
            age_ms = now_ms().saturating_sub(f.manifest.created_at_ms),
            history = scan.history_records,
            resumable,
            "checkpoint found"
        );
    }
    let obsolete: Vec<Manifest> = scan
        .manifests()
        .filter(|m| {
            m.epoch != config.epoch
                && found
                    .as_ref()
                    .is_none_or(|f| !resumable || f.manifest.epoch != m.epoch)
        })
        .cloned()
        .collect();
    if let (Some(state), Some(found)) = (state, found) {
        let Assignment {
            partitions,
            offsets,
            ..
        } = assign_resumed(consumer, &config.brokers, topic, &found.manifest.offsets)?;
        return Ok(Plan {
            partitions,
            from_ms: None,
            offsets,
            resumed: Some((found.manifest, state)),
            obsolete,
            history_logs,
            logged,
        });
    }
    let Assignment {
        partitions,
        from_ms,
        offsets,
    } = assign(
        consumer,
        &config.brokers,
        topic,
        config.start,
        &config.operators,
    )?;
    Ok(Plan {
        partitions,
        from_ms,
        offsets,
        resumed: None,
        obsolete,
        history_logs,
        logged,
    })
}

/// How many history records a restore merges into the store per write transaction.
const MERGE_BATCH: usize = 16_384;

/// Visitor history read back from `state.<tenant>`, on its way to the store.
type HistoryBatch = Vec<(u64, History)>;

/// Reads `state.<tenant>` from its start to its end: history to `history` in batches (merged
/// newest-wins by the receiver), checkpoints into the scan. A topic that does not exist yet
/// is empty. Blocking.
fn read_state(
    brokers: &str,
    topic: &str,
    history: &std::sync::mpsc::SyncSender<HistoryBatch>,
) -> Result<Scan, JobError> {
    let started = std::time::Instant::now();
    // Destroyed off this thread when done: destroying it here held the job's start up by
    // 0–100 ms (measured), after everything was read.
    let consumer = ProbeConsumer::new(
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("clickpulse-restore.{topic}"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("max.partition.fetch.bytes", "4194304")
            // Read to the end and stop: no fetch should wait for more (see the job's consumer).
            .set("fetch.wait.max.ms", "10")
            .set("fetch.queue.backoff.ms", "10")
            .create_with_context(JobContext)?,
    );
    let metadata = consumer.fetch_metadata(Some(topic), LOOKUP_TIMEOUT)?;
    let exists = metadata
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
    let mut scan = Scan::default();
    if !exists {
        return Ok(scan);
    }
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&list)?;
    let mut batch = Vec::with_capacity(MERGE_BATCH);
    let mut progress = std::time::Instant::now();
    let mut records = 0u64;
    let merge_stopped = || JobError::StartUp("the history merge stopped".into());
    loop {
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                records += 1;
                progress = std::time::Instant::now();
                scan.add(m.key(), m.payload(), |v, h| batch.push((v, h)));
                if batch.len() >= MERGE_BATCH {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(MERGE_BATCH));
                    history.send(full).map_err(|_| merge_stopped())?;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(e.into()),
            None if progress.elapsed() >= LOOKUP_TIMEOUT => {
                return Err(JobError::Seek(format!(
                    "{topic} sent nothing for {LOOKUP_TIMEOUT:?} before its end"
                )));
            }
            None => {}
        }
    }
    if !batch.is_empty() {
        history.send(batch).map_err(|_| merge_stopped())?;
    }
    tracing::debug!(%topic, records, history = scan.history_records, unreadable = scan.unreadable, ms = started.elapsed().as_millis() as u64, "state read");
    Ok(scan)
}

/// Assigns every partition where a resumed checkpoint left it. Where only batch starts can be
/// read, a position at or before each checkpoint offset is found and the records before the
/// offset are skipped by the job. Blocking.
fn assign_resumed(
    consumer: &StreamConsumer<JobContext>,
    brokers: &str,
    topic: &str,
    from: &[PartitionOffset],
) -> Result<Assignment, JobError> {
    let partitions = topic_partitions(consumer, topic)?;
    let mut wanted = Vec::new();
    let mut empty = Vec::new();
    for &p in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, LOOKUP_TIMEOUT)?;
        let next = from
            .iter()
            .find(|o| o.partition == p)
            .map_or(low, |o| o.next);
        if next < low {
            tracing::warn!(%topic, partition = p, next, low, "records after the checkpoint are gone (retention): resuming at the first that is left");
        }
        if high <= low {
            // Nothing to find a position in (and no answer would come): read from `next`.
            empty.push((p, next.max(low)));
        } else {
            wanted.push((p, next.max(low), low));
        }
    }
    let mut positions = Probe::new(brokers, topic).at_or_before(&wanted)?;
    positions.extend(&empty);
    wanted.extend(empty.iter().map(|&(p, next)| (p, next, next)));
    let mut list = TopicPartitionList::new();
    for &(p, at) in &positions {
        list.add_partition_offset(topic, p, Offset::Offset(at))?;
    }
    consumer.assign(&list)?;
    tracing::info!(%topic, ?positions, "resumed at the checkpoint's offsets");
    let max = partitions.iter().copied().max().unwrap_or(0);
    Ok(Assignment {
        partitions: usize::try_from(max).unwrap_or(0) + 1,
        from_ms: None,
        offsets: wanted.iter().map(|&(p, next, _)| (p, next)).collect(),
    })
}

/// How a job's consumer was assigned.
struct Assignment {
    /// Partition count (highest id + 1).
    partitions: usize,
    /// When starting from an event time, that time.
    from_ms: Option<i64>,
    /// Per partition, the first offset the job processes.
    offsets: Vec<(i32, i64)>,
}

fn topic_partitions(
    consumer: &StreamConsumer<JobContext>,
    topic: &str,
) -> Result<Vec<i32>, JobError> {
    let metadata = consumer.fetch_metadata(Some(topic), LOOKUP_TIMEOUT)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(JobError::NoTopic(topic.to_owned()));
    }
    Ok(partitions)
}

/// How often a job logs its progress (`job progress`).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// How long a stopping job waits for its output to be acknowledged.
const OUTPUT_FLUSH: Duration = Duration::from_secs(10);

/// Sends the pipeline's new results to `results.<tenant>` and the channel; a full channel
/// waits (backpressure), never drops.
async fn emit(
    pipeline: &mut JobPipeline,
    output: &Output,
    results: &mpsc::Sender<ResultMsg>,
    report: &mut JobReport,
) -> Result<(), JobError> {
    for result in pipeline.take_results() {
        report.results += 1;
        output.result(&result).await?;
        results
            .send(result)
            .await
            .map_err(|_| JobError::ResultsClosed)?;
    }
    Ok(())
}

/// Assigns every partition of `topic` at the start position `start` says. Blocking (metadata
/// and offset look-ups).
fn assign(
    consumer: &StreamConsumer<JobContext>,
    brokers: &str,
    topic: &str,
    start: StartFrom,
    ops: &OperatorConfig,
) -> Result<Assignment, JobError> {
    let partitions = topic_partitions(consumer, topic)?;
    let mut list = TopicPartitionList::new();
    let mut assigned = Vec::new();
    let from_ms = if start == StartFrom::Earliest {
        for &p in &partitions {
            let (low, _) = consumer.fetch_watermarks(topic, p, LOOKUP_TIMEOUT)?;
            list.add_partition_offset(topic, p, Offset::Offset(low))?;
            assigned.push((p, low));
        }
        None
    } else {
        let probe = Probe::new(brokers, topic);
        let bounds: Vec<(i32, i64, i64)> = partitions
            .iter()
            .map(|&p| {
                let (low, high) = consumer.fetch_watermarks(topic, p, LOOKUP_TIMEOUT)?;
                Ok((p, low, high))
            })
            .collect::<Result<_, KafkaError>>()?;
        tracing::debug!(?bounds, "partition bounds");
        let phase = std::time::Instant::now();
        let Tails {
            newest,
            bounds,
            starts,
        } = probe.newest(&bounds)?;
        let newest_ms = phase.elapsed().as_millis() as u64;
        tracing::debug!(?newest, ?bounds, "newest event times");
        let from_ms = match start {
            StartFrom::Time(ms) => Some(ms),
            // The newest window that is final once the newest records are read: the first
            // window emitted is complete, and it comes right after the backfill.
            _ => newest.values().max().map(|&newest| {
                (newest - ops.allowed_lateness_ms).div_euclid(ops.slide_ms) * ops.slide_ms
                    - ops.window_ms
            }),
        };
        let phase = std::time::Instant::now();
        let offsets = match from_ms {
            Some(ms) => {
                // Known without a search: a partition with nothing at or after the time starts
                // at its end; one whose tail, just read, begins before the time starts there
                // (every earlier record is older, and it is a position that answers). Only the
                // other partitions need a search.
                let known = |p: i32, end: i64| {
                    if newest.get(&p).is_none_or(|&n| n < ms) {
                        Some(end)
                    } else {
                        starts
                            .get(&p)
                            .filter(|&&(_, time)| time < ms)
                            .map(|&(offset, _)| offset)
                    }
                };
                let mut offsets = Vec::new();
                let mut unknown = Vec::new();
                for &(p, low, end) in &bounds {
                    match known(p, end) {
                        Some(offset) => offsets.push((p, offset)),
                        None => unknown.push((p, low, end)),
                    }
                }
                if !unknown.is_empty() {
                    offsets.extend(probe.first_at_or_after(&unknown, &newest, ms)?);
                }
                offsets
            }
            None => bounds.iter().map(|&(p, low, _)| (p, low)).collect(),
        };
        tracing::info!(
            %topic,
            newest_ms,
            search_ms = phase.elapsed().as_millis() as u64,
            ?offsets,
            "start offsets found"
        );
        for (p, offset) in offsets {
            list.add_partition_offset(topic, p, Offset::Offset(offset))?;
            assigned.push((p, offset));
        }
        from_ms
    };
    consumer.assign(&list)?;
    let max = partitions.iter().copied().max().unwrap_or(0);
    Ok(Assignment {
        partitions: usize::try_from(max).unwrap_or(0) + 1,
        from_ms,
        offsets: assigned,
    })
}

/// The job's Kafka client context (its consumer and its look-up and restore consumers):
/// end-of-partition is news for the idle check (it arrives
/// through `recv`), not an error to log; real client errors are logged once, with the reason.
pub struct JobContext;

impl ClientContext for JobContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(
            error,
            KafkaError::PartitionEOF(_)
                | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::error!(%error, reason, "kafka client error");
        }
    }

    /// librdkafka's own log lines, under the `librdkafka` target (its debug contexts, when
    /// turned on, at debug).
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }
}

impl ConsumerContext for JobContext {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backlog in three partitions, in stored batches of about 1 MiB: every partition's
    /// records come early, though the broker (tansu) fills each fetch from the first partition
    /// asked. With one queue for all partitions, librdkafka stopped fetching every partition
    /// at once when that queue was full and started them again in the same order, so the
    /// first partition was read to its end before the third was fetched at all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_partition_is_read_early_while_all_have_a_backlog() {
        const PER_PARTITION: i32 = 150_000;
        let broker = clickpulse_tests::Broker::start().unwrap();
        let tenant = Tenant::new(clickpulse_tests::unique_name("fair")).unwrap();
        let topic = topics::clicks(&tenant);
        let kafka = clickpulse_replay::KafkaConfig::new(broker.bootstrap());
        clickpulse_replay::kafka::ensure_topics(&kafka, std::slice::from_ref(&topic), 3, 1)
            .unwrap();
        let producer: rdkafka::producer::BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .set("batch.size", "1048576")
            .set("linger.ms", "200")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .unwrap();
        let value = [7u8; 40];
        for i in 0..PER_PARTITION {
            for p in 0..3 {
                let key = i.to_be_bytes();
                let record = rdkafka::producer::BaseRecord::to(&topic)
                    .partition(p)
                    .key(&key)
                    .payload(&value);
                producer.send(record).map_err(|(e, _)| e).unwrap();
            }
            if i % 10_000 == 0 {
                producer.poll(Duration::ZERO);
            }
        }
        rdkafka::producer::Producer::flush(&producer, Duration::from_secs(60)).unwrap();
        drop(producer);

        let config = JobConfig::new(tenant.clone(), 1, broker.bootstrap(), "unused".into());
        let consumer = Arc::new(input_consumer(&config).unwrap());
        let mut list = TopicPartitionList::new();
        for p in 0..3 {
            list.add_partition_offset(&topic, p, Offset::Offset(0))
                .unwrap();
        }
        consumer.assign(&list).unwrap();
        let queues = split_partitions(&consumer, &topic, 3).unwrap();
        // Fetches go on while nothing is read: every queue fills to its bound.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut input = Input::new(&consumer, &queues);
        let mut first_of = [None::<usize>; 3];
        let mut read = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while first_of.iter().any(Option::is_none) && read < 3 * PER_PARTITION as usize {
            let message = tokio::time::timeout_at(deadline, input.recv())
                .await
                .expect("records within 60 s");
            let Ok(message) = message else { continue };
            let p = usize::try_from(message.partition()).unwrap();
            first_of[p].get_or_insert(read);
            read += 1;
        }
        // Each partition within a queue's bound of records, where one queue for all gave the
        // third partition's first record after 300,000 (3 runs in 5), or after 80,000.
        for (p, first) in first_of.iter().enumerate() {
            let first = first.unwrap_or_else(|| panic!("partition {p} never read"));
            assert!(
                first < 30_000,
                "partition {p}'s first record was the {first}th read ({first_of:?})"
            );
        }
    }
}
