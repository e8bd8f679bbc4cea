//! The whole MSNBC dataset through the replay clock, in memory: exact views per page and exact
//! session counts.
//!
//! The replay clock makes sessions computable in closed form: views of a user are 10 s apart
//! and every 25 views a 40-minute pause exceeds the 30-minute gap, so a user with n views has
//! ⌈n / 25⌉ sessions, all but the first returning.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test helper is that test failing

use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use clickpulse_engine::pipeline::{last_totals, totals_by_page};
use clickpulse_engine::{Admission, MemStore, OperatorConfig, Pipeline};
use clickpulse_protocol::Tenant;
use clickpulse_protocol::click::{ClickRef, encode_into};
use clickpulse_protocol::clock::DEFAULT_T0_MS;
use clickpulse_replay::Source;
use clickpulse_replay::merge::Merge;

fn data_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/msnbc990928.seq.gz")
}

/// Each user's page list, read naively from the file.
fn naive_users() -> Vec<Vec<u16>> {
    let file = std::fs::File::open(data_file()).unwrap();
    let mut lines = BufReader::new(flate2::read::GzDecoder::new(file))
        .lines()
        .map(Result::unwrap);
    lines.by_ref().find(|l| l.trim() == "% Sequences:");
    lines.next();
    lines
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect()
}

#[test]
fn full_dataset_views_and_sessions_are_exact() {
    let tenants: Vec<Tenant> = ["acme", "globex", "initech"]
        .iter()
        .map(|t| Tenant::new(*t).unwrap())
        .collect();
    let mut pipelines: Vec<Pipeline<MemStore>> = tenants
        .iter()
        .map(|t| {
            Pipeline::new(
                t.clone(),
                1,
                3,
                OperatorConfig::default(),
                MemStore::default(),
            )
            .unwrap()
        })
        .collect();
    let users = Source::File(data_file()).open(None).unwrap();
    let mut buf = Vec::new();
    let mut results = [0usize; 3];
    for view in Merge::new(users, DEFAULT_T0_MS) {
        let view = view.unwrap();
        let t = (view.user % 3) as usize;
        // Through the wire format, as a job reads it.
        buf.clear();
        encode_into(
            &mut buf,
            tenants[t].as_str(),
            view.user,
            view.page,
            view.time_ms,
        );
        let click = ClickRef::decode(&buf).unwrap();
        let partition = (click.visitor / 3 % 3) as usize;
        let admitted = pipelines[t]
            .on_click(partition, click.visitor, click.page, click.event_time_ms)
            .unwrap();
        assert_eq!(admitted, Admission::Accepted);
        results[t] += pipelines[t].take_results().len();
    }

    let users = naive_users();
    assert_eq!(users.len(), 989_818);
    let mut all_views = 0;
    for (t, pipeline) in pipelines.iter_mut().enumerate() {
        pipeline.finish().unwrap();
        let tail = pipeline.take_results();
        assert!(results[t] + tail.len() > 0);
        let totals = last_totals(&tail).unwrap();
        let mine = users
            .iter()
            .enumerate()
            .filter(|(u, _)| u % 3 == t)
            .map(|(_, p)| p);
        let mut pages = [0u64; 17];
        let (mut views, mut sessions, mut returning) = (0u64, 0u64, 0u64);
        for p in mine {
            views += p.len() as u64;
            let s = p.len().div_ceil(25) as u64;
            sessions += s;
            returning += s - 1;
            for &page in p {
                pages[usize::from(page) - 1] += 1;
            }
        }
        assert_eq!(totals.views, views, "views of {}", tenants[t]);
        assert_eq!(
            totals_by_page(totals),
            pages,
            "per-page views of {}",
            tenants[t]
        );
        assert_eq!(totals.sessions, sessions, "sessions of {}", tenants[t]);
        assert_eq!(
            totals.returning_sessions, returning,
            "returning sessions of {}",
            tenants[t]
        );
        assert_eq!((totals.late, totals.dead_lettered), (0, 0));
        assert_eq!(
            pipeline.active_sessions(),
            0,
            "every session closed at the end"
        );
        all_views += totals.views;
    }
    assert_eq!(all_views, 4_698_794);
}
