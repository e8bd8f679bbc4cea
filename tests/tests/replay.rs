//! The replayer against a real broker: every record of the full dataset comes back exactly
//! once, on the replay clock, in event-time order per partition.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test helper is that test failing

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clickpulse_protocol::clock::{DEFAULT_T0_MS, event_time_ms};
use clickpulse_protocol::{ClickRef, Tenant, topics};
use clickpulse_replay::{KafkaSinkError, ReplayConfig, ReplayError, Source, Speed};
use clickpulse_tests::{Broker, unique_name};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

fn data_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/msnbc990928.seq.gz")
}

/// An independent reading of the dataset: every user's pages, by the letter of the data
/// README (header up to `% Sequences:` and a blank line, then one user per line).
fn naive_users() -> Vec<Vec<u16>> {
    let file = std::fs::File::open(data_file()).unwrap();
    let reader = BufReader::new(flate2::read::GzDecoder::new(file));
    let mut lines = reader.lines().map(Result::unwrap);
    for line in lines.by_ref() {
        if line.trim() == "% Sequences:" {
            break;
        }
    }
    assert_eq!(
        lines.next().map(|l| l.trim().to_owned()),
        Some(String::new())
    );
    lines
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect()
}

fn config(bootstrap: &str, tenants: &[Tenant], source: Source) -> ReplayConfig {
    ReplayConfig::new(source, bootstrap, tenants.to_vec())
}

/// Waits (at most `limit`) until `topic` holds a record: the replay is then surely producing.
fn wait_for_first_record(bootstrap: &str, topic: &str, limit: Duration) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("first"))
        .create()
        .unwrap();
    let start = Instant::now();
    let mut assigned = false;
    while start.elapsed() < limit {
        if !assigned {
            let partitions: Vec<i32> = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(1))
                .map(|m| {
                    m.topics()
                        .iter()
                        .filter(|t| t.error().is_none())
                        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                        .collect()
                })
                .unwrap_or_default();
            if partitions.is_empty() {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let mut list = TopicPartitionList::new();
            for p in partitions {
                list.add_partition_offset(topic, p, Offset::Beginning)
                    .unwrap();
            }
            consumer.assign(&list).unwrap();
            assigned = true;
        }
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            return;
        }
    }
    panic!("no record reached {topic} within {limit:?}");
}

/// One consumed record, as the checks need it.
struct Seen {
    partition: i32,
    visitor: u64,
    page: u16,
    time_ms: i64,
    tenant_ok: bool,
}

/// Reads `expected` records of `topic` from the beginning, within a time bound.
fn consume_all(bootstrap: &str, topic: &str, expected: u64, limit: Duration) -> Vec<Seen> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("check"))
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", "52428800")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        assignment
            .add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let tenant = topics::tenant_of_clicks(topic).unwrap();
    let start = Instant::now();
    let mut seen = Vec::with_capacity(expected as usize);
    while (seen.len() as u64) < expected && start.elapsed() < limit {
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message.unwrap();
        let click = ClickRef::decode(message.payload().unwrap()).expect("a valid click record");
        assert_eq!(message.key(), Some(&click.visitor.to_be_bytes()[..]));
        seen.push(Seen {
            partition: message.partition(),
            visitor: click.visitor,
            page: click.page.0,
            time_ms: click.event_time_ms,
            tenant_ok: click.tenant == tenant.as_str(),
        });
    }
    // Anything beyond the expected count would be a duplicate: give it a moment to show up.
    let extra_deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < extra_deadline {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(200)) {
            seen.push(Seen {
                partition: -1,
                visitor: u64::MAX,
                page: 0,
                time_ms: 0,
                tenant_ok: false,
            });
        }
    }
    seen
}

#[test]
fn full_dataset_comes_back_exactly_once_on_the_clock_and_in_order_per_partition() {
    let broker = Broker::start().unwrap();
    let tenants: Vec<Tenant> = ["acme", "globex", "initech"]
        .iter()
        .map(|t| Tenant::new(unique_name(t)).unwrap())
        .collect();
    let summary = clickpulse_replay::run(
        &config(broker.bootstrap(), &tenants, Source::File(data_file())),
        &CancellationToken::new(),
    )
    .unwrap();
    assert_eq!(summary.events, 4_698_794, "the data README's total");
    assert!(!summary.interrupted);
    assert_eq!(summary.bad_lines.count, 0);

    let users = naive_users();
    assert_eq!(users.len(), 989_818);
    // Expected per-tenant totals from the independent reading.
    let mut expected_events = [0u64; 3];
    let mut expected_pages = [[0u64; 17]; 3];
    for (u, pages) in users.iter().enumerate() {
        expected_events[u % 3] += pages.len() as u64;
        for &p in pages {
            expected_pages[u % 3][usize::from(p) - 1] += 1;
        }
    }

    let mut total = 0u64;
    for (index, tenant) in tenants.iter().enumerate() {
        let topic = topics::clicks(tenant);
        let seen = consume_all(
            broker.bootstrap(),
            &topic,
            expected_events[index],
            Duration::from_secs(300),
        );
        assert_eq!(
            seen.len() as u64,
            expected_events[index],
            "records in {topic}"
        );
        let mut last_time: HashMap<i32, i64> = HashMap::new();
        let mut next_view: HashMap<u64, u32> = HashMap::new();
        let mut pages = [0u64; 17];
        for record in &seen {
            assert!(record.tenant_ok, "record of another tenant in {topic}");
            let previous = last_time.insert(record.partition, record.time_ms);
            assert!(
                previous.is_none_or(|t| t <= record.time_ms),
                "partition {} of {topic} goes back in event time",
                record.partition
            );
            let u = record.visitor as usize;
            assert_eq!(u % 3, index, "visitor {u} in the wrong tenant");
            let j = next_view.entry(record.visitor).or_default();
            // The j-th record of a visitor is view j of that user, at its clock time: this
            // rules out loss, duplication and reordering per visitor at once.
            assert_eq!(
                Some(&record.page),
                users[u].get(*j as usize),
                "view {j} of visitor {u}"
            );
            assert_eq!(
                record.time_ms,
                event_time_ms(DEFAULT_T0_MS, record.visitor, *j)
            );
            *j += 1;
            pages[usize::from(record.page) - 1] += 1;
        }
        for (visitor, views) in &next_view {
            assert_eq!(
                *views as usize,
                users[*visitor as usize].len(),
                "views of visitor {visitor}"
            );
        }
        assert_eq!(pages, expected_pages[index], "per-page views of {topic}");
        let summary_tenant = &summary.tenants[index];
        assert_eq!(summary_tenant.events, expected_events[index]);
        assert_eq!(summary_tenant.pages, expected_pages[index]);
        total += seen.len() as u64;
    }
    assert_eq!(total, 4_698_794);
}

#[test]
fn an_unreachable_broker_is_a_clear_error_within_the_connect_timeout() {
    let port = clickpulse_tests::process::free_port().unwrap();
    let mut cfg = config(
        &format!("127.0.0.1:{port}"),
        &[Tenant::new("acme").unwrap()],
        Source::Synthetic { users: 10, seed: 1 },
    );
    cfg.kafka.connect_timeout = Duration::from_secs(3);
    let start = Instant::now();
    let err = clickpulse_replay::run(&cfg, &CancellationToken::new()).unwrap_err();
    let waited = start.elapsed();
    assert!(
        matches!(&err, ReplayError::Kafka(e) if matches!(**e, KafkaSinkError::Unreachable { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(waited < Duration::from_secs(8), "gave up after {waited:?}");
}

#[test]
fn a_broker_that_goes_away_mid_replay_stops_it_with_a_clear_error() {
    let mut broker = Broker::start_private(None).unwrap();
    let tenant = Tenant::new("acme").unwrap();
    let mut cfg = config(
        broker.bootstrap(),
        &[tenant],
        Source::Synthetic {
            users: 400_000,
            seed: 3,
        },
    );
    // 400 000 users span about 9.7 h of event time: at 3 000× that is about 12 s of replay.
    cfg.speed = Speed::Factor(3_000.0);
    cfg.kafka.delivery_timeout = Duration::from_secs(3);
    let replay =
        std::thread::spawn(move || clickpulse_replay::run(&cfg, &CancellationToken::new()));
    // Kill the broker once the replay is surely producing, however long its start-up took.
    wait_for_first_record(broker.bootstrap(), "clicks.acme", Duration::from_secs(60));
    broker.kill();
    let killed = Instant::now();
    let result = replay.join().unwrap();
    let noticed = killed.elapsed();
    let err = result.expect_err("a replay without a broker cannot succeed");
    assert!(
        matches!(&err, ReplayError::Kafka(e) if matches!(
            **e,
            KafkaSinkError::Delivery { .. } | KafkaSinkError::FlushTimeout { .. }
        )),
        "{err}"
    );
    // the delivery timeout (3 s) and the final flush wait (5 s), with slack
    assert!(
        noticed < Duration::from_secs(15),
        "noticed only after {noticed:?}"
    );
}

#[test]
fn cancelling_stops_the_replay_early_and_everything_sent_is_acknowledged() {
    let broker = Broker::start().unwrap();
    let tenant = Tenant::new(unique_name("cancel")).unwrap();
    let mut cfg = config(
        broker.bootstrap(),
        std::slice::from_ref(&tenant),
        Source::Synthetic {
            users: 100_000,
            seed: 5,
        },
    );
    cfg.speed = Speed::Factor(1_000.0);
    let shutdown = CancellationToken::new();
    let canceller = {
        let shutdown = shutdown.clone();
        let bootstrap = broker.bootstrap().to_owned();
        let topic = topics::clicks(&tenant);
        std::thread::spawn(move || {
            wait_for_first_record(&bootstrap, &topic, Duration::from_secs(60));
            shutdown.cancel();
        })
    };
    let summary = clickpulse_replay::run(&cfg, &shutdown).unwrap();
    canceller.join().unwrap();
    assert!(summary.interrupted);
    assert!(
        summary.events > 0 && summary.events < 400_000,
        "{} events",
        summary.events
    );
    let seen = consume_all(
        broker.bootstrap(),
        &topics::clicks(&tenant),
        summary.events,
        Duration::from_secs(60),
    );
    assert_eq!(seen.len() as u64, summary.events);
}
