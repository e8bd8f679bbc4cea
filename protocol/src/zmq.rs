//! ZeroMQ result frames (engine PUSH → gateway PULL).
//!
//! Each result is one multipart message of five frames. The routing fields come first, in
//! fixed binary form, so a gateway can drop duplicates and stale epochs and pick the clients to
//! fan out to without parsing the JSON; the JSON is forwarded to browsers as it is.
//!
//! ```text
//! frame 0  b"cp2"                      tag and version of this frame layout
//! frame 1  tenant name (UTF-8)         e.g. b"acme"
//! frame 2  24 bytes                    epoch, run, seq (each u64 BE; see `results`)
//! frame 3  stream name (UTF-8)         e.g. b"topn"
//! frame 4  result JSON                 a `results::ResultMsg`
//! ```
//!
//! ```
//! use clickpulse_protocol::zmq::ResultFrame;
//! use clickpulse_protocol::{Tenant, results::Stream};
//! let frame = ResultFrame { tenant: Tenant::new("acme").unwrap(), epoch: 3, run: 2, seq: 9,
//!                           stream: Stream::TopN, json: b"{}".to_vec() };
//! let parts = frame.encode();
//! assert_eq!(parts[0], b"cp2");
//! assert_eq!(parts[2], [0,0,0,0,0,0,0,3, 0,0,0,0,0,0,0,2, 0,0,0,0,0,0,0,9]);
//! assert_eq!(ResultFrame::decode(&parts).unwrap(), frame);
//! ```

use crate::results::{ResultMsg, Stream};
use crate::tenant::Tenant;

/// Tag of frame 0.
/// (`cp1`, without the run, is refused: engines and gateways of one deployment share a version.)
pub const FRAME_TAG: &[u8] = b"cp2";
/// Length of frame 2.
pub const HEADER_LEN: usize = 24;
/// Number of frames in a result message.
pub const FRAME_COUNT: usize = 5;
/// Largest JSON payload a gateway accepts; larger frames are dropped and counted.
pub const MAX_JSON_LEN: usize = 1 << 20;

/// A decoded result frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultFrame {
    pub tenant: Tenant,
    pub epoch: u64,
    pub run: u64,
    pub seq: u64,
    pub stream: Stream,
    pub json: Vec<u8>,
}

/// Why a multipart message is not a result frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message has {0} frames; a result has {FRAME_COUNT}")]
    FrameCount(usize),
    #[error("frame 0 is not the tag \"cp2\"")]
    BadTag,
    #[error("bad tenant in frame 1: {0}")]
    BadTenant(String),
    #[error("frame 2 has {0} bytes; epoch, run and seq take {HEADER_LEN}")]
    BadHeader(usize),
    #[error("unknown stream {0:?} in frame 3")]
    UnknownStream(String),
    #[error("result JSON of {0} bytes is over the {MAX_JSON_LEN}-byte limit")]
    TooLarge(usize),
}

impl ResultFrame {
    /// The frame for a result message (serializes it to JSON once).
    pub fn from_result(msg: &ResultMsg) -> Self {
        ResultFrame {
            tenant: msg.tenant.clone(),
            epoch: msg.epoch,
            run: msg.run,
            seq: msg.seq,
            stream: msg.stream(),
            json: msg.to_json(),
        }
    }

    pub fn encode(&self) -> Vec<Vec<u8>> {
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(&self.epoch.to_be_bytes());
        header.extend_from_slice(&self.run.to_be_bytes());
        header.extend_from_slice(&self.seq.to_be_bytes());
        vec![
            FRAME_TAG.to_vec(),
            self.tenant.as_str().as_bytes().to_vec(),
            header,
            self.stream.as_str().as_bytes().to_vec(),
            self.json.clone(),
        ]
    }

    /// Decodes a multipart message; any `AsRef<[u8]>` frame type (zeromq's `Bytes`) works.
    pub fn decode<B: AsRef<[u8]>>(frames: &[B]) -> Result<Self, FrameError> {
        let [tag, tenant, header, stream, json] = frames else {
            return Err(FrameError::FrameCount(frames.len()));
        };
        if tag.as_ref() != FRAME_TAG {
            return Err(FrameError::BadTag);
        }
        let tenant = std::str::from_utf8(tenant.as_ref())
            .map_err(|_| FrameError::BadTenant("not UTF-8".into()))
            .and_then(|t| Tenant::new(t).map_err(|e| FrameError::BadTenant(e.to_string())))?;
        let header = header.as_ref();
        if header.len() != HEADER_LEN {
            return Err(FrameError::BadHeader(header.len()));
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let stream_name = String::from_utf8_lossy(stream.as_ref());
        let stream = Stream::parse(&stream_name)
            .ok_or_else(|| FrameError::UnknownStream(stream_name.into()))?;
        let json = json.as_ref();
        if json.len() > MAX_JSON_LEN {
            return Err(FrameError::TooLarge(json.len()));
        }
        Ok(ResultFrame {
            tenant,
            epoch: u64_at(0),
            run: u64_at(8),
            seq: u64_at(16),
            stream,
            json: json.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{PageCount, ResultBody};

    fn sample() -> ResultFrame {
        let msg = ResultMsg {
            tenant: Tenant::new("acme").unwrap(),
            epoch: 2,
            run: 1,
            seq: 77,
            window_start_ms: 0,
            window_end_ms: 1000,
            watermark_ms: 1000,
            body: ResultBody::PageViews {
                pages: vec![PageCount {
                    page: "news".into(),
                    views: 3,
                }],
            },
        };
        ResultFrame::from_result(&msg)
    }

    #[test]
    fn round_trips_and_carries_the_json_unchanged() {
        let frame = sample();
        let back = ResultFrame::decode(&frame.encode()).unwrap();
        assert_eq!(back, frame);
        let msg: ResultMsg = serde_json::from_slice(&back.json).unwrap();
        assert_eq!(
            (msg.epoch, msg.run, msg.seq, msg.stream()),
            (2, 1, 77, Stream::PageViews)
        );
    }

    #[test]
    fn rejects_bad_frames() {
        let parts = sample().encode();
        assert_eq!(
            ResultFrame::decode(&parts[..4]),
            Err(FrameError::FrameCount(4))
        );
        let mut bad = parts.clone();
        bad[0] = b"xx1".to_vec();
        assert_eq!(ResultFrame::decode(&bad), Err(FrameError::BadTag));
        let mut bad = parts.clone();
        bad[1] = b"Not/A/Tenant".to_vec();
        assert!(matches!(
            ResultFrame::decode(&bad),
            Err(FrameError::BadTenant(_))
        ));
        let mut bad = parts.clone();
        bad[2] = vec![0; 3];
        assert_eq!(ResultFrame::decode(&bad), Err(FrameError::BadHeader(3)));
        let mut bad = parts.clone();
        bad[3] = b"weather".to_vec();
        assert!(matches!(
            ResultFrame::decode(&bad),
            Err(FrameError::UnknownStream(_))
        ));
        let mut bad = parts;
        bad[4] = vec![b' '; MAX_JSON_LEN + 1];
        assert!(matches!(
            ResultFrame::decode(&bad),
            Err(FrameError::TooLarge(_))
        ));
    }
}
