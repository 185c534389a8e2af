//! What a server does across generations, on Unix only: restarts (the task that runs them,
//! the pid file, the previous generation's readiness pipe and connections) and the control
//! socket (its task, its file), set up as serving starts and ended once the drain is over.
//! Windows compiles none of it (see `Serve::start`).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::accepting;
use super::also::Routes;
use super::serve::AbortOnDrop;
use crate::conn::task::{HttpService, ResponseBody};
use crate::error::{Error, Result};
use crate::listener::SocketFile;
use crate::shutdown::Shared;

/// What a server is given for its generations: by [`Serve::with_restart`] and
/// [`Serve::with_control`], and by the previous generation ([`Server::from_inherited`]).
///
/// [`Serve::with_restart`]: crate::Serve::with_restart
/// [`Serve::with_control`]: crate::Serve::with_control
/// [`Server::from_inherited`]: crate::Server::from_inherited
pub(super) struct Asked {
    pub(super) restart: Option<crate::restart::Control>,
    /// The previous generation's readiness pipe.
    pub(super) ready_pipe: Option<OwnedFd>,
    /// The socket on which the previous generation hands connections over, if it does.
    pub(super) handover: Option<OwnedFd>,
    /// The control socket, bound or taken over, and its file (see [`control_socket`]).
    pub(super) control: (Option<tokio::net::UnixListener>, Option<SocketFile>),
}

/// What serving runs for its generations until it stops (aborted if dropped first).
pub(super) struct Generations {
    /// The restart task (see `restart::serving`), if restarts are enabled.
    restarts: Option<AbortOnDrop>,
    pid_file: Option<PathBuf>,
    control: Control,
}

/// The control socket as served: its task and its file.
pub(super) struct Control {
    task: Option<AbortOnDrop>,
    file: Option<SocketFile>,
}

impl Asked {
    /// Starts what was asked for, once the services are ready and before the accept loops
    /// start: takes the previous generation's connections (served by `routes`), holds the
    /// control socket for restarts, writes the pid file, says ready (systemd, the previous
    /// generation), then starts the restart task and the control socket's.
    pub(super) fn start<S, B>(
        self,
        shared: &Arc<Shared>,
        limit: Option<&Arc<tokio::sync::Semaphore>>,
        routes: &Arc<Routes<S>>,
        tasks: &mut Vec<AbortOnDrop>,
        stop_timeout: Duration,
    ) -> Result<Generations>
    where
        S: HttpService<B>,
        B: ResponseBody,
    {
        let Asked {
            restart,
            ready_pipe,
            handover,
            control: (control_socket, control_file),
        } = self;
        let resumers = restart
            .as_ref()
            .map(|r| r.resumers().clone())
            .unwrap_or_default();
        let takes_connections =
            accepting::receive(handover, shared, limit, routes, resumers, tasks);
        // The control socket goes to a new generation with the listeners from the first
        // restart on (one may be asked for as soon as `serving` returns): held now.
        let control_socket = control_socket.map(Arc::new);
        control_socket.iter().for_each(|s| shared.control.hold(s));
        let pid_file = restart
            .as_ref()
            .and_then(|r| r.pid_file().map(Path::to_path_buf));
        let restarts =
            crate::restart::serving(shared, restart, ready_pipe, takes_connections, stop_timeout)?;
        // Serving: the file is ours to remove when we stop, whoever bound it.
        control_file.iter().for_each(SocketFile::arm);
        let task = control_socket
            .map(|socket| AbortOnDrop::spawn(crate::control::serve(socket, Arc::clone(shared))));
        Ok(Generations {
            restarts: restarts.map(AbortOnDrop),
            pid_file,
            control: Control {
                task,
                file: control_file,
            },
        })
    }
}

impl Generations {
    /// Once the drain is over: an upgrade under way when it was asked for ends first (the
    /// new process is stopped and reaped, see `restart::spawn`), so none outlives this one;
    /// the pid file goes unless a new generation took over (`handed_on`). The control
    /// socket is left to [`Control::done`], after the listeners' files.
    pub(super) async fn restarts_done(self, handed_on: bool) -> Control {
        if let Some(restarts) = self.restarts {
            restarts.finish().await;
        }
        crate::restart::finished(self.pid_file.as_deref(), handed_on);
        self.control
    }
}

impl Control {
    /// The control socket answers until the very end (status during the drain), unless a
    /// new generation took it over; then its file is the new generation's to remove.
    pub(super) fn done(self, shared: &Shared) {
        drop(self.task);
        if shared.control.handed_on() {
            self.file.iter().for_each(SocketFile::disarm);
        }
        drop(self.file);
    }
}

/// systemd's watchdog, if it asks for one: the first of a server's background tasks.
pub(super) fn watchdog() -> Vec<AbortOnDrop> {
    let watchdog = crate::systemd::watchdog_interval().map(crate::systemd::watchdog);
    watchdog.into_iter().map(AbortOnDrop::spawn).collect()
}

/// The control socket: bound (or taken over) when asked for, answered once serving, so a
/// new generation that fails before it is ready never takes a control request.
#[allow(clippy::type_complexity)]
pub(super) fn control_socket(
    control: Option<(PathBuf, std::io::Result<crate::control::Bound>)>,
) -> Result<(Option<tokio::net::UnixListener>, Option<SocketFile>)> {
    let Some((path, bound)) = control else {
        return Ok((None, None));
    };
    let (socket, file) = bound.map_err(|source| Error::Control { path, source })?;
    Ok((Some(socket), Some(file)))
}
