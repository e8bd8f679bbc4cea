//! `clickpulse zk tree|jobs|clients`: what ZooKeeper says, for on-call engineers.

use std::process::ExitCode;
use std::time::Duration;

use clickpulse_cluster::{ClusterView, ZkConfig, ZkSession, view};
use clickpulse_protocol::Tenant;
use clickpulse_protocol::zk::Layout;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct ZkArgs {
    /// ZooKeeper to read (`host:port[,…]`).
    #[arg(long, env = "CLICKPULSE_ZOOKEEPER", default_value = "127.0.0.1:2181")]
    zookeeper: String,
    /// Root of the clickpulse tree.
    #[arg(long, env = "CLICKPULSE_ZK_ROOT", default_value = "/clickpulse")]
    zk_root: String,
    /// How long to keep trying to reach ZooKeeper, seconds.
    #[arg(long, env = "CLICKPULSE_ZK_CONNECT_TIMEOUT", default_value_t = 10)]
    connect_timeout: u64,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: ZkCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ZkCommand {
    /// Every node under the root: ephemeral or persistent, children, payload.
    Tree,
    /// One line per tenant: job state, owner engine, epoch, clients.
    Jobs,
    /// The clients of one tenant: gateway, client, rights, streams, since.
    Clients {
        #[arg(long)]
        tenant: Tenant,
    },
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn since(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

pub async fn run(args: ZkArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let layout = Layout::new(&args.zk_root)?;
    let session = ZkSession::connect(
        ZkConfig {
            connect: args.zookeeper,
            session_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(args.connect_timeout.max(1)),
        },
        &shutdown,
    )
    .await?;
    let client = session.client()?;
    let result = match args.command {
        ZkCommand::Tree => {
            let nodes = view::tree(&client, layout.root()).await?;
            if args.json {
                print_json(&nodes)
            } else {
                for n in &nodes {
                    let depth = n
                        .path
                        .matches('/')
                        .count()
                        .saturating_sub(layout.root().matches('/').count());
                    let name = n.path.rsplit('/').next().unwrap_or("/");
                    let kind = n
                        .ephemeral_owner
                        .as_deref()
                        .map_or("".to_owned(), |o| format!("  EPHEMERAL owner={o}"));
                    let kids = if n.children > 0 {
                        format!("  ({} children)", n.children)
                    } else {
                        String::new()
                    };
                    let data = if n.summary.is_empty() {
                        String::new()
                    } else {
                        format!("  {}", n.summary)
                    };
                    println!(
                        "{}{}{kind}{kids}{data}",
                        "  ".repeat(depth),
                        if depth == 0 { &n.path } else { name }
                    );
                }
                println!(
                    "{} nodes, {} ephemeral",
                    nodes.len(),
                    nodes.iter().filter(|n| n.ephemeral_owner.is_some()).count()
                );
                Ok(())
            }
        }
        ZkCommand::Jobs => {
            let view = ClusterView::read(&client, &layout).await?;
            if args.json {
                print_json(&view)
            } else {
                println!(
                    "{:<20} {:<10} {:<16} {:>6} {:>8}  {:<19}",
                    "tenant", "state", "owner", "epoch", "clients", "since"
                );
                for t in &view.tenants {
                    println!(
                        "{:<20} {:<10} {:<16} {:>6} {:>8}  {:<19}",
                        t.tenant.as_str(),
                        t.job_state(),
                        t.owner.as_ref().map_or("-", |o| o.engine.as_str()),
                        t.epoch.map_or("-".into(), |e| e.to_string()),
                        t.clients.len(),
                        t.owner.as_ref().map_or("-".into(), |o| since(o.since_ms)),
                    );
                }
                println!(
                    "{} gateways, {} engines, {} tenants",
                    view.gateways.len(),
                    view.engines.len(),
                    view.tenants.len()
                );
                Ok(())
            }
        }
        ZkCommand::Clients { tenant } => {
            let view = ClusterView::read(&client, &layout).await?;
            let clients = view
                .tenants
                .into_iter()
                .find(|t| t.tenant == tenant)
                .map(|t| t.clients)
                .unwrap_or_default();
            if args.json {
                print_json(&clients)
            } else {
                println!(
                    "{:<12} {:<12} {:<12} {:<36} {:<19}",
                    "gateway", "client", "rights", "streams", "connected"
                );
                for c in &clients {
                    let rights: Vec<&str> = c
                        .rights
                        .iter()
                        .map(|r| match r {
                            clickpulse_protocol::zk::Right::View => "view",
                            clickpulse_protocol::zk::Right::Admin => "admin",
                        })
                        .collect();
                    let streams: Vec<&str> = c.streams.iter().map(|s| s.as_str()).collect();
                    println!(
                        "{:<12} {:<12} {:<12} {:<36} {:<19}",
                        c.gateway,
                        c.client,
                        rights.join(","),
                        streams.join(","),
                        since(c.connected_at_ms)
                    );
                }
                println!("{} clients of {tenant}", clients.len());
                Ok(())
            }
        }
    };
    // Our clone of the client must go first: the session ends when the last one does.
    drop(client);
    session.close().await;
    result.map(|()| ExitCode::SUCCESS)
}
