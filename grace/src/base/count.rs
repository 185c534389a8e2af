//! [`Count`]: how many of something are still under way, and the event of none being left.
//!
//! The one primitive behind each "wait until none is left" of the server: the connections the
//! drain still waits for (`Tracker::wait_empty`), the hand-overs still being sent
//! (`Outbox::settled`), the connections sent and not acknowledged yet
//! (`Outbox::acknowledged`).

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// A count that can be awaited to reach zero, without polling.
#[derive(Debug, Default)]
pub(crate) struct Count {
    n: AtomicUsize,
    zero: Notify,
}

impl Count {
    /// One more under way.
    pub(crate) fn add(&self) {
        // AcqRel, as `sub`: the count is the only synchronisation between the two ends.
        self.n.fetch_add(1, Ordering::AcqRel);
    }

    /// One fewer; the last wakes every waiter. Must follow an `add`.
    pub(crate) fn sub(&self) {
        // AcqRel: what was done before this `sub` is seen by whoever sees the count at 0.
        if self.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.zero.notify_waiters();
        }
    }

    /// How many are under way now.
    #[cfg_attr(not(unix), allow(dead_code))]
    pub(crate) fn get(&self) -> usize {
        // Acquire, as in `zero`.
        self.n.load(Ordering::Acquire)
    }

    /// None is under way now.
    #[cfg_attr(not(unix), allow(dead_code))]
    pub(crate) fn is_zero(&self) -> bool {
        self.get() == 0
    }

    /// Resolves once none is left (at once if none is).
    pub(crate) async fn zero(&self) {
        loop {
            let notified = self.zero.notified();
            tokio::pin!(notified);
            // Registered before the check, so a `sub` to 0 in between still wakes us.
            notified.as_mut().enable();
            if self.n.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Step-by-step polling (no runtime, no timing).
    use super::*;
    use tokio_test::{assert_pending, assert_ready, task};

    #[test]
    fn zero_wakes_on_the_last_sub_and_not_before() {
        let count = Count::default();
        assert_ready!(task::spawn(count.zero()).poll(), "none under way");
        count.add();
        count.add();
        let mut zero = task::spawn(count.zero());
        assert_pending!(zero.poll());
        count.sub();
        assert!(!zero.is_woken(), "woken while one is still under way");
        assert_pending!(zero.poll());
        count.sub();
        assert!(zero.is_woken(), "the last sub must wake the waiter");
        assert_ready!(zero.poll());
    }
}
