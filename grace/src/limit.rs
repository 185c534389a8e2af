//! A place under [`Limits::max_connections`](crate::Limits::max_connections), made when
//! there is none: at the limit, a client waiting in the accept queue gets the place of the
//! connection idle longest, or of connections that have sent nothing within their
//! first-byte grace (see [`Tracker::shed_for_new`]); a connection with a request in flight
//! keeps its place.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::conn::tracker::Tracker;
use crate::sys::AsRawFd;

/// How often the accept loop looks at its accept queue while no place is free (a
/// connection that closes by itself frees one at once, without waiting for this).
const CHECK_EVERY: Duration = Duration::from_millis(50);

/// The least time between two sheds that found a silent connection not yet past its grace
/// (a wake-up for each one's deadline would be a busy loop when many are about to pass).
const MIN_WAIT: Duration = Duration::from_millis(5);

/// Waits for a place under `limit`, making one when a client waits in `listener`'s accept
/// queue (see the module docs). `None` if the semaphore was closed. Never busy: between
/// two looks it waits for a place, at most [`CHECK_EVERY`].
pub(crate) async fn place(
    limit: &Arc<Semaphore>,
    listener: &impl AsRawFd,
    tracker: &Tracker,
    grace: Duration,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = Arc::clone(limit).try_acquire_owned() {
        return Some(permit);
    }
    let mut wait = CHECK_EVERY;
    loop {
        match tokio::time::timeout(wait, Arc::clone(limit).acquire_owned()).await {
            Ok(permit) => return permit.ok(),
            Err(_elapsed) => {}
        }
        wait = CHECK_EVERY;
        if !crate::sys::has_pending_connection(listener) {
            continue;
        }
        let shed = tracker.shed_for_new(grace);
        if shed.closed > 0 {
            tracing::debug!(
                closed = shed.closed,
                "max_connections: closed connections to make room for a waiting client"
            );
        } else if let Some(next) = shed.next {
            // Nothing to close yet: look again once the next silent one passes its grace.
            wait = next.clamp(MIN_WAIT, CHECK_EVERY);
        }
    }
}
