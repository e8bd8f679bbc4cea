//! HTTP and WebSocket side: `/ws` (token checked before the upgrade), `/healthz`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clickpulse_protocol::Tenant;
use clickpulse_protocol::auth::Claims;
use clickpulse_protocol::results::Stream;
use clickpulse_protocol::ws::{
    ClientMsg, CloseCode, ErrorCode, QueryError, SUBPROTOCOL, ServerMsg, Subscription,
};
use clickpulse_protocol::zk::Right;
use futures_util::SinkExt;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, TokenKey};
use clickpulse_cluster::{ClusterView, ZkError, ZkSession};
use clickpulse_protocol::zk::{ClientRegistration, Layout};

use crate::hub::{Hub, Mailbox, StreamSet};
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
    pub over_capacity: AtomicU64,
    pub registrations: AtomicU64,
    pub registration_failures: AtomicU64,
}

/// Holds a connection's place in the limits; gives it back when dropped.
struct Admitted {
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
    next_client: AtomicU64,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// The gateway's ZooKeeper registrations.
#[derive(Debug)]
pub struct Registry {
    pub session: ZkSession,
    pub layout: Layout,
}

impl Registry {
    /// Writes a new client's registration (batched with others arriving at the same time).
    async fn register(&self, gateway: &str, viewer: &Viewer) -> Result<(), ZkError> {
        let payload = serde_json::to_vec(&viewer.registration(gateway)).unwrap_or_default();
        self.session
            .register(&self.path(gateway, viewer), payload)
            .await
    }

    /// Rewrites a registered client's registration (its streams changed).
    async fn update(&self, gateway: &str, viewer: &Viewer) -> Result<(), ZkError> {
        let payload = serde_json::to_vec(&viewer.registration(gateway)).unwrap_or_default();
        self.session
            .update(&self.path(gateway, viewer), payload)
            .await
    }

    /// Deletes a client's registration.
    async fn deregister(&self, gateway: &str, viewer: &Viewer) -> Result<(), ZkError> {
        self.session.deregister(&self.path(gateway, viewer)).await
    }

    /// A client's node, worked out when needed rather than kept (idle clients are counted
    /// in bytes).
    fn path(&self, gateway: &str, viewer: &Viewer) -> String {
        self.layout
            .client(&viewer.tenant, gateway, &viewer.name().to_string())
    }
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
    let from_query = query.and_then(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "token")
            .map(|(_, v)| v.to_owned())
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

fn text(msg: &ServerMsg) -> Message {
    Message::Text(serde_json::to_string(msg).unwrap_or_default().into())
}

fn close(code: CloseCode) -> Message {
    Message::Close(Some(CloseFrame {
        code: code.code(),
        reason: code.reason().into(),
    }))
}

/// The close code for a read error: only an oversized frame is one a client causes on
/// purpose; anything else is a connection gone (no close frame to send).
fn read_error_close(error: &axum::Error) -> Option<CloseCode> {
    let message = error.to_string().to_lowercase();
    (message.contains("too long") || message.contains("capacity")).then_some(CloseCode::TooBig)
}

/// Subscribes a client in the hub (the subscription checked already); its registration's list
/// of streams is the caller's to extend.
fn subscribe(
    state: &AppState,
    mailbox: &Mailbox,
    tenant: &Tenant,
    client: u64,
    subscription: &Subscription,
) {
    // A cap slower than the slow-client timeout would get the client cut off for being slow;
    // it is raised to half of it.
    let interval = subscription
        .max_rate_hz
        .map(|hz| Duration::from_secs_f64(1.0 / hz).min(state.limits.slow_client_timeout / 2));
    mailbox.set_min_interval(interval);
    state
        .hub
        .subscribe(tenant, client, &subscription.streams, subscription.after);
}

/// Acts on a client's text message (subscribe, unsubscribe): changes its subscription in the
/// hub and `streams` (its registration's list); returns the reply to send, if any.
fn on_client_text(
    state: &AppState,
    mailbox: &Mailbox,
    tenant: &Tenant,
    client: u64,
    streams: &mut StreamSet,
    text: &str,
) -> Option<ServerMsg> {
    match serde_json::from_str::<ClientMsg>(text) {
        Ok(ClientMsg::Subscribe(subscription)) => {
            if let Err(e) = subscription.check() {
                return Some(ServerMsg::Error {
                    code: ErrorCode::BadValue,
                    message: e.to_string(),
                });
            }
            subscribe(state, mailbox, tenant, client, &subscription);
            for s in subscription.streams {
                streams.insert(s);
            }
            None
        }
        Ok(ClientMsg::Unsubscribe { streams: unwanted }) => {
            state.hub.unsubscribe(tenant, client, &unwanted);
            for s in unwanted {
                streams.remove(s);
            }
            None
        }
        Err(e) => Some(ServerMsg::Error {
            code: ErrorCode::BadMessage,
            message: e.to_string(),
        }),
    }
}

/// A connected client as the gateway keeps it: what its registration says, in fewer bytes
/// (idle clients are counted in bytes). The registration is made from it when written.
#[derive(Debug)]
struct Viewer {
    id: u64,
    tenant: Tenant,
    rights: RightSet,
    streams: StreamSet,
    connected_at_ms: i64,
}

impl Viewer {
    /// A client just accepted with `claims`; `streams` are those it subscribed to in its
    /// upgrade request, in its registration from the start.
    fn new(claims: Claims, id: u64, streams: StreamSet) -> Viewer {
        Viewer {
            id,
            rights: RightSet::from(claims.rights.as_slice()),
            tenant: claims.tenant,
            streams,
            connected_at_ms: clickpulse_protocol::zk::now_ms(),
        }
    }

    /// Its name in registrations and the welcome: `c-17`.
    fn name(&self) -> ClientName {
        ClientName(self.id)
    }

    fn registration(&self, gateway: &str) -> ClientRegistration {
        ClientRegistration {
            gateway: gateway.to_owned(),
            client: self.name().to_string(),
            tenant: self.tenant.clone(),
            rights: self.rights.to_vec(),
            streams: self.streams.to_vec(),
            connected_at_ms: self.connected_at_ms,
        }
    }
}

/// A client's name, `c-<id>`, written out only when needed.
#[derive(Debug, Clone, Copy)]
struct ClientName(u64);

impl std::fmt::Display for ClientName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c-{}", self.0)
    }
}

/// A token's rights, a bit each.
#[derive(Debug, Clone, Copy)]
struct RightSet(u8);

impl RightSet {
    fn bit(right: Right) -> u8 {
        match right {
            Right::View => 1,
            Right::Admin => 2,
        }
    }

    fn to_vec(self) -> Vec<Right> {
        [Right::View, Right::Admin]
            .into_iter()
            .filter(|&r| self.0 & Self::bit(r) != 0)
            .collect()
    }
}

impl From<&[Right]> for RightSet {
    fn from(rights: &[Right]) -> Self {
        RightSet(rights.iter().fold(0, |bits, &r| bits | Self::bit(r)))
    }
}

/// When a quiet client is pinged and when it is given up on: pinged every
/// [`Limits::ping_interval`], closed once nothing (not even a pong) was heard from it for
/// [`Limits::idle_timeout`]. Both go by one timer, set to [`Keepalive::deadline`].
#[derive(Debug)]
struct Keepalive {
    heard: tokio::time::Instant,
    next_ping: tokio::time::Instant,
}

/// What a client's keepalive timer firing calls for.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    Close,
    Ping,
    Nothing,
}

impl Keepalive {
    fn new(now: tokio::time::Instant, limits: &Limits) -> Keepalive {
        Keepalive {
            heard: now,
            next_ping: now + limits.ping_interval,
        }
    }

    fn heard(&mut self, now: tokio::time::Instant) {
        self.heard = now;
    }

    /// When the timer should fire next.
    fn deadline(&self, limits: &Limits) -> tokio::time::Instant {
        self.next_ping.min(self.heard + limits.idle_timeout)
    }

    /// The timer fired at `now` (it may fire early if it was set before something was heard).
    fn due(&mut self, now: tokio::time::Instant, limits: &Limits) -> Due {
        if now >= self.heard + limits.idle_timeout {
            Due::Close
        } else if now >= self.next_ping {
            self.next_ping = now + limits.ping_interval;
            Due::Ping
        } else {
            Due::Nothing
        }
    }
}

/// Closes a socket with `code`, giving the close frame at most a second to go.
async fn send_close(socket: &mut WebSocket, code: CloseCode) {
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(close(code))).await;
}

/// Serves one client until it leaves or is closed.
///
/// Its future is most of what an idle client costs (one per connection, for as long as it
/// is connected), so it is kept small: not an `async fn`, whose future holds each argument
/// twice (rust-lang/rust#62958); a once-only or rare await (ZooKeeper, closes, the welcome,
/// pings, replies) is boxed for its duration, out of the future's own storage; and nothing
/// that is done with lives across the loop's awaits.
#[allow(clippy::manual_async_fn)] // an async fn's future would hold the arguments twice
fn serve_client(
    mut socket: WebSocket,
    state: Arc<AppState>,
    admitted: Option<Admitted>,
    mut viewer: Viewer,
    subscription: Option<Box<Subscription>>,
) -> impl std::future::Future<Output = ()> {
    async move {
        // `admitted` holds the client's place in the connection limits until this future
        // ends; without one, the gateway is at a limit.
        if admitted.is_none() {
            Box::pin(send_close(&mut socket, CloseCode::OverCapacity)).await;
            return;
        }
        let registry = state.registry.as_ref();
        // Registered before it is served: the registration is what makes an engine run the job.
        if let Some(registry) = registry {
            if let Err(error) = Box::pin(registry.register(&state.gateway_id, &viewer)).await {
                state
                    .metrics
                    .registration_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(tenant = %viewer.tenant, client = %viewer.name(), %error, "client registration failed");
                Box::pin(send_close(&mut socket, CloseCode::InternalError)).await;
                return;
            }
            state.metrics.registrations.fetch_add(1, Ordering::Relaxed);
        }
        let welcome = text(&ServerMsg::Welcome {
            tenant: viewer.tenant.clone(),
            client: viewer.name().to_string(),
            gateway: state.gateway_id.clone(),
            streams: Stream::ALL.to_vec(),
        });
        let mailbox = Mailbox::new();
        state.hub.join(&viewer.tenant, viewer.id, &mailbox);
        if let Some(subscription) = subscription {
            // Its snapshots wait in the mailbox, so they follow the welcome.
            subscribe(&state, &mailbox, &viewer.tenant, viewer.id, &subscription);
        }
        // No per-client polling: an idle client costs one timer, due at its next ping or its
        // idle deadline (thousands of quiet clients must not wake the gateway up many times a
        // second), and a message from it only a clock read.
        let mut keepalive = Keepalive::new(tokio::time::Instant::now(), &state.limits);
        let timer = tokio::time::sleep_until(keepalive.deadline(&state.limits));
        tokio::pin!(timer);
        let end = if Box::pin(socket.send(welcome)).await.is_err() {
            None
        } else {
            loop {
                // In this order, so that a result ready to go (what 10,000 clients wake up for, ten
                // times a second) is sent without first polling the reader and the timers (each
                // registers with the runtime). Nothing starves: a mailbox only has what came since.
                // Shutdown comes through the mailbox too.
                tokio::select! {
                    biased;
                    out = mailbox.next() => {
                        let Some(text) = out.map(|o| o.text) else {
                            break mailbox.going_away().then_some(CloseCode::GoingAway);
                        };
                        // A client that stops reading fills its TCP buffers and blocks the send:
                        // bounded, or the slow-client check below would never run.
                        match tokio::time::timeout(state.limits.slow_client_timeout, SinkExt::send(&mut socket, Message::Text(text))).await {
                            Ok(Ok(())) => {
                                state.metrics.messages_out.fetch_add(1, Ordering::Relaxed);
                                // Sends that each get through but too slowly to ever catch up.
                                if mailbox.backlog_age().is_some_and(|age| age > state.limits.slow_client_timeout) {
                                    break Some(CloseCode::SlowConsumer);
                                }
                            }
                            Ok(Err(_)) => break None,
                            Err(_) => break Some(CloseCode::SlowConsumer),
                        }
                    }
                    incoming = socket.recv() => {
                        keepalive.heard(tokio::time::Instant::now());
                        let reply = match incoming {
                            None | Some(Ok(Message::Close(_))) => break None,
                            Some(Err(e)) => break read_error_close(&e),
                            Some(Ok(Message::Text(t))) => {
                                state.metrics.messages_in.fetch_add(1, Ordering::Relaxed);
                                let streams_before = viewer.streams;
                                let reply = on_client_text(&state, &mailbox, &viewer.tenant, viewer.id, &mut viewer.streams, t.as_str()).map(|r| text(&r));
                                // ZooKeeper is written only when the streams changed: a client
                                // sending messages in a loop must not turn each into a write.
                                if let Some(registry) = registry
                                    && viewer.streams != streams_before
                                    && let Err(error) = Box::pin(registry.update(&state.gateway_id, &viewer)).await
                                {
                                    tracing::warn!(tenant = %viewer.tenant, client = %viewer.name(), %error, "registration update failed");
                                }
                                reply
                            }
                            Some(Ok(Message::Binary(_))) => Some(text(&ServerMsg::Error {
                                code: ErrorCode::BinaryNotSupported,
                                message: "send JSON text frames".into(),
                            })),
                            // Pings are answered by the library; pongs only count as heard.
                            Some(Ok(_)) => None,
                        };
                        if let Some(reply) = reply
                            && Box::pin(socket.send(reply)).await.is_err()
                        {
                            break None;
                        }
                    }
                    () = &mut timer => {
                        let now = tokio::time::Instant::now();
                        match keepalive.due(now, &state.limits) {
                            Due::Close => break Some(CloseCode::IdleTimeout),
                            Due::Ping => {
                                if Box::pin(socket.send(Message::Ping(Default::default()))).await.is_err() {
                                    break None;
                                }
                            }
                            Due::Nothing => {}
                        }
                        timer.as_mut().reset(keepalive.deadline(&state.limits));
                    }
                }
            }
        };
        state.hub.remove(&viewer.tenant, viewer.id);
        if let Some(registry) = registry
            && let Err(error) = Box::pin(registry.deregister(&state.gateway_id, &viewer)).await
        {
            // The node still goes when the gateway's session ends.
            tracing::warn!(tenant = %viewer.tenant, client = %viewer.name(), %error, "deregistration failed");
        }
        mailbox.close();
        match end {
            Some(CloseCode::SlowConsumer) => state
                .metrics
                .slow_client_closes
                .fetch_add(1, Ordering::Relaxed),
            Some(CloseCode::IdleTimeout) => {
                state.metrics.idle_closes.fetch_add(1, Ordering::Relaxed)
            }
            _ => 0,
        };
        if let Some(code) = end {
            Box::pin(send_close(&mut socket, code)).await;
        }
        match end {
            Some(code) => {
                tracing::info!(tenant = %viewer.tenant, client = %viewer.name(), close = ?code, "client closed")
            }
            None => {
                tracing::debug!(tenant = %viewer.tenant, client = %viewer.name(), "client left")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Serve<F> =
        fn(WebSocket, Arc<AppState>, Option<Admitted>, Viewer, Option<Box<Subscription>>) -> F;

    /// The size of what [`serve_client`] returns, without a socket to call it with.
    fn future_size<F>(_: Serve<F>) -> usize {
        std::mem::size_of::<F>()
    }

    /// Limits pinging every 20 s, closing after 45 s of silence; and seconds from now.
    fn pings_at_20_s_idle_at_45_s() -> (Limits, impl Fn(u64) -> tokio::time::Instant) {
        let limits = Limits {
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(45),
            ..Limits::default()
        };
        let t0 = tokio::time::Instant::now();
        (limits, move |secs| t0 + Duration::from_secs(secs))
    }

    #[test]
    fn a_quiet_client_is_pinged_every_interval_and_closed_after_the_idle_timeout() {
        let (limits, at) = pings_at_20_s_idle_at_45_s();
        let mut k = Keepalive::new(at(0), &limits);
        assert_eq!(k.deadline(&limits), at(20));
        assert_eq!(k.due(at(20), &limits), Due::Ping);
        assert_eq!(k.deadline(&limits), at(40));
        assert_eq!(k.due(at(40), &limits), Due::Ping);
        // The next ping would be at 60; the idle deadline comes first.
        assert_eq!(k.deadline(&limits), at(45));
        assert_eq!(k.due(at(45), &limits), Due::Close);
    }

    #[test]
    fn hearing_from_a_client_moves_its_idle_deadline_but_not_its_pings() {
        let (limits, at) = pings_at_20_s_idle_at_45_s();
        let mut k = Keepalive::new(at(0), &limits);
        assert_eq!(k.due(at(20), &limits), Due::Ping);
        k.heard(at(21)); // the pong
        assert_eq!(k.due(at(40), &limits), Due::Ping);
        assert_eq!(k.deadline(&limits), at(60));
        // A timer set before a message was heard fires early: nothing to do yet.
        k.heard(at(59));
        assert_eq!(k.due(at(59), &limits), Due::Nothing);
        assert_eq!(k.due(at(60), &limits), Due::Ping);
        assert_eq!(k.deadline(&limits), at(80));
        assert_eq!(k.due(at(80), &limits), Due::Ping);
        assert_eq!(k.deadline(&limits), at(100));
        assert_eq!(k.due(at(100), &limits), Due::Ping);
        // heard last at 59: closed at 104
        assert_eq!(k.deadline(&limits), at(104));
        assert_eq!(k.due(at(104), &limits), Due::Close);
    }

    #[test]
    fn a_clients_future_stays_small() {
        // Most of an idle client's memory: 1,040 bytes with rustc 1.95 when this was written
        // (as an `async fn` with its awaits unboxed, 2,544). axum's upgrade task adds 240
        // around it and rounds up to 128: 1,280 bytes a client; a byte more and it is 1,408.
        let size = future_size(serve_client);
        assert!(size <= 1_040, "serve_client's future grew to {size} bytes");
    }
}
