//! Connection states and the tracking of live connections.
//!
//! - [`ConnState`] and [`ConnInfo`]: what a user sees through [`Server::on_conn_state`](crate::Server::on_conn_state).
//! - `state`: the state machine, one pure function from a state and an event to the next.
//! - `tracker`: the one owner of every live connection and of the counts per state.
//! - `http`: which HTTP a connection speaks, and hyper's connection for it (one that can give
//!   its socket back between requests, for a hand-over).
//! - `h1`, `h2`: how each protocol closes at a drain (and HTTP/1 hands over at an upgrade).
//! - `io`: the socket wrapper that sees a connection's bytes and can be shut from outside.
//! - `request`: the per-request service and body wrappers (Active ↔ Idle, Hijacked, panics).
//! - `notice`: what handlers see of the stop ([`ShutdownNotice`](notice::ShutdownNotice)).
//! - `body`: the request body, with its timeout against dribbling clients.
//! - `task`: the task of one connection, and how it closes at a drain.
//! - `clock`: the coarse clock behind the header-read and idle timeouts.
//! - `movable`, `frames`, `turns`: upgraded connections (WebSockets) that move to the next
//!   generation at an upgrade, stopped between two of the client's messages, a few at a
//!   time.
//! - `fanout`: shutting many sockets at once, split across cores (the drain and the force).

pub(crate) mod body;
pub(crate) mod clock;
mod fanout;
#[cfg(unix)]
mod frames;
mod h1;
mod h2;
pub(crate) mod handing;
pub(crate) mod http;
pub(crate) mod io;
#[cfg(unix)]
pub(crate) mod movable;
pub(crate) mod notice;
pub(crate) mod record;
pub(crate) mod request;
pub(crate) mod state;
mod stats;
mod sweep;
pub(crate) mod task;
pub(crate) mod tracker;
#[cfg(unix)]
mod turns;

pub use crate::base::conn::{Addr, ConnInfo, ConnState, StateCounts};
