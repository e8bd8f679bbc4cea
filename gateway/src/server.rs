//! HTTP and WebSocket side: `/ws` (token checked before the upgrade), `/healthz`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clickpulse_protocol::auth::Claims;
use clickpulse_protocol::ws::{QueryError, SUBPROTOCOL, Subscription};
use clickpulse_protocol::zk::Right;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, TokenKey};
use clickpulse_cluster::{ClusterView, ZkSession};
use clickpulse_protocol::zk::Layout;

use crate::client::{Clock, Viewer, serve_client};
use crate::cork::Corked;
use crate::hub::Hub;
use crate::ingress::IngressStats;

/// Initial read buffer of a client's WebSocket.
const READ_BUFFER_BYTES: usize = 128;

/// Limits of one gateway.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest frame a client may send; larger ones close the socket with 1009.
    pub max_frame_bytes: usize,
    /// A client with unsent results for this long is closed with 4000 (slow consumer).
    pub slow_client_timeout: Duration,
    /// Connections at once; more are closed at once with 4002 (over capacity).
    pub max_connections: usize,
    /// Connections at once from one IP address; more are closed with 4002.
    pub max_connections_per_ip: usize,
    /// How often the gateway pings an otherwise quiet client.
    pub ping_interval: Duration,
    /// A client heard nothing from (not even a pong) for this long is closed with 4001.
    pub idle_timeout: Duration,
    /// Frames of any kind (messages, pings, pongs) a client may send a second, on average;
    /// a client over it is closed with 4003 (each message can be a reply to send or a
    /// ZooKeeper write, so one client must not make the gateway do them without end).
    pub client_messages_per_sec: u32,
    /// How many frames a client may send at once, over that rate.
    pub client_message_burst: u32,
    /// A connection's request head (its first, or the next on a kept-alive connection) must
    /// arrive within this, or the connection is closed: a socket that sends nothing must not
    /// hold a task and a file descriptor for good.
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 16 * 1024,
            slow_client_timeout: Duration::from_secs(10),
            max_connections: 50_000,
            max_connections_per_ip: 20_000,
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(45),
            client_messages_per_sec: 10,
            client_message_burst: 30,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters and gauges behind `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub auth_failures: AtomicU64,
    pub bad_upgrades: AtomicU64,
    pub slow_client_closes: AtomicU64,
    pub idle_closes: AtomicU64,
    pub flood_closes: AtomicU64,
    pub over_capacity: AtomicU64,
    pub registrations: AtomicU64,
    pub registration_failures: AtomicU64,
}

/// Holds a connection's place in the limits; gives it back when dropped.
pub(crate) struct Admitted {
    state: Arc<AppState>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.state
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        let mut per_ip = self.state.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl AppState {
    /// Takes a place for a connection from `ip`, or `None` when a limit is reached.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let from_ip = per_ip.entry(ip).or_default();
        let total = self.metrics.connections.load(Ordering::Relaxed) as usize;
        if total >= self.limits.max_connections || *from_ip >= self.limits.max_connections_per_ip {
            if *from_ip == 0 {
                per_ip.remove(&ip);
            }
            return None;
        }
        *from_ip += 1;
        self.metrics.connections.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        Some(Admitted {
            state: self.clone(),
            ip,
        })
    }

    /// The Prometheus text exposition of the gateway's metrics.
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        let h = &self.hub.stats;
        let i = &self.ingress;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rows = [
            (
                "clickpulse_gateway_connections",
                "gauge",
                "Open WebSocket connections.",
                "",
                get(&m.connections),
            ),
            (
                "clickpulse_gateway_connections_total",
                "counter",
                "WebSocket connections accepted.",
                "",
                get(&m.connections_total),
            ),
            (
                "clickpulse_gateway_auth_failures_total",
                "counter",
                "Upgrades refused for a missing or bad token.",
                "",
                get(&m.auth_failures),
            ),
            (
                "clickpulse_gateway_bad_upgrades_total",
                "counter",
                "Upgrades refused for a bad subscription in the query.",
                "",
                get(&m.bad_upgrades),
            ),
            (
                "clickpulse_gateway_messages_in_total",
                "counter",
                "Messages received from clients.",
                "",
                get(&m.messages_in),
            ),
            (
                "clickpulse_gateway_messages_out_total",
                "counter",
                "Results sent to clients.",
                "",
                get(&m.messages_out),
            ),
            (
                "clickpulse_gateway_results_in_total",
                "counter",
                "Result frames received from engines.",
                "",
                get(&i.frames),
            ),
            (
                "clickpulse_gateway_results_conflated_total",
                "counter",
                "Results that replaced an unsent older one for a client.",
                "",
                get(&h.conflated),
            ),
            (
                "clickpulse_gateway_results_dropped_total",
                "counter",
                "Result frames dropped, by reason.",
                "reason=\"duplicate\"",
                get(&h.duplicates),
            ),
            (
                "clickpulse_gateway_results_dropped_total",
                "counter",
                "",
                "reason=\"stale_epoch\"",
                get(&h.stale_epochs),
            ),
            (
                "clickpulse_gateway_results_dropped_total",
                "counter",
                "",
                "reason=\"bad_frame\"",
                get(&i.bad_frames),
            ),
            (
                "clickpulse_gateway_closes_total",
                "counter",
                "Connections closed by the gateway, by reason.",
                "reason=\"slow_consumer\"",
                get(&m.slow_client_closes),
            ),
            (
                "clickpulse_gateway_closes_total",
                "counter",
                "",
                "reason=\"idle_timeout\"",
                get(&m.idle_closes),
            ),
            (
                "clickpulse_gateway_closes_total",
                "counter",
                "",
                "reason=\"over_capacity\"",
                get(&m.over_capacity),
            ),
            (
                "clickpulse_gateway_closes_total",
                "counter",
                "",
                "reason=\"too_many_messages\"",
                get(&m.flood_closes),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, labels, value) in rows {
            if !help.is_empty() {
                out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            }
            if labels.is_empty() {
                out.push_str(&format!("{name} {value}\n"));
            } else {
                out.push_str(&format!("{name}{{{labels}}} {value}\n"));
            }
        }
        out
    }
}

/// Shared by every connection.
#[derive(Debug)]
pub struct AppState {
    pub gateway_id: String,
    pub hub: Arc<Hub>,
    pub ingress: Arc<IngressStats>,
    pub key: TokenKey,
    pub limits: Limits,
    pub shutdown: CancellationToken,
    pub metrics: Metrics,
    /// Where clients are registered; `None` when the gateway runs without ZooKeeper.
    pub registry: Option<Registry>,
    /// The clock clients keep their times on.
    pub(crate) clock: Clock,
    next_client: AtomicU64,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// The gateway's ZooKeeper registrations.
#[derive(Debug)]
pub struct Registry {
    pub session: ZkSession,
    pub layout: Layout,
}

impl AppState {
    pub fn new(
        gateway_id: String,
        hub: Arc<Hub>,
        ingress: Arc<IngressStats>,
        key: TokenKey,
        limits: Limits,
        registry: Option<Registry>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(AppState {
            gateway_id,
            hub,
            ingress,
            key,
            limits,
            shutdown,
            registry,
            metrics: Metrics::default(),
            clock: Clock::start(),
            next_client: AtomicU64::new(1),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Closes every client's mailbox: each client gets what was pending, then 1001. Called
    /// once the shutdown token is cancelled; a client joining after it is closed at once.
    pub fn going_away(&self) {
        self.hub.shut_down();
    }
}

/// The gateway's routes; with `web_dir`, every other path is a file of the built dashboard.
pub fn router(state: Arc<AppState>, web_dir: Option<&std::path::Path>) -> Router {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/cluster", get(admin_cluster))
        .route("/ws", get(ws_handler))
        .with_state(state);
    match web_dir {
        Some(dir) if dir.join("index.html").is_file() => router.fallback_service(
            tower_http::services::ServeDir::new(dir).append_index_html_on_directories(true),
        ),
        Some(dir) => {
            tracing::warn!(dir = %dir.display(), "the dashboard is not built here: run scripts/setup");
            let dir = dir.display().to_string();
            router.fallback(move || not_built(dir.clone()))
        }
        None => router,
    }
}

/// What `/` says when the dashboard's assets are missing.
async fn not_built(dir: String) -> Response {
    let body = format!(
        "clickpulse gateway: the dashboard is not built ({dir}/index.html is missing).\n\
         Build it with scripts/setup (npm ci && npm run build in web/). \
         The WebSocket API (/ws), /healthz, /readyz and /metrics work without it.\n"
    );
    (StatusCode::NOT_FOUND, body).into_response()
}

/// Ready while not shutting down and, with ZooKeeper, while its session is connected: the HTTP
/// listener and the ZeroMQ socket are bound before the router serves at all.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if state
        .registry
        .as_ref()
        .is_some_and(|r| !r.session.connected())
    {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "zookeeper session not connected",
        )
            .into_response()
    } else {
        (StatusCode::OK, "ready").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.render_metrics(),
    )
        .into_response()
}

/// The cluster as ZooKeeper shows it (gateways, engines, tenants with clients, owners,
/// epochs), for the dashboard's ops view. Needs a token with the admin right, as
/// `Authorization: Bearer <token>` or `?token=`.
async fn admin_cluster(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let token = bearer.or_else(|| token_from(&HeaderMap::new(), query.as_deref()).0);
    match token.as_deref().map(|t| state.key.verify(t)) {
        None => return unauthorized(&state, AuthError::Missing),
        Some(Err(e)) => return unauthorized(&state, e),
        Some(Ok(c)) if !c.has(Right::Admin) => {
            let body =
                serde_json::json!({"error": "forbidden", "reason": "the admin right is needed"});
            return (StatusCode::FORBIDDEN, axum::Json(body)).into_response();
        }
        Some(Ok(_)) => {}
    }
    let Some(registry) = &state.registry else {
        let body = serde_json::json!({"error": "unavailable", "reason": "this gateway runs without ZooKeeper"});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    };
    let view = match registry.session.client() {
        Ok(client) => ClusterView::read(&client, &registry.layout).await,
        Err(e) => Err(e),
    };
    match view {
        Ok(view) => axum::Json(view).into_response(),
        Err(error) => {
            tracing::warn!(%error, "cluster view failed");
            let body = serde_json::json!({"error": "unavailable", "reason": error.to_string()});
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
        }
    }
}

/// The token from `Sec-WebSocket-Protocol: clickpulse.v1, <token>` or `?token=`.
fn token_from(headers: &HeaderMap, query: Option<&str>) -> (Option<String>, bool) {
    let offered = headers
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let via_protocol = offered.iter().any(|p| p == SUBPROTOCOL);
    if let Some(t) = offered
        .into_iter()
        .find(|p| p != SUBPROTOCOL && !p.is_empty())
    {
        return (Some(t), via_protocol);
    }
    // Read as the subscription in the same query is (`Subscription::from_query`).
    let from_query = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    });
    (from_query, via_protocol)
}

/// A 400 for an upgrade whose query subscribes wrongly (after its token was accepted).
fn bad_subscription(state: &AppState, error: QueryError) -> Response {
    state.metrics.bad_upgrades.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%error, "websocket refused");
    let body = serde_json::json!({"error": "bad_request", "reason": error.to_string()});
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

fn unauthorized(state: &AppState, error: AuthError) -> Response {
    state.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%error, "websocket refused");
    let body = serde_json::json!({"error": "unauthorized", "reason": error.to_string()});
    (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
}

async fn ws_handler(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    let (token, via_protocol) = token_from(&headers, query.as_deref());
    let claims = match token.as_deref().map(|t| state.key.verify(t)) {
        None => return unauthorized(&state, AuthError::Missing),
        Some(Err(e)) => return unauthorized(&state, e),
        Some(Ok(c)) if !c.has(Right::View) => {
            return unauthorized(&state, AuthError::MissingRight(Right::View));
        }
        Some(Ok(c)) => c,
    };
    let subscription = match Subscription::from_query(query.as_deref().unwrap_or_default()) {
        Ok(subscription) => subscription,
        Err(e) => return bad_subscription(&state, e),
    };
    let ws = if via_protocol {
        ws.protocols([SUBPROTOCOL])
    } else {
        ws
    };
    // Boxed: axum keeps what the upgrade callback captures for as long as the connection
    // lasts, beside the client's future; a box is one pointer of it, emptied at the upgrade.
    let accepted = Box::new(Accepted {
        claims,
        client: state.next_client.fetch_add(1, Ordering::Relaxed),
        peer,
        subscription,
    });
    // tungstenite's default read buffer (128 KiB) is zero-filled on the first read: resident
    // memory per idle client. Clients send a few small messages (a subscribe is about 60
    // bytes, a pong 6); larger frames (up to the limit) still get room for their full length
    // when they come.
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_message_size(state.limits.max_frame_bytes)
        .max_frame_size(state.limits.max_frame_bytes)
        .on_upgrade(move |socket| {
            let Accepted {
                claims,
                client,
                peer,
                subscription,
            } = *accepted;
            let streams = subscription.iter().flat_map(|s| s.streams.iter().copied()).collect();
            let viewer = Viewer::new(claims, client, streams);
            let admitted = state.admit(peer.ip());
            match &admitted {
                None => {
                    state.metrics.over_capacity.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, "connection over capacity closed");
                }
                // Per-client churn is debug: at thousands of connects a second, a line each
                // was 5 % of the gateway's CPU in a connect storm. Connections are counted in
                // /metrics; closes the gateway decides (slow, idle, shutdown) are logged at
                // info at the end, over capacity at warn.
                Some(_) => tracing::debug!(tenant = %viewer.tenant, client = %viewer.name(), %peer, "client connected"),
            }
            serve_client(socket, state, admitted, viewer, subscription.map(Box::new))
        })
}

/// A connection whose token (and subscription, if any) was accepted, on its way to the upgrade.
struct Accepted {
    claims: Claims,
    client: u64,
    peer: SocketAddr,
    subscription: Option<Subscription>,
}

/// Serves HTTP/1.1 and its WebSocket upgrades on `listener` until `shutdown`, then lets the
/// requests in flight finish (for at most [`DRAIN`]).
///
/// Not `axum::serve`: its connections start by reading the first bytes to tell HTTP/2 from
/// HTTP/1 with no time limit, so a socket that never sent a byte held a task and a file
/// descriptor for as long as its peer liked (a few thousand such sockets from one host, and
/// the gateway is out of descriptors). Here every request head must arrive within
/// [`Limits::header_read_timeout`]. Browsers use HTTP/1.1 for WebSockets over plain TCP.
pub(crate) async fn serve_http(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors (or the like) for a moment: wait, never spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small pushes back to back (a subscribe's snapshots, one result per stream) must not
        // wait for the client's delayed ACK (Nagle): no delay, as WebSocket servers do.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            tower_service::Service::call(&mut app.clone(), request)
        });
        // Corked: an upgrade's 101 waits for the client's registration and goes with its
        // welcome, one send instead of two.
        let connection = http
            .serve_connection(hyper_util::rt::TokioIo::new(Corked::new(tcp)), service)
            .with_upgrades();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "HTTP connection ended");
            }
        });
    }
    connections.close();
    if tokio::time::timeout(DRAIN, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = connections.len(),
            "HTTP requests still in flight after {DRAIN:?}; leaving them"
        );
    }
}

/// How long a stopping gateway lets HTTP requests in flight finish.
const DRAIN: Duration = Duration::from_secs(5);
