//! The drain: what [`Serve`](crate::Serve) runs once a drain is asked for, phase by phase,
//! and the [`ShutdownReport`] it ends with.
//!
//! ```text
//! pre-stop delay (still serving, readiness failing)
//!  → close the listeners, wait for the accept loops to let go of them
//!  → close idle HTTP/1 connections from here; mark the drain started (every connection
//!    task wakes: HTTP/1 finishes with `Connection: close`, HTTP/2 sends GOAWAY, upgraded
//!    connections get their notice)
//!    (an upgrade with hand-over passed each HTTP/1 connection it could to the new
//!    generation before asking for this drain: see `restart::spawn`)
//!  → wait until no connection is left (an event), or the work deadline, or a force
//!  → force what is left (shutdown(2) on each socket)
//!  → stop the jobs (same deadline), close the resources (their own timeouts)
//! ```

use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinSet;

use super::Shared;
use crate::base::budget::Budget;
use crate::base::report::Trigger;
use crate::base::report::{ForceReason, Outcome, Phase, PhaseTiming, ShutdownReport};
use crate::conn::tracker::Tracker;

/// Runs the phases of a shutdown, in order, and says what happened.
pub(crate) async fn run(
    shared: &Arc<Shared>,
    budget: Budget,
    trigger: Trigger,
    mut accepting: JoinSet<()>,
) -> ShutdownReport {
    let asked = Instant::now();
    let tracker = &shared.tracker;
    let _unpark = Unpark(Arc::clone(tracker));
    let at_start = tracker.counts();
    let completed_before = tracker.completed();
    let ended_before = tracker.ended_total();
    tracing::info!(%trigger, ?at_start, "drain started");
    crate::systemd::drain_started(&trigger);
    let mut forced_by: Option<ForceReason> = None;
    let mut phases = Vec::new();
    // An upgrade's drain follows its hand-over: the report starts with it.
    let hand_over = match trigger {
        Trigger::Restart => tracker.last_hand_over(),
        _ => None,
    };
    if let Some(done) = &hand_over {
        phases.push(PhaseTiming {
            phase: Phase::HandOver,
            took: done.took,
        });
    }
    // Each phase runs from the end of the one before it (the first from the request): the
    // phases tile the stop, and the report's total is their sum, nothing unaccounted.
    let mut mark = asked;
    let mut timed = |phase| {
        let now = Instant::now();
        phases.push(PhaseTiming {
            phase,
            took: now.saturating_duration_since(mark),
        });
        mark = now;
    };
    // What the resources declared: held back from the work only under a stop deadline.
    let reserve = shared.resources.budget();

    // Readiness already fails (since the request); with a pre-stop delay we keep serving,
    // so that load balancers stop sending here before the listener closes. Not at an
    // upgrade: the listening socket stays open in the new process, which serves on it (its
    // readiness answers there), so there is nothing to move away from, and a drain that
    // waited would keep answering 503 to health checks on the shared address meanwhile.
    if !budget.pre_stop_delay.is_zero() && trigger != Trigger::Restart {
        tokio::select! {
            _ = tokio::time::sleep_until(budget.pre_stop_end(asked, reserve).into()) => {}
            reason = shared.force.wait() => forced_by = Some(reason.clone()),
        }
        timed(Phase::PreStop);
    }

    // Close the listeners first (new connections are refused), then tell every connection.
    let closed = Instant::now();
    shared.close_listeners();
    while accepting.join_next().await.is_some() {}
    // From here no connection is accepted by this process (at an upgrade, the next one
    // takes every new connection on the shared socket).
    tracing::info!("listeners closed");
    timed(Phase::CloseListeners);
    let (work_deadline, cut_by) = budget.work_deadline(asked, closed, reserve);
    let idle = tracker.close_idle();
    tracing::debug!(idle, "idle connections closed");
    tracker.start_draining();
    // systemd: the stop takes up to the work's deadline plus the resources' time (not said
    // by an old generation that handed over: it is no longer the service's main process).
    if trigger != Trigger::Restart {
        let needed = work_deadline.saturating_duration_since(Instant::now());
        crate::systemd::extend_timeout(needed.saturating_add(reserve));
    }

    if forced_by.is_none() {
        tokio::select! {
            _ = tracker.wait_empty() => {}
            _ = tokio::time::sleep_until(work_deadline.into()) => forced_by = Some(cut_by.clone()),
            reason = shared.force.wait() => forced_by = Some(reason.clone()),
        }
        timed(Phase::Drain);
    }

    let mut forced = Vec::new();
    if let Some(reason) = &forced_by {
        forced = tracker.force_all();
        tracing::warn!(%reason, count = forced.len(), "forcing connections closed");
        timed(Phase::Force);
    }
    // Every connection has ended by now, as far as the drain goes: forced, or closed. (Those
    // handed over went before the drain, in the upgrade's hand-over: see `restart::spawn`.)
    let closed_by_drain =
        (tracker.ended_total() - ended_before).saturating_sub(forced.len() as u64);

    // Jobs next: handlers may have handed them work. A force cuts them at once.
    let jobs_deadline = match forced_by {
        Some(_) => Instant::now(),
        None => work_deadline,
    };
    let jobs = shared.jobs.stop(jobs_deadline, &shared.force).await;
    timed(Phase::Jobs);
    if forced_by.is_none() && jobs.iter().any(|j| j.outcome == Outcome::TimedOut) {
        forced_by = Some(cut_by);
    }

    let resources_deadline = budget.resources_deadline(asked);
    let resources = shared
        .resources
        .close_all(resources_deadline, &shared.force)
        .await;
    timed(Phase::Resources);
    // A force that came while jobs or resources were closing cut them: say so.
    if forced_by.is_none() {
        forced_by = shared.force.get().cloned();
    }

    let report = ShutdownReport {
        trigger,
        at_start: hand_over.as_ref().map_or(at_start, |h| h.at_start),
        requests_completed: tracker.completed() - completed_before,
        handed_over: hand_over.map_or(0, |h| h.handed_over),
        closed: closed_by_drain,
        forced_by,
        forced,
        jobs,
        resources,
        total: phases.iter().map(|p| p.took).sum(),
        phases,
    };
    report.log();
    crate::metrics::drain_finished(&report);
    report
}

/// When the stop is over (or abandoned), lets the tasks of the connections the drain shut
/// unwind (see `Tracker::park`).
struct Unpark(Arc<Tracker>);

impl Drop for Unpark {
    fn drop(&mut self) {
        // From a task of its own: waking thousands of tasks takes milliseconds that the
        // report's caller (often about to exit) need not wait for.
        let tracker = Arc::clone(&self.0);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(async move { tracker.unpark_all() })),
            Err(_) => tracker.unpark_all(),
        }
    }
}
