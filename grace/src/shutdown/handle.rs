//! [`Handle`]: controls a running server from code, and reads its live state.

use std::sync::Arc;

use super::shared::Shared;
use crate::base::conn::StateCounts;
use crate::base::report::ConnSnapshot;
use crate::base::report::{ForceReason, Trigger};
use crate::conn::notice::ShutdownNotice;
#[cfg(unix)]
use crate::error::RestartError;
use crate::health::Readiness;
use crate::jobs::JobToken;
use crate::metrics::Totals;
use crate::resources::Resource;

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
            .field("draining", &self.notice().is_draining())
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

    /// Live connections per state (all of them: [`StateCounts::total`]).
    pub fn counts(&self) -> StateCounts {
        self.shared.tracker.stats.counts()
    }

    /// The drain as handlers and jobs see it: [`is_draining`](ShutdownNotice::is_draining)
    /// once it started, [`wait`](ShutdownNotice::wait) for it, and why
    /// ([`reason`](ShutdownNotice::reason)).
    pub fn notice(&self) -> ShutdownNotice {
        self.shared.notice()
    }

    /// Readiness: a tower service for a probe (`200` while serving, `503` from the moment a
    /// drain is asked for, before any pre-stop delay), and
    /// [`is_ready`](Readiness::is_ready) for code.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            drain: Arc::clone(&self.shared.tracker.drain_asked),
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

    /// Asks for a zero-downtime restart (see [`Serve::with_restart`](crate::Serve::with_restart))
    /// and waits for the outcome: the new process's pid once it is ready (this server is
    /// then draining), or a [`RestartError`] saying why it failed (this server keeps
    /// serving), was refused (another restart is running, or the server is draining) or is
    /// not enabled.
    ///
    /// ```no_run
    /// # async fn doc(handle: grace_http::Handle) {
    /// match handle.restart().await {
    ///     Ok(pid) => println!("process {pid} took over; draining"),
    ///     Err(grace_http::RestartError::Exited { status, .. }) => eprintln!("new binary {status}"),
    ///     Err(e) => eprintln!("still serving: {e}"),
    /// }
    /// # }
    /// ```
    #[cfg(unix)]
    pub async fn restart(&self) -> Result<u32, RestartError> {
        self.shared.upgrades.ask().await
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
    /// What every live connection is doing now, by id: its state, peer, age and the request
    /// it is serving. Each call takes a fresh look (a short lock per shard of the registry);
    /// meant for debug pages and admin endpoints, not for every request.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), grace_http::Error> {
    /// // Each connection's request is shown when requests are recorded.
    /// let server = grace_http::Server::bind("127.0.0.1:8080").await?.record_requests(true);
    /// let handle = server.handle();
    /// let app = axum::Router::new().route(
    ///     "/debug/conns",
    ///     axum::routing::get(move || async move {
    ///         // [{"id":0,"peer":"127.0.0.1:40312","state":"active","age_ms":12.5,
    ///         //   "request":{"method":"GET","path":"/debug/conns","age_ms":0.1}}]
    ///         axum::Json(handle.connection_snapshots())
    ///     }),
    /// );
    /// server.serve(app).with_signals().await?;
    /// # Ok(()) }
    /// ```
    pub fn connection_snapshots(&self) -> Vec<ConnSnapshot> {
        self.shared.tracker.snapshot()
    }

    /// Connections accepted and closed, requests completed, and connections handed over at
    /// upgrades, since the server started.
    pub fn totals(&self) -> Totals {
        let tracker = &self.shared.tracker;
        let (accepted, closed) = tracker.stats.accepted_closed();
        let (handed_over, received) = tracker.stats.handed_over_received();
        let (upgraded_handed_over, upgraded_received) =
            tracker.stats.upgraded_handed_over_received();
        Totals {
            accepted,
            closed,
            requests_completed: tracker.stats.completed(),
            handed_over,
            received,
            upgraded_handed_over,
            upgraded_received,
        }
    }

    /// Sets the `grace_*` gauges and counters (see the [module docs](crate::metrics)) to
    /// this server's live values through the installed `metrics` recorder. Call it right
    /// before an exporter renders (at each scrape), or on a timer for a push exporter.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// // metrics-exporter-prometheus without its HTTP listener: the app serves /metrics.
    /// let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    /// let server = grace_http::Server::bind("127.0.0.1:8080").await?;
    /// let handle = server.handle();
    /// let app = axum::Router::new().route(
    ///     "/metrics",
    ///     axum::routing::get(move || async move {
    ///         handle.record_metrics(); // the live counts and totals, read now
    ///         prometheus.render()
    ///     }),
    /// );
    /// server.serve(app).with_signals().await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "metrics")]
    pub fn record_metrics(&self) {
        let draining = self.shared.drain_requested().is_some();
        crate::metrics::record(
            self.counts(),
            self.totals(),
            draining,
            self.shared.generation(),
        );
    }
}
