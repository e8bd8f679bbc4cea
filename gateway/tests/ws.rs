//! The gateway as a browser and an engine see it: a real WebSocket client, a real ZeroMQ PUSH.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test helper is that test failing

use std::time::Duration;

use clickpulse_gateway::auth::{TokenKey, now_secs};
use clickpulse_gateway::{GatewayConfig, Limits, Running, start};
use clickpulse_protocol::Tenant;
use clickpulse_protocol::results::{PageCount, ResultBody, ResultMsg};
use clickpulse_protocol::ws::CloseCode;
use clickpulse_protocol::zk::Right;
use clickpulse_protocol::zmq::ResultFrame;
use clickpulse_tests::http_get;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;
use zeromq::{PushSocket, Socket, SocketSend, ZmqMessage};

const SECRET: &[u8] = b"a test secret of at least 32 bytes!!";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn gateway(limits: Limits) -> (Running, CancellationToken) {
    let shutdown = CancellationToken::new();
    let running = start(
        GatewayConfig {
            id: "gw-test".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            zmq_bind: "tcp://127.0.0.1:0".into(),
            zmq_advertise: None,
            secret: SECRET.to_vec(),
            limits,
            zookeeper: None,
            layout: Default::default(),
            web_dir: None,
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    (running, shutdown)
}

fn token(tenant: &str, rights: &[Right], ttl: i64) -> String {
    TokenKey::new(SECRET).unwrap().mint(
        &Tenant::new(tenant).unwrap(),
        "test",
        rights,
        now_secs(),
        ttl,
    )
}

async fn connect(gw: &Running, token: &str) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let url = format!("ws://{}/ws?token={token}", gw.http_addr);
    tokio_tungstenite::connect_async(url)
        .await
        .map(|(ws, _)| ws)
}

/// A connected socket with a valid view token of `tenant` (the welcome not yet read).
async fn viewer(gw: &Running, tenant: &str) -> Ws {
    connect(gw, &token(tenant, &[Right::View], 60))
        .await
        .unwrap()
}

fn status_of(err: tokio_tungstenite::tungstenite::Error) -> u16 {
    match err {
        tokio_tungstenite::tungstenite::Error::Http(response) => response.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

/// The next JSON text message, within a bound.
async fn next_json(ws: &mut Ws) -> serde_json::Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message within 5 s")
            .expect("socket open")
            .unwrap();
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

/// The code of the close frame that ends the socket (within 5 s), skipping other messages.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        if let Message::Close(Some(frame)) = msg {
            return Some(u16::from(frame.code));
        }
    }
    None
}

async fn engine(gw: &Running) -> PushSocket {
    let mut push = PushSocket::new();
    push.connect(&gw.zmq_endpoint).await.unwrap();
    push
}

fn result(tenant: &str, epoch: u64, seq: u64, views: u64) -> ResultMsg {
    ResultMsg {
        tenant: Tenant::new(tenant).unwrap(),
        epoch,
        run: epoch,
        seq,
        window_start_ms: 0,
        window_end_ms: 300_000,
        watermark_ms: 300_000,
        body: ResultBody::TopN {
            n: 10,
            pages: vec![PageCount {
                page: "news".into(),
                views,
            }],
        },
    }
}

async fn push(socket: &mut PushSocket, msg: &ResultMsg) {
    let frames: Vec<bytes::Bytes> = ResultFrame::from_result(msg)
        .encode()
        .into_iter()
        .map(Into::into)
        .collect();
    socket
        .send(ZmqMessage::try_from(frames).unwrap())
        .await
        .unwrap();
}

async fn subscribe(ws: &mut Ws, streams: &str) {
    let msg = format!(r#"{{"type":"subscribe","streams":[{streams}]}}"#);
    ws.send(Message::Text(msg.into())).await.unwrap();
}

#[tokio::test]
async fn tokens_are_checked_before_the_upgrade() {
    let (gw, _stop) = gateway(Limits::default()).await;
    let url = format!("ws://{}/ws", gw.http_addr);
    assert_eq!(
        status_of(tokio_tungstenite::connect_async(url).await.unwrap_err()),
        401,
        "no token"
    );
    let other = TokenKey::new(&[7u8; 32]).unwrap().mint(
        &Tenant::new("acme").unwrap(),
        "x",
        &[Right::View],
        now_secs(),
        60,
    );
    assert_eq!(
        status_of(connect(&gw, &other).await.unwrap_err()),
        401,
        "bad signature"
    );
    assert_eq!(
        status_of(
            connect(&gw, &token("acme", &[Right::View], -5))
                .await
                .unwrap_err()
        ),
        401,
        "expired"
    );
    assert_eq!(
        status_of(connect(&gw, &token("acme", &[], 60)).await.unwrap_err()),
        401,
        "no view right"
    );
    assert_eq!(
        gw.state
            .metrics
            .auth_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    // and the subprotocol header works like the query parameter
    let mut request = format!("ws://{}/ws", gw.http_addr)
        .into_client_request()
        .unwrap();
    let value = format!("clickpulse.v1, {}", token("acme", &[Right::View], 60));
    request
        .headers_mut()
        .insert("sec-websocket-protocol", value.parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "clickpulse.v1"
    );
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
}

#[tokio::test]
async fn a_subscriber_gets_the_latest_result_at_once_then_live_ones_of_its_tenant_only() {
    let (gw, _stop) = gateway(Limits::default()).await;
    let mut engine = engine(&gw).await;
    push(&mut engine, &result("acme", 1, 1, 10)).await;
    push(&mut engine, &result("acme", 1, 2, 20)).await;
    push(&mut engine, &result("globex", 1, 1, 99)).await;

    let mut acme = viewer(&gw, "acme").await;
    let welcome = next_json(&mut acme).await;
    assert_eq!(
        (welcome["type"].as_str(), welcome["tenant"].as_str()),
        (Some("welcome"), Some("acme"))
    );
    // Results travel asynchronously from the PUSH socket: subscribe until the snapshot is there.
    let mut snapshot = serde_json::Value::Null;
    for _ in 0..50 {
        subscribe(&mut acme, r#""topn""#).await;
        match tokio::time::timeout(Duration::from_millis(100), acme.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                snapshot = serde_json::from_str(t.as_str()).unwrap();
                break;
            }
            _ => continue,
        }
    }
    assert_eq!(snapshot["snapshot"], true, "{snapshot}");
    assert_eq!(
        snapshot["result"]["seq"], 2,
        "the latest, not the first: {snapshot}"
    );
    assert_eq!(snapshot["result"]["data"]["pages"][0]["views"], 20);

    let mut globex = viewer(&gw, "globex").await;
    next_json(&mut globex).await;
    subscribe(&mut globex, r#""topn""#).await;
    assert_eq!(next_json(&mut globex).await["result"]["tenant"], "globex");

    push(&mut engine, &result("acme", 1, 2, 777)).await; // duplicate: dropped
    push(&mut engine, &result("acme", 1, 3, 30)).await;
    let live = next_json(&mut acme).await;
    assert_eq!(
        (live["snapshot"].as_bool(), live["result"]["seq"].as_u64()),
        (Some(false), Some(3))
    );
    push(&mut engine, &result("globex", 1, 2, 5)).await;
    assert_eq!(next_json(&mut globex).await["result"]["seq"], 2);
    // acme saw nothing of globex's
    assert!(
        tokio::time::timeout(Duration::from_millis(300), acme.next())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_subscription_in_the_upgrade_request_gets_its_snapshot_right_after_the_welcome() {
    let (gw, _stop) = gateway(Limits::default()).await;
    let mut engine = engine(&gw).await;
    push(&mut engine, &result("acme", 1, 1, 10)).await;
    push(&mut engine, &result("acme", 1, 2, 20)).await;
    let accepted = || {
        gw.hub
            .stats
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let start = std::time::Instant::now();
    while accepted() < 2 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(accepted(), 2, "the gateway took both results");

    let token = token("acme", &[Right::View], 60);
    let at = |query: &str| format!("ws://{}/ws?token={token}&{query}", gw.http_addr);
    let (mut fresh, _) = tokio_tungstenite::connect_async(at("streams=topn"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut fresh).await["type"], "welcome");
    // Nothing sent by the client: the snapshot comes by itself.
    let snapshot = next_json(&mut fresh).await;
    assert_eq!(
        (
            snapshot["snapshot"].as_bool(),
            snapshot["result"]["seq"].as_u64()
        ),
        (Some(true), Some(2)),
        "{snapshot}"
    );
    // A resuming client that had seq 2 gets no snapshot, then what is new.
    let (mut resumed, _) =
        tokio_tungstenite::connect_async(at("streams=window%2Ctopn&after=1:2&max_rate_hz=50"))
            .await
            .unwrap();
    assert_eq!(next_json(&mut resumed).await["type"], "welcome");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), resumed.next())
            .await
            .is_err(),
        "nothing at or before its position"
    );
    push(&mut engine, &result("acme", 1, 3, 30)).await;
    for ws in [&mut fresh, &mut resumed] {
        let live = next_json(ws).await;
        assert_eq!(
            (live["snapshot"].as_bool(), live["result"]["seq"].as_u64()),
            (Some(false), Some(3))
        );
    }
}

#[tokio::test]
async fn a_bad_subscription_in_the_upgrade_request_is_refused_with_400_after_the_token_check() {
    let (gw, _stop) = gateway(Limits::default()).await;
    let token = token("acme", &[Right::View], 60);
    for query in [
        "streams=topn,weather",
        "streams=topn&max_rate_hz=0",
        "streams=topn&after=yesterday",
        "after=1:2",
    ] {
        let url = format!("ws://{}/ws?token={token}&{query}", gw.http_addr);
        let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
        assert_eq!(status_of(err), 400, "{query}");
    }
    // The reason is in the body, for whoever writes the client.
    let url = format!("ws://{}/ws?token={token}&streams=weather", gw.http_addr);
    let body = match tokio_tungstenite::connect_async(url).await.unwrap_err() {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            String::from_utf8(response.into_body().unwrap_or_default()).unwrap()
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    };
    assert!(body.contains("unknown stream \\\"weather\\\""), "{body}");
    // Without a valid token, the query is not looked at.
    let url = format!("ws://{}/ws?token=forged&streams=weather", gw.http_addr);
    let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
    assert_eq!(status_of(err), 401);
    let metrics = gw.state.render_metrics();
    assert!(
        metrics.contains("clickpulse_gateway_bad_upgrades_total 5\n"),
        "{metrics}"
    );
    // and the gateway serves on
    let mut ws = viewer(&gw, "acme").await;
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
}

#[tokio::test]
async fn bad_frames_get_an_error_or_1009_and_other_clients_are_unaffected() {
    let (gw, _stop) = gateway(Limits {
        max_frame_bytes: 1024,
        ..Limits::default()
    })
    .await;
    let mut a = viewer(&gw, "acme").await;
    let mut b = viewer(&gw, "acme").await;
    next_json(&mut a).await;
    next_json(&mut b).await;
    a.send(Message::Text("not json".into())).await.unwrap();
    let err = next_json(&mut a).await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("bad_message"))
    );
    a.send(Message::Text(r#"{"type":"launch"}"#.into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut a).await["code"], "bad_message");
    a.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert_eq!(next_json(&mut a).await["code"], "binary_not_supported");
    a.send(Message::Text("x".repeat(4096).into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut a).await, Some(CloseCode::TooBig.code()));
    // b still works, and a frame many times the read buffer's size but under the limit is
    // read whole
    let padded = format!(
        r#"{{"type":"subscribe",{}"streams":["topn"]}}"#,
        " ".repeat(900)
    );
    b.send(Message::Text(padded.into())).await.unwrap();
    let mut engine = engine(&gw).await;
    push(&mut engine, &result("acme", 1, 1, 1)).await;
    assert_eq!(next_json(&mut b).await["result"]["seq"], 1);
}

#[tokio::test]
async fn shutdown_closes_clients_with_1001() {
    let (gw, stop) = gateway(Limits::default()).await;
    let mut ws = viewer(&gw, "acme").await;
    next_json(&mut ws).await;
    stop.cancel();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::GoingAway.code()));
    tokio::time::timeout(Duration::from_secs(5), gw.task)
        .await
        .expect("the gateway drains and stops")
        .unwrap();
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_its_memory_stays_bounded() {
    let slow = Duration::from_millis(500);
    let (gw, _stop) = gateway(Limits {
        slow_client_timeout: slow,
        ..Limits::default()
    })
    .await;
    let acme = Tenant::new("acme").unwrap();
    let mut stuck = viewer(&gw, "acme").await;
    next_json(&mut stuck).await;
    subscribe(&mut stuck, r#""topn""#).await;
    let start = std::time::Instant::now();
    while gw.hub.subscribers(&acme) == 0 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gw.hub.subscribers(&acme), 1);
    // Large results, far more than socket buffers hold, while the client reads nothing.
    let mut engine = engine(&gw).await;
    let big = "x".repeat(64 * 1024);
    let mut seq = 0;
    let start = std::time::Instant::now();
    while gw.hub.subscribers(&acme) > 0 && start.elapsed() < Duration::from_secs(15) {
        seq += 1;
        let mut msg = result("acme", 1, seq, seq);
        if let ResultBody::TopN { pages, .. } = &mut msg.body {
            pages[0].page = big.clone().into();
        }
        push(&mut engine, &msg).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        gw.hub.subscribers(&acme),
        0,
        "the stuck client was not cut off"
    );
    assert!(
        start.elapsed() < slow * 20,
        "cut off only after {:?}",
        start.elapsed()
    );
    // Everything it was sent before the cut is still readable; then the socket ends.
    let mut ended = false;
    while let Ok(next) = tokio::time::timeout(Duration::from_secs(5), stuck.next()).await {
        match next {
            None | Some(Err(_)) => {
                ended = true;
                break;
            }
            Some(Ok(Message::Close(frame))) => {
                assert_eq!(
                    frame.map(|f| u16::from(f.code)),
                    Some(CloseCode::SlowConsumer.code())
                );
                ended = true;
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    assert!(ended);
}

#[tokio::test]
async fn a_client_asking_for_a_max_rate_gets_at_most_that_rate_and_the_newest_values() {
    let (gw, _stop) = gateway(Limits::default()).await;
    let mut ws = viewer(&gw, "acme").await;
    next_json(&mut ws).await;
    ws.send(Message::Text(
        r#"{"type":"subscribe","streams":["topn"],"max_rate_hz":4}"#.into(),
    ))
    .await
    .unwrap();
    let mut engine = engine(&gw).await;
    // 100 results over about 1.5 s; at 4 Hz the client gets about 6 to 8 of them.
    let pusher = tokio::spawn(async move {
        for seq in 1..=100 {
            push(&mut engine, &result("acme", 1, seq, seq)).await;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        engine
    });
    // Read until the newest result arrives (bounded), then check the rate over that time.
    let mut seqs = Vec::new();
    let start = std::time::Instant::now();
    while seqs.last() != Some(&100) && start.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(100), ws.next()).await
        {
            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
            seqs.push(v["result"]["seq"].as_u64().unwrap());
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _engine = pusher.await.unwrap();
    assert_eq!(
        seqs.last(),
        Some(&100),
        "the newest value arrives: {seqs:?}"
    );
    let allowed = (elapsed * 4.0).ceil() as usize + 1;
    assert!(
        seqs.len() <= allowed,
        "{} results in {elapsed:.2} s at 4 Hz: {seqs:?}",
        seqs.len()
    );
    assert!(seqs.len() < 50, "not capped at all: {seqs:?}");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_for_idleness() {
    let limits = Limits {
        ping_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(1000),
        ..Limits::default()
    };
    let (gw, _stop) = gateway(limits).await;
    let mut silent = viewer(&gw, "acme").await;
    // Read nothing (so no pong goes back) for longer than the idle timeout. When the client
    // reads at last it answers the queued pings on a closed socket, so the gateway's own count
    // is what tells why it closed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let idle_closes = || {
        gw.state
            .metrics
            .idle_closes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(idle_closes(), 1);
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(2), silent.next()).await {}
    // A client that reads (and so answers pings) stays.
    let mut lively = viewer(&gw, "acme").await;
    let until = std::time::Instant::now() + Duration::from_millis(2500);
    while std::time::Instant::now() < until {
        if let Ok(Some(Ok(Message::Close(_)))) =
            tokio::time::timeout(Duration::from_millis(50), lively.next()).await
        {
            panic!("a client answering pings was closed");
        }
    }
    assert_eq!(idle_closes(), 1);
}

#[tokio::test]
async fn a_client_sending_faster_than_the_message_rate_is_closed_with_4003_and_others_are_not() {
    let (gw, _stop) = gateway(Limits {
        client_messages_per_sec: 10,
        client_message_burst: 5,
        ..Limits::default()
    })
    .await;
    let mut flood = viewer(&gw, "acme").await;
    let mut calm = viewer(&gw, "acme").await;
    next_json(&mut flood).await;
    next_json(&mut calm).await;
    // A burst's worth at once is fine: the client is still served.
    for _ in 0..5 {
        subscribe(&mut calm, r#""topn""#).await;
    }
    // A subscription change in a loop would be a ZooKeeper write each; 50 in a row is 45 over.
    for i in 0..50 {
        let msg = if i % 2 == 0 {
            r#"{"type":"subscribe","streams":["sessions"]}"#
        } else {
            r#"{"type":"unsubscribe","streams":["sessions"]}"#
        };
        if flood.send(Message::Text(msg.into())).await.is_err() {
            break;
        }
    }
    assert_eq!(
        close_code(&mut flood).await,
        Some(CloseCode::TooManyMessages.code())
    );
    let mut engine = engine(&gw).await;
    push(&mut engine, &result("acme", 1, 1, 1)).await;
    assert_eq!(next_json(&mut calm).await["result"]["seq"], 1);
    let metrics = gw.state.render_metrics();
    assert!(
        metrics.contains("clickpulse_gateway_closes_total{reason=\"too_many_messages\"} 1\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_that_reads_none_of_its_replies_is_cut_off_when_they_fill_its_buffers() {
    let (gw, _stop) = gateway(Limits {
        slow_client_timeout: Duration::from_millis(500),
        client_messages_per_sec: 1_000_000,
        client_message_burst: 1_000_000,
        ..Limits::default()
    })
    .await;
    // A small receive buffer, so that the replies fill it soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(gw.http_addr).await.unwrap();
    let url = format!(
        "ws://{}/ws?token={}",
        gw.http_addr,
        token("acme", &[Right::View], 60)
    );
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    // Not JSON, each answered with an error message; nothing is read. Once the gateway is
    // stuck sending a reply it reads no more either, and these sends block: they stop at
    // the first that fails (the gateway closed the socket) or when the test has its answer.
    let writer = tokio::spawn(async move {
        for _ in 0..2_000_000 {
            if ws.send(Message::Text("x".into())).await.is_err() {
                break;
            }
        }
    });
    let slow_closes = || {
        gw.state
            .metrics
            .slow_client_closes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let start = std::time::Instant::now();
    while slow_closes() == 0 && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writer.abort();
    assert_eq!(slow_closes(), 1, "still stuck after {:?}", start.elapsed());
    // Its place is given back (after the close frame's bounded wait).
    let connections = || {
        gw.state
            .metrics
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let start = std::time::Instant::now();
    while connections() > 0 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(connections(), 0);
}

#[tokio::test]
async fn a_connection_that_sends_no_request_in_time_is_closed() {
    let (gw, _stop) = gateway(Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Silent, half a request head, and kept alive after a request: each is closed.
    let silent = tokio::net::TcpStream::connect(gw.http_addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(gw.http_addr).await.unwrap();
    half.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut kept = tokio::net::TcpStream::connect(gw.http_addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let start = std::time::Instant::now();
    for (name, mut tcp) in [("silent", silent), ("half", half), ("kept", kept)] {
        let mut read = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut read)).await;
        assert!(
            ended.is_ok(),
            "the {name} connection was still open after 5 s"
        );
        if name == "kept" {
            assert!(read.starts_with(b"HTTP/1.1 200"), "{read:?}");
        }
    }
    assert!(start.elapsed() >= Duration::from_millis(300));
    // A client that does send its request in time is served.
    let mut ws = viewer(&gw, "acme").await;
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
}

#[tokio::test]
async fn connections_over_the_per_ip_limit_are_closed_with_4002() {
    let (gw, _stop) = gateway(Limits {
        max_connections_per_ip: 2,
        ..Limits::default()
    })
    .await;
    let mut a = viewer(&gw, "acme").await;
    let mut b = viewer(&gw, "acme").await;
    next_json(&mut a).await;
    next_json(&mut b).await;
    let mut c = viewer(&gw, "acme").await;
    assert_eq!(
        close_code(&mut c).await,
        Some(CloseCode::OverCapacity.code())
    );
    drop(a);
    // the place is given back when a client leaves
    let start = std::time::Instant::now();
    loop {
        let mut d = viewer(&gw, "acme").await;
        match tokio::time::timeout(Duration::from_secs(2), d.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => break,
            _ if start.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("no place after a client left: {other:?}"),
        }
    }
}

#[tokio::test]
async fn metrics_and_readiness_are_served() {
    let (gw, stop) = gateway(Limits::default()).await;
    assert_eq!(
        http_get(gw.http_addr, "/healthz", "").await.unwrap(),
        (200, "ok".into())
    );
    assert_eq!(http_get(gw.http_addr, "/readyz", "").await.unwrap().0, 200);
    let _ = connect(&gw, "forged").await;
    let mut ws = viewer(&gw, "acme").await;
    next_json(&mut ws).await;
    let (status, metrics) = http_get(gw.http_addr, "/metrics", "").await.unwrap();
    assert_eq!(status, 200);
    for line in [
        "clickpulse_gateway_connections 1",
        "clickpulse_gateway_auth_failures_total 1",
        "# TYPE clickpulse_gateway_results_dropped_total counter",
        "clickpulse_gateway_results_dropped_total{reason=\"stale_epoch\"} 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line:?} missing from:\n{metrics}"
        );
    }
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
}
