//! Zero-downtime restart and upgrade: hand the listening sockets to a new process.
//!
//! Set it up with [`Serve::with_restart`](crate::Serve::with_restart); the new process
//! adopts the sockets with [`inherited_listeners`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::signal::{Signal, Stream};
use tokio::sync::mpsc;

use crate::error::{Error, RestartError, Result};
use crate::shutdown::Shared;
use crate::shutdown::shared::Reply;

mod inherit;
mod spawn;

pub use inherit::{Inherited, inherited_listeners};

/// How long an old generation hands connections over by default.
pub const DEFAULT_HAND_OVER_WINDOW: Duration = Duration::from_secs(5);

/// The name given to a listener passed on without one (`LISTEN_FDNAMES`).
pub(crate) const DEFAULT_NAME: &str = "grace";

/// How a server restarts itself: the signal that asks for it, the program to start, how
/// long to wait for it, and the pid file to keep up to date.
///
/// ```text
///  old process (serving)                              new process
///  ─────────────────────                              ───────────
///  SIGHUP or handle.restart()
///   │  systemd: RELOADING=1
///   │  pipe(ready); spawn same program + args ─────►  inherit fds 3.. (LISTEN_FDS,
///   │    fds 3.. = listening sockets (same sockets,     LISTEN_FDNAMES, GRACE_LISTEN_PPID),
///   │    never closed), 3+n = ready pipe               GRACE_READY_FD = 3+n,
///   │    3+n+1 = hand-over socket                      GRACE_HANDOVER_FD = 3+n+1
///   │    then the control socket, if any               GRACE_CONTROL_FD (see `control`)
///   │                                                  load config, open resources…
///   │  (both accept from the one shared socket)        serve(): accept loops running,
///   │                                                   pid file rewritten, READY=1,
///   │  ◄──── "ready <pid> takes-connections" ───────── write to ready pipe
///   │  systemd: MAINPID=<new>, READY=1
///   ▼
///  hand-over: stop accepting (listeners kept);
///  each HTTP/1 connection between requests       ───►  acknowledge it, serve it from
///  (socket + kind + unparsed bytes), a copy             its next request
///  kept until complete (none left, all acknowledged)
///  drain (Trigger::Restart): close our copy of the
///  listeners; finish in-flight requests, close the
///  idle connections left, run jobs and resources, exit
///
///  on failure (new process exits, crashes, or is not ready within the timeout; or dies
///  during the hand-over: what it had not read from is taken back and served here):
///  kill it if it runs, reap it, log why, systemd READY=1 — and keep serving.
/// ```
///
/// The new process is ready when its [`Serve`](crate::Serve) starts serving: do every fallible
/// initialisation (configuration, resources) before `serve`, and exit on failure, so a bad
/// release rolls back instead of taking over. It must take the sockets with
/// [`inherited_listeners`] (binding the address again would fail: the old process still
/// holds it). The listening sockets themselves are never closed: both processes hold the
/// same ones while the old drains, and connections waiting in the kernel's accept queue
/// are accepted by whichever process comes first.
///
/// # Connections handed over
///
/// By default the old process passes its HTTP/1.1 connections to the new one instead of
/// closing them, so no keep-alive client reconnects (and none sees a close it could take for
/// a failure). Each goes at its first moment between two requests once the drain starts — at
/// once for an idle one; after its response (sent with keep-alive) for one serving a
/// request — with the bytes already read from it but not yet parsed (a head arriving,
/// pipelined requests), over a Unix socket (`SCM_RIGHTS`). The new process serves its next
/// request as if nothing happened. The hand-over takes at most the window
/// ([`hand_over_window`](Restart::hand_over_window), 5 s by default, within the shutdown
/// timeout); connections not handed over by then close as without it. It happens only
/// with a new process that says it takes connections (one built with an older grace does
/// not, and gets none): a new process that fails before ready gets nothing, and the old one
/// keeps every connection. The report counts them ([`ShutdownReport::handed_over`](crate::ShutdownReport::handed_over)).
///
/// Not handed over, and closed as before: HTTP/2 connections (their HPACK tables and stream
/// states live in the old process: they get GOAWAY), TLS connections (the session's keys
/// would have to travel; kTLS could carry them, and is left for later), upgraded
/// connections whose handler did not opt in, and a connection whose request body was not
/// read to its end. An upgraded connection (a WebSocket) whose handler made it a
/// [`Movable`](crate::Movable) goes too, between two of its messages, with a state of its
/// handler's own, if the new process resumes its kind ([`resume`](Restart::resume)).
///
/// A service that ties state to a connection (NTLM or Negotiate authentication, which
/// authenticate the connection rather than each request) should turn it off with
/// `hand_over_window(Duration::ZERO)`.
///
/// The program and its arguments are resolved when this is created — do it at start-up:
/// a binary replaced on disk later is what the next upgrade starts (on Linux the running
/// binary's own path reads "… (deleted)" once it is replaced, so it cannot be found then).
///
/// ```no_run
/// use std::time::Duration;
/// use grace_http::{Restart, Signal};
///
/// # async fn doc() -> Result<(), grace_http::Error> {
/// let restart = Restart::new() // SIGHUP, this program with its arguments
///     .signal(Signal::user_defined2())
///     .ready_timeout(Duration::from_secs(10))
///     .pid_file("/run/my-service.pid");
/// let server = match grace_http::inherited_listeners()? {
///     Some(inherited) => grace_http::Server::from_inherited(inherited),
///     None => grace_http::Server::bind("127.0.0.1:8080").await?,
/// };
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
/// let report = server.serve(app).with_signals().with_restart(restart).await?;
/// # let _ = report; Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Restart {
    pub(crate) signal: Option<Signal>,
    pub(crate) ready_timeout: Duration,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) pid_file: Option<PathBuf>,
    pub(crate) hand_over: Option<Duration>,
    pub(crate) resumers: crate::conn::movable::Resumers,
}

impl Default for Restart {
    fn default() -> Self {
        Restart::new()
    }
}

impl Restart {
    /// Restart on SIGHUP into this same program (as started: see the type's docs) with the
    /// same arguments, waiting up to 30 s for the new process to be ready.
    pub fn new() -> Self {
        Restart {
            signal: Some(Signal::hangup()),
            ready_timeout: Duration::from_secs(30),
            program: spawn::startup_program(),
            args: std::env::args_os().skip(1).collect(),
            pid_file: None,
            hand_over: Some(DEFAULT_HAND_OVER_WINDOW),
            resumers: Default::default(),
        }
    }

    /// The signal that asks for a restart (default SIGHUP). It must not be one of the
    /// drain signals. A [`Signal`], or tokio's `SignalKind`.
    pub fn signal(mut self, signal: impl Into<Signal>) -> Self {
        self.signal = Some(signal.into());
        self
    }

    /// Restart only through [`Handle::restart`](crate::Handle::restart), on no signal.
    pub fn no_signal(mut self) -> Self {
        self.signal = None;
        self
    }

    /// How long the new process may take to become ready before it is killed and the
    /// old one keeps serving. Default 30 s.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Start this program instead of the one running.
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// Start the new process with these arguments instead of ours.
    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// How long the old process may take to hand its idle HTTP/1 connections to the new one
    /// (default 5 s); `Duration::ZERO` turns the hand-over off. See
    /// [the type's docs](Restart#connections-handed-over) for what is handed over.
    pub fn hand_over_window(mut self, window: Duration) -> Self {
        self.hand_over = (!window.is_zero()).then_some(window);
        self
    }

    /// Write our pid to this file (atomically) when serving starts; a new process
    /// configured the same way rewrites it with its own before it reports ready.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// Resumes upgraded connections of kind `name` (see [`Movable`](crate::Movable)) that
    /// the previous generation hands over, calling `resume` with each connection and the
    /// state its handler passed, on a task of its own. Register every kind the handlers
    /// make movable, in every generation: the previous generation asks a connection to move
    /// only if the new one resumes its kind (it keeps the others, and says goodbye to them
    /// at its drain), and takes one back with its own handler for the kind if the new
    /// generation dies before reading it. A second `resume` for a name replaces the first.
    ///
    /// `name` must be 1 to 255 bytes without a line feed (panics otherwise: it is a
    /// constant of the program).
    ///
    /// ```
    /// let restart = grace_http::Restart::new().resume("echo", |socket, _state| async move {
    ///     let (mut reader, mut writer) = tokio::io::split(socket);
    ///     let _ = tokio::io::copy(&mut reader, &mut writer).await;
    /// });
    /// # let _ = restart;
    /// ```
    pub fn resume<F, Fut>(mut self, name: &str, resume: F) -> Self
    where
        F: Fn(crate::Movable, bytes::Bytes) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        assert!(
            crate::conn::movable::valid_name(name),
            "Restart::resume: {name:?} is not a kind name (1 to 255 bytes, no line feed)"
        );
        self.resumers.insert(
            name.to_owned(),
            std::sync::Arc::new(move |socket, state| Box::pin(resume(socket, state))),
        );
        self
    }
}

/// The restart machinery of one server: its configuration, its signal (installed when
/// restarts are enabled, so the signal cannot kill the process from then on), and the asks
/// from handles and the control socket.
pub(crate) struct Control {
    config: Restart,
    signal: Option<std::io::Result<Stream>>,
    inbox: mpsc::UnboundedReceiver<Reply>,
}

impl Control {
    /// Enables restarts of the server behind `shared` (installing the signal handler now,
    /// within the current tokio runtime). `None` if they already were: the first
    /// configuration stays.
    pub(crate) fn enable(shared: &Shared, config: Restart) -> Option<Control> {
        let (asks, inbox) = mpsc::unbounded_channel();
        if !shared.upgrades.enable(asks) {
            tracing::warn!("with_restart called twice: the first configuration stays");
            return None;
        }
        let signal = config.signal.map(Stream::install);
        Some(Control {
            config,
            signal,
            inbox,
        })
    }

    /// The pid file, if one is kept.
    pub(crate) fn pid_file(&self) -> Option<&Path> {
        self.config.pid_file.as_deref()
    }

    /// The handlers that resume upgraded connections.
    pub(crate) fn resumers(&self) -> &crate::conn::movable::Resumers {
        &self.config.resumers
    }
}

/// Called by `Serve` right before its accept loops start: writes the pid file, tells
/// systemd and the previous generation (if any) that we are ready, and starts watching for
/// restart requests. A new generation that cannot tell the previous one (it gave up on us)
/// fails here, before it has accepted a connection. The returned task ends once a drain is
/// asked for and any upgrade under way is settled: await it before exiting.
pub(crate) fn serving(
    shared: &Arc<Shared>,
    mut control: Option<Control>,
    ready_pipe: Option<std::os::fd::OwnedFd>,
    takes_connections: bool,
    stop_timeout: Duration,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    let mut signal = None;
    if let Some(c) = control.as_mut() {
        let name = c.config.signal.map(|s| s.to_string()).unwrap_or_default();
        signal = c
            .signal
            .take()
            .transpose()
            .map_err(|source| Error::Signal {
                signal: name,
                source,
            })?;
        if let Some(path) = &c.config.pid_file {
            write_pid_file(path).map_err(|source| Error::PidFile {
                path: path.clone(),
                source,
            })?;
        }
    }
    // systemd first, so that it hears our READY=1 before the old process's MAINPID=.
    crate::systemd::notify_logged("READY=1");
    if let Some(pipe) = ready_pipe {
        inherit::signal_ready(pipe, takes_connections)?;
    }
    let Some(control) = control else {
        return Ok(None);
    };
    Ok(Some(tokio::spawn(drive(
        Arc::clone(shared),
        control.config,
        signal,
        control.inbox,
        stop_timeout,
    ))))
}

/// Called when `Serve` ends: the last generation (not one that handed over) removes the
/// pid file, if it still names this process.
pub(crate) fn finished(pid_file: Option<&Path>, handed_over: bool) {
    let Some(path) = pid_file.filter(|_| !handed_over) else {
        return;
    };
    if read_pid_file(path) == Some(std::process::id()) {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the pid file");
        }
    }
}

async fn next_signal(signal: &mut Option<Stream>) {
    if let Some(s) = signal {
        if s.recv().await.is_some() {
            return;
        }
    }
    std::future::pending().await
}

/// Takes restart requests one at a time, until a drain is asked for.
async fn drive(
    shared: Arc<Shared>,
    config: Restart,
    mut signal: Option<Stream>,
    mut inbox: mpsc::UnboundedReceiver<Reply>,
    stop_timeout: Duration,
) {
    let by_signal = config.signal.map(|s| s.to_string()).unwrap_or_default();
    loop {
        let (reply, by) = tokio::select! {
            biased;
            _ = shared.drain_asked() => return,
            _ = next_signal(&mut signal) => (None, by_signal.as_str()),
            ask = inbox.recv() => match ask {
                Some(reply) => (Some(reply), "handle"),
                None => return,
            },
        };
        tracing::info!(by, "restart asked for: starting the new process");
        let started = std::time::Instant::now();
        let attempt = spawn::upgrade(&shared, &config, stop_timeout);
        tokio::pin!(attempt);
        let result = loop {
            tokio::select! {
                result = &mut attempt => break result,
                _ = next_signal(&mut signal) => {
                    tracing::warn!(by = %by_signal, "a restart is already under way: ignored");
                }
                Some(other) = inbox.recv() => {
                    tracing::warn!(by = "handle", "a restart is already under way: ignored");
                    let _ = other.send(Err(RestartError::AlreadyRunning));
                }
            }
        };
        crate::metrics::upgrade_finished(result.is_ok(), started.elapsed());
        shared.upgrades.finished(&result);
        if result.is_ok() {
            // Control requests go to the new generation now (see `control`).
            shared.control.taken_over();
        }
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }
}

/// Writes this process's pid to `path` atomically: a new file in the same directory, then a
/// rename over `path`, so a reader never sees a partial file.
///
/// Safe in a directory others may write to: the temporary file is created exclusively under
/// a random name (never opened if anything is already there, a symbolic link included), and
/// the rename replaces whatever is at `path` — a link itself, never what it points to. So a
/// link planted at either name cannot make this write to another file.
///
/// ```no_run
/// grace_http::write_pid_file("/run/my-service.pid")?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn write_pid_file(path: impl AsRef<Path>) -> std::io::Result<()> {
    let pid = std::process::id();
    crate::files::replace(path.as_ref(), format!("{pid}\n").as_bytes(), 0o644)
}

/// The pid in the pid file at `path`, read without following a link or opening anything but
/// a regular file (a FIFO planted there must not block the exit).
fn read_pid_file(path: &Path) -> Option<u32> {
    crate::files::read_regular(path, 64)
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn pid_file_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("grace-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.pid");
        std::fs::write(&path, "garbage that is longer than a pid\n").unwrap();
        super::write_pid_file(&path).unwrap();
        let got = std::fs::read_to_string(&path).unwrap();
        assert_eq!(got, format!("{}\n", std::process::id()));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Issue 20, item 1: the temporary name used to be `.NAME.<pid>.tmp`, written with
    /// `std::fs::write`, so a link planted there had its target truncated and overwritten.
    /// (A link at the pid file itself: `files::tests::a_replaced_link_is_replaced_not_written_through`.)
    #[test]
    fn a_link_planted_at_the_old_temporary_name_is_not_written_through() {
        let dir = std::env::temp_dir().join(format!("grace-pid-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let path = dir.join("x.pid");
        let predictable = dir.join(format!(".x.pid.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &predictable).unwrap();
        super::write_pid_file(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(super::read_pid_file(&path), Some(std::process::id()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
