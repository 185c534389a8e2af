//! The sending side: start the new process with our listening sockets and wait until it is
//! ready, or roll back.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use super::Restart;
use super::inherit::{
    FIRST_FD, GRACE_GENERATION, GRACE_HANDOVER_FD, GRACE_LISTEN_PPID, GRACE_READY_FD,
    GRACE_SOCKET_FILES, LISTEN_FDNAMES, LISTEN_FDS, LISTEN_PID, TAKES_CONNECTIONS,
};
use crate::base::describe_exit;
use crate::base::report::Trigger;
use crate::error::RestartError;
use crate::shutdown::{Named, Shared};
use crate::{sys, systemd};

/// The program to start on a restart, resolved now (at start-up).
///
/// `argv[0]` is preferred when it leads to the running binary, so a symlink that a
/// deployment switches (`/usr/bin/app -> /opt/app-1.3/app`) is followed anew by the next
/// restart; otherwise the running binary's path (`/proc/self/exe`), minus the
/// " (deleted)" that Linux appends once the file was replaced.
pub(crate) fn startup_program() -> PathBuf {
    let exe = std::env::current_exe().ok().map(strip_deleted);
    let from_argv0 = std::env::args_os()
        .next()
        .and_then(|a| resolve(Path::new(&a)));
    match (from_argv0, &exe) {
        (Some(p), Some(exe)) if same_file(&p, exe) => p,
        (_, Some(exe)) => exe.clone(),
        (Some(p), None) => p,
        (None, None) => PathBuf::from("/proc/self/exe"),
    }
}

fn strip_deleted(p: PathBuf) -> PathBuf {
    match p.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(s) => PathBuf::from(s),
        None => p,
    }
}

/// `argv[0]` as the shell found it: relative to the working directory if it has a `/`,
/// else on `PATH`. Made absolute, since the working directory may change.
fn resolve(argv0: &Path) -> Option<PathBuf> {
    if argv0.as_os_str().is_empty() {
        return None;
    }
    if argv0.components().count() > 1 || argv0.is_absolute() {
        let p = std::env::current_dir().ok()?.join(argv0);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(argv0))
        .find(|p| p.is_file())
        .and_then(|p| {
            if p.is_absolute() {
                Some(p)
            } else {
                Some(std::env::current_dir().ok()?.join(p))
            }
        })
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// One upgrade: on success the new process's pid, and this server has been asked to drain
/// (with [`Trigger::Restart`]). On failure the new process and its process group are gone
/// and reaped, and the pid file names this process again.
///
/// `stop_timeout` bounds how long a new process that is told to stop (because a stop came
/// during the upgrade) may take to drain before its group is killed.
pub(crate) async fn upgrade(
    shared: &Arc<Shared>,
    config: &Restart,
    stop_timeout: Duration,
) -> Result<u32, RestartError> {
    let started = Instant::now();
    let listeners = shared.listeners();
    if listeners.is_empty() || shared.drain_requested().is_some() {
        return Err(RestartError::Draining);
    }
    systemd::reloading();
    let result = attempt(shared, config, listeners, stop_timeout).await;
    match &result {
        Ok(pid) => {
            systemd::notify_logged(&format!("MAINPID={pid}\nREADY=1"));
            tracing::info!(
                pid,
                took_ms = started.elapsed().as_millis() as u64,
                "new process is ready: it serves now; draining this one"
            );
        }
        Err(reason) => {
            // The new process may have written its pid before it failed: ours again.
            if let Some(path) = &config.pid_file {
                if let Err(e) = super::write_pid_file(path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot rewrite the pid file");
                }
            }
            let status = format!("STATUS=upgrade failed: {reason}").replace('\n', " ");
            if matches!(reason, RestartError::Stopped { .. }) {
                systemd::notify_logged(&status);
                tracing::warn!(%reason, "upgrade abandoned: stopping");
            } else {
                systemd::notify_logged(&format!("READY=1\n{status}"));
                tracing::warn!(%reason, "upgrade failed: rolled back, still serving");
            }
        }
    }
    result
}

/// Starts the new process and waits for it; on failure, makes sure it and everything it
/// started are gone.
async fn attempt(
    shared: &Arc<Shared>,
    config: &Restart,
    listeners: Vec<Named>,
    stop_timeout: Duration,
) -> Result<u32, RestartError> {
    let (ready_rx, ready_tx) = sys::cloexec_pipe()?;
    // The hand-over channel, if connections are to be handed over (see `handover`).
    let channel = match config.hand_over {
        // Not where the channel cannot be made (macOS): the connections drain instead.
        Some(window) if crate::handover::SUPPORTED => Some((crate::handover::pair()?, window)),
        _ => None,
    };
    let theirs = channel.as_ref().map(|((_, theirs), _)| theirs);
    let (cmd, control) = command(shared, config, &listeners, &ready_tx, theirs)?;
    let program = config.program.display().to_string();
    let spawned = spawn_retrying(tokio::process::Command::from(cmd)).await;
    // The child has its copies now. Ours: the write end goes at once (so the pipe reads
    // end-of-file when the child is gone), the listeners' extra references too (so a
    // drain that starts meanwhile closes them).
    drop((ready_tx, control, listeners));
    let channel = channel.map(|((ours, _theirs), window)| (ours, window));
    let mut child = spawned.map_err(|source| RestartError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = child.id().unwrap_or(0);
    tracing::info!(pid, %program, args = ?config.args, "new process started; waiting until it is ready");
    let ready = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_rx)?;
    let waited = Waited {
        ready,
        channel,
        timeout: config.ready_timeout,
        stop_timeout,
    };
    let failure = match waited.run(shared, &mut child, pid).await {
        Ok(()) => return Ok(pid),
        Err(failure) => failure,
    };
    end(&mut child, pid, &failure, stop_timeout).await;
    Err(failure)
}

/// The new process's command: this program, its arguments, and the descriptors it
/// inherits (the listeners, the ready pipe's write end, the hand-over channel's end, the
/// control socket) with the variables that name them. Keep the control socket returned
/// until the process has started.
fn command(
    shared: &Shared,
    config: &Restart,
    listeners: &[Named],
    ready_tx: &OwnedFd,
    handover: Option<&OwnedFd>,
) -> std::io::Result<(std::process::Command, Option<Arc<tokio::net::UnixListener>>)> {
    let n = listeners.len();
    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    let files: Vec<String> = (0..n)
        .filter(|&i| listeners[i].owns_file)
        .map(|i| i.to_string())
        .collect();
    let mut fds: Vec<RawFd> = listeners.iter().map(|l| l.listener.as_raw_fd()).collect();
    fds.push(ready_tx.as_raw_fd());
    fds.extend(handover.map(AsRawFd::as_raw_fd));
    let mut cmd = std::process::Command::new(&config.program);
    cmd.args(&config.args);
    for k in [
        LISTEN_PID,
        LISTEN_FDS,
        LISTEN_FDNAMES,
        GRACE_LISTEN_PPID,
        GRACE_READY_FD,
        GRACE_HANDOVER_FD,
        GRACE_SOCKET_FILES,
        GRACE_GENERATION,
    ] {
        cmd.env_remove(k);
    }
    if !files.is_empty() {
        cmd.env(GRACE_SOCKET_FILES, files.join(","));
    }
    cmd.env(GRACE_GENERATION, (shared.generation() + 1).to_string());
    cmd.env(LISTEN_FDS, n.to_string())
        .env(LISTEN_FDNAMES, names.join(":"))
        .env(GRACE_LISTEN_PPID, std::process::id().to_string())
        .env(GRACE_READY_FD, (FIRST_FD + n as RawFd).to_string());
    if handover.is_some() {
        cmd.env(GRACE_HANDOVER_FD, (FIRST_FD + n as RawFd + 1).to_string());
    }
    // The control socket, if any, goes after the others.
    let control = super::inherit::pass_control(shared, &mut fds, &mut cmd);
    // Its own process group: a rollback ends whatever it started too (a helper process
    // that inherited the listening socket would otherwise keep it open).
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    sys::pass_fds(&mut cmd, fds)?;
    Ok((cmd, control))
}

/// What the wait for a new process's readiness needs.
struct Waited {
    ready: tokio::net::unix::pipe::Receiver,
    /// Our end of the hand-over channel, and the hand-over's window.
    channel: Option<(OwnedFd, Duration)>,
    timeout: Duration,
    stop_timeout: Duration,
}

impl Waited {
    /// Waits until the new process is ready, then hands connections over (if it takes them)
    /// and asks this server to drain; or says why it failed.
    async fn run(
        mut self,
        shared: &Arc<Shared>,
        child: &mut tokio::process::Child,
        pid: u32,
    ) -> Result<(), RestartError> {
        let takes = self.ready_message(shared, child, pid).await?;
        // It takes our connections if it says so: hand them over first, watching it all
        // along; the drain comes once they are, or not at all if it went.
        let outbox = match (takes, self.channel) {
            (true, Some((ours, window))) => crate::handover::outbox::Outbox::new(ours, window)
                .inspect_err(|e| tracing::warn!(error = %e, "no hand-over: connections will close"))
                .ok(),
            _ => None,
        };
        if let Some(outbox) = outbox {
            let outbox = Arc::new(outbox);
            crate::handover::upgrade::hand_over(shared, outbox, child, pid, self.stop_timeout)
                .await?;
        }
        // Taking over and a stop that came meanwhile are decided in one step: if the stop
        // won, the new process is stopped too.
        match shared.request_drain(Trigger::Restart) {
            true => Ok(()),
            false => Err(RestartError::Stopped { pid }),
        }
    }

    /// Waits for the new process's ready message: whether it takes connections.
    async fn ready_message(
        &mut self,
        shared: &Shared,
        child: &mut tokio::process::Child,
        pid: u32,
    ) -> Result<bool, RestartError> {
        let timeout = self.timeout;
        let mut buf = [0u8; 64];
        tokio::select! {
            biased;
            // A stop (drain signal, handle) wins over everything, even a ready child.
            _ = shared.drain_asked() => Err(RestartError::Stopped { pid }),
            read = self.ready.read(&mut buf) => match read {
                Ok(n) if n > 0 => Ok(std::str::from_utf8(&buf[..n])
                    .is_ok_and(|s| s.split_whitespace().any(|w| w == TAKES_CONNECTIONS))),
                // Closed without a word: usually it is exiting; say how, if it does soon.
                Ok(_) => Err(match tokio::time::timeout(Duration::from_millis(200), child.wait()).await {
                    Ok(Ok(status)) => RestartError::Exited { pid, status: describe_exit(status) },
                    _ => RestartError::NotReported { pid },
                }),
                Err(e) => Err(RestartError::Io(e)),
            },
            status = child.wait() => Err(match status {
                Ok(status) => RestartError::Exited { pid, status: describe_exit(status) },
                Err(e) => RestartError::Io(e),
            }),
            _ = tokio::time::sleep(timeout) => Err(RestartError::NotReady { pid, timeout }),
        }
    }
}

/// Spawns, retrying a few times on ETXTBSY: a binary just written (a deployment) may still
/// be open for writing in a process forked meanwhile, until that process execs.
async fn spawn_retrying(
    mut cmd: tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e)
                if e.raw_os_error() == Some(rustix::io::Errno::TXTBSY.raw_os_error())
                    && tries < 10 =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Ends a new process that will not take over, with its whole process group, and reaps it.
///
/// Told to stop (a stop came during the upgrade), it gets SIGTERM and drains whatever it
/// accepted, for up to `stop_timeout`; in every other case there is nothing worth waiting
/// for. Either way the group then gets SIGKILL, which also ends anything the process
/// started that outlived it.
async fn end(
    child: &mut tokio::process::Child,
    pid: u32,
    why: &RestartError,
    stop_timeout: Duration,
) {
    let group = rustix::process::Pid::from_raw(pid as i32);
    let signal_group = |sig| {
        if let Some(group) = group {
            // ESRCH: the group is empty already.
            let _ = rustix::process::kill_process_group(group, sig);
        }
    };
    let grace = match why {
        RestartError::Stopped { .. } => {
            signal_group(rustix::process::Signal::TERM);
            stop_timeout
        }
        _ => Duration::ZERO,
    };
    let exited = tokio::time::timeout(grace, child.wait()).await.is_ok();
    signal_group(rustix::process::Signal::KILL);
    if !exited
        && tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
    {
        tracing::error!(pid, "sent SIGKILL, but the process has not exited");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleted_suffix_is_stripped() {
        assert_eq!(
            strip_deleted(PathBuf::from("/opt/app (deleted)")),
            PathBuf::from("/opt/app")
        );
        assert_eq!(
            strip_deleted(PathBuf::from("/opt/app")),
            PathBuf::from("/opt/app")
        );
    }

    #[test]
    fn the_startup_program_is_this_binary() {
        let p = startup_program();
        assert!(p.is_absolute(), "{p:?}");
        assert!(same_file(&p, &std::env::current_exe().unwrap()));
    }
}
