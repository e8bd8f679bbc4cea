//! The async shell around a tenant's [`Pipeline`]: Kafka in, results out.
//!
//! ```text
//!  clicks.<tenant> (all partitions, assigned, no group rebalancing)
//!      │ StreamConsumer::recv
//!      ▼
//!  ClickRef::decode ──bad──▶ counted as dead-lettered (dead.<tenant> comes with exactly-once)
//!      │
//!      ▼
//!  Pipeline::on_click ──▶ results ──▶ bounded mpsc ──▶ publisher (ZeroMQ, results topic, tests)
//!      ▲
//!  idle check: a partition that reached the end of its log (partition EOF) and stayed silent
//!  for `idle_timeout` stops holding the watermark back — never one that is merely slow to
//!  fetch, or its first records would arrive late
//! ```
//!
//! The job only moves data; all semantics are in the pipeline. A full result channel blocks the
//! job (backpressure onto Kafka), never drops a result.

use std::path::PathBuf;
use std::time::Duration;

use clickpulse_protocol::results::ResultMsg;
use clickpulse_protocol::{ClickRef, Tenant, topics};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::OperatorConfig;
use crate::history::RedbStore;
use crate::pipeline::{Admission, EngineError, Pipeline};

/// Where a starting job begins reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The first offset of every partition (audits, tests).
    Earliest,
    /// The first offset at or after this event time in every partition (`offsets_for_times`).
    Time(i64),
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
}

/// What a job did, reported when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobReport {
    pub records: u64,
    pub accepted: u64,
    pub late: u64,
    pub dead_lettered: u64,
    pub results: u64,
}

/// Runs a tenant job until `shutdown` is cancelled.
pub async fn run_job(
    config: JobConfig,
    results: mpsc::Sender<ResultMsg>,
    shutdown: CancellationToken,
) -> Result<JobReport, JobError> {
    let topic = topics::clicks(&config.tenant);
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        // Partitions are assigned explicitly; the group id only names the client.
        .set("group.id", format!("clickpulse-job.{}", config.tenant))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // End-of-partition events tell "caught up" from "not fetched yet" for idleness.
        .set("enable.partition.eof", "true")
        .create()?;
    let partitions = assign(&consumer, &topic, config.start)?;
    let store = RedbStore::open(&config.history_path).map_err(EngineError::from)?;
    let mut pipeline = Pipeline::new(
        config.tenant.clone(),
        config.epoch,
        partitions,
        config.operators.clone(),
        store,
    )?;
    tracing::info!(tenant = %config.tenant, epoch = config.epoch, partitions, "job started");

    let mut report = JobReport::default();
    let mut last_seen = vec![Instant::now(); partitions];
    let mut at_end = vec![false; partitions];
    let mut idle = vec![false; partitions];
    let mut idle_check = tokio::time::interval(config.idle_timeout / 2);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            message = consumer.recv() => {
                let message = match message {
                    Ok(m) => m,
                    Err(KafkaError::PartitionEOF(p)) => {
                        if let Some(end) = usize::try_from(p).ok().and_then(|p| at_end.get_mut(p)) {
                            *end = true;
                        }
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                report.records += 1;
                let partition = usize::try_from(message.partition()).unwrap_or(0);
                if let Some(seen) = last_seen.get_mut(partition) {
                    *seen = Instant::now();
                    at_end[partition] = false;
                    idle[partition] = false;
                }
                match message.payload().map(ClickRef::decode) {
                    Some(Ok(click)) if click.tenant == config.tenant.as_str() => {
                        match pipeline.on_click(partition, click.visitor, click.page, click.event_time_ms)? {
                            Admission::Accepted => report.accepted += 1,
                            Admission::Late => report.late += 1,
                            Admission::UnknownPage | Admission::BadTime => report.dead_lettered += 1,
                        }
                    }
                    other => {
                        let reason = match other {
                            None => "empty record".to_owned(),
                            Some(Err(e)) => e.to_string(),
                            Some(Ok(c)) => format!("record of tenant {} in {topic}", c.tenant),
                        };
                        tracing::warn!(%topic, partition, offset = message.offset(), %reason, "malformed click record");
                        pipeline.on_dead_letter();
                        report.dead_lettered += 1;
                    }
                }
            }
            _ = idle_check.tick() => {
                for (p, seen) in last_seen.iter().enumerate() {
                    if at_end[p] && !idle[p] && seen.elapsed() >= config.idle_timeout {
                        idle[p] = true;
                        pipeline.on_idle(p)?;
                    }
                }
            }
        }
        for result in pipeline.take_results() {
            report.results += 1;
            results
                .send(result)
                .await
                .map_err(|_| JobError::ResultsClosed)?;
        }
    }
    pipeline.flush_history()?;
    tracing::info!(tenant = %config.tenant, epoch = config.epoch, records = report.records, results = report.results, "job stopped");
    Ok(report)
}

/// Assigns every partition of `topic` at the start position; returns the partition count.
/// Blocking (metadata and offset look-ups) but brief, and only at start-up.
fn assign(consumer: &StreamConsumer, topic: &str, start: StartFrom) -> Result<usize, JobError> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(JobError::NoTopic(topic.to_owned()));
    }
    let mut list = TopicPartitionList::new();
    for &p in &partitions {
        let offset = match start {
            StartFrom::Earliest => Offset::Beginning,
            StartFrom::Time(ms) => Offset::Offset(ms),
        };
        list.add_partition_offset(topic, p, offset)?;
    }
    if let StartFrom::Time(_) = start {
        // offsets_for_times takes the times in the offset field and answers offsets; a
        // partition without a record at or after the time answers End.
        list = consumer.offsets_for_times(list, Duration::from_secs(10))?;
    }
    consumer.assign(&list)?;
    let max = partitions.iter().copied().max().unwrap_or(0);
    Ok(usize::try_from(max).unwrap_or(0) + 1)
}
