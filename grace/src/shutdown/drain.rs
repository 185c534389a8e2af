//! The drain: what [`Serve`](crate::Serve) runs once a drain is asked for, as phase steps
//! over one [`Stop`] context (`pre_stop`, `close_listeners`, `drain`, `force`, `jobs`,
//! `resources`), and the [`ShutdownReport`] it ends with. The picture is in
//! `docs/architecture.md` ("The drain").

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::Shared;
use crate::base::budget::Budget;
use crate::base::conn::StateCounts;
use crate::base::report::{
    ConnSnapshot, ForceReason, Outcome, Phase, PhaseTiming, ShutdownReport, TaskReport, Trigger,
};
use crate::conn::tracker::Tracker;

/// The phases of a stop, in the order they run (each only if [`Stop::runs`] says so).
const PHASES: [Phase; 6] = [
    Phase::PreStop,
    Phase::CloseListeners,
    Phase::Drain,
    Phase::Force,
    Phase::Jobs,
    Phase::Resources,
];

/// Runs the phases of a stop, in order, and says what happened. The loop owns the timing
/// and the first reason to force; each phase only does its work, and says whether it had
/// to force.
pub(crate) async fn run(
    shared: &Arc<Shared>,
    budget: Budget,
    trigger: Trigger,
    accepting: JoinSet<()>,
) -> ShutdownReport {
    // A hand-over under way when the stop came ends first (promptly: see
    // `handover::upgrade`), so the report counts what it handed over.
    shared.tracker.hand_over_ended().await;
    let mut stop = Stop::new(shared, budget, trigger, accepting);
    let _unpark = Unpark(Arc::clone(&shared.tracker));
    let mut phases = Vec::new();
    // An upgrade's drain follows its hand-over: the report starts with it.
    if let Some(done) = &stop.hand_over {
        phases.push(PhaseTiming {
            phase: Phase::HandOver,
            took: done.took,
        });
    }
    // Each phase runs from the end of the one before it (the first from the request): the
    // phases tile the stop, and the report's total is their sum, nothing unaccounted.
    let mut mark = stop.asked;
    for phase in PHASES {
        if !stop.runs(phase) {
            continue;
        }
        let forced = match phase {
            Phase::PreStop => stop.pre_stop().await,
            Phase::CloseListeners => stop.close_listeners().await,
            Phase::Drain => stop.drain().await,
            Phase::Force => stop.force(),
            Phase::Jobs => stop.jobs().await,
            _ => stop.resources().await,
        };
        if stop.forced_by.is_none() {
            stop.forced_by = forced;
        }
        let now = Instant::now();
        phases.push(PhaseTiming {
            phase,
            took: now.saturating_duration_since(mark),
        });
        mark = now;
    }
    let report = stop.report(phases);
    report.log();
    crate::metrics::drain_finished(&report);
    report
}

/// What the phases of one stop share.
struct Stop<'a> {
    shared: &'a Arc<Shared>,
    budget: Budget,
    trigger: Trigger,
    /// When the stop was asked for.
    asked: Instant,
    /// What the resources declared: held back from the work only under a stop deadline.
    reserve: Duration,
    accepting: JoinSet<()>,
    /// When in-flight work is cut, and as what (set once the listeners are closed).
    work_deadline: Option<(Instant, ForceReason)>,
    /// The first reason to force, once there is one.
    forced_by: Option<ForceReason>,
    forced: Vec<ConnSnapshot>,
    jobs: Vec<TaskReport>,
    resources: Vec<TaskReport>,
    hand_over: Option<crate::conn::handing::HandOverDone>,
    at_start: StateCounts,
    /// Connections the drain closed (not forced), counted once the drain or the force ended.
    closed: u64,
    completed_before: u64,
    ended_before: u64,
}

impl<'a> Stop<'a> {
    fn new(
        shared: &'a Arc<Shared>,
        budget: Budget,
        trigger: Trigger,
        accepting: JoinSet<()>,
    ) -> Self {
        let tracker = &shared.tracker;
        let at_start = tracker.stats.counts();
        tracing::info!(%trigger, ?at_start, "drain started");
        #[cfg(unix)]
        crate::systemd::drain_started(&trigger);
        Stop {
            shared,
            budget,
            asked: Instant::now(),
            reserve: shared.resources.budget(),
            accepting,
            work_deadline: None,
            forced_by: None,
            forced: Vec::new(),
            jobs: Vec::new(),
            resources: Vec::new(),
            // A completed hand-over is followed by a drain: the upgrade's, or a stop's that
            // came as it ended.
            hand_over: tracker.last_hand_over(),
            trigger,
            at_start,
            closed: 0,
            completed_before: tracker.stats.completed(),
            ended_before: tracker.stats.ended_total(),
        }
    }

    /// Whether `phase` runs, given what the phases before it did.
    fn runs(&self, phase: Phase) -> bool {
        match phase {
            // Not at an upgrade: the listening socket stays open in the new process, which
            // serves on it (its readiness answers there), so there is nothing to move away
            // from, and a drain that waited would answer 503 on the shared address meanwhile.
            Phase::PreStop => {
                !self.budget.pre_stop_delay.is_zero() && self.trigger != Trigger::Restart
            }
            Phase::Drain => self.forced_by.is_none(),
            Phase::Force => self.forced_by.is_some(),
            _ => true,
        }
    }

    /// Readiness already fails (since the request); keep serving a while, so that load
    /// balancers stop sending here before the listeners close.
    async fn pre_stop(&mut self) -> Option<ForceReason> {
        let end = self.budget.pre_stop_end(self.asked, self.reserve);
        tokio::select! {
            _ = tokio::time::sleep_until(end.into()) => None,
            reason = self.shared.force.wait() => Some(reason.clone()),
        }
    }

    /// Closes the listeners (new connections are refused) and waits for the accept loops to
    /// let go of them; then closes the idle connections and tells every other one.
    async fn close_listeners(&mut self) -> Option<ForceReason> {
        let closed = Instant::now();
        self.shared.close_listeners();
        while self.accepting.join_next().await.is_some() {}
        // From here no connection is accepted by this process (at an upgrade, the next one
        // takes every new connection on the shared socket).
        tracing::info!("listeners closed");
        let deadline = self.budget.work_deadline(self.asked, closed, self.reserve);
        let tracker = &self.shared.tracker;
        let idle = tracker.close_idle();
        tracing::debug!(idle, "idle connections closed");
        tracker.start_draining();
        // systemd: the stop takes up to the work's deadline plus the resources' time (not
        // said by an old generation that handed over: no longer the service's main process).
        #[cfg(unix)]
        if self.trigger != Trigger::Restart {
            let needed = deadline.0.saturating_duration_since(Instant::now());
            crate::systemd::extend_timeout(needed.saturating_add(self.reserve));
        }
        self.work_deadline = Some(deadline);
        None
    }

    /// Waits until no connection is left (an event), the work deadline, or a force.
    async fn drain(&mut self) -> Option<ForceReason> {
        let (deadline, cut_by) = self.deadline();
        let forced = tokio::select! {
            _ = self.shared.tracker.wait_empty() => None,
            _ = tokio::time::sleep_until(deadline.into()) => Some(cut_by),
            reason = self.shared.force.wait() => Some(reason.clone()),
        };
        self.count_closed();
        forced
    }

    /// Every connection has ended by now, as far as the drain goes: forced, or closed.
    /// (Those handed over went before the drain, in the upgrade's hand-over.)
    fn count_closed(&mut self) {
        let ended = self.shared.tracker.stats.ended_total() - self.ended_before;
        self.closed = ended.saturating_sub(self.forced.len() as u64);
    }

    /// Cuts every connection left (shutdown(2) on each socket).
    fn force(&mut self) -> Option<ForceReason> {
        self.forced = self.shared.tracker.force_all();
        let reason = self.forced_by.as_ref().map(ToString::to_string);
        tracing::warn!(
            reason,
            count = self.forced.len(),
            "forcing connections closed"
        );
        self.count_closed();
        None
    }

    /// Stops the jobs: handlers may have handed them work. A force cuts them at once.
    async fn jobs(&mut self) -> Option<ForceReason> {
        let (deadline, cut_by) = self.deadline();
        let deadline = match self.forced_by {
            Some(_) => Instant::now(),
            None => deadline,
        };
        self.jobs = self.shared.jobs.stop(deadline, &self.shared.force).await;
        let timed_out = self.jobs.iter().any(|j| j.outcome == Outcome::TimedOut);
        timed_out.then_some(cut_by)
    }

    /// Closes the resources, each within its timeout. A force that came while jobs or
    /// resources were closing cut them: it is said.
    async fn resources(&mut self) -> Option<ForceReason> {
        let deadline = self.budget.resources_deadline(self.asked);
        let force = &self.shared.force;
        self.resources = self.shared.resources.close_all(deadline, force).await;
        force.get().cloned()
    }

    /// The work deadline (from the closing of the listeners, which always comes first).
    fn deadline(&self) -> (Instant, ForceReason) {
        self.work_deadline
            .clone()
            .unwrap_or((self.asked, ForceReason::Deadline))
    }

    fn report(self, phases: Vec<PhaseTiming>) -> ShutdownReport {
        let tracker = &self.shared.tracker;
        ShutdownReport {
            trigger: self.trigger,
            at_start: self
                .hand_over
                .as_ref()
                .map_or(self.at_start, |h| h.at_start),
            requests_completed: tracker.stats.completed() - self.completed_before,
            handed_over: self.hand_over.as_ref().map_or(0, |h| h.handed_over),
            upgraded_handed_over: self.hand_over.as_ref().map_or(0, |h| h.upgraded),
            closed: self.closed,
            forced_by: self.forced_by,
            forced: self.forced,
            jobs: self.jobs,
            resources: self.resources,
            total: phases.iter().map(|p| p.took).sum(),
            phases,
        }
    }
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
