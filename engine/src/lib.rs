//! The engine: per-tenant event-time aggregations over the click stream.
//!
//! ```text
//!            ┌──────────────────────── job (async shell: Kafka in, results out) ───────────────────────┐
//!  Kafka     │                                                                                          │  ResultSink
//!  clicks.t ─┼─▶ decode ─▶ Pipeline::on_click ─▶ watermark ─▶ reorder ─▶ ticks · window/top-N · sessions ─┼─▶ (ZeroMQ, tests)
//!            │   (bad → dead letter)            (per partition)          │                  │            │
//!            └───────────────────────────────────────────────────────── history: Bloom ─▶ redb ────────┘
//! ```
//!
//! The operators (`window`, `sessions`, `history`, `watermark`, composed by `pipeline`) are
//! plain structs without I/O of their own: they are property-tested against a naive oracle and
//! benchmarked without Kafka. The visitor-history store is injected (on disk in a job, in
//! memory in tests). `job` is the async wrapper (`seek` finds where it starts
//! reading, by the records' event times); `control` runs jobs on demand from the
//! ZooKeeper registrations (see its module docs) and `links` carries their results to the
//! gateways over ZeroMQ. `checkpoint` says what a job's checkpoints on `state.<tenant>` are and
//! how a restore picks one, so any engine can resume any tenant's job exactly.
#![forbid(unsafe_code)]

pub mod bloom;
pub mod checkpoint;
pub mod config;
pub mod control;
pub mod history;
pub mod idleness;
pub mod job;
pub mod links;
pub mod output;
pub mod pipeline;
pub mod positions;
mod seek;
pub mod sessions;
pub mod watermark;
pub mod window;

pub use config::OperatorConfig;
pub use control::{Engine, EngineConfig, JobState, JobStatus};
pub use history::{Changelog, History, HistoryStore, MemStore, RedbStore};
pub use pipeline::{Admission, EngineError, Pipeline, PipelineState};
