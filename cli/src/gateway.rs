//! `clickpulse gateway` and `clickpulse token`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clickpulse_gateway::auth::{TokenKey, now_secs};
use clickpulse_gateway::{GatewayConfig, Limits};
use clickpulse_protocol::Tenant;
use clickpulse_protocol::zk::{Right, validate_id};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    /// This gateway's id (unique in the deployment).
    #[arg(long, env = "CLICKPULSE_GATEWAY_ID", default_value = "gw-1")]
    id: String,
    /// HTTP and WebSocket listen address.
    #[arg(long, env = "CLICKPULSE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// ZeroMQ PULL endpoint engines push results to.
    #[arg(
        long,
        env = "CLICKPULSE_ZMQ_BIND",
        default_value = "tcp://127.0.0.1:7001"
    )]
    zmq_bind: String,
    /// Secret that signs tenant tokens (at least 32 bytes).
    #[arg(long, env = "CLICKPULSE_SECRET", hide_env_values = true)]
    secret: String,
    /// Largest WebSocket frame a client may send, bytes (larger: close 1009).
    #[arg(long, env = "CLICKPULSE_MAX_FRAME", default_value_t = 16 * 1024)]
    max_frame_bytes: usize,
    /// A client that has not caught up for this many seconds is closed with 4000.
    #[arg(long, env = "CLICKPULSE_SLOW_CLIENT_TIMEOUT", default_value_t = 10.0)]
    slow_client_timeout: f64,
}

#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// Tenant the token grants access to.
    #[arg(long)]
    tenant: Tenant,
    /// Also grant the admin right (cluster view).
    #[arg(long)]
    admin: bool,
    /// Subject (who the token is for).
    #[arg(long, default_value = "dashboard")]
    subject: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl: i64,
    /// Secret that signs tenant tokens (the gateway's).
    #[arg(long, env = "CLICKPULSE_SECRET", hide_env_values = true)]
    secret: String,
}

pub fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.ttl > 0, "--ttl must be a positive number of seconds");
    let key = TokenKey::new(args.secret.as_bytes())?;
    let rights: Vec<Right> = if args.admin {
        vec![Right::View, Right::Admin]
    } else {
        vec![Right::View]
    };
    println!(
        "{}",
        key.mint(&args.tenant, &args.subject, &rights, now_secs(), args.ttl)
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn gateway(args: GatewayArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    validate_id(&args.id)?;
    let slow = Duration::try_from_secs_f64(args.slow_client_timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--slow-client-timeout must be a positive number of seconds")?;
    let config = GatewayConfig {
        id: args.id,
        listen: args.listen,
        zmq_bind: args.zmq_bind,
        secret: args.secret.into_bytes(),
        limits: Limits {
            max_frame_bytes: args.max_frame_bytes,
            slow_client_timeout: slow,
        },
    };
    let running = clickpulse_gateway::start(config, shutdown).await?;
    eprintln!(
        "gateway listening on http://{} (WebSocket /ws), results from engines at {}",
        running.http_addr, running.zmq_endpoint
    );
    running.task.await.context("the gateway task panicked")?;
    Ok(ExitCode::SUCCESS)
}
