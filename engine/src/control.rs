//! Job control: tenant jobs run exactly while someone watches.
//!
//! ```text
//!  ZooKeeper /clickpulse                          engine (one coordinator task)
//!   tenants/<t>/clients/<gw>.<c>  ─ persistent ─▶  reconcile(snapshot):
//!   tenants/<t>/owner (EPHEMERAL)    recursive       first client      → claim owner, start job
//!   tenants/<t>/epoch                watch +         last client gone  → linger, then stop
//!   gateways/<gw> {zmq_endpoint}     250 ms tick     client back       → keep running (same epoch)
//!   engines/<id>  (EPHEMERAL)                        owner not ours    → stop at once (fenced)
//!                                                    │
//!                                     job ── results ─▶ Links ─ZeroMQ PUSH─▶ every gateway that
//!                                                                           hosts a client of <t>
//! ```
//!
//! **States** of a job on its engine: `starting` (owner claimed, consumer seeking) → `running`
//! (first result out) → `lingering` (no clients; for `linger`) → `stopping` → gone (idle). A
//! client coming back during the linger returns the job to `running` with no restart.
//!
//! **Ownership.** A job runs only on the engine holding the tenant's `owner` node, an
//! ephemeral of that engine's session, created in one `multi` transaction with the increment of
//! the tenant's persistent `epoch` node (version-checked): epochs only grow, and two claims
//! cannot both succeed. The owner's epoch is stamped on every result, so receivers can drop an
//! older owner's output.
//!
//! **Spread.** Every engine computes the same assignment from the same snapshot: unowned
//! tenants, in name order, each to the live engine with the fewest jobs (ties broken by a hash
//! of tenant and engine). An engine claims only what the assignment gives it, or any tenant
//! left unowned for `claim_grace` (an engine that is registered but stuck cannot strand one).
//!
//! **Failure.** A killed engine's session expires, its owner nodes vanish, and the survivors
//! claim them. An engine that cannot reach ZooKeeper for two thirds of its session timeout
//! stops its jobs before the server can have expired the session (fencing by time), so two
//! engines never both believe they own a tenant. On graceful shutdown an engine stops its jobs
//! and deletes its owner nodes at once: a hand-off, not a wait for expiry.
//!
//! Every ownership change is logged as `ownership acquired` / `ownership released` with the
//! tenant, epoch and wall-clock `at_ms`: the engine's own report of what it believed when.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clickpulse_cluster::zk;
use clickpulse_cluster::{ZkConfig, ZkError, ZkSession};
use clickpulse_protocol::Tenant;
use clickpulse_protocol::results::ResultMsg;
use clickpulse_protocol::zk::{EngineInfo, EpochRecord, Layout, OwnerRecord, now_ms};
use clickpulse_protocol::zmq::ResultFrame;
use futures_util::{FutureExt, StreamExt, stream};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::OperatorConfig;
use crate::job::{JobConfig, JobReport, StartFrom, StopNote, run_job};
use crate::links::{Frames, LinkStats, Links};
use clickpulse_protocol::state::Stopped;

/// Settings of one engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Unique in the deployment; names the engine's node and its owner records.
    pub id: String,
    /// Shown in the engine's node (host name, pod name).
    pub host: String,
    pub brokers: String,
    pub zookeeper: ZkConfig,
    pub layout: Layout,
    /// How long a job keeps running after its last client left.
    pub linger: Duration,
    /// Where a starting job begins reading.
    pub start: StartFrom,
    pub operators: OperatorConfig,
    /// A partition silent this long (at its end) stops holding the watermark back.
    pub idle_timeout: Duration,
    /// Local state (visitor history files), one file per tenant.
    pub data_dir: PathBuf,
    /// A tenant with clients but no owner for this long is claimed by any engine.
    pub claim_grace: Duration,
    /// How often jobs checkpoint to `state.<tenant>` (`None`: never; no resume either).
    pub checkpoint_interval: Option<Duration>,
    /// A job reading one window back resumes a checkpoint only up to this old.
    pub resume_max_age: Duration,
    /// librdkafka debug contexts for the jobs' consumers (e.g. `fetch,topic`), logged under
    /// the `librdkafka` target; `None`: off.
    pub kafka_debug: Option<String>,
}

impl EngineConfig {
    /// Defaults for everything but identity and addresses.
    pub fn new(id: &str, brokers: &str, zookeeper: ZkConfig, data_dir: PathBuf) -> Self {
        EngineConfig {
            id: id.to_owned(),
            host: std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".to_owned()),
            brokers: brokers.to_owned(),
            zookeeper,
            layout: Layout::default(),
            linger: Duration::from_secs(5),
            start: StartFrom::LatestWindow,
            operators: OperatorConfig::default(),
            idle_timeout: Duration::from_secs(2),
            data_dir,
            claim_grace: Duration::from_secs(1),
            checkpoint_interval: Some(Duration::from_secs(5)),
            resume_max_age: Duration::from_secs(600),
            kafka_debug: None,
        }
    }
}

/// Why the engine could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    ZooKeeper(#[from] ZkError),
    #[error("engine id: {0}")]
    Id(#[from] clickpulse_protocol::zk::LayoutError),
    #[error("cannot create the state directory {path}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where a job is in its life on this engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Starting,
    Running,
    Lingering,
    Stopping,
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobState::Starting => "starting",
            JobState::Running => "running",
            JobState::Lingering => "lingering",
            JobState::Stopping => "stopping",
        })
    }
}

/// One job as its engine sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobStatus {
    pub tenant: Tenant,
    pub state: JobState,
    pub epoch: u64,
    pub clients: usize,
    /// Gateways its results go to.
    pub gateways: Vec<String>,
    pub since_ms: i64,
}

/// A running engine.
pub struct Engine {
    /// The engine's jobs, updated after every reconciliation.
    pub status: watch::Receiver<Vec<JobStatus>>,
    pub links: Arc<LinkStats>,
    pub task: JoinHandle<()>,
}

/// Connects to ZooKeeper (bounded retries), registers the engine and starts coordinating.
pub async fn start(
    config: EngineConfig,
    shutdown: CancellationToken,
) -> Result<Engine, ControlError> {
    clickpulse_protocol::zk::validate_id(&config.id)?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ControlError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let session = ZkSession::connect(config.zookeeper.clone(), &shutdown).await?;
    for path in [
        config.layout.tenants(),
        config.layout.engines(),
        config.layout.gateways(),
    ] {
        session.ensure_path(&path).await?;
    }
    let info = EngineInfo {
        id: config.id.clone(),
        host: config.host.clone(),
        started_at_ms: now_ms(),
    };
    // Restarted right after a kill, the previous run's node is there until its session
    // expires: wait for that rather than exit.
    session
        .register_identity(
            &config.layout.engine(&config.id),
            serde_json::to_vec(&info).unwrap_or_default(),
            config.zookeeper.session_timeout * 2 + Duration::from_secs(1),
        )
        .await?;
    tracing::info!(engine = %config.id, brokers = %config.brokers, "engine registered");
    let (status_tx, status) = watch::channel(Vec::new());
    let links = Links::default();
    let link_stats = links.stats.clone();
    let (exits_tx, exits) = mpsc::unbounded_channel();
    let coordinator = Coordinator {
        config,
        session,
        links,
        jobs: BTreeMap::new(),
        retry: HashMap::new(),
        unowned_since: HashMap::new(),
        stopping: HashMap::new(),
        exits_tx,
        status_tx,
        shutdown: shutdown.clone(),
        last_contact: Instant::now(),
    };
    let task = tokio::spawn(coordinator.run(exits));
    Ok(Engine {
        status,
        links: link_stats,
        task,
    })
}

/// What the coordinator read from ZooKeeper in one pass.
#[derive(Debug, Default)]
struct Snapshot {
    engines: BTreeSet<String>,
    /// Gateway id → ZeroMQ endpoint.
    gateways: HashMap<String, String>,
    tenants: BTreeMap<Tenant, TenantSnapshot>,
}

#[derive(Debug, Default)]
struct TenantSnapshot {
    /// Client node names, `<gateway>.<client>`.
    clients: Vec<String>,
    /// The owner record and the session holding the node.
    owner: Option<(OwnerRecord, i64)>,
}

impl TenantSnapshot {
    fn gateways(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self
            .clients
            .iter()
            .filter_map(|c| Layout::parse_client_node(c).map(|(gw, _)| gw))
            .collect();
        set.into_iter().map(str::to_owned).collect()
    }
}

struct Job {
    epoch: u64,
    state: JobState,
    since_ms: i64,
    clients: usize,
    linger_until: Option<Instant>,
    cancel: CancellationToken,
    /// Cancels the job if the coordinator goes away without stopping it.
    _guard: tokio_util::sync::DropGuard,
    stop: StopNote,
    handle: JoinHandle<()>,
    gateways: watch::Sender<Vec<String>>,
    first_result: watch::Receiver<bool>,
}

/// A job's end, reported by its task.
struct Exit {
    tenant: Tenant,
    epoch: u64,
    outcome: Result<JobReport, String>,
}

struct Coordinator {
    config: EngineConfig,
    session: ZkSession,
    links: Links,
    jobs: BTreeMap<Tenant, Job>,
    /// A tenant whose job failed is not claimed again before this instant; the backoff doubles.
    retry: HashMap<Tenant, (Instant, Duration)>,
    unowned_since: HashMap<Tenant, Instant>,
    /// Jobs told to stop whose owner node is deleted once their task has ended (its last
    /// checkpoint written): the tasks that wait for that. The coordinator goes on meanwhile;
    /// a finished task leaves at the next reconcile (its node's deletion brings one).
    stopping: HashMap<Tenant, JoinHandle<()>>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    status_tx: watch::Sender<Vec<JobStatus>>,
    shutdown: CancellationToken,
    /// When the last ZooKeeper read that succeeded was sent.
    last_contact: Instant,
}

/// Bound on one ZooKeeper operation of the coordinator, so its loop never hangs on a dead link.
const ZK_OP_TIMEOUT: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(250);
/// Least time between two reconciles (see `Coordinator::run`).
const RECONCILE_GAP: Duration = Duration::from_millis(50);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Reads in flight at once while taking a snapshot.
const READS_IN_FLIGHT: usize = 64;

async fn bounded<T>(
    what: &'static str,
    path: &str,
    f: impl std::future::Future<Output = Result<T, zk::Error>>,
) -> Result<T, ZkError> {
    match tokio::time::timeout(ZK_OP_TIMEOUT, f).await {
        Ok(r) => r.map_err(|error| ZkError::Op {
            op: what,
            path: path.to_owned(),
            error,
        }),
        Err(_) => Err(ZkError::Op {
            op: what,
            path: path.to_owned(),
            error: zk::Error::Timeout,
        }),
    }
}

fn no_node<T>(r: Result<T, ZkError>) -> Result<Option<T>, ZkError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(ZkError::Op {
            error: zk::Error::NoNode,
            ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn read_snapshot(client: &zk::Client, layout: &Layout) -> Result<Snapshot, ZkError> {
    let engines_path = layout.engines();
    let gateways_path = layout.gateways();
    let tenants_path = layout.tenants();
    let engines =
        no_node(bounded("list", &engines_path, client.list_children(&engines_path)).await)?
            .unwrap_or_default();
    let gateway_ids =
        no_node(bounded("list", &gateways_path, client.list_children(&gateways_path)).await)?
            .unwrap_or_default();
    let tenant_names =
        no_node(bounded("list", &tenants_path, client.list_children(&tenants_path)).await)?
            .unwrap_or_default();

    let gateways = stream::iter(gateway_ids.into_iter().map(|id| {
        let path = layout.gateway(&id);
        async move {
            let data = no_node(bounded("get", &path, client.get_data(&path)).await)?;
            let endpoint = data.and_then(|(bytes, _)| {
                serde_json::from_slice::<clickpulse_protocol::zk::GatewayInfo>(&bytes)
                    .map_err(|error| tracing::warn!(%path, %error, "unreadable gateway node"))
                    .ok()
                    .map(|g| g.zmq_endpoint)
            });
            Ok::<_, ZkError>(endpoint.map(|e| (id, e)))
        }
    }))
    .buffer_unordered(READS_IN_FLIGHT)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?
    .into_iter()
    .flatten()
    .collect();

    let tenants = stream::iter(tenant_names.into_iter().filter_map(|name| {
        let tenant = Tenant::new(&name).ok()?;
        let clients_path = layout.clients(&tenant);
        let owner_path = layout.owner(&tenant);
        Some(async move {
            let clients =
                no_node(bounded("list", &clients_path, client.list_children(&clients_path)).await)?
                    .unwrap_or_default();
            let owner = no_node(bounded("get", &owner_path, client.get_data(&owner_path)).await)?
                .and_then(
                    |(bytes, stat)| match serde_json::from_slice::<OwnerRecord>(&bytes) {
                        Ok(record) => Some((record, stat.ephemeral_owner)),
                        Err(error) => {
                            tracing::warn!(path = %owner_path, %error, "unreadable owner node");
                            None
                        }
                    },
                );
            Ok::<_, ZkError>((tenant, TenantSnapshot { clients, owner }))
        })
    }))
    .buffer_unordered(READS_IN_FLIGHT)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect::<Result<BTreeMap<_, _>, _>>()?;

    Ok(Snapshot {
        engines: engines.into_iter().collect(),
        gateways,
        tenants,
    })
}

fn rank(tenant: &Tenant, engine: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tenant.as_str().hash(&mut h);
    engine.hash(&mut h);
    h.finish()
}

/// The engine each unowned tenant with clients should go to: in tenant order, the live engine
/// with the fewest jobs, ties broken by [`rank`]. Every engine computes the same answer from
/// the same snapshot.
fn assignment(snapshot: &Snapshot, me: &str) -> HashMap<Tenant, String> {
    let mut engines: BTreeSet<&str> = snapshot.engines.iter().map(String::as_str).collect();
    engines.insert(me);
    let mut load: BTreeMap<&str, usize> = engines.iter().map(|e| (*e, 0)).collect();
    for t in snapshot.tenants.values() {
        if let Some((owner, _)) = &t.owner
            && let Some(n) = load.get_mut(owner.engine.as_str())
        {
            *n += 1;
        }
    }
    let mut out = HashMap::new();
    for (tenant, t) in &snapshot.tenants {
        if t.clients.is_empty() || t.owner.is_some() {
            continue;
        }
        let best = load
            .iter()
            .min_by_key(|(engine, n)| (**n, rank(tenant, engine)))
            .map(|(engine, _)| *engine);
        if let Some(engine) = best {
            if let Some(n) = load.get_mut(engine) {
                *n += 1;
            }
            out.insert(tenant.clone(), engine.to_owned());
        }
    }
    out
}

/// Claims `tenant`: bumps its epoch (version-checked) and creates the ephemeral owner node, in
/// one transaction. `None` when another engine got there first.
async fn claim(
    client: &zk::Client,
    layout: &Layout,
    tenant: &Tenant,
    me: &str,
) -> Result<Option<u64>, ZkError> {
    let epoch_path = layout.epoch(tenant);
    let owner_path = layout.owner(tenant);
    let current = no_node(bounded("get", &epoch_path, client.get_data(&epoch_path)).await)?;
    let (epoch, version) = match current {
        // The node's version counts its updates, so even an unreadable payload cannot make
        // the epoch go back.
        Some((bytes, stat)) => {
            let read = serde_json::from_slice::<EpochRecord>(&bytes).map_or(0, |r| r.epoch);
            let floor = u64::try_from(stat.version).unwrap_or(0);
            (read.max(floor) + 1, Some(stat.version))
        }
        None => (1, None),
    };
    let epoch_bytes = serde_json::to_vec(&EpochRecord { epoch }).unwrap_or_default();
    let owner = OwnerRecord {
        engine: me.to_owned(),
        epoch,
        since_ms: now_ms(),
    };
    let owner_bytes = serde_json::to_vec(&owner).unwrap_or_default();
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    let mut writer = client.new_multi_writer();
    let staged = match version {
        Some(v) => writer.add_set_data(&epoch_path, &epoch_bytes, Some(v)),
        None => writer.add_create(&epoch_path, &epoch_bytes, &persistent),
    }
    .and_then(|()| writer.add_create(&owner_path, &owner_bytes, &ephemeral));
    if let Err(error) = staged {
        return Err(ZkError::Op {
            op: "multi",
            path: owner_path,
            error,
        });
    }
    match tokio::time::timeout(ZK_OP_TIMEOUT, writer.commit()).await {
        Ok(Ok(_)) => Ok(Some(epoch)),
        Ok(Err(zk::MultiWriteError::OperationFailed {
            source: zk::Error::NodeExists | zk::Error::BadVersion | zk::Error::NoNode,
            ..
        })) => Ok(None),
        Ok(Err(e)) => Err(ZkError::Op {
            op: "multi",
            path: owner_path,
            error: e.into(),
        }),
        Err(_) => Err(ZkError::Op {
            op: "multi",
            path: owner_path,
            error: zk::Error::Timeout,
        }),
    }
}

/// Deletes the owner node if this session holds it.
async fn release_owner(
    client: &zk::Client,
    layout: &Layout,
    tenant: &Tenant,
) -> Result<(), ZkError> {
    let path = layout.owner(tenant);
    let Some(Some(stat)) = no_node(bounded("stat", &path, client.check_stat(&path)).await)? else {
        return Ok(());
    };
    if stat.ephemeral_owner != client.session_id().0 {
        return Ok(());
    }
    match no_node(bounded("delete", &path, client.delete(&path, Some(stat.version))).await) {
        Ok(_)
        | Err(ZkError::Op {
            error: zk::Error::BadVersion,
            ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Waits (bounded) for a job told to stop to end.
async fn wait_stopped(tenant: &Tenant, job: Job) {
    if tokio::time::timeout(Duration::from_secs(10), job.handle)
        .await
        .is_err()
    {
        tracing::warn!(%tenant, "job did not stop within 10 s");
    }
    tracing::info!(%tenant, epoch = job.epoch, from = %job.state, to = "idle", "job state");
}

/// [`release_owner`], a failure only logged: the node goes with the session anyway.
async fn release_or_warn(client: &zk::Client, layout: &Layout, tenant: &Tenant) {
    if let Err(error) = release_owner(client, layout, tenant).await {
        tracing::warn!(%tenant, %error, "cannot delete the owner node; it goes with the session");
    }
}

async fn next_event(watcher: &mut Option<zk::PersistentWatcher>) -> zk::WatchedEvent {
    match watcher {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

impl Coordinator {
    async fn run(mut self, mut exits: mpsc::UnboundedReceiver<Exit>) {
        let mut watcher: Option<zk::PersistentWatcher> = None;
        let mut watched_generation = 0;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reconcile: Option<Instant> = None;
        loop {
            if watcher.is_none() || watched_generation != self.session.generation() {
                watcher = self.arm_watch().await;
                watched_generation = self.session.generation();
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                event = next_event(&mut watcher) => self.on_event(event, &mut watcher).await,
                Some(exit) = exits.recv() => self.on_exit(exit).await,
                _ = tick.tick() => {}
            }
            // Watch events come in bursts (a storm of registrations is one per client), and
            // each reconcile reads the whole tree: at most one per RECONCILE_GAP, taking every
            // event since. One per event had both engines and ZooKeeper re-reading 5,000
            // client nodes back to back through a storm, most of a core on 2 cores, against
            // the gateway's registrations. A lone event after a quiet spell waits for nothing.
            if let Some(at) = last_reconcile {
                let wait = RECONCILE_GAP.saturating_sub(at.elapsed());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            while let Some(event) = watcher.as_mut().and_then(|w| w.changed().now_or_never()) {
                self.on_event(event, &mut watcher).await;
            }
            self.reconcile().await;
            last_reconcile = Some(Instant::now());
        }
        self.hand_off().await;
    }

    /// A watch event: only session events matter here (every change leads to a reconcile).
    async fn on_event(
        &mut self,
        event: zk::WatchedEvent,
        watcher: &mut Option<zk::PersistentWatcher>,
    ) {
        if event.event_type == zk::EventType::Session {
            if event.session_state.is_terminated() {
                // A terminal event is the watcher's last: it must not be polled again.
                *watcher = None;
                if event.session_state == zk::SessionState::Expired {
                    self.fence_all("zookeeper session expired").await;
                }
            } else {
                tracing::debug!(state = ?event.session_state, "zookeeper connection state");
            }
        }
    }

    async fn arm_watch(&mut self) -> Option<zk::PersistentWatcher> {
        let client = self.session.client().ok()?;
        let root = self.config.layout.root().to_owned();
        match bounded(
            "watch",
            &root,
            client.watch(&root, zk::AddWatchMode::PersistentRecursive),
        )
        .await
        {
            Ok(w) => Some(w),
            Err(error) => {
                tracing::warn!(%error, "cannot watch the cluster tree yet; polling meanwhile");
                None
            }
        }
    }

    /// Reads the tree and moves every job one step towards what it says.
    async fn reconcile(&mut self) {
        let Ok(client) = self.session.client() else {
            return;
        };
        let sent = Instant::now();
        let snapshot = match read_snapshot(&client, &self.config.layout).await {
            Ok(s) => {
                self.last_contact = sent;
                s
            }
            Err(error) => {
                // Without contact for two thirds of the session timeout the server may be
                // about to expire the session and hand the jobs to someone else: stop first.
                let limit = client.session_timeout() * 2 / 3;
                if !self.jobs.is_empty() && self.last_contact.elapsed() >= limit {
                    self.fence_all("zookeeper unreachable for 2/3 of the session timeout")
                        .await;
                } else {
                    tracing::debug!(%error, "cannot read the cluster tree");
                }
                return;
            }
        };
        self.links.update(&snapshot.gateways, &self.shutdown);
        let me = self.config.id.clone();
        let my_session = client.session_id().0;

        // Jobs this engine runs.
        let tenants: Vec<Tenant> = self.jobs.keys().cloned().collect();
        for tenant in tenants {
            let t = snapshot.tenants.get(&tenant);
            let ours = t
                .and_then(|t| t.owner.as_ref())
                .is_some_and(|(rec, session)| {
                    rec.engine == me
                        && Some(rec.epoch) == self.jobs.get(&tenant).map(|j| j.epoch)
                        && *session == my_session
                });
            if !ours {
                self.stop_job(&tenant, "owner node no longer ours (fenced)", None)
                    .await;
                continue;
            }
            let (clients, gateways) =
                t.map_or((0, Vec::new()), |t| (t.clients.len(), t.gateways()));
            self.update_job(&tenant, clients, gateways).await;
        }

        // Tenants with clients and no job here.
        let plan = assignment(&snapshot, &me);
        let now = Instant::now();
        self.unowned_since.retain(|t, _| {
            snapshot
                .tenants
                .get(t)
                .is_some_and(|s| s.owner.is_none() && !s.clients.is_empty())
        });
        self.stopping.retain(|_, waiter| !waiter.is_finished());
        for (tenant, t) in &snapshot.tenants {
            // A stopping job's owner node goes when its task has ended: not claimable before.
            if self.jobs.contains_key(tenant)
                || self.stopping.contains_key(tenant)
                || t.clients.is_empty()
            {
                continue;
            }
            match &t.owner {
                Some((rec, _)) if rec.engine == me => {
                    // Ours but not running: left by a job that ended. Free it for a clean claim.
                    if let Err(error) = release_owner(&client, &self.config.layout, tenant).await {
                        tracing::warn!(%tenant, %error, "cannot release a stale owner node");
                    }
                }
                Some(_) => {}
                None => {
                    let since = *self.unowned_since.entry(tenant.clone()).or_insert(now);
                    let mine = plan.get(tenant).is_some_and(|e| *e == me);
                    let overdue = since.elapsed() >= self.config.claim_grace;
                    let backing_off = self.retry.get(tenant).is_some_and(|(at, _)| now < *at);
                    if (mine || overdue) && !backing_off {
                        self.try_start(&client, tenant, t).await;
                    }
                }
            }
        }
        self.publish_status();
    }

    async fn update_job(&mut self, tenant: &Tenant, clients: usize, gateways: Vec<String>) {
        let linger = self.config.linger;
        let Some(job) = self.jobs.get_mut(tenant) else {
            return;
        };
        job.clients = clients;
        job.gateways.send_if_modified(|g| {
            let changed = *g != gateways;
            if changed {
                *g = gateways;
            }
            changed
        });
        let started = *job.first_result.borrow();
        let next = match (job.state, clients > 0) {
            (JobState::Starting, true) if started => JobState::Running,
            (JobState::Lingering, true) => {
                tracing::info!(%tenant, epoch = job.epoch, "a client came back during the linger; job kept");
                JobState::Running
            }
            (JobState::Starting | JobState::Running, false) => {
                job.linger_until = Some(Instant::now() + linger);
                JobState::Lingering
            }
            (JobState::Lingering, false)
                if job.linger_until.is_some_and(|u| Instant::now() >= u) =>
            {
                JobState::Stopping
            }
            (state, _) => state,
        };
        if next != job.state {
            tracing::info!(%tenant, epoch = job.epoch, from = %job.state, to = %next, clients, "job state");
            job.state = next;
            if next != JobState::Lingering {
                job.linger_until = None;
            }
        }
        if next == JobState::Stopping {
            self.stop_in_background(tenant, "no clients after the linger", Stopped::Linger);
        }
    }

    async fn try_start(&mut self, client: &zk::Client, tenant: &Tenant, t: &TenantSnapshot) {
        let epoch = match claim(client, &self.config.layout, tenant, &self.config.id).await {
            Ok(Some(epoch)) => epoch,
            Ok(None) => return, // another engine was first
            Err(error) => {
                tracing::warn!(%tenant, %error, "cannot claim tenant");
                return;
            }
        };
        self.unowned_since.remove(tenant);
        tracing::info!(%tenant, epoch, at_ms = now_ms(), engine = %self.config.id, "ownership acquired");
        let (gateways_tx, gateways_rx) = watch::channel(t.gateways());
        let (first_tx, first_result) = watch::channel(false);
        // Not a child of the engine's shutdown: on shutdown the coordinator stops each job
        // itself, after telling it why (a hand-off writes a last checkpoint).
        let cancel = CancellationToken::new();
        let stop = StopNote::default();
        let job_config = JobConfig {
            tenant: tenant.clone(),
            epoch,
            brokers: self.config.brokers.clone(),
            operators: self.config.operators.clone(),
            start: self.config.start,
            idle_timeout: self.config.idle_timeout,
            history_path: self.config.data_dir.join(format!("{tenant}.history.redb")),
            checkpoint_interval: self.config.checkpoint_interval,
            resume_max_age: self.config.resume_max_age,
            kafka_debug: self.config.kafka_debug.clone(),
            stop: stop.clone(),
            live: Some(first_tx.clone()),
        };
        let handle = tokio::spawn(job_task(
            job_config,
            self.links.clone(),
            gateways_rx,
            first_tx,
            cancel.clone(),
            self.exits_tx.clone(),
        ));
        tracing::info!(%tenant, epoch, from = "idle", to = "starting", clients = t.clients.len(), "job state");
        self.jobs.insert(
            tenant.clone(),
            Job {
                epoch,
                state: JobState::Starting,
                since_ms: now_ms(),
                clients: t.clients.len(),
                linger_until: None,
                _guard: cancel.clone().drop_guard(),
                cancel,
                stop,
                handle,
                gateways: gateways_tx,
                first_result,
            },
        );
    }

    /// Stops a job and waits (bounded) for it; the owner node is the caller's business.
    /// `why` is what its last checkpoint says; `None` (fenced) writes none.
    async fn stop_job(&mut self, tenant: &Tenant, reason: &str, why: Option<Stopped>) {
        if let Some(job) = self.tell_to_stop(tenant, reason, why) {
            wait_stopped(tenant, job).await;
        }
    }

    /// Takes a job out of the running ones and tells it to stop (and why).
    fn tell_to_stop(&mut self, tenant: &Tenant, reason: &str, why: Option<Stopped>) -> Option<Job> {
        let job = self.jobs.remove(tenant)?;
        if let Some(why) = why {
            job.stop.set(why);
        }
        job.cancel.cancel();
        tracing::info!(%tenant, epoch = job.epoch, at_ms = now_ms(), engine = %self.config.id, reason, "ownership released");
        Some(job)
    }

    /// Stops a job this engine owns without waiting for it: a task waits (bounded) for the job
    /// to end, its last checkpoint written, then deletes the owner node. A job's stop takes
    /// about a second (checkpoint, output flush, consumer teardown); while the coordinator
    /// waited for it, it claimed nothing, and in `scripts/bench jobs` one start in five took
    /// 0.5–1 s instead of 0.3 s.
    fn stop_in_background(&mut self, tenant: &Tenant, reason: &'static str, why: Stopped) {
        let Some(job) = self.tell_to_stop(tenant, reason, Some(why)) else {
            return;
        };
        let client = self.session.client().ok();
        let layout = self.config.layout.clone();
        let waiter = {
            let tenant = tenant.clone();
            tokio::spawn(async move {
                wait_stopped(&tenant, job).await;
                if let Some(client) = client {
                    release_or_warn(&client, &layout, &tenant).await;
                }
            })
        };
        self.stopping.insert(tenant.clone(), waiter);
    }

    /// Stops a job this engine owns and deletes its owner node at once, so the tenant is free
    /// for the next claim without waiting for this session to expire.
    async fn stop_and_release(&mut self, tenant: &Tenant, reason: &str, why: Option<Stopped>) {
        self.stop_job(tenant, reason, why).await;
        if let Ok(client) = self.session.client() {
            release_or_warn(&client, &self.config.layout, tenant).await;
        }
    }

    /// Stops every job without touching ZooKeeper: this engine may no longer own them.
    async fn fence_all(&mut self, reason: &str) {
        let tenants: Vec<Tenant> = self.jobs.keys().cloned().collect();
        if !tenants.is_empty() {
            tracing::warn!(jobs = tenants.len(), reason, "stopping every job");
        }
        for tenant in tenants {
            self.stop_job(&tenant, reason, None).await;
        }
        self.publish_status();
    }

    async fn on_exit(&mut self, exit: Exit) {
        if self
            .jobs
            .get(&exit.tenant)
            .is_none_or(|j| j.epoch != exit.epoch)
        {
            return; // stopped on purpose
        }
        let (_, backoff) = self
            .retry
            .get(&exit.tenant)
            .copied()
            .unwrap_or((Instant::now(), RETRY_MIN / 2));
        let backoff = (backoff * 2).clamp(RETRY_MIN, RETRY_MAX);
        match &exit.outcome {
            Ok(_) => tracing::warn!(tenant = %exit.tenant, "job ended by itself; restarting later"),
            Err(error) => {
                tracing::error!(tenant = %exit.tenant, %error, retry_in_s = backoff.as_secs(), "job failed")
            }
        }
        self.retry
            .insert(exit.tenant.clone(), (Instant::now() + backoff, backoff));
        self.stop_and_release(&exit.tenant, "job ended", None).await;
    }

    /// Graceful shutdown: stop every job and delete its owner node at once, so another engine
    /// takes over without waiting for this session to expire.
    async fn hand_off(mut self) {
        // All at once: one after another, each waited for, took about a second per job.
        let tenants: Vec<Tenant> = self.jobs.keys().cloned().collect();
        for tenant in &tenants {
            self.stop_in_background(tenant, "engine shutting down (hand-off)", Stopped::HandOff);
        }
        for (_, waiter) in self.stopping.drain() {
            let _ = waiter.await;
        }
        self.publish_status();
        self.links.close();
        self.session.close().await;
        tracing::info!(engine = %self.config.id, handed_off = tenants.len(), "engine stopped");
    }

    fn publish_status(&self) {
        let status = self
            .jobs
            .iter()
            .map(|(tenant, job)| JobStatus {
                tenant: tenant.clone(),
                state: job.state,
                epoch: job.epoch,
                clients: job.clients,
                gateways: job.gateways.borrow().clone(),
                since_ms: job.since_ms,
            })
            .collect();
        self.status_tx.send_if_modified(|old| {
            let changed = *old != status;
            if changed {
                *old = status;
            }
            changed
        });
    }
}

/// One job: the Kafka job plus the forwarder of its results to the gateways.
async fn job_task(
    config: JobConfig,
    links: Links,
    gateways: watch::Receiver<Vec<String>>,
    first_result: watch::Sender<bool>,
    cancel: CancellationToken,
    exits: mpsc::UnboundedSender<Exit>,
) {
    let (tenant, epoch) = (config.tenant.clone(), config.epoch);
    let (tx, rx) = mpsc::channel(1024);
    let forwarder = tokio::spawn(forward(tenant.clone(), rx, gateways, links, first_result));
    let outcome = run_job(config, tx, cancel).await.map_err(|e| e.to_string());
    let _ = forwarder.await;
    let _ = exits.send(Exit {
        tenant,
        epoch,
        outcome,
    });
}

/// Sends every result to every gateway hosting a client of the tenant, encoded once.
async fn forward(
    tenant: Tenant,
    mut rx: mpsc::Receiver<ResultMsg>,
    gateways: watch::Receiver<Vec<String>>,
    links: Links,
    first_result: watch::Sender<bool>,
) {
    let started = Instant::now();
    while let Some(msg) = rx.recv().await {
        let frames: Frames = ResultFrame::from_result(&msg)
            .encode()
            .into_iter()
            .map(Into::into)
            .collect();
        for gateway in gateways.borrow().iter() {
            links.send(gateway, &frames);
        }
        if first_result.send_if_modified(|first| !std::mem::replace(first, true)) {
            tracing::info!(%tenant, epoch = msg.epoch, ms_since_start = started.elapsed().as_millis() as u64, "first result out");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(engines: &[&str], tenants: &[(&str, usize, Option<&str>)]) -> Snapshot {
        Snapshot {
            engines: engines.iter().map(|e| (*e).to_owned()).collect(),
            gateways: HashMap::new(),
            tenants: tenants
                .iter()
                .map(|(t, clients, owner)| {
                    (
                        Tenant::new(*t).unwrap(),
                        TenantSnapshot {
                            clients: (0..*clients).map(|c| format!("gw-1.c-{c}")).collect(),
                            owner: owner.map(|e| {
                                (
                                    OwnerRecord {
                                        engine: e.to_owned(),
                                        epoch: 1,
                                        since_ms: 0,
                                    },
                                    7,
                                )
                            }),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn unowned_tenants_are_spread_evenly_and_every_engine_agrees() {
        let names: Vec<String> = (0..12).map(|i| format!("t{i}")).collect();
        let tenants: Vec<(&str, usize, Option<&str>)> =
            names.iter().map(|n| (n.as_str(), 1, None)).collect();
        let s = snapshot(&["a", "b"], &tenants);
        let from_a = assignment(&s, "a");
        assert_eq!(from_a, assignment(&s, "b"));
        let on_a = from_a.values().filter(|e| *e == "a").count();
        assert_eq!((on_a, from_a.len() - on_a), (6, 6));
    }

    #[test]
    fn owned_jobs_count_as_load_and_tenants_without_clients_get_nothing() {
        let s = snapshot(
            &["a", "b"],
            &[
                ("x1", 1, Some("a")),
                ("x2", 1, Some("a")),
                ("y1", 1, None),
                ("y2", 1, None),
                ("z", 0, None),
            ],
        );
        let plan = assignment(&s, "a");
        assert_eq!(plan.len(), 2);
        assert!(plan.values().all(|e| e == "b"), "{plan:?}");
    }

    #[test]
    fn gateways_come_from_client_node_names() {
        let t = TenantSnapshot {
            clients: vec![
                "gw-2.c1".into(),
                "gw-1.c2".into(),
                "gw-2.c3".into(),
                "bad".into(),
            ],
            owner: None,
        };
        assert_eq!(t.gateways(), vec!["gw-1".to_owned(), "gw-2".to_owned()]);
    }
}
