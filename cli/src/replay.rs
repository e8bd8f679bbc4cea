//! `clickpulse replay`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clickpulse_protocol::Tenant;
use clickpulse_replay::{KafkaConfig, ProgressMode, ReplayConfig, Source, Speed};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The MSNBC sequence file (gzip or plain).
    #[arg(
        long,
        env = "CLICKPULSE_DATA",
        default_value = "data/msnbc990928.seq.gz"
    )]
    data: PathBuf,

    /// Replay a generated stream of this many users with the dataset's shape instead of the file.
    #[arg(long, env = "CLICKPULSE_SYNTHETIC", conflicts_with = "data")]
    synthetic: Option<u64>,

    /// Seed of the synthetic stream.
    #[arg(
        long,
        env = "CLICKPULSE_SYNTHETIC_SEED",
        default_value_t = 1999,
        requires = "synthetic"
    )]
    seed: u64,

    /// Kafka bootstrap servers.
    #[arg(long, env = "CLICKPULSE_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,

    /// Tenants, comma-separated; user u goes to tenant u mod N.
    #[arg(
        long,
        env = "CLICKPULSE_TENANTS",
        value_delimiter = ',',
        default_value = "acme,globex,initech"
    )]
    tenants: Vec<Tenant>,

    /// Replay only the first USERS users.
    #[arg(long, env = "CLICKPULSE_LIMIT", value_name = "USERS")]
    limit: Option<u64>,

    /// Event-time seconds per wall-clock second, or "max" for as fast as the broker takes.
    #[arg(long, env = "CLICKPULSE_SPEED", default_value = "max")]
    speed: Speed,

    /// Event time of the first user's first view: RFC 3339, or "now".
    #[arg(long, env = "CLICKPULSE_T0", default_value = "1999-09-28T00:00:00Z")]
    t0: String,

    /// Partitions of each tenant's clicks topic created when missing.
    #[arg(long, env = "CLICKPULSE_PARTITIONS", default_value_t = 3)]
    partitions: i32,

    /// Replication factor of topics created when missing.
    #[arg(long, env = "CLICKPULSE_REPLICATION_FACTOR", default_value_t = 1)]
    replication_factor: i32,

    /// How long to keep trying to reach the broker at start-up, seconds.
    #[arg(long, env = "CLICKPULSE_CONNECT_TIMEOUT", default_value_t = 30.0)]
    connect_timeout: f64,

    /// How long a record may wait for the broker's acknowledgement, seconds.
    #[arg(long, env = "CLICKPULSE_DELIVERY_TIMEOUT", default_value_t = 60.0)]
    delivery_timeout: f64,

    /// Progress output: auto (a bar on a terminal, lines otherwise), lines or quiet.
    #[arg(long, env = "CLICKPULSE_PROGRESS", default_value = "auto")]
    progress: ProgressMode,
}

fn parse_t0(t0: &str) -> anyhow::Result<i64> {
    if t0 == "now" {
        return Ok(chrono::Utc::now().timestamp_millis());
    }
    chrono::DateTime::parse_from_rfc3339(t0)
        .map(|t| t.timestamp_millis())
        .with_context(|| {
            format!("--t0 must be RFC 3339 (e.g. 1999-09-28T00:00:00Z) or \"now\", not {t0:?}")
        })
}

fn seconds(name: &str, s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{name} must be a positive number of seconds, not {s}"))
}

impl Args {
    fn into_config(self) -> anyhow::Result<ReplayConfig> {
        let source = match self.synthetic {
            Some(users) => Source::Synthetic {
                users,
                seed: self.seed,
            },
            None => Source::File(self.data),
        };
        let t0_ms = parse_t0(&self.t0)?;
        Ok(ReplayConfig {
            source,
            kafka: KafkaConfig {
                brokers: self.brokers,
                connect_timeout: seconds("connect-timeout", self.connect_timeout)?,
                delivery_timeout: seconds("delivery-timeout", self.delivery_timeout)?,
            },
            tenants: self.tenants,
            limit: self.limit,
            speed: self.speed,
            t0_ms,
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            progress: self.progress,
        })
    }
}

pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let config = args.into_config()?;
    let summary = tokio::task::spawn_blocking(move || clickpulse_replay::run(&config, &shutdown))
        .await
        .context("the replay thread panicked")??;
    print!("{summary}");
    Ok(if summary.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickpulse_protocol::clock::DEFAULT_T0_MS;

    #[test]
    fn default_t0_flag_is_the_replay_clock_default() {
        assert_eq!(parse_t0("1999-09-28T00:00:00Z").unwrap(), DEFAULT_T0_MS);
        assert!(parse_t0("yesterday").is_err());
        let now = chrono::Utc::now().timestamp_millis();
        assert!((parse_t0("now").unwrap() - now).abs() < 5_000);
    }
}
