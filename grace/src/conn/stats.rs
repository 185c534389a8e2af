//! [`Stats`]: a server's counters, one relaxed atomic each: connections per state, and the
//! running totals since it started.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::{ConnState, StateCounts};

/// The counters of a server's connections. Relaxed throughout: each is read on its own, for
/// reports and metrics, never to decide what another thread may do.
#[derive(Default)]
pub(crate) struct Stats {
    /// Live connections per state (`New`, `Active`, `Idle`, `Hijacked`).
    pub(super) counts: [AtomicUsize; 4],
    /// Connections accepted (or received): the next connection's id.
    pub(super) next_id: AtomicU64,
    /// Connections closed since the server started (one relaxed add per connection).
    pub(super) closed: AtomicU64,
    /// Connections the drain no longer waits for since the server started: closed, or shut
    /// by the drain (their tasks may still be unwinding), or handed over.
    pub(super) ended: AtomicU64,
    /// Connections handed to the next generation (see `handover`).
    pub(super) handed_over: AtomicU64,
    /// Connections the previous generation handed to this one.
    pub(super) received: AtomicU64,
    /// Of `handed_over`, the upgraded ones (WebSockets…: see `movable`).
    pub(crate) upgraded_handed_over: AtomicU64,
    /// Of `received`, the upgraded ones.
    pub(super) upgraded_received: AtomicU64,
    /// Requests whose response was fully written.
    pub(super) completed: AtomicU64,
}

impl Stats {
    /// A connection (`upgraded` or not) went to the next generation.
    #[cfg(unix)]
    pub(crate) fn count_handed_over(&self, upgraded: bool) {
        self.handed_over.fetch_add(1, Ordering::Relaxed);
        if upgraded {
            self.upgraded_handed_over.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Connections counted as handed over came back (see `Outbox::take_back`), `upgraded`
    /// of them upgraded.
    #[cfg(unix)]
    pub(crate) fn uncount_handed_over(&self, n: u64, upgraded: u64) {
        self.handed_over.fetch_sub(n, Ordering::Relaxed);
        self.upgraded_handed_over
            .fetch_sub(upgraded, Ordering::Relaxed);
    }

    /// Connections handed to the next generation, and received from the previous one.
    pub(crate) fn handed_over_received(&self) -> (u64, u64) {
        (
            self.handed_over.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    /// Of those, the upgraded ones: handed to the next generation, received.
    pub(crate) fn upgraded_handed_over_received(&self) -> (u64, u64) {
        (
            self.upgraded_handed_over.load(Ordering::Relaxed),
            self.upgraded_received.load(Ordering::Relaxed),
        )
    }

    /// Connections ended since the server started, as far as the drain goes (see `ended`).
    pub(crate) fn ended_total(&self) -> u64 {
        self.ended.load(Ordering::Relaxed)
    }

    pub(crate) fn counts(&self) -> StateCounts {
        let c = |s: ConnState| self.counts[s as usize].load(Ordering::Relaxed);
        StateCounts {
            new: c(ConnState::New),
            active: c(ConnState::Active),
            idle: c(ConnState::Idle),
            hijacked: c(ConnState::Hijacked),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.counts().total()
    }

    /// Requests whose response was fully written, since the server started.
    pub(crate) fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Connections accepted and closed since the server started (never more closed than
    /// accepted).
    pub(crate) fn accepted_closed(&self) -> (u64, u64) {
        let closed = self.closed.load(Ordering::Relaxed);
        let accepted = self.next_id.load(Ordering::Relaxed);
        (accepted, closed.min(accepted))
    }
}
