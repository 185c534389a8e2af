//! The coarse clock behind the header-read and idle timeouts: one thread per server, not a
//! timer per request or connection.
//!
//! A thread rather than a task on the runtime's timer: a timer in tokio's wheel makes every
//! park of every worker compute the next deadline; this thread sleeps in the kernel between
//! ticks and costs the runtime nothing (measured in `docs/benchmarks.md`).

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use super::tracker::Tracker;

/// Ticks of the clock per shortest timeout: a timeout cuts between one and `1 + 1/TICKS`
/// timeouts late.
const TICKS: u32 = 4;

/// The running clock; its thread ends when this is dropped.
pub(crate) struct Clock {
    // Dropping the sender wakes the thread at once (its wait ends disconnected).
    _stop: mpsc::Sender<()>,
}

/// Starts the clock, if any timeout is set: it ticks four times per shortest timeout and cuts
/// connections past either (see `Tracker::tick`). Its logs go where the caller's do.
pub(crate) fn start(
    tracker: &Arc<Tracker>,
    header_read: Option<Duration>,
    idle: Option<Duration>,
) -> std::io::Result<Option<Clock>> {
    let Some(shortest) = header_read.into_iter().chain(idle).min() else {
        return Ok(None);
    };
    let period = (shortest / TICKS).max(Duration::from_millis(1));
    let (head, idle) = (
        header_read.map(|t| ticks(t, period)),
        idle.map(|t| ticks(t, period)),
    );
    let tracker = Arc::clone(tracker);
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("grace-clock".into())
        .spawn(move || {
            tracing::dispatcher::with_default(&dispatch, || {
                // A tick is `period` after the last one ended (a late tick delays the next
                // rather than bunching up).
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
                    tracker.tick(head, idle);
                }
            })
        })?;
    Ok(Some(Clock { _stop: stop }))
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

    /// The clock ticks on its own thread (an idle connection past the idle timeout is shut),
    /// and the thread ends once the clock is dropped.
    #[test]
    fn the_clock_ticks_on_its_thread_and_stops_when_dropped() {
        use std::io::Read;
        use std::time::Instant;
        let tracker = Arc::new(Tracker::default());
        let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let conn = tracker.register(crate::conn::Addr::Unix(None), &ours);
        conn.on_read(b"GET / HTTP/1.1\r\n\r\n");
        conn.apply(crate::conn::state::Event::ResponseDone);
        let clock = start(&tracker, None, Some(Duration::from_millis(20)))
            .unwrap()
            .expect("a timeout is set");
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(
            peer.read(&mut [0; 1]).unwrap(),
            0,
            "the idle connection was shut"
        );
        tracker.unregister(&conn);
        drop(conn);
        drop(clock);
        // The thread holds the tracker until it ends; then ours is the only reference.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&tracker) > 1 {
            assert!(
                Instant::now() < deadline,
                "the clock's thread outlived the clock"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn timeouts_in_ticks_round_up_and_saturate() {
        let ms = Duration::from_millis;
        assert_eq!(ticks(ms(10_000), ms(2_500)), 4);
        assert_eq!(ticks(ms(75_000), ms(2_500)), 30);
        assert_eq!(ticks(ms(1_001), ms(250)), 5);
        assert_eq!(ticks(Duration::MAX, ms(1)), u32::MAX / 4);
    }
}
