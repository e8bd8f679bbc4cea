//! One client's connection, from its upgrade to its close: its registration, its
//! subscriptions, the results it is sent, its keepalive.
//!
//! A client costs what its task holds for as long as it is connected, so the per-client
//! state is kept small: see [`serve_client`] and the size test at the end.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use clickpulse_cluster::ZkError;
use clickpulse_protocol::Tenant;
use clickpulse_protocol::auth::Claims;
use clickpulse_protocol::results::Stream;
use clickpulse_protocol::ws::{ClientMsg, CloseCode, ErrorCode, ServerMsg, Subscription};
use clickpulse_protocol::zk::{ClientRegistration, Right};
use futures_util::SinkExt;

use crate::hub::{Mailbox, StreamSet};
use crate::server::{Admitted, AppState, Limits, Registry};

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
pub(crate) struct Viewer {
    pub(crate) id: u64,
    pub(crate) tenant: Tenant,
    rights: RightSet,
    streams: StreamSet,
    connected_at_ms: i64,
}

impl Viewer {
    /// A client just accepted with `claims`; `streams` are those it subscribed to in its
    /// upgrade request, in its registration from the start.
    pub(crate) fn new(claims: Claims, id: u64, streams: StreamSet) -> Viewer {
        Viewer {
            id,
            rights: RightSet::from(claims.rights.as_slice()),
            tenant: claims.tenant,
            streams,
            connected_at_ms: clickpulse_protocol::zk::now_ms(),
        }
    }

    /// Its name in registrations and the welcome: `c-17`.
    pub(crate) fn name(&self) -> ClientName {
        ClientName(self.id)
    }

    pub(crate) fn registration(&self, gateway: &str) -> ClientRegistration {
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

impl Registry {
    /// Writes a new client's registration (batched with others arriving at the same time).
    pub(crate) async fn register(&self, gateway: &str, viewer: &Viewer) -> Result<(), ZkError> {
        let payload = serde_json::to_vec(&viewer.registration(gateway)).unwrap_or_default();
        self.session
            .register(&self.path(gateway, viewer), payload)
            .await
    }

    /// Rewrites a registered client's registration (its streams changed).
    pub(crate) async fn update(&self, gateway: &str, viewer: &Viewer) -> Result<(), ZkError> {
        let payload = serde_json::to_vec(&viewer.registration(gateway)).unwrap_or_default();
        self.session
            .update(&self.path(gateway, viewer), payload)
            .await
    }

    /// Deletes a client's registration.
    pub(crate) async fn deregister(&self, gateway: &str, viewer: &Viewer) -> Result<(), ZkError> {
        self.session.deregister(&self.path(gateway, viewer)).await
    }

    /// A client's node, worked out when needed rather than kept (idle clients are counted
    /// in bytes).
    fn path(&self, gateway: &str, viewer: &Viewer) -> String {
        self.layout
            .client(&viewer.tenant, gateway, &viewer.name().to_string())
    }
}

/// A client's name, `c-<id>`, written out only when needed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientName(u64);

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

/// The gateway's monotonic clock (tokio's, so that tests can pause it) in milliseconds since
/// the gateway started: a client keeps its times as 8-byte counts, not 16-byte `Instant`s
/// (idle clients are counted in bytes).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock(tokio::time::Instant);

impl Clock {
    pub(crate) fn start() -> Clock {
        Clock(tokio::time::Instant::now())
    }

    fn now_ms(self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(self, ms: u64) -> tokio::time::Instant {
        self.0 + Duration::from_millis(ms)
    }
}

/// What the gateway keeps of what it hears from a client: when it pings it, when it gives
/// up on it, and whether it talks too fast.
///
/// Pinged every [`Limits::ping_interval`], closed once nothing (not even a pong) was heard
/// from it for [`Limits::idle_timeout`]; both go by one timer, set to
/// [`Keepalive::deadline`]. Every frame heard fills a leaky bucket that drains at
/// [`Limits::client_messages_per_sec`]; one that would fill it past
/// [`Limits::client_message_burst`] is one too many. Times are [`Clock`] milliseconds.
#[derive(Debug)]
struct Keepalive {
    heard: u64,
    next_ping: u64,
    /// The bucket's level, in thousandths of a frame: a frame adds 1,000, and it drains by
    /// the rate (frames a second) every millisecond.
    level: u32,
}

/// What a client's keepalive timer firing calls for.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    Close,
    Ping,
    Nothing,
}

impl Keepalive {
    fn new(now: u64, limits: &Limits) -> Keepalive {
        Keepalive {
            heard: now,
            next_ping: now.saturating_add(millis(limits.ping_interval)),
            level: 0,
        }
    }

    /// A frame was heard at `now`; `false` if it is over the client's message rate.
    fn heard(&mut self, now: u64, limits: &Limits) -> bool {
        let drained = now
            .saturating_sub(self.heard)
            .saturating_mul(u64::from(limits.client_messages_per_sec));
        let level = u64::from(self.level).saturating_sub(drained) + 1_000;
        self.heard = self.heard.max(now);
        self.level = u32::try_from(level).unwrap_or(u32::MAX);
        level <= u64::from(limits.client_message_burst) * 1_000
    }

    /// When the timer should fire next.
    fn deadline(&self, limits: &Limits) -> u64 {
        self.next_ping
            .min(self.heard.saturating_add(millis(limits.idle_timeout)))
    }

    /// The timer fired at `now` (it may fire early if it was set before something was heard).
    fn due(&mut self, now: u64, limits: &Limits) -> Due {
        if now >= self.heard.saturating_add(millis(limits.idle_timeout)) {
            Due::Close
        } else if now >= self.next_ping {
            self.next_ping = now.saturating_add(millis(limits.ping_interval));
            Due::Ping
        } else {
            Due::Nothing
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Sends a reply or a ping, given as long as a result: a client that reads nothing fills its
/// TCP buffers, and an unbounded send would then hold its task (and connection) for good.
/// `Err` ends the client: gone (`None`), or slow.
async fn send_bounded(
    socket: &mut WebSocket,
    message: Message,
    limits: &Limits,
) -> Result<(), Option<CloseCode>> {
    match tokio::time::timeout(limits.slow_client_timeout, socket.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(None),
        Err(_) => Err(Some(CloseCode::SlowConsumer)),
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
pub(crate) fn serve_client(
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
        let mut keepalive = Keepalive::new(state.clock.now_ms(), &state.limits);
        let timer = tokio::time::sleep_until(state.clock.at(keepalive.deadline(&state.limits)));
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
                        if !keepalive.heard(state.clock.now_ms(), &state.limits) {
                            break Some(CloseCode::TooManyMessages);
                        }
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
                            && let Err(end) = Box::pin(send_bounded(&mut socket, reply, &state.limits)).await
                        {
                            break end;
                        }
                    }
                    () = &mut timer => {
                        match keepalive.due(state.clock.now_ms(), &state.limits) {
                            Due::Close => break Some(CloseCode::IdleTimeout),
                            Due::Ping => {
                                let ping = Message::Ping(Default::default());
                                if let Err(end) = Box::pin(send_bounded(&mut socket, ping, &state.limits)).await {
                                    break end;
                                }
                            }
                            Due::Nothing => {}
                        }
                        timer.as_mut().reset(state.clock.at(keepalive.deadline(&state.limits)));
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
            Some(CloseCode::TooManyMessages) => {
                state.metrics.flood_closes.fetch_add(1, Ordering::Relaxed)
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

    /// Limits pinging every 20 s, closing after 45 s of silence; and seconds from a clock
    /// time (in the clock's milliseconds).
    fn pings_at_20_s_idle_at_45_s() -> (Limits, impl Fn(u64) -> u64) {
        let limits = Limits {
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(45),
            ..Limits::default()
        };
        (limits, move |secs| 7_000 + 1_000 * secs)
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
        assert!(k.heard(at(21), &limits)); // the pong
        assert_eq!(k.due(at(40), &limits), Due::Ping);
        assert_eq!(k.deadline(&limits), at(60));
        // A timer set before a message was heard fires early: nothing to do yet.
        assert!(k.heard(at(59), &limits));
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

    /// Limits of 10 frames a second with bursts of 30.
    fn ten_a_second_thirty_at_once() -> Limits {
        Limits {
            client_messages_per_sec: 10,
            client_message_burst: 30,
            ..Limits::default()
        }
    }

    #[test]
    fn a_burst_is_allowed_and_one_more_at_once_is_too_many() {
        let limits = ten_a_second_thirty_at_once();
        let mut k = Keepalive::new(5_000, &limits);
        for i in 0..30 {
            assert!(k.heard(5_000, &limits), "frame {i} of the burst");
        }
        assert!(!k.heard(5_000, &limits));
        // 100 ms drain one frame's worth: room for exactly one more.
        let mut k = Keepalive::new(5_000, &limits);
        for _ in 0..30 {
            k.heard(5_000, &limits);
        }
        assert!(k.heard(5_100, &limits));
        assert!(!k.heard(5_100, &limits));
    }

    #[test]
    fn the_rate_is_allowed_for_ever_and_a_little_over_it_is_not() {
        let limits = ten_a_second_thirty_at_once();
        // Every 100 ms, for an hour.
        let mut k = Keepalive::new(0, &limits);
        assert!((1..=36_000).all(|i| k.heard(100 * i, &limits)));
        // Every 90 ms (11 a second): after the first (1,000 thousandths), each adds 100 more
        // than drains, and 290 more fit in the 30,000 of a 30-frame burst.
        let mut k = Keepalive::new(0, &limits);
        let fitted = (1..=1_000)
            .take_while(|&i| k.heard(90 * i, &limits))
            .count();
        assert_eq!(fitted, 291);
    }

    #[test]
    fn a_clients_future_stays_small() {
        // Most of an idle client's memory: 1,032 bytes with rustc 1.95 when this was written
        // (as an `async fn` with its awaits unboxed, 2,544). axum's upgrade task adds 240
        // around it and rounds up to 128: 1,280 bytes a client; past 1,040 it is 1,408.
        let size = future_size(serve_client);
        assert!(size <= 1_040, "serve_client's future grew to {size} bytes");
    }
}
