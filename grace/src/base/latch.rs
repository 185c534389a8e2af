//! [`Latch`]: a fact that becomes true once, with a value, and can be awaited.
//!
//! The one primitive behind each of the server's one-way facts: a drain was asked for (and
//! by what), a force was asked for (and why), the drain started, the listeners closed. Each
//! fact is one latch; nothing else holds it.

use std::sync::OnceLock;

use tokio::sync::Notify;

/// Set at most once; read without locking; awaited without polling.
#[derive(Debug)]
pub(crate) struct Latch<T> {
    value: OnceLock<T>,
    set: Notify,
}

impl<T> Default for Latch<T> {
    fn default() -> Self {
        Latch::new()
    }
}

impl<T> Latch<T> {
    pub(crate) fn new() -> Self {
        Latch {
            value: OnceLock::new(),
            set: Notify::new(),
        }
    }

    /// Sets the fact; true if this call did (the first value wins, later ones are dropped).
    pub(crate) fn set(&self, value: T) -> bool {
        // OnceLock publishes the value with Release and reads it with Acquire: whoever sees
        // it set sees everything done before `set`.
        let first = self.value.set(value).is_ok();
        if first {
            self.set.notify_waiters();
        }
        first
    }

    /// The value, once set.
    #[inline]
    pub(crate) fn get(&self) -> Option<&T> {
        self.value.get()
    }

    #[inline]
    pub(crate) fn is_set(&self) -> bool {
        self.value.get().is_some()
    }

    /// Resolves once the fact is set (at once if it is), with its value.
    pub(crate) async fn wait(&self) -> &T {
        loop {
            let notified = self.set.notified();
            tokio::pin!(notified);
            // Registered before the check, so a `set` in between still wakes us.
            notified.as_mut().enable();
            if let Some(value) = self.value.get() {
                return value;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_test::{assert_pending, assert_ready_eq, task};

    #[test]
    fn the_first_value_wins_and_wakes_every_waiter() {
        let latch = Latch::new();
        let mut a = task::spawn(latch.wait());
        let mut b = task::spawn(latch.wait());
        assert_pending!(a.poll());
        assert_pending!(b.poll());
        assert!(latch.set("first"));
        assert!(!latch.set("second"));
        assert!(a.is_woken() && b.is_woken());
        assert_ready_eq!(a.poll(), &"first");
        assert_ready_eq!(b.poll(), &"first");
        // A waiter that comes later resolves at once.
        assert_ready_eq!(task::spawn(latch.wait()).poll(), &"first");
    }
}
