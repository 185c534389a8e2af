//! Resources closed after the drain, in dependency order, each within its own timeout.
//!
//! Register a database pool, a cache client, a file, anything with an async close, through
//! [`Handle::add_resource`](crate::Handle::add_resource). After the connections and jobs
//! are done, resources close one at a time: a resource closes only after every resource
//! that [`depends_on`](Resource::depends_on) it; otherwise the last registered closes
//! first, like destructors. One that hangs is cut at its timeout and the next still closes.
//! When the timeouts together do not fit in what is left before the shutdown deadline,
//! each gets its proportional share, so one hanging resource cannot take the time of those
//! after it and the deadline still holds.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use crate::base::budget::after;
use crate::base::latch::Latch;
use crate::base::report::ForceReason;
use crate::base::report::{Outcome, TaskReport};

type CloseFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Something to close on shutdown.
///
/// ```
/// use std::time::Duration;
/// use grace_http::Resource;
///
/// let pool = Resource::new("db", || async { /* pool.close().await */ Ok::<_, std::io::Error>(()) })
///     .timeout(Duration::from_secs(5));
/// let audit = Resource::new("audit-file", || async { Ok::<_, std::io::Error>(()) })
///     .depends_on(["db"]); // closes before "db"
/// # let _ = (pool, audit);
/// ```
pub struct Resource {
    name: String,
    timeout: Duration,
    depends_on: Vec<String>,
    close: Box<dyn FnOnce() -> CloseFuture + Send>,
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource")
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .field("depends_on", &self.depends_on)
            .finish_non_exhaustive()
    }
}

impl Resource {
    /// Default close timeout.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// A resource named `name`, closed by `close`.
    pub fn new<F, Fut, E>(name: impl Into<String>, close: F) -> Resource
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        Resource {
            name: name.into(),
            timeout: Self::DEFAULT_TIMEOUT,
            depends_on: Vec::new(),
            close: Box::new(move || {
                Box::pin(async move { close().await.map_err(|e| e.to_string()) })
            }),
        }
    }

    /// How long its close may take before it is cut (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Resource {
        self.timeout = timeout;
        self
    }

    /// Resources this one uses: they close only after this one has.
    pub fn depends_on<I, S>(mut self, names: I) -> Resource
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.depends_on.extend(names.into_iter().map(Into::into));
        self
    }
}

/// The registered resources of one server.
#[derive(Default)]
pub(crate) struct Resources(Mutex<Vec<Resource>>);

impl Resources {
    pub(crate) fn add(&self, resource: Resource) {
        crate::base::lock(&self.0).push(resource);
    }

    /// The time all closes may take together.
    pub(crate) fn budget(&self) -> Duration {
        total(crate::base::lock(&self.0).iter())
    }

    /// Closes every resource in order, each within its own timeout, and none later than
    /// `deadline` if there is one (their timeouts shrink in proportion to fit).
    pub(crate) async fn close_all(
        &self,
        deadline: Option<Instant>,
        force: &Latch<ForceReason>,
    ) -> Vec<TaskReport> {
        let all = std::mem::take(&mut *crate::base::lock(&self.0));
        let mut reports = Vec::with_capacity(all.len());
        let order = close_order(all);
        // The timeouts of the resources not yet closed, this one included.
        let mut left = total(order.iter());
        for r in order {
            let started = Instant::now();
            let limit = match deadline {
                None => after(started, r.timeout),
                Some(deadline) => {
                    let remaining = deadline.saturating_duration_since(started);
                    after(started, share(r.timeout, left, remaining)).min(deadline)
                }
            };
            left = left.saturating_sub(r.timeout);
            if let Some(reason) = force.get() {
                // Stop at once means at once: what has not started closing is left as is.
                reports.push(TaskReport {
                    name: r.name,
                    outcome: Outcome::TimedOut,
                    took: Duration::ZERO,
                    error: Some(format!("not closed: forced by {reason}")),
                });
                continue;
            }
            tracing::debug!(name = %r.name, "closing resource");
            reports.push(bounded(r.name, started, limit, (r.close)(), force).await);
        }
        reports
    }
}

/// The timeouts added up, saturating (a timeout may be `Duration::MAX`).
fn total<'a>(resources: impl Iterator<Item = &'a Resource>) -> Duration {
    resources.fold(Duration::ZERO, |sum, r| sum.saturating_add(r.timeout))
}

/// How long a resource may take: its own timeout, or, when the timeouts `left` (its own
/// included) do not fit in the `remaining` time, its proportional share of it. So a resource
/// that hangs cannot eat the time of those after it, and the deadline still holds.
fn share(timeout: Duration, left: Duration, remaining: Duration) -> Duration {
    if left <= remaining {
        timeout
    } else {
        timeout.mul_f64(remaining.as_secs_f64() / left.as_secs_f64())
    }
}

/// Users before what they use; otherwise last registered first.
fn close_order(mut left: Vec<Resource>) -> Vec<Resource> {
    let mut order = Vec::with_capacity(left.len());
    while !left.is_empty() {
        // The last registered resource that no remaining resource depends on.
        let free = left
            .iter()
            .rposition(|r| !left.iter().any(|u| u.depends_on.contains(&r.name)));
        let i = free.unwrap_or_else(|| {
            tracing::warn!(
                "resources depend on each other in a cycle; closing the last registered"
            );
            left.len() - 1
        });
        order.push(left.remove(i));
    }
    order
}

/// Drives `work` (a job's last pass, or a close) here, in the drain's own task, until
/// `limit` or a force request, and reports how it ended; work cut at the limit is dropped,
/// and a panic is caught and reported. Here rather than in a task of its own: after a drain
/// at scale, a spawned task waits in the runtime's queue behind the thousands of connection
/// tasks their sockets' end has just woken (tokio has no priorities; 10–70 ms behind
/// 10,000), while the drain's task is woken directly.
pub(crate) async fn bounded<F>(
    name: String,
    started: Instant,
    limit: Instant,
    work: F,
    force: &Latch<ForceReason>,
) -> TaskReport
where
    F: Future<Output = Result<(), String>>,
{
    let caught = AssertUnwindSafe(work).catch_unwind();
    let ended = tokio::select! {
        biased;
        ended = caught => Some(ended.unwrap_or_else(|panic| {
            Err(format!("panicked: {}", panic_message(&*panic)))
        })),
        _ = tokio::time::sleep_until(limit.into()) => None,
        _ = force.wait() => None,
    };
    let now = Instant::now();
    let (outcome, error) = match ended {
        Some(Ok(())) => (Outcome::Closed, None),
        Some(Err(e)) => (Outcome::Failed, Some(e)),
        None => {
            let cut = format!("cut after {:?}", now.saturating_duration_since(started));
            (Outcome::TimedOut, Some(cut))
        }
    };
    TaskReport {
        name,
        outcome,
        took: now.saturating_duration_since(started),
        error,
    }
}

/// What a panic said, when it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-string payload")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    fn r(name: &str, deps: &[&str]) -> Resource {
        Resource::new(name, || async { Ok::<_, String>(()) }).depends_on(deps.iter().copied())
    }

    /// A close that panics is reported failed with its message, and the next resource
    /// still closes; both are closed with the runtime's only worker busy (as after a drain
    /// at scale), by the drain's own task.
    #[test]
    fn a_panicking_close_is_reported_and_the_next_still_closes_while_workers_are_busy() {
        let resources = Resources::default();
        let closed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&closed);
        resources.add(Resource::new("db", move || async move {
            flag.store(true, Ordering::SeqCst);
            Ok::<_, String>(())
        }));
        resources.add(
            Resource::new("cache", || async {
                tokio::task::yield_now().await;
                panic!("close failed hard");
                #[allow(unreachable_code)]
                Ok::<_, String>(())
            })
            .depends_on(["db"]),
        );
        let (rt, busy) = crate::testing::one_busy_worker();
        let reports = rt.block_on(resources.close_all(None, &Latch::new()));
        assert!(!busy.release(), "the closes waited for the busy worker");
        assert_eq!(reports[0].name, "cache");
        assert_eq!(reports[0].outcome, Outcome::Failed);
        let error = reports[0].error.clone().unwrap_or_default();
        assert!(error.contains("panicked: close failed hard"), "{error}");
        assert_eq!(
            (reports[1].name.as_str(), reports[1].outcome),
            ("db", Outcome::Closed)
        );
        assert!(closed.load(Ordering::SeqCst));
    }

    fn names(v: Vec<Resource>) -> Vec<String> {
        v.into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn last_registered_closes_first() {
        assert_eq!(
            names(close_order(vec![r("a", &[]), r("b", &[]), r("c", &[])])),
            ["c", "b", "a"]
        );
    }

    #[test]
    fn users_close_before_what_they_use() {
        // "audit" and "redis" were registered before the "db" they use; they still go first.
        let order = close_order(vec![
            r("audit", &["db"]),
            r("redis", &[]),
            r("db", &[]),
            r("jobs", &["redis", "db"]),
        ]);
        let order = names(order);
        let pos = |n: &str| order.iter().position(|x| x == n).unwrap();
        assert!(pos("audit") < pos("db"));
        assert!(pos("jobs") < pos("db") && pos("jobs") < pos("redis"));
        assert_eq!(order.len(), 4);
    }

    #[test]
    fn timeouts_shrink_in_proportion_when_they_do_not_fit() {
        let s = Duration::from_secs;
        // Enough time: each keeps its own.
        assert_eq!(share(s(5), s(7), s(10)), s(5));
        // 10 s of timeouts in 5 s: each gets half of its own.
        assert_eq!(share(s(4), s(10), s(5)), s(2));
        assert_eq!(share(s(6), s(6), s(3)), s(3));
        // Nothing left: cut at once.
        assert_eq!(share(s(5), s(5), Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn cycles_still_close_everything() {
        assert_eq!(close_order(vec![r("a", &["b"]), r("b", &["a"])]).len(), 2);
    }
}
