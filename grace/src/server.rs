//! The [`Server`] builder, the accept loop, the per-connection task, and the drain that
//! [`Serve`] runs when asked to stop.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::ToSocketAddrs;
use tokio::signal::unix::SignalKind;
use tokio::task::JoinSet;

use crate::conn::io::TrackedIo;
use crate::conn::request::ConnService;
use crate::conn::tracker::Hook;
use crate::conn::{Addr, ConnInfo, ConnState};
use crate::error::{Error, Result};
use crate::listener::{self, Listener, Stream};
use crate::shutdown::report::{PhaseTiming, ShutdownReport};
use crate::shutdown::{ForceReason, Handle, Phase, Shared, Trigger};
use crate::signal::{Signals, DEFAULT_SIGNALS};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Settings of a server. Each has a builder method on [`Server`].
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) shutdown_timeout: Duration,
    pub(crate) header_read_timeout: Option<Duration>,
    pub(crate) new_connection_grace: Duration,
    pub(crate) pre_stop_delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            shutdown_timeout: Duration::from_secs(30),
            header_read_timeout: Some(Duration::from_secs(10)),
            new_connection_grace: Duration::from_millis(200),
            pre_stop_delay: Duration::ZERO,
        }
    }
}

/// A graceful HTTP/1.1 + HTTP/2 server that owns its listeners.
///
/// ```no_run
/// use std::time::Duration;
/// use grace::{ConnInfo, ConnState, Server};
///
/// # async fn doc() -> Result<(), grace::Error> {
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
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    hook: Option<Hook>,
    config: Config,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listeners", &self.listeners)
            .field("config", &self.config)
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

    /// Binds a Unix-domain listener at `path`.
    pub fn bind_unix(path: impl AsRef<std::path::Path>) -> Result<Server> {
        let path = path.as_ref();
        Listener::bind_unix(path)
            .map(Server::from_listener)
            .map_err(|source| Error::Bind {
                addr: path.display().to_string(),
                source,
            })
    }

    /// Serves on a listener made elsewhere (a `tokio` listener converts with `.into()`).
    pub fn from_listener(listener: impl Into<Listener>) -> Server {
        Server::from_listeners([listener.into()])
    }

    /// Serves on several listeners at once (for example every socket systemd passed).
    pub fn from_listeners(listeners: impl IntoIterator<Item = Listener>) -> Server {
        Server {
            listeners: listeners.into_iter().collect(),
            shared: Shared::new(),
            hook: None,
            config: Config::default(),
        }
    }

    /// The addresses the server listens on.
    pub fn local_addrs(&self) -> Vec<Addr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// How long a drain may wait for connections and jobs before forcing them closed.
    /// Default 30 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
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

    /// When a drain starts, a connection accepted less than this long ago that has sent
    /// nothing yet is given until this age to send its first byte: its request may be on the
    /// wire. Older silent connections are closed at once. Default 200 ms.
    pub fn new_connection_grace(mut self, grace: Duration) -> Self {
        self.config.new_connection_grace = grace;
        self
    }

    /// Keep accepting and serving this long after a drain is asked for, with readiness
    /// already failing, so load balancers stop routing here first. Default zero.
    pub fn pre_stop_delay(mut self, delay: Duration) -> Self {
        self.config.pre_stop_delay = delay;
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
    /// Any `tower::Service<Request<Incoming>>` that can be cloned works, an
    /// `axum::Router` included.
    pub fn serve<S, B>(self, service: S) -> Serve<S>
    where
        S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        Serve {
            server: self,
            service,
            signals: None,
        }
    }
}

/// A server about to serve: await it (it resolves to the [`ShutdownReport`] once drained).
#[must_use = "a Serve does nothing until awaited"]
pub struct Serve<S> {
    server: Server,
    service: S,
    signals: Option<Result<Signals>>,
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

    /// A handle to the server (the same as [`Server::handle`]).
    pub fn handle(&self) -> Handle {
        self.server.handle()
    }
}

impl<S, B> IntoFuture for Serve<S>
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
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

/// What every connection task needs.
struct ConnCtx<S> {
    service: S,
    builder: auto::Builder<TokioExecutor>,
    shared: Arc<Shared>,
    grace: Duration,
    /// The first-byte grace when a restart handed the listeners on (see `serve_connection`).
    restart_grace: Duration,
}

/// Aborts a background task when the serve future ends or is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<S> Serve<S> {
    async fn run<B>(self) -> Result<ShutdownReport>
    where
        S: tower::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let Serve {
            server,
            service,
            signals,
        } = self;
        let Server {
            listeners,
            shared,
            hook,
            config,
        } = server;
        if let Some(hook) = hook {
            let _ = shared.tracker.hook.set(hook);
        }
        let _signals = match signals {
            Some(s) => Some(AbortOnDrop(tokio::spawn(s?.drive(Arc::clone(&shared))))),
            None => None,
        };

        let ctx = Arc::new(ConnCtx {
            service,
            builder: http_builder(),
            shared: Arc::clone(&shared),
            grace: config.new_connection_grace,
            restart_grace: config
                .header_read_timeout
                .unwrap_or(config.shutdown_timeout)
                .max(config.new_connection_grace),
        });
        let _header_timeouts = config
            .header_read_timeout
            .map(|t| AbortOnDrop(tokio::spawn(header_timeouts(Arc::clone(&shared), t))));
        let mut accepting = JoinSet::new();
        let listeners: Vec<Arc<Listener>> = listeners.into_iter().map(Arc::new).collect();
        for l in &listeners {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "listening");
            }
            accepting.spawn(accept_loop(Arc::clone(l), Arc::clone(&ctx)));
        }
        // Kept while serving, so a restart can hand them on (see `restart`).
        shared.set_listeners(listeners);
        // Pid file, systemd READY=1, the previous generation's readiness pipe, restarts.
        let _restarts = crate::restart::serving(&shared)?.map(AbortOnDrop);

        let mut requests = shared.requests();
        let trigger = requests
            .wait_for(|r| r.drain.is_some())
            .await
            .ok()
            .and_then(|r| r.drain.clone())
            .unwrap_or(Trigger::Handle);
        Ok(drain(&shared, &config, trigger, accepting).await)
    }
}

fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The header-read timeout is kept by `header_timeouts` (one timer per server) rather
    // than by hyper (one timer per request).
    builder.http1().header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Cuts connections that take longer than `timeout` to send a request head (slow or
/// silent clients), checking four times per timeout.
async fn header_timeouts(shared: Arc<Shared>, timeout: Duration) {
    const TICKS: u32 = 4;
    let mut every = tokio::time::interval((timeout / TICKS).max(Duration::from_millis(1)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        shared.tracker.cut_slow_heads(TICKS);
    }
}

/// Runs the phases of a shutdown, in order, and says what happened.
async fn drain(
    shared: &Arc<Shared>,
    config: &Config,
    trigger: Trigger,
    mut accepting: JoinSet<()>,
) -> ShutdownReport {
    let started = Instant::now();
    let tracker = &shared.tracker;
    let at_start = tracker.counts();
    let completed_before = tracker.completed();
    tracing::info!(%trigger, ?at_start, "drain started");
    crate::systemd::drain_started(&trigger);
    let mut forced_by: Option<ForceReason> = None;
    let mut phases = Vec::new();
    let mut timed = |name, since: Instant| {
        phases.push(PhaseTiming {
            name,
            took: since.elapsed(),
        })
    };

    // Readiness already fails (since the request); with a pre-stop delay we keep serving.
    if !config.pre_stop_delay.is_zero() {
        let t = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(config.pre_stop_delay) => {}
            reason = shared.forced() => forced_by = Some(reason),
        }
        timed("pre_stop", t);
    }

    // Close the listeners first (new connections are refused), then tell every connection.
    let t = Instant::now();
    shared.close_listeners();
    while accepting.join_next().await.is_some() {}
    timed("close_listeners", t);
    let idle = tracker.close_idle();
    shared.enter(Phase::Draining);
    tracing::debug!(idle, "idle connections closed");
    // Everything ends by `deadline`; connections and jobs leave the resources their time.
    let deadline = t + config.shutdown_timeout;
    let reserve = shared.resources.budget().min(config.shutdown_timeout / 2);
    let drain_deadline = deadline - reserve;

    if forced_by.is_none() {
        let t = Instant::now();
        tokio::select! {
            _ = tracker.wait_empty() => {}
            _ = tokio::time::sleep_until(drain_deadline.into()) => forced_by = Some(ForceReason::Deadline),
            reason = shared.forced() => forced_by = Some(reason),
        }
        timed("drain", t);
    }

    let mut forced = Vec::new();
    if let Some(reason) = &forced_by {
        let t = Instant::now();
        shared.enter(Phase::Forcing);
        forced = tracker.force_all();
        tracing::warn!(%reason, count = forced.len(), "forcing connections closed");
        timed("force", t);
    }

    // Jobs next: handlers may have handed them work. A force cuts them at once.
    let t = Instant::now();
    let jobs_deadline = if forced_by.is_some() {
        Instant::now()
    } else {
        drain_deadline
    };
    let jobs = shared.jobs.stop(jobs_deadline, shared).await;
    timed("jobs", t);

    let t = Instant::now();
    let resources = shared.resources.close_all(deadline, shared).await;
    timed("resources", t);
    // A force that came while jobs or resources were closing cut them: say so.
    if forced_by.is_none() {
        forced_by = shared.force_requested();
    }

    let report = ShutdownReport {
        trigger,
        at_start,
        requests_completed: tracker.completed() - completed_before,
        forced_by,
        forced,
        jobs,
        resources,
        phases,
        total: started.elapsed(),
    };
    report.log();
    report
}

/// Accepts until the drain starts, then drops (closes) the listener.
async fn accept_loop<S, B>(listener: Arc<Listener>, ctx: Arc<ConnCtx<S>>)
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    const MIN_BACKOFF: Duration = Duration::from_millis(5);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let mut backoff = MIN_BACKOFF;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = ctx.shared.accepting_stopped() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = MIN_BACKOFF;
                tokio::spawn(serve_connection(stream, peer, Arc::clone(&ctx)));
            }
            Err(e) if listener::is_connection_error(&e) => {
                tracing::debug!(error = %e, "accept: connection failed before it was accepted");
            }
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM: wait for resources instead of spinning.
                tracing::error!(error = %e, ?backoff, "accept failed; backing off");
                tokio::select! {
                    _ = ctx.shared.accepting_stopped() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    drop(listener);
}

/// Serves one connection; on drain, asks it to close gracefully. Forcing happens on the
/// socket itself (see `Tracker::force_all`), so nothing here has to cooperate.
async fn serve_connection<S, B>(stream: Stream, peer: Addr, ctx: Arc<ConnCtx<S>>)
where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let io = TrackedIo::new(stream, peer, &ctx.shared.tracker);
    let conn = Arc::clone(io.conn());
    let service = ConnService::new(
        ctx.service.clone(),
        Arc::clone(&conn),
        Arc::clone(&ctx.shared),
    );
    let connection = ctx
        .builder
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let draining = std::future::poll_fn(|cx| conn.poll_draining(cx, ctx.shared.draining_flag()));

    tokio::select! {
        biased;
        result = connection.as_mut() => return log_end(conn.info.id, result),
        _ = draining => {}
    }
    if conn.state() == ConnState::New {
        // Its request may be on the wire: give it until `grace` after accept to show up.
        // After a restart its client has no other process to go to (the new one cannot take
        // an accepted connection over): it gets as long as for its headers, as when serving.
        let restart = ctx.shared.drain_requested() == Some(Trigger::Restart);
        let grace = if restart {
            ctx.restart_grace
        } else {
            ctx.grace
        };
        let until = conn.info.accepted_at + grace;
        tokio::select! {
            result = connection.as_mut() => return log_end(conn.info.id, result),
            _ = tokio::time::sleep_until(until.into()) => {}
            _ = conn.left_new() => {}
        }
    }
    // Idle (and still silent New) connections close now; HTTP/1 requests in flight finish
    // with `Connection: close`; HTTP/2 sends GOAWAY and lets open streams finish.
    connection.as_mut().graceful_shutdown();
    log_end(conn.info.id, connection.await);
}

fn log_end(id: u64, result: std::result::Result<(), BoxError>) {
    if let Err(e) = result {
        tracing::debug!(conn = id, error = %e, "connection ended with an error");
    }
}
