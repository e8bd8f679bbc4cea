//! A whole clickpulse cluster for tests and the jobs benchmark: a private ZooKeeper (short
//! ticks, so session expiry takes seconds), the broker, gateways in process, engines in process
//! or as `clickpulse engine` processes (for kill -9), and WebSocket viewers.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use clickpulse_cluster::{ZkConfig, ZkSession};
use clickpulse_engine::job::StartFrom;
use clickpulse_engine::{Engine, EngineConfig};
use clickpulse_gateway::auth::{TokenKey, now_secs};
use clickpulse_gateway::{GatewayConfig, Limits, Running};
use clickpulse_protocol::Tenant;
use clickpulse_protocol::zk::{Layout, OwnerRecord, Right};
use clickpulse_replay::{ProgressMode, ReplayConfig, Source};
use clickpulse_tests::process::Daemon;
use clickpulse_tests::{Broker, ZkOptions, ZooKeeper, unique_name};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "a test secret of at least 32 bytes!!";
/// Session timeout of every member: a dead one's nodes go within this.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(3);

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Cluster {
    pub zk: ZooKeeper,
    pub broker: Broker,
    pub root: String,
    pub layout: Layout,
    pub dir: tempfile::TempDir,
    /// The test's own session, for reading the tree.
    pub session: ZkSession,
}

/// A failed test keeps the cluster's directory (engine and gateway logs, job state) and says
/// where: what the processes did is what explains the failure.
impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("cluster logs kept in {}", self.dir.path().display());
        }
    }
}

impl Cluster {
    pub async fn start() -> Cluster {
        let zk = ZooKeeper::start_private(ZkOptions::default()).unwrap();
        let broker = Broker::start().unwrap();
        let root = format!("/{}", unique_name("cluster"));
        let layout = Layout::new(&root).unwrap();
        let session = ZkSession::connect(zk_config(&zk), &CancellationToken::new())
            .await
            .unwrap();
        Cluster {
            zk,
            broker,
            root,
            layout,
            dir: tempfile::tempdir().unwrap(),
            session,
        }
    }

    pub fn zk_config(&self) -> ZkConfig {
        zk_config(&self.zk)
    }

    /// Replays `users` synthetic visitors into each tenant's topic (all of them for each).
    pub fn replay(&self, tenants: &[Tenant], users: u64) {
        self.replay_source(Source::Synthetic { users, seed: 5 }, tenants, None);
    }

    /// Replays the MSNBC data file (its first `limit` users) into the tenants' topics, user
    /// u to tenant u mod n, at full speed.
    pub fn replay_dataset(
        &self,
        tenants: &[Tenant],
        limit: Option<u64>,
    ) -> clickpulse_replay::Summary {
        let data = repo().join("data/msnbc990928.seq.gz");
        self.replay_source(Source::File(data), tenants, limit)
    }

    fn replay_source(
        &self,
        source: Source,
        tenants: &[Tenant],
        limit: Option<u64>,
    ) -> clickpulse_replay::Summary {
        let mut config = ReplayConfig::new(source, self.broker.bootstrap(), tenants.to_vec());
        config.limit = limit;
        config.progress = ProgressMode::Quiet;
        clickpulse_replay::run(&config, &CancellationToken::new()).unwrap()
    }

    pub async fn gateway(&self, id: &str) -> (Running, CancellationToken) {
        self.gateway_serving(id, None).await
    }

    /// A gateway that also serves the built dashboard from `web_dir`.
    pub async fn gateway_serving(
        &self,
        id: &str,
        web_dir: Option<std::path::PathBuf>,
    ) -> (Running, CancellationToken) {
        let shutdown = CancellationToken::new();
        let running = clickpulse_gateway::start(
            GatewayConfig {
                id: id.into(),
                listen: "127.0.0.1:0".parse().unwrap(),
                zmq_bind: "tcp://127.0.0.1:0".into(),
                zmq_advertise: None,
                secret: SECRET.as_bytes().to_vec(),
                limits: Limits::default(),
                zookeeper: Some(self.zk_config()),
                layout: self.layout.clone(),
                web_dir,
            },
            shutdown.clone(),
        )
        .await
        .unwrap();
        (running, shutdown)
    }

    pub fn engine_config(&self, id: &str, linger: Duration) -> EngineConfig {
        let mut config = EngineConfig::new(
            id,
            self.broker.bootstrap(),
            self.zk_config(),
            self.dir.path().join(id),
        );
        config.layout = self.layout.clone();
        config.linger = linger;
        config.start = StartFrom::Earliest;
        config.idle_timeout = Duration::from_millis(300);
        config
    }

    pub async fn engine(&self, config: EngineConfig) -> (Engine, CancellationToken) {
        let shutdown = CancellationToken::new();
        let engine = clickpulse_engine::control::start(config, shutdown.clone())
            .await
            .unwrap();
        (engine, shutdown)
    }

    /// `clickpulse engine` as a process (so it can be killed with SIGKILL), reading from the
    /// start of each topic.
    pub fn engine_process(&self, id: &str, linger_s: f64) -> Daemon {
        self.engine_process_from(id, linger_s, "earliest")
    }

    /// `clickpulse engine` as a process, starting jobs `--from` `from`.
    pub fn engine_process_from(&self, id: &str, linger_s: f64, from: &str) -> Daemon {
        self.engine_process_with(id, linger_s, from, &[])
    }

    /// `clickpulse engine` as a process, with `extra` flags.
    pub fn engine_process_with(
        &self,
        id: &str,
        linger_s: f64,
        from: &str,
        extra: &[&str],
    ) -> Daemon {
        let mut command = Command::new(env!("CARGO_BIN_EXE_clickpulse"));
        command.args([
            "engine",
            "--id",
            id,
            "--brokers",
            self.broker.bootstrap(),
            "--zookeeper",
            self.zk.connect_string(),
            "--zk-root",
            &self.root,
            "--zk-session-timeout",
            &SESSION_TIMEOUT.as_secs_f64().to_string(),
            "--linger",
            &linger_s.to_string(),
            "--from",
            from,
            "--log",
            "info,zookeeper_client=warn,clickpulse_engine::links=debug,clickpulse_engine::job=debug,librdkafka=debug",
        ]);
        command.arg("--data-dir").arg(self.dir.path().join("state"));
        if !extra.contains(&"--idle-timeout") {
            command.args(["--idle-timeout", "0.3"]);
        }
        command.args(extra);
        Daemon::spawn(
            "engine",
            command,
            &self.dir.path().join(format!("{id}.log")),
        )
        .unwrap()
    }

    /// `clickpulse gateway` as a process (so it can die without closing its session), serving
    /// on `http_port`, its ZeroMQ ingress on `zmq_port` (0: any); ready when it accepts.
    pub fn gateway_process(&self, id: &str, http_port: u16, zmq_port: u16) -> Daemon {
        let mut command = Command::new(env!("CARGO_BIN_EXE_clickpulse"));
        command.args([
            "gateway",
            "--id",
            id,
            "--listen",
            &format!("127.0.0.1:{http_port}"),
            "--zmq-bind",
            &format!("tcp://127.0.0.1:{zmq_port}"),
            "--zookeeper",
            self.zk.connect_string(),
            "--zk-root",
            &self.root,
            "--zk-session-timeout",
            &SESSION_TIMEOUT.as_secs_f64().to_string(),
            "--secret",
            SECRET,
        ]);
        let mut gw = Daemon::spawn(
            "gateway",
            command,
            &self.dir.path().join(format!("{id}.log")),
        )
        .unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
        gw.wait_ready(Duration::from_secs(20), || {
            clickpulse_tests::process::accepts(&addr)
        })
        .unwrap();
        gw
    }

    /// Owner records by tenant, as ZooKeeper has them now.
    pub async fn owners(&self) -> BTreeMap<Tenant, OwnerRecord> {
        let client = self.session.client().unwrap();
        let mut out = BTreeMap::new();
        let Ok(names) = client.list_children(&self.layout.tenants()).await else {
            return out;
        };
        for name in names {
            let tenant = Tenant::new(&name).unwrap();
            if let Ok((bytes, _)) = client.get_data(&self.layout.owner(&tenant)).await {
                out.insert(tenant, serde_json::from_slice(&bytes).unwrap());
            }
        }
        out
    }

    /// Client registrations of `tenant` now.
    pub async fn clients(&self, tenant: &Tenant) -> usize {
        let client = self.session.client().unwrap();
        client
            .list_children(&self.layout.clients(tenant))
            .await
            .map_or(0, |c| c.len())
    }
}

pub fn zk_config(zk: &ZooKeeper) -> ZkConfig {
    ZkConfig {
        connect: zk.connect_string().to_owned(),
        session_timeout: SESSION_TIMEOUT,
        connect_timeout: Duration::from_secs(10),
    }
}

pub fn token(tenant: &Tenant) -> String {
    token_with(tenant, &[Right::View])
}

/// A token of `tenant` with `rights`, valid for an hour.
pub fn token_with(tenant: &Tenant, rights: &[Right]) -> String {
    TokenKey::new(SECRET.as_bytes())
        .unwrap()
        .mint(tenant, "test", rights, now_secs(), 3600)
}

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
}

/// A WebSocket viewer of `tenant` subscribed to `streams` (JSON names, comma-separated).
pub async fn viewer(gateway: &Running, tenant: &Tenant, streams: &str) -> Ws {
    let url = format!("ws://{}/ws?token={}", gateway.http_addr, token(tenant));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let msg = format!(r#"{{"type":"subscribe","streams":[{streams}]}}"#);
    ws.send(Message::Text(msg.into())).await.unwrap();
    ws
}

/// The next result message's `result` object within `limit`, skipping other messages.
pub async fn next_result(ws: &mut Ws, limit: Duration) -> Option<serde_json::Value> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let msg = tokio::time::timeout(left, ws.next()).await.ok()??.ok()?;
        if let Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(t.as_str()).ok()?;
            if v["type"] == "result" {
                return Some(v["result"].clone());
            }
        }
    }
}

/// One line of an engine's ownership report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnershipEvent {
    pub engine: String,
    pub tenant: String,
    pub epoch: u64,
    pub at_ms: i64,
    pub acquired: bool,
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    line[start..].split_whitespace().next()
}

/// The `ownership acquired` / `ownership released` lines of an engine log.
pub fn ownership_events(log: &Path) -> Vec<OwnershipEvent> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let acquired = line.contains("ownership acquired");
            if !acquired && !line.contains("ownership released") {
                return None;
            }
            Some(OwnershipEvent {
                engine: field(line, "engine")?.to_owned(),
                tenant: field(line, "tenant")?.to_owned(),
                epoch: field(line, "epoch")?.parse().ok()?,
                at_ms: field(line, "at_ms")?.parse().ok()?,
                acquired,
            })
        })
        .collect()
}

/// Belief intervals per tenant `(engine, epoch, from_ms, to_ms)`; an interval still open ends
/// at `open_until_ms` of its engine (when it was killed, or now).
pub fn beliefs(
    events: &[OwnershipEvent],
    open_until_ms: &BTreeMap<String, i64>,
) -> BTreeMap<String, Vec<(String, u64, i64, i64)>> {
    let mut open: BTreeMap<(String, String), (u64, i64)> = BTreeMap::new();
    let mut out: BTreeMap<String, Vec<(String, u64, i64, i64)>> = BTreeMap::new();
    for e in events {
        let key = (e.engine.clone(), e.tenant.clone());
        if e.acquired {
            open.insert(key, (e.epoch, e.at_ms));
        } else if let Some((epoch, from)) = open.remove(&key) {
            out.entry(e.tenant.clone())
                .or_default()
                .push((e.engine.clone(), epoch, from, e.at_ms));
        }
    }
    for ((engine, tenant), (epoch, from)) in open {
        let until = open_until_ms.get(&engine).copied().unwrap_or(i64::MAX);
        out.entry(tenant)
            .or_default()
            .push((engine, epoch, from, until));
    }
    out
}

/// The dataset read naively: each user's page ids, by the letter of the data README (header
/// up to `% Sequences:` and a blank line, then one user per line).
pub fn dataset_users() -> Vec<Vec<u16>> {
    use std::io::BufRead;
    let file = std::fs::File::open(repo().join("data/msnbc990928.seq.gz")).unwrap();
    let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(file));
    let mut lines = reader.lines().map(Result::unwrap);
    for line in lines.by_ref() {
        if line.trim() == "% Sequences:" {
            break;
        }
    }
    lines.next();
    lines
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect()
}

/// The newest event time, on the replay clock, of the users `u` with `u % tenants == index`.
pub fn newest_event_ms(users: &[Vec<u16>], index: usize, tenants: usize) -> i64 {
    use clickpulse_protocol::clock;
    users
        .iter()
        .enumerate()
        .filter(|(u, p)| u % tenants == index && !p.is_empty())
        .map(|(u, p)| clock::event_time_ms(clock::DEFAULT_T0_MS, u as u64, p.len() as u32 - 1))
        .max()
        .unwrap_or(i64::MIN)
}

/// The `p`th percentile (nearest rank) of sorted, non-empty `sorted`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
