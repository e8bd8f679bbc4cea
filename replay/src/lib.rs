//! The replayer: the MSNBC clickstream into Kafka, one topic per tenant, in event-time order.
//!
//! ```text
//!  msnbc990928.seq.gz ─▶ dataset::Users ─▶ merge::Merge ─▶ pacing ─▶ kafka::KafkaSink
//!  (or --synthetic)      one user at a     (k-way merge     (--speed)  idempotent producer,
//!                        time, bad lines   on the replay               key = visitor,
//!                        skipped+counted   clock)                      topic clicks.<tenant>
//! ```
//!
//! [`run`] is everything `clickpulse replay` does; the binary only parses flags.
#![forbid(unsafe_code)]

pub mod dataset;
pub mod kafka;
pub mod merge;
mod progress;

use std::fmt;
use std::time::{Duration, Instant};

use clickpulse_protocol::click::{encode_into, visitor_key};
use clickpulse_protocol::clock::tenant_index;
use clickpulse_protocol::pages::PAGE_COUNT;
use clickpulse_protocol::{Tenant, topics};
use tokio_util::sync::CancellationToken;

pub use dataset::{BadLines, DatasetError, Source};
pub use kafka::{KafkaConfig, KafkaSinkError};
pub use progress::ProgressMode;

use crate::kafka::KafkaSink;
use crate::merge::Merge;
use crate::progress::Progress;

/// How fast event time runs relative to wall time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// As fast as the broker takes it.
    Max,
    /// `x` seconds of event time per second of wall time.
    Factor(f64),
}

impl std::str::FromStr for Speed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "max" {
            return Ok(Speed::Max);
        }
        match s.parse::<f64>() {
            Ok(x) if x.is_finite() && x > 0.0 => Ok(Speed::Factor(x)),
            _ => Err(format!(
                "speed must be a positive number or \"max\", not {s:?}"
            )),
        }
    }
}

/// Everything a replay needs.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    pub source: Source,
    pub kafka: KafkaConfig,
    pub tenants: Vec<Tenant>,
    pub limit: Option<u64>,
    pub speed: Speed,
    pub t0_ms: i64,
    pub partitions: i32,
    pub replication_factor: i32,
    pub progress: ProgressMode,
}

impl ReplayConfig {
    /// A replay of `source` into `brokers` with the defaults of `clickpulse replay`: all users,
    /// as fast as the broker takes, from the clock's default t0, 3 partitions, replication 1,
    /// 20 s to connect, 30 s per acknowledgement, progress as log lines.
    pub fn new(source: Source, brokers: &str, tenants: Vec<Tenant>) -> Self {
        ReplayConfig {
            source,
            kafka: KafkaConfig::new(brokers),
            tenants,
            limit: None,
            speed: Speed::Max,
            t0_ms: clickpulse_protocol::clock::DEFAULT_T0_MS,
            partitions: 3,
            replication_factor: 1,
            progress: ProgressMode::Lines,
        }
    }
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("invalid replay configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// Boxed: Kafka errors are large, and this travels in every `Result` of the replay.
    #[error(transparent)]
    Kafka(Box<KafkaSinkError>),
}

impl From<KafkaSinkError> for ReplayError {
    fn from(e: KafkaSinkError) -> Self {
        ReplayError::Kafka(Box::new(e))
    }
}

/// What was replayed for one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSummary {
    pub tenant: Tenant,
    pub topic: String,
    pub visitors: u64,
    pub events: u64,
    /// Views per page, index 0 = page 1.
    pub pages: [u64; PAGE_COUNT],
    pub first_event_ms: Option<i64>,
    pub last_event_ms: Option<i64>,
}

/// What a replay did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub tenants: Vec<TenantSummary>,
    pub events: u64,
    pub bad_lines: BadLines,
    pub elapsed: Duration,
    /// Stopped early by the shutdown token (Ctrl-C); everything sent was still acknowledged.
    pub interrupted: bool,
}

impl Summary {
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.interrupted {
            "interrupted"
        } else {
            "complete"
        };
        writeln!(
            f,
            "replay {state}: {} events in {:.1?} ({:.0} events/s)",
            self.events,
            self.elapsed,
            self.events_per_sec()
        )?;
        writeln!(
            f,
            "{:<16} {:<24} {:>10} {:>10}  {:<24} {:<24}",
            "tenant", "topic", "visitors", "events", "first event", "last event"
        )?;
        for t in &self.tenants {
            writeln!(
                f,
                "{:<16} {:<24} {:>10} {:>10}  {:<24} {:<24}",
                t.tenant.as_str(),
                t.topic,
                t.visitors,
                t.events,
                progress::format_time(t.first_event_ms),
                progress::format_time(t.last_event_ms),
            )?;
        }
        if self.bad_lines.count > 0 {
            writeln!(f, "skipped {} bad lines:", self.bad_lines.count)?;
            for bad in &self.bad_lines.examples {
                writeln!(f, "  line {}: {}", bad.line, bad.reason)?;
            }
            if self.bad_lines.count > self.bad_lines.examples.len() as u64 {
                writeln!(f, "  …")?;
            }
        }
        Ok(())
    }
}

/// Replays the source into Kafka. Stops early, cleanly, when `shutdown` is cancelled.
pub fn run(config: &ReplayConfig, shutdown: &CancellationToken) -> Result<Summary, ReplayError> {
    if config.tenants.is_empty() {
        return Err(ReplayError::Config("at least one tenant is needed".into()));
    }
    if config.partitions < 1 {
        return Err(ReplayError::Config(
            "--partitions must be at least 1".into(),
        ));
    }
    // A first pass counts the events, for progress and ETA; it also fails fast on a bad file
    // before anything is produced.
    let (_, total_events, _) = dataset::scan(&config.source, config.limit)?;
    let mut sink = KafkaSink::connect(&config.kafka)?;
    let topic_names: Vec<String> = config.tenants.iter().map(topics::clicks).collect();
    sink.ensure_topics(&topic_names, config.partitions, config.replication_factor)?;
    tracing::info!(
        source = %config.source.describe(),
        events = total_events,
        tenants = topic_names.join(","),
        "replay started"
    );

    let mut summaries: Vec<TenantSummary> = config
        .tenants
        .iter()
        .zip(&topic_names)
        .map(|(tenant, topic)| TenantSummary {
            tenant: tenant.clone(),
            topic: topic.clone(),
            visitors: 0,
            events: 0,
            pages: [0; PAGE_COUNT],
            first_event_ms: None,
            last_event_ms: None,
        })
        .collect();

    let started = Instant::now();
    let mut progress = Progress::new(config.progress, total_events);
    let mut pacer = Pacer::new(config.speed);
    let mut merge = Merge::new(config.source.open(config.limit)?, config.t0_ms);
    let mut value = Vec::with_capacity(64);
    let mut events = 0u64;
    let mut interrupted = false;
    for view in merge.by_ref() {
        let view = view?;
        if shutdown.is_cancelled() {
            interrupted = true;
            break;
        }
        if !pacer.wait_for(view.time_ms, &sink, shutdown)? {
            interrupted = true;
            break;
        }
        let index = tenant_index(view.user, config.tenants.len());
        let summary = &mut summaries[index];
        value.clear();
        encode_into(
            &mut value,
            summary.tenant.as_str(),
            view.user,
            view.page,
            view.time_ms,
        );
        sink.send(
            &summary.topic,
            &visitor_key(view.user),
            &value,
            view.time_ms,
        )?;
        summary.events += 1;
        summary.visitors += u64::from(view.index == 0);
        summary.pages[usize::from(view.page.0) - 1] += 1;
        summary.first_event_ms.get_or_insert(view.time_ms);
        summary.last_event_ms = Some(view.time_ms);
        events += 1;
        progress.update(events, view.time_ms);
    }
    progress.finish(events);
    tracing::info!(events, "waiting for the broker to acknowledge every record");
    sink.finish()?;
    let bad_lines = merge.into_users().bad_lines();
    if bad_lines.count > 0 {
        for bad in &bad_lines.examples {
            tracing::warn!(line = bad.line, reason = %bad.reason, "bad line skipped");
        }
    }
    Ok(Summary {
        tenants: summaries,
        events,
        bad_lines,
        elapsed: started.elapsed(),
        interrupted,
    })
}

/// Holds events back until wall time catches up with `event time / speed`.
struct Pacer {
    speed: Speed,
    origin: Option<(Instant, i64)>,
}

impl Pacer {
    fn new(speed: Speed) -> Self {
        Pacer {
            speed,
            origin: None,
        }
    }

    /// Waits until the event at `time_ms` is due, serving Kafka acknowledgements meanwhile.
    /// Returns false when shutdown was requested during the wait.
    fn wait_for(
        &mut self,
        time_ms: i64,
        sink: &KafkaSink,
        shutdown: &CancellationToken,
    ) -> Result<bool, KafkaSinkError> {
        let Speed::Factor(speed) = self.speed else {
            return Ok(true);
        };
        let (wall0, event0) = *self.origin.get_or_insert((Instant::now(), time_ms));
        let due =
            wall0 + Duration::from_secs_f64((time_ms - event0).max(0) as f64 / 1000.0 / speed);
        loop {
            let now = Instant::now();
            if now >= due {
                return Ok(true);
            }
            if shutdown.is_cancelled() {
                return Ok(false);
            }
            sink.poll((due - now).min(Duration::from_millis(50)))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speed_parses_max_and_positive_factors() {
        assert_eq!("max".parse::<Speed>(), Ok(Speed::Max));
        assert_eq!("60".parse::<Speed>(), Ok(Speed::Factor(60.0)));
        assert_eq!("0.5".parse::<Speed>(), Ok(Speed::Factor(0.5)));
        for bad in ["0", "-1", "fast", "NaN", "inf"] {
            assert!(bad.parse::<Speed>().is_err(), "{bad} accepted");
        }
    }
}
