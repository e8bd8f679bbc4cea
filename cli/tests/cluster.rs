//! Job control end to end on real ZooKeeper and the real broker: browsers connect to a gateway,
//! engines start, spread, stop and take over tenant jobs, results reach the browsers.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test helper is that test failing

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use clickpulse_engine::JobState;
use clickpulse_protocol::Tenant;
use clickpulse_protocol::zk::now_ms;
use clickpulse_tests::{eventually, unique_name};
use common::*;

/// Whether, within 5 s, some job of `engine` satisfies `wanted`.
async fn job_reaches(
    engine: &clickpulse_engine::Engine,
    wanted: impl Fn(&clickpulse_engine::JobStatus) -> bool,
) -> bool {
    eventually(Duration::from_secs(5), || async {
        engine.status.borrow().iter().any(&wanted)
    })
    .await
}

fn tenant(prefix: &str) -> Tenant {
    Tenant::new(unique_name(prefix)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_client_starts_the_job_last_client_stops_it_after_the_linger() {
    let cluster = Cluster::start().await;
    let acme = tenant("acme");
    cluster.replay(std::slice::from_ref(&acme), 300);
    let (gw, _gw_stop) = cluster.gateway("gw-1").await;
    let linger = Duration::from_millis(2500);
    let (engine, engine_stop) = cluster
        .engine(cluster.engine_config("engine-a", linger))
        .await;

    // Nobody watches: no job.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(engine.status.borrow().is_empty());
    assert!(cluster.owners().await.is_empty());

    // The first viewer starts it, and results reach the viewer through the gateway.
    let mut ws = viewer(&gw, &acme, r#""totals""#).await;
    let first = next_result(&mut ws, Duration::from_secs(30))
        .await
        .expect("a result reaches the client");
    assert_eq!(first["tenant"], acme.as_str());
    assert_eq!(first["epoch"], 1);
    let owner = cluster.owners().await.remove(&acme).unwrap();
    assert_eq!((owner.engine.as_str(), owner.epoch), ("engine-a", 1));
    assert!(job_reaches(&engine, |j| j.state == JobState::Running).await);

    // Gone and back within the linger: the same job goes on (same epoch, never idle).
    drop(ws);
    assert!(
        job_reaches(&engine, |j| j.state == JobState::Lingering).await,
        "the job lingers once its last client left"
    );
    let mut ws = viewer(&gw, &acme, r#""totals""#).await;
    let snapshot = next_result(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(snapshot["epoch"], 1);
    assert!(job_reaches(&engine, |j| j.state == JobState::Running && j.epoch == 1).await);
    assert_eq!(cluster.owners().await[&acme].epoch, 1, "no restart");

    // Last client gone: stopped after the linger, not before; owner node gone.
    drop(ws);
    let left = Instant::now();
    assert!(
        eventually(Duration::from_secs(15), || async {
            cluster.owners().await.is_empty()
        })
        .await,
        "the owner node goes after the linger"
    );
    let after = left.elapsed();
    assert!(
        after >= linger,
        "stopped after {after:?}, before the linger"
    );
    assert!(engine.status.borrow().is_empty());

    // A new viewer starts a new job with a higher epoch. Reading from the earliest offsets,
    // it resumes the stopped job's last checkpoint: the same run, nothing new to compute, and
    // the viewer gets the gateway's last value of that run.
    let mut ws = viewer(&gw, &acme, r#""totals""#).await;
    let snapshot = next_result(&mut ws, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (snapshot["epoch"].as_u64(), snapshot["run"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(
        job_reaches(&engine, |j| j.state == JobState::Running && j.epoch == 2).await,
        "the resumed job is live once it has read to the end"
    );
    assert_eq!(cluster.owners().await[&acme].epoch, 2);

    // Graceful shutdown hands the job off at once: the owner node goes without expiry.
    engine_stop.cancel();
    engine.task.await.unwrap();
    assert!(cluster.owners().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_spread_over_two_engines_and_move_to_the_survivor_of_a_kill_9() {
    let cluster = Cluster::start().await;
    let tenants: Vec<Tenant> = (0..12).map(|i| tenant(&format!("t{i}"))).collect();
    cluster.replay(&tenants, 600);
    let (gw, _gw_stop) = cluster.gateway("gw-1").await;
    let mut a = cluster.engine_process("engine-a", 1.0);
    let mut b = cluster.engine_process("engine-b", 1.0);
    assert!(
        eventually(Duration::from_secs(30), || async {
            let c = cluster.session.client().unwrap();
            c.list_children(&cluster.layout.engines())
                .await
                .is_ok_and(|e| e.len() == 2)
        })
        .await,
        "both engines register"
    );

    // Clients for all 12 tenants, one after another as browsers would come.
    let mut viewers = Vec::new();
    for t in &tenants {
        viewers.push(viewer(&gw, t, r#""totals""#).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for ws in &mut viewers {
        assert!(
            next_result(ws, Duration::from_secs(60)).await.is_some(),
            "no result; gateway: {:?}; engine logs:\n{}\n{}",
            clickpulse_tests::http_get(gw.http_addr, "/metrics", "").await,
            a.log_tail(300000)
                .lines()
                .filter(|l| !l.contains("job state"))
                .take(40)
                .collect::<Vec<_>>()
                .join("\n"),
            b.log_tail(3000)
        );
    }
    let owners = cluster.owners().await;
    assert_eq!(owners.len(), 12);
    let on_a = owners.values().filter(|o| o.engine == "engine-a").count();
    assert!(
        (4..=8).contains(&on_a),
        "jobs split {on_a}/{} between the engines",
        12 - on_a
    );
    let epochs_before: BTreeMap<Tenant, u64> =
        owners.iter().map(|(t, o)| (t.clone(), o.epoch)).collect();

    // kill -9 engine-a: the survivor has every job within the session timeout + 2 s.
    let killed_at = Instant::now();
    let killed_ms = now_ms();
    a.kill();
    let moved = eventually(SESSION_TIMEOUT + Duration::from_secs(2), || async {
        let o = cluster.owners().await;
        o.len() == 12 && o.values().all(|o| o.engine == "engine-b")
    })
    .await;
    let took = killed_at.elapsed();
    assert!(moved, "jobs not all on the survivor after {took:?}");
    let owners = cluster.owners().await;
    for (t, before) in &epochs_before {
        assert!(owners[t].epoch >= *before, "epoch of {t} went back");
    }
    for (t, o) in &owners {
        if epochs_before[t] != o.epoch {
            assert!(o.epoch > epochs_before[t]);
        }
    }
    // Results of the taken-over jobs reach their viewers, with the new epoch.
    for (ws, t) in viewers.iter_mut().zip(&tenants) {
        let want = owners[t].epoch;
        let mut seen = false;
        while let Some(r) = next_result(ws, Duration::from_secs(20)).await {
            if r["epoch"].as_u64() == Some(want) {
                seen = true;
                break;
            }
        }
        assert!(seen, "no result of epoch {want} for {t}");
    }

    // No two engines believed they owned one tenant at the same moment (their own reports).
    let mut events = ownership_events(a.log_path());
    events.extend(ownership_events(b.log_path()));
    assert!(events.iter().filter(|e| e.acquired).count() >= 12);
    let open_until = BTreeMap::from([
        ("engine-a".to_owned(), killed_ms),
        ("engine-b".to_owned(), now_ms()),
    ]);
    for (t, mut intervals) in beliefs(&events, &open_until) {
        intervals.sort_by_key(|i| i.2);
        for pair in intervals.windows(2) {
            assert!(
                pair[0].3 <= pair[1].2,
                "{t}: {:?} and {:?} overlap",
                pair[0],
                pair[1]
            );
            assert!(pair[0].1 < pair[1].1, "{t}: epochs must grow: {pair:?}");
        }
    }
    b.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_s_clients_vanish_and_their_job_stops_after_the_linger() {
    let cluster = Cluster::start().await;
    let acme = tenant("acme");
    cluster.replay(std::slice::from_ref(&acme), 100);
    let (engine, _engine_stop) = cluster
        .engine(cluster.engine_config("engine-a", Duration::from_secs(1)))
        .await;
    // The gateway as a process, so it can die without closing its session.
    let port = clickpulse_tests::process::free_port().unwrap();
    let mut gw = cluster.gateway_process("gw-doomed", port, 0);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let url = format!("ws://{addr}/ws?token={}", token(&acme));
    let (_ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            engine.status.borrow().iter().any(|j| j.tenant == acme)
        })
        .await,
        "the job starts for the gateway's client"
    );

    gw.kill();
    let killed = Instant::now();
    assert!(
        eventually(SESSION_TIMEOUT + Duration::from_secs(3), || async {
            cluster.clients(&acme).await == 0
        })
        .await,
        "the dead gateway's client nodes go with its session"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            cluster.owners().await.is_empty() && engine.status.borrow().is_empty()
        })
        .await,
        "the job stops after the linger"
    );
    assert!(killed.elapsed() >= Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_restarted_while_running_is_recovered_from_without_help() {
    let mut cluster = Cluster::start().await;
    let acme = tenant("acme");
    let globex = tenant("globex");
    cluster.replay(&[acme.clone(), globex.clone()], 100);
    let (gw, _gw_stop) = cluster.gateway("gw-1").await;
    let (engine, _engine_stop) = cluster
        .engine(cluster.engine_config("engine-a", Duration::from_secs(1)))
        .await;
    let mut ws = viewer(&gw, &acme, r#""totals""#).await;
    assert!(
        next_result(&mut ws, Duration::from_secs(30))
            .await
            .is_some()
    );

    cluster.zk.restart().unwrap();

    // Both sides are back: a new tenant's viewer starts a job and gets results.
    let mut ws2 = viewer(&gw, &globex, r#""totals""#).await;
    assert!(
        next_result(&mut ws2, Duration::from_secs(40))
            .await
            .is_some(),
        "a job starts after the restart"
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            let o = cluster.owners().await;
            o.contains_key(&acme) && o.contains_key(&globex)
        })
        .await,
        "both tenants are owned after the restart"
    );
    // The engine publishes its status after a reconciliation, which can end after the owner
    // node it wrote is seen.
    assert!(
        eventually(Duration::from_secs(10), || async {
            engine.status.borrow().len() == 2
        })
        .await,
        "the engine runs both jobs: {:?}",
        *engine.status.borrow()
    );
}

#[test]
fn an_unreachable_zookeeper_stops_the_engine_at_start_with_a_clear_error() {
    let port = clickpulse_tests::process::free_port().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_clickpulse"))
        .args([
            "engine",
            "--zookeeper",
            &format!("127.0.0.1:{port}"),
            "--zk-connect-timeout",
            "2",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "bounded retries"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach ZooKeeper"),
        "unclear error: {stderr}"
    );
}
