//! A server's settings as three value types: [`Timeouts`] (how long each part of a
//! connection's life may take), [`Limits`] (how much the server takes on) and
//! [`DrainPolicy`] (how it stops). Each setting says its default; `None` turns a setting off.
//!
//! ```no_run
//! use std::time::Duration;
//! use grace_http::{DrainPolicy, Limits, Server, Timeouts};
//!
//! # async fn doc() -> Result<(), grace_http::Error> {
//! let server = Server::bind("127.0.0.1:8080").await?
//!     .timeouts(Timeouts::default().idle(Duration::from_secs(30)))
//!     .limits(Limits::default().max_connections(10_000))
//!     .drain_policy(DrainPolicy::default().shutdown_timeout(Duration::from_secs(20)));
//! # let _ = server; Ok(()) }
//! ```

use std::time::Duration;

use crate::base::budget::Budget;
use crate::conn::body::BodyLimit;

/// How long a keep-alive connection may stay idle by default: nginx's 75 s, longer than the
/// 60 s that load balancers commonly keep their own idle backend connections, so that the
/// balancer closes first and never sends a request on a connection we are closing.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// How long each part of a connection's life may take (see [`Server::timeouts`](crate::Server::timeouts)).
///
/// The header-read and idle timeouts are kept by one coarse timer per server (checked four
/// times per timeout), not one per request: a connection is closed between one and
/// `1 + 1/4` timeouts after it went over.
#[derive(Clone, Debug)]
pub struct Timeouts {
    pub(crate) header_read: Option<Duration>,
    pub(crate) idle: Option<Duration>,
    pub(crate) request_body: Option<BodyLimit>,
    pub(crate) handshake: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header_read: Some(Duration::from_secs(10)),
            idle: Some(DEFAULT_IDLE_TIMEOUT),
            request_body: Some(BodyLimit::DEFAULT),
            handshake: Some(Duration::from_secs(10)),
        }
    }
}

impl Timeouts {
    /// How long a client may take to send a request's head (HTTP/1), counted from accept
    /// or from the first byte of the request; a silent new connection counts too. Idle
    /// keep-alive connections are not cut by it.
    ///
    /// Default is 10 s.
    pub fn header_read(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.header_read = timeout.into();
        self
    }

    /// How long a keep-alive connection (HTTP/1 between requests, HTTP/2 with no open
    /// stream) may stay idle before it is closed. `None` keeps idle connections for as long
    /// as clients like (a client could then hold every descriptor).
    ///
    /// Default is [`DEFAULT_IDLE_TIMEOUT`] (75 s).
    pub fn idle(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.idle = timeout.into();
        self
    }

    /// How slowly a request body may arrive: it must come within `timeout` of the request's
    /// head, plus one second for every `min_rate` bytes received, else reading it fails with
    /// a [`BodyTimeout`](crate::BodyTimeout) error (axum's extractors answer 400; see
    /// [`BodyTimeout::find`](crate::BodyTimeout::find) to answer 408) and the connection
    /// closes after the response. So a client that sends headers and then dribbles its body
    /// cannot hold a connection forever, while an upload at any reasonable speed is never
    /// cut. A handler that does not read the body is not affected.
    ///
    /// Default is 20 s and 500 bytes/s (Apache's `mod_reqtimeout`).
    pub fn request_body(mut self, timeout: impl Into<Option<Duration>>, min_rate: u64) -> Self {
        self.request_body = timeout
            .into()
            .map(|initial| BodyLimit { initial, min_rate });
        self
    }

    /// How long an [`acceptor`](crate::Server::acceptor)'s handshake (TLS) may take before
    /// the connection is closed. The header-read timeout still counts from accept.
    ///
    /// Default is 10 s.
    pub fn handshake(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.handshake = timeout.into();
        self
    }
}

/// How much a server takes on (see [`Server::limits`](crate::Server::limits)).
#[derive(Clone, Debug, Default)]
pub struct Limits {
    pub(crate) max_connections: Option<usize>,
    pub(crate) max_connection_age: Option<Duration>,
}

impl Limits {
    /// At most `max` connections at once, all listeners together. At the limit the server
    /// stops accepting until a connection closes: new connections wait in the kernel's
    /// accept queue (they are not refused, and are served in turn), so a burst costs
    /// latency, not errors. Every live connection counts, keep-alive and upgraded ones
    /// included, until its socket closes. Each listener takes its place before it accepts
    /// (that is what leaves the next connection in the kernel's queue, where an upgrade
    /// hands it on), so with several listeners, up to one place per idle listener is held
    /// back.
    ///
    /// So that idle or silent clients cannot hold every place, a client waiting in the
    /// accept queue while no place frees up (the queue is looked at every 50 ms) makes room:
    /// the connection idle longest is closed (oldest first among equals; HTTP/1 as the idle
    /// timeout closes it, never under a request that has begun), else every connection that
    /// has sent nothing since it was accepted more than the
    /// [`new_connection_grace`](DrainPolicy::new_connection_grace) ago. A connection with a
    /// request in flight, or upgraded, is never closed to make room: when every place is
    /// busy, new clients wait.
    ///
    /// Default is `None`: no limit.
    pub fn max_connections(mut self, max: impl Into<Option<usize>>) -> Self {
        self.max_connections = max.into();
        self
    }

    /// Closes connections gracefully once they are about `age` old (each between 0.9 and
    /// 1.1 times `age`, so that connections opened together do not all close together):
    /// HTTP/1 answers its next response with `Connection: close` (an idle one closes at
    /// once), HTTP/2 sends GOAWAY and lets open streams finish. Clients reconnect, so load
    /// spreads again over new instances behind a balancer. Upgraded connections are not
    /// affected.
    ///
    /// Default is `None`: connections live as long as their clients keep them.
    pub fn max_connection_age(mut self, age: impl Into<Option<Duration>>) -> Self {
        self.max_connection_age = age.into();
        self
    }
}

impl Limits {
    /// The places under `max_connections`, shared by every listener.
    pub(crate) fn semaphore(&self) -> Option<std::sync::Arc<tokio::sync::Semaphore>> {
        let max = self.max_connections?;
        Some(std::sync::Arc::new(tokio::sync::Semaphore::new(max)))
    }
}

/// How a server stops (see [`Server::drain_policy`](crate::Server::drain_policy)).
#[derive(Clone, Debug)]
pub struct DrainPolicy {
    pub(crate) shutdown_timeout: Duration,
    pub(crate) stop_deadline: Option<Duration>,
    pub(crate) pre_stop_delay: Option<Duration>,
    pub(crate) new_connection_grace: Duration,
    pub(crate) goodbye_spread: Option<Duration>,
}

impl Default for DrainPolicy {
    fn default() -> Self {
        DrainPolicy {
            shutdown_timeout: Duration::from_secs(30),
            stop_deadline: None,
            pre_stop_delay: None,
            new_connection_grace: Duration::from_millis(200),
            goodbye_spread: None,
        }
    }
}

impl DrainPolicy {
    /// How long in-flight work may take once the listeners are closed: requests and
    /// upgraded connections, then background jobs. What is still running then is forced
    /// closed. As with Go's `Shutdown(ctx)`, axum-server and actix, the whole of it goes to
    /// the work: a 20 s request finishes under a 30 s timeout. Resources close afterwards,
    /// each within its own [`Resource::timeout`](crate::Resource::timeout). Any value is
    /// accepted: one too large to add to a clock means "no deadline".
    ///
    /// Default is 30 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// An overall bound on the whole stop, counted from the moment a drain is asked for:
    /// pre-stop delay, in-flight work, jobs and resources together. For orchestrators that
    /// kill at a fixed time (Kubernetes' `terminationGracePeriodSeconds`, systemd's
    /// `TimeoutStopSec`). Only with it is time held back for the resources: in-flight work
    /// is forced early enough to leave them the timeouts they declared (or what is left,
    /// shared in proportion).
    ///
    /// Default is `None`.
    ///
    /// ```
    /// use std::time::Duration;
    /// let policy = grace_http::DrainPolicy::default()
    ///     .pre_stop_delay(Duration::from_secs(5))
    ///     .shutdown_timeout(Duration::from_secs(20))
    ///     .stop_deadline(Duration::from_secs(30)); // terminationGracePeriodSeconds: 30
    /// # let _ = policy;
    /// ```
    pub fn stop_deadline(mut self, deadline: impl Into<Option<Duration>>) -> Self {
        self.stop_deadline = deadline.into();
        self
    }

    /// Keep accepting and serving this long after a drain is asked for, with readiness
    /// already failing, so load balancers stop routing here first. Not at an upgrade
    /// ([`Trigger::Restart`](crate::Trigger::Restart)): the new process serves on the same
    /// socket, so the old one closes its copy of the listener at once.
    ///
    /// Default is `None`: the listeners close at once.
    pub fn pre_stop_delay(mut self, delay: impl Into<Option<Duration>>) -> Self {
        self.pre_stop_delay = delay.into();
        self
    }

    /// When a drain starts, a connection accepted less than this long ago that has sent
    /// nothing yet is given until this age to send its first byte: its request may be on
    /// the wire. Older silent connections are closed at once. (The same grace protects new
    /// connections from being closed to make room under
    /// [`max_connections`](Limits::max_connections).)
    ///
    /// Default is 200 ms.
    pub fn new_connection_grace(mut self, grace: Duration) -> Self {
        self.new_connection_grace = grace;
        self
    }

    /// Spreads the [`ShutdownNotice`](crate::ShutdownNotice)s of upgraded connections
    /// (WebSockets, streams) over this window after the drain starts, each at its own
    /// place, instead of all at once: their clients then reconnect (to the new generation,
    /// after an upgrade) spread out rather than in one storm. Keep it well inside the
    /// shutdown timeout, which still forces what is left.
    ///
    /// Default is `None`: all at once.
    pub fn goodbye_spread(mut self, window: impl Into<Option<Duration>>) -> Self {
        self.goodbye_spread = window.into();
        self
    }

    /// The stop's time budget, as the drain reckons it.
    pub(crate) fn budget(&self) -> Budget {
        Budget {
            shutdown_timeout: self.shutdown_timeout,
            stop_deadline: self.stop_deadline,
            pre_stop_delay: self.pre_stop_delay.unwrap_or_default(),
        }
    }
}
