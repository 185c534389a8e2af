//! The tracker's side of an upgrade's hand-over: whether connections are being handed over
//! and through which outbox, what the last hand-over did, and the serving here of a
//! connection that did not go. On Windows (no restarts) only what the drain reads is
//! compiled: no hand-over ever runs there.

#[cfg(unix)]
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::StateCounts;
#[cfg(unix)]
use super::record::HandOver;
use super::tracker::Tracker;
use crate::base::lock;

/// When a hand-over started (`handed_over` and the connections then), and how long it took
/// once it ended with a drain to follow.
#[derive(Default)]
#[cfg_attr(not(unix), allow(dead_code))] // set by hand-overs only
pub(super) struct HandOverMark {
    handed_before: u64,
    upgraded_before: u64,
    at_start: StateCounts,
    took: Option<Duration>,
}

/// What the last hand-over did, for the report of the drain that followed it.
pub(crate) struct HandOverDone {
    pub(crate) handed_over: u64,
    /// Of those, the upgraded ones.
    pub(crate) upgraded: u64,
    pub(crate) took: Duration,
    pub(crate) at_start: StateCounts,
}

/// Serves, in this process, a connection that was on its way to the next generation.
#[cfg(unix)]
pub(crate) type LocalServe = Box<dyn Fn(crate::handover::Handed) + Send + Sync + 'static>;

impl Tracker {
    /// Starts handing connections over through `outbox`, then wakes every connection's
    /// task: each HTTP/1 one goes at its next moment between requests.
    #[cfg(unix)]
    pub(crate) fn start_hand_over(&self, outbox: Arc<crate::handover::outbox::Outbox>) {
        *lock(&self.outbox) = Some(outbox);
        *lock(&self.hand_over_mark) = HandOverMark {
            handed_before: self.stats.handed_over.load(Ordering::Relaxed),
            upgraded_before: self.stats.upgraded_handed_over.load(Ordering::Relaxed),
            at_start: self.stats.counts(),
            took: None,
        };
        // Release, paired with the Acquire in `is_handing_over`: a task that sees the flag
        // finds the outbox in place.
        self.handing.store(true, Ordering::Release);
        self.wake_all();
        self.wake_movables(true);
    }

    /// Ends the hand-over (its window closed, it completed, or the next generation went):
    /// connections not handed over stay here and are woken to go on as they were. `took`:
    /// how long it took, for the report of a drain that follows.
    #[cfg(unix)]
    pub(crate) fn end_hand_over(&self, took: Option<Duration>) {
        self.handing.store(false, Ordering::Release);
        if let Some(outbox) = lock(&self.outbox).take() {
            outbox.close();
        }
        lock(&self.hand_over_mark).took = took;
        self.wake_all();
        self.wake_movables(false);
        self.hand_over_end.notify_waiters();
    }

    /// Resolves once no hand-over is under way: a stop that comes during one lets it end
    /// first (it ends promptly then: sends under way finish, acknowledgements are read),
    /// so that its report counts what went.
    pub(crate) async fn hand_over_ended(&self) {
        loop {
            let ended = self.hand_over_end.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if !self.is_handing_over() {
                return;
            }
            ended.await;
        }
    }

    /// What the last hand-over did, if one ended with a drain to follow (an upgrade's, or a
    /// stop's that came during it).
    pub(crate) fn last_hand_over(&self) -> Option<HandOverDone> {
        let mark = lock(&self.hand_over_mark);
        mark.took.map(|took| HandOverDone {
            handed_over: self.stats.handed_over.load(Ordering::Relaxed) - mark.handed_before,
            upgraded: self.stats.upgraded_handed_over.load(Ordering::Relaxed)
                - mark.upgraded_before,
            took,
            at_start: mark.at_start,
        })
    }

    /// True while an upgrade hands connections over.
    #[inline]
    pub(crate) fn is_handing_over(&self) -> bool {
        self.handing.load(Ordering::Acquire)
    }

    /// The channel to the next generation, while connections may be handed over.
    #[cfg(unix)]
    pub(crate) fn handing_over(&self) -> Option<Arc<crate::handover::outbox::Outbox>> {
        if !self.is_handing_over() {
            return None;
        }
        lock(&self.outbox).clone().filter(|o| o.is_open())
    }

    /// True while some HTTP/1 connection may still be handed over (one is between requests
    /// or will be), or the previous generation still hands some to this one. Upgraded ones
    /// are `Tracker::grant_movables`'.
    #[cfg(unix)]
    pub(crate) fn hand_over_left(&self) -> bool {
        !self.previous_done.is_set()
            || self.shards.iter().any(|shard| {
                lock(shard)
                    .values()
                    .any(|c| c.hand_over() != HandOver::Never)
            })
    }

    /// Serves `handed` again in this process (see `local`); without a server to serve it,
    /// it closes.
    #[cfg(unix)]
    pub(crate) fn serve_local(&self, handed: crate::handover::Handed) {
        match self.local.get() {
            Some(serve) => serve(handed),
            None => tracing::warn!("no server to take a connection back: closed"),
        }
    }
}
