//! The coarse clock behind the header-read and idle timeouts: one timer per server, not one
//! per request or connection.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::tracker::Tracker;

/// Ticks of the clock per shortest timeout: a timeout cuts between one and `1 + 1/TICKS`
/// timeouts late.
const TICKS: u32 = 4;

/// The clock's task, if any timeout is set: it ticks four times per shortest timeout and
/// cuts connections past either (see `Tracker::tick`).
pub(crate) fn run(
    tracker: &Arc<Tracker>,
    header_read: Option<Duration>,
    idle: Option<Duration>,
) -> Option<impl Future<Output = ()> + use<>> {
    let period = (header_read.into_iter().chain(idle).min()? / TICKS).max(Duration::from_millis(1));
    let (head, idle) = (
        header_read.map(|t| ticks(t, period)),
        idle.map(|t| ticks(t, period)),
    );
    let tracker = Arc::clone(tracker);
    Some(async move {
        let mut every = tokio::time::interval(period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            tracker.tick(head, idle);
        }
    })
}

/// `timeout` in ticks of `period`, rounded up; saturating for absurdly long timeouts (the
/// tracker's clock wraps at `u32`, so a quarter of it is "never").
fn ticks(timeout: Duration, period: Duration) -> u32 {
    let n = timeout.as_nanos().div_ceil(period.as_nanos().max(1));
    u32::try_from(n).unwrap_or(u32::MAX / 4).min(u32::MAX / 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_in_ticks_round_up_and_saturate() {
        let ms = Duration::from_millis;
        assert_eq!(ticks(ms(10_000), ms(2_500)), 4);
        assert_eq!(ticks(ms(75_000), ms(2_500)), 30);
        assert_eq!(ticks(ms(1_001), ms(250)), 5);
        assert_eq!(ticks(Duration::MAX, ms(1)), u32::MAX / 4);
    }
}
