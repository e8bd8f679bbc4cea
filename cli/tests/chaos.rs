//! Exactly once across crashes: two engine processes and a gateway process on real ZooKeeper
//! and the broker; three tenants' jobs reading from the earliest offsets while the whole
//! dataset is replayed at full speed; one engine killed with SIGKILL three times (and
//! restarted), the gateway once. At the end the totals at a WebSocket client and in
//! `results.<tenant>` are exactly what a naive pass over the data file computes, no result
//! reached a client twice, and every injected malformed record is counted once.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test is that test failing

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clickpulse_protocol::pages::PAGE_COUNT;
use clickpulse_protocol::results::{Admit, Order, ResultBody, ResultMsg, Totals};
use clickpulse_protocol::{Tenant, clock, topics};
use clickpulse_replay::kafka::ensure_topics;
use clickpulse_replay::{KafkaConfig, ProgressMode, ReplayConfig, Source};
use clickpulse_tests::process::{Daemon, free_port};
use clickpulse_tests::unique_name;
use common::{Cluster, repo, token};
use futures_util::{SinkExt, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

/// Malformed records written to each tenant's topic before the replay.
const MALFORMED: u64 = 7;
/// Partitions of each `clicks.<tenant>`.
const PARTITIONS: i32 = 3;
/// The session gap the engines use (the default).
const GAP_MS: i64 = 30 * 60 * 1000;
/// How long the whole run may take before the test gives up.
const DEADLINE: Duration = Duration::from_secs(15 * 60);

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    positions: HashSet<(u64, u64)>,
    twice: Vec<(u64, u64)>,
    last: Option<(u64, u64)>,
    totals: Option<ResultMsg>,
    connects: u32,
}

/// A viewer that stays connected to the gateway at `addr`, reconnecting after anything goes
/// wrong and resuming after the last result it got.
async fn watch(addr: String, tenant: Tenant, seen: Arc<Mutex<Seen>>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let url = format!("ws://{addr}/ws?token={}", token(&tenant));
        let connected = tokio::select! {
            _ = stop.cancelled() => return,
            c = tokio_tungstenite::connect_async(url) => c,
        };
        let Ok((mut ws, _)) = connected else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let after = seen.lock().unwrap().last;
        seen.lock().unwrap().connects += 1;
        let resume = after.map_or(String::new(), |(run, seq)| {
            format!(r#","after":{{"run":{run},"seq":{seq}}}"#)
        });
        let subscribe = format!(
            r#"{{"type":"subscribe","streams":["pageviews","window","topn","sessions","totals"]{resume}}}"#
        );
        if ws.send(WsMessage::Text(subscribe.into())).await.is_err() {
            continue;
        }
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = ws.next() => m,
            };
            let Some(Ok(WsMessage::Text(text))) = msg else {
                if matches!(msg, Some(Ok(_))) {
                    continue; // pings and the like
                }
                break;
            };
            let v: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
            if v["type"] != "result" {
                continue;
            }
            let result: ResultMsg = serde_json::from_value(v["result"].clone()).unwrap();
            let at = result.position();
            let mut s = seen.lock().unwrap();
            if !s.positions.insert(at) {
                s.twice.push(at);
            }
            s.last = s.last.max(Some(at));
            if matches!(result.body, ResultBody::Totals(_)) {
                s.totals = Some(result);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What totals up to (not including) `end` must say for the users of tenant `index` of
/// `tenants`: views per page; sessions (a view `GAP_MS` or more after the previous one opens
/// one) opened before `end`, and of those the returning ones (every session after a visitor's
/// first: the one before it has closed by then).
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    pages: [u64; PAGE_COUNT],
    views: u64,
    sessions: u64,
    returning: u64,
}

fn expected(users: &[Vec<u16>], index: usize, tenants: usize, end: i64) -> Expected {
    let mut out = Expected {
        pages: [0; PAGE_COUNT],
        views: 0,
        sessions: 0,
        returning: 0,
    };
    for (u, pages) in users
        .iter()
        .enumerate()
        .filter(|(u, _)| u % tenants == index)
    {
        let mut previous: Option<i64> = None;
        let mut opened = 0u64;
        for (j, &page) in pages.iter().enumerate() {
            let t = clock::event_time_ms(clock::DEFAULT_T0_MS, u as u64, j as u32);
            if t >= end {
                break;
            }
            out.pages[usize::from(page) - 1] += 1;
            out.views += 1;
            if previous.is_none_or(|p| t - p >= GAP_MS) {
                out.sessions += 1;
                out.returning += u64::from(opened > 0);
                opened += 1;
            }
            previous = Some(t);
        }
    }
    out
}

fn of_totals(t: &Totals) -> Expected {
    Expected {
        pages: clickpulse_engine::pipeline::totals_by_page(t),
        views: t.views,
        sessions: t.sessions,
        returning: t.returning_sessions,
    }
}

fn totals(r: &ResultMsg) -> &Totals {
    match &r.body {
        ResultBody::Totals(t) => t,
        other => panic!("not totals: {other:?}"),
    }
}

/// `results.<tenant>` read through a receiver's filter: the last totals it delivers.
fn durable_totals(bootstrap: &str, tenant: &Tenant) -> Option<ResultMsg> {
    let topic = topics::results(tenant);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("audit"))
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(&topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&list).unwrap();
    let mut order = Order::default();
    let mut last = None;
    let started = Instant::now();
    let mut progress = Instant::now();
    while progress.elapsed() < Duration::from_secs(10)
        && started.elapsed() < Duration::from_secs(120)
    {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                progress = Instant::now();
                let r: ResultMsg = serde_json::from_slice(m.payload().unwrap()).unwrap();
                if order.admit(r.epoch, r.run, r.seq) == Admit::Deliver
                    && matches!(r.body, ResultBody::Totals(_))
                {
                    last = Some(r);
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
            _ => {}
        }
    }
    last
}

/// How many records `clicks.<tenant>` holds against how many went in (the tenant's page views
/// and the malformed ones), for a failure message: late events with the engine's logs clean
/// would point at the input (a record stored twice) rather than at the job.
fn input_count(
    bootstrap: &str,
    tenant: &Tenant,
    users: &[Vec<u16>],
    index: usize,
    tenants: usize,
) -> String {
    let topic = topics::clicks(tenant);
    let produced: usize = users
        .iter()
        .enumerate()
        .filter(|(u, _)| u % tenants == index)
        .map(|(_, pages)| pages.len())
        .sum::<usize>()
        + MALFORMED as usize;
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
    {
        Ok(c) => c,
        Err(e) => return format!("{topic}: no consumer to count it: {e}"),
    };
    let ends: Vec<String> = (0..PARTITIONS)
        .map(
            |p| match consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)) {
                Ok((low, high)) => format!("{p}: {low}..{high}"),
                Err(e) => format!("{p}: {e}"),
            },
        )
        .collect();
    format!("{topic} offsets {ends:?}; {produced} records went in")
}

/// The engines' last log lines, for a failure message.
fn logs(engines: &BTreeMap<&str, Daemon>) -> String {
    engines
        .iter()
        .map(|(id, d)| format!("\n--- {id}\n{}", d.log_tail(3000)))
        .collect()
}

/// What the engines logged about one tenant (its last 200 lines), for a failure message:
/// its job's starts, resumes, checkpoints, progress and stops on either engine.
fn tenant_logs(engines: &BTreeMap<&str, Daemon>, tenant: &Tenant) -> String {
    let needle = tenant.as_str();
    let mut out = String::new();
    for (id, d) in engines {
        let log = std::fs::read_to_string(d.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
        out.push_str(&format!(
            "\n--- {id} ({} lines about {tenant})\n",
            lines.len()
        ));
        for line in &lines[lines.len().saturating_sub(200)..] {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn engine(cluster: &Cluster, id: &str) -> Daemon {
    // The default idle timeout: a partition caught up with the live replay must not pass for
    // idle between two of its batches (its next records would come in late).
    cluster.engine_process_with(
        id,
        60.0,
        "earliest",
        &["--checkpoint-interval", "5", "--idle-timeout", "5"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_are_exact_and_delivered_once_across_engine_and_gateway_kills() {
    let cluster = Cluster::start().await;
    let tenants: Vec<Tenant> = ["acme", "globex", "initech"]
        .iter()
        .map(|t| Tenant::new(unique_name(t)).unwrap())
        .collect();
    let bootstrap = cluster.broker.bootstrap().to_owned();

    // Topics first (as the replayer makes them), then the malformed records at their heads.
    let kafka = KafkaConfig::new(&bootstrap);
    let clicks: Vec<String> = tenants.iter().map(topics::clicks).collect();
    ensure_topics(&kafka, &clicks, PARTITIONS, 1).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    for topic in &clicks {
        for i in 0..MALFORMED {
            let bad = format!("not a click {i}");
            producer
                .send(
                    BaseRecord::to(topic)
                        .payload(bad.as_bytes())
                        .key(&[i as u8][..]),
                )
                .unwrap();
        }
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let http_port = free_port().unwrap();
    let zmq_port = free_port().unwrap();
    let addr = format!("127.0.0.1:{http_port}");
    let mut gateway = cluster.gateway_process("gw-1", http_port, zmq_port);
    let mut engines = BTreeMap::from([
        ("engine-a", engine(&cluster, "engine-a")),
        ("engine-b", engine(&cluster, "engine-b")),
    ]);

    // One viewer per tenant: its job starts, reading from the earliest offsets.
    let stop = CancellationToken::new();
    let seen: Vec<Arc<Mutex<Seen>>> = tenants.iter().map(|_| Arc::default()).collect();
    let viewers: Vec<_> = tenants
        .iter()
        .zip(&seen)
        .map(|(t, s)| tokio::spawn(watch(addr.clone(), t.clone(), s.clone(), stop.clone())))
        .collect();
    assert!(
        clickpulse_tests::eventually(Duration::from_secs(60), || async {
            cluster.owners().await.len() == tenants.len()
        })
        .await,
        "every tenant's job starts"
    );

    // The whole dataset at full speed.
    let mut replay = ReplayConfig::new(
        Source::File(repo().join("data/msnbc990928.seq.gz")),
        &bootstrap,
        tenants.clone(),
    );
    replay.progress = ProgressMode::Quiet;
    let replaying = tokio::task::spawn_blocking(move || {
        clickpulse_replay::run(&replay, &CancellationToken::new())
    });
    let users = tokio::task::spawn_blocking(common::dataset_users);

    // Chaos while the jobs work: kill -9 the engine owning the most jobs, three times,
    // restarting it each time; the gateway once, replaced by another on the same ports.
    let mut kills = Vec::new();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(6)).await;
        // Once every job runs again (a takeover takes the session timeout and a resume).
        let all_owned = clickpulse_tests::eventually(Duration::from_secs(60), || async {
            cluster.owners().await.len() == tenants.len()
        })
        .await;
        assert!(
            all_owned,
            "jobs run again after kill {round}; logs: {}",
            logs(&engines)
        );
        let owners = cluster.owners().await;
        let victim = ["engine-a", "engine-b"]
            .into_iter()
            .max_by_key(|e| owners.values().filter(|o| o.engine == *e).count())
            .unwrap();
        let jobs = owners.values().filter(|o| o.engine == victim).count();
        engines.get_mut(victim).unwrap().kill();
        kills.push((victim, jobs));
        if round == 1 {
            gateway.kill();
            tokio::time::sleep(Duration::from_millis(500)).await;
            gateway = cluster.gateway_process("gw-1", http_port, zmq_port);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        engines.insert(victim, engine(&cluster, victim));
    }
    assert!(
        kills.iter().all(|&(_, jobs)| jobs > 0),
        "every kill hit an engine running jobs: {kills:?}"
    );
    let report = replaying.await.unwrap().unwrap();
    let users = users.await.unwrap();
    assert_eq!(report.events, 4_698_794);

    // Done when each tenant's totals reach the end of its data (within the lateness and one
    // slide, which only later events would close) and stay put.
    let deadline = Instant::now() + DEADLINE;
    let ends: Vec<i64> = (0..tenants.len())
        .map(|i| common::newest_event_ms(&users, i, tenants.len()) - 5_000 - 10_000)
        .collect();
    let mut quiet_since = Instant::now();
    let mut progress = Instant::now();
    let mut last_marks = Vec::new();
    loop {
        let marks: Vec<Option<(u64, u64)>> = seen.iter().map(|s| s.lock().unwrap().last).collect();
        let reached = seen.iter().zip(&ends).all(|(s, &end)| {
            s.lock()
                .unwrap()
                .totals
                .as_ref()
                .is_some_and(|t| t.window_end_ms >= end)
        });
        if marks != last_marks {
            quiet_since = Instant::now();
            last_marks = marks;
        }
        if reached && quiet_since.elapsed() >= Duration::from_secs(5) {
            break;
        }
        if progress.elapsed() >= Duration::from_secs(10) {
            progress = Instant::now();
            for ((tenant, s), end) in tenants.iter().zip(&seen).zip(&ends) {
                let s = s.lock().unwrap();
                let (views, late, at) = s.totals.as_ref().map_or((0, 0, 0), |r| {
                    (totals(r).views, totals(r).late, r.window_end_ms)
                });
                eprintln!("chaos: {tenant}: {views} views ({late} late), totals at {at} of {end}");
            }
        }
        assert!(
            Instant::now() < deadline,
            "the jobs did not finish within {DEADLINE:?}; {}",
            logs(&engines)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.cancel();
    for v in viewers {
        v.await.unwrap();
    }

    for (i, tenant) in tenants.iter().enumerate() {
        let s = seen[i].lock().unwrap();
        assert!(
            s.twice.is_empty(),
            "{tenant}: delivered twice: {:?}",
            s.twice
        );
        assert!(
            s.connects >= 2,
            "{tenant}: the viewer reconnected after the gateway kill"
        );
        let at_client = s.totals.clone().unwrap();
        let want = expected(&users, i, tenants.len(), at_client.window_end_ms);
        let t = totals(&at_client);
        assert_eq!(
            (t.late, t.dead_lettered),
            (0, MALFORMED),
            "{tenant}: late events and dead letters; {}; {}",
            input_count(&bootstrap, tenant, &users, i, tenants.len()),
            tenant_logs(&engines, tenant)
        );
        assert_eq!(
            of_totals(t),
            want,
            "{tenant}: totals at the client; {}",
            tenant_logs(&engines, tenant)
        );
        let durable = durable_totals(&bootstrap, tenant).unwrap();
        assert_eq!(
            durable.position(),
            at_client.position(),
            "{tenant}: the last totals in results.{tenant} are the client's"
        );
        assert_eq!(totals(&durable), t, "{tenant}: totals in results.{tenant}");
    }
    drop(gateway);
    drop(engines);
}
