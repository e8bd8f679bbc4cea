//! The dashboard end to end in a real browser: ZooKeeper, the broker, an engine process, a
//! gateway serving the built dashboard and a live replay of the MSNBC data; Debian chromium
//! driven by `web/e2e/dashboard.e2e.mjs` (playwright-core). What the browser shows is checked
//! against the engine's durable output, `results.<tenant>`. Screenshots go to `target/e2e/`.
//! Needs `scripts/setup --test` (chromium, the dashboard's npm packages and build).
#![allow(clippy::unwrap_used)] // a failed unwrap in a test helper is that test failing

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clickpulse_protocol::Tenant;
use clickpulse_protocol::zk::Right;
use clickpulse_replay::{ProgressMode, ReplayConfig, Source, Speed};
use common::{Cluster, repo, token, token_with};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The browser script, stopped when the test ends however it ends: its stdin (held by the
/// test) is closed first, which stops it at its next checkpoint and closes Chromium; if it
/// has not ended within a while it is killed.
struct Script(Child);

impl Drop for Script {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The browser script's next report, within `limit`; on anything else, the engine's log is
/// shown with the failure.
fn event(rx: &mpsc::Receiver<Value>, name: &str, limit: Duration, engine_log: &Path) -> Value {
    let v = rx.recv_timeout(limit).ok();
    if v.as_ref().is_none_or(|v| v["event"] != name) {
        let log = std::fs::read_to_string(engine_log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("engine log (last lines):");
        for line in tail.iter().rev() {
            eprintln!("  {line}");
        }
    }
    let v = v.unwrap_or_else(|| panic!("no {name:?} from the browser within {limit:?}"));
    assert_eq!(v["event"], name, "the browser reported {v}");
    v
}

/// The window results of `results.<tenant>` by (epoch, seq), read from the start until all of
/// `wanted` are found or 60 s pass.
fn results_in_kafka(
    brokers: &str,
    topic: &str,
    wanted: &[(u64, u64)],
) -> HashMap<(u64, u64), Value> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", clickpulse_tests::unique_name("e2e-results"))
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&list).unwrap();
    let mut found = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline && !wanted.iter().all(|k| found.contains_key(k)) {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.unwrap();
        if message.key() != Some(&b"window"[..]) {
            continue;
        }
        let result: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
        let key = (
            result["epoch"].as_u64().unwrap(),
            result["seq"].as_u64().unwrap(),
        );
        found.insert(key, result);
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_tenant_data_and_the_ops_view_follows_jobs() {
    let web = repo().join("web");
    assert!(
        web.join("dist/index.html").is_file() && web.join("node_modules/playwright-core").is_dir(),
        "the dashboard is not built: run scripts/setup --test"
    );
    let cluster = Cluster::start().await;
    let (acme, globex) = (Tenant::new("acme").unwrap(), Tenant::new("globex").unwrap());

    // The real data, live: 120x event time from now, so results keep coming.
    let stop_replay = CancellationToken::new();
    let replay = {
        let mut config = ReplayConfig::new(
            Source::File(repo().join("data/msnbc990928.seq.gz")),
            cluster.broker.bootstrap(),
            vec![acme.clone(), globex.clone()],
        );
        config.speed = Speed::Factor(120.0);
        config.t0_ms = clickpulse_protocol::zk::now_ms();
        config.progress = ProgressMode::Quiet;
        let stop = stop_replay.clone();
        std::thread::spawn(move || clickpulse_replay::run(&config, &stop))
    };
    let (gw, _gw_stop) = cluster
        .gateway_serving("gw-e2e", Some(web.join("dist")))
        .await;
    let engine = cluster.engine_process_from("engine-e2e", 2.0, "window");
    let log = engine.log_path().to_owned();

    let out_dir = repo().join("target/e2e");
    let mut browser = Script(
        Command::new("node")
            .arg(web.join("e2e/dashboard.e2e.mjs"))
            .current_dir(&web)
            .env("CLICKPULSE_E2E_URL", format!("http://{}", gw.http_addr))
            .env("CLICKPULSE_E2E_ACME", token(&acme))
            .env("CLICKPULSE_E2E_GLOBEX", token(&globex))
            .env(
                "CLICKPULSE_E2E_ADMIN",
                token_with(&acme, &[Right::View, Right::Admin]),
            )
            .env("CLICKPULSE_E2E_OUT", &out_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs (scripts/setup installs it)"),
    );
    let mut to_browser = browser.0.stdin.take().unwrap();
    let (events_tx, events) = mpsc::channel();
    let stdout = browser.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("browser: {line}");
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = events_tx.send(v);
            }
        }
    });
    let mut go = || writeln!(to_browser, "go").and_then(|_| to_browser.flush());

    // 1. acme's charts filled and changed; every number shown is one the engine sent.
    let shown = event(&events, "acme", Duration::from_secs(150), &log);
    assert_eq!(shown["tenant"], "acme");
    assert_eq!(
        shown["tokenInUrl"], false,
        "the token stays in the address bar"
    );
    assert!(
        shown["overflow"].as_i64().unwrap() <= 0,
        "wider than a phone: {shown}"
    );
    let samples = shown["samples"].as_array().unwrap();
    assert!(
        samples.len() >= 2,
        "the window total never changed: {shown}"
    );
    // What the engine computed is in results.acme, its durable record: every number shown
    // is there. (A WebSocket tap would not do: under load the gateway rightly conflates a
    // slow client's updates, so it may skip the very result the browser showed.)
    let wanted: Vec<(u64, u64)> = samples
        .iter()
        .map(|s| (s["epoch"].as_u64().unwrap(), s["seq"].as_u64().unwrap()))
        .collect();
    let computed = {
        let (brokers, topic) = (
            cluster.broker.bootstrap().to_owned(),
            clickpulse_protocol::topics::results(&acme),
        );
        tokio::task::spawn_blocking(move || results_in_kafka(&brokers, &topic, &wanted))
            .await
            .unwrap()
    };
    for s in samples {
        let key = (s["epoch"].as_u64().unwrap(), s["seq"].as_u64().unwrap());
        let from_engine = computed.get(&key).unwrap_or_else(|| {
            panic!(
                "shown {s} is not in results.acme ({} results read)",
                computed.len()
            )
        });
        let views: u64 = from_engine["data"]["pages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["views"].as_u64().unwrap())
            .sum();
        assert_eq!(s["views"].as_u64(), Some(views), "{s} vs {from_engine}");
        assert_eq!(s["window_start_ms"], from_engine["window_start_ms"]);
        assert!(views > 0);
    }
    go().unwrap();

    // 2. A second tab opened while the job runs gets the first one's chart at once: the
    //    recent page-view ticks come as snapshots (one, the latest, before they were kept).
    //    The snapshots drain at the tab's rate cap, and ticks the job makes meanwhile take
    //    the place of the oldest unsent ones (a run measured 260 snapshots and 40 live ticks
    //    for 300 points), so the snapshots need to be at least half of the chart, not all of it.
    let tabs = event(&events, "second-tab", Duration::from_secs(60), &log);
    let count = |tab: &str, what: &str| tabs[tab][what].as_u64().unwrap();
    let first = count("first", "points");
    assert!(
        first >= 50,
        "the first tab's chart is too short to compare: {tabs}"
    );
    assert!(
        count("second", "points") + 10 >= first,
        "the second tab's chart is shorter than the first one's: {tabs}"
    );
    assert!(
        count("second", "snapshots") * 2 >= first,
        "the second tab's chart did not come as snapshots: {tabs}"
    );

    // 3. Each tab only ever received its own tenant's results.
    let tabs = event(&events, "globex", Duration::from_secs(90), &log);
    assert_eq!(tabs["tenant"], "globex");
    assert_eq!(tabs["globexSaw"], "globex");
    assert_eq!(tabs["acmeSaw"], "acme");

    // 4. The ops view shows both jobs running, owned by the engine.
    let ops = event(&events, "ops", Duration::from_secs(60), &log);
    let rows = ops["jobs"].as_array().unwrap();
    let acme_row = rows.iter().find(|r| r[0] == "acme").expect("an acme row");
    assert_eq!(acme_row[1], "running");
    assert_eq!(acme_row[2], "engine-e2e");
    go().unwrap();

    // 5. All acme tabs closed: the job stops after the linger; globex's goes on.
    let stopped = event(&events, "acme-stopped", Duration::from_secs(90), &log);
    assert!(
        stopped["after_ms"].as_u64().unwrap() >= 2_000,
        "stopped before the linger: {stopped}"
    );
    assert_eq!(stopped["globexState"], "running");
    assert_eq!(stopped["problems"], serde_json::json!([]), "page errors");
    let owners = cluster.owners().await;
    assert!(!owners.contains_key(&acme), "acme still owned: {owners:?}");
    assert!(owners.contains_key(&globex), "globex stopped: {owners:?}");
    assert_eq!(cluster.clients(&acme).await, 0);

    let status = browser.0.wait().unwrap();
    assert!(status.success(), "the browser script failed: {status}");
    for shot in ["dashboard.png", "dashboard-phone.png", "ops.png"] {
        let len = std::fs::metadata(out_dir.join(shot)).map_or(0, |m| m.len());
        assert!(len > 10_000, "{shot}: {len} bytes");
    }
    stop_replay.cancel();
    replay.join().unwrap().unwrap();
}
