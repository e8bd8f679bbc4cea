//! The ZooKeeper tree: who is connected, which engines live, who owns which tenant's job.
//!
//! Everything lives under one root (default `/clickpulse`, configurable so several deployments
//! or test runs can share one ensemble). Payloads are JSON.
//!
//! ```text
//! /clickpulse
//! ├── gateways/
//! │   └── gw-1                      EPHEMERAL  {"id":"gw-1","zmq_endpoint":"tcp://10.0.0.5:7001","http_addr":"10.0.0.5:8080","started_at_ms":…}
//! ├── engines/
//! │   └── engine-a                  EPHEMERAL  {"id":"engine-a","host":"node-3","started_at_ms":…}
//! └── tenants/
//!     └── acme/                     persistent
//!         ├── clients/
//!         │   └── gw-1.c-17         EPHEMERAL  {"gateway":"gw-1","client":"c-17","tenant":"acme","rights":["view"],"streams":["topn"],"connected_at_ms":…}
//!         ├── owner                 EPHEMERAL  {"engine":"engine-a","epoch":4,"since_ms":…}   (session of the owning engine)
//!         └── epoch                 persistent {"epoch":4}                                      (only ever grows)
//! ```
//!
//! A client node's name is `<gateway-id>.<client-id>`, so the owner of every registration is
//! visible in the name and a gateway's nodes can be listed without reading payloads.
//!
//! ```
//! use clickpulse_protocol::{Tenant, zk::Layout};
//! let layout = Layout::new("/clickpulse").unwrap();
//! let acme = Tenant::new("acme").unwrap();
//! assert_eq!(layout.client(&acme, "gw-1", "c-17"), "/clickpulse/tenants/acme/clients/gw-1.c-17");
//! assert_eq!(layout.owner(&acme), "/clickpulse/tenants/acme/owner");
//! ```

use serde::{Deserialize, Serialize};

use crate::results::Stream;
use crate::tenant::Tenant;

/// The default root of the clickpulse tree.
pub const DEFAULT_ROOT: &str = "/clickpulse";

/// Why a root path or an id is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "ZooKeeper root {0:?} must start with '/', not end with '/', and have no empty segment"
    )]
    BadRoot(String),
    #[error("id {0:?} must be 1 to 64 characters of a-z, A-Z, 0-9, '-' and '_'")]
    BadId(String),
}

/// Checks a gateway, engine or client id: safe in a znode name, and free of the `.` that
/// separates gateway and client in a client node's name.
pub fn validate_id(id: &str) -> Result<(), LayoutError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(LayoutError::BadId(id.to_owned()))
    }
}

/// Paths of the clickpulse tree under a root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: String,
}

impl Layout {
    pub fn new(root: &str) -> Result<Self, LayoutError> {
        let ok = root.starts_with('/')
            && (root == "/" || !root.ends_with('/'))
            && !root[1..].split('/').any(|s| s.is_empty() && root != "/");
        if !ok {
            return Err(LayoutError::BadRoot(root.to_owned()));
        }
        Ok(Layout {
            root: root.trim_end_matches('/').to_owned(),
        })
    }

    pub fn root(&self) -> &str {
        if self.root.is_empty() {
            "/"
        } else {
            &self.root
        }
    }

    pub fn gateways(&self) -> String {
        format!("{}/gateways", self.root)
    }

    pub fn gateway(&self, id: &str) -> String {
        format!("{}/gateways/{id}", self.root)
    }

    pub fn engines(&self) -> String {
        format!("{}/engines", self.root)
    }

    pub fn engine(&self, id: &str) -> String {
        format!("{}/engines/{id}", self.root)
    }

    pub fn tenants(&self) -> String {
        format!("{}/tenants", self.root)
    }

    pub fn tenant(&self, tenant: &Tenant) -> String {
        format!("{}/tenants/{tenant}", self.root)
    }

    pub fn clients(&self, tenant: &Tenant) -> String {
        format!("{}/tenants/{tenant}/clients", self.root)
    }

    pub fn client(&self, tenant: &Tenant, gateway: &str, client: &str) -> String {
        format!("{}/tenants/{tenant}/clients/{gateway}.{client}", self.root)
    }

    pub fn owner(&self, tenant: &Tenant) -> String {
        format!("{}/tenants/{tenant}/owner", self.root)
    }

    pub fn epoch(&self, tenant: &Tenant) -> String {
        format!("{}/tenants/{tenant}/epoch", self.root)
    }

    /// Splits a client node name `<gateway>.<client>`.
    pub fn parse_client_node(name: &str) -> Option<(&str, &str)> {
        let (gateway, client) = name.split_once('.')?;
        (validate_id(gateway).is_ok() && validate_id(client).is_ok()).then_some((gateway, client))
    }
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            root: DEFAULT_ROOT.to_owned(),
        }
    }
}

/// What a client is allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Right {
    /// Receive the tenant's results.
    View,
    /// See the cluster view (`/admin/cluster`).
    Admin,
}

/// Now on the wall clock, in milliseconds since the Unix epoch: the clock of every `*_ms`
/// field of these payloads (`started_at_ms`, `connected_at_ms`, `since_ms`).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Payload of `gateways/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayInfo {
    pub id: String,
    pub zmq_endpoint: String,
    pub http_addr: String,
    pub started_at_ms: i64,
}

/// Payload of `engines/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineInfo {
    pub id: String,
    pub host: String,
    pub started_at_ms: i64,
}

/// Payload of `tenants/<t>/clients/<gateway>.<client>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRegistration {
    pub gateway: String,
    pub client: String,
    pub tenant: Tenant,
    pub rights: Vec<Right>,
    pub streams: Vec<Stream>,
    pub connected_at_ms: i64,
}

/// Payload of `tenants/<t>/owner`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub engine: String,
    pub epoch: u64,
    pub since_ms: i64,
}

/// Payload of `tenants/<t>/epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_custom_and_default_roots() {
        let acme = Tenant::new("acme").unwrap();
        let l = Layout::new("/test/run-7").unwrap();
        assert_eq!(l.gateway("gw-1"), "/test/run-7/gateways/gw-1");
        assert_eq!(l.engine("e1"), "/test/run-7/engines/e1");
        assert_eq!(l.clients(&acme), "/test/run-7/tenants/acme/clients");
        assert_eq!(l.epoch(&acme), "/test/run-7/tenants/acme/epoch");
        assert_eq!(Layout::default().tenants(), "/clickpulse/tenants");
        assert_eq!(Layout::new("/").unwrap().gateways(), "/gateways");
    }

    #[test]
    fn bad_roots_and_ids_are_rejected() {
        for bad in ["", "clickpulse", "/a/", "/a//b"] {
            assert!(Layout::new(bad).is_err(), "{bad:?} accepted");
        }
        for bad in ["", "a.b", "a/b", &"x".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_id("gw-1_A").is_ok());
    }

    #[test]
    fn client_node_names_split_into_gateway_and_client() {
        assert_eq!(
            Layout::parse_client_node("gw-1.c-17"),
            Some(("gw-1", "c-17"))
        );
        assert_eq!(Layout::parse_client_node("nodot"), None);
        assert_eq!(Layout::parse_client_node("a.b.c"), None);
    }

    #[test]
    fn payloads_round_trip() {
        let reg = ClientRegistration {
            gateway: "gw-1".into(),
            client: "c-17".into(),
            tenant: Tenant::new("acme").unwrap(),
            rights: vec![Right::View],
            streams: vec![Stream::TopN],
            connected_at_ms: 1,
        };
        let json = serde_json::to_string(&reg).unwrap();
        assert_eq!(
            json,
            r#"{"gateway":"gw-1","client":"c-17","tenant":"acme","rights":["view"],"streams":["topn"],"connected_at_ms":1}"#
        );
        assert_eq!(
            serde_json::from_str::<ClientRegistration>(&json).unwrap(),
            reg
        );
        let owner = OwnerRecord {
            engine: "e".into(),
            epoch: 4,
            since_ms: 2,
        };
        let json = serde_json::to_string(&owner).unwrap();
        assert_eq!(serde_json::from_str::<OwnerRecord>(&json).unwrap(), owner);
    }
}
