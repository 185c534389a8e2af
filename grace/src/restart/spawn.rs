//! The sending side: start the new process with our listening sockets and wait until it is
//! ready, or roll back.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use super::inherit::{
    name_of, FIRST_FD, GRACE_LISTEN_PPID, GRACE_READY_FD, LISTEN_FDNAMES, LISTEN_FDS, LISTEN_PID,
};
use super::{Restart, DEFAULT_NAME};
use crate::error::{Error, Result};
use crate::listener::Listener;
use crate::shutdown::{Phase, Shared, Trigger};
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

/// One upgrade: on success the new process's pid, and this server has been asked to drain.
pub(crate) async fn upgrade(shared: &Arc<Shared>, config: &Restart) -> Result<u32> {
    let started = Instant::now();
    let listeners = shared.listeners();
    if listeners.is_empty() {
        return Err(Error::Restart(
            "no listener to hand over (not serving yet, or draining)".into(),
        ));
    }
    systemd::reloading();
    match attempt(shared, config, listeners).await {
        Ok(pid) => {
            systemd::notify_logged(&format!("MAINPID={pid}\nREADY=1"));
            tracing::info!(
                pid,
                took_ms = started.elapsed().as_millis() as u64,
                "new process is ready: it serves now; draining this one"
            );
            shared.request_drain(Trigger::Restart);
            Ok(pid)
        }
        Err(reason) => {
            let status = format!("STATUS=upgrade failed: {reason}");
            systemd::notify_logged(&format!("READY=1\n{}", status.replace('\n', " ")));
            tracing::warn!(%reason, "upgrade failed: rolled back, still serving");
            Err(Error::Restart(reason))
        }
    }
}

/// Starts the new process and waits for it; on failure, makes sure it is gone.
async fn attempt(
    shared: &Arc<Shared>,
    config: &Restart,
    listeners: Vec<Arc<Listener>>,
) -> std::result::Result<u32, String> {
    let (ready_rx, ready_tx) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("cannot create the readiness pipe: {e}"))?;
    let n = listeners.len();
    let names: Vec<String> = listeners
        .iter()
        .map(|l| name_of(l.as_raw_fd()).unwrap_or_else(|| DEFAULT_NAME.to_owned()))
        .collect();
    let mut fds: Vec<RawFd> = listeners.iter().map(|l| l.as_raw_fd()).collect();
    fds.push(ready_tx.as_raw_fd());

    let mut cmd = std::process::Command::new(&config.program);
    cmd.args(&config.args);
    for k in [
        LISTEN_PID,
        LISTEN_FDS,
        LISTEN_FDNAMES,
        GRACE_LISTEN_PPID,
        GRACE_READY_FD,
    ] {
        cmd.env_remove(k);
    }
    cmd.env(LISTEN_FDS, n.to_string())
        .env(LISTEN_FDNAMES, names.join(":"))
        .env(GRACE_LISTEN_PPID, std::process::id().to_string())
        .env(GRACE_READY_FD, (FIRST_FD + n as RawFd).to_string());
    sys::pass_fds(&mut cmd, fds).map_err(|e| e.to_string())?;
    let program = config.program.display().to_string();
    let spawned = spawn_retrying(tokio::process::Command::from(cmd)).await;
    // The child has its copies now. Ours: the write end goes at once (so the pipe reads
    // end-of-file when the child is gone), the listeners' extra references too (so a
    // drain that starts meanwhile closes them).
    drop(ready_tx);
    drop(listeners);
    let mut child = spawned.map_err(|e| format!("cannot start {program}: {e}"))?;
    let pid = child.id().unwrap_or(0);
    tracing::info!(pid, %program, args = ?config.args, "new process started; waiting until it is ready");

    let mut ready = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_rx)
        .map_err(|e| format!("cannot watch the readiness pipe: {e}"))?;
    let mut phase = shared.phase();
    let timeout = config.ready_timeout;
    let mut buf = [0u8; 64];
    let failure = tokio::select! {
        read = ready.read(&mut buf) => match read {
            Ok(n) if n > 0 => return Ok(pid),
            Ok(_) => format!("process {pid} closed the readiness pipe without being ready"),
            Err(e) => format!("cannot read the readiness pipe of process {pid}: {e}"),
        },
        status = child.wait() => match status {
            Ok(status) => format!("process {pid} {} before it was ready", describe(status)),
            Err(e) => format!("cannot wait for process {pid}: {e}"),
        },
        _ = tokio::time::sleep(timeout) => {
            format!("process {pid} was not ready within {timeout:?}")
        }
        _ = phase.wait_for(|p| *p != Phase::Serving) => {
            format!("a drain started while process {pid} was starting")
        }
    };
    Err(reap(&mut child, pid, failure).await)
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

/// Makes sure a failed child is gone and reaped; returns the reason, with its exit status
/// when that is news.
async fn reap(child: &mut tokio::process::Child, pid: u32, mut reason: String) -> String {
    // A child that closed the pipe is usually exiting: give it a moment to say how.
    let exited = match child.try_wait() {
        Ok(Some(status)) => Some(status),
        _ => tokio::time::timeout(Duration::from_millis(200), child.wait())
            .await
            .ok()
            .and_then(|r| r.ok()),
    };
    match exited {
        Some(status) => {
            if !reason.contains("before it was ready") {
                reason.push_str(&format!(" ({})", describe(status)));
            }
        }
        None => {
            let _ = child.start_kill();
            match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
                Ok(Ok(_)) => reason.push_str(" (killed)"),
                _ => reason.push_str(&format!(" (sent SIGKILL to {pid}, but it has not exited)")),
            }
        }
    }
    reason
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
