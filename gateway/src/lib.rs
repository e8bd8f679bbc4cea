//! The gateway: tenants' live results to browsers.
//!
//! ```text
//!  engines ──ZeroMQ PUSH (result frames)──▶ ingress (PULL) ──▶ Hub ──▶ Mailbox per client ──▶ /ws
//!                                                              │ dedupe (epoch, seq)        (conflating,
//!                                                              │ recent results per stream   one message
//!                                                              ▼ (current run)               per stream,
//!                                                     snapshots on subscribe                 a series' 300)
//! ```
//!
//! A browser connects to `GET /ws` with a tenant token (HS256 JWT) in `Sec-WebSocket-Protocol`
//! or the `token` query parameter; without a valid token it gets HTTP 401 and no socket. It only
//! ever receives its own tenant's results. With ZooKeeper, the gateway registers itself and
//! every connected client there (what makes engines run the tenants' jobs).
//!
//! `server` is the HTTP side (routes, limits, metrics, the upgrade), `cork` its connections
//! (an upgrade's `101` sent with the welcome), `client` one client's connection after the
//! upgrade, `hub` the fan-out, `ingress` the engines' side, `auth` the tokens.
#![forbid(unsafe_code)]

pub mod auth;
mod client;
mod cork;
pub mod hub;
pub mod ingress;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;

use clickpulse_cluster::{ZkConfig, ZkError, ZkSession};
use clickpulse_protocol::zk::{GatewayInfo, Layout};
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use server::Limits;

/// Settings of one gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub id: String,
    /// HTTP listen address, e.g. `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// ZeroMQ PULL endpoint to bind, e.g. `tcp://127.0.0.1:7001`.
    pub zmq_bind: String,
    /// The endpoint engines should push to, as registered in ZooKeeper (default: the bound one).
    pub zmq_advertise: Option<String>,
    pub secret: Vec<u8>,
    pub limits: Limits,
    /// ZooKeeper, where the gateway registers itself and every client; `None` runs standalone
    /// (no engine will learn about its clients).
    pub zookeeper: Option<ZkConfig>,
    /// Root of the clickpulse tree in ZooKeeper.
    pub layout: Layout,
    /// The built dashboard (`web/dist`), served at `/`; `None` serves no pages.
    pub web_dir: Option<std::path::PathBuf>,
}

/// Why the gateway cannot start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Secret(#[from] auth::WeakSecret),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind ZeroMQ endpoint {endpoint}")]
    Zmq {
        endpoint: String,
        source: zeromq::ZmqError,
    },
    #[error(transparent)]
    ZooKeeper(#[from] ZkError),
}

/// A started gateway: where it listens, and its task (ends after shutdown has drained).
pub struct Running {
    pub http_addr: SocketAddr,
    pub zmq_endpoint: String,
    pub hub: Arc<hub::Hub>,
    pub state: Arc<server::AppState>,
    pub task: JoinHandle<()>,
}

/// Connections the kernel queues for `accept` (it caps this at `net.core.somaxconn`). A
/// connect storm fills the queue faster than one accept loop drains it; past its end the
/// kernel drops the handshake and the browser retries a whole second later (its first SYN
/// retransmission), so the default of 128 turned every 256-at-once storm's slowest
/// connects into 1 s ones.
pub const LISTEN_BACKLOG: u32 = 4096;

/// The HTTP listener, with a [`LISTEN_BACKLOG`]-deep accept queue.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restart can bind while old connections are in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Binds both sockets (so a port in use fails here, clearly), then serves until `shutdown`.
pub async fn start(
    config: GatewayConfig,
    shutdown: CancellationToken,
) -> Result<Running, GatewayError> {
    let key = auth::TokenKey::new(&config.secret)?;
    let listener = listen(config.listen).map_err(|source| GatewayError::Listen {
        addr: config.listen,
        source,
    })?;
    let http_addr = listener
        .local_addr()
        .map_err(|source| GatewayError::Listen {
            addr: config.listen,
            source,
        })?;
    let (pull, zmq_endpoint) =
        ingress::bind(&config.zmq_bind)
            .await
            .map_err(|source| GatewayError::Zmq {
                endpoint: config.zmq_bind.clone(),
                source,
            })?;
    let registry = match config.zookeeper {
        None => {
            tracing::warn!(
                "no ZooKeeper configured: clients are not registered, no engine will serve them"
            );
            None
        }
        Some(zk) => {
            let session_timeout = zk.session_timeout;
            let session = ZkSession::connect(zk, &shutdown).await?;
            let info = GatewayInfo {
                id: config.id.clone(),
                zmq_endpoint: config
                    .zmq_advertise
                    .clone()
                    .unwrap_or_else(|| zmq_endpoint.clone()),
                http_addr: http_addr.to_string(),
                started_at_ms: clickpulse_protocol::zk::now_ms(),
            };
            let payload = serde_json::to_vec(&info).unwrap_or_default();
            // Restarted right after a kill, the previous run's node is there until its
            // session expires: wait for that rather than exit.
            session
                .register_identity(
                    &config.layout.gateway(&config.id),
                    payload,
                    session_timeout * 2 + std::time::Duration::from_secs(1),
                )
                .await?;
            Some(server::Registry {
                session,
                layout: config.layout.clone(),
            })
        }
    };
    let hub = hub::Hub::new();
    let ingress_stats = Arc::new(ingress::IngressStats::default());
    let state = server::AppState::new(
        config.id.clone(),
        hub.clone(),
        ingress_stats.clone(),
        key,
        config.limits,
        registry,
        shutdown.clone(),
    );
    {
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            state.going_away();
        });
    }
    let ingress_task = tokio::spawn(ingress::run(
        pull,
        hub.clone(),
        ingress_stats,
        shutdown.clone(),
    ));
    let app = server::router(state.clone(), config.web_dir.as_deref());
    let header_read_timeout = state.limits.header_read_timeout;
    let serve_shutdown = shutdown.clone();
    let id = config.id.clone();
    let task_state = state.clone();
    let task = tokio::spawn(async move {
        tracing::info!(gateway = %id, %http_addr, "gateway listening");
        server::serve_http(listener, app, header_read_timeout, serve_shutdown).await;
        let _ = ingress_task.await;
        // Upgraded sockets outlive the HTTP server: let their tasks close with 1001 and
        // deregister (bounded), then the gateway's own node goes with its session.
        let drained = std::time::Instant::now();
        while task_state
            .metrics
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
            && drained.elapsed() < std::time::Duration::from_secs(5)
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if let Some(registry) = &task_state.registry {
            registry.session.close().await;
        }
        tracing::info!(gateway = %id, "gateway stopped");
    });
    Ok(Running {
        http_addr,
        zmq_endpoint,
        hub,
        state,
        task,
    })
}
