//! What a server is doing, for people and for dashboards: a snapshot of every live
//! connection ([`Handle::connection_snapshots`](crate::Handle::connection_snapshots)), running totals ([`Handle::totals`](crate::Handle::totals)) and,
//! with the `metrics` cargo feature, the same numbers through the
//! [`metrics`](https://docs.rs/metrics) facade (`Handle::record_metrics`), so that any
//! exporter (Prometheus, StatsD, OpenTelemetry…) serves them.
//!
//! Nothing here adds work per request. The live counts and totals are the tracker's own
//! counters, read when someone asks (a scrape); only drains and upgrades, which happen a few
//! times in a process's life, record through the facade when they end.
//!
//! | metric | kind | labels | read or recorded |
//! |---|---|---|---|
//! | `grace_connections` | gauge | `state`: `new`, `active`, `idle`, `hijacked` | at `Handle::record_metrics` |
//! | `grace_connections_accepted_total` | counter | | at `Handle::record_metrics` |
//! | `grace_connections_closed_total` | counter | | at `Handle::record_metrics` |
//! | `grace_requests_completed_total` | counter | | at `Handle::record_metrics` |
//! | `grace_connections_handed_over_total` | counter | | at `Handle::record_metrics`: passed, open, to the next generation |
//! | `grace_connections_received_total` | counter | | at `Handle::record_metrics`: passed to this one by the previous generation |
//! | `grace_upgraded_handed_over_total` | counter | | at `Handle::record_metrics`: of those handed over, the upgraded ones (WebSockets) |
//! | `grace_upgraded_received_total` | counter | | at `Handle::record_metrics`: of those received, the upgraded ones |
//! | `grace_draining` | gauge | | 1 once a drain is asked for, at `Handle::record_metrics` |
//! | `grace_generation` | gauge | | 1, then one more per upgrade, at `Handle::record_metrics` |
//! | `grace_drains_total` | counter | `trigger` (`SIGTERM`, `handle`, `restart`…), `outcome`: `clean`, `forced` | when a drain ends |
//! | `grace_drain_seconds` | histogram | | when a drain ends: from the request to the report |
//! | `grace_connections_forced_total` | counter | | when a drain ends: connections it cut |
//! | `grace_upgrades_total` | counter | `outcome`: `ok`, `failed` | when an upgrade ends |
//! | `grace_upgrade_seconds` | histogram | `outcome` | when an upgrade ends: from the request until the new process was ready (or failed) |
//!
//! The numbers are the process's: one server per process (two would overwrite each other's
//! gauges). A successful upgrade is counted by the old process, which drains and exits
//! afterwards (its last numbers reach only a push exporter); a failed one by the process
//! that keeps serving, where an alert can see it.

#[cfg(unix)]
use std::time::Duration;

use serde::Serialize;

#[cfg(feature = "metrics")]
use crate::base::conn::{ConnState, StateCounts};
use crate::base::report::ShutdownReport;

/// Running totals since the server started: from [`Handle::totals`](crate::Handle::totals).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Totals {
    /// Connections accepted (and received from the previous generation at an upgrade).
    pub accepted: u64,
    /// Connections closed (their socket closed, whatever the reason).
    pub closed: u64,
    /// Requests whose response was fully written.
    pub requests_completed: u64,
    /// Connections passed, open, to the next generation at an upgrade.
    pub handed_over: u64,
    /// Connections the previous generation passed to this one at the upgrade that started it.
    pub received: u64,
    /// Of `handed_over`, the upgraded connections (WebSockets: see `Movable`).
    pub upgraded_handed_over: u64,
    /// Of `received`, the upgraded connections.
    pub upgraded_received: u64,
}

/// Sets the `grace_*` gauges and counters to a server's live values (see
/// `Handle::record_metrics`).
#[cfg(feature = "metrics")]
pub(crate) fn record(counts: StateCounts, totals: Totals, draining: bool, generation: u32) {
    use ::metrics::{counter, gauge};
    describe();
    for state in [
        ConnState::New,
        ConnState::Active,
        ConnState::Idle,
        ConnState::Hijacked,
    ] {
        gauge!("grace_connections", "state" => state_label(state)).set(counts.get(state) as f64);
    }
    counter!("grace_connections_accepted_total").absolute(totals.accepted);
    counter!("grace_connections_closed_total").absolute(totals.closed);
    counter!("grace_requests_completed_total").absolute(totals.requests_completed);
    counter!("grace_connections_handed_over_total").absolute(totals.handed_over);
    counter!("grace_connections_received_total").absolute(totals.received);
    counter!("grace_upgraded_handed_over_total").absolute(totals.upgraded_handed_over);
    counter!("grace_upgraded_received_total").absolute(totals.upgraded_received);
    gauge!("grace_draining").set(if draining { 1.0 } else { 0.0 });
    gauge!("grace_generation").set(f64::from(generation));
    // Shown (as 0) before anything happened, so that rates and alerts have a series.
    counter!("grace_connections_forced_total").increment(0);
    for outcome in ["ok", "failed"] {
        counter!("grace_upgrades_total", "outcome" => outcome).increment(0);
    }
}

#[cfg(feature = "metrics")]
fn state_label(state: ConnState) -> &'static str {
    match state {
        ConnState::New => "new",
        ConnState::Active => "active",
        ConnState::Idle => "idle",
        ConnState::Hijacked => "hijacked",
        ConnState::Closed => "closed",
    }
}

/// The help text of each metric (the recorder keeps the first of each name; cheap to repeat).
#[cfg(feature = "metrics")]
fn describe() {
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("grace_connections", "Live connections per state.");
    describe_counter!(
        "grace_connections_accepted_total",
        "Connections accepted since the server started."
    );
    describe_counter!(
        "grace_connections_closed_total",
        "Connections closed since the server started."
    );
    describe_counter!(
        "grace_requests_completed_total",
        "Requests whose response was fully written."
    );
    describe_counter!(
        "grace_connections_handed_over_total",
        "Connections passed, open, to the next generation at an upgrade."
    );
    describe_counter!(
        "grace_connections_received_total",
        "Connections the previous generation passed to this one."
    );
    describe_counter!(
        "grace_upgraded_handed_over_total",
        "Of the connections handed over, the upgraded ones (WebSockets)."
    );
    describe_counter!(
        "grace_upgraded_received_total",
        "Of the connections received, the upgraded ones (WebSockets)."
    );
    describe_gauge!("grace_draining", "1 once a drain was asked for.");
    describe_gauge!(
        "grace_generation",
        "Generation of the service (1, +1 per upgrade)."
    );
    describe_counter!(
        "grace_drains_total",
        "Drains that ended, by trigger and outcome."
    );
    describe_histogram!(
        "grace_drain_seconds",
        Unit::Seconds,
        "How long drains took, from the request to the report."
    );
    describe_counter!(
        "grace_connections_forced_total",
        "Connections a drain had to cut."
    );
    describe_counter!("grace_upgrades_total", "Upgrades that ended, by outcome.");
    describe_histogram!(
        "grace_upgrade_seconds",
        Unit::Seconds,
        "How long upgrades took, until the new process was ready or failed."
    );
}

/// A drain ended (called by the drain with its report).
#[inline]
pub(crate) fn drain_finished(report: &ShutdownReport) {
    #[cfg(feature = "metrics")]
    {
        let outcome = if report.is_clean() { "clean" } else { "forced" };
        ::metrics::counter!(
            "grace_drains_total",
            "trigger" => report.trigger.to_string(),
            "outcome" => outcome
        )
        .increment(1);
        ::metrics::histogram!("grace_drain_seconds").record(report.total.as_secs_f64());
        ::metrics::counter!("grace_connections_forced_total").increment(report.forced.len() as u64);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = report;
}

/// An upgrade ended, after `took` (called by the restart driver).
#[cfg(unix)]
#[inline]
pub(crate) fn upgrade_finished(ok: bool, took: Duration) {
    #[cfg(feature = "metrics")]
    {
        let outcome = if ok { "ok" } else { "failed" };
        ::metrics::counter!("grace_upgrades_total", "outcome" => outcome).increment(1);
        ::metrics::histogram!("grace_upgrade_seconds", "outcome" => outcome)
            .record(took.as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (ok, took);
}
