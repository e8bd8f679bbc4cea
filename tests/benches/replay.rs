//! `scripts/bench replay`: the full MSNBC dataset into the local broker as fast as it takes.
//! Last line: {"events": N, "seconds": S, "events_per_sec": R}

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clickpulse_protocol::Tenant;
use clickpulse_replay::{ProgressMode, ReplayConfig, Source};
use clickpulse_tests::{Broker, unique_name};
use tokio_util::sync::CancellationToken;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = Broker::start()?;
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/msnbc990928.seq.gz");
    let tenants = ["acme", "globex", "initech"]
        .iter()
        .map(|t| Tenant::new(unique_name(t)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut config = ReplayConfig::new(Source::File(data), broker.bootstrap(), tenants);
    config.kafka.delivery_timeout = Duration::from_secs(60);
    config.progress = ProgressMode::Quiet;
    // Wall time of the whole run: the counting pass over the file, connecting, creating the
    // topics, the merge, producing and waiting for every acknowledgement.
    let start = Instant::now();
    let summary = clickpulse_replay::run(&config, &CancellationToken::new())?;
    let seconds = start.elapsed().as_secs_f64();
    eprint!("{summary}");
    println!(
        "{{\"events\": {}, \"seconds\": {seconds:.3}, \"events_per_sec\": {:.0}}}",
        summary.events,
        summary.events as f64 / seconds
    );
    Ok(())
}
