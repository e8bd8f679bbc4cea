//! A job on the real broker: it computes what the pipeline computes in memory from the same
//! records, counts malformed records and keeps going, and stops on shutdown.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test helper is that test failing

use std::time::Duration;

use clickpulse_engine::job::{JobConfig, JobReport, StartFrom, run_job};
use clickpulse_engine::pipeline::last_totals;
use clickpulse_engine::{MemStore, OperatorConfig, Pipeline};
use clickpulse_protocol::click::ClickRef;
use clickpulse_protocol::dead::{REASON_HEADER, SOURCE_HEADER, SourcePosition};
use clickpulse_protocol::results::{ResultBody, ResultMsg};
use clickpulse_protocol::state::Manifest;
use clickpulse_protocol::{Tenant, topics};
use clickpulse_replay::{ProgressMode, ReplayConfig, Source};
use clickpulse_tests::{Broker, unique_name};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn replay(broker: &Broker, tenant: &Tenant, users: u64) {
    let mut config = ReplayConfig::new(
        Source::Synthetic { users, seed: 11 },
        broker.bootstrap(),
        vec![tenant.clone()],
    );
    config.progress = ProgressMode::Quiet;
    clickpulse_replay::run(&config, &CancellationToken::new()).unwrap();
}

/// Every record of every partition of the topic: reads until nothing came for two seconds.
fn read_messages(broker: &Broker, topic: &str) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", unique_name("readback"))
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut list = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        list.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    assert!(list.count() > 0, "{topic} has partitions");
    consumer.assign(&list).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = std::time::Instant::now();
    while last.elapsed() < Duration::from_secs(2) && std::time::Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            out.push(m.unwrap().detach());
            last = std::time::Instant::now();
        }
    }
    out
}

/// The values of every record of the topic.
fn read_back(broker: &Broker, topic: &str) -> Vec<Vec<u8>> {
    read_messages(broker, topic)
        .iter()
        .map(|m| m.payload().unwrap_or_default().to_vec())
        .collect()
}

/// A tenant's `state.<tenant>` topic, created as a job creates it, and a producer for it.
fn state_writer(broker: &Broker, tenant: &Tenant) -> (String, BaseProducer) {
    let topic = topics::state(tenant);
    let kafka = clickpulse_replay::KafkaConfig::new(broker.bootstrap());
    clickpulse_replay::kafka::ensure_topics_with(
        &kafka,
        std::slice::from_ref(&topic),
        1,
        1,
        &[("cleanup.policy", "compact")],
    )
    .unwrap();
    let producer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .unwrap();
    (topic, producer)
}

/// A header's value as text.
fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn config(broker: &Broker, tenant: &Tenant, dir: &tempfile::TempDir) -> JobConfig {
    let mut config = JobConfig::new(
        tenant.clone(),
        1,
        broker.bootstrap(),
        dir.path().join("history.redb"),
    );
    config.start = StartFrom::Earliest;
    config.idle_timeout = Duration::from_millis(400);
    config.checkpoint_interval = None;
    config
}

/// [`config`] for owner `epoch`, checkpointing every second.
fn checkpointing(
    broker: &Broker,
    tenant: &Tenant,
    dir: &tempfile::TempDir,
    epoch: u64,
) -> JobConfig {
    let mut config = config(broker, tenant, dir);
    config.epoch = epoch;
    config.checkpoint_interval = Some(Duration::from_secs(1));
    config
}

/// What an uninterrupted run computes from these click records: the pipeline in memory, fed
/// in event-time order as one partition (once every partition of a job is idle, its watermark
/// is the newest event minus the lateness, as here); and the clicks in that order.
fn in_memory<'a>(tenant: &Tenant, records: &'a [Vec<u8>]) -> (Vec<ResultMsg>, Vec<ClickRef<'a>>) {
    let mut pipeline = Pipeline::new(
        tenant.clone(),
        1,
        1,
        OperatorConfig::default(),
        MemStore::default(),
    )
    .unwrap();
    let mut clicks: Vec<ClickRef> = records
        .iter()
        .map(|r| ClickRef::decode(r).unwrap())
        .collect();
    clicks.sort_by_key(|c| c.event_time_ms);
    for c in &clicks {
        pipeline
            .on_click(0, c.visitor, c.page, c.event_time_ms)
            .unwrap();
    }
    (pipeline.take_results(), clicks)
}

/// Runs a job until its results stop for three seconds, then shuts it down; the job must stop
/// promptly.
async fn run_until_quiet(config: JobConfig) -> (Vec<ResultMsg>, JobReport) {
    let (tx, mut rx) = mpsc::channel(1024);
    let shutdown = CancellationToken::new();
    let job = tokio::spawn(run_job(config, tx, shutdown.clone()));
    let got = collect(&mut rx, Duration::from_secs(3)).await;
    shutdown.cancel();
    let report = tokio::time::timeout(Duration::from_secs(5), job)
        .await
        .expect("the job stops promptly on shutdown")
        .unwrap()
        .unwrap();
    (got, report)
}

/// Collects results: waits up to 60 s for the first (the job's start-up), then until none
/// came for `quiet`.
async fn collect(rx: &mut mpsc::Receiver<ResultMsg>, quiet: Duration) -> Vec<ResultMsg> {
    let mut out = Vec::new();
    if let Ok(Some(first)) = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
        out.push(first);
        while let Ok(Some(r)) = tokio::time::timeout(quiet, rx.recv()).await {
            out.push(r);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_computes_what_the_pipeline_computes_from_the_same_records() {
    clickpulse_tests::log_to_test_output();
    let broker = Broker::start().unwrap();
    let tenant = Tenant::new(unique_name("job")).unwrap();
    replay(&broker, &tenant, 3_000);
    let records = read_back(&broker, &topics::clicks(&tenant));
    assert!(records.len() > 10_000, "{} records", records.len());

    let dir = tempfile::tempdir().unwrap();
    let (got, report) = run_until_quiet(config(&broker, &tenant, &dir)).await;
    assert_eq!(report.records as usize, records.len());
    assert_eq!((report.late, report.dead_lettered), (0, 0));

    let (expected, _) = in_memory(&tenant, &records);
    assert!(expected.len() > 100);
    let json = |r: &ResultMsg| String::from_utf8(r.to_json()).unwrap();
    if let Some(i) = (0..got.len().min(expected.len())).find(|&i| got[i] != expected[i]) {
        panic!(
            "result {i} differs:\n job:    {}\n memory: {}",
            json(&got[i]),
            json(&expected[i])
        );
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "results from the job vs in memory"
    );

    // The durable record: results.<tenant> holds every result, in order, keyed by stream.
    let written = read_messages(&broker, &topics::results(&tenant));
    assert_eq!(written.len(), got.len(), "results in the topic");
    for (m, r) in written.iter().zip(&got) {
        assert_eq!(m.key(), Some(r.stream().as_str().as_bytes()));
        assert_eq!(
            &serde_json::from_slice::<ResultMsg>(m.payload().unwrap()).unwrap(),
            r,
            "offset {}",
            m.offset()
        );
    }
    assert_eq!(report.output_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_counted_and_the_job_goes_on() {
    clickpulse_tests::log_to_test_output();
    let broker = Broker::start().unwrap();
    let tenant = Tenant::new(unique_name("bad")).unwrap();
    replay(&broker, &tenant, 200);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .unwrap();
    let topic = topics::clicks(&tenant);
    for bad in [&b"garbage"[..], &[0xC1; 30][..], &[][..]] {
        producer
            .send(
                BaseRecord::<[u8], [u8]>::to(&topic)
                    .payload(bad)
                    .key(&b"k"[..]),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    replay(&broker, &tenant, 200); // more good records after the bad ones

    let dir = tempfile::tempdir().unwrap();
    let (got, report) = run_until_quiet(config(&broker, &tenant, &dir)).await;
    assert_eq!(report.dead_lettered, 3);
    let totals = last_totals(&got).unwrap();
    assert_eq!(totals.dead_lettered, 3);
    assert!(totals.views > 0);

    // Each went to dead.<tenant> unchanged, with why and from where.
    let sources: Vec<(Vec<u8>, SourcePosition)> = read_messages(&broker, &topic)
        .iter()
        .filter(|m| ClickRef::decode(m.payload().unwrap_or_default()).is_err())
        .map(|m| {
            let position = SourcePosition {
                topic: topic.clone(),
                partition: m.partition(),
                offset: m.offset(),
            };
            (m.payload().unwrap_or_default().to_vec(), position)
        })
        .collect();
    assert_eq!(sources.len(), 3);
    let dead = read_messages(&broker, &topics::dead(&tenant));
    assert_eq!(dead.len(), 3);
    for (m, (payload, position)) in dead.iter().zip(&sources) {
        assert_eq!(m.payload().unwrap_or_default(), &payload[..]);
        assert_eq!(m.key(), Some(&b"k"[..]));
        let source: SourcePosition = header(m, SOURCE_HEADER).unwrap().parse().unwrap();
        assert_eq!(&source, position);
        assert!(!header(m, REASON_HEADER).unwrap().is_empty());
    }
}

#[tokio::test]
async fn a_missing_topic_is_a_clear_error() {
    clickpulse_tests::log_to_test_output();
    let broker = Broker::start().unwrap();
    let tenant = Tenant::new(unique_name("none")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let err = run_job(config(&broker, &tenant, &dir), tx, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&topics::clicks(&tenant)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_started_one_window_back_emits_a_complete_window_first() {
    clickpulse_tests::log_to_test_output();
    let broker = Broker::start().unwrap();
    let tenant = Tenant::new(unique_name("window")).unwrap();
    replay(&broker, &tenant, 2_000);
    let clicks: Vec<(i64, _)> = read_back(&broker, &topics::clicks(&tenant))
        .iter()
        .map(|r| ClickRef::decode(r).unwrap())
        .map(|c| (c.event_time_ms, c.page))
        .collect();
    let newest = clicks.iter().map(|c| c.0).max().unwrap();
    let oldest = clicks.iter().map(|c| c.0).min().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&broker, &tenant, &dir);
    cfg.operators.window_ms = 600_000;
    cfg.start = StartFrom::LatestWindow;
    assert!(
        newest - oldest > 3 * cfg.operators.window_ms,
        "data spans several windows"
    );
    let ops = &cfg.operators;
    let from =
        (newest - ops.allowed_lateness_ms).div_euclid(ops.slide_ms) * ops.slide_ms - ops.window_ms;
    let (got, report) = run_until_quiet(cfg).await;

    // Every record of the last window was read, and earlier ones only as far as the broker
    // makes it necessary: tansu serves fetches from the start of a stored batch only, and the
    // replayer writes large batches (the search itself is unit-tested in `job::tests`).
    let in_range = clicks.iter().filter(|c| c.0 >= from).count() as u64;
    assert!(
        report.records >= in_range,
        "{} < {in_range}",
        report.records
    );
    assert!(
        report.records < clicks.len() as u64,
        "the seek skipped nothing"
    );
    // The first window emitted starts at or after the first record read, and holds exactly
    // the records of its span: complete, not a partial one from before the start.
    let (start, end, pages) = got
        .iter()
        .find_map(|r| match &r.body {
            ResultBody::Window { pages } => Some((r.window_start_ms, r.window_end_ms, pages)),
            _ => None,
        })
        .expect("a window result");
    assert!(
        start >= from,
        "window [{start}, {end}) starts before {from}"
    );
    let expected = clicks.iter().filter(|c| c.0 >= start && c.0 < end).count() as u64;
    assert_eq!(pages.iter().map(|p| p.views).sum::<u64>(), expected);
    assert!(expected > 0);
}

/// Waits up to 60 s for the job's first result, then reads `n` more, one at a time.
async fn take(rx: &mut mpsc::Receiver<ResultMsg>, n: usize) -> Vec<ResultMsg> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(r)) => out.push(r),
            _ => break,
        }
    }
    out
}

/// The same result from another owner: equal but for the epoch.
fn same_result(a: &ResultMsg, b: &ResultMsg) -> bool {
    a == &ResultMsg {
        epoch: a.epoch,
        ..b.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_resumed_on_another_engine_re_emits_the_same_results_and_loses_nothing() {
    clickpulse_tests::log_to_test_output();
    let broker = Broker::start().unwrap();
    let tenant = Tenant::new(unique_name("resume")).unwrap();
    replay(&broker, &tenant, 3_000);
    let records = read_back(&broker, &topics::clicks(&tenant));

    // The first owner: checkpoints every second. The test reads its results one at a time
    // (a channel of one blocks the job), pauses past a checkpoint, reads on, then goes away:
    // the job fails with nobody to send to — a crash, with no last checkpoint.
    let dir_a = tempfile::tempdir().unwrap();
    let first = checkpointing(&broker, &tenant, &dir_a, 1);
    let (tx, mut rx) = mpsc::channel(1);
    let job = tokio::spawn(run_job(first, tx, CancellationToken::new()));
    let mut from_a = take(&mut rx, 50).await;
    assert_eq!(from_a.len(), 50, "the first owner's results");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    from_a.extend(take(&mut rx, 101).await);
    drop(rx);
    let crashed = tokio::time::timeout(Duration::from_secs(10), job)
        .await
        .expect("the job stops once nobody takes its results")
        .unwrap();
    assert!(crashed.is_err(), "it ended without a clean stop");

    // The next owner, on an engine with no local history: everything comes from Kafka.
    let dir_b = tempfile::tempdir().unwrap();
    let second = checkpointing(&broker, &tenant, &dir_b, 2);
    let (from_b, report) = run_until_quiet(second).await;
    let (epoch, n) = report.resumed.expect("it resumed a checkpoint");
    assert_eq!(epoch, 1);
    assert!(n >= 1);
    assert!(report.checkpoints >= 1);
    assert!(
        from_b.iter().all(|r| r.epoch == 2 && r.run == 1),
        "the run goes on under the new epoch"
    );

    // What it re-emitted is what the first owner had sent after that checkpoint, result for
    // result (sequence numbers and contents), and there was some of it.
    let first_b = from_b.first().expect("results after the resume").seq;
    let overlap: Vec<(&ResultMsg, &ResultMsg)> = from_a
        .iter()
        .filter(|a| a.seq >= first_b)
        .zip(&from_b)
        .collect();
    assert!(
        !overlap.is_empty(),
        "the first owner had sent results after its checkpoint"
    );
    for (a, b) in &overlap {
        assert!(same_result(a, b), "re-emitted differently:\n {a:?}\n {b:?}");
    }

    // A receiver dropping what it has seen ends up with exactly the uninterrupted output.
    let mut order = clickpulse_protocol::results::Order::default();
    let delivered: Vec<&ResultMsg> = from_a
        .iter()
        .chain(&from_b)
        .filter(|r| {
            order.admit(r.epoch, r.run, r.seq) == clickpulse_protocol::results::Admit::Deliver
        })
        .collect();
    let (expected, clicks) = in_memory(&tenant, &records);
    assert_eq!(
        delivered.len(),
        expected.len(),
        "results delivered once each"
    );
    for (got, want) in delivered.iter().zip(&expected) {
        assert!(
            same_result(got, want),
            "result {} differs:\n {got:?}\n {want:?}",
            want.seq
        );
    }
    // Totals cover every event before their end, each once.
    let totals = expected
        .iter()
        .rev()
        .find(|r| matches!(r.body, ResultBody::Totals(_)))
        .unwrap();
    let before_end = clicks
        .iter()
        .filter(|c| c.event_time_ms < totals.window_end_ms)
        .count() as u64;
    assert_eq!(
        last_totals(&expected).map(|t| t.views),
        Some(before_end),
        "every record counted once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_whose_state_does_not_decode_is_passed_over_for_a_fresh_start() {
    clickpulse_tests::log_to_test_output();
    let broker = Broker::start().unwrap();
    let tenant = Tenant::new(unique_name("undecodable")).unwrap();
    replay(&broker, &tenant, 500);
    let records = read_back(&broker, &topics::clicks(&tenant));

    // A complete checkpoint — chunks, then the manifest, CRC right — whose state is not one
    // this version reads (as after an upgrade that changed the operator state).
    let packed = clickpulse_engine::checkpoint::pack(b"not a pipeline state").unwrap();
    let mut manifest = Manifest {
        version: 1,
        tenant: tenant.clone(),
        epoch: 1,
        n: 1,
        run: 1,
        chunks: 0,
        bytes: 0,
        crc32: 0,
        offsets: vec![],
        seq: 40,
        watermark_ms: 0,
        created_at_ms: 0,
        stopped: None,
    };
    let (state_topic, producer) = state_writer(&broker, &tenant);
    for (key, value) in clickpulse_engine::checkpoint::records(&mut manifest, &packed, None) {
        let value = value.unwrap();
        producer
            .send(BaseRecord::to(&state_topic).key(&key).payload(&value))
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (got, report) = run_until_quiet(checkpointing(&broker, &tenant, &dir, 2)).await;
    assert_eq!(
        report.resumed, None,
        "the undecodable checkpoint was not resumed"
    );
    // A fresh run under the new epoch: what an uninterrupted run computes, numbered from 1.
    let (expected, _) = in_memory(&tenant, &records);
    assert!(!expected.is_empty());
    assert_eq!(got.len(), expected.len());
    for (got, want) in got.iter().zip(&expected) {
        assert_eq!(got.run, 2);
        assert!(
            same_result(
                got,
                &ResultMsg {
                    run: 2,
                    ..want.clone()
                }
            ),
            "result {} differs:\n {got:?}\n {want:?}",
            want.seq
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_log_longer_than_the_history_is_replaced_by_a_snapshot() {
    clickpulse_tests::log_to_test_output();
    use clickpulse_engine::checkpoint::{Scan, history_records, unpack};
    use clickpulse_protocol::state::{Key, VisitorHistory, decode_entries};

    let broker = Broker::start().unwrap();
    let tenant = Tenant::new(unique_name("snapshot")).unwrap();
    replay(&broker, &tenant, 300);

    // An earlier owner's logs: three updates of the same 2,000 visitors (none of them in the
    // replayed data), so the log holds three times the history it describes.
    let (state_topic, producer) = state_writer(&broker, &tenant);
    let old_visitor = |i: u64| 1_000_000_000 + i;
    let mut old_keys = Vec::new();
    for n in 1..=3u64 {
        let entries: Vec<(u64, VisitorHistory)> = (0..2_000)
            .map(|i| {
                let h = VisitorHistory {
                    sessions: n as u32,
                    views: n as u32,
                    last_seen_ms: n as i64,
                    first_close_ms: 1,
                };
                (old_visitor(i), h)
            })
            .collect();
        for (key, value) in history_records(1, n, &entries).unwrap() {
            producer
                .send(
                    BaseRecord::to(&state_topic)
                        .key(&key.encode())
                        .payload(&value),
                )
                .unwrap();
            old_keys.push(key);
        }
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (got, report) = run_until_quiet(checkpointing(&broker, &tenant, &dir, 2)).await;
    assert!(!got.is_empty());
    assert!(report.checkpoints >= 1);

    // In the log now: each old log deleted after a snapshot by the new owner holding every
    // visitor's newest summary; and what a restore would read from it.
    let messages = read_messages(&broker, &state_topic);
    let key_of = |m: &OwnedMessage| {
        m.key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(Key::parse)
    };
    let snapshot_at = messages
        .iter()
        .position(|m| {
            matches!(key_of(m), Some(Key::HistoryLog { epoch: 2, .. }))
                && m.payload().is_some_and(|v| {
                    decode_entries(&unpack(v).unwrap())
                        .unwrap()
                        .iter()
                        .any(|(v, h)| *v == old_visitor(0) && h.sessions == 3)
                })
        })
        .expect("a snapshot by the new owner, with the old visitors");
    for old in &old_keys {
        let deleted = messages
            .iter()
            .position(|m| key_of(m) == Some(*old) && m.payload().is_none())
            .unwrap_or_else(|| panic!("{} was not deleted", old.encode()));
        assert!(deleted > snapshot_at, "deleted only after the snapshot");
    }
    let mut scan = Scan::default();
    let mut restored = std::collections::HashMap::new();
    for m in &messages {
        scan.add(m.key(), m.payload(), |v, h| {
            let newest = restored.entry(v).or_insert(h);
            if h.last_seen_ms > newest.last_seen_ms {
                *newest = h;
            }
        });
    }
    assert_eq!(scan.unreadable, 0);
    assert!(scan.history_logs().all(|k| !old_keys.contains(&k)));
    for i in 0..2_000 {
        assert_eq!(restored.get(&old_visitor(i)).map(|h| h.sessions), Some(3));
    }
}
