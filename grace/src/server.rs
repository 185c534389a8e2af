//! The [`Server`] builder, the accept loop, the per-connection task, and the drain that
//! [`Serve`] runs when asked to stop.

use std::future::{Future, IntoFuture};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tokio::net::ToSocketAddrs;
use tokio::signal::unix::SignalKind;
use tokio::task::JoinSet;

use crate::accept::Acceptor;
use crate::base::budget::Budget;
use crate::base::report::ShutdownReport;
use crate::base::report::Trigger;
use crate::conn::body::{BodyLimit, RequestBody};
use crate::conn::task::{self, BoxError, ConnCtx, HttpService, ResponseBody};
use crate::conn::tracker::Hook;
use crate::conn::{Addr, ConnInfo, ConnState, clock};
use crate::error::{Error, Result};
use crate::listener::{self, Listener, SocketFile, Stream};
use crate::shutdown::{Handle, Named, Shared, drain};
use crate::signal::{DEFAULT_SIGNALS, Signals};

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
    ready_pipe: Option<std::os::fd::OwnedFd>,
    /// The socket on which the previous generation hands connections over, if it does.
    handover: Option<std::os::fd::OwnedFd>,
    /// The previous generation's control socket (see [`Serve::with_control`]).
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
    pub fn bind_unix(path: impl AsRef<std::path::Path>) -> Result<Server> {
        Server::bind_unix_file(path.as_ref(), None)
    }

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
            ready_pipe: None,
            handover: None,
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
            service: routes_ready(service),
            signals: None,
            control: None,
            restart: None,
        }
    }
}

/// An `axum::Router` with every route made ready (`with_state(())`: each handler turned into
/// a route once, rather than cloned and boxed per request); any other service as it is.
fn routes_ready<S: 'static>(service: S) -> S {
    #[cfg(feature = "axum")]
    {
        let mut slot = Some(service);
        if let Some(router) =
            (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<axum::Router>>()
        {
            *router = router.take().map(|r| r.with_state(()));
        }
        match slot {
            Some(service) => service,
            None => unreachable!("put back above"),
        }
    }
    #[cfg(not(feature = "axum"))]
    service
}

/// A server about to serve: await it (it resolves to the [`ShutdownReport`] once drained).
#[must_use = "a Serve does nothing until awaited"]
pub struct Serve<S> {
    server: Server,
    service: S,
    signals: Option<Result<Signals>>,
    control: Option<(PathBuf, std::io::Result<crate::control::Bound>)>,
    restart: Option<crate::restart::Control>,
}

impl<S> Serve<S> {
    /// Drains on SIGTERM or SIGINT; a second signal during the drain forces.
    /// The handlers are installed now, within the current tokio runtime.
    pub fn with_signals(self) -> Self {
        self.with_signals_from(&DEFAULT_SIGNALS)
    }

    /// Like [`with_signals`](Self::with_signals), with your own set of signals.
    pub fn with_signals_from(mut self, signals: &[SignalKind]) -> Self {
        self.signals = Some(Signals::install(signals));
        self
    }

    /// Answers an operator's commands on a Unix socket at `path` (owner-only): status,
    /// upgrade (waiting for its outcome), drain. See [`control`](crate::control) for the
    /// protocol and a client. The socket is bound now, within the current tokio runtime: a
    /// stale socket at `path` is replaced, but a live one (another instance's), a regular
    /// file, a symbolic link or anything else is left alone and makes `serve` fail with
    /// [`Error::Control`]. A new generation takes the very socket over from the previous one
    /// (passed with the listeners), and the last removes its file.
    pub fn with_control(mut self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let inherited = self.server.control.take();
        let bound = crate::control::bind(&path, inherited);
        self.control = Some((path, bound));
        self
    }

    /// Like [`with_control`](Self::with_control), failing now rather than when served if
    /// the control socket cannot be set up, so a program can say so before it says it serves.
    pub fn try_with_control(self, path: impl Into<PathBuf>) -> Result<Self> {
        let mut serve = self.with_control(path);
        match serve.control.take() {
            Some((path, Err(source))) => Err(Error::Control { path, source }),
            bound => {
                serve.control = bound;
                Ok(serve)
            }
        }
    }

    /// Restarts with zero downtime on `restart`'s signal (default SIGHUP) or
    /// [`Handle::restart`]: starts the new process with the listening sockets, waits until
    /// it is ready, then drains this one with [`Trigger::Restart`](crate::Trigger::Restart).
    /// If the new process fails, kills it (with its process group) and keeps serving. One
    /// restart at a time: a request during one is logged and refused.
    ///
    /// A stop (a drain signal, [`Handle::shutdown`]) that comes while a new process is
    /// starting wins: the new process is told to stop as well (SIGTERM, so it drains what
    /// it may have accepted; SIGKILL to its group after the shutdown timeout) and reaped
    /// before `serve` returns, so a stop never leaves a generation behind, and the pid file
    /// names a live process or is gone.
    ///
    /// The signal handler is installed now, within the current tokio runtime, so the
    /// signal cannot kill the process from here on. See [`Restart`](crate::Restart) for an
    /// example.
    pub fn with_restart(mut self, restart: crate::Restart) -> Self {
        if let Some(control) = crate::restart::Control::enable(&self.server.shared, restart) {
            self.restart = Some(control);
        }
        self
    }

    /// A handle to the server (the same as [`Server::handle`]).
    pub fn handle(&self) -> Handle {
        self.server.handle()
    }
}

impl<S, B> IntoFuture for Serve<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = Result<ShutdownReport>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<ShutdownReport>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

/// Aborts a background task when the serve future ends or is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    /// Waits for the task to end by itself.
    async fn finish(mut self) {
        let _ = (&mut self.0).await;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<S> Serve<S> {
    async fn run<B>(self) -> Result<ShutdownReport>
    where
        S: HttpService<B>,
        B: ResponseBody,
    {
        let Serve {
            server,
            service,
            signals,
            control,
            restart,
        } = self;
        let Server {
            listeners,
            ready_pipe,
            handover,
            control: inherited_control,
            files,
            shared,
            hook,
            acceptor,
            configure_hyper,
            config,
        } = server;
        // Passed by the previous generation, not taken (no `with_control`, or another path):
        // ours closes now, the previous generation's goes with it.
        drop(inherited_control);
        if let Some(hook) = hook {
            let _ = shared.tracker.hook.set(hook);
        }
        let _ = shared.tracker.goodbye_spread.set(config.goodbye_spread);
        if config.record_requests {
            let _ = shared.tracker.records.set(());
        }
        let _watchdog = crate::systemd::watchdog_interval()
            .map(|every| AbortOnDrop(tokio::spawn(crate::systemd::watchdog(every))));
        // Bound (or taken over) now, answered once serving: a new generation that fails
        // before it is ready never takes a control request.
        let (control_socket, control_file) = match control {
            Some((path, bound)) => {
                let (socket, file) = bound.map_err(|source| Error::Control { path, source })?;
                (Some(socket), Some(file))
            }
            None => (None, None),
        };
        let _signals = match signals {
            Some(s) => Some(AbortOnDrop(tokio::spawn(s?.drive(Arc::clone(&shared))))),
            None => None,
        };

        let ctx = Arc::new(ConnCtx {
            service,
            builder: {
                let mut builder = HyperBuilder::new();
                if let Some(configure) = configure_hyper {
                    configure(&mut builder);
                }
                Arc::new(builder)
            },
            tracker: Arc::clone(&shared.tracker),
            drain: Arc::clone(&shared.drain),
            grace: config.new_connection_grace,
            restart_grace: config
                .header_read_timeout
                .unwrap_or(config.budget.shutdown_timeout)
                .max(config.new_connection_grace),
            body_limit: config.body_limit,
            acceptor,
            handshake_timeout: config.handshake_timeout,
            max_age: config.max_connection_age,
            peer_in_requests: config.peer_in_requests,
        });
        // One limit for all listeners.
        let limit = config
            .max_connections
            .map(|max| Arc::new(tokio::sync::Semaphore::new(max)));
        let _clock = clock::start(
            &shared.tracker,
            config.header_read_timeout,
            config.idle_timeout,
        )?;
        let listeners: Vec<_> = listeners
            .into_iter()
            .map(|(l, name)| (Arc::new(l), name))
            .collect();
        // Kept while serving, so a restart can hand them on (see `restart`).
        let owned = |l: &Listener| files.iter().any(|f| f.is_of(l));
        let named = listeners.iter().map(|(l, name)| Named {
            listener: Arc::clone(l),
            name: name.clone(),
            owns_file: owned(l),
        });
        shared.set_listeners(named.collect());
        // Ready before the first accept (connections wait in the kernel's queue meanwhile):
        // pid file, the previous generation's readiness pipe, systemd READY=1. A new
        // generation that cannot report ready fails here, having accepted nothing.
        // Connections the previous generation hands over are served from before we say we
        // are ready (it hands them over only once we have).
        let inbox = match handover.map(crate::handover::inbox::Inbox::new).transpose() {
            Ok(inbox) => inbox,
            Err(e) => {
                tracing::warn!(error = %e, "cannot receive handed-over connections: none taken");
                None
            }
        };
        let takes_connections = inbox.is_some();
        if !takes_connections {
            shared.tracker.previous_done.set(());
        }
        let _receiving = inbox.map(|inbox| {
            AbortOnDrop(tokio::spawn(receive_handed(
                inbox,
                limit.clone(),
                Arc::clone(&ctx),
            )))
        });
        // A connection that was on its way to a next generation that went (or that could
        // not go) is served here again.
        let _ = shared.tracker.local.set({
            let (limit, ctx) = (limit.clone(), Arc::clone(&ctx));
            Box::new(move |handed| serve_handed_here(handed, limit.as_ref(), &ctx))
        });
        let pid_file = restart
            .as_ref()
            .and_then(|r| r.pid_file().map(Path::to_path_buf));
        let restarts = crate::restart::serving(
            &shared,
            restart,
            ready_pipe,
            takes_connections,
            config.budget.shutdown_timeout,
        )?
        .map(AbortOnDrop);
        // Serving: the files are ours to remove when we stop, whoever bound them.
        files.iter().for_each(SocketFile::arm);
        control_file.iter().for_each(SocketFile::arm);
        let control = control_socket.map(|socket| {
            AbortOnDrop(tokio::spawn(crate::control::serve(
                socket,
                Arc::clone(&shared),
            )))
        });
        let mut accepting = JoinSet::new();
        for (l, _) in listeners {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "listening");
            }
            accepting.spawn(accept_loop(
                l,
                limit.clone(),
                Arc::clone(&shared),
                Arc::clone(&ctx),
            ));
        }

        let trigger = shared.drain_asked().await;
        let report = drain::run(&shared, config.budget, trigger, accepting).await;
        // An upgrade under way when the drain was asked for ends first: the new process
        // is stopped and reaped (see `restart::spawn`), so none outlives this one.
        if let Some(restarts) = restarts {
            restarts.finish().await;
        }
        crate::restart::finished(pid_file.as_deref(), report.trigger == Trigger::Restart);
        if report.trigger == Trigger::Restart {
            // The new generation serves on them, and removes them when it stops.
            files.iter().for_each(SocketFile::disarm);
        }
        drop(files);
        // The control socket answers until the very end (status during the drain), unless a
        // new generation took it over; then its file is the new generation's to remove.
        drop(control);
        if shared.control.handed_on() {
            control_file.iter().for_each(SocketFile::disarm);
        }
        drop(control_file);
        Ok(report)
    }
}

/// Serves the connections the previous generation hands over, until it closes its end.
/// They are already accepted: one that finds the connection limit reached is served anyway.
async fn receive_handed<S, B>(
    mut inbox: crate::handover::inbox::Inbox,
    limit: Option<Arc<tokio::sync::Semaphore>>,
    ctx: Arc<ConnCtx<S>>,
) where
    S: HttpService<B>,
    B: ResponseBody,
{
    loop {
        let handed = match inbox.recv().await {
            Ok(Some(handed)) => handed,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "hand-over channel failed: no more connections taken");
                break;
            }
        };
        serve_handed_here(handed, limit.as_ref(), &ctx);
    }
    tracing::debug!("the previous generation has handed over all it will");
    ctx.tracker.previous_done.set(());
}

/// Resolves once accepting is paused (`true`) or no longer paused (`false`).
async fn wait_paused(paused: &mut tokio::sync::watch::Receiver<bool>, to: bool) {
    // An error: the sender (in `Shared`) is gone, which it never is while we accept.
    let _ = paused.wait_for(|p| *p == to).await;
}

/// Serves a connection handed over (by the previous generation, or back from an upgrade of
/// ours that did not take it). Already accepted: one that finds the connection limit reached
/// is served anyway.
fn serve_handed_here<S, B>(
    handed: crate::handover::Handed,
    limit: Option<&Arc<tokio::sync::Semaphore>>,
    ctx: &Arc<ConnCtx<S>>,
) where
    S: HttpService<B>,
    B: ResponseBody,
{
    let crate::handover::Handed {
        socket,
        kind,
        buffered,
        origin,
    } = handed;
    match Stream::from_handed(socket) {
        Ok((mut stream, peer)) => {
            stream.hold(limit.and_then(|l| Arc::clone(l).try_acquire_owned().ok()));
            tokio::spawn(task::serve_handed(
                stream,
                peer,
                kind,
                buffered,
                origin,
                Arc::clone(ctx),
            ));
        }
        Err(e) => tracing::debug!(error = %e, "handed-over descriptor refused"),
    }
}

/// Accepts until the drain starts, then drops (closes) the listener. Stops accepting (the
/// listener kept) while an upgrade hands connections over, so that every new connection goes
/// to the new generation meanwhile.
async fn accept_loop<S, B>(
    listener: Arc<Listener>,
    limit: Option<Arc<tokio::sync::Semaphore>>,
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx<S>>,
) where
    S: HttpService<B>,
    B: ResponseBody,
{
    const MIN_BACKOFF: Duration = Duration::from_millis(5);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    // Idle connections closed per failed accept: enough for the next few clients.
    const SHED_ON_EXHAUSTION: usize = 16;
    let mut backoff = MIN_BACKOFF;
    // When the connection limit was last said to be reached (said at most once a second).
    let mut said_full: Option<std::time::Instant> = None;
    let mut paused = shared.accept_pause();
    loop {
        // A place under the connection limit first: until one is free, new connections wait
        // in the kernel's accept queue, and make room for themselves (see `limit`).
        let slot = match &limit {
            None => None,
            Some(limit) => {
                if limit.available_permits() == 0
                    && said_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                {
                    said_full = Some(std::time::Instant::now());
                    tracing::warn!(
                        "max_connections reached: new connections wait in the accept queue; \
                         idle and silent connections make room for them"
                    );
                }
                tokio::select! {
                    biased;
                    _ = shared.accepting_stopped() => break,
                    slot = crate::limit::place(limit, &*listener, &shared.tracker, ctx.grace) => slot,
                }
            }
        };
        let accepted = tokio::select! {
            biased;
            _ = shared.accepting_stopped() => break,
            _ = wait_paused(&mut paused, true) => {
                tokio::select! {
                    biased;
                    _ = shared.accepting_stopped() => break,
                    _ = wait_paused(&mut paused, false) => continue,
                }
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((mut stream, peer)) => {
                backoff = MIN_BACKOFF;
                stream.hold(slot);
                task::spawn(stream, peer, Arc::clone(&ctx));
            }
            Err(e) if listener::is_connection_error(&e) => {
                tracing::debug!(error = %e, "accept: connection failed before it was accepted");
            }
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM: make room by closing the connections that
                // have been idle longest, and wait for resources instead of spinning.
                let shed = shared.tracker.shed_idle(SHED_ON_EXHAUSTION);
                tracing::error!(error = %e, ?backoff, shed, "accept failed; closed idle connections, backing off");
                tokio::select! {
                    _ = shared.accepting_stopped() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    drop(listener);
}
