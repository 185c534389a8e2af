//! # grace
//!
//! Stop, restart and upgrade an HTTP service without losing a request, a connection or a
//! write.
//!
//! `grace` serves any `tower::Service` (an `axum::Router` included) over HTTP/1.1 and
//! HTTP/2 on TCP or Unix-domain listeners that it owns. When asked to stop — by SIGTERM,
//! SIGINT or a [`Handle`] — it drains:
//!
//! - its listeners close (after an optional pre-stop delay, readiness failing from the
//!   request on): new connections are refused;
//! - idle connections close at once, silent new ones after a short grace; HTTP/1 requests
//!   in flight finish with `Connection: close`, HTTP/2 gets GOAWAY and its open streams
//!   finish, upgraded connections get a [`ShutdownNotice`];
//! - once the last connection closed (an event, not a poll), or at the deadline or a
//!   second signal (then what is left is forced), background jobs are stopped, then
//!   resources closed in dependency order;
//! - the [`ShutdownReport`] says what was found, what was cut and why, and how long each
//!   phase took.
//!
//! The drain and the connection states are drawn in the repository's
//! [`docs/architecture.md`](https://github.com/grace-rs/grace/blob/main/docs/architecture.md),
//! with the layers of the code.
//!
//! [`DrainPolicy::shutdown_timeout`] is the time in-flight work gets, all of it, as with Go's
//! `Shutdown(ctx)`; resources close afterwards, each within its own timeout. An optional
//! [`DrainPolicy::stop_deadline`] bounds the whole stop (for orchestrators that kill at a fixed
//! time) and holds back the resources' declared time from the work.
//!
//! ```no_run
//! # async fn doc() -> Result<(), grace_http::Error> {
//! let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
//! let report = grace_http::Server::bind("127.0.0.1:8080")
//!     .await?
//!     .drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(std::time::Duration::from_secs(30)))
//!     .serve(app)
//!     .with_signals()
//!     .await?;
//! eprintln!("{}", report.to_json());
//! # Ok(()) }
//! ```
//!
//! ## Zero-downtime restarts
//!
//! With [`Serve::with_restart`], SIGHUP (or [`Handle::restart`]) starts a new process of the
//! same program and hands it the listening sockets as inherited descriptors (systemd's
//! `LISTEN_FDS` protocol, so [`inherited_listeners`] also serves socket activation). Once
//! the new process serves, this one drains as above; if it fails, it is killed and this one
//! keeps serving. The sockets are never closed, so nothing is refused meanwhile, and the
//! keep-alive HTTP/1.1 connections are handed to the new process between two requests
//! rather than closed, so no client reconnects; so are WebSockets whose handler opts in
//! ([`Movable`]), with their state, between two messages. See [`Restart`] for the flow and
//! what is handed over, and [`systemd`] for `Type=notify`.
//!
//! ## Where it runs
//!
//! | | Linux | other Unix (macOS, BSDs) | Windows |
//! |---|---|---|---|
//! | HTTP/1.1 and HTTP/2 over TCP, any `tower::Service`, `axum` | yes | yes | yes |
//! | Unix-domain listeners ([`Server::bind`] with `"unix:PATH"`) | yes | yes (the socket file is checked by its path: no `O_PATH`) | no |
//! | The drain: connection states, readiness, `Connection: close`, GOAWAY, [`ShutdownNotice`], forcing at the deadline or at a second signal | yes | yes | yes (an idle connection is shut down, not closed in place) |
//! | [`Limits`] (`max_connections`: a waiting client gets an idle one's place) and [`Timeouts`] | yes | yes | yes |
//! | TLS (feature `tls`), with certificate reload | yes | yes | yes |
//! | Jobs, resources, the [`ShutdownReport`], feature `metrics` | yes | yes | yes |
//! | The signals that drain ([`DEFAULT_SIGNALS`], [`Signal`]) | SIGTERM, SIGINT | SIGTERM, SIGINT | Ctrl-Break, Ctrl-C (and the console's close, logoff and shutdown events) |
//! | Zero-downtime restarts ([`Serve::with_restart`], [`inherited_listeners`], the pid file), systemd socket activation | yes | yes | no |
//! | Keep-alive connections handed over at an upgrade | yes | BSDs: yes, but only unacknowledged ones are taken back (no `TCP_INFO`); macOS: no (no `SOCK_SEQPACKET`): they drain | no |
//! | WebSockets handed over at an upgrade ([`Movable`]) | yes | BSDs: as above; macOS: no (`Movable::websocket` gives the connection back) | no (no `Movable`) |
//! | The control socket ([`Serve::with_control`], [`control::status`] and the other clients, `grace-ctl`) | yes | yes | no |
//! | systemd notifications and watchdog ([`systemd`]) | yes | compiled, idle (no `NOTIFY_SOCKET`) | no |
//!
//! What is "no" is compiled out (`cfg(unix)`), so it is not in the API there. Elsewhere than
//! Linux, a descriptor the library makes (a pipe, the hand-over channel, a socket received)
//! is marked close-on-exec just after it is made, not atomically: a process that another
//! thread spawns in between may inherit it. A socket inherited on macOS, which does not
//! implement `SO_ACCEPTCONN`, is taken for a listening one if it is a stream socket without
//! a peer. Linux runs the test suite; macOS (`x86_64-apple-darwin`) and Windows
//! (`x86_64-pc-windows-gnu`) are compile-checked with every feature, except `tls` for macOS
//! (its `ring` C code needs the macOS SDK). The demo service `grace-demo` and `grace-ctl` are
//! Unix only.

//!
//! ## Features
//!
//! | feature | default | what it turns on |
//! |---|---|---|
//! | `axum` | yes | axum 0.8 served as `axum::serve` serves it: `axum::extract::ConnectInfo<SocketAddr>` in every request from a TCP peer (see [`ConnAddrs`], and [`Server::peer_addr_in_requests`] to leave the addresses out), and an `axum::Router` served with its routes made ready once ([`Server::serve`]) |
//! | `ring` | yes | with `tls`, the *ring* crypto provider for the configurations grace makes from PEM; without `tls` it builds nothing (turn it off when you bring another provider) |
//! | `tls` | no | TLS termination with rustls: `Server::tls` and the `tls` module (PEM files or your own `rustls::ServerConfig`, reloaded while serving) |
//! | `metrics` | no | the [`metrics`] module's numbers through the `metrics` facade (`Handle::record_metrics`) |
//!
//! A service on another framework than axum depends on it with `default-features = false`
//! (and `features = ["ring"]` if it uses `tls` with grace's provider). Without `axum`,
//! [`ConnAddrs`] is still in every request, and a `Router` is served like any other
//! `tower::Service` (pass `router.with_state(())` to spare each request a boxed clone of
//! its handler).

#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod accept;
mod base;
mod conn;
#[cfg(unix)]
pub mod control;
mod error;
#[cfg(unix)]
mod files;
mod handover;
mod health;
mod jobs;
mod limit;
mod listener;
pub mod metrics;
mod resources;
#[cfg(unix)]
mod restart;
/// Restarts are Unix only: on Windows there is only the name a listener gets.
#[cfg(not(unix))]
mod restart {
    /// As `restart::DEFAULT_NAME` on Unix.
    pub(crate) const DEFAULT_NAME: &str = "grace";
}
mod server;
mod shutdown;
mod signal;
mod sys;
#[cfg(unix)]
pub mod systemd;
#[cfg(test)]
mod testing;
#[cfg(feature = "tls")]
pub mod tls;

pub use base::conn::{Addr, ConnAddrs, ConnInfo, ConnState, StateCounts};
pub use base::report::{
    ActiveRequest, ConnSnapshot, ForceReason, ForcedConn, Outcome, Phase, PhaseTiming,
    ShutdownReport, TaskReport, Trigger,
};
pub use conn::body::{BodyTimeout, RequestBody};
#[cfg(unix)]
pub use conn::movable::{Movable, Mover};
pub use conn::notice::ShutdownNotice;
pub use conn::request::TrackedBody;
#[cfg(unix)]
pub use error::MoveError;
pub use error::{Error, InheritedFdError, RestartError, Result};
pub use health::{Liveness, Readiness};
pub use jobs::JobToken;
pub use listener::Listener;
pub use resources::Resource;
#[cfg(unix)]
pub use restart::{Inherited, Restart, inherited_listeners, write_pid_file};
pub use server::{
    DEFAULT_IDLE_TIMEOUT, DrainPolicy, HyperBuilder, Limits, Serve, Server, Timeouts,
};
pub use shutdown::Handle;
pub use signal::{DEFAULT_SIGNALS, Signal};
