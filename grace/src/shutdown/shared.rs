//! [`Shared`]: the state a server shares with its connections, handles, restarts and
//! control socket. Each fact of a server's life is one [`Latch`], set once:
//!
//! | fact | latch | set by | read by |
//! |---|---|---|---|
//! | a drain was asked for, and by what | `Tracker::drain_asked` (one latch, read through `Shared` and [`Readiness`](crate::Readiness)) | signals, [`Handle`](crate::Handle), a restart | the drain, readiness, restarts |
//! | a force was asked for, and why | `Shared::force` | a second signal, [`Handle::force`](crate::Handle::force) | the drain, jobs, resources |
//! | the listeners are closed | `Shared::listeners_closed` | the drain | the accept loops |
//! | the drain started | `Tracker::draining` | the drain | connections, [`ShutdownNotice`] |
//!
//! Readiness is not a fact of its own: a server is ready until a drain is asked for.

#[cfg(unix)]
use std::sync::Weak;
use std::sync::{Arc, Mutex, OnceLock};

#[cfg(unix)]
use tokio::net::UnixListener;
#[cfg(unix)]
use tokio::sync::{mpsc, oneshot};

use crate::base::latch::Latch;
#[cfg(unix)]
use crate::base::lock;
use crate::base::report::{ForceReason, Trigger};
use crate::conn::notice::ShutdownNotice;
use crate::conn::tracker::Tracker;
#[cfg(unix)]
use crate::error::RestartError;
use crate::jobs::Jobs;
use crate::listener::Listener;
use crate::resources::Resources;

/// A listener as a restart passes it on: its name (`LISTEN_FDNAMES`), and whether its
/// socket file goes with it (the new generation removes it when it stops for good).
#[derive(Clone)]
#[cfg_attr(not(unix), allow(dead_code))] // read by restarts only
pub(crate) struct Named {
    pub(crate) listener: Arc<Listener>,
    pub(crate) name: String,
    pub(crate) owns_file: bool,
}

/// State shared by the server, its connections and every [`Handle`].
pub(crate) struct Shared {
    pub(crate) tracker: Arc<Tracker>,
    /// A force was asked for, and why.
    pub(crate) force: Latch<ForceReason>,
    /// The accept loops are to stop. A fact apart from the drain's start, so closing the
    /// listeners does not wake every connection task first.
    listeners_closed: Latch<()>,
    pub(crate) jobs: Jobs,
    pub(crate) resources: Resources,
    /// The listeners while serving, so a restart can hand them on; emptied when the drain
    /// starts, so they close once the accept loops let go of theirs.
    listeners: Mutex<Vec<Named>>,
    /// How restarts are asked for from a [`Handle`] or the control socket, and how the last
    /// one went.
    #[cfg(unix)]
    pub(crate) upgrades: Upgrades,
    /// Which generation of the service this process is: 1, then one more at each upgrade.
    pub(crate) generation: OnceLock<u32>,
    /// The accept loops pause (keeping their listeners) while an upgrade hands connections
    /// over: true while paused.
    accept_paused: tokio::sync::watch::Sender<bool>,
    /// The control socket, as restarts see it (passed on, taken over).
    #[cfg(unix)]
    pub(crate) control: ControlLink,
}

impl Shared {
    pub(crate) fn new() -> Arc<Self> {
        let tracker = Arc::new(Tracker::default());
        Arc::new(Shared {
            tracker,
            force: Latch::new(),
            listeners_closed: Latch::new(),
            jobs: Jobs::default(),
            resources: Resources::default(),
            listeners: Mutex::default(),
            #[cfg(unix)]
            upgrades: Upgrades::default(),
            generation: OnceLock::new(),
            accept_paused: tokio::sync::watch::Sender::new(false),
            #[cfg(unix)]
            control: ControlLink::default(),
        })
    }

    /// Pauses the accept loops (`true`), or lets them accept again.
    #[cfg(unix)]
    pub(crate) fn pause_accepting(&self, paused: bool) {
        self.accept_paused.send_replace(paused);
    }

    /// Whether accepting is paused, for an accept loop to watch (one per loop, not one per
    /// connection accepted).
    pub(crate) fn accept_pause(&self) -> tokio::sync::watch::Receiver<bool> {
        self.accept_paused.subscribe()
    }

    /// Stops accepting: the accept loops drop their listeners (which then close, unless a
    /// restart handed them on).
    pub(crate) fn close_listeners(&self) {
        self.set_listeners(Vec::new());
        self.listeners_closed.set(());
    }

    /// Resolves once the listeners are to be closed.
    pub(crate) async fn accepting_stopped(&self) {
        self.listeners_closed.wait().await;
    }

    pub(crate) fn set_listeners(&self, listeners: Vec<Named>) {
        let mut guard = crate::base::lock(&self.listeners);
        let old = std::mem::replace(&mut *guard, listeners);
        drop(guard);
        drop(old);
    }

    #[cfg_attr(not(unix), allow(dead_code))] // read by restarts, and metrics
    pub(crate) fn generation(&self) -> u32 {
        self.generation.get().copied().unwrap_or(1)
    }

    /// The listeners while serving (none once draining).
    #[cfg(unix)]
    pub(crate) fn listeners(&self) -> Vec<Named> {
        crate::base::lock(&self.listeners).clone()
    }

    pub(crate) fn notice(&self) -> ShutdownNotice {
        self.tracker.notice(0)
    }

    /// Asks for a drain; true if this call was the first to (its trigger is the drain's).
    /// Readiness fails from this moment, before the drain task even wakes.
    pub(crate) fn request_drain(&self, trigger: Trigger) -> bool {
        self.tracker.drain_asked.set(trigger)
    }

    /// Asks for a force (and for a drain, if none was asked for yet).
    pub(crate) fn request_force(&self, reason: ForceReason) {
        self.tracker.drain_asked.set(Trigger::Handle);
        self.force.set(reason);
    }

    /// Resolves once a drain has been asked for (at once if it has).
    pub(crate) async fn drain_asked(&self) -> Trigger {
        self.tracker.drain_asked.wait().await.clone()
    }

    /// The trigger of the drain, if one was asked for (it may not have started yet).
    #[cfg_attr(not(unix), allow(dead_code))] // read by restarts, and metrics
    pub(crate) fn drain_requested(&self) -> Option<Trigger> {
        self.tracker.drain_asked.get().cloned()
    }
}

/// Someone waiting for the outcome of a restart asked through a [`Handle`] or the control
/// socket.
#[cfg(unix)]
pub(crate) type Reply = oneshot::Sender<Result<u32, RestartError>>;

/// The restarts of a server as others see them: where to ask for one (set once restarts
/// are enabled), and how the last one went.
#[cfg(unix)]
#[derive(Default)]
pub(crate) struct Upgrades {
    asks: OnceLock<mpsc::UnboundedSender<Reply>>,
    last: Mutex<Option<Result<u32, String>>>,
}

#[cfg(unix)]
impl Upgrades {
    /// Restarts are enabled: asks go to `asks` (false if they already were).
    pub(crate) fn enable(&self, asks: mpsc::UnboundedSender<Reply>) -> bool {
        self.asks.set(asks).is_ok()
    }

    /// Asks for a restart and waits for its outcome.
    pub(crate) async fn ask(&self) -> Result<u32, RestartError> {
        let Some(asks) = self.asks.get() else {
            return Err(RestartError::NotEnabled);
        };
        let (tx, rx) = oneshot::channel();
        asks.send(tx).map_err(|_| RestartError::Draining)?;
        rx.await.map_err(|_| RestartError::Draining)?
    }

    /// Records how the last restart went.
    pub(crate) fn finished(&self, result: &Result<u32, RestartError>) {
        *lock(&self.last) = Some(result.as_ref().copied().map_err(ToString::to_string));
    }

    /// The outcome of the last restart, if one was tried: the new pid, or why it failed.
    pub(crate) fn last(&self) -> Option<Result<u32, String>> {
        lock(&self.last).clone()
    }
}

/// What a server's restarts need to know of its control socket.
#[cfg(unix)]
#[derive(Default)]
pub(crate) struct ControlLink {
    /// The listening socket while this process answers on it, for an upgrade to pass on
    /// (the task that accepts holds it; once it lets go, there is nothing to pass).
    pub(crate) socket: Mutex<Weak<UnixListener>>,
    /// The socket went to a new generation that took over (which answers on it, and removes
    /// its file in turn).
    pub(crate) passed: Latch<()>,
}

#[cfg(unix)]
impl ControlLink {
    /// This process answers on `socket` (kept by the task that answers): an upgrade from now
    /// on passes it to the new generation. Set before restarts can be asked for, so that no
    /// upgrade misses it.
    pub(crate) fn hold(&self, socket: &Arc<UnixListener>) {
        *lock(&self.socket) = Arc::downgrade(socket);
    }

    /// The socket to pass to a new generation, if this process answers on one. Keep it until
    /// the new process has started.
    pub(crate) fn to_pass(&self) -> Option<Arc<UnixListener>> {
        lock(&self.socket).upgrade()
    }

    /// A new generation took over (the upgrade succeeded): it answers from now on.
    pub(crate) fn taken_over(&self) {
        if self.to_pass().is_some() {
            self.passed.set(());
        }
    }

    /// The socket's file is the new generation's now: not ours to remove.
    pub(crate) fn handed_on(&self) -> bool {
        self.passed.is_set()
    }
}
