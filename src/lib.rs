//! pushnode: a WebSocket push-notification node.
//!
//! A web application asks a node to notify a user; every session of that user, on every node,
//! receives it within milliseconds. See README.md for the picture and the guarantees, and
//! `docs/protocol.md` for the wire protocol.
//!
//! Dependency direction: `server -> {api, gateway, session, broker, inbox}`; `api, gateway,
//! session, broker -> hub -> protocol`; `broker, inbox -> redis_link`. `protocol` and `hub` run
//! without sockets or Redis. See `docs/architecture.md` for the paths through them.

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
pub mod presence;
pub mod protocol;
pub mod pusher;
pub mod redis_link;
pub mod server;
pub mod session;
pub mod settings;
pub mod webhooks;
pub mod wire;

pub use server::{Listeners, run};
pub use settings::Settings;
