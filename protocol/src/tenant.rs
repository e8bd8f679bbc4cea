//! Tenant names.
//!
//! A tenant name becomes part of Kafka topic names (`clicks.acme`) and of znode paths
//! (`/clickpulse/tenants/acme`), so it is restricted to what is safe in both: 1 to 64 characters
//! from `a-z`, `0-9`, `-` and `_`, starting with a letter or digit.
//!
//! ```
//! use clickpulse_protocol::Tenant;
//! let acme: Tenant = "acme".parse().unwrap();
//! assert_eq!(acme.as_str(), "acme");
//! assert!("Acme".parse::<Tenant>().is_err());
//! assert!("a/b".parse::<Tenant>().is_err());
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// Longest tenant name accepted.
pub const MAX_TENANT_LEN: usize = 64;

/// A validated tenant name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Tenant(String);

/// Why a string is not a tenant name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantError {
    #[error("tenant name is empty")]
    Empty,
    #[error("tenant name is {0} characters long; at most {MAX_TENANT_LEN} are allowed")]
    TooLong(usize),
    #[error("tenant name {name:?} has {ch:?}; only a-z, 0-9, '-' and '_' are allowed")]
    BadChar { name: String, ch: char },
    #[error("tenant name {0:?} must start with a letter or a digit")]
    BadStart(String),
}

impl Tenant {
    /// Validates `name` as a tenant name.
    pub fn new(name: impl Into<String>) -> Result<Self, TenantError> {
        let name = name.into();
        validate(&name)?;
        Ok(Tenant(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a borrowed tenant name without allocating (the click decoder's hot path uses it).
pub fn validate(name: &str) -> Result<(), TenantError> {
    if name.is_empty() {
        return Err(TenantError::Empty);
    }
    if name.len() > MAX_TENANT_LEN {
        return Err(TenantError::TooLong(name.len()));
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(TenantError::BadChar {
            name: name.to_owned(),
            ch,
        });
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(TenantError::BadStart(name.to_owned()));
    }
    Ok(())
}

impl FromStr for Tenant {
    type Err = TenantError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tenant::new(s)
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Tenant {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Tenant {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Tenant::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_typical_names() {
        for name in ["acme", "globex", "initech", "t-1", "a_b", "0day"] {
            assert_eq!(Tenant::new(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn rejects_names_unsafe_for_topics_or_znodes() {
        assert_eq!(Tenant::new(""), Err(TenantError::Empty));
        assert!(matches!(
            Tenant::new("a".repeat(65)),
            Err(TenantError::TooLong(65))
        ));
        for bad in ["a/b", "a.b", "A", "a b", "é", ".."] {
            assert!(Tenant::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(Tenant::new("-x"), Err(TenantError::BadStart(_))));
    }

    #[test]
    fn deserialization_validates() {
        assert!(serde_json::from_str::<Tenant>("\"acme\"").is_ok());
        assert!(serde_json::from_str::<Tenant>("\"../etc\"").is_err());
    }
}
