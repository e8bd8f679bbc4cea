//! `clickpulse zk …` against a real ZooKeeper holding registrations.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test helper is that test failing

use std::process::Command;
use std::time::Duration;

use clickpulse_cluster::{ZkConfig, ZkSession};
use clickpulse_protocol::Tenant;
use clickpulse_protocol::results::Stream;
use clickpulse_protocol::zk::{ClientRegistration, GatewayInfo, Layout, Right};
use clickpulse_tests::{ZooKeeper, unique_name};
use tokio_util::sync::CancellationToken;

fn zk_cli(zk: &ZooKeeper, root: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_clickpulse"))
        .args(["zk", "--zookeeper", zk.connect_string(), "--zk-root", root])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_jobs_and_clients_show_what_is_registered() {
    let zk = ZooKeeper::start().unwrap();
    let root = format!("/{}", unique_name("ops"));
    let layout = Layout::new(&root).unwrap();
    let session = ZkSession::connect(
        ZkConfig {
            connect: zk.connect_string().to_owned(),
            session_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
        },
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let acme = Tenant::new("acme").unwrap();
    let gateway = GatewayInfo {
        id: "gw-1".into(),
        zmq_endpoint: "tcp://127.0.0.1:7001".into(),
        http_addr: "127.0.0.1:8080".into(),
        started_at_ms: 0,
    };
    session
        .register(
            &layout.gateway("gw-1"),
            serde_json::to_vec(&gateway).unwrap(),
        )
        .await
        .unwrap();
    for c in ["c-1", "c-2"] {
        let reg = ClientRegistration {
            gateway: "gw-1".into(),
            client: c.into(),
            tenant: acme.clone(),
            rights: vec![Right::View],
            streams: vec![Stream::TopN],
            connected_at_ms: 938_476_800_000,
        };
        session
            .register(
                &layout.client(&acme, "gw-1", c),
                serde_json::to_vec(&reg).unwrap(),
            )
            .await
            .unwrap();
    }
    let root2 = root.clone();
    let out = tokio::task::spawn_blocking(move || {
        (
            zk_cli(&zk, &root2, &["tree"]),
            zk_cli(&zk, &root2, &["jobs"]),
            zk_cli(&zk, &root2, &["clients", "--tenant", "acme", "--json"]),
            zk_cli(&zk, &root2, &["jobs", "--json"]),
        )
    })
    .await
    .unwrap();
    let ((ok, tree, err), (ok2, jobs, _), (ok3, clients, _), (ok4, jobs_json, _)) = out;
    assert!(ok && ok2 && ok3 && ok4, "{err}");
    let session_hex = format!("{:#x}", session.session_id().unwrap());
    assert!(
        tree.contains(&format!("gw-1  EPHEMERAL owner={session_hex}")),
        "{tree}"
    );
    assert!(tree.contains("gw-1.c-2  EPHEMERAL"), "{tree}");
    assert!(tree.contains("clients  (2 children)"), "{tree}");
    assert!(tree.trim_end().ends_with("3 ephemeral"), "{tree}");
    let acme_line = jobs.lines().find(|l| l.starts_with("acme")).unwrap();
    let fields: Vec<&str> = acme_line.split_whitespace().collect();
    assert_eq!(&fields[..5], ["acme", "waiting", "-", "-", "2"], "{jobs}");
    assert!(jobs.contains("1 gateways, 0 engines, 1 tenants"), "{jobs}");
    let clients: Vec<ClientRegistration> = serde_json::from_str(&clients).unwrap();
    assert_eq!(clients.len(), 2);
    let view: serde_json::Value = serde_json::from_str(&jobs_json).unwrap();
    assert_eq!(view["gateways"][0]["zmq_endpoint"], "tcp://127.0.0.1:7001");
    session.close().await;
}

#[test]
fn an_unreachable_zookeeper_is_a_clear_error() {
    let port = clickpulse_tests::process::free_port().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_clickpulse"))
        .args([
            "zk",
            "--zookeeper",
            &format!("127.0.0.1:{port}"),
            "--connect-timeout",
            "2",
            "jobs",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: cannot reach ZooKeeper"), "{stderr}");
}
