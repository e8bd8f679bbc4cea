//! What ZooKeeper says about the cluster, read for people: the ops CLI (`clickpulse zk …`)
//! and the gateway's `/admin/cluster` show the same [`ClusterView`].

use clickpulse_protocol::Tenant;
use clickpulse_protocol::zk::{
    ClientRegistration, EngineInfo, EpochRecord, GatewayInfo, Layout, OwnerRecord,
};
use serde::{Deserialize, Serialize};
use zookeeper_client as zk;

use crate::ZkError;
use crate::session::op;

/// One tenant: its connected clients and who runs its job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantView {
    pub tenant: Tenant,
    pub clients: Vec<ClientRegistration>,
    /// The engine that owns the job, if any.
    pub owner: Option<OwnerRecord>,
    /// The newest epoch ever handed out for this tenant.
    pub epoch: Option<u64>,
}

impl TenantView {
    /// The job's state as ZooKeeper shows it.
    pub fn job_state(&self) -> &'static str {
        match (&self.owner, self.clients.is_empty()) {
            (Some(_), false) => "running",
            (Some(_), true) => "lingering",
            (None, false) => "waiting",
            (None, true) => "idle",
        }
    }
}

/// Everything under the root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    pub gateways: Vec<GatewayInfo>,
    pub engines: Vec<EngineInfo>,
    pub tenants: Vec<TenantView>,
}

/// Children of `path`, sorted; none when it does not exist.
async fn children(client: &zk::Client, path: &str) -> Result<Vec<String>, ZkError> {
    match client.get_children(path).await {
        Ok((mut names, _)) => {
            names.sort();
            Ok(names)
        }
        Err(zk::Error::NoNode) => Ok(Vec::new()),
        Err(e) => Err(op("list", path)(e)),
    }
}

/// The payload of `path` decoded as `T`; `None` when the node is gone or its payload is not a
/// `T` (a malformed node is logged, not fatal: the view is for people).
async fn payload<T: for<'de> Deserialize<'de>>(
    client: &zk::Client,
    path: &str,
) -> Result<Option<T>, ZkError> {
    match client.get_data(path).await {
        Ok((data, _)) => match serde_json::from_slice(&data) {
            Ok(v) => Ok(Some(v)),
            Err(error) => {
                tracing::warn!(%path, %error, "node payload is not what the layout says");
                Ok(None)
            }
        },
        Err(zk::Error::NoNode) => Ok(None),
        Err(e) => Err(op("read", path)(e)),
    }
}

impl ClusterView {
    /// Reads the view. Nodes may come and go while it is read; each is taken as found.
    pub async fn read(client: &zk::Client, layout: &Layout) -> Result<Self, ZkError> {
        let mut view = ClusterView::default();
        for id in children(client, &layout.gateways()).await? {
            if let Some(g) = payload(client, &layout.gateway(&id)).await? {
                view.gateways.push(g);
            }
        }
        for id in children(client, &layout.engines()).await? {
            if let Some(e) = payload(client, &layout.engine(&id)).await? {
                view.engines.push(e);
            }
        }
        for name in children(client, &layout.tenants()).await? {
            let Ok(tenant) = Tenant::new(name) else {
                continue;
            };
            let mut clients = Vec::new();
            for node in children(client, &layout.clients(&tenant)).await? {
                let path = format!("{}/{node}", layout.clients(&tenant));
                if let Some(c) = payload::<ClientRegistration>(client, &path).await? {
                    clients.push(c);
                }
            }
            let owner = payload::<OwnerRecord>(client, &layout.owner(&tenant)).await?;
            let epoch = payload::<EpochRecord>(client, &layout.epoch(&tenant))
                .await?
                .map(|e| e.epoch);
            view.tenants.push(TenantView {
                tenant,
                clients,
                owner,
                epoch,
            });
        }
        Ok(view)
    }
}

/// One node of the raw tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeNode {
    pub path: String,
    /// The owning session of an ephemeral node; `None` for a persistent one.
    pub ephemeral_owner: Option<String>,
    pub children: usize,
    pub data_bytes: usize,
    /// The payload, shortened for display.
    pub summary: String,
}

/// Every node under `root`, depth first, in name order.
pub async fn tree(client: &zk::Client, root: &str) -> Result<Vec<TreeNode>, ZkError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let (data, stat) = match client.get_data(&path).await {
            Ok(found) => found,
            Err(zk::Error::NoNode) => continue,
            Err(e) => return Err(op("read", &path)(e)),
        };
        let names = children(client, &path).await?;
        let mut summary: String = String::from_utf8_lossy(&data).chars().take(100).collect();
        if data.len() > 100 {
            summary.push('…');
        }
        out.push(TreeNode {
            path: path.clone(),
            ephemeral_owner: (stat.ephemeral_owner != 0)
                .then(|| format!("{:#x}", stat.ephemeral_owner)),
            children: names.len(),
            data_bytes: data.len(),
            summary,
        });
        let base = if path == "/" { String::new() } else { path };
        for name in names.into_iter().rev() {
            stack.push(format!("{base}/{name}"));
        }
    }
    Ok(out)
}
