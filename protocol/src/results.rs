//! Results computed by a tenant job, as JSON.
//!
//! The same JSON object travels in a ZeroMQ result frame (engine → gateway), is sent unchanged
//! to browsers inside a WebSocket `result` message, and is written to `results.<tenant>`.
//! Every result names its tenant, stream, window bounds, the watermark it was computed at, the
//! ownership epoch of the job that computed it, the run it belongs to and its sequence number in
//! that run.
//!
//! ```json
//! {"tenant":"acme","epoch":3,"run":2,"seq":1042,"window_start_ms":938476800000,
//!  "window_end_ms":938477100000,"watermark_ms":938477100000,
//!  "stream":"topn","data":{"n":10,"pages":[{"page":"frontpage","views":412},
//!  {"page":"news","views":198}]}}
//! ```
//!
//! In `results.<tenant>` (one partition, in emission order) a result is one record: the key is
//! its stream's name (`"topn"`, see [`Stream::as_str`]), the value this JSON.
//!
//! **Runs and sequence numbers.** A job that starts afresh begins a *run*, named by its owner's
//! epoch, and numbers its results 1, 2, 3…; a job that resumes from a checkpoint (a takeover
//! after a crash, a hand-off) continues the run and its numbering, and re-emits, with the same
//! `run` and `seq` and the same content, the results computed after the checkpoint. Runs only
//! grow, since epochs do. Receivers therefore keep, per tenant, the newest epoch seen and the
//! last `(run, seq)` delivered, and drop a result
//!
//! - whose `epoch` is older than the newest seen: it comes from a fenced-off owner;
//! - whose `(run, seq)` is not above the last delivered (compared as a pair): a duplicate,
//!   typically re-emitted after a restore.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::tenant::Tenant;

/// The streams a job produces and a client can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Page views per page per tick (1 s of event time).
    PageViews,
    /// Page views per page in a sliding window (default 5 min, sliding every 10 s).
    Window,
    /// The top-N pages of a sliding window.
    TopN,
    /// Session statistics: active, closed, bounce rate, new vs returning.
    Sessions,
    /// Cumulative totals since the job's first offset.
    Totals,
}

impl Stream {
    pub const ALL: [Stream; 5] = [
        Stream::PageViews,
        Stream::Window,
        Stream::TopN,
        Stream::Sessions,
        Stream::Totals,
    ];

    /// The name used on the wire (`"pageviews"`, `"window"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::PageViews => "pageviews",
            Stream::Window => "window",
            Stream::TopN => "topn",
            Stream::Sessions => "sessions",
            Stream::Totals => "totals",
        }
    }

    pub fn parse(name: &str) -> Option<Stream> {
        Stream::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether each result covers an interval of its own (`pageviews` per tick, `sessions`
    /// per slide), so a chart wants every one; the other streams' results each supersede the
    /// previous (a window that slid on, totals that grew). Gateways conflate accordingly (see
    /// [`crate::ws`]).
    ///
    /// ```
    /// use clickpulse_protocol::results::Stream;
    /// assert!(Stream::PageViews.is_series());
    /// assert!(!Stream::TopN.is_series());
    /// ```
    pub fn is_series(self) -> bool {
        matches!(self, Stream::PageViews | Stream::Sessions)
    }
}

/// Views of one page. The name borrows from the page catalogue when it can, so building a
/// result allocates no strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCount {
    pub page: Cow<'static, str>,
    pub views: u64,
}

/// Session statistics for one interval of event time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStats {
    /// Sessions open at the end of the interval.
    pub active: u64,
    /// Sessions opened during the interval.
    pub opened: u64,
    /// Sessions closed (inactivity gap passed) during the interval.
    pub closed: u64,
    /// Closed sessions with exactly one view.
    pub bounces: u64,
    /// `bounces / closed`, 0 when nothing closed.
    pub bounce_rate: f64,
    /// Opened sessions of visitors never seen before.
    pub new_visitors: u64,
    /// Opened sessions of visitors with history.
    pub returning_visitors: u64,
    /// Mean views per closed session.
    pub avg_views: f64,
    /// Mean duration (first to last view) per closed session, ms.
    pub avg_duration_ms: f64,
}

/// Cumulative totals since the job's first offset; lets the outside check exactness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub views: u64,
    pub pages: Vec<PageCount>,
    pub sessions: u64,
    pub returning_sessions: u64,
    pub late: u64,
    pub dead_lettered: u64,
}

/// What a result carries, tagged by its stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stream", content = "data", rename_all = "lowercase")]
pub enum ResultBody {
    PageViews { pages: Vec<PageCount> },
    Window { pages: Vec<PageCount> },
    TopN { n: u32, pages: Vec<PageCount> },
    Sessions(SessionStats),
    Totals(Totals),
}

impl ResultBody {
    pub fn stream(&self) -> Stream {
        match self {
            ResultBody::PageViews { .. } => Stream::PageViews,
            ResultBody::Window { .. } => Stream::Window,
            ResultBody::TopN { .. } => Stream::TopN,
            ResultBody::Sessions(_) => Stream::Sessions,
            ResultBody::Totals(_) => Stream::Totals,
        }
    }
}

/// One result of a tenant job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMsg {
    pub tenant: Tenant,
    /// Ownership epoch of the job that computed it.
    pub epoch: u64,
    /// The run: the epoch of the owner whose fresh start began this numbering.
    #[serde(default)]
    pub run: u64,
    /// Position in the run, from 1.
    pub seq: u64,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub watermark_ms: i64,
    #[serde(flatten)]
    pub body: ResultBody,
}

impl ResultMsg {
    pub fn stream(&self) -> Stream {
        self.body.stream()
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data with string keys into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Where it stands in its tenant's output: receivers deliver in increasing order.
    pub fn position(&self) -> (u64, u64) {
        (self.run, self.seq)
    }
}

/// A receiver's filter of one tenant's results (see the module docs): drops what an older
/// owner sends and what was delivered already.
///
/// ```
/// use clickpulse_protocol::results::{Admit, Order};
/// let mut order = Order::default();
/// assert_eq!(order.admit(3, 3, 1), Admit::Deliver);
/// assert_eq!(order.admit(3, 3, 2), Admit::Deliver);
/// // A new owner restored the run from a checkpoint and re-emits seq 2: a duplicate.
/// assert_eq!(order.admit(4, 3, 2), Admit::Duplicate);
/// assert_eq!(order.admit(4, 3, 3), Admit::Deliver);
/// // The old owner, still running somewhere, is fenced off.
/// assert_eq!(order.admit(3, 3, 4), Admit::StaleEpoch);
/// // A later fresh start begins a new run at 1.
/// assert_eq!(order.admit(6, 6, 1), Admit::Deliver);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Order {
    pub epoch: u64,
    pub run: u64,
    pub seq: u64,
}

/// What [`Order::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Deliver,
    /// Already delivered (same run, not a higher seq), or of an older run.
    Duplicate,
    /// From an owner older than one already heard from.
    StaleEpoch,
}

impl Order {
    pub fn admit(&mut self, epoch: u64, run: u64, seq: u64) -> Admit {
        if epoch < self.epoch {
            return Admit::StaleEpoch;
        }
        // Even a duplicate proves a newer owner exists: the older one is fenced from now on.
        self.epoch = epoch;
        if (run, seq) <= (self.run, self.seq) {
            return Admit::Duplicate;
        }
        (self.run, self.seq) = (run, seq);
        Admit::Deliver
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topn() -> ResultMsg {
        ResultMsg {
            tenant: Tenant::new("acme").unwrap(),
            epoch: 3,
            run: 2,
            seq: 1042,
            window_start_ms: 938_476_800_000,
            window_end_ms: 938_477_100_000,
            watermark_ms: 938_477_100_000,
            body: ResultBody::TopN {
                n: 10,
                pages: vec![
                    PageCount {
                        page: "frontpage".into(),
                        views: 412,
                    },
                    PageCount {
                        page: "news".into(),
                        views: 198,
                    },
                ],
            },
        }
    }

    #[test]
    fn documented_json_example_parses_to_the_same_message() {
        let doc = r#"{"tenant":"acme","epoch":3,"run":2,"seq":1042,"window_start_ms":938476800000,
            "window_end_ms":938477100000,"watermark_ms":938477100000,
            "stream":"topn","data":{"n":10,"pages":[{"page":"frontpage","views":412},
            {"page":"news","views":198}]}}"#;
        let parsed: ResultMsg = serde_json::from_str(doc).unwrap();
        assert_eq!(parsed, topn());
        assert_eq!(parsed.stream(), Stream::TopN);
    }

    #[test]
    fn every_stream_round_trips() {
        let stats = SessionStats {
            active: 5,
            opened: 2,
            closed: 4,
            bounces: 1,
            bounce_rate: 0.25,
            new_visitors: 1,
            returning_visitors: 1,
            avg_views: 3.5,
            avg_duration_ms: 12_000.0,
        };
        let totals = Totals {
            views: 10,
            pages: vec![PageCount {
                page: "news".into(),
                views: 10,
            }],
            sessions: 3,
            returning_sessions: 1,
            late: 0,
            dead_lettered: 2,
        };
        let bodies = vec![
            ResultBody::PageViews { pages: vec![] },
            ResultBody::Window {
                pages: vec![PageCount {
                    page: "tech".into(),
                    views: 1,
                }],
            },
            ResultBody::TopN {
                n: 3,
                pages: vec![],
            },
            ResultBody::Sessions(stats),
            ResultBody::Totals(totals),
        ];
        for body in bodies {
            let msg = ResultMsg { body, ..topn() };
            let json = msg.to_json();
            let back: ResultMsg = serde_json::from_slice(&json).unwrap();
            assert_eq!(back, msg);
            let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
            assert_eq!(value["stream"], msg.stream().as_str());
        }
    }

    #[test]
    fn ratios_parse_back_exactly() {
        // Averages and rates are ratios of counts; found lossy (1.2962962962962963 came back
        // as …965) before serde_json's float_roundtrip.
        for views in 1..200u32 {
            for sessions in 1..60u32 {
                let ratio = f64::from(views) / f64::from(sessions);
                let stats = SessionStats {
                    active: 0,
                    opened: 0,
                    closed: sessions.into(),
                    bounces: 0,
                    bounce_rate: f64::from(sessions) / f64::from(views + sessions),
                    new_visitors: 0,
                    returning_visitors: 0,
                    avg_views: ratio,
                    avg_duration_ms: ratio * 1_000.0 / 7.0,
                };
                let msg = ResultMsg {
                    body: ResultBody::Sessions(stats),
                    ..topn()
                };
                let back: ResultMsg = serde_json::from_slice(&msg.to_json()).unwrap();
                assert_eq!(back, msg);
            }
        }
    }

    #[test]
    fn stream_names_parse_back() {
        for s in Stream::ALL {
            assert_eq!(Stream::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert_eq!(Stream::parse("nope"), None);
    }
}
