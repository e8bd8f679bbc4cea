//! The fixtures themselves: they start real servers, and leave no process behind.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test helper is that test failing

use std::time::{Duration, Instant};

use clickpulse_tests::broker::find_tansu;
use clickpulse_tests::process::is_running;
use clickpulse_tests::{Broker, ZkOptions, ZooKeeper};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};

fn gone_within(pid: u32, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !is_running(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn zookeeper_fixture_serves_clients_and_leaves_no_process_when_dropped() {
    let zk = ZooKeeper::start_private(ZkOptions::default()).expect("ZooKeeper starts");
    assert_eq!(zk.four_letter("ruok").unwrap(), "imok");
    let srvr = zk.four_letter("srvr").unwrap();
    assert!(srvr.contains("Mode: standalone"), "srvr answered {srvr:?}");
    let pid = zk.pid().expect("a private server has a pid");
    assert!(is_running(pid));
    drop(zk);
    assert!(
        gone_within(pid, Duration::from_secs(5)),
        "ZooKeeper pid {pid} outlived its fixture"
    );
}

#[test]
fn zookeeper_fixture_restarts_on_the_same_port() {
    let mut zk = ZooKeeper::start_private(ZkOptions::default()).unwrap();
    let before = zk.connect_string().to_owned();
    let old_pid = zk.pid().unwrap();
    zk.kill();
    assert!(
        zk.four_letter("ruok").is_err(),
        "killed server still answers"
    );
    assert!(gone_within(old_pid, Duration::from_secs(5)));
    zk.restart().unwrap();
    assert_eq!(zk.connect_string(), before);
    assert_eq!(zk.four_letter("ruok").unwrap(), "imok");
}

#[test]
fn broker_fixture_answers_metadata_and_leaves_no_process_when_dropped() {
    let broker = Broker::start_private(None).expect("broker starts");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .unwrap();
    let metadata = producer
        .client()
        .fetch_metadata(None, Duration::from_secs(5))
        .expect("metadata");
    assert_eq!(metadata.brokers().len(), 1);
    let pid = broker.pid().unwrap();
    drop(producer);
    drop(broker);
    assert!(
        gone_within(pid, Duration::from_secs(5)),
        "broker pid {pid} outlived its fixture"
    );
}

#[test]
fn a_missing_broker_binary_says_to_run_setup() {
    let env = |key: &str| match key {
        "PATH" => Some("/nonexistent/bin".into()),
        "HOME" => Some("/nonexistent/home".into()),
        _ => None,
    };
    let err = find_tansu(env).unwrap_err();
    assert!(err.to_string().ends_with("run scripts/setup"), "{err}");
    let err = find_tansu(|k| (k == "CLICKPULSE_TANSU").then(|| "/nope/tansu".into())).unwrap_err();
    assert!(
        err.to_string().contains("CLICKPULSE_TANSU=/nope/tansu"),
        "{err}"
    );
}
