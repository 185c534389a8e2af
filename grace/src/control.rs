//! The control socket: how an operator's command asks a running server what it is doing,
//! for an upgrade (and its outcome), or for a drain.
//!
//! A Unix-domain socket, created owner-only (mode 0600), at a path you choose, off unless
//! asked for with [`Serve::with_control`](crate::Serve::with_control). One request per
//! connection: a line (`status`, `upgrade` or `drain`), answered by one line of JSON, whose
//! types are here: the server writes them, and the client functions read them back.
//!
//! | request   | client      | answer |
//! |-----------|-------------|--------|
//! | `status`  | [`status`]  | [`Status`]: `{"pid":…,"generation":…,"phase":"serving"\|"stopping"\|"draining","ready":…,"counts":{…},"connections":…,"handed_over":{"received":…,"sent":…},"last_upgrade":{"ok":true,"pid":…}\|{"ok":false,"error":…}\|null}` |
//! | `upgrade` | [`upgrade`] | [`UpgradeOutcome`], once known: `{"ok":true,"pid":<new>}` or `{"ok":false,"kind":"exited","error":"process 42 exited with status 1 before it was ready"}` |
//! | `drain`   | [`drain`]   | [`DrainStarted`]: `{"ok":true}` once the drain is asked for |
//!
//! Anything else is answered `{"ok":false,"error":…}` ([`RequestError::Refused`] for a
//! client).
//!
//! The `grace-ctl` binary (crate `grace-ctl`) is that client on the command line, for any
//! server built with grace: `grace-ctl --socket PATH status [--json]`, `upgrade` (prints the
//! new pid, or exits 1 with the reason: `ExecReload=grace-ctl --socket PATH upgrade` makes
//! `systemctl reload` fail when the upgrade does), `drain`.
//!
//! ```no_run
//! # async fn doc() -> Result<(), grace_http::control::RequestError> {
//! use grace_http::control::{self, UpgradeOutcome};
//! let status = control::status("/run/app/control.sock").await?;
//! println!("generation {}, {} connections", status.generation, status.connections);
//! if let UpgradeOutcome::Failed { error, .. } = control::upgrade("/run/app/control.sock").await? {
//!     eprintln!("the upgrade rolled back: {error}");
//! }
//! # Ok(()) }
//! ```
//!
//! # The socket's file
//!
//! The path is treated as a Unix-domain listener's is (see [`Listener`]):
//! a *stale* socket there (one nobody accepts on: connecting is refused) is replaced; a live
//! socket (another instance's control socket), a regular file, a symbolic link or anything
//! else is left alone and the server does not start ([`Error::Control`](crate::Error::Control),
//! naming the path). The last generation removes the file when it stops for good.
//!
//! # At an upgrade
//!
//! The listening socket itself is passed to the new generation with the others
//! ([`Serve::with_restart`](crate::Serve::with_restart)), so the path never changes hands
//! and nothing is ever bound or renamed at it during an upgrade:
//!
//! - the new generation starts answering once it has reported ready (before that, it takes
//!   no control request: one that fails to start changes nothing);
//! - the old one closes its copy once the upgrade has succeeded — the new process ready and
//!   the connections handed over (it still answers the requests it accepted, the `upgrade`
//!   request included);
//! - an upgrade that fails (the new process exits, is never ready, or dies during the
//!   hand-over: see [`Restart`](crate::Restart)) thus leaves `status` reaching the old
//!   process, and one that succeeds, the new.
//!
//! A new generation configured with another path (or none) does not take the socket: it
//! binds its own path, and the old one's closes with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::listener::{self, Listener, SocketFile};
use crate::shutdown::{Handle, Shared};

mod answer;
mod client;

use answer::{Answer, Refused, Request};
pub use answer::{DrainStarted, FailureKind, HandedOver, ServerPhase, Status, UpgradeOutcome};
pub use client::{RequestError, drain, status, upgrade};

/// Longest request line accepted.
const MAX_LINE: u64 = 64;
/// How long a client may take to send its request line.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A bound control socket and the claim on its file.
pub(crate) type Bound = (UnixListener, SocketFile);

/// Binds the control socket at `path` (owner-only), or takes the one the previous
/// generation passed (`inherited`) if it is at the same path. A stale socket at the path is
/// replaced; anything else there is an error, and is left alone.
pub(crate) fn bind(path: &Path, inherited: Option<UnixListener>) -> std::io::Result<Bound> {
    if let Some(socket) = inherited {
        let at = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(absolute));
        if at.as_deref() == Some(absolute(path).as_path()) {
            let socket = Listener::Unix(socket);
            if let Some(file) = SocketFile::handed_over(&socket) {
                let Listener::Unix(socket) = socket else {
                    unreachable!("made a Unix listener above");
                };
                tracing::info!(path = %path.display(), "control socket (from the previous generation)");
                return Ok((socket, file));
            }
        }
        tracing::info!(
            path = %path.display(),
            previous = ?at,
            "the previous generation's control socket is elsewhere (or its file is gone): binding anew"
        );
    }
    let (listener, file) = listener::bind_unix(path, Some(0o600))?;
    let Listener::Unix(listener) = listener else {
        unreachable!("bind_unix makes a Unix listener");
    };
    tracing::info!(path = %path.display(), "control socket");
    Ok((listener, file))
}

fn absolute(path: &Path) -> PathBuf {
    match std::env::current_dir() {
        Ok(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

/// Answers requests on the control socket until the server is done, or until a new
/// generation has taken over (see the module's docs).
pub(crate) async fn serve(listener: Arc<UnixListener>, shared: Arc<Shared>) {
    loop {
        tokio::select! {
            biased;
            _ = shared.control.passed.wait() => {
                tracing::debug!("control requests go to the new generation: closing ours");
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, Arc::clone(&shared)));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn answer(stream: UnixStream, shared: Arc<Shared>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::AsyncReadExt::take(BufReader::new(read), MAX_LINE);
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await;
    let reply = match read {
        Ok(Ok(_)) => dispatch(&line, &shared).await,
        _ => Answer::Refused(Refused::new("no request line".to_owned())),
    };
    let Ok(mut out) = serde_json::to_string(&reply) else {
        return;
    };
    out.push('\n');
    let _ = write.write_all(out.as_bytes()).await;
}

async fn dispatch(line: &str, shared: &Arc<Shared>) -> Answer {
    let handle = Handle {
        shared: Arc::clone(shared),
    };
    match Request::parse(line) {
        Some(Request::Status) => Answer::Status(Box::new(status_of(shared))),
        Some(Request::Upgrade) => Answer::Upgrade(UpgradeOutcome::from(&handle.restart().await)),
        Some(Request::Drain) => {
            handle.shutdown();
            Answer::Drain(DrainStarted)
        }
        None => Answer::Refused(Refused::new(format!(
            "unknown request {:?} (status, upgrade, drain)",
            line.trim()
        ))),
    }
}

fn status_of(shared: &Shared) -> Status {
    let counts = shared.tracker.stats.counts();
    // Connections handed over at upgrades: received from the previous generation, sent to
    // the next.
    let (sent, received) = shared.tracker.stats.handed_over_received();
    let (upgraded_sent, upgraded_received) = shared.tracker.stats.upgraded_handed_over_received();
    let asked = shared.drain_requested().is_some();
    let phase = match (asked, shared.tracker.is_draining()) {
        (false, _) => ServerPhase::Serving,
        (true, false) => ServerPhase::Stopping,
        (true, true) => ServerPhase::Draining,
    };
    let last = shared.upgrades.last().map(|r| match r {
        Ok(pid) => UpgradeOutcome::Upgraded { pid },
        Err(error) => UpgradeOutcome::Failed { kind: None, error },
    });
    Status {
        pid: std::process::id(),
        generation: shared.generation(),
        phase,
        ready: !asked,
        counts,
        connections: counts.total(),
        handed_over: HandedOver::new(received, sent)
            .with_upgraded(upgraded_received, upgraded_sent),
        last_upgrade: last,
    }
}
