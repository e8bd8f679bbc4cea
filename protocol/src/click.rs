//! The click record: one page view, as a Kafka record on `clicks.<tenant>`.
//!
//! The value is a fixed 20-byte header followed by the tenant name, all little-endian, so a
//! decoder reads it at fixed offsets without parsing or allocating:
//!
//! ```text
//! offset  size  field
//!      0     1  version, always 0xC1 ("click v1")
//!      1     2  page id (u16 LE; 1..=17 for MSNBC, 0 is invalid)
//!      3     8  visitor id (u64 LE)
//!     11     8  event time, milliseconds since the Unix epoch (i64 LE)
//!     19     1  tenant name length n (1..=64)
//!     20     n  tenant name (ASCII, see `tenant`)
//! ```
//!
//! The record **key** is the visitor id as 8 bytes big-endian ([`visitor_key`]), so all views of
//! a visitor land in one partition, in order.
//!
//! Example: visitor 7 of tenant `acme` viewing page 2 (news) at 938476800609 ms
//! (`1999-09-28T00:00:00.609Z`) is the 24-byte value
//!
//! ```text
//! c1 02 00 07 00 00 00 00 00 00 00 61 8a 93 81 da 00 00 00 04 61 63 6d 65
//! ```
//!
//! ```
//! use clickpulse_protocol::{Click, PageId, Tenant};
//! let click = Click { tenant: Tenant::new("acme").unwrap(), visitor: 7, page: PageId(2),
//!                     event_time_ms: 938_476_800_609 };
//! let bytes = click.encode();
//! assert_eq!(bytes.len(), 24);
//! let back = clickpulse_protocol::ClickRef::decode(&bytes).unwrap();
//! assert_eq!(back.visitor, 7);
//! assert_eq!(back.tenant, "acme");
//! ```

use crate::pages::PageId;
use crate::tenant::{self, Tenant, TenantError};

/// First byte of every v1 click record.
pub const CLICK_V1: u8 = 0xC1;
/// Length of the fixed part of a v1 record.
pub const HEADER_LEN: usize = 20;

/// An owned click.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Click {
    pub tenant: Tenant,
    pub visitor: u64,
    pub page: PageId,
    pub event_time_ms: i64,
}

/// A click decoded in place: the tenant borrows from the record bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClickRef<'a> {
    pub tenant: &'a str,
    pub visitor: u64,
    pub page: PageId,
    pub event_time_ms: i64,
}

/// Why bytes are not a click record. Never retryable: the record itself is bad.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record is {0} bytes; a click record has at least {HEADER_LEN}")]
    Truncated(usize),
    #[error("record version byte is {0:#04x}; expected {CLICK_V1:#04x}")]
    UnknownVersion(u8),
    #[error("page id 0 is not a page")]
    PageZero,
    #[error("record says the tenant has {declared} bytes but {actual} follow the header")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("tenant name in record is not valid: {0}")]
    BadTenant(String),
}

impl From<TenantError> for DecodeError {
    fn from(e: TenantError) -> Self {
        DecodeError::BadTenant(e.to_string())
    }
}

impl Click {
    /// Encodes the record value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.tenant.as_str().len());
        encode_into(
            &mut out,
            self.tenant.as_str(),
            self.visitor,
            self.page,
            self.event_time_ms,
        );
        out
    }

    pub fn as_ref(&self) -> ClickRef<'_> {
        ClickRef {
            tenant: self.tenant.as_str(),
            visitor: self.visitor,
            page: self.page,
            event_time_ms: self.event_time_ms,
        }
    }
}

/// Appends a v1 record to `out` (the replayer reuses one buffer for every record).
///
/// `tenant` must be a valid tenant name; it is the caller's [`Tenant`] in every use.
pub fn encode_into(
    out: &mut Vec<u8>,
    tenant: &str,
    visitor: u64,
    page: PageId,
    event_time_ms: i64,
) {
    debug_assert!(tenant::validate(tenant).is_ok());
    out.push(CLICK_V1);
    out.extend_from_slice(&page.0.to_le_bytes());
    out.extend_from_slice(&visitor.to_le_bytes());
    out.extend_from_slice(&event_time_ms.to_le_bytes());
    // Tenant names are at most 64 bytes, so the length always fits in one byte.
    out.push(tenant.len() as u8);
    out.extend_from_slice(tenant.as_bytes());
}

/// The record key for a visitor: 8 bytes, big-endian.
pub fn visitor_key(visitor: u64) -> [u8; 8] {
    visitor.to_be_bytes()
}

impl<'a> ClickRef<'a> {
    /// Decodes a v1 record, checking every field; never panics on any input.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::Truncated(bytes.len()));
        }
        if bytes[0] != CLICK_V1 {
            return Err(DecodeError::UnknownVersion(bytes[0]));
        }
        let page = PageId(u16::from_le_bytes([bytes[1], bytes[2]]));
        if page.0 == 0 {
            return Err(DecodeError::PageZero);
        }
        let visitor = u64::from_le_bytes(fixed(&bytes[3..11]));
        let event_time_ms = i64::from_le_bytes(fixed(&bytes[11..19]));
        let declared = usize::from(bytes[19]);
        let rest = &bytes[HEADER_LEN..];
        if rest.len() != declared {
            return Err(DecodeError::LengthMismatch {
                declared,
                actual: rest.len(),
            });
        }
        let tenant =
            std::str::from_utf8(rest).map_err(|_| DecodeError::BadTenant("not UTF-8".into()))?;
        tenant::validate(tenant)?;
        Ok(ClickRef {
            tenant,
            visitor,
            page,
            event_time_ms,
        })
    }

    pub fn to_owned(&self) -> Result<Click, TenantError> {
        Ok(Click {
            tenant: Tenant::new(self.tenant)?,
            visitor: self.visitor,
            page: self.page,
            event_time_ms: self.event_time_ms,
        })
    }
}

fn fixed(slice: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(slice);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn acme() -> Tenant {
        Tenant::new("acme").unwrap()
    }

    #[test]
    fn documented_example_bytes() {
        let click = Click {
            tenant: acme(),
            visitor: 7,
            page: PageId(2),
            event_time_ms: 938_476_800_609,
        };
        let hex: Vec<String> = click.encode().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex.join(" "),
            "c1 02 00 07 00 00 00 00 00 00 00 61 8a 93 81 da 00 00 00 04 61 63 6d 65"
        );
    }

    #[test]
    fn key_is_big_endian_visitor() {
        assert_eq!(visitor_key(0x0102), [0, 0, 0, 0, 0, 0, 1, 2]);
    }

    #[test]
    fn rejects_malformed_records() {
        let good = Click {
            tenant: acme(),
            visitor: 1,
            page: PageId(3),
            event_time_ms: 5,
        }
        .encode();
        assert_eq!(
            ClickRef::decode(&good[..10]),
            Err(DecodeError::Truncated(10))
        );
        let mut bad = good.clone();
        bad[0] = 0x00;
        assert_eq!(ClickRef::decode(&bad), Err(DecodeError::UnknownVersion(0)));
        let mut bad = good.clone();
        bad[1] = 0;
        bad[2] = 0;
        assert_eq!(ClickRef::decode(&bad), Err(DecodeError::PageZero));
        let mut bad = good.clone();
        bad.push(b'x');
        assert!(matches!(
            ClickRef::decode(&bad),
            Err(DecodeError::LengthMismatch {
                declared: 4,
                actual: 5
            })
        ));
        let mut bad = good.clone();
        bad[20] = b'A';
        assert!(matches!(
            ClickRef::decode(&bad),
            Err(DecodeError::BadTenant(_))
        ));
    }

    proptest! {
        #[test]
        fn round_trips(visitor: u64, page in 1u16.., t: i64, name in "[a-z0-9][a-z0-9_-]{0,63}") {
            let click = Click { tenant: Tenant::new(name).unwrap(), visitor, page: PageId(page), event_time_ms: t };
            let bytes = click.encode();
            let decoded = ClickRef::decode(&bytes).unwrap();
            prop_assert_eq!(decoded.to_owned().unwrap(), click);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = ClickRef::decode(&bytes);
        }
    }
}
