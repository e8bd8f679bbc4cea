//! The gateway's registrations in a real ZooKeeper: itself, and each client while it is
//! connected.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test helper is that test failing

use std::time::Duration;

use clickpulse_cluster::{ZkConfig, zk};
use clickpulse_gateway::auth::{TokenKey, now_secs};
use clickpulse_gateway::{GatewayConfig, Limits, start};
use clickpulse_protocol::Tenant;
use clickpulse_protocol::results::Stream;
use clickpulse_protocol::zk::{ClientRegistration, GatewayInfo, Layout, Right};
use clickpulse_tests::{ZooKeeper, eventually, http_get, unique_name};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"a test secret of at least 32 bytes!!";

fn config(zookeeper: ZkConfig, layout: Layout) -> GatewayConfig {
    GatewayConfig {
        id: "gw-1".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        zmq_bind: "tcp://127.0.0.1:0".into(),
        zmq_advertise: None,
        secret: SECRET.to_vec(),
        limits: Limits::default(),
        zookeeper: Some(zookeeper),
        layout,
        web_dir: None,
    }
}

#[tokio::test]
async fn a_gateway_registers_itself_and_each_client_while_it_is_connected() {
    let zk = ZooKeeper::start().unwrap();
    let layout = Layout::new(&format!("/{}", unique_name("gw"))).unwrap();
    let shutdown = CancellationToken::new();
    let zookeeper = ZkConfig {
        connect: zk.connect_string().to_owned(),
        session_timeout: Duration::from_secs(4),
        connect_timeout: Duration::from_secs(10),
    };
    let gw = start(config(zookeeper, layout.clone()), shutdown.clone())
        .await
        .unwrap();
    let look = zk::Client::connect(zk.connect_string()).await.unwrap();
    let (data, stat) = look.get_data(&layout.gateway("gw-1")).await.unwrap();
    let info: GatewayInfo = serde_json::from_slice(&data).unwrap();
    assert_eq!(info.zmq_endpoint, gw.zmq_endpoint);
    assert_ne!(stat.ephemeral_owner, 0, "the gateway node is ephemeral");

    let acme = Tenant::new("acme").unwrap();
    let token = TokenKey::new(SECRET)
        .unwrap()
        .mint(&acme, "alice", &[Right::View], now_secs(), 60);
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}", gw.http_addr))
            .await
            .unwrap();
    let welcome: serde_json::Value = match ws.next().await.unwrap().unwrap() {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        other => panic!("{other:?}"),
    };
    let client = welcome["client"].as_str().unwrap().to_owned();
    let path = layout.client(&acme, "gw-1", &client);
    let (data, _) = look.get_data(&path).await.unwrap();
    let reg: ClientRegistration = serde_json::from_slice(&data).unwrap();
    assert_eq!(
        (reg.gateway.as_str(), reg.tenant.as_str()),
        ("gw-1", "acme")
    );
    assert_eq!(reg.rights, vec![Right::View]);

    // subscriptions show in the registration
    ws.send(Message::Text(
        r#"{"type":"subscribe","streams":["topn"]}"#.into(),
    ))
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let (data, _) = look.get_data(&path).await.unwrap();
            serde_json::from_slice::<ClientRegistration>(&data)
                .unwrap()
                .streams
                .len()
                == 1
        })
        .await
    );

    // A subscription in the upgrade request is in the registration from its first write.
    let (mut subscribed, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/ws?token={token}&streams=topn,sessions",
        gw.http_addr
    ))
    .await
    .unwrap();
    let welcome: serde_json::Value = match subscribed.next().await.unwrap().unwrap() {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
        other => panic!("{other:?}"),
    };
    let path_2 = layout.client(&acme, "gw-1", welcome["client"].as_str().unwrap());
    let (data, stat) = look.get_data(&path_2).await.unwrap();
    let reg: ClientRegistration = serde_json::from_slice(&data).unwrap();
    assert_eq!(reg.streams, vec![Stream::TopN, Stream::Sessions]);
    assert_eq!(
        stat.version, 0,
        "written once, not created and then updated"
    );
    subscribed.close(None).await.unwrap();

    // The upgrade completes only once the client is registered: its 101 and its welcome
    // come in one send, so in one read here.
    let mut raw = tokio::net::TcpStream::connect(gw.http_addr).await.unwrap();
    let request = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    raw.write_all(request.as_bytes()).await.unwrap();
    let mut got = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut got))
        .await
        .unwrap()
        .unwrap();
    let got = String::from_utf8_lossy(&got[..n]).into_owned();
    assert!(got.starts_with("HTTP/1.1 101 "), "{got}");
    let client_3 = got
        .split_once(r#""client":""#)
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(client, _)| client.to_owned())
        .unwrap_or_else(|| panic!("no welcome with the 101: {got:?}"));
    assert!(
        look.check_stat(&layout.client(&acme, "gw-1", &client_3))
            .await
            .unwrap()
            .is_some(),
        "registered before the upgrade completed"
    );
    drop(raw);

    // leaving removes it
    ws.close(None).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            look.check_stat(&path).await.unwrap().is_none()
        })
        .await
    );

    // shutdown removes the gateway too
    shutdown.cancel();
    gw.task.await.unwrap();
    assert!(
        look.check_stat(&layout.gateway("gw-1"))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn an_unreachable_zookeeper_stops_the_gateway_at_start_with_a_clear_error() {
    let port = clickpulse_tests::process::free_port().unwrap();
    let zookeeper = ZkConfig {
        connect: format!("127.0.0.1:{port}"),
        session_timeout: Duration::from_secs(4),
        connect_timeout: Duration::from_secs(2),
    };
    let err = start(
        config(zookeeper, Layout::default()),
        CancellationToken::new(),
    )
    .await
    .err()
    .unwrap();
    assert!(err.to_string().contains("cannot reach ZooKeeper"), "{err}");
}

#[tokio::test]
async fn the_cluster_view_is_served_to_admins_only() {
    let zk = ZooKeeper::start().unwrap();
    let layout = Layout::new(&format!("/{}", unique_name("admin"))).unwrap();
    let zookeeper = ZkConfig {
        connect: zk.connect_string().to_owned(),
        session_timeout: Duration::from_secs(4),
        connect_timeout: Duration::from_secs(10),
    };
    let shutdown = CancellationToken::new();
    let gw = start(config(zookeeper, layout), shutdown.clone())
        .await
        .unwrap();
    let key = TokenKey::new(SECRET).unwrap();
    let acme = Tenant::new("acme").unwrap();
    let viewer = key.mint(&acme, "v", &[Right::View], now_secs(), 60);
    let admin = key.mint(&acme, "a", &[Right::View, Right::Admin], now_secs(), 60);

    assert_eq!(
        http_get(gw.http_addr, "/admin/cluster", "")
            .await
            .unwrap()
            .0,
        401
    );
    assert_eq!(
        http_get(gw.http_addr, &format!("/admin/cluster?token={viewer}"), "")
            .await
            .unwrap()
            .0,
        403
    );
    let (status, body) = http_get(
        gw.http_addr,
        "/admin/cluster",
        &format!("Authorization: Bearer {admin}\r\n"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(view["gateways"][0]["id"], "gw-1");
    assert_eq!(
        view["gateways"][0]["zmq_endpoint"],
        gw.zmq_endpoint.as_str()
    );
    shutdown.cancel();
    gw.task.await.unwrap();
}
