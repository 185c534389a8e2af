//! Typed errors of the library.

use std::io;

/// What can go wrong while binding, serving or restarting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Binding a listening socket failed.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address that was asked for.
        addr: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The control socket could not be set up (see [`Serve::with_control`](crate::Serve::with_control)):
    /// something other than a stale socket is at its path (a live socket, a regular file, a
    /// symbolic link), which is left as it is, or binding failed.
    #[error("cannot set up the control socket {}: {source}", path.display())]
    Control {
        /// The control socket's path.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Installing a signal handler failed.
    #[error("cannot install the handler for {signal}: {source}")]
    Signal {
        /// Name of the signal.
        signal: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An inherited listener (systemd socket activation or a restart) could not be adopted.
    #[error("cannot adopt inherited listener: {0}")]
    Inherit(String),
    /// A descriptor the environment says was passed to this process (`LISTEN_FDS`, or a
    /// restart's readiness pipe) is not what it should be: not open, this process's own, or
    /// not a listening socket of a kind grace serves. It was checked before anything took
    /// it, and is left as it is.
    #[error("cannot adopt inherited descriptor {fd} ({what}): {source}")]
    InheritedFd {
        /// The descriptor's number.
        fd: i32,
        /// What it was passed as: `listener "http" of LISTEN_FDS`, `GRACE_READY_FD`.
        what: String,
        /// What is wrong with it.
        #[source]
        source: InheritedFdError,
    },
    /// A zero-downtime restart could not be carried out; the old process keeps serving
    /// (unless it was asked to stop, see [`RestartError::Stopped`]).
    #[error("restart failed: {0}")]
    Restart(#[from] RestartError),
    /// The pid file could not be written.
    #[error("cannot write the pid file {path}: {source}")]
    PidFile {
        /// The pid file's path.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A listener served by a service of its own (see
    /// [`Serve::also_serve`](crate::Serve::also_serve)) has a name that cannot be passed on
    /// at a restart, or that does not tell it apart from the others.
    #[error("listener name {name:?}: {reason}")]
    ListenerName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What is wrong with an inherited descriptor ([`Error::InheritedFd`]).
///
/// ```no_run
/// match grace_http::inherited_listeners() {
///     Err(grace_http::Error::InheritedFd { fd, source, .. }) => eprintln!("fd {fd}: {source}"),
///     other => { let _ = other; }
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InheritedFdError {
    /// No descriptor is open at that number.
    #[error("it is not open")]
    NotOpen,
    /// It is close-on-exec, so this process opened it (or took it) itself: whatever passed
    /// the variables did not pass this descriptor (an inherited one is never close-on-exec
    /// when a process starts).
    #[error("it was opened by this process (it is close-on-exec), not passed to it")]
    NotInherited,
    /// Not a socket at all: `found` says what (`a regular file`, `a pipe`…).
    #[error("it is {found}, not a socket")]
    NotASocket {
        /// What it is.
        found: &'static str,
    },
    /// A stream socket that does not listen: a connected one, or one never told to listen.
    #[error("it is a socket that does not listen (a connected one?), not a listening socket")]
    NotListening,
    /// A descriptor of another kind than expected: a datagram socket, a netlink socket, a
    /// regular file where a pipe was expected.
    #[error("it is {found}, not {expected}")]
    WrongKind {
        /// What it is.
        found: String,
        /// What it should have been.
        expected: &'static str,
    },
    /// The kernel would not say what it is.
    #[error("it cannot be inspected: {0}")]
    Inspect(#[source] io::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a zero-downtime restart did not hand over, from [`Handle::restart`](crate::Handle::restart).
///
/// Every variant but [`Spawn`](Self::Spawn) and the refusals means a new process was
/// started and is now gone: killed (with everything it started, its process group) and
/// reaped before the error is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestartError {
    /// [`Serve::with_restart`](crate::Serve::with_restart) was not called.
    #[error("restarts are not enabled (see Serve::with_restart)")]
    NotEnabled,
    /// Another restart is under way; this one was not started.
    #[error("a restart is already under way")]
    AlreadyRunning,
    /// The server is draining (or no longer serves): there is nothing to hand over.
    #[error("the server is draining")]
    Draining,
    /// The new process could not be started (program missing, not executable…).
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program that was to start.
        program: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The new process ended before it was ready: a crash, or a configuration it rejected.
    #[error("process {pid} {status} before it was ready")]
    Exited {
        /// Its pid.
        pid: u32,
        /// How it ended: `exited with status 1`, `was killed by signal 9`.
        status: String,
    },
    /// The new process went (exited, was killed, or closed the hand-over channel) after it
    /// was ready but before it had taken every connection handed over: this server took
    /// back those it had not, and serves on.
    #[error("process {pid} {status} during the hand-over (connections taken back)")]
    HandOver {
        /// Its pid.
        pid: u32,
        /// How it went: `exited with status 1`, `was killed by signal 9`.
        status: String,
    },
    /// The new process was not ready in time; it was killed.
    #[error("process {pid} was not ready within {timeout:?} (killed)")]
    NotReady {
        /// Its pid.
        pid: u32,
        /// [`Restart::ready_timeout`](crate::Restart::ready_timeout).
        timeout: std::time::Duration,
    },
    /// The new process closed its readiness pipe without saying it was ready.
    #[error("process {pid} closed the readiness pipe without being ready")]
    NotReported {
        /// Its pid.
        pid: u32,
    },
    /// A stop (a drain signal, `Handle::shutdown`) came while the new process was starting:
    /// it was told to stop too (SIGTERM, then SIGKILL to its process group after the
    /// shutdown timeout) and reaped, so no generation outlives the stop.
    #[error("a stop came during the upgrade: process {pid} was stopped too")]
    Stopped {
        /// The new process's pid.
        pid: u32,
    },
    /// Any other I/O failure while handing over (the readiness pipe, waiting).
    #[error("restart: {0}")]
    Io(#[from] io::Error),
}

/// Why an upgraded connection did not move, from
/// [`Movable::hand_over`](crate::Movable::hand_over). It is still here, read and written
/// as before.
#[cfg(unix)]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MoveError {
    /// No hand-over wants it: none is under way, it ended, the new generation does not
    /// resume its kind, or it already tried in this one.
    #[error("no hand-over wants this connection")]
    NotAsked,
    /// The client's message under way has not been read whole yet: await
    /// [`Mover::asked`](crate::Mover::asked), which resolves only between two messages.
    #[error("a message is still being read")]
    MidMessage,
    /// The state is more than a hand-over carries (64 KiB).
    #[error("a state of {len} bytes: more than a hand-over carries (64 KiB)")]
    StateTooLarge {
        /// Its length.
        len: usize,
    },
    /// The connection moved already, or the drain closed it.
    #[error("the connection is gone")]
    Gone,
    /// The channel to the new generation failed, or the hand-over's window ended first.
    #[error("hand-over: {0}")]
    Channel(#[source] io::Error),
}
