//! ZeroMQ ingress: engines PUSH result frames, the gateway PULLs and publishes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use clickpulse_protocol::zmq::ResultFrame;
use tokio_util::sync::CancellationToken;
use zeromq::{PullSocket, Socket, SocketRecv};

use crate::hub::Hub;

/// Frames that did not decode.
#[derive(Debug, Default)]
pub struct IngressStats {
    pub frames: AtomicU64,
    pub bad_frames: AtomicU64,
}

/// Binds the PULL socket; returns it with the endpoint it got (a `:0` port is resolved).
pub async fn bind(endpoint: &str) -> Result<(PullSocket, String), zeromq::ZmqError> {
    let mut socket = PullSocket::new();
    let bound = socket.bind(endpoint).await?;
    Ok((socket, bound.to_string()))
}

/// Receives frames until shutdown; a bad frame is logged and counted, never fatal.
pub async fn run(
    mut socket: PullSocket,
    hub: Arc<Hub>,
    stats: Arc<IngressStats>,
    shutdown: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = socket.recv() => m,
        };
        let message = match message {
            Ok(m) => m,
            Err(error) => {
                tracing::warn!(%error, "zeromq receive failed");
                continue;
            }
        };
        stats.frames.fetch_add(1, Ordering::Relaxed);
        match ResultFrame::decode(&message.into_vec()) {
            Ok(frame) => {
                hub.publish(&frame);
            }
            Err(error) => {
                stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "bad result frame dropped");
            }
        }
    }
    socket.close().await;
}
