//! Dead letters: click records a job could not use, kept in `dead.<tenant>` with the reason.
//!
//! A dead letter carries the source record unchanged, so nothing is lost and it can be
//! replayed once fixed:
//!
//! | part      | contents                                                                 |
//! |-----------|--------------------------------------------------------------------------|
//! | key       | the source record's key, unchanged (none if it had none)                 |
//! | value     | the source record's value, unchanged (none if it had none)               |
//! | `reason`  | header: why it was rejected, UTF-8 text                                  |
//! | `source`  | header: where it came from, `<topic>/<partition>@<offset>`               |
//!
//! The topic has one partition: dead letters are in the order the job met them.
//!
//! ```
//! use clickpulse_protocol::dead::SourcePosition;
//! let source = SourcePosition { topic: "clicks.acme".into(), partition: 2, offset: 1234 };
//! assert_eq!(source.to_string(), "clicks.acme/2@1234");
//! assert_eq!("clicks.acme/2@1234".parse::<SourcePosition>().unwrap(), source);
//! ```

use std::fmt;
use std::str::FromStr;

/// Header holding why the record was rejected.
pub const REASON_HEADER: &str = "reason";
/// Header holding the record's [`SourcePosition`].
pub const SOURCE_HEADER: &str = "source";

/// Where a dead-lettered record was in its source topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePosition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl fmt::Display for SourcePosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

/// A `source` header that is not `<topic>/<partition>@<offset>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a source position (topic/partition@offset): {0:?}")]
pub struct BadSourcePosition(pub String);

impl FromStr for SourcePosition {
    type Err = BadSourcePosition;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadSourcePosition(s.to_owned());
        // Topic names cannot hold '/' or '@', so the last of each splits unambiguously.
        let (rest, offset) = s.rsplit_once('@').ok_or_else(bad)?;
        let (topic, partition) = rest.rsplit_once('/').ok_or_else(bad)?;
        if topic.is_empty() {
            return Err(bad());
        }
        Ok(SourcePosition {
            topic: topic.to_owned(),
            partition: partition.parse().map_err(|_| bad())?,
            offset: offset.parse().map_err(|_| bad())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_bad_ones_are_errors() {
        let p = SourcePosition {
            topic: "clicks.a-b_c".into(),
            partition: 0,
            offset: 0,
        };
        assert_eq!(p.to_string().parse::<SourcePosition>().unwrap(), p);
        for bad in [
            "",
            "clicks.acme",
            "clicks.acme/1",
            "/1@2",
            "clicks.acme/x@2",
            "clicks.acme/1@-",
        ] {
            assert!(bad.parse::<SourcePosition>().is_err(), "{bad:?}");
        }
    }
}
