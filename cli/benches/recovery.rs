//! `scripts/bench recovery`: what exactly-once costs, for a tenant holding a full day of visitor
//! history (all 989,818 visitors of the MSNBC dataset, 4,698,794 views), on a private
//! ZooKeeper, the broker, a gateway and `clickpulse engine` processes (release build), jobs
//! reading from the earliest offsets. Five runs, each on its own copy of the data:
//!
//! 1. checkpoints off: the time for the job to read and compute the whole topic;
//! 2. checkpoints every 5 s: the same, plus each checkpoint's packed size and the time it took
//!    (from the engine's `checkpoint written` log lines);
//!
//!    each twice, off and on in turn, the faster run of each compared: one run of each
//!    differed by −5 to +15 % from one bench run to the next, more than checkpoints cost;
//! 3. checkpoints on, two engines, the owner killed with SIGKILL while it reads, halfway between
//!    two checkpoints (2.5 s after its first, or earlier if its run would end): the time from
//!    the kill until the viewer gets a result it had not had (the new owner resumed the newest
//!    checkpoint and caught up with where the dead one was). Session timeout 3 s.
//!
//! Last line: `{"state_bytes", "checkpoint_ms_p99", "throughput_cost_pct", "recovery_ms"}`
//! (`state_bytes`: the largest checkpoint's packed operator state).
#![allow(clippy::unwrap_used)] // a benchmark that cannot run should stop loudly
#![forbid(unsafe_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use clickpulse_protocol::Tenant;
use clickpulse_tests::process::Daemon;
use clickpulse_tests::unique_name;
use common::*;

/// The checkpoint interval of the runs with checkpoints (the engine's default).
const CHECKPOINT_S: &str = "5";

/// The whole topic must be read within this.
const RUN_LIMIT: Duration = Duration::from_secs(600);

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench());
}

fn engine(cluster: &Cluster, id: &str, checkpoint_s: &str) -> Daemon {
    cluster.engine_process_with(
        id,
        30.0,
        "earliest",
        &["--checkpoint-interval", checkpoint_s, "--idle-timeout", "2"],
    )
}

/// Reads the viewer's results until its totals reach `end_ms` (the data's end, less the
/// lateness and a slide); the time that took from `since`, and the last (run, seq).
async fn until_end(
    ws: &mut Ws,
    end_ms: i64,
    since: Instant,
    engine: &Daemon,
) -> (Duration, (u64, u64)) {
    let mut last = (0, 0);
    loop {
        assert!(
            since.elapsed() < RUN_LIMIT,
            "the job did not finish within {RUN_LIMIT:?}"
        );
        let Some(r) = next_result(ws, Duration::from_secs(60)).await else {
            panic!(
                "no result for 60 s; the engine's log:\n{}",
                engine.log_tail(6000)
            );
        };
        last = last.max((r["run"].as_u64().unwrap(), r["seq"].as_u64().unwrap()));
        if r["stream"] == "totals" && r["window_end_ms"].as_i64().unwrap() >= end_ms {
            return (since.elapsed(), last);
        }
    }
}

/// `key=value` numbers of the engines' `checkpoint written` lines.
fn checkpoint_figures(engines: &[&Daemon], key: &str) -> Vec<f64> {
    let mut out: Vec<f64> = engines
        .iter()
        .flat_map(|e| {
            std::fs::read_to_string(e.log_path())
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("checkpoint written"))
                .filter_map(|l| {
                    let v = l
                        .split(&format!(" {key}="))
                        .nth(1)?
                        .split_whitespace()
                        .next()?;
                    v.parse::<f64>().ok()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

async fn bench() {
    let cluster = Cluster::start().await;
    let users = dataset_users();
    let end_ms = newest_event_ms(&users, 0, 1) - 5_000 - 10_000;
    let runs: Vec<Tenant> = ["off", "on", "off", "on", "kill"]
        .iter()
        .map(|r| Tenant::new(unique_name(r)).unwrap())
        .collect();
    for tenant in &runs {
        let started = Instant::now();
        let summary = cluster.replay_dataset(std::slice::from_ref(tenant), None);
        eprintln!(
            "replayed {} events into {tenant} in {:.1?}",
            summary.events,
            started.elapsed()
        );
    }
    let (gw, _gw_stop) = cluster.gateway("gw-bench").await;

    // 1 and 2: the same work with checkpoints off and on, twice each, in turn.
    let (mut off_s, mut on_s) = (f64::INFINITY, f64::INFINITY);
    let mut on_daemons = Vec::new();
    for (i, tenant) in runs[..4].iter().enumerate() {
        let every = if i % 2 == 0 { "0" } else { CHECKPOINT_S };
        let e = engine(&cluster, &format!("engine-{i}"), every);
        let since = Instant::now();
        let mut ws = viewer(&gw, tenant, r#""totals""#).await;
        let (took, _) = until_end(&mut ws, end_ms, since, &e).await;
        eprintln!("checkpoints every {every} s (0: off): the whole topic in {took:.1?}");
        drop(ws);
        if every == "0" {
            off_s = off_s.min(took.as_secs_f64());
            drop(e);
        } else {
            on_s = on_s.min(took.as_secs_f64());
            on_daemons.push(e);
        }
    }
    let times = [off_s, on_s];
    eprintln!("faster of each: off {off_s:.1} s, on {on_s:.1} s");
    let on_engines: Vec<&Daemon> = on_daemons.iter().collect();
    let bytes = checkpoint_figures(&on_engines, "bytes");
    let ms = checkpoint_figures(&on_engines, "ms");
    let history = checkpoint_figures(&on_engines, "history");
    let checkpoint_ms_p99 = percentile(&ms, 99.0);
    let state_bytes = bytes.last().copied().unwrap_or(0.0);
    eprintln!(
        "{} checkpoints: packed state up to {state_bytes:.0} bytes, {:.0} history records in all, \
         p50 {:.0} ms, p99 {checkpoint_ms_p99:.0} ms",
        ms.len(),
        history.iter().sum::<f64>(),
        percentile(&ms, 50.0)
    );
    // Where a checkpoint's time goes (the engine's phases, each the largest seen): `loop_ms`
    // is what the job loop spent on it (the flush included); the rest is written in the
    // background while the job reads on.
    let phases: Vec<String> = ["loop_ms", "flush_ms", "history_ms", "pack_ms"]
        .iter()
        .map(|key| {
            let v = checkpoint_figures(&on_engines, key);
            format!("{key} {:.0}", v.last().copied().unwrap_or(f64::NAN))
        })
        .collect();
    eprintln!("  of which: {}", phases.join(", "));
    drop(on_engines);
    drop(on_daemons);
    let throughput_cost_pct = (times[1] / times[0] - 1.0) * 100.0;

    // 3: kill -9 the owner halfway through; the other engine resumes.
    let tenant = &runs[4];
    let mut a = engine(&cluster, "engine-a", CHECKPOINT_S);
    let since = Instant::now();
    let mut ws = viewer(&gw, tenant, r#""totals","pageviews""#).await;
    let owner = loop {
        if let Some(o) = cluster.owners().await.remove(tenant) {
            break o;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(owner.engine, "engine-a");
    let b = engine(&cluster, "engine-b", CHECKPOINT_S);
    // Halfway between two checkpoints (the average loss), after the first, while the job is
    // still reading: by the first run's time, the job's end is `times[0]` after its start.
    let mut last = (0, 0);
    let mut checkpointed = None;
    let kill_at = loop {
        if checkpointed.is_none()
            && std::fs::read_to_string(a.log_path())
                .unwrap_or_default()
                .contains("checkpoint written")
        {
            checkpointed = Some(since.elapsed().as_secs_f64());
        }
        if let Some(at) = checkpointed {
            let interval: f64 = CHECKPOINT_S.parse().unwrap();
            let kill_at = (at + interval / 2.0).min(times[0] * 0.85).max(at);
            if since.elapsed().as_secs_f64() >= kill_at {
                break kill_at;
            }
        }
        assert!(since.elapsed() < RUN_LIMIT, "no checkpoint written");
        if let Some(r) = next_result(&mut ws, Duration::from_millis(100)).await {
            last = last.max((r["run"].as_u64().unwrap(), r["seq"].as_u64().unwrap()));
        }
    };
    eprintln!(
        "first checkpoint {:.1} s after the start; kill -9 at {kill_at:.1} s (the whole topic takes {:.1} s)",
        checkpointed.unwrap_or_default(),
        times[0]
    );
    let killed = Instant::now();
    a.kill();
    let recovery = loop {
        assert!(killed.elapsed() < RUN_LIMIT, "no new result after the kill");
        if let Some(r) = next_result(&mut ws, Duration::from_secs(60)).await {
            let at = (r["run"].as_u64().unwrap(), r["seq"].as_u64().unwrap());
            if at > last && r["epoch"].as_u64().unwrap() > owner.epoch {
                break killed.elapsed();
            }
            last = last.max(at);
        }
    };
    eprintln!("kill -9 of the owner at {last:?}: the new owner past it after {recovery:.1?}");
    let log = std::fs::read_to_string(b.log_path()).unwrap_or_default();
    // Where the recovery went, from the new owner's own report.
    for line in log.lines().filter(|l| {
        [
            "ownership acquired",
            "state read",
            "checkpoint found",
            "resume positions looked up",
            "resumed at",
            "job started",
            "first result out",
        ]
        .iter()
        .any(|what| l.contains(what))
    }) {
        eprintln!("  {}", line.chars().take(240).collect::<String>());
    }
    let resumed = log
        .lines()
        .any(|l| l.contains("job started") && l.contains("resumed=Some"));
    assert!(resumed, "the new owner resumed a checkpoint");
    drop(b);

    println!(
        "{}",
        serde_json::json!({
            "state_bytes": state_bytes.round(),
            "checkpoint_ms_p99": checkpoint_ms_p99.round(),
            "throughput_cost_pct": (throughput_cost_pct * 10.0).round() / 10.0,
            "recovery_ms": (recovery.as_secs_f64() * 1000.0).round(),
        })
    );
}
