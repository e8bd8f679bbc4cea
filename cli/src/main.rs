//! `clickpulse`: one binary, one subcommand per role. Each subcommand parses its flags into
//! the typed config of its library and calls that library's `run`; nothing else lives here.
#![forbid(unsafe_code)]

mod engine;
mod gateway;
mod replay;
mod zk;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "clickpulse",
    version,
    about = "Live, on-demand, multi-tenant clickstream analytics"
)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. "info" or "clickpulse_replay=debug".
    #[arg(
        long,
        global = true,
        env = "CLICKPULSE_LOG",
        default_value = "info,zookeeper_client=warn"
    )]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay the MSNBC clickstream into Kafka, one topic per tenant, in event-time order.
    Replay(replay::Args),
    /// Run tenants' aggregation jobs on demand, as ZooKeeper says clients are watching.
    Engine(engine::EngineArgs),
    /// Serve tenants' live results to browsers over WebSockets, fed by engines over ZeroMQ.
    Gateway(gateway::GatewayArgs),
    /// Mint a tenant token (HS256 JWT) signed with the gateway's secret.
    Token(gateway::TokenArgs),
    /// Inspect the cluster in ZooKeeper: `tree`, `jobs`, `clients --tenant T`.
    Zk(zk::ZkArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match EnvFilter::try_new(&cli.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: invalid --log filter {:?}: {e}", cli.log);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    runtime.spawn(cancel_on_signal(shutdown.clone()));
    let result = match cli.command {
        Command::Replay(args) => runtime.block_on(replay::run(args, shutdown)),
        Command::Engine(args) => runtime.block_on(engine::engine(args, shutdown)),
        Command::Gateway(args) => runtime.block_on(gateway::gateway(args, shutdown)),
        Command::Token(args) => gateway::token(args),
        Command::Zk(args) => runtime.block_on(zk::run(args, shutdown)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C or SIGTERM cancels the shutdown token; a second Ctrl-C exits at once.
async fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutdown requested; finishing (press Ctrl-C again to exit at once)");
    shutdown.cancel();
    if tokio::signal::ctrl_c().await.is_ok() {
        std::process::exit(130);
    }
}
