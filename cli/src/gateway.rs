//! `clickpulse gateway` and `clickpulse token`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clickpulse_cluster::ZkConfig;
use clickpulse_gateway::auth::{TokenKey, now_secs};
use clickpulse_gateway::{GatewayConfig, Limits};
use clickpulse_protocol::Tenant;
use clickpulse_protocol::zk::{Layout, Right, validate_id};
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
    /// The ZeroMQ endpoint engines should use, as registered in ZooKeeper (default: the bound one).
    #[arg(long, env = "CLICKPULSE_ZMQ_ADVERTISE")]
    zmq_advertise: Option<String>,
    /// ZooKeeper (`host:port[,…]`) where the gateway registers itself and its clients; without
    /// it the gateway runs standalone and no engine learns about its clients.
    #[arg(long, env = "CLICKPULSE_ZOOKEEPER")]
    zookeeper: Option<String>,
    /// Root of the clickpulse tree in ZooKeeper.
    #[arg(long, env = "CLICKPULSE_ZK_ROOT", default_value = "/clickpulse")]
    zk_root: String,
    /// ZooKeeper session timeout, seconds (the server clamps it to 2–20 ticks).
    #[arg(long, env = "CLICKPULSE_ZK_SESSION_TIMEOUT", default_value_t = 10.0)]
    zk_session_timeout: f64,
    /// The built dashboard, served at `/` (`scripts/setup` builds it into `web/dist`).
    #[arg(long, env = "CLICKPULSE_WEB_DIR", default_value = "web/dist")]
    web_dir: std::path::PathBuf,
    /// Secret that signs tenant tokens (at least 32 bytes).
    #[arg(long, env = "CLICKPULSE_SECRET", hide_env_values = true)]
    secret: String,
    /// Largest WebSocket frame a client may send, bytes (larger: close 1009).
    #[arg(long, env = "CLICKPULSE_MAX_FRAME", default_value_t = 16 * 1024)]
    max_frame_bytes: usize,
    /// A client that has not caught up for this many seconds is closed with 4000.
    #[arg(long, env = "CLICKPULSE_SLOW_CLIENT_TIMEOUT", default_value_t = 10.0)]
    slow_client_timeout: f64,
    /// Connections at once; more are closed with 4002.
    #[arg(long, env = "CLICKPULSE_MAX_CONNECTIONS", default_value_t = 50_000)]
    max_connections: usize,
    /// Connections at once from one IP address; more are closed with 4002.
    #[arg(
        long,
        env = "CLICKPULSE_MAX_CONNECTIONS_PER_IP",
        default_value_t = 20_000
    )]
    max_connections_per_ip: usize,
    /// Seconds between pings to a quiet client.
    #[arg(long, env = "CLICKPULSE_PING_INTERVAL", default_value_t = 20.0)]
    ping_interval: f64,
    /// A client heard nothing from (not even a pong) for this many seconds is closed with 4001.
    #[arg(long, env = "CLICKPULSE_IDLE_TIMEOUT", default_value_t = 45.0)]
    idle_timeout: f64,
    /// Frames (messages, pings, pongs) a client may send a second, on average; a client over
    /// it is closed with 4003.
    #[arg(long, env = "CLICKPULSE_CLIENT_MESSAGE_RATE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    client_message_rate: u32,
    /// Frames a client may send at once, over that rate.
    #[arg(long, env = "CLICKPULSE_CLIENT_MESSAGE_BURST", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    client_message_burst: u32,
    /// Seconds a connection has to send its request head (its first, or the next one on a
    /// kept-alive connection) before it is closed.
    #[arg(long, env = "CLICKPULSE_HEADER_TIMEOUT", default_value_t = 10.0)]
    header_timeout: f64,
}

pub(crate) fn seconds(flag: &str, s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{flag} must be a positive number of seconds, not {s}"))
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
    let ping_interval = seconds("ping-interval", args.ping_interval)?;
    let idle_timeout = seconds("idle-timeout", args.idle_timeout)?;
    anyhow::ensure!(
        idle_timeout > ping_interval,
        "--idle-timeout ({idle_timeout:?}) must be longer than --ping-interval ({ping_interval:?})"
    );
    anyhow::ensure!(
        f64::from(args.client_message_rate) * ping_interval.as_secs_f64() >= 2.0,
        "--client-message-rate ({}) must allow two frames per --ping-interval ({ping_interval:?}): \
         the pongs a client answers pings with count",
        args.client_message_rate
    );
    let layout = Layout::new(&args.zk_root)?;
    let zookeeper = match args.zookeeper {
        None => None,
        Some(connect) => Some(ZkConfig {
            connect,
            session_timeout: seconds("zk-session-timeout", args.zk_session_timeout)?,
            connect_timeout: Duration::from_secs(30),
        }),
    };
    let config = GatewayConfig {
        id: args.id,
        listen: args.listen,
        zmq_bind: args.zmq_bind,
        zmq_advertise: args.zmq_advertise,
        zookeeper,
        layout,
        web_dir: Some(args.web_dir),
        secret: args.secret.into_bytes(),
        limits: Limits {
            max_frame_bytes: args.max_frame_bytes,
            slow_client_timeout: seconds("slow-client-timeout", args.slow_client_timeout)?,
            max_connections: args.max_connections,
            max_connections_per_ip: args.max_connections_per_ip,
            ping_interval,
            idle_timeout,
            client_messages_per_sec: args.client_message_rate,
            client_message_burst: args.client_message_burst,
            header_read_timeout: seconds("header-timeout", args.header_timeout)?,
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
