//! Shutting many sockets down at once, on more than one core.
//!
//! A `shutdown(2)` is kernel work: the FIN, its delivery (on loopback, the peer's receive
//! path runs on the same core) and the wake-ups of both ends. With 10,000 idle connections
//! that work is most of a drain, and it runs in parallel: on 2 cores, shutting them from
//! two threads instead of one took the drain from 148 to 119 ms (medians of 15 interleaved
//! rounds, `docs/benchmarks.md`). Below a few thousand sockets a thread is not worth
//! starting.

use std::num::NonZeroUsize;

/// Sockets per thread below which another thread is not started (starting one costs tens
/// of microseconds, a shutdown a few).
const PER_THREAD: usize = 2048;

/// At most this many threads work at once (the caller's included).
const MAX_THREADS: usize = 4;

/// How many threads can run at once here.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// Runs `f` over `items` split in contiguous chunks, one per thread, the calling thread
/// taking the first, and returns what each chunk gave, in order. Blocks until every chunk
/// is done. A chunk whose thread cannot be started runs on the calling thread; a panic in
/// `f` is carried to the caller.
pub(crate) fn across_threads<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&[T]) -> R + Sync,
) -> Vec<R> {
    let threads = if items.len() < 2 * PER_THREAD {
        1
    } else {
        cores().min(MAX_THREADS).min(items.len() / PER_THREAD)
    };
    if threads <= 1 {
        return vec![f(items)];
    }
    let mut chunks = items.chunks(items.len().div_ceil(threads));
    let first = chunks.next().unwrap_or_default();
    let f = &f;
    // The helpers run in the caller's runtime context, if any: `f` may call the user's
    // connection-state hook, which may use tokio.
    let runtime = tokio::runtime::Handle::try_current().ok();
    let runtime = &runtime;
    std::thread::scope(|scope| {
        let others: Vec<_> = chunks
            .map(|chunk| {
                let started = std::thread::Builder::new()
                    .name("grace-shutdown".into())
                    .spawn_scoped(scope, move || {
                        let _entered = runtime.as_ref().map(|r| r.enter());
                        f(chunk)
                    });
                (chunk, started)
            })
            .collect();
        let mut out = Vec::with_capacity(threads);
        out.push(f(first));
        for (chunk, started) in others {
            out.push(match started {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot start a shutdown thread; on this one");
                    f(chunk)
                }
            });
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    #[test]
    fn every_item_is_seen_once_in_order_of_chunks() {
        for n in [
            0,
            1,
            2 * PER_THREAD - 1,
            2 * PER_THREAD,
            10_000,
            4 * MAX_THREADS * PER_THREAD + 7,
        ] {
            let items: Vec<usize> = (0..n).collect();
            let threads = Mutex::new(HashSet::new());
            let sums = across_threads(&items, |chunk| {
                threads.lock().unwrap().insert(std::thread::current().id());
                chunk.to_vec()
            });
            let seen: Vec<usize> = sums.concat();
            assert_eq!(seen, items, "n = {n}");
            let used = threads.lock().unwrap().len();
            assert!(used <= MAX_THREADS, "n = {n}: {used} threads");
            if n < 2 * PER_THREAD {
                assert_eq!(used, 1, "n = {n}: a thread started for a few items");
            }
        }
    }

    #[test]
    fn a_large_set_is_split_when_there_are_cores() {
        let items = vec![0u8; 10_000];
        let threads = Mutex::new(HashSet::new());
        let parts = across_threads(&items, |chunk| {
            threads.lock().unwrap().insert(std::thread::current().id());
            chunk.len()
        });
        assert_eq!(parts.iter().sum::<usize>(), 10_000);
        assert_eq!(
            parts.len(),
            cores().clamp(1, MAX_THREADS).min(10_000 / PER_THREAD)
        );
        assert_eq!(threads.lock().unwrap().len(), parts.len());
    }

    #[test]
    fn the_helpers_run_in_the_callers_runtime() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        let items = vec![0u8; 4 * PER_THREAD];
        let in_runtime = across_threads(&items, |_| tokio::runtime::Handle::try_current().is_ok());
        assert!(in_runtime.iter().all(|&r| r), "{in_runtime:?}");
    }

    #[test]
    fn a_panic_reaches_the_caller() {
        let items = vec![0u8; 4 * PER_THREAD];
        let caught = std::panic::catch_unwind(|| {
            across_threads(&items, |chunk| {
                if std::ptr::eq(chunk.as_ptr(), items.as_ptr()) {
                    return;
                }
                panic!("in a helper thread");
            })
        });
        // With one core nothing runs on another thread, and the first chunk does not panic.
        assert_eq!(caught.is_err(), cores() > 1);
    }
}
