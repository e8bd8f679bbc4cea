//! The one ZooKeeper session implementation shared by gateways, engines and the ops CLI.
//!
//! ```text
//!  ZkSession::connect ── bounded retries with backoff ──▶ zookeeper_client::Client
//!       │                                                        │ state watcher
//!       │ register(path, data)  ─▶ ephemeral node, remembered    ▼
//!       │ update(path, data)    ─▶ its data rewritten          keeper task:
//!       │ register_many(...)    ─▶ pipelined, bounded          Expired ─▶ new session (backoff)
//!       │ deregister(path)      ─▶ deleted, forgotten                  ─▶ every remembered
//!       ▼                                                                 ephemeral recreated
//!  close() ─▶ the session ends; the server deletes its ephemerals
//! ```
//!
//! Registrations, updates and deregistrations made at the same time are written together,
//! one `multi` transaction per hundred, so a storm of clients connecting or leaving costs a
//! few round trips and log writes, not one per client.
//!
//! An ephemeral node lives as long as the session that created it. A session can expire (a
//! long network cut, a paused process); the server then deletes its ephemerals. Like Apache
//! Curator's `PersistentNode`, this session remembers what it registered and recreates it on
//! the new session, so no client silently disappears from the registry.
#![forbid(unsafe_code)]

mod session;
pub mod view;

pub use session::{MULTI_MAX, ZkConfig, ZkError, ZkSession};
pub use view::{ClusterView, TenantView, TreeNode};
pub use zookeeper_client as zk;
