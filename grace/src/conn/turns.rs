//! [`Turns`]: the order in which an upgrade's hand-over takes upgraded connections, a few at
//! a time. A connection on its way is read by neither process, so its messages wait; taking
//! them [`IN_FLIGHT`] at a time (in order) keeps that pause to one turn's hand-over rather
//! than all of them, while the others are served by the old process meanwhile.

use std::collections::VecDeque;

/// How many may be on their way at once: granted and not sent yet, or sent and not yet
/// acknowledged by the new generation. Measured (`ws-bench --mode latency`,
/// docs/benchmarks.md): 16 gave a lower echo p99 through upgrades than 64 (and 64 than all
/// at once), for about the same total hand-over time.
pub(crate) const IN_FLIGHT: usize = 16;

/// The turns of one hand-over: those waiting, in order, and those granted and not sent yet.
pub(crate) struct Turns<T> {
    waiting: VecDeque<T>,
    granted: Vec<T>,
}

impl<T> Default for Turns<T> {
    fn default() -> Self {
        Turns {
            waiting: VecDeque::new(),
            granted: Vec::new(),
        }
    }
}

impl<T: Clone> Turns<T> {
    /// Waits for its turn, after the others.
    pub(crate) fn push(&mut self, t: T) {
        self.waiting.push_back(t);
    }

    /// Gives the next waiting ones still `wanted` their turn, keeping at most `limit` on
    /// their way: those granted and still wanted, plus `sent` (sent, not acknowledged).
    /// Returns those newly granted. O(`limit`) per call, save for entries no longer wanted.
    pub(crate) fn grant(
        &mut self,
        sent: usize,
        limit: usize,
        wanted: impl Fn(&T) -> bool,
    ) -> Vec<T> {
        self.granted.retain(&wanted);
        let mut in_flight = self.granted.len() + sent;
        let mut new = Vec::new();
        while in_flight < limit {
            let Some(next) = self.waiting.pop_front() else {
                break;
            };
            if wanted(&next) {
                self.granted.push(next.clone());
                new.push(next);
                in_flight += 1;
            }
        }
        new
    }

    /// Whether one is still granted, or waits and is wanted.
    pub(crate) fn left(&self, wanted: impl Fn(&T) -> bool) -> bool {
        !self.granted.is_empty() || self.waiting.iter().any(wanted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashSet;

    #[test]
    fn turns_come_in_order_a_few_at_a_time_and_skip_what_is_gone() {
        let mut turns = Turns::default();
        (0..40u32).for_each(|i| turns.push(i));
        let gone = RefCell::new(HashSet::new());
        let wanted = |i: &u32| !gone.borrow().contains(i);
        assert_eq!(turns.grant(0, 16, wanted), (0..16).collect::<Vec<_>>());
        // Nothing moved yet: no more turns.
        assert!(turns.grant(0, 16, wanted).is_empty());
        // 5 moved, 3 of them not acknowledged yet; 16 declined (gone) and 17 closed.
        gone.borrow_mut().extend([0, 1, 2, 3, 4, 16, 17]);
        assert_eq!(turns.grant(3, 16, wanted), vec![18, 19]);
        // The 3 acknowledged: room for 3 more.
        assert_eq!(turns.grant(0, 16, wanted), vec![20, 21, 22]);
        assert!(turns.left(wanted));
        // All gone: nothing left, nothing granted.
        gone.borrow_mut().extend(0..40);
        assert!(turns.grant(0, 16, wanted).is_empty());
        assert!(!turns.left(wanted));
    }
}
