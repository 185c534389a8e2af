//! The time a stop may take, as users of Go's `Shutdown(ctx)`, axum-server and actix expect
//! it: the shutdown timeout is the time in-flight work gets, all of it; resources close
//! afterwards, each within its own timeout. Only an overall stop deadline (for orchestrators
//! that kill at a fixed time) holds time back for the resources. Pure arithmetic, so it is
//! tested on its own; every sum saturates (an absurd timeout means "no deadline").

use std::time::{Duration, Instant};

use super::report::ForceReason;

/// `t + d`, or a time thirty years on when `d` is too large to add (a timeout of
/// `u64::MAX` seconds means "no deadline", never a panic).
pub(crate) fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or_else(|| far_future(t))
}

/// Thirty years after `t`: later than any process lives, early enough to add to any clock.
pub(crate) fn far_future(t: Instant) -> Instant {
    t + Duration::from_secs(30 * 365 * 86_400)
}

/// The budget of one server's stops (see `DrainPolicy::shutdown_timeout`, `DrainPolicy::stop_deadline`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Budget {
    pub(crate) shutdown_timeout: Duration,
    pub(crate) stop_deadline: Option<Duration>,
    pub(crate) pre_stop_delay: Duration,
}

impl Budget {
    /// The last moment the overall stop deadline leaves in-flight work, once the
    /// resources' declared close time (`resources`) is held back for them.
    fn work_stop_by(&self, asked: Instant, resources: Duration) -> Option<Instant> {
        let stop_by = after(asked, self.stop_deadline?);
        Some(stop_by.checked_sub(resources).unwrap_or(asked).max(asked))
    }

    /// When the pre-stop delay ends: after the delay, or earlier if the stop deadline needs
    /// the time for the work and the resources.
    pub(crate) fn pre_stop_end(&self, asked: Instant, resources: Duration) -> Instant {
        let end = after(asked, self.pre_stop_delay);
        self.work_stop_by(asked, resources)
            .map_or(end, |w| end.min(w))
    }

    /// The last moment in-flight work (connections, then jobs) may run, counted from when
    /// the listeners `closed`, and which budget sets it.
    pub(crate) fn work_deadline(
        &self,
        asked: Instant,
        closed: Instant,
        resources: Duration,
    ) -> (Instant, ForceReason) {
        let timeout = after(closed, self.shutdown_timeout);
        match self.work_stop_by(asked, resources) {
            Some(stop_by) if stop_by < timeout => (stop_by, ForceReason::StopDeadline),
            _ => (timeout, ForceReason::Deadline),
        }
    }

    /// The moment every resource must be closed by, if there is one.
    pub(crate) fn resources_deadline(&self, asked: Instant) -> Option<Instant> {
        self.stop_deadline.map(|d| after(asked, d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn budget(timeout: u64, stop: Option<u64>, pre_stop: u64) -> Budget {
        Budget {
            shutdown_timeout: S(timeout),
            stop_deadline: stop.map(S),
            pre_stop_delay: S(pre_stop),
        }
    }

    #[test]
    fn in_flight_work_gets_the_whole_timeout_whatever_the_resources() {
        let t = Instant::now();
        let closed = t + S(1);
        let b = budget(30, None, 1);
        assert_eq!(
            b.work_deadline(t, closed, S(25)),
            (closed + S(30), ForceReason::Deadline)
        );
        assert_eq!(b.resources_deadline(t), None);
        assert_eq!(b.pre_stop_end(t, S(25)), t + S(1));
    }

    #[test]
    fn a_stop_deadline_holds_back_what_the_resources_declared() {
        let t = Instant::now();
        // 30 s in all (Kubernetes' grace period), 5 s pre-stop, 10 s of resources.
        let b = budget(60, Some(30), 5);
        let closed = b.pre_stop_end(t, S(10));
        assert_eq!(closed, t + S(5));
        assert_eq!(
            b.work_deadline(t, closed, S(10)),
            (t + S(20), ForceReason::StopDeadline)
        );
        assert_eq!(b.resources_deadline(t), Some(t + S(30)));
        // When the timeout comes first, it is the timeout that cuts.
        let b = budget(10, Some(30), 5);
        assert_eq!(
            b.work_deadline(t, closed, S(10)),
            (closed + S(10), ForceReason::Deadline)
        );
    }

    #[test]
    fn a_stop_deadline_shorter_than_the_resources_cuts_the_work_at_once() {
        let t = Instant::now();
        let b = budget(30, Some(2), 10);
        assert_eq!(b.pre_stop_end(t, S(5)), t, "no pre-stop delay left");
        assert_eq!(b.work_deadline(t, t, S(5)), (t, ForceReason::StopDeadline));
    }

    #[test]
    fn absurd_values_saturate_instead_of_panicking() {
        let t = Instant::now();
        let b = Budget {
            shutdown_timeout: Duration::MAX,
            stop_deadline: Some(Duration::MAX),
            pre_stop_delay: Duration::MAX,
        };
        let (work, _) = b.work_deadline(t, t, Duration::MAX);
        assert!(work >= t);
        assert!(b.pre_stop_end(t, Duration::ZERO) > t + S(365 * 86_400));
        assert!(b.resources_deadline(t).unwrap() > t);
    }
}
