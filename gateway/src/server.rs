//! HTTP and WebSocket side: `/ws` (token checked before the upgrade), `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clickpulse_protocol::auth::Claims;
use clickpulse_protocol::results::Stream;
use clickpulse_protocol::ws::{ClientMsg, CloseCode, ErrorCode, SUBPROTOCOL, ServerMsg};
use clickpulse_protocol::zk::Right;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, TokenKey};
use crate::hub::{Hub, Mailbox, Outgoing};

/// Limits of one gateway.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest frame a client may send; larger ones close the socket with 1009.
    pub max_frame_bytes: usize,
    /// A client with unsent results for this long is closed with 4000 (slow consumer).
    pub slow_client_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 16 * 1024,
            slow_client_timeout: Duration::from_secs(10),
        }
    }
}

/// Shared by every connection.
#[derive(Debug)]
pub struct AppState {
    pub gateway_id: String,
    pub hub: Arc<Hub>,
    pub key: TokenKey,
    pub limits: Limits,
    pub shutdown: CancellationToken,
    next_client: AtomicU64,
    pub auth_failures: AtomicU64,
}

impl AppState {
    pub fn new(
        gateway_id: String,
        hub: Arc<Hub>,
        key: TokenKey,
        limits: Limits,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(AppState {
            gateway_id,
            hub,
            key,
            limits,
            shutdown,
            next_client: AtomicU64::new(1),
            auth_failures: AtomicU64::new(0),
        })
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/ws", get(ws_handler))
        .with_state(state)
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

fn unauthorized(state: &AppState, error: AuthError) -> Response {
    state.auth_failures.fetch_add(1, Ordering::Relaxed);
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
    let ws = if via_protocol {
        ws.protocols([SUBPROTOCOL])
    } else {
        ws
    };
    let client = state.next_client.fetch_add(1, Ordering::Relaxed);
    ws.max_message_size(state.limits.max_frame_bytes)
        .max_frame_size(state.limits.max_frame_bytes)
        .on_upgrade(move |socket| serve_client(socket, state, claims, client, peer))
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

/// The result message for a client, built around the engine's JSON without re-parsing it.
fn result_text(out: &Outgoing) -> Message {
    Message::Text(
        format!(
            r#"{{"type":"result","snapshot":{},"result":{}}}"#,
            out.snapshot, out.json
        )
        .into(),
    )
}

async fn serve_client(
    mut socket: WebSocket,
    state: Arc<AppState>,
    claims: Claims,
    client: u64,
    peer: SocketAddr,
) {
    let tenant = claims.tenant.clone();
    let client_id = format!("c-{client}");
    tracing::info!(%tenant, client = %client_id, %peer, "client connected");
    let welcome = ServerMsg::Welcome {
        tenant: tenant.clone(),
        client: client_id.clone(),
        gateway: state.gateway_id.clone(),
        streams: Stream::ALL.to_vec(),
    };
    let mailbox = Mailbox::new();
    let mut slow_check = tokio::time::interval(Duration::from_millis(250));
    let end = if socket.send(text(&welcome)).await.is_err() {
        None
    } else {
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => break Some(CloseCode::GoingAway),
                out = mailbox.next() => {
                    let Some(out) = out else { break None };
                    // A client that stops reading fills its TCP buffers and blocks the send:
                    // bounded, or the slow-client check below would never run.
                    match tokio::time::timeout(state.limits.slow_client_timeout, socket.send(result_text(&out))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break None,
                        Err(_) => break Some(CloseCode::SlowConsumer),
                    }
                }
                incoming = socket.recv() => match incoming {
                    None | Some(Ok(Message::Close(_))) => break None,
                    Some(Err(e)) => {
                        // The only read error a client causes on purpose: an oversized frame.
                        let too_big = e.to_string().to_lowercase().contains("too long")
                            || e.to_string().to_lowercase().contains("capacity");
                        break too_big.then_some(CloseCode::TooBig);
                    }
                    Some(Ok(Message::Text(t))) => {
                        let reply = match serde_json::from_str::<ClientMsg>(t.as_str()) {
                            Ok(ClientMsg::Subscribe { streams, max_rate_hz }) => {
                                if max_rate_hz.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
                                    Some(ServerMsg::Error { code: ErrorCode::BadValue, message: "max_rate_hz must be a positive number".into() })
                                } else {
                                    // A cap slower than the slow-client timeout would get the
                                    // client cut off for being slow; it is raised to half of it.
                                    let interval = max_rate_hz.map(|hz| {
                                        Duration::from_secs_f64(1.0 / hz).min(state.limits.slow_client_timeout / 2)
                                    });
                                    mailbox.set_min_interval(interval);
                                    state.hub.subscribe(&tenant, client, &streams, &mailbox);
                                    None
                                }
                            }
                            Ok(ClientMsg::Unsubscribe { streams }) => {
                                state.hub.unsubscribe(&tenant, client, &streams);
                                None
                            }
                            Err(e) => Some(ServerMsg::Error { code: ErrorCode::BadMessage, message: e.to_string() }),
                        };
                        if let Some(reply) = reply
                            && socket.send(text(&reply)).await.is_err()
                        {
                            break None;
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let reply = ServerMsg::Error { code: ErrorCode::BinaryNotSupported, message: "send JSON text frames".into() };
                        if socket.send(text(&reply)).await.is_err() {
                            break None;
                        }
                    }
                    Some(Ok(_)) => {} // ping/pong are answered by the library
                },
                _ = slow_check.tick() => {
                    if mailbox.backlog_age().is_some_and(|age| age > state.limits.slow_client_timeout) {
                        break Some(CloseCode::SlowConsumer);
                    }
                }
            }
        }
    };
    state.hub.remove(&tenant, client);
    mailbox.close();
    if let Some(code) = end {
        let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(close(code))).await;
    }
    tracing::info!(%tenant, client = %client_id, close = ?end, "client left");
}
