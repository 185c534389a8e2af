//! The one entry: the [`Server`] builder. What it serves with is [`Serve`] (`serve`), which
//! starts the accept loops (`accepting`) and, once asked to stop, runs the drain.

use std::sync::Arc;

use http::{Request, Response};
use http_body::Body;
use tokio::net::ToSocketAddrs;

use crate::accept::Acceptor;
use crate::base::conn::{Addr, ConnInfo, ConnState};
use crate::conn::body::RequestBody;
use crate::conn::task::BoxError;
use crate::conn::tracker::Hook;
use crate::error::{Error, Result};
use crate::listener::{Listener, SocketFile};
use crate::shutdown::{Handle, Shared};

mod accepting;
mod also;
#[cfg(unix)]
mod generations;
mod serve;
mod settings;

pub use serve::Serve;
pub use settings::{DEFAULT_IDLE_TIMEOUT, DrainPolicy, Limits, Timeouts};

impl Config {
    /// What the tracker is set up with as serving starts.
    pub(crate) fn tracker_settings(&self, hook: Option<Hook>) -> crate::conn::tracker::Settings {
        crate::conn::tracker::Settings {
            hook,
            goodbye_spread: self.drain.goodbye_spread.unwrap_or_default(),
            records: self.record_requests,
        }
    }
}

/// Settings of a server, set through [`Server`]'s builder methods.
#[derive(Clone, Debug, Default)]
pub(crate) struct Config {
    pub(crate) timeouts: Timeouts,
    pub(crate) limits: Limits,
    pub(crate) drain: DrainPolicy,
    /// `None`: as the service asks (an axum `Router` does; see `peer_addr_in_requests`).
    pub(crate) peer_in_requests: Option<bool>,
    pub(crate) record_requests: bool,
}

/// A graceful HTTP/1.1 + HTTP/2 server that owns its listeners.
///
/// ```no_run
/// use std::time::Duration;
/// use grace_http::{ConnInfo, ConnState, DrainPolicy, Server};
///
/// # async fn doc() -> Result<(), grace_http::Error> {
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
/// let server = Server::bind("127.0.0.1:8080").await?
///     .drain_policy(DrainPolicy::default().shutdown_timeout(Duration::from_secs(30)))
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
    /// Binds a listener: TCP on the first address `addr` resolves to (`"0.0.0.0:8080"`, a
    /// `SocketAddr`, `("localhost", 8080)`), or a Unix-domain socket for `"unix:PATH"` (on
    /// Unix; on Windows that is an [`Error::Bind`] of kind `Unsupported`). A
    /// Unix socket replaces a stale socket file at `PATH` but never a live one or another
    /// kind of file, and its file is removed once the server stops for good (see
    /// [`Listener`]'s docs); [`bind_unix_with_mode`](Self::bind_unix_with_mode) sets its
    /// permissions.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), grace_http::Error> {
    /// let public = grace_http::Server::bind("0.0.0.0:8080").await?;
    /// let local = grace_http::Server::bind("unix:/run/app/app.sock").await?;
    /// # let _ = (public, local); Ok(()) }
    /// ```
    pub async fn bind(addr: impl ToSocketAddrs + std::fmt::Display) -> Result<Server> {
        let text = addr.to_string();
        #[cfg(unix)]
        if let Some(path) = text.strip_prefix("unix:") {
            return Server::bind_unix_file(std::path::Path::new(path), None);
        }
        #[cfg(not(unix))]
        if text.starts_with("unix:") {
            let source = std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "Unix-domain sockets are Unix only",
            );
            return Err(Error::Bind { addr: text, source });
        }
        let bind_err = |source| Error::Bind { addr: text, source };
        let mut last = None;
        let resolved = match tokio::net::lookup_host(&addr).await {
            Ok(resolved) => resolved,
            Err(e) => return Err(bind_err(e)),
        };
        for a in resolved {
            match Listener::bind(a) {
                Ok(l) => return Ok(Server::from_listener(l)),
                Err(e) => last = Some(e),
            }
        }
        Err(bind_err(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
        })))
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

    /// Like [`bind`](Self::bind) with `"unix:PATH"`, with the socket file's permissions set
    /// to `mode` (for example `0o660`) whatever the umask (see
    /// [`Listener::bind_unix_with_mode`]).
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

    /// How long each part of a connection's life may take: reading a request's head, idling
    /// between requests, sending a body, a TLS handshake. See [`Timeouts`] for each, and its
    /// default.
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.config.timeouts = timeouts;
        self
    }

    /// How much the server takes on: connections at once, and their age. See [`Limits`];
    /// by default, no limit.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.config.limits = limits;
        self
    }

    /// How the server stops: the time in-flight work gets, an overall deadline, a pre-stop
    /// delay, the grace of new connections, the spread of goodbyes. See [`DrainPolicy`] for
    /// each, and its default.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), grace_http::Error> {
    /// use std::time::Duration;
    /// let server = grace_http::Server::bind("127.0.0.1:8080").await?.drain_policy(
    ///     grace_http::DrainPolicy::default()
    ///         .pre_stop_delay(Duration::from_secs(5))
    ///         .shutdown_timeout(Duration::from_secs(20)),
    /// );
    /// # let _ = server; Ok(()) }
    /// ```
    pub fn drain_policy(mut self, policy: DrainPolicy) -> Self {
        self.config.drain = policy;
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

    /// Whether every request carries its connection's addresses in its extensions: with the
    /// crate feature `axum` (a default feature), a TCP peer's address as
    /// `axum::extract::ConnectInfo<SocketAddr>`, so axum's `ConnectInfo` extractor works as
    /// under `into_make_service_with_connect_info`; on every listener,
    /// [`ConnAddrs`](crate::ConnAddrs), the peer's address and the local one (a Unix-domain
    /// peer gets only this one). What an acceptor adds (TLS's `TlsInfo`) is there either
    /// way.
    ///
    /// Default: on when the service served is an `axum::Router` (as it is passed to
    /// [`serve`](Self::serve), layers added with `Router::layer` included), so an axum user
    /// asks for nothing; off for any other service (a bare `tower` service, or a `Router`
    /// wrapped in outer `tower` layers), which pays nothing for addresses it does not read:
    /// call this with `true` to have them there too.
    ///
    /// `false` leaves the addresses out, for a Router that never reads them. Each request
    /// gets a copy of them (a map made once per connection, cloned: each value is boxed);
    /// under callgrind that is about 460 instructions per request through a one-route axum
    /// `Router` (3.5 %; `axum::serve` with `into_make_service_with_connect_info` pays 340
    /// for its one value) and 930 with a bare `tower` handler (11 %, where the request has
    /// no other extension), and about 680 bytes per connection (see `docs/benchmarks.md`).
    ///
    /// ```no_run
    /// use std::net::SocketAddr;
    /// use axum::extract::ConnectInfo;
    ///
    /// # async fn doc() -> Result<(), grace_http::Error> {
    /// // Nothing to ask for: `ConnectInfo` is there.
    /// let app: axum::Router = axum::Router::new().route(
    ///     "/whoami",
    ///     axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
    ///         peer.to_string()
    ///     }),
    /// );
    /// grace_http::Server::bind("127.0.0.1:8080").await?.serve(app).await?;
    ///
    /// // A service that never reads them saves their cost.
    /// let ping = axum::Router::new().route("/", axum::routing::get(|| async { "pong" }));
    /// let server = grace_http::Server::bind("127.0.0.1:8081").await?.peer_addr_in_requests(false);
    /// server.serve(ping).await?;
    /// # Ok(()) }
    /// ```
    pub fn peer_addr_in_requests(mut self, enabled: bool) -> Self {
        self.config.peer_in_requests = Some(enabled);
        self
    }

    /// Records each connection's current request (method, target and start) so that the
    /// shutdown report says what a forced connection was serving
    /// ([`ConnSnapshot::request`](crate::ConnSnapshot::request)), and so do
    /// [`Handle::connection_snapshots`](crate::Handle::connection_snapshots). Default `false`:
    /// it is asked for, because it costs a clock read, a lock and a copy per request (about
    /// 100 instructions, under 1 % of a request through an axum `Router`; see
    /// `docs/benchmarks.md`). Without it the report still lists each forced connection, its
    /// peer, state and age.
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

    /// Changes hyper's HTTP/1.1 and HTTP/2 settings (buffer sizes, header limits, HTTP/2
    /// windows, keep-alive pings, `title_case_headers`…) after grace has set its own. Leave
    /// hyper's `header_read_timeout` off: grace keeps that timeout itself
    /// ([`header_read_timeout`](Timeouts::header_read)), for far less per request.
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
    /// `axum::Router` included. With the crate feature `axum` (a default feature), a
    /// `Router` has its routes made ready once, here, as `axum::serve` does per connection
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
        let mut server = self;
        let asked = server.config.peer_in_requests;
        server.config.peer_in_requests = Some(asked.unwrap_or(serve::is_axum_router(&service)));
        Serve {
            server,
            service: serve::routes_ready(service),
            signals: None,
            #[cfg(unix)]
            control: None,
            #[cfg(unix)]
            restart: None,
            shutdown: Vec::new(),
            also: Vec::new(),
        }
    }
}
