//! WebSocket messages between a browser and a gateway (JSON text frames), and close codes.
//!
//! The client authenticates *before* the upgrade (tenant token in `Sec-WebSocket-Protocol` or
//! the `token` query parameter); a missing, bad or expired token is an HTTP 401, never a socket.
//! The upgrade completes once the client is registered in ZooKeeper, and its first frame is
//! the `welcome` (or a close: 1011 when the registration failed, 4002 over capacity).
//!
//! Client → gateway, tagged by `type`:
//!
//! ```json
//! {"type":"subscribe","streams":["pageviews","topn"],"max_rate_hz":4}
//! {"type":"subscribe","streams":["totals"],"after":{"run":2,"seq":5120}}
//! {"type":"unsubscribe","streams":["topn"]}
//! ```
//!
//! Gateway → client:
//!
//! ```json
//! {"type":"welcome","tenant":"acme","client":"c-17","gateway":"gw-1","streams":["pageviews","window","topn","sessions","totals"]}
//! {"type":"result","snapshot":true,"result":{"tenant":"acme","epoch":1,"run":1,"seq":5,…}}
//! {"type":"error","code":"bad_message","message":"expected a JSON object with a \"type\""}
//! ```
//!
//! On `subscribe`, the snapshots are sent at once with `"snapshot": true`, then live results
//! with `"snapshot": false`. A snapshot is the latest result of each stream whose results
//! supersede each other (`window`, `topn`, `totals`), and the newest [`SERIES_KEPT`] of a
//! series (`pageviews`, `sessions`, see [`Stream::is_series`]), oldest first: a chart opened
//! while the job runs starts full, not empty. Snapshots only ever come from the tenant's
//! current run (see [`crate::results`]): once a job started afresh has sent a result, what the
//! job before it left behind is not sent again.
//!
//! `max_rate_hz` caps how often one stream is sent to this client. A client that falls behind
//! gets conflated results: of a stream whose results supersede each other only the newest
//! unsent one is kept; of a series the newest [`SERIES_KEPT`] are, so a burst (a job catching
//! up on its first window) reaches a chart whole. `after` resumes a client that reconnects:
//! nothing at or before that `(run, seq)` is sent to it, snapshots included, so a result
//! reaches it at most once across reconnects, and a reconnect fills in what it missed.
//!
//! A client may also subscribe in the upgrade request itself, with the same fields as query
//! parameters (see [`Subscription::from_query`]):
//!
//! ```text
//! GET /ws?streams=pageviews,topn&max_rate_hz=4&after=2:5120
//! ```
//!
//! is the upgrade followed by `{"type":"subscribe","streams":["pageviews","topn"],
//! "max_rate_hz":4,"after":{"run":2,"seq":5120}}`, except that the client's registration
//! carries its streams from the start (one ZooKeeper write instead of two) and the snapshots
//! follow the welcome without a round trip. A bad parameter is an HTTP 400 before the upgrade.

use serde::{Deserialize, Serialize};

use crate::results::{ResultMsg, Stream};
use crate::tenant::Tenant;

/// Results of a series stream a gateway keeps: per tenant, the newest of the current run, sent
/// as snapshots; per client, the unsent ones, before it drops the oldest. 300 is one sliding
/// window (5 min) of 1-second `pageviews` ticks, what a job's first window emits at once and
/// what the dashboard charts.
pub const SERIES_KEPT: usize = 300;

/// A message from a browser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    Subscribe(Subscription),
    Unsubscribe { streams: Vec<Stream> },
}

/// What a client subscribes to: a `subscribe` message's fields, or the same given as query
/// parameters of the upgrade request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    pub streams: Vec<Stream>,
    /// Most results per second of one stream the client wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate_hz: Option<f64>,
    /// The last result this client received (its `run` and `seq`), when it resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Position>,
}

/// Why the subscription in an upgrade request's query was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueryError {
    #[error("unknown stream {0:?} in streams (known: pageviews, window, topn, sessions, totals)")]
    UnknownStream(String),
    #[error("streams is empty: name at least one stream")]
    NoStreams,
    #[error("{0} given without streams")]
    WithoutStreams(&'static str),
    #[error("{0} given twice")]
    Repeated(&'static str),
    #[error("max_rate_hz must be a positive number, not {0:?}")]
    BadRate(String),
    #[error("after must be RUN:SEQ (two whole numbers), not {0:?}")]
    BadAfter(String),
}

impl Subscription {
    /// Checks what the types cannot: a rate cap must be a positive number.
    pub fn check(&self) -> Result<(), QueryError> {
        match self.max_rate_hz {
            Some(hz) if !(hz > 0.0 && hz.is_finite()) => Err(QueryError::BadRate(hz.to_string())),
            _ => Ok(()),
        }
    }

    /// The subscription in an upgrade request's query string (without the `?`), if it has
    /// one: `streams` (names separated by commas, the parameter may repeat), and optionally
    /// `max_rate_hz` and `after` (`RUN:SEQ`). Other parameters, such as `token`, are not
    /// looked at. Values may be percent-encoded.
    ///
    /// ```
    /// use clickpulse_protocol::results::Stream;
    /// use clickpulse_protocol::ws::{Position, Subscription};
    /// let sub = Subscription::from_query("token=T&streams=pageviews%2Ctopn&after=2:5120")
    ///     .unwrap()
    ///     .unwrap();
    /// assert_eq!(sub.streams, [Stream::PageViews, Stream::TopN]);
    /// assert_eq!(sub.after, Some(Position { run: 2, seq: 5120 }));
    /// assert_eq!(Subscription::from_query("token=T"), Ok(None));
    /// assert!(Subscription::from_query("streams=weather").is_err());
    /// ```
    pub fn from_query(query: &str) -> Result<Option<Subscription>, QueryError> {
        let mut streams: Option<Vec<Stream>> = None;
        let (mut max_rate_hz, mut after) = (None, None);
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "streams" => {
                    let list = streams.get_or_insert_with(Vec::new);
                    for name in value.split(',').filter(|n| !n.is_empty()) {
                        let stream = Stream::parse(name)
                            .ok_or_else(|| QueryError::UnknownStream(name.to_owned()))?;
                        if !list.contains(&stream) {
                            list.push(stream);
                        }
                    }
                }
                "max_rate_hz" => {
                    let hz = value
                        .parse::<f64>()
                        .map_err(|_| QueryError::BadRate(value.to_string()))?;
                    if max_rate_hz.replace(hz).is_some() {
                        return Err(QueryError::Repeated("max_rate_hz"));
                    }
                }
                "after" => {
                    let position = value
                        .split_once(':')
                        .and_then(|(run, seq)| Some((run.parse().ok()?, seq.parse().ok()?)))
                        .map(|(run, seq)| Position { run, seq })
                        .ok_or_else(|| QueryError::BadAfter(value.to_string()))?;
                    if after.replace(position).is_some() {
                        return Err(QueryError::Repeated("after"));
                    }
                }
                _ => {}
            }
        }
        let Some(streams) = streams else {
            return match (max_rate_hz, after) {
                (Some(_), _) => Err(QueryError::WithoutStreams("max_rate_hz")),
                (None, Some(_)) => Err(QueryError::WithoutStreams("after")),
                (None, None) => Ok(None),
            };
        };
        if streams.is_empty() {
            return Err(QueryError::NoStreams);
        }
        let sub = Subscription {
            streams,
            max_rate_hz,
            after,
        };
        sub.check()?;
        Ok(Some(sub))
    }

    /// These fields as query parameters, the form [`Subscription::from_query`] reads:
    /// `streams=pageviews,topn&max_rate_hz=4&after=2:5120`.
    pub fn to_query(&self) -> String {
        let names: Vec<&str> = self.streams.iter().map(|s| s.as_str()).collect();
        let mut query = format!("streams={}", names.join(","));
        if let Some(hz) = self.max_rate_hz {
            query.push_str(&format!("&max_rate_hz={hz}"));
        }
        if let Some(Position { run, seq }) = self.after {
            query.push_str(&format!("&after={run}:{seq}"));
        }
        query
    }
}

/// A place in a tenant's output: a result's `run` and `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    pub run: u64,
    pub seq: u64,
}

/// Machine-readable error codes of an `error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or JSON that is not a known client message.
    BadMessage,
    /// A known message with an invalid value (e.g. a negative rate).
    BadValue,
    /// Binary frames are not part of the protocol.
    BinaryNotSupported,
}

/// A message to a browser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Welcome {
        tenant: Tenant,
        client: String,
        gateway: String,
        streams: Vec<Stream>,
    },
    Result {
        snapshot: bool,
        result: ResultMsg,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// WebSocket close codes used by clickpulse, and whether a client should reconnect.
///
/// | code | name              | meaning                                                  | reconnect      |
/// |------|-------------------|----------------------------------------------------------|----------------|
/// | 1000 | normal            | the client asked to close                                | no             |
/// | 1001 | going away        | the gateway is shutting down                             | yes, backoff   |
/// | 1008 | policy            | token expired or rights revoked while connected          | with new token |
/// | 1009 | too big           | a frame over the gateway's size limit                    | fix the client |
/// | 1011 | internal error    | the gateway failed while serving this client             | yes, backoff   |
/// | 4000 | slow consumer     | the client could not keep up for too long                | yes, backoff   |
/// | 4001 | idle timeout      | no pong within the idle timeout                          | yes            |
/// | 4002 | over capacity     | connection limits reached                                | yes, backoff   |
/// | 4003 | too many messages | frames (any kind) faster than the gateway's message rate | yes, backoff   |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    Normal = 1000,
    GoingAway = 1001,
    Policy = 1008,
    TooBig = 1009,
    InternalError = 1011,
    SlowConsumer = 4000,
    IdleTimeout = 4001,
    OverCapacity = 4002,
    TooManyMessages = 4003,
}

impl CloseCode {
    pub const ALL: [CloseCode; 9] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::Policy,
        CloseCode::TooBig,
        CloseCode::InternalError,
        CloseCode::SlowConsumer,
        CloseCode::IdleTimeout,
        CloseCode::OverCapacity,
        CloseCode::TooManyMessages,
    ];

    pub fn code(self) -> u16 {
        self as u16
    }

    pub fn from_code(code: u16) -> Option<CloseCode> {
        CloseCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Whether a client should reconnect (with backoff) after this close.
    pub fn retry_allowed(self) -> bool {
        matches!(
            self,
            CloseCode::GoingAway
                | CloseCode::InternalError
                | CloseCode::SlowConsumer
                | CloseCode::IdleTimeout
                | CloseCode::OverCapacity
                | CloseCode::TooManyMessages
        )
    }

    /// The close reason text sent with the code.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal closure",
            CloseCode::GoingAway => "gateway shutting down",
            CloseCode::Policy => "token no longer valid",
            CloseCode::TooBig => "frame too large",
            CloseCode::InternalError => "internal error",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::IdleTimeout => "idle timeout",
            CloseCode::OverCapacity => "over capacity",
            CloseCode::TooManyMessages => "too many messages",
        }
    }
}

/// The WebSocket subprotocol a browser offers next to its token:
/// `Sec-WebSocket-Protocol: clickpulse.v1, <token>`; the gateway answers `clickpulse.v1`.
pub const SUBPROTOCOL: &str = "clickpulse.v1";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::ResultBody;

    #[test]
    fn documented_client_examples_parse() {
        let sub: ClientMsg = serde_json::from_str(
            r#"{"type":"subscribe","streams":["pageviews","topn"],"max_rate_hz":4}"#,
        )
        .unwrap();
        assert_eq!(
            sub,
            ClientMsg::Subscribe(Subscription {
                streams: vec![Stream::PageViews, Stream::TopN],
                max_rate_hz: Some(4.0),
                after: None,
            })
        );
        let resume: ClientMsg = serde_json::from_str(
            r#"{"type":"subscribe","streams":["totals"],"after":{"run":2,"seq":5120}}"#,
        )
        .unwrap();
        assert_eq!(
            resume,
            ClientMsg::Subscribe(Subscription {
                streams: vec![Stream::Totals],
                max_rate_hz: None,
                after: Some(Position { run: 2, seq: 5120 }),
            })
        );
        let unsub: ClientMsg =
            serde_json::from_str(r#"{"type":"unsubscribe","streams":["topn"]}"#).unwrap();
        assert_eq!(
            unsub,
            ClientMsg::Unsubscribe {
                streams: vec![Stream::TopN]
            }
        );
    }

    #[test]
    fn unknown_or_malformed_client_messages_are_errors() {
        for bad in [
            r#"{"type":"launch"}"#,
            r#"{"streams":["topn"]}"#,
            r#"{"type":"subscribe","streams":["weather"]}"#,
            r#"{"type":"subscribe","streams":[],"extra":1}"#,
            "not json",
        ] {
            assert!(
                serde_json::from_str::<ClientMsg>(bad).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn a_subscription_in_the_query_reads_like_the_message() {
        let from_query = Subscription::from_query(
            "token=a.b.c&streams=pageviews,topn&streams=topn%2Ctotals&max_rate_hz=4&after=2%3A5120",
        )
        .unwrap()
        .unwrap();
        let ClientMsg::Subscribe(from_message) = serde_json::from_str(
            r#"{"type":"subscribe","streams":["pageviews","topn","totals"],"max_rate_hz":4,"after":{"run":2,"seq":5120}}"#,
        )
        .unwrap() else {
            panic!("not a subscribe");
        };
        assert_eq!(from_query, from_message);
        assert_eq!(Subscription::from_query(""), Ok(None));
        assert_eq!(Subscription::from_query("token=x&v=2"), Ok(None));
    }

    #[test]
    fn a_bad_subscription_in_the_query_says_what_is_wrong() {
        for (query, error) in [
            (
                "streams=topn,weather",
                QueryError::UnknownStream("weather".into()),
            ),
            ("streams=", QueryError::NoStreams),
            ("streams=,", QueryError::NoStreams),
            ("max_rate_hz=4", QueryError::WithoutStreams("max_rate_hz")),
            ("after=1:2", QueryError::WithoutStreams("after")),
            (
                "streams=topn&max_rate_hz=0",
                QueryError::BadRate("0".into()),
            ),
            (
                "streams=topn&max_rate_hz=-1",
                QueryError::BadRate("-1".into()),
            ),
            (
                "streams=topn&max_rate_hz=inf",
                QueryError::BadRate("inf".into()),
            ),
            (
                "streams=topn&max_rate_hz=fast",
                QueryError::BadRate("fast".into()),
            ),
            (
                "streams=topn&max_rate_hz=1&max_rate_hz=2",
                QueryError::Repeated("max_rate_hz"),
            ),
            ("streams=topn&after=2", QueryError::BadAfter("2".into())),
            (
                "streams=topn&after=2:-1",
                QueryError::BadAfter("2:-1".into()),
            ),
            (
                "streams=topn&after=1:2&after=1:3",
                QueryError::Repeated("after"),
            ),
        ] {
            assert_eq!(Subscription::from_query(query), Err(error), "{query}");
        }
    }

    proptest::proptest! {
        #[test]
        fn a_subscription_survives_its_query_form(
            picks in proptest::collection::vec(0..Stream::ALL.len(), 1..8),
            rate in proptest::option::of(0.001f64..1000.0),
            after in proptest::option::of((0u64..u64::MAX, 0u64..u64::MAX)),
        ) {
            let mut streams: Vec<Stream> = Vec::new();
            for stream in picks.into_iter().map(|i| Stream::ALL[i]) {
                if !streams.contains(&stream) {
                    streams.push(stream);
                }
            }
            let sub = Subscription {
                streams,
                max_rate_hz: rate,
                after: after.map(|(run, seq)| Position { run, seq }),
            };
            proptest::prop_assert_eq!(Subscription::from_query(&sub.to_query()), Ok(Some(sub)));
        }

        #[test]
        fn any_query_is_read_or_refused_without_a_panic(query in "[a-z_=&,:%0-9A-F.+-]{0,80}") {
            if let Ok(Some(sub)) = Subscription::from_query(&query) {
                proptest::prop_assert!(!sub.streams.is_empty());
                proptest::prop_assert!(sub.check().is_ok());
            }
        }
    }

    #[test]
    fn server_messages_round_trip() {
        let msgs = vec![
            ServerMsg::Welcome {
                tenant: Tenant::new("acme").unwrap(),
                client: "c-17".into(),
                gateway: "gw-1".into(),
                streams: Stream::ALL.to_vec(),
            },
            ServerMsg::Result {
                snapshot: true,
                result: ResultMsg {
                    tenant: Tenant::new("acme").unwrap(),
                    epoch: 1,
                    run: 1,
                    seq: 5,
                    window_start_ms: 0,
                    window_end_ms: 1000,
                    watermark_ms: 1000,
                    body: ResultBody::TopN {
                        n: 10,
                        pages: vec![],
                    },
                },
            },
            ServerMsg::Error {
                code: ErrorCode::BadMessage,
                message: "x".into(),
            },
        ];
        for msg in msgs {
            let json = serde_json::to_string(&msg).unwrap();
            assert_eq!(serde_json::from_str::<ServerMsg>(&json).unwrap(), msg);
        }
    }

    #[test]
    fn close_codes_are_distinct_and_documented() {
        for c in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(c.code()), Some(c));
            assert!(!c.reason().is_empty());
        }
        assert!(CloseCode::SlowConsumer.retry_allowed());
        assert!(CloseCode::TooManyMessages.retry_allowed());
        assert!(!CloseCode::TooBig.retry_allowed());
        assert_eq!(CloseCode::from_code(4999), None);
    }
}
