//! The sending side: start the new process with our listening sockets and wait until it is
//! ready, or roll back.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use super::Restart;
use super::inherit::{
    FIRST_FD, GRACE_GENERATION, GRACE_HANDOVER_FD, GRACE_LISTEN_PPID, GRACE_READY_FD,
    GRACE_SOCKET_FILES, LISTEN_FDNAMES, LISTEN_FDS, LISTEN_PID, TAKES_CONNECTIONS,
};
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
    let (ready_rx, ready_tx) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(std::io::Error::from)?;
    let n = listeners.len();
    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    let files: Vec<String> = (0..n)
        .filter(|&i| listeners[i].owns_file)
        .map(|i| i.to_string())
        .collect();
    let mut fds: Vec<RawFd> = listeners.iter().map(|l| l.listener.as_raw_fd()).collect();
    fds.push(ready_tx.as_raw_fd());
    // The hand-over channel, if connections are to be handed over (see `handover`).
    let handover = match config.hand_over {
        Some(window) => Some((crate::handover::pair()?, window)),
        None => None,
    };
    if let Some(((_, theirs), _)) = &handover {
        fds.push(theirs.as_raw_fd());
    }

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
    // The control socket, if any, goes after the others (kept open until the spawn).
    let _control = super::inherit::pass_control(shared, &mut fds, &mut cmd);
    // Its own process group: a rollback ends whatever it started too (a helper process
    // that inherited the listening socket would otherwise keep it open).
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    sys::pass_fds(&mut cmd, fds)?;
    let program = config.program.display().to_string();
    let spawned = spawn_retrying(tokio::process::Command::from(cmd)).await;
    // The child has its copies now. Ours: the write end goes at once (so the pipe reads
    // end-of-file when the child is gone), the listeners' extra references too (so a
    // drain that starts meanwhile closes them).
    drop(ready_tx);
    let handover = handover.map(|((ours, theirs), window)| {
        drop(theirs);
        (ours, window)
    });
    drop(names);
    drop(listeners);
    let mut child = spawned.map_err(|source| RestartError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = child.id().unwrap_or(0);
    tracing::info!(pid, %program, args = ?config.args, "new process started; waiting until it is ready");

    let mut ready = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_rx)?;
    let timeout = config.ready_timeout;
    let mut buf = [0u8; 64];
    let failure = tokio::select! {
        biased;
        // A stop (drain signal, handle) wins over everything, even a ready child.
        _ = shared.drain_asked() => RestartError::Stopped { pid },
        read = ready.read(&mut buf) => match read {
            // Taking over and a stop that came meanwhile are decided in one step: if the
            // stop won, the new process is stopped too.
            Ok(n) if n > 0 => {
                // It takes our connections if it says so: hand them over first, watching it
                // all along; the drain comes once they are, or not at all if it went.
                let takes = std::str::from_utf8(&buf[..n])
                    .is_ok_and(|s| s.split_whitespace().any(|w| w == TAKES_CONNECTIONS));
                let outbox = match (takes, handover) {
                    (true, Some((ours, window))) => crate::handover::Outbox::new(ours, window)
                        .inspect_err(|e| tracing::warn!(error = %e, "no hand-over: connections will close"))
                        .ok(),
                    _ => None,
                };
                let handed = match outbox {
                    Some(outbox) => hand_over(shared, Arc::new(outbox), &mut child, pid, stop_timeout).await,
                    None => Ok(()),
                };
                match handed {
                    // Taking over and a stop that came meanwhile are decided in one step: if
                    // the stop won, the new process is stopped too.
                    Ok(()) => match shared.request_drain(Trigger::Restart) {
                        true => return Ok(pid),
                        false => RestartError::Stopped { pid },
                    },
                    Err(failure) => failure,
                }
            }
            // Closed without a word: usually it is exiting; say how, if it does soon.
            Ok(_) => match tokio::time::timeout(Duration::from_millis(200), child.wait()).await {
                Ok(Ok(status)) => RestartError::Exited { pid, status: describe(status) },
                _ => RestartError::NotReported { pid },
            },
            Err(e) => RestartError::Io(e),
        },
        status = child.wait() => match status {
            Ok(status) => RestartError::Exited { pid, status: describe(status) },
            Err(e) => RestartError::Io(e),
        },
        _ = tokio::time::sleep(timeout) => RestartError::NotReady { pid, timeout },
    };
    end(&mut child, pid, &failure, stop_timeout).await;
    Err(failure)
}

/// How long the old generation waits, once the hand-over window has ended, for the new one
/// to acknowledge the connections already sent (it reads them as fast as it can: this
/// bounds only a new generation that hangs).
const ACK_WAIT: Duration = Duration::from_secs(2);

/// How often the hand-over looks whether a connection is left to hand over (a scan of the
/// connections' states: there is no event for "none left between requests").
const HAND_OVER_CHECK: Duration = Duration::from_millis(2);

/// How the new generation went during a hand-over: it exited, or it hung up the channel.
enum Went {
    Exited(std::io::Result<std::process::ExitStatus>),
    HungUp(std::io::Result<()>),
}

impl Went {
    /// What to say of it. A hang-up usually means it is exiting (the channel closes as the
    /// process dies, often before its exit is seen): its exit status, if it comes soon.
    async fn describe(self, child: &mut tokio::process::Child) -> String {
        let hung_up = match self {
            Went::Exited(Ok(status)) => return describe(status),
            Went::Exited(Err(e)) => return format!("could not be watched ({e})"),
            Went::HungUp(r) => r,
        };
        match tokio::time::timeout(Duration::from_millis(200), child.wait()).await {
            Ok(Ok(status)) => describe(status),
            _ => match hung_up {
                Ok(()) => "closed the hand-over channel".to_owned(),
                Err(e) => format!("broke the hand-over channel ({e})"),
            },
        }
    }
}

/// The hand-over: every HTTP/1 connection goes to the new generation at its next moment
/// between requests (this process accepts nothing meanwhile), until none is left or the
/// window ends, and every one sent is acknowledged. The one loop that watches the new
/// generation throughout: if it dies or hangs up first, [`take_back`] what it had not read
/// and the upgrade fails (this process keeps serving, no drain is asked for). A stop that
/// comes meanwhile ends the hand-over (what was acknowledged stays with the new
/// generation, which is then stopped too).
async fn hand_over(
    shared: &Arc<Shared>,
    outbox: Arc<crate::handover::Outbox>,
    child: &mut tokio::process::Child,
    pid: u32,
    stop_timeout: Duration,
) -> Result<(), RestartError> {
    let tracker = &shared.tracker;
    let started = Instant::now();
    let window_end = crate::base::budget::after(started, outbox.window().min(stop_timeout));
    shared.pause_accepting(true);
    tracker.start_hand_over(Arc::clone(&outbox));
    let acks = outbox.acks(|| tracker.count_handed_over());
    tokio::pin!(acks);
    let sent = async {
        loop {
            tokio::time::sleep(HAND_OVER_CHECK).await;
            if !tracker.hand_over_left() && outbox.is_idle() {
                return;
            }
        }
    };
    let mut stopped = false;
    let mut went: Option<Went> = tokio::select! {
        biased;
        status = child.wait() => Some(Went::Exited(status)),
        r = &mut acks => Some(Went::HungUp(r)),
        _ = shared.drain_asked() => { stopped = true; None }
        _ = tokio::time::sleep_until(window_end.into()) => None,
        _ = sent => None,
    };
    // No more sends; those under way end (a connection not sent stays here, served anew).
    outbox.close();
    if went.is_none() {
        let settled = async {
            outbox.settled().await;
            outbox.acknowledged().await;
        };
        went = tokio::select! {
            biased;
            status = child.wait() => Some(Went::Exited(status)),
            r = &mut acks => Some(Went::HungUp(r)),
            _ = settled => None,
            _ = tokio::time::sleep(ACK_WAIT) => {
                tracing::warn!(unacknowledged = outbox.unacknowledged(), "the new process has not acknowledged every connection sent: left to it");
                None
            }
        };
    }
    let Some(went) = went else {
        tracker.end_hand_over(Some(started.elapsed()));
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "hand-over complete"
        );
        return Ok(());
    };
    let status = went.describe(child).await;
    take_back(shared, &outbox, child, pid, &status).await;
    match stopped {
        true => Err(RestartError::Stopped { pid }),
        false => Err(RestartError::HandOver { pid, status }),
    }
}

/// The new generation went during the hand-over. Makes sure it is gone (one that only hung
/// up is killed, with its group): nothing it received is served any more, so every
/// connection it did not read from is ours again, served here; accepting resumes.
async fn take_back(
    shared: &Shared,
    outbox: &crate::handover::Outbox,
    child: &mut tokio::process::Child,
    pid: u32,
    status: &str,
) {
    let tracker = &shared.tracker;
    if let Some(group) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    let reaped = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    outbox.settled().await;
    let taken = match reaped {
        Ok(Ok(_)) => outbox.take_back(),
        _ => {
            tracing::error!(
                pid,
                "the new process could not be reaped: its connections are left to it"
            );
            Default::default()
        }
    };
    let taken_back = taken.back.len();
    tracker.uncount_handed_over(taken.were_acknowledged as u64);
    taken.back.into_iter().for_each(|h| tracker.serve_local(h));
    tracker.end_hand_over(None);
    shared.pause_accepting(false);
    tracing::error!(pid, %status, taken_back, lost = taken.lost, "the new process went during the hand-over: serving on");
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

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended ({status})"),
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
