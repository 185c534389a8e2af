//! [`Serve`]: a server about to serve, what it starts ([`Running`]), and how it stops.

use std::future::{Future, IntoFuture};
#[cfg(unix)]
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use http::{Request, Response};
use http_body::Body;
use tokio::task::JoinSet;

use super::accepting;
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
}

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
    async fn finish(mut self) {
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
    /// The restart task (see `restart::serving`), if restarts are enabled.
    #[cfg(unix)]
    restarts: Option<AbortOnDrop>,
    #[cfg(unix)]
    pid_file: Option<PathBuf>,
    files: Vec<SocketFile>,
    #[cfg(unix)]
    control: Option<AbortOnDrop>,
    #[cfg(unix)]
    control_file: Option<SocketFile>,
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
        let Serve {
            server,
            service,
            signals,
            #[cfg(unix)]
            control,
            #[cfg(unix)]
            restart,
        } = self;
        let Server {
            listeners,
            #[cfg(unix)]
            ready_pipe,
            #[cfg(unix)]
            handover,
            #[cfg(unix)]
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
        #[cfg(unix)]
        drop(inherited_control);
        shared
            .tracker
            .configure(hook, config.goodbye_spread, config.record_requests);
        let mut tasks = Vec::new();
        #[cfg(unix)]
        let watchdog = crate::systemd::watchdog_interval().map(crate::systemd::watchdog);
        #[cfg(unix)]
        tasks.extend(watchdog.map(AbortOnDrop::spawn));
        #[cfg(unix)]
        let (control_socket, control_file) = control_socket(control)?;
        if let Some(signals) = signals {
            tasks.push(AbortOnDrop::spawn(signals?.drive(Arc::clone(&shared))));
        }
        let ctx = conn_ctx(service, &shared, &config, acceptor, configure_hyper);
        // One limit for all listeners.
        let limit = config
            .max_connections
            .map(|max| Arc::new(tokio::sync::Semaphore::new(max)));
        let clock = clock::start(
            &shared.tracker,
            config.header_read_timeout,
            config.idle_timeout,
        )?;
        let listeners = keep_listeners(&shared, listeners, &files);
        #[cfg(unix)]
        let takes_connections =
            accepting::receive(handover, &shared, limit.as_ref(), &ctx, &mut tasks);
        // No restarts on Windows: no previous generation hands anything over.
        #[cfg(not(unix))]
        shared.tracker.previous_done.set(());
        #[cfg(unix)]
        let pid_file = restart
            .as_ref()
            .and_then(|r| r.pid_file().map(Path::to_path_buf));
        #[cfg(unix)]
        let timeout = config.budget.shutdown_timeout;
        #[cfg(unix)]
        let restarts =
            crate::restart::serving(&shared, restart, ready_pipe, takes_connections, timeout)?;
        // Serving: the files are ours to remove when we stop, whoever bound them.
        files.iter().for_each(SocketFile::arm);
        #[cfg(unix)]
        control_file.iter().for_each(SocketFile::arm);
        #[cfg(unix)]
        let control = control_socket
            .map(|socket| AbortOnDrop::spawn(crate::control::serve(socket, Arc::clone(&shared))));
        let accepting = accepting::start(listeners, limit, &shared, &ctx);
        Ok(Running {
            shared,
            budget: config.budget,
            accepting,
            #[cfg(unix)]
            restarts: restarts.map(AbortOnDrop),
            #[cfg(unix)]
            pid_file,
            files,
            #[cfg(unix)]
            control,
            #[cfg(unix)]
            control_file,
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
            restarts,
            #[cfg(unix)]
            pid_file,
            files,
            #[cfg(unix)]
            control,
            #[cfg(unix)]
            control_file,
            _tasks,
            _clock,
        } = self;
        let trigger = shared.drain_asked().await;
        let report = drain::run(&shared, budget, trigger, accepting).await;
        // An upgrade under way when the drain was asked for ends first: the new process
        // is stopped and reaped (see `restart::spawn`), so none outlives this one.
        #[cfg(unix)]
        if let Some(restarts) = restarts {
            restarts.finish().await;
        }
        let handed_on = report.trigger == Trigger::Restart;
        #[cfg(unix)]
        crate::restart::finished(pid_file.as_deref(), handed_on);
        if handed_on {
            // The new generation serves on them, and removes them when it stops.
            files.iter().for_each(SocketFile::disarm);
        }
        drop(files);
        // The control socket answers until the very end (status during the drain), unless a
        // new generation took it over; then its file is the new generation's to remove.
        #[cfg(unix)]
        drop(control);
        #[cfg(unix)]
        if shared.control.handed_on() {
            control_file.iter().for_each(SocketFile::disarm);
        }
        #[cfg(unix)]
        drop(control_file);
        report
    }
}

/// The control socket: bound (or taken over) when asked for, answered once serving, so a
/// new generation that fails before it is ready never takes a control request.
#[cfg(unix)]
#[allow(clippy::type_complexity)]
fn control_socket(
    control: Option<(PathBuf, std::io::Result<crate::control::Bound>)>,
) -> Result<(Option<tokio::net::UnixListener>, Option<SocketFile>)> {
    let Some((path, bound)) = control else {
        return Ok((None, None));
    };
    let (socket, file) = bound.map_err(|source| Error::Control { path, source })?;
    Ok((Some(socket), Some(file)))
}

/// What every connection task of the server needs.
fn conn_ctx<S>(
    service: S,
    shared: &Shared,
    config: &Config,
    acceptor: Option<Arc<dyn crate::accept::Acceptor>>,
    configure_hyper: Option<ConfigureHyper>,
) -> Arc<ConnCtx<S>> {
    let mut builder = HyperBuilder::new();
    if let Some(configure) = configure_hyper {
        configure(&mut builder);
    }
    Arc::new(ConnCtx {
        service,
        builder: Arc::new(builder),
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
    })
}

/// Keeps the listeners in the shared state while serving, so a restart can hand them on
/// (see `restart`), each with its name and whether its socket file goes with it.
fn keep_listeners(
    shared: &Shared,
    listeners: Vec<(Listener, String)>,
    files: &[SocketFile],
) -> Vec<Arc<Listener>> {
    let listeners: Vec<_> = listeners
        .into_iter()
        .map(|(l, name)| (Arc::new(l), name))
        .collect();
    let named = listeners.iter().map(|(l, name)| Named {
        listener: Arc::clone(l),
        name: name.clone(),
        owns_file: files.iter().any(|f| f.is_of(l)),
    });
    shared.set_listeners(named.collect());
    listeners.into_iter().map(|(l, _)| l).collect()
}
