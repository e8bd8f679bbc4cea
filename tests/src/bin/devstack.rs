//! `devstack`: a private ZooKeeper and Kafka-protocol broker for local runs (`scripts/demo`),
//! on fixed ports, until Ctrl-C or SIGTERM; then both are stopped and nothing is left behind.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;

use clickpulse_tests::{Broker, ZkOptions, ZooKeeper};
use nix::sys::signal::{SigSet, Signal};

struct Args {
    zk_port: u16,
    kafka_port: u16,
    ready_file: Option<PathBuf>,
}

const USAGE: &str = "usage: devstack [--zk-port PORT] [--kafka-port PORT] [--ready-file PATH]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        zk_port: 2181,
        kafka_port: 9092,
        ready_file: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        let port = |v: String| {
            v.parse::<u16>()
                .map_err(|_| format!("{flag}: {v:?} is not a port"))
        };
        match flag.as_str() {
            "--zk-port" => args.zk_port = port(value()?)?,
            "--kafka-port" => args.kafka_port = port(value()?)?,
            "--ready-file" => args.ready_file = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(args)
}

fn ensure_free(port: u16, what: &str, flag: &str) -> Result<(), String> {
    TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .map_err(|e| {
            format!("port {port} for {what} is not free ({e}); choose another with {flag}")
        })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("devstack: {e}");
            return ExitCode::from(2);
        }
    };
    for (port, what, flag) in [
        (args.zk_port, "ZooKeeper", "--zk-port"),
        (args.kafka_port, "the Kafka broker", "--kafka-port"),
    ] {
        if let Err(e) = ensure_free(port, what, flag) {
            eprintln!("devstack: {e}");
            return ExitCode::from(2);
        }
    }
    // Block the stop signals before starting anything, then wait for one: the fixtures are
    // dropped (servers killed and reaped) on the way out. Children start with an empty mask.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if let Err(e) = signals.thread_block() {
        eprintln!("devstack: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let zk = match ZooKeeper::start_private(ZkOptions {
        port: Some(args.zk_port),
        tick_ms: 2000,
    }) {
        Ok(zk) => zk,
        Err(e) => {
            eprintln!("devstack: ZooKeeper did not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let broker = match Broker::start_private(Some(args.kafka_port)) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("devstack: the broker did not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "devstack: ZooKeeper at {} (pid {}), Kafka broker at {} (pid {})",
        zk.connect_string(),
        zk.pid().unwrap_or_default(),
        broker.bootstrap(),
        broker.pid().unwrap_or_default()
    );
    if let Some(path) = &args.ready_file {
        let text = format!(
            "CLICKPULSE_ZK={}\nCLICKPULSE_KAFKA={}\n",
            zk.connect_string(),
            broker.bootstrap()
        );
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("devstack: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let signal = signals.wait();
    eprintln!("devstack: {signal:?}: stopping ZooKeeper and the broker");
    drop(broker);
    drop(zk);
    ExitCode::SUCCESS
}
