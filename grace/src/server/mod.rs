//! The one entry: the [`Server`] builder. What it serves with is [`Serve`] (`serve`), which
//! starts the accept loops (`accepting`) and, once asked to stop, runs the drain.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tokio::net::ToSocketAddrs;

use crate::accept::Acceptor;
use crate::base::budget::Budget;
use crate::base::conn::{Addr, ConnInfo, ConnState};
use crate::conn::body::{BodyLimit, RequestBody};
use crate::conn::task::BoxError;
use crate::conn::tracker::Hook;
use crate::error::{Error, Result};
use crate::listener::{Listener, SocketFile};
use crate::shutdown::{Handle, Shared};

mod accepting;
mod serve;

pub use serve::Serve;

/// How long a keep-alive connection may stay idle by default: nginx's 75 s, longer than the
/// 60 s that load balancers commonly keep their own idle backend connections, so that the
/// balancer closes first and never sends a request on a connection we are closing.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// Settings of a server. Each has a builder method on [`Server`].
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) budget: Budget,
    pub(crate) header_read_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) body_limit: Option<BodyLimit>,
    pub(crate) new_connection_grace: Duration,
    pub(crate) handshake_timeout: Duration,
    pub(crate) goodbye_spread: Duration,
    pub(crate) max_connections: Option<usize>,
    pub(crate) max_connection_age: Option<Duration>,
    pub(crate) peer_in_requests: bool,
    pub(crate) record_requests: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            budget: Budget {
                shutdown_timeout: Duration::from_secs(30),
                stop_deadline: None,
                pre_stop_delay: Duration::ZERO,
            },
            header_read_timeout: Some(Duration::from_secs(10)),
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            body_limit: Some(BodyLimit::DEFAULT),
            new_connection_grace: Duration::from_millis(200),
            handshake_timeout: Duration::from_secs(10),
            goodbye_spread: Duration::ZERO,
            max_connections: None,
            max_connection_age: None,
            peer_in_requests: false,
            record_requests: false,
        }
    }
}

/// A graceful HTTP/1.1 + HTTP/2 server that owns its listeners.
///
/// ```no_run
/// use std::time::Duration;
/// use grace_http::{ConnInfo, ConnState, Server};
///
/// # async fn doc() -> Result<(), grace_http::Error> {
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
/// let server = Server::bind("127.0.0.1:8080").await?
///     .shutdown_timeout(Duration::from_secs(30))
///     .on_conn_state(|conn: &ConnInfo, state: ConnState| {
///         tracing::debug!(id = conn.id(), peer = %conn.peer(), %state);
///     });
/// let handle = server.handle(); // drain from code, read live counts
/// let report = server.serve(app).with_signals().await?; // SIGTERM/SIGINT drain; again forces
/// assert!(report.is_clean() || !report.forced.is_empty());
/// # Ok(()) }
/// ```
pub struct Server {
    /// Each with the name a restart passes it on under.
    listeners: Vec<(Listener, String)>,
    /// The previous generation's readiness pipe (see [`Server::from_inherited`]).
    #[cfg(unix)]
    ready_pipe: Option<std::os::fd::OwnedFd>,
    /// The socket on which the previous generation hands connections over, if it does.
    #[cfg(unix)]
    handover: Option<std::os::fd::OwnedFd>,
    /// The previous generation's control socket (see [`Serve::with_control`]).
    #[cfg(unix)]
    control: Option<tokio::net::UnixListener>,
    /// The Unix-domain socket files this server removes when it stops for good.
    files: Vec<SocketFile>,
    shared: Arc<Shared>,
    hook: Option<Hook>,
    /// What accepted sockets go through before HTTP (TLS), if anything.
    acceptor: Option<Arc<dyn Acceptor>>,
    /// The user's changes to hyper's builder (see [`Server::configure_hyper`]).
    configure_hyper: Option<ConfigureHyper>,
    config: Config,
}

/// See [`Server::configure_hyper`].
type ConfigureHyper = Box<dyn FnOnce(&mut HyperBuilder) + Send>;

pub use crate::conn::http::HyperBuilder;

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listeners", &self.listeners)
            .field("config", &self.config)
            .field("acceptor", &self.acceptor.is_some())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds a TCP listener on the first address `addr` resolves to.
    pub async fn bind(addr: impl ToSocketAddrs + std::fmt::Display) -> Result<Server> {
        let bind_err = |source| Error::Bind {
            addr: addr.to_string(),
            source,
        };
        let mut last = None;
        for a in tokio::net::lookup_host(&addr).await.map_err(bind_err)? {
            match Listener::bind(a) {
                Ok(l) => return Ok(Server::from_listener(l)),
                Err(e) => last = Some(e),
            }
        }
        Err(bind_err(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
        })))
    }

    /// Binds a Unix-domain listener at `path`, replacing a stale socket file but never a
    /// live one or another kind of file; the file is removed once the server stops for good
    /// (see [`Listener::bind_unix`]).
    #[cfg(unix)]
    pub fn bind_unix(path: impl AsRef<std::path::Path>) -> Result<Server> {
        Server::bind_unix_file(path.as_ref(), None)
    }

    #[cfg(unix)]
    fn bind_unix_file(path: &std::path::Path, mode: Option<u32>) -> Result<Server> {
        crate::listener::bind_unix(path, mode)
            .map(|(listener, file)| {
                let mut server = Server::from_listener(listener);
                server.files.push(file);
                server
            })
            .map_err(|source| Error::Bind {
                addr: path.display().to_string(),
                source,
            })
    }

    /// Like [`bind_unix`](Self::bind_unix), with the socket file's permissions set to `mode`
    /// (for example `0o660`) whatever the umask (see [`Listener::bind_unix_with_mode`]).
    #[cfg(unix)]
    pub fn bind_unix_with_mode(path: impl AsRef<std::path::Path>, mode: u32) -> Result<Server> {
        Server::bind_unix_file(path.as_ref(), Some(mode))
    }

    /// Serves on a listener made elsewhere (a `tokio` listener converts with `.into()`).
    pub fn from_listener(listener: impl Into<Listener>) -> Server {
        Server::from_listeners([listener.into()])
    }

    /// Serves on several listeners at once (for example every socket systemd passed).
    pub fn from_listeners(listeners: impl IntoIterator<Item = Listener>) -> Server {
        let named = listeners
            .into_iter()
            .map(|l| (l, crate::restart::DEFAULT_NAME.to_owned()));
        Server {
            listeners: named.collect(),
            #[cfg(unix)]
            ready_pipe: None,
            #[cfg(unix)]
            handover: None,
            #[cfg(unix)]
            control: None,
            files: Vec::new(),
            shared: Shared::new(),
            hook: None,
            acceptor: None,
            configure_hyper: None,
            config: Config::default(),
        }
    }

    /// Serves on what this process inherited (see [`inherited_listeners`](crate::inherited_listeners)):
    /// the listeners keep their names, and when an upgrade started this process, the
    /// previous generation is told it is ready once serving starts.
    #[cfg(unix)]
    pub fn from_inherited(inherited: crate::Inherited) -> Server {
        let mut server = Server::from_listeners([]);
        let upgrade = inherited.is_upgrade();
        for (listener, name, owned) in inherited.listeners {
            // A previous generation of ours bound it: its file is ours to remove in turn.
            if upgrade && owned {
                server.files.extend(SocketFile::handed_over(&listener));
            }
            server.listeners.push((listener, name));
        }
        server.ready_pipe = inherited.ready;
        server.handover = inherited.handover;
        server.control = inherited.control;
        if let Some(generation) = inherited.generation {
            let _ = server.shared.generation.set(generation);
        }
        server
    }

    /// The addresses the server listens on.
    pub fn local_addrs(&self) -> Vec<Addr> {
        self.listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect()
    }

    /// How long in-flight work may take once the listeners are closed: requests and
    /// upgraded connections, then background jobs. What is still running then is forced
    /// closed. Default 30 s. As with Go's `Shutdown(ctx)`, axum-server and actix, the whole
    /// of it goes to the work: a 20 s request finishes under a 30 s timeout. Resources
    /// close afterwards, each within its own [`Resource::timeout`](crate::Resource::timeout).
    /// Any value is accepted: one too large to add to a clock means "no deadline".
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.budget.shutdown_timeout = timeout;
        self
    }

    /// An overall bound on the whole stop, counted from the moment a drain is asked for:
    /// pre-stop delay, in-flight work, jobs and resources together. For orchestrators that
    /// kill at a fixed time (Kubernetes' `terminationGracePeriodSeconds`, systemd's
    /// `TimeoutStopSec`). Only with it is time held back for the resources: in-flight work
    /// is forced early enough to leave them the timeouts they declared (or what is left,
    /// shared in proportion). Default: none.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), grace_http::Error> {
    /// use std::time::Duration;
    /// let server = grace_http::Server::bind("127.0.0.1:8080").await?
    ///     .pre_stop_delay(Duration::from_secs(5))
    ///     .shutdown_timeout(Duration::from_secs(20))
    ///     .stop_deadline(Duration::from_secs(30)); // terminationGracePeriodSeconds: 30
    /// # let _ = server; Ok(()) }
    /// ```
    pub fn stop_deadline(mut self, deadline: impl Into<Option<Duration>>) -> Self {
        self.config.budget.stop_deadline = deadline.into();
        self
    }

    /// How long a client may take to send a request's head (HTTP/1), counted from accept
    /// or from the first byte of the request; a silent new connection counts too. `None`
    /// turns the guard off. Default 10 s. Kept by one coarse timer per server (checked four
    /// times per timeout), not one per request. Idle keep-alive connections are not cut.
    pub fn header_read_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.config.header_read_timeout = timeout.into();
        self
    }

    /// How long a keep-alive connection (HTTP/1 between requests, HTTP/2 with no open
    /// stream) may stay idle before it is closed. `None` keeps idle connections for as long
    /// as clients like (a client could then hold every descriptor). Default
    /// [`DEFAULT_IDLE_TIMEOUT`] (75 s). Kept by the same coarse clock as the header-read
    /// timeout, so a connection is closed between one and `1 + 1/4` timeouts after it went
    /// idle.
    pub fn idle_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.config.idle_timeout = timeout.into();
        self
    }

    /// How slowly a request body may arrive: it must come within `timeout` of the request's
    /// head, plus one second for every `min_rate` bytes received, else reading it fails with
    /// a [`BodyTimeout`](crate::BodyTimeout) error (axum's extractors answer 400; see
    /// [`BodyTimeout::find`](crate::BodyTimeout::find) to answer 408) and the
    /// connection closes after the response. So a client that sends headers and then
    /// dribbles its body cannot hold a connection forever, while an upload at any reasonable
    /// speed is never cut. `None` turns it off. Default 20 s and 500 bytes/s (Apache's
    /// `mod_reqtimeout`). A handler that does not read the body is not affected.
    pub fn request_body_timeout(
        mut self,
        timeout: impl Into<Option<Duration>>,
        min_rate: u64,
    ) -> Self {
        self.config.body_limit = timeout
            .into()
            .map(|initial| BodyLimit { initial, min_rate });
        self
    }

    /// When a drain starts, a connection accepted less than this long ago that has sent
    /// nothing yet is given until this age to send its first byte: its request may be on the
    /// wire. Older silent connections are closed at once. Default 200 ms.
    pub fn new_connection_grace(mut self, grace: Duration) -> Self {
        self.config.new_connection_grace = grace;
        self
    }

    /// Keep accepting and serving this long after a drain is asked for, with readiness
    /// already failing, so load balancers stop routing here first. Default zero. Not at an
    /// upgrade ([`Trigger::Restart`]): the new process serves on the same socket, so the
    /// old one closes its copy of the listener at once.
    pub fn pre_stop_delay(mut self, delay: Duration) -> Self {
        self.config.budget.pre_stop_delay = delay;
        self
    }

    /// Serves HTTPS: every accepted connection does a TLS handshake first (crate feature
    /// `tls`). Keep a clone of `config` to reload the certificate while serving (see
    /// [`TlsConfig::reload_from_pem_files`](crate::tls::TlsConfig::reload_from_pem_files)).
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// let tls = grace_http::tls::TlsConfig::from_pem_files("cert.pem", "key.pem")?;
    /// let server = grace_http::Server::bind("0.0.0.0:8443").await?.tls(tls.clone());
    /// # let _ = server; Ok(()) }
    /// ```
    #[cfg(feature = "tls")]
    pub fn tls(self, config: crate::tls::TlsConfig) -> Self {
        self.acceptor(config)
    }

    /// Passes every accepted socket through `acceptor` before HTTP is spoken on it (see
    /// [`accept`](crate::accept)): TLS is one, a PROXY protocol reader could be another.
    /// The connection is tracked, drained and forced as any other meanwhile. Replaces any
    /// acceptor set before (including `tls`).
    pub fn acceptor(mut self, acceptor: impl Acceptor) -> Self {
        self.acceptor = Some(Arc::new(acceptor));
        self
    }

    /// Whether every request carries the peer's address in its extensions:
    /// [`PeerAddr`](crate::PeerAddr), and with the crate feature `axum`,
    /// `axum::extract::ConnectInfo<SocketAddr>` for TCP peers. Default `false`: like axum's
    /// `into_make_service_with_connect_info`, it is asked for, because it costs an
    /// allocation per request (about 650 instructions, 7 % of a bare handler's request;
    /// see `docs/benchmarks.md`). What an acceptor adds (TLS's `TlsInfo`) is always there.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), grace_http::Error> {
    /// let app: axum::Router = axum::Router::new().route(
    ///     "/whoami",
    ///     axum::routing::get(|axum::Extension(peer): axum::Extension<grace_http::PeerAddr>| async move {
    ///         peer.0.to_string()
    ///     }),
    /// );
    /// let server = grace_http::Server::bind("127.0.0.1:8080").await?.peer_addr_in_requests(true);
    /// # let _ = (server, app); Ok(()) }
    /// ```
    pub fn peer_addr_in_requests(mut self, enabled: bool) -> Self {
        self.config.peer_in_requests = enabled;
        self
    }

    /// Records each connection's current request (method, target and start) so that the
    /// shutdown report says what a forced connection was serving
    /// ([`ConnSnapshot::request`](crate::ConnSnapshot::request)), and so do
    /// [`Handle::connection_snapshots`](crate::Handle::connection_snapshots). Default `false`:
    /// like [`peer_addr_in_requests`](Self::peer_addr_in_requests), it is asked for, because
    /// it costs a clock read, a lock and a copy per request (about 100 instructions, under
    /// 1 % of a request through an axum `Router`; see `docs/benchmarks.md`). Without it the
    /// report still lists each forced connection, its peer, state and age.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), grace_http::Error> {
    /// let server = grace_http::Server::bind("127.0.0.1:8080").await?.record_requests(true);
    /// # let _ = server; Ok(()) }
    /// ```
    pub fn record_requests(mut self, enabled: bool) -> Self {
        self.config.record_requests = enabled;
        self
    }

    /// How long an [`acceptor`](Self::acceptor) (a TLS handshake) may take before the
    /// connection is closed. Default 10 s. The header-read timeout still counts from accept.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.config.handshake_timeout = timeout;
        self
    }

    /// Spreads the [`ShutdownNotice`](crate::ShutdownNotice)s of upgraded connections
    /// (WebSockets, streams) over this window after the drain starts, each at its own
    /// place, instead of all at once: their clients then reconnect (to the new generation,
    /// after an upgrade) spread out rather than in one storm. Keep it well inside the
    /// shutdown timeout, which still forces what is left. Default zero: all at once.
    pub fn goodbye_spread(mut self, window: Duration) -> Self {
        self.config.goodbye_spread = window;
        self
    }

    /// At most `max` connections at once, all listeners together; `None` (the default): no
    /// limit. At the limit the server stops accepting until a connection closes: new
    /// connections wait in the kernel's accept queue (they are not refused, and are served
    /// in turn), so a burst costs latency, not errors. Every live connection counts,
    /// keep-alive and upgraded ones included, until its socket closes. Each listener takes
    /// its place before it accepts (that is what leaves the next connection in the kernel's
    /// queue, where an upgrade hands it on), so with several listeners, up to one place per
    /// idle listener is held back.
    ///
    /// So that idle or silent clients cannot hold every place, a client waiting in the
    /// accept queue while no place frees up (the queue is looked at every 50 ms) makes room:
    /// the connection idle longest is closed (oldest first among equals; HTTP/1 as the
    /// idle timeout closes it, never under a request that has begun), else every connection
    /// that has sent nothing since it was accepted more than the
    /// [`new_connection_grace`](Self::new_connection_grace) ago (200 ms by default; no byte
    /// read, none waiting in its socket, no TLS handshake under way). A connection with a
    /// request in flight, or upgraded, is never closed to make room: when every place is
    /// busy, new clients wait. Behind `n` silent connections already queued, a client waits
    /// about `n / max` grace periods, as each batch is accepted and given its grace.
    pub fn max_connections(mut self, max: impl Into<Option<usize>>) -> Self {
        self.config.max_connections = max.into();
        self
    }

    /// Closes connections gracefully once they are about `age` old (each between 0.9 and
    /// 1.1 times `age`, so that connections opened together do not all close together):
    /// HTTP/1 answers its next response with `Connection: close` (an idle one closes at
    /// once), HTTP/2 sends GOAWAY and lets open streams finish. Clients reconnect, so load
    /// spreads again over new instances behind a balancer. Upgraded connections are not
    /// affected. Default `None`.
    pub fn max_connection_age(mut self, age: impl Into<Option<Duration>>) -> Self {
        self.config.max_connection_age = age.into();
        self
    }

    /// Changes hyper's HTTP/1.1 and HTTP/2 settings (buffer sizes, header limits, HTTP/2
    /// windows, keep-alive pings, `title_case_headers`…) after grace has set its own. Leave
    /// hyper's `header_read_timeout` off: grace keeps that timeout itself
    /// ([`header_read_timeout`](Self::header_read_timeout)), for far less per request.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), grace_http::Error> {
    /// let server = grace_http::Server::bind("127.0.0.1:8080").await?.configure_hyper(|b| {
    ///     b.http1().max_buf_size(64 * 1024);
    ///     b.http2().max_concurrent_streams(100);
    /// });
    /// # let _ = server; Ok(()) }
    /// ```
    pub fn configure_hyper(mut self, f: impl FnOnce(&mut HyperBuilder) + Send + 'static) -> Self {
        self.configure_hyper = Some(Box::new(f));
        self
    }

    /// Observes every state change of every connection, like Go's `Server.ConnState`.
    /// Called inline on the connection's task: keep it quick.
    pub fn on_conn_state<F>(mut self, hook: F) -> Self
    where
        F: Fn(&ConnInfo, ConnState) + Send + Sync + 'static,
    {
        self.hook = Some(Box::new(hook));
        self
    }

    /// A handle to start a drain from code and read live counts.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Serves `service` until a drain completes. Await the returned [`Serve`], optionally
    /// after [`Serve::with_signals`].
    ///
    /// Any `tower::Service<Request<RequestBody>>` that can be cloned works, an
    /// `axum::Router` included. With the crate feature `axum`, a `Router` has its routes
    /// made ready once, here, as `axum::serve` does per connection
    /// (`Router::with_state(())`); without it, pass `router.with_state(())` to spare every
    /// request the boxed clone of its handler that axum otherwise makes.
    pub fn serve<S, B>(self, service: S) -> Serve<S>
    where
        S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        Serve {
            server: self,
            service: serve::routes_ready(service),
            signals: None,
            #[cfg(unix)]
            control: None,
            #[cfg(unix)]
            restart: None,
        }
    }
}
