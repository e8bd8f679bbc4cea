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
//! backoff when its gateway goes away. Its queue is bounded and conflating: when full, a new
//! frame replaces the oldest queued one of the same tenant and stream (counted as dropped) and
//! goes to the back, so the newest result of every stream always gets out, in increasing
//! `(run, seq)` order (receivers drop what is out of order). The job is never blocked by a slow
//! or dead gateway; the durable record of every result is the results topic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use zeromq::{PushSocket, Socket, SocketSend, ZmqMessage};

/// Frames queued per gateway; past that, a new one replaces an older one of its stream.
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
    queue: Arc<Queue>,
    stop: CancellationToken,
}

/// A link's queue (see the module docs).
#[derive(Default)]
struct Queue {
    frames: Mutex<VecDeque<Frames>>,
    ready: Notify,
}

/// Frames 1 and 3: tenant and stream, what a newer frame supersedes.
fn same_stream(a: &Frames, b: &Frames) -> bool {
    a.get(1) == b.get(1) && a.get(3) == b.get(3)
}

impl Queue {
    /// Queues `frames`; true when it replaced an older frame of its stream (or, with none
    /// queued, the oldest of all).
    fn push(&self, frames: Frames) -> bool {
        let mut q = lock(&self.frames);
        let mut replaced = false;
        if q.len() >= LINK_QUEUE {
            let at = q.iter().position(|f| same_stream(f, &frames)).unwrap_or(0);
            q.remove(at);
            replaced = true;
        }
        q.push_back(frames);
        drop(q);
        self.ready.notify_one();
        replaced
    }

    /// Puts a frame that could not be sent back at the front (bounded like `push`).
    fn unpop(&self, frames: Frames) {
        let mut q = lock(&self.frames);
        if q.len() < LINK_QUEUE {
            q.push_front(frames);
        }
    }

    async fn pop(&self) -> Frames {
        loop {
            let notified = self.ready.notified();
            if let Some(f) = lock(&self.frames).pop_front() {
                return f;
            }
            notified.await;
        }
    }
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
            let queue = Arc::new(Queue::default());
            let stop = shutdown.child_token();
            tokio::spawn(run(
                id.clone(),
                endpoint.clone(),
                queue.clone(),
                stop.clone(),
                self.stats.clone(),
            ));
            links.insert(
                id.clone(),
                Link {
                    endpoint: endpoint.clone(),
                    queue,
                    stop,
                },
            );
        }
    }

    /// Queues `frames` for `gateway`; false (and counted) when there is no link to it. A full
    /// queue conflates (see the module docs): that is counted as a drop too.
    pub fn send(&self, gateway: &str, frames: &Frames) -> bool {
        let links = lock(&self.links);
        let Some(link) = links.get(gateway) else {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        if link.queue.push(frames.clone()) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        true
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
    queue: Arc<Queue>,
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
                f = queue.pop() => f,
            };
            let kept = frames.clone();
            let message = match ZmqMessage::try_from(frames) {
                Ok(m) => m,
                Err(_) => continue, // an empty frame list: nothing to send
            };
            match tokio::time::timeout(IO_TIMEOUT, socket.send(message)).await {
                Ok(Ok(())) => {
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                failed => {
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".to_owned(),
                    };
                    // The frame goes again first once reconnected (the gateway drops it if
                    // it did arrive).
                    queue.unpop(kept);
                    tracing::warn!(%gateway, %endpoint, %error, "gateway link broken; reconnecting");
                    continue 'connect;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tenant: &str, stream: &str, seq: u8) -> Frames {
        vec![
            Bytes::from_static(b"cp2"),
            Bytes::copy_from_slice(tenant.as_bytes()),
            Bytes::copy_from_slice(&[seq]),
            Bytes::copy_from_slice(stream.as_bytes()),
            Bytes::new(),
        ]
    }

    #[tokio::test]
    async fn a_full_queue_keeps_the_newest_of_every_stream_in_order() {
        let q = Queue::default();
        q.push(frame("acme", "totals", 0));
        for seq in 1..LINK_QUEUE {
            assert!(!q.push(frame("acme", "pageviews", (seq % 200) as u8)));
        }
        // Full: a newer totals replaces the queued one and goes to the back.
        assert!(q.push(frame("acme", "totals", 201)));
        assert_eq!(lock(&q.frames).len(), LINK_QUEUE);
        assert_eq!(
            q.pop().await,
            frame("acme", "pageviews", 1),
            "the old totals is gone"
        );
        let last = lock(&q.frames).back().cloned();
        assert_eq!(last, Some(frame("acme", "totals", 201)));
    }
}
