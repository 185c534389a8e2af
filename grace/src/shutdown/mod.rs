//! Shutdown coordination: the state a server shares with its connections and handles, the
//! [`Handle`], the notice handlers get, and the drain itself ([`drain`]).
//!
//! Each fact of a server's life is one [`Latch`](crate::base::latch::Latch), set once:
//!
//! | fact | latch | set by | read by |
//! |---|---|---|---|
//! | a drain was asked for, and by what | `Shared::drain` | signals, [`Handle`], a restart | the drain, readiness, restarts |
//! | a force was asked for, and why | `Shared::force` | a second signal, [`Handle::force`] | the drain, jobs, resources |
//! | the listeners are closed | `Shared::listeners_closed` | the drain | the accept loops |
//! | the drain started | `Tracker::draining` | the drain | connections, [`ShutdownNotice`] |
//!
//! Readiness is not a fact of its own: a server is ready until a drain is asked for.

use std::sync::{Arc, Mutex, OnceLock};

use crate::base::latch::Latch;
use crate::conn::StateCounts;
use crate::conn::tracker::Tracker;
use crate::health::Readiness;
use crate::jobs::{JobToken, Jobs};
use crate::listener::Listener;
use crate::resources::{Resource, Resources};

pub(crate) mod drain;

use crate::base::report::{ForceReason, Trigger};
use crate::conn::notice::ShutdownNotice;

/// A listener as a restart passes it on: its name (`LISTEN_FDNAMES`), and whether its
/// socket file goes with it (the new generation removes it when it stops for good).
#[derive(Clone)]
pub(crate) struct Named {
    pub(crate) listener: Arc<Listener>,
    pub(crate) name: String,
    pub(crate) owns_file: bool,
}

/// State shared by the server, its connections and every [`Handle`].
pub(crate) struct Shared {
    pub(crate) tracker: Arc<Tracker>,
    /// A drain was asked for, and by what. Shared with every [`Readiness`] service.
    pub(crate) drain: Arc<Latch<Trigger>>,
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
    pub(crate) restart: OnceLock<crate::restart::Control>,
    /// Which generation of the service this process is: 1, then one more at each upgrade.
    pub(crate) generation: OnceLock<u32>,
    /// The accept loops pause (keeping their listeners) while an upgrade hands connections
    /// over: true while paused.
    accept_paused: tokio::sync::watch::Sender<bool>,
    /// The control socket, as restarts see it (passed on, taken over).
    pub(crate) control: crate::control::Link,
}

impl Shared {
    pub(crate) fn new() -> Arc<Self> {
        let tracker = Arc::new(Tracker::default());
        Arc::new(Shared {
            drain: Arc::clone(&tracker.drain_asked),
            tracker,
            force: Latch::new(),
            listeners_closed: Latch::new(),
            jobs: Jobs::default(),
            resources: Resources::default(),
            listeners: Mutex::default(),
            restart: OnceLock::new(),
            generation: OnceLock::new(),
            accept_paused: tokio::sync::watch::Sender::new(false),
            control: crate::control::Link::default(),
        })
    }

    /// Pauses the accept loops (`true`), or lets them accept again.
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

    pub(crate) fn generation(&self) -> u32 {
        self.generation.get().copied().unwrap_or(1)
    }

    /// The listeners while serving (none once draining).
    pub(crate) fn listeners(&self) -> Vec<Named> {
        crate::base::lock(&self.listeners).clone()
    }

    pub(crate) fn notice(&self) -> ShutdownNotice {
        self.tracker.notice(0)
    }

    /// Asks for a drain; true if this call was the first to (its trigger is the drain's).
    /// Readiness fails from this moment, before the drain task even wakes.
    pub(crate) fn request_drain(&self, trigger: Trigger) -> bool {
        self.drain.set(trigger)
    }

    /// Asks for a force (and for a drain, if none was asked for yet).
    pub(crate) fn request_force(&self, reason: ForceReason) {
        self.drain.set(Trigger::Handle);
        self.force.set(reason);
    }

    /// Resolves once a drain has been asked for (at once if it has).
    pub(crate) async fn drain_asked(&self) -> Trigger {
        self.drain.wait().await.clone()
    }

    /// The trigger of the drain, if one was asked for (it may not have started yet).
    pub(crate) fn drain_requested(&self) -> Option<Trigger> {
        self.drain.get().cloned()
    }
}

/// Controls a running server from code, and reads its live state.
///
/// Cheap to clone. Get one from [`Server::handle`](crate::Server::handle) before serving.
///
/// ```no_run
/// # async fn doc() -> Result<(), grace_http::Error> {
/// let server = grace_http::Server::bind("127.0.0.1:0").await?;
/// let handle = server.handle();
/// tokio::spawn(async move {
///     tokio::time::sleep(std::time::Duration::from_secs(60)).await;
///     println!("live: {:?}", handle.counts());
///     handle.shutdown(); // like Go's Server.Shutdown; handle.force() is like Close
/// });
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
/// let report = server.serve(app).await?;
/// println!("{}", report.to_json());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Handle {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("counts", &self.counts())
            .field("draining", &self.is_draining())
            .finish()
    }
}

impl Handle {
    /// Starts a graceful drain. Calling it again changes nothing.
    pub fn shutdown(&self) {
        self.shared.request_drain(Trigger::Handle);
    }

    /// Forces every remaining connection closed now (starting the drain first if needed).
    pub fn force(&self) {
        self.shared.request_force(ForceReason::Handle);
    }

    /// Live connections per state.
    pub fn counts(&self) -> StateCounts {
        self.shared.tracker.counts()
    }

    /// All live connections.
    pub fn connections(&self) -> usize {
        self.shared.tracker.len()
    }

    /// True once a drain has started.
    pub fn is_draining(&self) -> bool {
        self.shared.tracker.is_draining()
    }

    /// A notice that resolves when the drain starts, for long-running handlers and jobs.
    pub fn notice(&self) -> ShutdownNotice {
        self.shared.notice()
    }

    /// Resolves once a drain has started.
    pub async fn draining(&self) {
        self.notice().wait().await;
    }

    /// False from the moment a drain is asked for (before any pre-stop delay).
    pub fn is_ready(&self) -> bool {
        !self.shared.drain.is_set()
    }

    /// A tower service for a readiness probe: `200` while serving, `503` once draining.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            drain: Arc::clone(&self.shared.drain),
        }
    }

    /// Spawns a background job on the current tokio runtime. It gets a [`JobToken`] that
    /// fires after the HTTP drain; the drain then waits for it until the deadline.
    /// See [`JobToken`] for an example.
    pub fn spawn_job<F, Fut, E>(&self, name: impl Into<String>, job: F)
    where
        F: FnOnce(JobToken) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        self.shared.jobs.spawn(name.into(), job);
    }

    /// Registers a resource to close after the drain. See [`Resource`].
    ///
    /// ```no_run
    /// # fn doc(handle: grace_http::Handle) -> std::io::Result<()> {
    /// let audit = std::fs::File::create("audit.log")?;
    /// handle.add_resource(grace_http::Resource::new("audit-file", move || async move {
    ///     audit.sync_all() // flushed to disk before the process exits
    /// }));
    /// # Ok(()) }
    /// ```
    pub fn add_resource(&self, resource: Resource) {
        self.shared.resources.add(resource);
    }
}
