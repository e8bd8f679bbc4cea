//! `scripts/bench jobs`: on-demand job start, registration storm and takeover, on a private
//! ZooKeeper, the broker, a gateway and two `clickpulse engine` processes, with the real MSNBC
//! data. Prints one JSON object as its last line:
//! `{"starts", "start_to_first_result_ms_p50", "start_to_first_result_ms_p99",
//!   "registrations_per_sec", "takeover_ms"}`.
//!
//! - start: from a browser opening its WebSocket (authentication and registration in ZooKeeper
//!   included) to the first result it receives, for a tenant nobody watched: the engine claims
//!   the tenant, seeks one window back and backfills it, the result crosses ZeroMQ and the
//!   gateway. Engines start jobs `--from window`.
//! - registrations: a storm of 5,000 clients of one gateway, until ZooKeeper holds all 5,000.
//! - takeover: kill -9 of the engine owning a watched tenant, to the first result of the new
//!   owner at the client (session timeout 3 s).
#![allow(clippy::unwrap_used)] // a benchmark that cannot run should stop loudly
#![forbid(unsafe_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use clickpulse_protocol::Tenant;
use clickpulse_tests::unique_name;
use common::*;
use futures_util::{StreamExt, stream};

const TENANTS: usize = 60;
/// Users of the dataset replayed (of 989,818): a few thousand events per tenant.
const USERS: u64 = 200_000;
const STORM: usize = 5_000;
const TAKEOVERS: usize = 3;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench());
}

async fn bench() {
    let cluster = Cluster::start().await;
    let tenants: Vec<Tenant> = (0..TENANTS)
        .map(|i| Tenant::new(unique_name(&format!("b{i}"))).unwrap())
        .collect();
    let replay_started = Instant::now();
    let summary = cluster.replay_dataset(&tenants, Some(USERS));
    eprintln!(
        "replayed {} events of {USERS} users into {TENANTS} tenants in {:.1?}",
        summary.events,
        replay_started.elapsed()
    );

    let (gw, _gw_stop) = cluster.gateway("gw-bench").await;
    let mut engines = [
        cluster.engine_process_from("engine-a", 0.2, "window"),
        cluster.engine_process_from("engine-b", 0.2, "window"),
    ];
    let client = cluster.session.client().unwrap();
    let registered = clickpulse_tests::eventually(Duration::from_secs(30), || async {
        client
            .list_children(&cluster.layout.engines())
            .await
            .is_ok_and(|e| e.len() == 2)
    })
    .await;
    assert!(registered, "engines did not register");

    // Starts: one tenant after another, each watched by one fresh browser.
    let mut starts = Vec::new();
    for t in &tenants {
        let started = Instant::now();
        let mut ws = viewer(&gw, t, r#""pageviews","window","topn","sessions","totals""#).await;
        match next_result(&mut ws, Duration::from_secs(30)).await {
            Some(_) => {
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                if ms > 500.0 {
                    eprintln!("start {} ({t}) took {ms:.0} ms", starts.len());
                }
                starts.push(ms);
            }
            None => eprintln!("no result for {t} within 30 s"),
        }
    }
    starts.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&starts, 50.0), percentile(&starts, 99.0));
    eprintln!(
        "{} starts: p50 {p50:.0} ms, p99 {p99:.0} ms, max {:.0} ms",
        starts.len(),
        starts.last().copied().unwrap_or(0.0)
    );

    // Where the start time goes, from the engines' own logs.
    for (what, key) in [
        ("seek", "seek_ms="),
        ("  of which newest records", "newest_ms="),
        ("  of which offset search", "search_ms="),
        ("first result after claim", "ms_since_start="),
    ] {
        let mut ms: Vec<f64> = engines
            .iter()
            .flat_map(|e| {
                let text = std::fs::read_to_string(e.log_path()).unwrap_or_default();
                text.lines()
                    .filter_map(|l| {
                        let v = l.split(key).nth(1)?.split_whitespace().next()?;
                        v.parse::<f64>().ok()
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        if !ms.is_empty() {
            eprintln!(
                "  {what}: p50 {:.0} ms, p99 {:.0} ms (engine logs, {} jobs)",
                percentile(&ms, 50.0),
                percentile(&ms, 99.0),
                ms.len()
            );
        }
    }

    // Registration storm: 5,000 browsers of one tenant on one gateway.
    let storm_tenant = &tenants[0];
    let before = cluster.clients(storm_tenant).await;
    let storm_started = Instant::now();
    let upgrades: Vec<(f64, Ws)> = stream::iter(0..STORM)
        .map(|_| {
            let url = format!("ws://{}/ws?token={}", gw.http_addr, token(storm_tenant));
            async move {
                let started = Instant::now();
                let ws = tokio_tungstenite::connect_async(url).await;
                ws.map(|(ws, _)| (started.elapsed().as_secs_f64() * 1000.0, ws))
            }
        })
        .buffer_unordered(256)
        .filter_map(|r| async move { r.ok() })
        .collect()
        .await;
    // Each upgrade's own time: a handshake the kernel dropped (a full accept queue) shows as
    // one of about a second, the browser's first SYN retransmission.
    let mut upgrade_ms: Vec<f64> = upgrades.iter().map(|(ms, _)| *ms).collect();
    upgrade_ms.sort_by(f64::total_cmp);
    eprintln!(
        "storm upgrades: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (256 at once)",
        percentile(&upgrade_ms, 50.0),
        percentile(&upgrade_ms, 99.0),
        upgrade_ms.last().copied().unwrap_or(0.0)
    );
    let sockets: Vec<Ws> = upgrades.into_iter().map(|(_, ws)| ws).collect();
    let all = clickpulse_tests::eventually(Duration::from_secs(60), || async {
        cluster.clients(storm_tenant).await >= before + STORM
    })
    .await;
    let storm_secs = storm_started.elapsed().as_secs_f64();
    assert!(
        all,
        "only {} of {STORM} storm clients registered",
        sockets.len()
    );
    let registrations_per_sec = STORM as f64 / storm_secs;
    eprintln!("{STORM} registrations in {storm_secs:.2} s: {registrations_per_sec:.0}/s");
    drop(sockets);

    // Takeover: kill -9 the owner of a watched tenant; time to the new owner's first result.
    let mut takeovers = Vec::new();
    let watched = &tenants[1];
    let mut ws = viewer(&gw, watched, r#""pageviews","window","totals""#).await;
    assert!(
        next_result(&mut ws, Duration::from_secs(30))
            .await
            .is_some()
    );
    for round in 0..TAKEOVERS {
        // The viewer's first result can come from a job still lingering from the starts
        // phase, just before it stops and the viewer's own claim replaces it: wait for an owner.
        let deadline = Instant::now() + Duration::from_secs(30);
        let owner = loop {
            if let Some(owner) = cluster.owners().await.remove(watched) {
                break owner;
            }
            assert!(
                Instant::now() < deadline,
                "no owner of {watched} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let index = usize::from(owner.engine == "engine-b");
        let killed = Instant::now();
        engines[index].kill();
        let mut took = None;
        while let Some(r) = next_result(&mut ws, Duration::from_secs(30)).await {
            if r["epoch"].as_u64().is_some_and(|e| e > owner.epoch) {
                took = Some(killed.elapsed().as_secs_f64() * 1000.0);
                break;
            }
        }
        let took = took.expect("the survivor's results reached the client");
        eprintln!("takeover {round}: {took:.0} ms (from {})", owner.engine);
        takeovers.push(took);
        let id = if index == 0 { "engine-a" } else { "engine-b" };
        engines[index] = cluster.engine_process_from(id, 0.2, "window");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    takeovers.sort_by(f64::total_cmp);
    let takeover_ms = percentile(&takeovers, 50.0);

    println!(
        "{}",
        serde_json::json!({
            "starts": starts.len(),
            "start_to_first_result_ms_p50": (p50 * 10.0).round() / 10.0,
            "start_to_first_result_ms_p99": (p99 * 10.0).round() / 10.0,
            "registrations_per_sec": registrations_per_sec.round(),
            "takeover_ms": takeover_ms.round(),
        })
    );
}
