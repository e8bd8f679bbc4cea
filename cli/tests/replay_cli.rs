//! `clickpulse replay` as a user runs it: exit codes, the summary, the bad-line report.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test helper is that test failing

use std::io::Write;
use std::process::{Command, Output};

use clickpulse_tests::{Broker, unique_name};

fn clickpulse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clickpulse"))
        .args(args)
        .env_remove("CLICKPULSE_BROKERS")
        .output()
        .expect("clickpulse runs")
}

const HEADER: &str = "% Different categories found in input file:\r\n\r\nfrontpage news tech local opinion on-air misc weather msn-news health living business msn-sports sports summary bbs travel\r\n\r\n\r\n% Sequences:\r\n\r\n";

#[test]
fn bad_lines_are_skipped_and_reported_with_line_numbers() {
    let broker = Broker::start().unwrap();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    write!(
        file,
        "{HEADER}1 2 \r\n1 frontpage \r\n3 \r\n4 99 \r\n5 5 \r\n"
    )
    .unwrap();
    let tenant = unique_name("cli");
    let out = clickpulse(&[
        "replay",
        "--data",
        file.path().to_str().unwrap(),
        "--brokers",
        broker.bootstrap(),
        "--tenants",
        &tenant,
        "--progress",
        "quiet",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("replay complete: 5 events"), "{stdout}");
    assert!(stdout.contains("skipped 2 bad lines"), "{stdout}");
    assert!(
        stdout.contains("line 9: \"frontpage\" is not a page number"),
        "{stdout}"
    );
    assert!(
        stdout.contains("line 11: page 99 is outside 1..=17"),
        "{stdout}"
    );
    // visitors 0, 2 and 4 (bad lines keep their user numbers)
    let row = stdout.lines().find(|l| l.starts_with(&tenant)).unwrap();
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&fields[2..4], ["3", "5"], "visitors and events in {row:?}");
}

#[test]
fn a_missing_data_file_is_a_clear_error_and_a_failing_exit() {
    let out = clickpulse(&[
        "replay",
        "--data",
        "/nonexistent/msnbc.seq.gz",
        "--brokers",
        "127.0.0.1:1",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: cannot open data file /nonexistent/msnbc.seq.gz: No such file"),
        "{stderr}"
    );
}

#[test]
fn bad_flags_are_rejected_before_any_work() {
    for args in [
        &["replay", "--speed", "fast"][..],
        &["replay", "--tenants", "Acme"],
        &["replay", "--t0", "yesterday", "--brokers", "127.0.0.1:1"],
        &[
            "replay",
            "--partitions",
            "0",
            "--synthetic",
            "5",
            "--brokers",
            "127.0.0.1:1",
            "--connect-timeout",
            "1",
        ],
    ] {
        let out = clickpulse(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("error"), "{args:?}: {stderr}");
    }
}
