//! Test fixtures shared by every crate's integration tests and benchmarks: a private ZooKeeper
//! and a private Kafka-protocol broker, each on a free loopback port in its own temp dir,
//! ready when returned and stopped (SIGKILL, reaped) when dropped.
//!
//! ```text
//!  test ──ZooKeeper::start()──▶ java QuorumPeerMain  127.0.0.1:<free>  (temp dataDir, ruok-checked)
//!       ──Broker::start()─────▶ tansu broker         127.0.0.1:<free>  (memory storage, metadata-checked)
//! ```
//!
//! `CLICKPULSE_ZK=host:port` and `CLICKPULSE_KAFKA=host:port` select external servers instead;
//! tests then isolate themselves by unique names ([`unique_name`]) for ZooKeeper roots and topics.
//! A missing binary is an error that says to run `scripts/setup`.
#![forbid(unsafe_code)]

pub mod broker;
pub mod process;
pub mod proxy;
pub mod zookeeper;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use broker::Broker;
pub use zookeeper::{ZkOptions, ZooKeeper};

/// Why a fixture could not start.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("{what} is not installed (looked at {looked}): run scripts/setup")]
    Missing { what: &'static str, looked: String },
    #[error("{what}: I/O error")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} exited during start-up ({status}); its log ends with:\n{log_tail}")]
    Exited {
        what: &'static str,
        status: String,
        log_tail: String,
    },
    #[error("{what} was not ready after {waited:?}; its log ends with:\n{log_tail}")]
    NotReady {
        what: &'static str,
        waited: Duration,
        log_tail: String,
    },
    #[error("fixture configuration: {0}")]
    Config(String),
}

/// A name unique to this test process and call: `<prefix>-<pid>-<n>`, lower-case, safe as a
/// tenant name, topic suffix or znode name.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Sends the `tracing` output of the code under test to the test's captured output (shown
/// only when the test fails): `RUST_LOG` if set, else `info`. Safe to call from every test.
pub fn log_to_test_output() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Only the first call in a process installs it; the others find it there.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 50 ms until it holds or `limit` passes; true if it held. The bounded
/// wait every test uses instead of a sleep.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A plain HTTP/1.0 GET to `addr` with extra header lines (each ending in `\r\n`):
/// `(status, body)`. Enough to test a server's endpoints without an HTTP client dependency.
pub async fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &str,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: test\r\n{headers}\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
