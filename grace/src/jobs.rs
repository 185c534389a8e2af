//! Background jobs: spawned through the library, told when the server stops, waited for.
//!
//! A job runs units of work until its [`JobToken`] says the server is stopping; the drain
//! (after the HTTP connections are done, since handlers may hand work to jobs) tells every
//! job at once, waits for each to finish its current unit, and cuts any still running at
//! the deadline. Each job gets a line in the [`ShutdownReport`](crate::ShutdownReport).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Instant;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::base::latch::Latch;
use crate::base::report::ForceReason;
use crate::base::report::TaskReport;
use crate::resources::bounded;

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

/// A job's run, as a future that says how it ended.
type Run = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A job's run, polled by the job's own task while the server runs; the drain takes it
/// over when it tells the job to stop (see [`Jobs::stop`]). Empty once the run ended in its
/// task, or was taken over.
type Slot = Arc<Mutex<Option<Run>>>;

/// A running job: its name, its run, and its task (which says how a run that ended there
/// ended).
type Running = (String, Slot, JoinHandle<Result<(), String>>);

/// The running jobs of one server.
#[derive(Default)]
pub(crate) struct Jobs {
    token: CancellationToken,
    running: Mutex<Vec<Running>>,
}

impl Jobs {
    pub(crate) fn spawn<F, Fut, E>(&self, name: String, job: F)
    where
        F: FnOnce(JobToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let run = job(JobToken(self.token.clone()));
        let slot: Slot = Arc::new(Mutex::new(Some(Box::pin(async move {
            run.await.map_err(|e| e.to_string())
        }))));
        let polled = Arc::clone(&slot);
        // The slot's lock is held while the run is polled: the drain takes the run between
        // two polls, never during one. A run that panics here poisons the lock, and the
        // drain then reads the panic from this task.
        let handle = tokio::spawn(std::future::poll_fn(move |cx| {
            let Ok(mut run) = polled.lock() else {
                return Poll::Ready(Ok(()));
            };
            let Some(future) = run.as_mut() else {
                // Taken over by the drain, which reports how it ends.
                return Poll::Ready(Ok(()));
            };
            let ended = std::task::ready!(future.as_mut().poll(cx));
            *run = None;
            Poll::Ready(ended)
        }));
        crate::base::lock(&self.running).push((name, slot, handle));
    }

    /// Tells every job to stop and waits for them, each at most until `deadline` or a force.
    ///
    /// A job still running is from then on driven here, by the drain's own task, rather than
    /// by its task: woken directly, its last pass does not wait in the runtime's queue
    /// behind the connection tasks the drain has just let go (see
    /// [`bounded`](crate::resources::bounded)). The jobs are driven together, as they were
    /// told together; each line records when its own job finished.
    pub(crate) async fn stop(
        &self,
        deadline: Instant,
        force: &Latch<ForceReason>,
    ) -> Vec<TaskReport> {
        self.token.cancel();
        let started = Instant::now();
        let running = std::mem::take(&mut *crate::base::lock(&self.running));
        let waits = running.into_iter().map(|(name, slot, handle)| {
            // Poisoned: the run panicked in its task, which says so.
            let taken = slot.lock().ok().and_then(|mut run| run.take());
            let work: Run = match taken {
                Some(run) => run,
                None => Box::pin(async move {
                    match handle.await {
                        Ok(ended) => ended,
                        Err(e) => Err(format!("panicked: {e}")),
                    }
                }),
            };
            bounded(name, started, deadline, work, force)
        });
        futures_util::future::join_all(waits).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::base::report::Outcome;
    use crate::testing::one_busy_worker;

    /// The runtime's only worker is busy (as when thousands of connection tasks were woken at
    /// once): a job's last pass still runs, driven by the drain's own task, which is not
    /// queued behind it. Without the takeover the stop waits for the worker.
    #[test]
    fn a_jobs_last_pass_runs_while_the_workers_are_busy() {
        let jobs = Jobs::default();
        let (rt, busy) = one_busy_worker();
        rt.block_on(async {
            jobs.spawn("last-pass".into(), |token| async move {
                token.stopping().await;
                tokio::task::yield_now().await;
                Ok::<_, std::io::Error>(())
            })
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let reports = rt.block_on(jobs.stop(deadline, &Latch::new()));
        assert!(!busy.release(), "the stop waited for the busy worker");
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].outcome, Outcome::Closed, "{reports:?}");
    }

    /// A job that panics in its last pass is reported failed with its message; one that
    /// panicked earlier, in its own task, too; a job beside them still finishes.
    #[test]
    fn panicking_jobs_are_reported_and_the_others_finish() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let jobs = Jobs::default();
        let reports = rt.block_on(async {
            jobs.spawn("late".into(), |token| async move {
                token.stopping().await;
                panic!("in the last pass");
                #[allow(unreachable_code)]
                Ok::<_, std::io::Error>(())
            });
            jobs.spawn("early".into(), |_| async move {
                panic!("at once");
                #[allow(unreachable_code)]
                Ok::<_, std::io::Error>(())
            });
            jobs.spawn("fine".into(), |token| async move {
                token.stopping().await;
                Ok::<_, std::io::Error>(())
            });
            // The early one panics in its own task, before the stop.
            while !crate::base::lock(&jobs.running)[1].2.is_finished() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            jobs.stop(Instant::now() + Duration::from_secs(60), &Latch::new())
                .await
        });
        let got: Vec<_> = reports
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.outcome,
                    r.error.clone().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(got[0].0, "late");
        assert_eq!(got[0].1, Outcome::Failed);
        assert!(got[0].2.contains("in the last pass"), "{got:?}");
        assert_eq!(got[1].0, "early");
        assert_eq!(got[1].1, Outcome::Failed);
        assert!(got[1].2.contains("panicked"), "{got:?}");
        assert_eq!((got[2].0, got[2].1), ("fine", Outcome::Closed));
    }
}
