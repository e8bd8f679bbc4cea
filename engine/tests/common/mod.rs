//! A naive oracle: recomputes every stream from the raw events by brute force, with none of the
//! engine's data structures (no reorder buffer, panes, timers or Bloom filter). Only the
//! definitions are shared:
//! - an event is late when its time is below the watermark at its arrival; the watermark is the
//!   minimum over partitions of their newest time minus the lateness, once all have delivered;
//! - a visitor's view continues its session when it comes less than `gap` after the previous
//!   one; a session is active on `[start, last + gap)`;
//! - a window `[E − size, E)` (E a multiple of the slide) is reported when it has views; a tick
//!   when it has views; the session stats of `(E − slide, E]`-ending intervals when anything was
//!   active, opened or closed.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use clickpulse_engine::OperatorConfig;
use clickpulse_protocol::PageId;
use clickpulse_protocol::pages::{PAGE_COUNT, page_name};
use clickpulse_protocol::results::{PageCount, ResultBody, ResultMsg, SessionStats};

#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub partition: usize,
    pub visitor: u64,
    pub page: u16,
    pub time_ms: i64,
}

pub struct Expected {
    pub pageviews: Vec<(i64, i64, ResultBody)>,
    pub window: Vec<(i64, i64, ResultBody)>,
    pub topn: Vec<(i64, i64, ResultBody)>,
    pub sessions: Vec<(i64, i64, ResultBody)>,
    pub views: u64,
    pub pages: [u64; PAGE_COUNT],
    pub late: u64,
    pub dead: u64,
    pub session_count: u64,
    pub returning_sessions: u64,
}

fn named(counts: &[u64; PAGE_COUNT]) -> Vec<PageCount> {
    (0..PAGE_COUNT)
        .filter(|i| counts[*i] > 0)
        .map(|i| PageCount {
            page: page_name(PageId(i as u16 + 1)).unwrap().into(),
            views: counts[i],
        })
        .collect()
}

struct Session {
    start: i64,
    last: i64,
    views: u32,
    returning: bool,
}

pub fn oracle(config: &OperatorConfig, partitions: usize, arrivals: &[Arrival]) -> Expected {
    // 1. Which events count.
    let mut newest: Vec<Option<i64>> = vec![None; partitions];
    let mut watermark = i64::MIN;
    let mut accepted = Vec::new();
    let (mut late, mut dead) = (0, 0);
    for a in arrivals {
        if a.page == 0 || usize::from(a.page) > PAGE_COUNT {
            dead += 1;
            continue;
        }
        if a.time_ms < watermark {
            late += 1;
            continue;
        }
        accepted.push(*a);
        let n = &mut newest[a.partition];
        *n = Some(n.map_or(a.time_ms, |x| x.max(a.time_ms)));
        if newest.iter().all(Option::is_some) {
            let min = newest.iter().map(|n| n.unwrap()).min().unwrap();
            watermark = watermark.max(min - config.allowed_lateness_ms);
        }
    }

    // 2. Ticks and windows by brute force.
    let mut pages = [0u64; PAGE_COUNT];
    for a in &accepted {
        pages[usize::from(a.page) - 1] += 1;
    }
    let count = |from: i64, to: i64| {
        let mut c = [0u64; PAGE_COUNT];
        for a in accepted
            .iter()
            .filter(|a| a.time_ms >= from && a.time_ms < to)
        {
            c[usize::from(a.page) - 1] += 1;
        }
        c
    };
    let ticks: BTreeSet<i64> = accepted
        .iter()
        .map(|a| a.time_ms.div_euclid(config.tick_ms) * config.tick_ms)
        .collect();
    let pageviews = ticks
        .iter()
        .map(|&s| {
            let e = s + config.tick_ms;
            (
                s,
                e,
                ResultBody::PageViews {
                    pages: named(&count(s, e)),
                },
            )
        })
        .collect();
    let slide = config.slide_ms;
    let mut window_ends = BTreeSet::new();
    for a in &accepted {
        let first = a.time_ms.div_euclid(slide) * slide + slide;
        let mut e = first;
        while e - config.window_ms <= a.time_ms {
            window_ends.insert(e);
            e += slide;
        }
    }
    let mut window = Vec::new();
    let mut topn = Vec::new();
    for &e in &window_ends {
        let s = e - config.window_ms;
        let c = count(s, e);
        window.push((s, e, ResultBody::Window { pages: named(&c) }));
        let mut top = named(&c);
        top.sort_by(|x, y| y.views.cmp(&x.views).then(x.page.cmp(&y.page)));
        top.truncate(config.top_n as usize);
        topn.push((
            s,
            e,
            ResultBody::TopN {
                n: config.top_n,
                pages: top,
            },
        ));
    }

    // 3. Sessions: per visitor, sorted views split at gaps.
    let mut by_visitor: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
    for a in &accepted {
        by_visitor.entry(a.visitor).or_default().push(a.time_ms);
    }
    let mut sessions = Vec::new();
    for times in by_visitor.values_mut() {
        times.sort();
        let mut current: Option<Session> = None;
        let mut had_session = false;
        for &t in times.iter() {
            match &mut current {
                Some(s) if t - s.last < config.session_gap_ms => {
                    s.last = t;
                    s.views += 1;
                }
                _ => {
                    if let Some(s) = current.take() {
                        sessions.push(s);
                        had_session = true;
                    }
                    current = Some(Session {
                        start: t,
                        last: t,
                        views: 1,
                        returning: had_session,
                    });
                }
            }
        }
        sessions.extend(current);
    }
    let mut ends = BTreeSet::new();
    for s in &sessions {
        let close = s.last + config.session_gap_ms;
        let mut e = s.start.div_euclid(slide) * slide + slide;
        while e <= close.div_euclid(slide) * slide + slide {
            ends.insert(e);
            e += slide;
        }
    }
    let mut session_results = Vec::new();
    for &e in &ends {
        let in_interval = |t: i64| t >= e - slide && t < e;
        let active = sessions
            .iter()
            .filter(|s| s.start < e && e <= s.last + config.session_gap_ms)
            .count() as u64;
        let opened: Vec<&Session> = sessions.iter().filter(|s| in_interval(s.start)).collect();
        let closed: Vec<&Session> = sessions
            .iter()
            .filter(|s| in_interval(s.last + config.session_gap_ms))
            .collect();
        if active == 0 && opened.is_empty() && closed.is_empty() {
            continue;
        }
        let n = closed.len() as u64;
        let per = |x: u64| if n == 0 { 0.0 } else { x as f64 / n as f64 };
        let bounces = closed.iter().filter(|s| s.views == 1).count() as u64;
        let views: u64 = closed.iter().map(|s| u64::from(s.views)).sum();
        let duration: u64 = closed.iter().map(|s| (s.last - s.start) as u64).sum();
        let returning = opened.iter().filter(|s| s.returning).count() as u64;
        session_results.push((
            e - slide,
            e,
            ResultBody::Sessions(SessionStats {
                active,
                opened: opened.len() as u64,
                closed: n,
                bounces,
                bounce_rate: per(bounces),
                new_visitors: opened.len() as u64 - returning,
                returning_visitors: returning,
                avg_views: per(views),
                avg_duration_ms: per(duration),
            }),
        ));
    }
    Expected {
        pageviews,
        window,
        topn,
        sessions: session_results,
        views: accepted.len() as u64,
        pages,
        late,
        dead,
        session_count: sessions.len() as u64,
        returning_sessions: sessions.iter().filter(|s| s.returning).count() as u64,
    }
}

/// The engine's results of one stream as `(start, end, body)`, in emission order.
pub fn stream(results: &[ResultMsg], name: &str) -> Vec<(i64, i64, ResultBody)> {
    results
        .iter()
        .filter(|r| r.stream().as_str() == name)
        .map(|r| (r.window_start_ms, r.window_end_ms, r.body.clone()))
        .collect()
}
