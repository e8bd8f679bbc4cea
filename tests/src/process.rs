//! A child process that never outlives its owner: killed and reaped when dropped.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::FixtureError;

/// A server process started by a fixture, its output going to a log file.
#[derive(Debug)]
pub struct Daemon {
    what: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn spawn(
        what: &'static str,
        mut command: Command,
        log: &Path,
    ) -> Result<Self, FixtureError> {
        let io = |source| FixtureError::Io { what, source };
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io)?;
        Ok(Daemon {
            what,
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Where the process's output goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `max` bytes of the log, for error messages.
    pub fn log_tail(&self, max: u64) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until `ready` holds, failing if the process exits or `timeout` passes.
    pub fn wait_ready(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), FixtureError> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return Err(FixtureError::Exited {
                    what: self.what,
                    status: status.to_string(),
                    log_tail: self.log_tail(4000),
                });
            }
            if ready() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(FixtureError::NotReady {
                    what: self.what,
                    waited: timeout,
                    log_tail: self.log_tail(4000),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16, FixtureError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| FixtureError::Io {
            what: "free port",
            source,
        })
}

/// True when something accepts TCP connections at `addr`.
pub fn accepts(addr: &SocketAddr) -> bool {
    TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok()
}

/// True when `pid` names a live (not zombie) process.
pub fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            // The state is the first field after the parenthesised command name.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// What every private server fixture holds: a temp dir, a loopback port and, while it runs,
/// the process.
#[derive(Debug)]
pub struct PrivateServer {
    pub dir: TempDir,
    pub port: u16,
    daemon: Option<Daemon>,
}

impl PrivateServer {
    /// A fresh temp dir (`clickpulse-<prefix>-…`) and `port`, or a free port.
    pub fn new(prefix: &str, port: Option<u16>) -> Result<Self, FixtureError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("clickpulse-{prefix}-"))
            .tempdir()
            .map_err(|source| FixtureError::Io {
                what: "fixture temp dir",
                source,
            })?;
        let port = match port {
            Some(p) => p,
            None => free_port()?,
        };
        Ok(PrivateServer {
            dir,
            port,
            daemon: None,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Daemon::pid)
    }

    /// Adopts the started, ready process.
    pub fn running(&mut self, daemon: Daemon) {
        self.daemon = Some(daemon);
    }

    /// Kills the process (SIGKILL, reaped); the dir and port stay for a restart.
    pub fn kill(&mut self) {
        self.daemon.take();
    }
}
