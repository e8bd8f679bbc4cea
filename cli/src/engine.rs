//! `clickpulse engine`: runs tenants' jobs while someone watches them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clickpulse_cluster::ZkConfig;
use clickpulse_engine::job::StartFrom;
use clickpulse_engine::{EngineConfig, OperatorConfig};
use clickpulse_protocol::zk::{Layout, validate_id};
use tokio_util::sync::CancellationToken;

use crate::gateway::seconds;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum From {
    /// One window before the newest event: the first window a dashboard gets is complete.
    Window,
    /// The first offset of every partition (audits, tests).
    Earliest,
}

#[derive(clap::Args, Debug)]
pub struct EngineArgs {
    /// This engine's id (unique in the deployment).
    #[arg(long, env = "CLICKPULSE_ENGINE_ID", default_value = "engine-1")]
    id: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "CLICKPULSE_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// ZooKeeper (`host:port[,…]`) holding the client registrations.
    #[arg(long, env = "CLICKPULSE_ZOOKEEPER", default_value = "127.0.0.1:2181")]
    zookeeper: String,
    /// Root of the clickpulse tree in ZooKeeper.
    #[arg(long, env = "CLICKPULSE_ZK_ROOT", default_value = "/clickpulse")]
    zk_root: String,
    /// ZooKeeper session timeout, seconds: a killed engine's jobs move after about this long.
    #[arg(long, env = "CLICKPULSE_ZK_SESSION_TIMEOUT", default_value_t = 10.0)]
    zk_session_timeout: f64,
    /// How long to keep trying to reach ZooKeeper at start-up, seconds.
    #[arg(long, env = "CLICKPULSE_ZK_CONNECT_TIMEOUT", default_value_t = 30.0)]
    zk_connect_timeout: f64,
    /// Seconds a job keeps running after its last client left.
    #[arg(long, env = "CLICKPULSE_LINGER", default_value_t = 5.0)]
    linger: f64,
    /// Where a starting job begins reading its tenant's topic.
    #[arg(long, value_enum, default_value_t = From::Window)]
    from: From,
    /// Directory for local state (visitor history), one file per tenant.
    #[arg(long, env = "CLICKPULSE_DATA_DIR", default_value = "clickpulse-state")]
    data_dir: PathBuf,
    /// A partition at its end and silent this long stops holding the watermark back, seconds.
    #[arg(long, default_value_t = 2.0)]
    idle_timeout: f64,
    /// Sliding window length, seconds.
    #[arg(long, default_value_t = 300.0)]
    window: f64,
    /// Sliding window step, seconds.
    #[arg(long, default_value_t = 10.0)]
    slide: f64,
    /// Pages in the top-N.
    #[arg(long, default_value_t = 10)]
    top_n: u32,
    /// Session inactivity gap, seconds.
    #[arg(long, default_value_t = 1800.0)]
    session_gap: f64,
    /// Allowed lateness of events behind the newest, seconds.
    #[arg(long, default_value_t = 5.0)]
    lateness: f64,
    /// Seconds between a job's checkpoints to `state.<tenant>`; 0 turns checkpoints (and
    /// resuming them after a takeover) off.
    #[arg(long, env = "CLICKPULSE_CHECKPOINT_INTERVAL", default_value_t = 5.0)]
    checkpoint_interval: f64,
    /// A job reading one window back resumes a checkpoint at most this old, seconds; an older
    /// one starts afresh from the newest window (`--from earliest` always resumes).
    #[arg(long, env = "CLICKPULSE_RESUME_MAX_AGE", default_value_t = 600.0)]
    resume_max_age: f64,
    /// librdkafka debug contexts for the jobs' consumers (e.g. `fetch,topic,consumer`), for
    /// diagnosing the Kafka client; its lines are logged at debug under the `librdkafka`
    /// target, so add `librdkafka=debug` to `--log`.
    #[arg(long, env = "CLICKPULSE_KAFKA_DEBUG")]
    kafka_debug: Option<String>,
}

fn millis(flag: &str, s: f64) -> anyhow::Result<i64> {
    Ok(i64::try_from(seconds(flag, s)?.as_millis()).unwrap_or(i64::MAX))
}

pub async fn engine(args: EngineArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    validate_id(&args.id)?;
    let operators = OperatorConfig {
        window_ms: millis("window", args.window)?,
        slide_ms: millis("slide", args.slide)?,
        top_n: args.top_n,
        session_gap_ms: millis("session-gap", args.session_gap)?,
        allowed_lateness_ms: (args.lateness * 1000.0) as i64,
        ..OperatorConfig::default()
    };
    operators.validate()?;
    let zookeeper = ZkConfig {
        connect: args.zookeeper,
        session_timeout: seconds("zk-session-timeout", args.zk_session_timeout)?,
        connect_timeout: seconds("zk-connect-timeout", args.zk_connect_timeout)?,
    };
    let mut config = EngineConfig::new(
        &args.id,
        &args.brokers,
        zookeeper,
        args.data_dir.join(&args.id),
    );
    config.layout = Layout::new(&args.zk_root)?;
    config.linger = Duration::try_from_secs_f64(args.linger).with_context(|| {
        format!(
            "--linger must be a number of seconds ≥ 0, not {}",
            args.linger
        )
    })?;
    config.start = match args.from {
        From::Window => StartFrom::LatestWindow,
        From::Earliest => StartFrom::Earliest,
    };
    config.idle_timeout = seconds("idle-timeout", args.idle_timeout)?;
    config.checkpoint_interval = if args.checkpoint_interval == 0.0 {
        None
    } else {
        Some(seconds("checkpoint-interval", args.checkpoint_interval)?)
    };
    config.resume_max_age = seconds("resume-max-age", args.resume_max_age)?;
    config.kafka_debug = args.kafka_debug.filter(|contexts| !contexts.is_empty());
    config.operators = operators;
    let engine = clickpulse_engine::control::start(config, shutdown).await?;
    eprintln!("engine {} running; jobs start when clients watch", args.id);
    engine.task.await.context("the engine task panicked")?;
    Ok(ExitCode::SUCCESS)
}
