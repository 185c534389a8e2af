//! The leaves of the crate: primitives and plain types that import nothing else of it.
//!
//! - `latch`: a fact that becomes true once, awaited without polling.
//! - `count`: how many of something are under way, and the event of none left.
//! - `budget`: the time a stop may take (pure arithmetic).
//! - `conn`: what a connection is, as users see it (state, address, counts).
//! - `report`: what started a stop, why it forced, and the report it ends with.

pub(crate) mod budget;
pub(crate) mod conn;
pub(crate) mod count;
pub(crate) mod latch;
pub(crate) mod report;

/// Locks `m`, whatever a panicking holder left: every value behind these mutexes stays
/// consistent across a panic (single assignments and collections of whole entries).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a child process ended, in words.
#[cfg(unix)]
pub(crate) fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended ({status})"),
    }
}
