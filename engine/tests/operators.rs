//! The operators against the naive oracle, snapshot/restore, and the full dataset.
#![allow(clippy::unwrap_used)] // a failed unwrap in a test helper is that test failing

mod common;

use clickpulse_engine::pipeline::{self, totals_by_page};
use clickpulse_engine::{Admission, MemStore, OperatorConfig, Pipeline};
use clickpulse_protocol::results::{ResultMsg, Totals};
use clickpulse_protocol::{PageId, Tenant};
use common::{Arrival, oracle, stream};
use proptest::prelude::*;

fn acme() -> Tenant {
    Tenant::new("acme").unwrap()
}

fn run(config: &OperatorConfig, partitions: usize, arrivals: &[Arrival]) -> Vec<ResultMsg> {
    let mut p = Pipeline::new(acme(), 1, partitions, config.clone(), MemStore::default()).unwrap();
    for a in arrivals {
        p.on_click(a.partition, a.visitor, PageId(a.page), a.time_ms)
            .unwrap();
    }
    p.finish().unwrap();
    p.take_results()
}

fn last_totals(results: &[ResultMsg]) -> Totals {
    pipeline::last_totals(results).cloned().unwrap_or(Totals {
        views: 0,
        pages: vec![],
        sessions: 0,
        returning_sessions: 0,
        late: 0,
        dead_lettered: 0,
    })
}

/// Random settings at a small time scale, so streams cross many boundaries.
fn configs() -> impl Strategy<Value = OperatorConfig> {
    (1i64..30, 1i64..25, 1i64..6, 1i64..120, 0i64..40, 1u32..6).prop_map(
        |(tick, slide, panes, gap, lateness, n)| OperatorConfig {
            tick_ms: tick,
            slide_ms: slide,
            window_ms: slide * panes,
            session_gap_ms: gap,
            allowed_lateness_ms: lateness,
            top_n: n,
            expected_visitors: 64,
            history_batch: 4,
            ..OperatorConfig::default()
        },
    )
}

/// Per partition a roughly increasing clock with jitter (out-of-order and late events), an
/// occasional unknown page, and partitions interleaved at random.
fn streams() -> impl Strategy<Value = (usize, Vec<Arrival>)> {
    (1usize..4).prop_flat_map(|partitions| {
        let event = (
            0..partitions,
            0u64..12,
            0u16..19,
            0i64..25,
            0i64..60,
            any::<bool>(),
        );
        (Just(partitions), proptest::collection::vec(event, 0..250)).prop_map(
            |(partitions, raw)| {
                let mut clocks = vec![0i64; partitions];
                let arrivals = raw
                    .into_iter()
                    .map(|(p, visitor, page, step, jitter, jump)| {
                        clocks[p] += step + if jump { 150 } else { 0 };
                        Arrival {
                            partition: p,
                            visitor,
                            page: if page == 0 || page == 18 {
                                page
                            } else {
                                page.min(17)
                            },
                            time_ms: clocks[p] - jitter,
                        }
                    })
                    .collect();
                (partitions, arrivals)
            },
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn every_stream_matches_the_naive_oracle(config in configs(), (partitions, arrivals) in streams()) {
        let results = run(&config, partitions, &arrivals);
        let expected = oracle(&config, partitions, &arrivals);
        prop_assert_eq!(stream(&results, "pageviews"), expected.pageviews);
        prop_assert_eq!(stream(&results, "window"), expected.window);
        prop_assert_eq!(stream(&results, "topn"), expected.topn);
        prop_assert_eq!(stream(&results, "sessions"), expected.sessions);
        let totals = last_totals(&results);
        prop_assert_eq!(totals.views, expected.views);
        prop_assert_eq!(totals_by_page(&totals), expected.pages);
        prop_assert_eq!(totals.late, expected.late);
        prop_assert_eq!(totals.dead_lettered, expected.dead);
        prop_assert_eq!(totals.sessions, expected.session_count);
        prop_assert_eq!(totals.returning_sessions, expected.returning_sessions);
        // numbered 1, 2, 3, … in emission order
        let seqs: Vec<u64> = results.iter().map(|r| r.seq).collect();
        prop_assert_eq!(seqs, (1..=results.len() as u64).collect::<Vec<_>>());
    }

    #[test]
    fn snapshot_then_restore_gives_the_same_subsequent_output(
        config in configs(),
        (partitions, arrivals) in streams(),
        cut in 0.0f64..1.0,
    ) {
        let cut = (arrivals.len() as f64 * cut) as usize;
        let mut whole = Pipeline::new(acme(), 1, partitions, config.clone(), MemStore::default()).unwrap();
        for a in &arrivals[..cut] {
            whole.on_click(a.partition, a.visitor, PageId(a.page), a.time_ms).unwrap();
        }
        whole.take_results();
        // Through bytes, as a checkpoint would travel.
        let state = Pipeline::<MemStore>::state_from_bytes(&whole.snapshot_bytes().unwrap()).unwrap();
        let mut restored = Pipeline::restore(acme(), 1, state, whole.store().clone());
        for p in [&mut whole, &mut restored] {
            for a in &arrivals[cut..] {
                p.on_click(a.partition, a.visitor, PageId(a.page), a.time_ms).unwrap();
            }
            p.finish().unwrap();
        }
        let a: Vec<Vec<u8>> = whole.take_results().iter().map(ResultMsg::to_json).collect();
        let b: Vec<Vec<u8>> = restored.take_results().iter().map(ResultMsg::to_json).collect();
        prop_assert_eq!(a, b);
    }
}

#[test]
fn late_and_malformed_events_are_counted_never_a_panic() {
    let config = OperatorConfig::default();
    let mut p = Pipeline::new(acme(), 1, 1, config, MemStore::default()).unwrap();
    assert_eq!(
        p.on_click(0, 1, PageId(1), 100_000).unwrap(),
        Admission::Accepted
    );
    assert_eq!(
        p.on_click(0, 1, PageId(1), 90_000).unwrap(),
        Admission::Late
    );
    assert_eq!(
        p.on_click(0, 1, PageId(0), 100_000).unwrap(),
        Admission::UnknownPage
    );
    assert_eq!(
        p.on_click(0, 1, PageId(999), 100_000).unwrap(),
        Admission::UnknownPage
    );
    assert_eq!(
        p.on_click(0, 1, PageId(2), i64::MAX).unwrap(),
        Admission::BadTime
    );
    assert_eq!(
        p.on_click(0, 1, PageId(2), i64::MIN).unwrap(),
        Admission::BadTime
    );
    p.finish().unwrap();
    let totals = last_totals(&p.take_results());
    assert_eq!((totals.views, totals.late, totals.dead_lettered), (1, 1, 4));
}

#[test]
fn a_restored_job_resumes_the_sequence_numbers_and_uses_its_own_epoch() {
    let config = OperatorConfig {
        slide_ms: 1_000,
        window_ms: 2_000,
        ..Default::default()
    };
    let mut p = Pipeline::new(acme(), 3, 1, config, MemStore::default()).unwrap();
    for i in 0..20 {
        p.on_click(0, i, PageId(1), i as i64 * 1_000).unwrap();
    }
    let before = p.take_results();
    let last_seq = before.last().unwrap().seq;
    let mut q = Pipeline::restore(acme(), 4, p.snapshot(), p.store().clone());
    q.finish().unwrap();
    let after = q.take_results();
    assert_eq!(after.first().unwrap().seq, last_seq + 1);
    assert!(after.iter().all(|r| r.epoch == 4));
}
