//! Tenant tokens: HS256 JWTs minted by `clickpulse token` and checked by the gateway.
//!
//! Claims (JSON):
//!
//! ```json
//! {"tenant":"acme","sub":"alice@example.com","rights":["view"],"iat":1764000000,"exp":1764086400}
//! ```
//!
//! `exp` and `iat` are seconds since the Unix epoch. A token grants its rights on its tenant
//! only; an `admin` token additionally sees the cluster view.

use serde::{Deserialize, Serialize};

use crate::tenant::Tenant;
use crate::zk::Right;

/// The claims of a tenant token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub tenant: Tenant,
    pub sub: String,
    pub rights: Vec<Right>,
    pub iat: i64,
    pub exp: i64,
}

impl Claims {
    pub fn has(&self, right: Right) -> bool {
        self.rights.contains(&right)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example_parses() {
        let claims: Claims = serde_json::from_str(
            r#"{"tenant":"acme","sub":"alice@example.com","rights":["view"],"iat":1764000000,"exp":1764086400}"#,
        )
        .unwrap();
        assert!(claims.has(Right::View));
        assert!(!claims.has(Right::Admin));
        assert_eq!(claims.tenant.as_str(), "acme");
    }

    #[test]
    fn a_bad_tenant_in_claims_is_rejected() {
        let bad = r#"{"tenant":"ACME","sub":"x","rights":[],"iat":0,"exp":1}"#;
        assert!(serde_json::from_str::<Claims>(bad).is_err());
    }
}
