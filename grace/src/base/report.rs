//! The shutdown report: what a drain found, what it cut and why, how long each phase took.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::conn::{Addr, ConnState, StateCounts};

/// What started a drain.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Trigger {
    /// A signal, by name (`SIGTERM`, `SIGINT`…).
    Signal(String),
    /// [`Handle::shutdown`](crate::Handle::shutdown) was called.
    Handle,
    /// A new process took over the listeners (zero-downtime restart).
    Restart,
    /// The future given to [`Serve::with_shutdown`](crate::Serve::with_shutdown) resolved.
    ShutdownFuture,
}

/// Why connections were forced closed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForceReason {
    /// The shutdown timeout ([`DrainPolicy::shutdown_timeout`](crate::DrainPolicy::shutdown_timeout))
    /// passed with work still in flight.
    Deadline,
    /// The overall stop deadline ([`DrainPolicy::stop_deadline`](crate::DrainPolicy::stop_deadline))
    /// came first: what was left was cut to leave the resources their close time.
    StopDeadline,
    /// A second signal arrived during the drain.
    Signal(String),
    /// [`Handle::force`](crate::Handle::force) was called.
    Handle,
}

macro_rules! display_as_str {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    )*};
}
display_as_str!(Trigger, ForceReason);

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Signal(name) => f.write_str(name),
            Trigger::Handle => f.write_str("handle"),
            Trigger::Restart => f.write_str("restart"),
            Trigger::ShutdownFuture => f.write_str("shutdown future"),
        }
    }
}

impl fmt::Display for ForceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForceReason::Deadline => f.write_str("deadline"),
            ForceReason::StopDeadline => f.write_str("stop deadline"),
            ForceReason::Signal(name) => write!(f, "second signal {name}"),
            ForceReason::Handle => f.write_str("handle"),
        }
    }
}

/// A request that was still running on a connection that had to be forced closed.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct ActiveRequest {
    /// The request method.
    pub method: String,
    /// The request path and query.
    pub path: String,
    /// How long the request had been running.
    #[serde(rename = "age_ms", serialize_with = "ms")]
    pub age: Duration,
}

/// One connection as seen at a moment: a live one, from
/// [`Handle::connection_snapshots`](crate::Handle::connection_snapshots), or one the drain
/// had to close by force ([`ForcedConn`], in [`ShutdownReport::forced`]), as it was then.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct ConnSnapshot {
    /// The connection's id (as in [`ConnInfo::id`](crate::ConnInfo::id)).
    pub id: u64,
    /// The peer's address.
    pub peer: Addr,
    /// Its state (never `Closed`: closed connections are not live).
    pub state: ConnState,
    /// How long it had been open.
    #[serde(rename = "age_ms", serialize_with = "ms")]
    pub age: Duration,
    /// The request in progress, if one was (on HTTP/2, the latest stream's), when the
    /// server records requests ([`Server::record_requests`](crate::Server::record_requests)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<ActiveRequest>,
}

/// A connection the drain had to close by force, as it was then.
pub type ForcedConn = ConnSnapshot;

/// A step of the shutdown, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Phase {
    /// Still serving, readiness failing, so load balancers move away.
    PreStop,
    /// Listeners closed; new connections refused.
    CloseListeners,
    /// An upgrade: idle HTTP/1 connections passed to the new generation.
    HandOver,
    /// Idle connections closed, then waiting for in-flight work on the others.
    Drain,
    /// Cutting what was left.
    Force,
    /// Stopping background jobs.
    Jobs,
    /// Closing resources.
    Resources,
}

/// One step of the shutdown and how long it took.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct PhaseTiming {
    /// Which step.
    #[serde(rename = "name")]
    pub phase: Phase,
    /// How long it took: from the end of the phase before it (the first phase from the
    /// request), so that the phases add up to the report's `total`.
    #[serde(rename = "ms", serialize_with = "ms")]
    pub took: Duration,
}

/// How a background job or a resource ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Finished or closed cleanly.
    Closed,
    /// Did not finish within its time and was cut.
    TimedOut,
    /// Returned an error (or panicked).
    Failed,
}

/// A line of the report for one background job or one resource.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct TaskReport {
    /// The name it was registered with.
    pub name: String,
    /// How it ended.
    pub outcome: Outcome,
    /// How long its stop or close took.
    #[serde(rename = "ms", serialize_with = "ms")]
    pub took: Duration,
    /// The error, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a shutdown did: returned by [`Serve`](crate::Serve) and logged through `tracing`.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// What started the drain.
    pub trigger: Trigger,
    /// Live connections per state when the drain began.
    pub at_start: StateCounts,
    /// Requests whose responses were completed during the drain.
    pub requests_completed: u64,
    /// Connections passed, open, to the new generation (an upgrade with hand-over).
    pub handed_over: u64,
    /// Of [`handed_over`](Self::handed_over), the upgraded connections (WebSockets moved
    /// by their handlers: see [`Movable`](crate::Movable)).
    pub upgraded_handed_over: u64,
    /// Connections that closed during the drain: idle ones closed by the drain, those that
    /// finished their work, and one whose hand-over a force cut short; not those handed
    /// over, nor those in [`forced`](Self::forced). Together, `handed_over + closed +
    /// forced.len()` are every connection the drain saw end: those live at its start, and
    /// any accepted during it (in a pre-stop delay).
    pub closed: u64,
    /// Why connections were forced closed, if any were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forced_by: Option<ForceReason>,
    /// The connections forced closed, each with its state, age and active request.
    pub forced: Vec<ForcedConn>,
    /// Background jobs, in the order they stopped.
    pub jobs: Vec<TaskReport>,
    /// Resources, in the order they were closed.
    pub resources: Vec<TaskReport>,
    /// Each phase with its duration; they tile the stop, one after the other.
    pub phases: Vec<PhaseTiming>,
    /// From the trigger to the end: the sum of the phases.
    #[serde(rename = "total_ms", serialize_with = "ms")]
    pub total: Duration,
}

impl ShutdownReport {
    /// True when nothing was cut: every connection drained, every job and resource closed.
    pub fn is_clean(&self) -> bool {
        self.forced.is_empty()
            && self.forced_by.is_none()
            && self
                .jobs
                .iter()
                .chain(&self.resources)
                .all(|t| t.outcome == Outcome::Closed)
    }

    /// How long `phase` took, if it ran.
    pub fn phase(&self, phase: Phase) -> Option<Duration> {
        self.phases
            .iter()
            .find(|p| p.phase == phase)
            .map(|p| p.took)
    }

    /// The report as one JSON line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub(crate) fn log(&self) {
        for f in &self.forced {
            tracing::warn!(
                conn = f.id,
                peer = %f.peer,
                state = %f.state,
                age_ms = f.age.as_millis() as u64,
                request = ?f.request.as_ref().map(|r| format!("{} {}", r.method, r.path)),
                "connection forced closed"
            );
        }
        for t in self.jobs.iter().chain(&self.resources) {
            if t.outcome != Outcome::Closed {
                tracing::warn!(name = %t.name, outcome = ?t.outcome, error = ?t.error, "not closed cleanly");
            }
        }
        tracing::info!(
            trigger = %self.trigger,
            at_start = ?self.at_start,
            requests_completed = self.requests_completed,
            handed_over = self.handed_over,
            upgraded_handed_over = self.upgraded_handed_over,
            closed = self.closed,
            forced = self.forced.len(),
            forced_by = ?self.forced_by.as_ref().map(ToString::to_string),
            total_ms = self.total.as_secs_f64() * 1e3,
            "shutdown complete"
        );
    }
}

pub(crate) fn ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}
