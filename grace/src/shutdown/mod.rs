//! Shutdown coordination: the [`Handle`], the phases of a drain, the notice handlers get,
//! and the [`ShutdownReport`](report::ShutdownReport).
//!
//! The coordinator itself is the tail of [`Serve`](crate::Serve): it waits for a drain
//! request, then runs the phases in order (see the crate docs for the picture).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::conn::tracker::Tracker;
use crate::conn::StateCounts;
use crate::health::Readiness;
use crate::jobs::{JobToken, Jobs};
use crate::listener::Listener;
use crate::resources::{Resource, Resources};

pub(crate) mod report;

pub use report::{ForceReason, Trigger};

/// Where the server is in its life. Only ever moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// Accepting and serving.
    Serving,
    /// Listeners closed; connections, then jobs, are being drained.
    Draining,
    /// Everything still open is being cut.
    Forcing,
}

/// `t + d`, or a time thirty years on when `d` is too large to add (a timeout of
/// `u64::MAX` seconds means "no deadline", never a panic).
pub(crate) fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or_else(|| far_future(t))
}

/// Thirty years after `t`: later than any process lives, early enough to add to any clock.
pub(crate) fn far_future(t: Instant) -> Instant {
    t + Duration::from_secs(30 * 365 * 86_400)
}

/// A listener as a restart passes it on: its name (`LISTEN_FDNAMES`), and whether its
/// socket file goes with it (the new generation removes it when it stops for good).
#[derive(Clone)]
pub(crate) struct Named {
    pub(crate) listener: Arc<Listener>,
    pub(crate) name: String,
    pub(crate) owns_file: bool,
}

/// What has been asked of the server, by signals or through the handle.
#[derive(Clone, Debug, Default)]
pub(crate) struct Requests {
    pub(crate) drain: Option<Trigger>,
    pub(crate) force: Option<ForceReason>,
}

/// State shared by the server, its connections and every [`Handle`].
pub(crate) struct Shared {
    pub(crate) tracker: Arc<Tracker>,
    phase: watch::Sender<Phase>,
    requests: watch::Sender<Requests>,
    ready: AtomicBool,
    pub(crate) jobs: Jobs,
    pub(crate) resources: Resources,
    /// The listeners while serving, so a restart can hand them on; emptied when the drain
    /// starts, so they close once the accept loops let go of theirs.
    listeners: Mutex<Vec<Named>>,
    /// Stops the accept loops. Separate from `phase`, so closing the listeners does not
    /// wake every connection task first.
    stop_accepting: tokio_util::sync::CancellationToken,
    pub(crate) restart: OnceLock<crate::restart::Control>,
}

impl Shared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Shared {
            tracker: Arc::new(Tracker::default()),
            phase: watch::Sender::new(Phase::Serving),
            requests: watch::Sender::new(Requests::default()),
            ready: AtomicBool::new(true),
            jobs: Jobs::default(),
            resources: Resources::default(),
            listeners: Mutex::default(),
            stop_accepting: tokio_util::sync::CancellationToken::new(),
            restart: OnceLock::new(),
        })
    }

    #[inline]
    pub(crate) fn is_draining(&self) -> bool {
        self.tracker.is_draining()
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub(crate) fn enter(&self, phase: Phase) {
        if phase >= Phase::Draining {
            // Responses written from now on carry `Connection: close`; then every
            // connection task is woken to close or finish.
            self.tracker.start_draining();
        }
        self.phase.send_if_modified(|p| {
            let moved = *p < phase;
            if moved {
                *p = phase;
            }
            moved
        });
    }

    /// Stops accepting: the accept loops drop their listeners (which then close, unless a
    /// restart handed them on).
    pub(crate) fn close_listeners(&self) {
        self.set_listeners(Vec::new());
        self.stop_accepting.cancel();
    }

    /// Resolves once the listeners are to be closed.
    pub(crate) async fn accepting_stopped(&self) {
        self.stop_accepting.cancelled().await
    }

    pub(crate) fn set_listeners(&self, listeners: Vec<Named>) {
        let mut guard = crate::lock(&self.listeners);
        let old = std::mem::replace(&mut *guard, listeners);
        drop(guard);
        drop(old);
    }

    /// The listeners while serving (none once draining).
    pub(crate) fn listeners(&self) -> Vec<Named> {
        crate::lock(&self.listeners).clone()
    }

    pub(crate) fn notice(&self) -> ShutdownNotice {
        ShutdownNotice(self.phase.subscribe())
    }

    /// Asks for a drain; true if this call was the first to (its trigger is the drain's).
    pub(crate) fn request_drain(&self, trigger: Trigger) -> bool {
        // Readiness fails from this moment, before the drain task even wakes.
        self.set_ready(false);
        self.requests.send_if_modified(|r| {
            let first = r.drain.is_none();
            if first {
                r.drain = Some(trigger);
            }
            first
        })
    }

    pub(crate) fn request_force(&self, reason: ForceReason) {
        self.set_ready(false);
        self.requests.send_if_modified(|r| {
            let first = r.force.is_none();
            if first {
                r.drain.get_or_insert(Trigger::Handle);
                r.force = Some(reason);
            }
            first
        });
    }

    pub(crate) fn requests(&self) -> watch::Receiver<Requests> {
        self.requests.subscribe()
    }

    /// Resolves once a drain has been asked for (at once if it has).
    pub(crate) async fn drain_asked(&self) {
        let mut requests = self.requests();
        let _ = requests.wait_for(|r| r.drain.is_some()).await;
    }

    /// The trigger of the drain, if one was requested (it may not have started yet).
    pub(crate) fn drain_requested(&self) -> Option<Trigger> {
        self.requests.borrow().drain.clone()
    }

    /// The reason of a force, if one was requested.
    pub(crate) fn force_requested(&self) -> Option<ForceReason> {
        self.requests.borrow().force.clone()
    }

    /// Resolves when a force is requested (at once if one was), with its reason.
    pub(crate) async fn forced(&self) -> ForceReason {
        let mut requests = self.requests();
        let reason = requests
            .wait_for(|r| r.force.is_some())
            .await
            .ok()
            .and_then(|r| r.force.clone());
        match reason {
            Some(reason) => reason,
            // The sender lives as long as `self`: never reached.
            None => std::future::pending().await,
        }
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
        self.shared.is_draining()
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
        self.shared.is_ready()
    }

    /// A tower service for a readiness probe: `200` while serving, `503` once draining.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            shared: Arc::clone(&self.shared),
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

/// Tells a handler that the server is draining, so it can say goodbye properly.
///
/// Every request that asks for an upgrade (an `Upgrade` header, or `CONNECT`) carries one in
/// its extensions, so a WebSocket handler can send a close frame (`1001 Going Away`) when the
/// drain starts instead of being cut at the deadline. Any code can get one from
/// [`Handle::notice`].
///
/// ```
/// # async fn doc(req: http::Request<()>) {
/// if let Some(notice) = req.extensions().get::<grace_http::ShutdownNotice>() {
///     notice.wait().await; // say goodbye to the client here
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ShutdownNotice(watch::Receiver<Phase>);

impl ShutdownNotice {
    /// True once the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.0.borrow() >= Phase::Draining
    }

    /// Resolves when the drain starts (at once if it has).
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        // An error means the server is gone, which is a drain too.
        let _ = rx.wait_for(|p| *p >= Phase::Draining).await;
    }
}
