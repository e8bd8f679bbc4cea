//! A private ZooKeeper server (Debian's package, run directly with our own config).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::FixtureError;
use crate::process::{Daemon, PrivateServer};

/// Where Debian's `zookeeper` package puts its jar.
pub const DEFAULT_ZK_JAR: &str = "/usr/share/java/zookeeper.jar";
/// How long a server may take to start serving.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of a private server.
#[derive(Debug, Clone)]
pub struct ZkOptions {
    /// Port to listen on; `None` picks a free one.
    pub port: Option<u16>,
    /// ZooKeeper's tick; session timeouts are 2 to 20 ticks. Short ticks make session-expiry
    /// tests fast.
    pub tick_ms: u32,
}

impl Default for ZkOptions {
    fn default() -> Self {
        ZkOptions {
            port: None,
            tick_ms: 500,
        }
    }
}

/// A ZooKeeper to test against: private (started here, stopped on drop) or external
/// (`CLICKPULSE_ZK=host:port`).
#[derive(Debug)]
pub struct ZooKeeper {
    connect: String,
    private: Option<PrivateServer>,
}

impl ZooKeeper {
    /// The server named by `CLICKPULSE_ZK`, or a private one.
    pub fn start() -> Result<Self, FixtureError> {
        match std::env::var("CLICKPULSE_ZK") {
            Ok(connect) if !connect.is_empty() => Ok(ZooKeeper {
                connect,
                private: None,
            }),
            _ => Self::start_private(ZkOptions::default()),
        }
    }

    /// Always a private server (for tests that stop and restart it).
    pub fn start_private(options: ZkOptions) -> Result<Self, FixtureError> {
        let jar = zk_jar()?;
        which("java", "Java")?;
        let server = PrivateServer::new("zk", options.port)?;
        write_config(server.dir.path(), server.port, options.tick_ms)?;
        let mut zk = ZooKeeper {
            connect: server.addr().to_string(),
            private: Some(server),
        };
        zk.launch(&jar)?;
        Ok(zk)
    }

    fn launch(&mut self, jar: &Path) -> Result<(), FixtureError> {
        let Some(private) = &mut self.private else {
            return Ok(());
        };
        let cfg = private.dir.path().join("zoo.cfg");
        let classpath = format!(
            "{}:{}/*:/etc/zookeeper/conf",
            jar.display(),
            jar.parent()
                .unwrap_or(Path::new("/usr/share/java"))
                .display()
        );
        let mut cmd = Command::new("java");
        // A fixture's server lives for minutes: the C2 compiler's warm-up would be most of
        // its CPU. With C1 only, a storm of 5,000 registrations cost it 0.6-0.75 s of CPU
        // instead of 1.25-2.1 s, and went 20-30 % faster on 2 cores (a long-running server
        // has that warm-up behind it).
        cmd.args([
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-Xss512k",
            "-XX:TieredStopAtLevel=1",
        ])
        .arg(format!(
            "-Dzookeeper.log.dir={}",
            private.dir.path().display()
        ))
        .arg("-Dzookeeper.root.logger=INFO,CONSOLE")
        .args(["-cp", &classpath])
        .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
        .arg(&cfg);
        let mut daemon =
            Daemon::spawn("ZooKeeper", cmd, &private.dir.path().join("zookeeper.log"))?;
        let addr = private.addr();
        // `ruok` answers before the server serves sessions; `srvr` reports a mode only once it
        // does.
        daemon.wait_ready(READY_TIMEOUT, || {
            four_letter(&addr, "srvr").is_ok_and(|r| r.contains("Mode: "))
        })?;
        private.running(daemon);
        Ok(())
    }

    /// `host:port` for clients.
    pub fn connect_string(&self) -> &str {
        &self.connect
    }

    /// The server's pid, for a private server that is running.
    pub fn pid(&self) -> Option<u32> {
        self.private.as_ref()?.pid()
    }

    pub fn is_private(&self) -> bool {
        self.private.is_some()
    }

    /// Kills a private server (SIGKILL), keeping its data for [`ZooKeeper::restart`].
    pub fn kill(&mut self) {
        if let Some(p) = &mut self.private {
            p.kill();
        }
    }

    /// Starts a killed private server again on the same port and data.
    pub fn restart(&mut self) -> Result<(), FixtureError> {
        let jar = zk_jar()?;
        self.kill();
        self.launch(&jar)
    }

    /// Sends a four-letter command (`ruok`, `mntr`, `dump`, …) and returns the answer.
    pub fn four_letter(&self, command: &str) -> Result<String, FixtureError> {
        let addr = self.connect.parse::<SocketAddr>().map_err(|e| {
            FixtureError::Config(format!("ZooKeeper address {:?}: {e}", self.connect))
        })?;
        four_letter(&addr, command).map_err(|source| FixtureError::Io {
            what: "ZooKeeper four-letter command",
            source,
        })
    }
}

fn four_letter(addr: &SocketAddr, command: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(command.as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

fn write_config(dir: &Path, port: u16, tick_ms: u32) -> Result<(), FixtureError> {
    let data = dir.join("data");
    let cfg = format!(
        "tickTime={tick_ms}\n\
         dataDir={}\n\
         clientPort={port}\n\
         clientPortAddress=127.0.0.1\n\
         maxClientCnxns=0\n\
         admin.enableServer=false\n\
         4lw.commands.whitelist=ruok,mntr,srvr,stat,dump,wchc,cons\n\
         minSessionTimeout={}\n\
         maxSessionTimeout=60000\n",
        data.display(),
        2 * tick_ms
    );
    std::fs::create_dir_all(&data)
        .and_then(|()| std::fs::write(dir.join("zoo.cfg"), cfg))
        .map_err(|source| FixtureError::Io {
            what: "ZooKeeper config",
            source,
        })
}

fn zk_jar() -> Result<PathBuf, FixtureError> {
    let jar = std::env::var_os("CLICKPULSE_ZK_JAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ZK_JAR));
    if jar.is_file() {
        Ok(jar)
    } else {
        Err(FixtureError::Missing {
            what: "ZooKeeper",
            looked: jar.display().to_string(),
        })
    }
}

/// Finds `program` on PATH.
fn which(program: &str, what: &'static str) -> Result<PathBuf, FixtureError> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .ok_or(FixtureError::Missing {
            what,
            looked: format!("{program} on PATH"),
        })
}
