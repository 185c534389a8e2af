//! The one loop that owns an upgrade's hand-over: from the new generation's readiness until
//! every connection sent is acknowledged, or taken back if the new generation goes first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::outbox::Outbox;
use crate::base::describe_exit;
use crate::error::RestartError;
use crate::shutdown::Shared;

/// How long the old generation waits, once the hand-over window has ended, for the new one
/// to acknowledge the connections already sent (it reads them as fast as it can: this
/// bounds only a new generation that hangs).
const ACK_WAIT: Duration = Duration::from_secs(2);

/// How often the hand-over looks whether a connection is left to hand over (a scan of the
/// connections' states: there is no event for "none left between requests"), and gives
/// upgraded connections their turn; acknowledgements also wake it.
const HAND_OVER_CHECK: Duration = Duration::from_millis(2);

/// How the new generation went during a hand-over: it exited, or it hung up the channel.
enum Went {
    Exited(std::io::Result<std::process::ExitStatus>),
    HungUp(std::io::Result<()>),
}

impl Went {
    /// What to say of it. A hang-up usually means it is exiting (the channel closes as the
    /// process dies, often before its exit is seen): its exit status, if it comes soon.
    async fn describe(self, child: &mut tokio::process::Child) -> String {
        let hung_up = match self {
            Went::Exited(Ok(status)) => return describe_exit(status),
            Went::Exited(Err(e)) => return format!("could not be watched ({e})"),
            Went::HungUp(r) => r,
        };
        match tokio::time::timeout(Duration::from_millis(200), child.wait()).await {
            Ok(Ok(status)) => describe_exit(status),
            _ => match hung_up {
                Ok(()) => "closed the hand-over channel".to_owned(),
                Err(e) => format!("broke the hand-over channel ({e})"),
            },
        }
    }
}

/// The hand-over: every HTTP/1 connection goes to the new generation at its next moment
/// between requests (this process accepts nothing meanwhile), until none is left or the
/// window ends, and every one sent is acknowledged. The one loop that watches the new
/// generation throughout: if it dies or hangs up first, [`take_back`] what it had not read
/// and the upgrade fails (this process keeps serving, no drain is asked for). A stop that
/// comes meanwhile ends the hand-over (what was acknowledged stays with the new
/// generation, which is then stopped too).
pub(crate) async fn hand_over(
    shared: &Arc<Shared>,
    outbox: Arc<Outbox>,
    child: &mut tokio::process::Child,
    pid: u32,
    stop_timeout: Duration,
) -> Result<(), RestartError> {
    let tracker = &shared.tracker;
    let started = Instant::now();
    let window_end = crate::base::budget::after(started, outbox.window().min(stop_timeout));
    shared.pause_accepting(true);
    // What the new generation resumes of upgraded connections (said before it was ready).
    outbox.read_kinds();
    tracker.start_hand_over(Arc::clone(&outbox));
    let acked = tokio::sync::Notify::new();
    let acks = outbox.acks(|upgraded| {
        tracker.stats.count_handed_over(upgraded);
        acked.notify_one();
    });
    tokio::pin!(acks);
    let sent = async {
        loop {
            // Upgraded connections get their turns here, a few at a time.
            let movables_left = tracker.grant_movables(&outbox);
            if !movables_left && !tracker.hand_over_left() && outbox.is_idle() {
                return;
            }
            let _ = tokio::time::timeout(HAND_OVER_CHECK, acked.notified()).await;
        }
    };
    let mut stopped = false;
    let mut went: Option<Went> = tokio::select! {
        biased;
        status = child.wait() => Some(Went::Exited(status)),
        r = &mut acks => Some(Went::HungUp(r)),
        _ = shared.drain_asked() => { stopped = true; None }
        _ = tokio::time::sleep_until(window_end.into()) => None,
        _ = sent => None,
    };
    // No more sends; those under way end (a connection not sent stays here, served anew).
    outbox.close();
    if went.is_none() {
        let settled = async {
            outbox.settled().await;
            outbox.acknowledged().await;
        };
        went = tokio::select! {
            biased;
            status = child.wait() => Some(Went::Exited(status)),
            r = &mut acks => Some(Went::HungUp(r)),
            _ = settled => None,
            _ = tokio::time::sleep(ACK_WAIT) => {
                tracing::warn!(unacknowledged = outbox.unacknowledged(), "the new process has not acknowledged every connection sent: left to it");
                None
            }
        };
    }
    let Some(went) = went else {
        tracker.end_hand_over(Some(started.elapsed()));
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "hand-over complete"
        );
        return Ok(());
    };
    let status = went.describe(child).await;
    take_back(shared, &outbox, child, pid, &status).await;
    match stopped {
        true => Err(RestartError::Stopped { pid }),
        false => Err(RestartError::HandOver { pid, status }),
    }
}

/// The new generation went during the hand-over. Makes sure it is gone (one that only hung
/// up is killed, with its group): nothing it received is served any more, so every
/// connection it did not read from is ours again, served here; accepting resumes.
async fn take_back(
    shared: &Shared,
    outbox: &Outbox,
    child: &mut tokio::process::Child,
    pid: u32,
    status: &str,
) {
    let tracker = &shared.tracker;
    if let Some(group) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    let reaped = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    outbox.settled().await;
    let taken = match reaped {
        Ok(Ok(_)) => outbox.take_back(),
        _ => {
            tracing::error!(
                pid,
                "the new process could not be reaped: its connections are left to it"
            );
            Default::default()
        }
    };
    let taken_back = taken.back.len();
    tracker.stats.uncount_handed_over(
        taken.were_acknowledged as u64,
        taken.were_acknowledged_upgraded as u64,
    );
    taken.back.into_iter().for_each(|h| tracker.serve_local(h));
    tracker.end_hand_over(None);
    shared.pause_accepting(false);
    tracing::error!(pid, %status, taken_back, lost = taken.lost, "the new process went during the hand-over: serving on");
}
