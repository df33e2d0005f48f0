//! pushnode: a WebSocket push-notification node.
//!
//! A web application asks a node to notify a user; every session of that user, on every node,
//! receives it within milliseconds. See README.md for the picture and the guarantees, and
//! `docs/protocol.md` for the wire protocol.
//!
//! Dependency direction: `server -> {api, gateway, session, broker}`; `api, gateway, session,
//! broker -> hub -> protocol`. `protocol` and `hub` run without sockets or Redis.

pub mod acceptor;
pub mod api;
pub mod auth;
pub mod broker;
pub mod channel;
pub mod fd_budget;
pub mod gateway;
pub mod hub;
pub mod inbox;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod protocol;
pub mod server;
pub mod session;
pub mod settings;

pub use server::{Listeners, run};
pub use settings::Settings;
