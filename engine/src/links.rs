//! ZeroMQ links from an engine to gateways: one PUSH socket per gateway, shared by every job
//! of the engine.
//!
//! ```text
//!  job A ─┐  frames (Arc, encoded once)     ┌─▶ link gw-1 ─ bounded queue ─▶ PUSH ─▶ gw-1 PULL
//!  job B ─┼─ Links::send(gateway, frame) ───┤
//!  job C ─┘                                 └─▶ link gw-2 ─ bounded queue ─▶ PUSH ─▶ gw-2 PULL
//! ```
//!
//! A PUSH socket with several peers deals messages round-robin, but every gateway hosting a
//! tenant's clients needs every result: hence one socket per gateway. A link reconnects with
//! backoff when its gateway goes away; while it cannot deliver, its queue fills and further
//! frames for it are dropped and counted. The job is never blocked by a slow or dead gateway;
//! gateways keep the newest value per stream, and the durable record is the results topic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeromq::{PushSocket, Socket, SocketSend, ZmqMessage};

/// Frames queued per gateway before further ones are dropped.
pub const LINK_QUEUE: usize = 4096;

/// One encoded result: the five frames of [`clickpulse_protocol::zmq::ResultFrame`]; cloning
/// it for another gateway copies no payload.
pub type Frames = Vec<Bytes>;

/// Counters over all links.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub reconnects: AtomicU64,
}

struct Link {
    endpoint: String,
    tx: mpsc::Sender<Frames>,
    stop: CancellationToken,
}

/// The engine's links, keyed by gateway id.
#[derive(Clone, Default)]
pub struct Links {
    links: Arc<Mutex<HashMap<String, Link>>>,
    pub stats: Arc<LinkStats>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Links {
    /// Makes the set of links match `gateways` (id → endpoint): new gateways get a link,
    /// vanished ones lose theirs, a changed endpoint is reconnected.
    pub fn update(&self, gateways: &HashMap<String, String>, shutdown: &CancellationToken) {
        let mut links = lock(&self.links);
        links.retain(|id, link| {
            let keep = gateways.get(id) == Some(&link.endpoint);
            if !keep {
                link.stop.cancel();
            }
            keep
        });
        for (id, endpoint) in gateways {
            if links.contains_key(id) {
                continue;
            }
            let (tx, rx) = mpsc::channel(LINK_QUEUE);
            let stop = shutdown.child_token();
            tokio::spawn(run(
                id.clone(),
                endpoint.clone(),
                rx,
                stop.clone(),
                self.stats.clone(),
            ));
            links.insert(
                id.clone(),
                Link {
                    endpoint: endpoint.clone(),
                    tx,
                    stop,
                },
            );
        }
    }

    /// Queues `frames` for `gateway`; false (and counted) when there is no link to it or its
    /// queue is full.
    pub fn send(&self, gateway: &str, frames: &Frames) -> bool {
        let links = lock(&self.links);
        let queued = links
            .get(gateway)
            .is_some_and(|link| link.tx.try_send(frames.clone()).is_ok());
        if !queued {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queued
    }

    /// Gateways with a link.
    pub fn gateways(&self) -> Vec<String> {
        lock(&self.links).keys().cloned().collect()
    }

    /// Stops every link.
    pub fn close(&self) {
        for (_, link) in lock(&self.links).drain() {
            link.stop.cancel();
        }
    }
}

/// How long one connect or send may take before the link counts the gateway as unreachable.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects (with backoff) and sends until stopped; reconnects after a failed send.
async fn run(
    gateway: String,
    endpoint: String,
    mut rx: mpsc::Receiver<Frames>,
    stop: CancellationToken,
    stats: Arc<LinkStats>,
) {
    let mut backoff = Duration::from_millis(50);
    'connect: loop {
        let mut socket = PushSocket::new();
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(IO_TIMEOUT, socket.connect(&endpoint)) => r,
        };
        match connected {
            Ok(Ok(())) => {
                tracing::debug!(%gateway, %endpoint, "connected to gateway");
                backoff = Duration::from_millis(50);
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                tracing::warn!(%gateway, %endpoint, %error, retry_in_ms = backoff.as_millis() as u64, "cannot connect to gateway");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                continue 'connect;
            }
        }
        loop {
            let frames = tokio::select! {
                _ = stop.cancelled() => break 'connect,
                f = rx.recv() => match f {
                    Some(f) => f,
                    None => break 'connect,
                },
            };
            let message = match ZmqMessage::try_from(frames) {
                Ok(m) => m,
                Err(_) => continue, // an empty frame list: nothing to send
            };
            match tokio::time::timeout(IO_TIMEOUT, socket.send(message)).await {
                Ok(Ok(())) => {
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                failed => {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".to_owned(),
                    };
                    tracing::warn!(%gateway, %endpoint, %error, "gateway link broken; reconnecting");
                    continue 'connect;
                }
            }
        }
    }
}
