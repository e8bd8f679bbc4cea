//! Every contract that crosses a clickpulse process boundary lives here, and only here.
//!
//! The engine, the gateway, the replayer and the ops CLI never define a wire format of their
//! own: they encode and decode through this crate, so a change of contract is one change in one
//! place, with its documentation and its round-trip tests beside it.
//!
//! ```text
//!  msnbc.seq.gz ──replay clock──▶ [replayer] ──Kafka `clicks.<tenant>` (click record)──▶ [engine]
//!                                                                                          │
//!        ZooKeeper  /clickpulse/…  (registrations, owners, epochs) ◀── gateways, engines ──┤
//!                                                                                          │
//!  browser ◀──WebSocket JSON (ws)── [gateway] ◀──ZeroMQ PUSH/PULL (zmq result frames)──────┘
//! ```
//!
//! | module       | contract                                                            |
//! |--------------|---------------------------------------------------------------------|
//! | [`tenant`]   | what a tenant name may be (it ends up in topic names and znodes)      |
//! | [`click`]    | the binary click record on `clicks.<tenant>`, and its key             |
//! | [`topics`]   | Kafka topic names per tenant                                         |
//! | [`clock`]    | the replay clock: event time of view *j* of user *u*                  |
//! | [`pages`]    | the MSNBC page catalogue (category id ↔ name)                         |
//! | [`results`]  | result messages computed by a tenant job                              |
//! | [`dead`]     | dead letters on `dead.<tenant>`: the rejected record and why          |
//! | [`state`]    | job checkpoints and visitor history on `state.<tenant>`               |
//! | [`zmq`]      | the multipart ZeroMQ frame carrying a result to a gateway             |
//! | [`ws`]       | WebSocket client/server messages and close codes                      |
//! | [`zk`]       | the ZooKeeper tree under the root (default `/clickpulse`) and payloads |
//! | [`auth`]     | the claims of a tenant token (HS256 JWT)                              |
#![forbid(unsafe_code)]

pub mod auth;
pub mod click;
pub mod clock;
pub mod dead;
pub mod pages;
pub mod results;
pub mod state;
pub mod tenant;
pub mod topics;
pub mod ws;
pub mod zk;
pub mod zmq;

pub use click::{Click, ClickRef, DecodeError};
pub use pages::PageId;
pub use tenant::{Tenant, TenantError};
