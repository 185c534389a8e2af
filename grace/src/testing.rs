//! Helpers for the crate's unit tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use tokio::runtime::Runtime;

/// The worker of a [`one_busy_worker`] runtime, blocked until released.
pub(crate) struct BusyWorker {
    release: mpsc::Sender<()>,
    waited_out: Arc<AtomicBool>,
}

impl BusyWorker {
    /// Releases the worker; true if it had already waited out its 10 s by then (whatever
    /// ran meanwhile waited for it).
    pub(crate) fn release(self) -> bool {
        let _ = self.release.send(());
        self.waited_out.load(Ordering::SeqCst)
    }
}

/// A runtime with one worker thread, and that worker blocked by a task (as when thousands of
/// connection tasks were woken at once): what is spawned now waits for it, what the
/// `block_on` caller drives does not.
pub(crate) fn one_busy_worker() -> (Runtime, BusyWorker) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (busy_tx, busy) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let waited_out = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&waited_out);
    rt.spawn(async move {
        busy_tx.send(()).unwrap();
        if released.recv_timeout(Duration::from_secs(10)).is_err() {
            flag.store(true, Ordering::SeqCst);
        }
    });
    busy.recv().unwrap();
    (
        rt,
        BusyWorker {
            release,
            waited_out,
        },
    )
}
