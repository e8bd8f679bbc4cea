//! Kafka topic names. One set of topics per tenant:
//!
//! | topic               | written by | contents                                            |
//! |---------------------|------------|-----------------------------------------------------|
//! | `clicks.<tenant>`   | replayer   | click records ([`crate::click`]), keyed by visitor   |
//! | `results.<tenant>`  | engine     | result messages ([`crate::results`]), JSON           |
//! | `state.<tenant>`    | engine     | job checkpoints (compacted)                         |
//! | `dead.<tenant>`     | engine     | malformed click records with the reason             |
//!
//! ```
//! use clickpulse_protocol::{Tenant, topics};
//! let acme = Tenant::new("acme").unwrap();
//! assert_eq!(topics::clicks(&acme), "clicks.acme");
//! assert_eq!(topics::tenant_of_clicks("clicks.acme"), Some(acme));
//! ```

use crate::tenant::Tenant;

pub const CLICKS_PREFIX: &str = "clicks.";
pub const RESULTS_PREFIX: &str = "results.";
pub const STATE_PREFIX: &str = "state.";
pub const DEAD_PREFIX: &str = "dead.";

pub fn clicks(tenant: &Tenant) -> String {
    format!("{CLICKS_PREFIX}{tenant}")
}

pub fn results(tenant: &Tenant) -> String {
    format!("{RESULTS_PREFIX}{tenant}")
}

pub fn state(tenant: &Tenant) -> String {
    format!("{STATE_PREFIX}{tenant}")
}

pub fn dead(tenant: &Tenant) -> String {
    format!("{DEAD_PREFIX}{tenant}")
}

/// The tenant of a `clicks.<tenant>` topic, or `None` for any other name.
pub fn tenant_of_clicks(topic: &str) -> Option<Tenant> {
    topic
        .strip_prefix(CLICKS_PREFIX)
        .and_then(|t| Tenant::new(t).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_per_tenant() {
        let t = Tenant::new("globex").unwrap();
        assert_eq!(clicks(&t), "clicks.globex");
        assert_eq!(results(&t), "results.globex");
        assert_eq!(state(&t), "state.globex");
        assert_eq!(dead(&t), "dead.globex");
        assert_eq!(tenant_of_clicks("results.globex"), None);
        assert_eq!(tenant_of_clicks("clicks.Bad"), None);
    }
}
