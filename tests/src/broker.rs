//! A private Kafka-protocol broker (`tansu`, in-memory storage) on a loopback port.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};

use crate::FixtureError;
use crate::process::{Daemon, PrivateServer, accepts};

/// The broker version `scripts/setup` installs.
pub const TANSU_VERSION: &str = "0.6.0";
/// How long the broker may take to answer a metadata request.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A broker to test against: private (started here, stopped on drop) or external
/// (`CLICKPULSE_KAFKA=host:port`).
#[derive(Debug)]
pub struct Broker {
    bootstrap: String,
    private: Option<PrivateServer>,
}

impl Broker {
    /// The broker named by `CLICKPULSE_KAFKA`, or a private one.
    pub fn start() -> Result<Self, FixtureError> {
        match std::env::var("CLICKPULSE_KAFKA") {
            Ok(bootstrap) if !bootstrap.is_empty() => Ok(Broker {
                bootstrap,
                private: None,
            }),
            _ => Self::start_private(None),
        }
    }

    /// Always a private broker, on `port` or a free one.
    pub fn start_private(port: Option<u16>) -> Result<Self, FixtureError> {
        let server = PrivateServer::new("broker", port)?;
        let mut broker = Broker {
            bootstrap: server.addr().to_string(),
            private: Some(server),
        };
        broker.launch()?;
        Ok(broker)
    }

    fn launch(&mut self) -> Result<(), FixtureError> {
        let tansu = tansu_binary()?;
        let Some(private) = &mut self.private else {
            return Ok(());
        };
        let url = format!("tcp://127.0.0.1:{}", private.port);
        let mut cmd = Command::new(tansu);
        cmd.arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .current_dir(private.dir.path());
        let mut daemon = Daemon::spawn(
            "Kafka broker (tansu)",
            cmd,
            &private.dir.path().join("broker.log"),
        )?;
        let addr = private.addr();
        let bootstrap = self.bootstrap.clone();
        daemon.wait_ready(READY_TIMEOUT, || {
            accepts(&addr) && answers_metadata(&bootstrap)
        })?;
        private.running(daemon);
        Ok(())
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    pub fn pid(&self) -> Option<u32> {
        self.private.as_ref()?.pid()
    }

    pub fn is_private(&self) -> bool {
        self.private.is_some()
    }

    /// Kills a private broker (SIGKILL). Its in-memory data is gone.
    pub fn kill(&mut self) {
        if let Some(p) = &mut self.private {
            p.kill();
        }
    }

    /// Starts a killed private broker again on the same port (empty).
    pub fn restart(&mut self) -> Result<(), FixtureError> {
        self.kill();
        self.launch()
    }
}

fn answers_metadata(bootstrap: &str) -> bool {
    let producer: Result<BaseProducer, _> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "0")
        .create();
    producer.is_ok_and(|p| {
        p.client()
            .fetch_metadata(None, Duration::from_secs(2))
            .is_ok()
    })
}

/// `CLICKPULSE_TANSU`, `tansu` on PATH, or cargo's bin dir.
pub fn tansu_binary() -> Result<PathBuf, FixtureError> {
    find_tansu(|key| std::env::var_os(key))
}

/// [`tansu_binary`] with the environment passed in, so the lookup is testable.
pub fn find_tansu(env: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, FixtureError> {
    if let Some(path) = env("CLICKPULSE_TANSU") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(FixtureError::Missing {
                what: "the Kafka-protocol broker tansu",
                looked: format!("CLICKPULSE_TANSU={}", path.display()),
            })
        };
    }
    let on_path = env("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("tansu"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let cargo_home = env("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    on_path
        .into_iter()
        .chain(cargo_home.map(|home| home.join("bin/tansu")))
        .find(|p| p.is_file())
        .ok_or(FixtureError::Missing {
            what: "the Kafka-protocol broker tansu",
            looked: "CLICKPULSE_TANSU, PATH and ~/.cargo/bin".into(),
        })
}
