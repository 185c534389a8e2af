//! [`Serve`]: a server about to serve, what it starts ([`Running`]), and how it stops.

use std::future::{Future, IntoFuture};
#[cfg(unix)]
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use tokio::task::JoinSet;

use super::accepting;
use super::also::{self, Also, AnyService, Routes};
use super::{Config, ConfigureHyper, HyperBuilder, Server};
use crate::base::budget::Budget;
use crate::base::report::{ShutdownReport, Trigger};
use crate::conn::body::RequestBody;
use crate::conn::clock;
use crate::conn::task::{BoxError, ConnCtx, HttpService, ResponseBody};
#[cfg(unix)]
use crate::error::Error;
use crate::error::Result;
use crate::listener::{Listener, SocketFile};
use crate::shutdown::{Handle, Named, Shared, drain};
use crate::signal::{DEFAULT_SIGNALS, Signal, Signals};

/// Whether `service` is an `axum::Router` (whose handlers may read `ConnectInfo`).
pub(super) fn is_axum_router<S: 'static>(service: &S) -> bool {
    #[cfg(feature = "axum")]
    return (service as &dyn std::any::Any).is::<axum::Router>();
    #[cfg(not(feature = "axum"))]
    {
        let _ = service;
        false
    }
}

/// An `axum::Router` with every route made ready (`with_state(())`: each handler turned into
/// a route once, rather than cloned and boxed per request); any other service as it is.
pub(super) fn routes_ready<S: 'static>(service: S) -> S {
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
    pub(super) server: Server,
    pub(super) service: S,
    pub(super) signals: Option<Result<Signals>>,
    #[cfg(unix)]
    pub(super) control: Option<(PathBuf, std::io::Result<crate::control::Bound>)>,
    #[cfg(unix)]
    pub(super) restart: Option<crate::restart::Control>,
    /// Listeners served by services of their own (see [`also_serve`](Self::also_serve)).
    pub(super) also: Vec<Also>,
    /// The futures given to `with_shutdown`.
    pub(super) shutdown: Vec<ShutdownFuture>,
}

/// A future that starts the drain when it resolves (see [`Serve::with_shutdown`]).
pub(super) type ShutdownFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

impl<S> Serve<S> {
    /// Drains on SIGTERM or SIGINT (on Windows Ctrl-Break or Ctrl-C: see
    /// [`DEFAULT_SIGNALS`](crate::DEFAULT_SIGNALS)); a second signal during the drain forces.
    /// The handlers are installed now, within the current tokio runtime.
    pub fn with_signals(self) -> Self {
        self.with_signals_from(&DEFAULT_SIGNALS)
    }

    /// Like [`with_signals`](Self::with_signals), with your own set of signals.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), grace_http::Error> {
    /// use grace_http::Signal;
    /// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    /// let report = grace_http::Server::bind("127.0.0.1:8080")
    ///     .await?
    ///     .serve(app)
    ///     .with_signals_from(&[Signal::terminate(), Signal::interrupt(), Signal::quit()])
    ///     .await?;
    /// # let _ = report; Ok(()) }
    /// ```
    pub fn with_signals_from(mut self, signals: &[Signal]) -> Self {
        self.signals = Some(Signals::install(signals));
        self
    }

    /// Drains when `signal` resolves, as axum's `with_graceful_shutdown(signal)` does: the
    /// report's trigger is then [`Trigger::ShutdownFuture`](crate::Trigger::ShutdownFuture).
    /// The future is polled on a task of its own from the moment serving starts. Whatever
    /// else asks first wins (a signal of [`with_signals`](Self::with_signals), a
    /// [`Handle`], a restart) and names the trigger; a future that resolves during the
    /// drain changes nothing (force with [`Handle::force`], or the second signal). Called
    /// more than once, the first future to resolve starts the drain.
    ///
    /// ```no_run
    /// # async fn doc(app: axum::Router) -> Result<(), grace_http::Error> {
    /// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    /// # let _ = stop;
    /// let report = grace_http::Server::bind("127.0.0.1:8080")
    ///     .await?
    ///     .serve(app)
    ///     .with_shutdown(async move {
    ///         let _ = stopped.await; // sent, or its sender dropped
    ///     })
    ///     .await?;
    /// assert_eq!(report.trigger, grace_http::Trigger::ShutdownFuture);
    /// # Ok(()) }
    /// ```
    pub fn with_shutdown<F>(mut self, signal: F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.shutdown.push(Box::pin(signal));
        self
    }

    /// Answers an operator's commands on a Unix socket at `path` (owner-only): status,
    /// upgrade (waiting for its outcome), drain. See [`control`](crate::control) for the
    /// protocol and a client. The socket is bound now, within the current tokio runtime: a
    /// stale socket at `path` is replaced, but a live one (another instance's), a regular
    /// file, a symbolic link or anything else is left alone and makes `serve` fail with
    /// [`Error::Control`]. A new generation takes the very socket over from the previous one
    /// (passed with the listeners), and the last removes its file.
    #[cfg(unix)]
    pub fn with_control(mut self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let inherited = self.server.control.take();
        let bound = crate::control::bind(&path, inherited);
        self.control = Some((path, bound));
        self
    }

    /// Like [`with_control`](Self::with_control), failing now rather than when served if
    /// the control socket cannot be set up, so a program can say so before it says it serves.
    #[cfg(unix)]
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
    #[cfg(unix)]
    pub fn with_restart(mut self, restart: crate::Restart) -> Self {
        if let Some(control) = crate::restart::Control::enable(&self.server.shared, restart) {
            self.restart = Some(control);
        }
        self
    }

    /// Also serves `listener` with a service of its own: an admin port (metrics, debug
    /// pages) beside the public one, say. Its connections are the server's like any other:
    /// one stop drains them all (one deadline, one [`ShutdownReport`]), the
    /// [`Handle`]'s counts and snapshots include them, and a restart passes `listener` on
    /// with the others, under `name` (in `LISTEN_FDNAMES`), for the new generation to
    /// [`take`](crate::Inherited::take) out of what it inherits and serve the same way.
    /// Call it once per listener, each with a name of its own.
    ///
    /// The server's settings apply to it (timeouts, limits, `max_connections` counting
    /// every listener's connections together, HTTP settings, the peer address in requests,
    /// [`on_conn_state`](Server::on_conn_state)), but not its acceptor: `listener` serves
    /// plain HTTP even when the server serves HTTPS (`Server::tls`, feature `tls`).
    ///
    /// `service` is any service [`Server::serve`] takes (an `axum::Router` has its routes
    /// made ready once, as there). Its type is erased: its futures and bodies are boxed, one
    /// allocation each per request more than the main service's, which pays nothing for it.
    ///
    /// At an upgrade, the idle keep-alive connections handed to the new generation (see
    /// [`Restart::hand_over_window`](crate::Restart::hand_over_window)) are served there by
    /// the service of the listener that accepted them, told by the connection's local
    /// address: the new generation must serve the same sockets the same way (a connection
    /// whose address matches none of its `also_serve` listeners goes to the main service).
    ///
    /// `serve` fails with [`Error::ListenerName`] if `name` is empty, has a `:` (the
    /// separator of `LISTEN_FDNAMES`), a space or a character outside ASCII, or is the name
    /// of another listener (the main service's are named `grace` unless inherited under
    /// other names).
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// use axum::{Router, routing::get};
    /// use grace_http::{Listener, Restart, Server};
    ///
    /// let mut inherited = grace_http::inherited_listeners()?;
    /// // After an upgrade, the previous generation's admin socket; the first time, a new one.
    /// let admin = match inherited.as_mut().and_then(|i| i.take("admin")) {
    ///     Some(listener) => listener,
    ///     None => Listener::bind("127.0.0.1:9090".parse()?)?,
    /// };
    /// let server = match inherited {
    ///     Some(inherited) => Server::from_inherited(inherited), // the public socket
    ///     None => Server::bind("0.0.0.0:8080").await?,
    /// };
    /// let app = Router::new().route("/", get(|| async { "hello" }));
    /// let admin_app = Router::new().route("/metrics", get(|| async { "# metrics" }));
    /// let report = server
    ///     .serve(app)
    ///     .also_serve("admin", admin, admin_app)
    ///     .with_signals() // SIGTERM drains both listeners' connections, into one report
    ///     .with_restart(Restart::new()) // SIGHUP passes both sockets on, by name
    ///     .await?;
    /// eprintln!("{}", report.to_json());
    /// # Ok(()) }
    /// ```
    pub fn also_serve<T, B>(
        mut self,
        name: impl Into<String>,
        listener: impl Into<Listener>,
        service: T,
    ) -> Self
    where
        T: tower::Service<Request<RequestBody>, Response = Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        T::Future: Send + 'static,
        T::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        self.also.push(Also {
            name: name.into(),
            listener: listener.into(),
            service: also::erase(service),
        });
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
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    pub(super) fn spawn(task: impl Future<Output = ()> + Send + 'static) -> Self {
        AbortOnDrop(tokio::spawn(task))
    }

    /// Waits for the task to end by itself.
    #[cfg(unix)]
    pub(super) async fn finish(mut self) {
        let _ = (&mut self.0).await;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A server that serves: what [`Serve::start`] set up. Its background tasks are aborted
/// when it is dropped, and the socket files it owns removed (unless a new generation took
/// them over).
struct Running {
    shared: Arc<Shared>,
    budget: Budget,
    accepting: JoinSet<()>,
    /// Restarts and the control socket (Unix only).
    #[cfg(unix)]
    generations: super::generations::Generations,
    files: Vec<SocketFile>,
    /// Held until the server stops: the watchdog, the signals, the receiving of handed-over
    /// connections, and the coarse clock.
    _tasks: Vec<AbortOnDrop>,
    _clock: Option<clock::Clock>,
}

impl<S> Serve<S> {
    async fn run<B>(self) -> Result<ShutdownReport>
    where
        S: HttpService<B>,
        B: ResponseBody,
    {
        Ok(self.start()?.stop().await)
    }

    /// Sets everything up and starts accepting: ready before the first accept (connections
    /// wait in the kernel's queue meanwhile): pid file, the previous generation's readiness
    /// pipe, systemd `READY=1`. A new generation that cannot report ready fails here,
    /// having accepted nothing.
    fn start<B>(self) -> Result<Running>
    where
        S: HttpService<B>,
        B: ResponseBody,
    {
        // The fields for generations (Unix only) are taken below, where they are used.
        let Serve {
            server,
            service,
            signals,
            also,
            shutdown,
            ..
        } = self;
        let Server {
            listeners,
            files,
            shared,
            hook,
            acceptor,
            configure_hyper,
            config,
            ..
        } = server;
        also::check_names(
            listeners.iter().map(|(_, name)| name.as_str()),
            also.iter().map(|a| a.name.as_str()),
        )?;
        // Passed by the previous generation, not taken (no `with_control`, or another path):
        // ours closes now, the previous generation's goes with it.
        #[cfg(unix)]
        drop(server.control);
        shared.tracker.configure(config.tracker_settings(hook));
        #[cfg(unix)]
        let mut tasks = super::generations::watchdog();
        #[cfg(not(unix))]
        let mut tasks = Vec::new();
        #[cfg(unix)]
        let asked = super::generations::Asked {
            restart: self.restart,
            ready_pipe: server.ready_pipe,
            handover: server.handover,
            control: super::generations::control_socket(self.control)?,
        };
        if let Some(signals) = signals {
            tasks.push(AbortOnDrop::spawn(signals?.drive(Arc::clone(&shared))));
        }
        tasks.extend(shutdown.into_iter().map(|fut| watch_shutdown(fut, &shared)));
        let builder = Arc::new(hyper_builder(configure_hyper));
        let ctx = conn_ctx(service, &shared, &config, acceptor, &builder);
        // One limit for all listeners.
        let limit = config.limits.semaphore();
        let (head, idle) = (config.timeouts.header_read, config.timeouts.idle);
        let clock = clock::start(&shared.tracker, head, idle)?;
        let (listeners, also) = keep_listeners(&shared, listeners, also, &files);
        #[cfg_attr(not(unix), allow(unused_variables))] // for hand-overs (Unix only)
        let (also, routes) = also_contexts(also, &shared, &config, &builder, &ctx, &listeners);
        #[cfg(unix)]
        let timeout = config.drain.shutdown_timeout;
        #[cfg(unix)]
        let generations = asked.start(&shared, limit.as_ref(), &routes, &mut tasks, timeout)?;
        // No restarts on Windows: no previous generation hands anything over.
        #[cfg(not(unix))]
        shared.tracker.previous_done.set(());
        // Serving: the files are ours to remove when we stop, whoever bound them.
        files.iter().for_each(SocketFile::arm);
        let accepting = start_accepting(listeners, also, limit, &shared, &ctx);
        Ok(Running {
            shared,
            budget: config.drain.budget(),
            accepting,
            #[cfg(unix)]
            generations,
            files,
            _tasks: tasks,
            _clock: clock,
        })
    }
}

impl Running {
    /// Waits until a drain is asked for, drains, and cleans up.
    async fn stop(self) -> ShutdownReport {
        let Running {
            shared,
            budget,
            accepting,
            #[cfg(unix)]
            generations,
            files,
            _tasks,
            _clock,
        } = self;
        let trigger = shared.drain_asked().await;
        let report = drain::run(&shared, budget, trigger, accepting).await;
        let handed_on = report.trigger == Trigger::Restart;
        // An upgrade under way ends first, and the pid file goes (see `Generations`).
        #[cfg(unix)]
        let control = generations.restarts_done(handed_on).await;
        if handed_on {
            // The new generation serves on them, and removes them when it stops.
            files.iter().for_each(SocketFile::disarm);
        }
        drop(files);
        #[cfg(unix)]
        control.done(&shared);
        report
    }
}

/// Starts the drain when `fut` (given to [`Serve::with_shutdown`]) resolves.
fn watch_shutdown(fut: ShutdownFuture, shared: &Arc<Shared>) -> AbortOnDrop {
    let shared = Arc::clone(shared);
    AbortOnDrop::spawn(async move {
        fut.await;
        if shared.request_drain(Trigger::ShutdownFuture) {
            tracing::info!("the shutdown future resolved: draining");
        }
    })
}

/// hyper's settings, grace's then the user's.
fn hyper_builder(configure_hyper: Option<ConfigureHyper>) -> HyperBuilder {
    let mut builder = HyperBuilder::new();
    if let Some(configure) = configure_hyper {
        configure(&mut builder);
    }
    builder
}

/// The contexts of the services on the other listeners (plain HTTP, whatever the main
/// service's acceptor), and the routes of handed-over connections to every service.
#[allow(clippy::type_complexity)]
fn also_contexts<S>(
    also: Vec<(Arc<Listener>, AnyService)>,
    shared: &Shared,
    config: &Config,
    builder: &Arc<HyperBuilder>,
    ctx: &Arc<ConnCtx<S>>,
    listeners: &[Arc<Listener>],
) -> (
    Vec<(Arc<Listener>, Arc<ConnCtx<AnyService>>)>,
    Arc<Routes<S>>,
) {
    let also: Vec<(Arc<Listener>, Arc<ConnCtx<AnyService>>)> = also
        .into_iter()
        .map(|(l, service)| (l, conn_ctx(service, shared, config, None, builder)))
        .collect();
    let addrs = also
        .iter()
        .filter_map(|(l, ctx)| Some((l.local_addr().ok()?, Arc::clone(ctx))))
        .collect();
    let routes = Arc::new(Routes::new(Arc::clone(ctx), listeners, addrs));
    (also, routes)
}

/// Starts the accept loops: one per listener, each with its service.
fn start_accepting<S, B>(
    listeners: Vec<Arc<Listener>>,
    also: Vec<(Arc<Listener>, Arc<ConnCtx<AnyService>>)>,
    limit: Option<Arc<tokio::sync::Semaphore>>,
    shared: &Arc<Shared>,
    ctx: &Arc<ConnCtx<S>>,
) -> JoinSet<()>
where
    S: HttpService<B>,
    B: ResponseBody,
{
    let mut accepting = JoinSet::new();
    accepting::start(&mut accepting, listeners, limit.clone(), shared, ctx);
    for (listener, ctx) in also {
        accepting::start(&mut accepting, vec![listener], limit.clone(), shared, &ctx);
    }
    accepting
}

/// What every connection task of a service of the server needs.
fn conn_ctx<S>(
    service: S,
    shared: &Shared,
    config: &Config,
    acceptor: Option<Arc<dyn crate::accept::Acceptor>>,
    builder: &Arc<HyperBuilder>,
) -> Arc<ConnCtx<S>> {
    Arc::new(ConnCtx {
        service,
        builder: Arc::clone(builder),
        tracker: Arc::clone(&shared.tracker),
        grace: config.drain.new_connection_grace,
        restart_grace: config
            .timeouts
            .header_read
            .unwrap_or(config.drain.shutdown_timeout)
            .max(config.drain.new_connection_grace),
        body_limit: config.timeouts.request_body,
        acceptor,
        handshake_timeout: config.timeouts.handshake.unwrap_or(Duration::MAX),
        max_age: config.limits.max_connection_age,
        peer_in_requests: config.peer_in_requests.unwrap_or(false),
    })
}

/// Keeps the listeners in the shared state while serving, so a restart can hand them on
/// (see `restart`), each with its name and whether its socket file goes with it: the main
/// service's, then those served apart (whose files are the caller's). Returns both.
#[allow(clippy::type_complexity)]
fn keep_listeners(
    shared: &Shared,
    listeners: Vec<(Listener, String)>,
    also: Vec<Also>,
    files: &[SocketFile],
) -> (Vec<Arc<Listener>>, Vec<(Arc<Listener>, AnyService)>) {
    let listeners: Vec<_> = listeners
        .into_iter()
        .map(|(l, name)| (Arc::new(l), name))
        .collect();
    let also: Vec<_> = also
        .into_iter()
        .map(|a| (Arc::new(a.listener), a.name, a.service))
        .collect();
    let named = listeners.iter().map(|(l, name)| Named {
        listener: Arc::clone(l),
        name: name.clone(),
        owns_file: files.iter().any(|f| f.is_of(l)),
    });
    let named_also = also.iter().map(|(l, name, _)| Named {
        listener: Arc::clone(l),
        name: name.clone(),
        owns_file: false,
    });
    shared.set_listeners(named.chain(named_also).collect());
    (
        listeners.into_iter().map(|(l, _)| l).collect(),
        also.into_iter().map(|(l, _, s)| (l, s)).collect(),
    )
}
