//! `docker-compose.yml` and the `Dockerfile`, checked without a Docker daemon: Debian's
//! `docker-compose` validates and normalises the file, and every clickpulse service's command
//! is parsed by this build of the CLI (`scripts/setup --test` installs docker-compose).
#![allow(clippy::unwrap_used)] // a failed unwrap in a test helper is that test failing

mod common;

use std::process::Command;

use common::repo;
use serde_norway::Value;

fn compose_config(secret: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new("docker-compose");
    cmd.current_dir(repo())
        .args(["-f", "docker-compose.yml", "config"])
        .env_remove("CLICKPULSE_SECRET");
    if let Some(s) = secret {
        cmd.env("CLICKPULSE_SECRET", s);
    }
    cmd.output()
        .expect("docker-compose runs (scripts/setup --test installs it)")
}

fn services() -> Vec<(String, Value)> {
    let out = compose_config(Some("a-secret-only-for-validation-000000000"));
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: Value = serde_norway::from_slice(&out.stdout).unwrap();
    config["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_owned(), v.clone()))
        .collect()
}

fn command(service: &Value) -> Vec<String> {
    service["command"]
        .as_sequence()
        .expect("a command list")
        .iter()
        .map(|a| match a {
            Value::String(s) => s.clone(),
            other => serde_norway::to_string(other).unwrap().trim().to_owned(),
        })
        .collect()
}

#[test]
fn the_compose_file_is_valid_and_needs_a_secret() {
    let names: Vec<String> = services().into_iter().map(|(n, _)| n).collect();
    for wanted in [
        "zookeeper",
        "kafka",
        "engine-1",
        "engine-2",
        "gateway",
        "replay",
    ] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} in {names:?}");
    }
    let out = compose_config(None);
    assert!(!out.status.success(), "runs without a token secret");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CLICKPULSE_SECRET"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_service_has_a_healthcheck_or_waits_for_healthy_ones() {
    for (name, service) in services() {
        let waits = service["depends_on"]
            .as_mapping()
            .is_some_and(|d| d.values().all(|c| c["condition"] == "service_healthy"));
        assert!(
            service.get("healthcheck").is_some() || waits,
            "{name}: neither a healthcheck nor healthy dependencies"
        );
    }
}

/// Each clickpulse command is parsed by the CLI: the flags exist and their values are valid
/// (clap stops at the trailing `--help` only after parsing everything before it).
#[test]
fn every_clickpulse_command_matches_the_cli() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains(r#"ENTRYPOINT ["clickpulse"]"#));
    let mut checked = 0;
    for (name, service) in services() {
        if service["image"].as_str() != Some("clickpulse:latest") {
            continue;
        }
        let args = command(&service);
        let out = Command::new(env!("CARGO_BIN_EXE_clickpulse"))
            .args(&args)
            .arg("--help")
            .env_clear()
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: `clickpulse {}` is not what the CLI takes:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        // Paths inside the image exist there: they are what the Dockerfile copies in.
        for path in args.iter().filter(|a| a.starts_with("/srv/")) {
            let dir = path.rsplit_once('/').map_or(path.as_str(), |(d, _)| d);
            assert!(
                dockerfile.contains(path.as_str()) || dockerfile.contains(dir),
                "{name}: {path} is not put into the image by the Dockerfile"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 4, "engine-1, engine-2, gateway, replay");
}

/// The check above can fail: a misspelt flag or a bad value is rejected before `--help`.
#[test]
fn a_wrong_flag_is_caught() {
    for args in [
        ["engine", "--id", "e", "--lingr", "5", "--help"],
        ["engine", "--id", "e", "--linger", "soon", "--help"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_clickpulse"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} passed");
    }
}
