//! Background jobs: spawned through the library, told when the server stops, waited for.
//!
//! A job runs units of work until its [`JobToken`] says the server is stopping; the drain
//! (after the HTTP connections are done, since handlers may hand work to jobs) tells every
//! job at once, waits for each to finish its current unit, and cuts any still running at
//! the deadline. Each job gets a line in the [`ShutdownReport`](crate::ShutdownReport).

use std::future::Future;
use std::sync::Mutex;
use std::time::Instant;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::latch::Latch;
use crate::resources::bounded;
use crate::shutdown::ForceReason;
use crate::shutdown::report::TaskReport;

/// Given to every background job: says when the server is stopping.
///
/// ```no_run
/// # async fn doc(handle: grace_http::Handle) {
/// handle.spawn_job("settlement", |token: grace_http::JobToken| async move {
///     while !token.is_stopping() {
///         // one unit of work, always finished once started…
///         tokio::select! {
///             _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
///             _ = token.stopping() => {}
///         }
///     }
///     Ok::<_, std::io::Error>(())
/// });
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct JobToken(CancellationToken);

impl JobToken {
    /// True once the job has been asked to stop.
    pub fn is_stopping(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves when the job is asked to stop.
    pub async fn stopping(&self) {
        self.0.cancelled().await
    }
}

type Finished = (Result<(), String>, Instant);

/// The running jobs of one server.
#[derive(Default)]
pub(crate) struct Jobs {
    token: CancellationToken,
    running: Mutex<Vec<(String, JoinHandle<Finished>)>>,
}

impl Jobs {
    pub(crate) fn spawn<F, Fut, E>(&self, name: String, job: F)
    where
        F: FnOnce(JobToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let run = job(JobToken(self.token.clone()));
        let handle = tokio::spawn(async move {
            let result = run.await.map_err(|e| e.to_string());
            (result, Instant::now())
        });
        crate::lock(&self.running).push((name, handle));
    }

    /// Tells every job to stop and waits for them, each at most until `deadline` or a force.
    pub(crate) async fn stop(
        &self,
        deadline: Instant,
        force: &Latch<ForceReason>,
    ) -> Vec<TaskReport> {
        self.token.cancel();
        let started = Instant::now();
        let running = std::mem::take(&mut *crate::lock(&self.running));
        let mut reports = Vec::with_capacity(running.len());
        // All were told at once, so waiting in turn costs nothing: each line records when
        // its own job finished.
        for (name, handle) in running {
            reports.push(bounded(name, started, deadline, handle, force).await);
        }
        reports
    }
}
