//! [`ShutdownNotice`]: how handlers and jobs see the stop coming (read-only).

use std::sync::Arc;

use super::tracker::Tracker;
use crate::base::report::Trigger;

/// Tells a handler that the server is draining, so it can say goodbye properly.
///
/// Every request that asks for an upgrade (an `Upgrade` header, or `CONNECT`) carries one in
/// its extensions, so a WebSocket handler can send a close frame (`1001 Going Away`) when the
/// drain starts instead of being cut at the deadline. Any code can get one from
/// [`Handle::notice`](crate::Handle::notice).
///
/// ```
/// # async fn doc(req: http::Request<()>) {
/// if let Some(notice) = req.extensions().get::<grace_http::ShutdownNotice>() {
///     notice.wait().await; // say goodbye to the client here
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct ShutdownNotice {
    pub(crate) tracker: Arc<Tracker>,
    /// Places this notice in the goodbye spread (a connection's id).
    pub(crate) seed: u64,
}

impl std::fmt::Debug for ShutdownNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownNotice")
            .field("draining", &self.is_draining())
            .field("seed", &self.seed)
            .finish()
    }
}

impl ShutdownNotice {
    /// True once the drain has started.
    pub fn is_draining(&self) -> bool {
        self.tracker.is_draining()
    }

    /// Resolves when the drain starts (at once if it has) — or, with a goodbye spread
    /// ([`DrainPolicy::goodbye_spread`](crate::DrainPolicy::goodbye_spread)), at this notice's place
    /// in the spread after that, so long-lived connections do not all say goodbye (and
    /// reconnect) at the same instant.
    pub async fn wait(&self) {
        self.tracker.draining.wait().await;
        let delay = self.spread_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    /// This notice's delay within the spread window: the fractional part of the seed times
    /// the golden ratio, so successive connections fill the window evenly.
    fn spread_delay(&self) -> std::time::Duration {
        let window = self.tracker.goodbye_spread();
        if window.is_zero() {
            return window;
        }
        let frac =
            (self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
        window.mul_f64(frac)
    }

    /// Why the server is draining, once it is: a [`Trigger::Restart`] means a new
    /// generation serves already (a client should come back: WebSocket close code 1012,
    /// "service restart"); anything else means the service is going away (1001).
    pub fn reason(&self) -> Option<Trigger> {
        self.tracker.drain_asked.get().cloned()
    }

    /// True when the drain hands over to a new generation (see [`reason`](Self::reason)).
    pub fn is_restart(&self) -> bool {
        self.reason() == Some(Trigger::Restart)
    }
}
