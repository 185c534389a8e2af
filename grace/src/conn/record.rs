//! [`Conn`]: one live connection's record (its state, its flags, the request it serves) and
//! the events that move it, as its socket wrapper, its request wrappers and the tracker's
//! sweeps report them.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use super::state::{Event, transition};
use super::tracker::Tracker;
use super::{ConnInfo, ConnState};
use crate::base::lock;
use crate::base::report::{ActiveRequest, ConnSnapshot};
use crate::sys::{BorrowedFd, SocketSlot};

/// Whether a connection can be handed to the next generation (see [`Conn::hand_over`]).
#[cfg(unix)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HandOver {
    Now,
    Later,
    Never,
}

/// What the report of a forced connection says of the request it was serving.
pub(super) struct RequestRecord {
    method: http::Method,
    target: Target,
    started: Instant,
}

/// The first bytes of a request's path and query (or, without one, as `CONNECT host:port`,
/// of its authority), copied inline: the record is in every connection's memory, and
/// copying a few bytes costs less than sharing hyper's buffer, whose first clone allocates.
struct Target {
    bytes: [u8; TARGET_MAX],
    len: u8,
    truncated: bool,
}

/// How much of a request's target the report keeps.
const TARGET_MAX: usize = 38;

impl Target {
    #[inline]
    pub(super) fn of(uri: &http::Uri) -> Target {
        let s = match uri.path_and_query() {
            Some(p) => p.as_str(),
            None => uri.authority().map_or("", |a| a.as_str()),
        };
        let n = s.len().min(TARGET_MAX);
        let mut bytes = [0; TARGET_MAX];
        bytes[..n].copy_from_slice(&s.as_bytes()[..n]);
        Target {
            bytes,
            len: n as u8,
            truncated: s.len() > TARGET_MAX,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A URI is ASCII: a cut never splits a character, and nothing is lossy.
        f.write_str(&String::from_utf8_lossy(
            &self.bytes[..usize::from(self.len)],
        ))?;
        if self.truncated {
            f.write_str("…")?;
        }
        Ok(())
    }
}

/// One live connection, shared by its socket wrapper, its request wrappers and the tracker.
pub(crate) struct Conn {
    pub(crate) info: ConnInfo,
    pub(super) state: AtomicU8,
    /// Requests (HTTP/1) or streams (HTTP/2) whose response is not fully written yet.
    pub(super) inflight: AtomicU32,
    pub(super) http2: AtomicBool,
    /// The request being served, when requests are recorded (`Tracker::records`).
    pub(super) request: Mutex<Option<RequestRecord>>,
    /// The tick of the tracker's coarse clock when the connection started waiting for a
    /// request head (accepted, or the first byte of the next HTTP/1 request); 0 when not
    /// waiting. See [`Tracker::tick`].
    pub(super) head_since: AtomicU32,
    /// The tick of the coarse clock when the connection last became `Idle` (see
    /// [`Tracker::tick`]).
    pub(super) idle_since: AtomicU32,
    /// HTTP/1: the response body ended; the connection becomes `Idle` at the next flush of
    /// the socket, once the response's last bytes are in the kernel's hands.
    pub(super) idle_on_flush: AtomicBool,
    /// An HTTP/1 connection closed while idle (by the drain or the idle timeout): the bytes of
    /// a request read after that are dropped, so no request is ever served on a connection
    /// whose socket is being shut (see [`Conn::close_if_idle`]).
    pub(super) closing: AtomicBool,
    /// HTTP/1: the request's body has not been read to its end (hyper is still reading
    /// it, or will drain it): not a moment to hand the connection over.
    pub(super) body_open: AtomicBool,
    /// The drain no longer waits for this connection: its socket was shut down by the
    /// drain or a force (its task may still be unwinding), or it unregistered.
    pub(super) released: AtomicBool,
    /// Its socket is being shut by the drain or a force: the end of stream its task then
    /// reads parks the task until the stop is over (see `Tracker::park`).
    pub(super) shut_by_drain: AtomicBool,
    /// The connection task's waker, woken when the drain starts (cheaper to poll on every
    /// wake-up than a channel).
    pub(super) drain_waker: atomic_waker::AtomicWaker,
    pub(crate) socket: SocketSlot,
    /// Closed by its own task at a drain, never shut from outside while idle: its stream
    /// says goodbye first (TLS `close_notify`, see `accept`).
    pub(super) closes_itself: AtomicBool,
    /// Through an acceptor: the socket has delivered bytes (a handshake under way), though
    /// the connection is `New` until the acceptor's stream delivers some. Never shed as
    /// silent (see [`Tracker::shed_for_new`]).
    pub(super) heard: AtomicBool,
    pub(super) left_new: Notify,
    pub(super) tracker: Arc<Tracker>,
}

impl Conn {
    #[inline]
    pub(crate) fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// A notice of the drain, for a handler that takes the connection over.
    pub(crate) fn notice(&self) -> super::notice::ShutdownNotice {
        self.tracker.notice(self.info.id)
    }

    pub(crate) fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Applies `event` (see [`transition`]): moves the state, the counts, and tells the hook.
    #[inline]
    pub(crate) fn apply(&self, event: Event) {
        let mut cur = self.state.load(Ordering::Acquire);
        let (from, to) = loop {
            let from = ConnState::from_u8(cur);
            let Some(to) = transition(from, event) else {
                return;
            };
            // SeqCst on success: the Idle → Active move pairs with `close_if_idle`.
            // Acquire on failure: the state read is re-examined, nothing else.
            match self.state.compare_exchange_weak(
                cur,
                to as u8,
                Ordering::SeqCst,
                Ordering::Acquire,
            ) {
                Ok(_) => break (from, to),
                Err(actual) => cur = actual,
            }
        };
        if to == ConnState::Idle {
            // Relaxed: read only by the clock's scan, where a tick's error is tolerated.
            self.idle_since.store(self.tracker.now(), Ordering::Relaxed);
        }
        self.tracker.moved(from, to, &self.info);
    }

    /// The socket delivered bytes. The first byte makes a `New` connection `Active`; on
    /// HTTP/1, the first byte of the next request makes an `Idle` connection `Active`.
    /// (HTTP/2 reads control frames while idle; its streams drive its state instead.)
    /// Returns false when the bytes must be dropped: they begin a request on an idle
    /// connection that is being closed.
    #[inline]
    pub(crate) fn on_read(&self, bytes: &[u8]) -> bool {
        match ConnState::from_u8(self.state.load(Ordering::Relaxed)) {
            ConnState::New => {
                self.apply(Event::Bytes);
                if bytes.starts_with(b"PRI ") {
                    // The HTTP/2 connection preface: no stream open yet. The header-read
                    // clock (started at accept) keeps running until the first request's
                    // HEADERS are complete: a preface alone, or HEADERS without
                    // END_HEADERS, must not hold the connection.
                    self.http2.store(true, Ordering::Relaxed);
                    self.apply(Event::Preface);
                }
                self.left_new.notify_one();
                // SeqCst, paired with `close_if_silent`: either it sees us `Active` and
                // keeps the socket, or we see `closing` and drop the bytes unread.
                if self.closing.load(Ordering::SeqCst) {
                    return false;
                }
            }
            ConnState::Idle if !self.http2.load(Ordering::Relaxed) => {
                self.head_since.store(self.tracker.now(), Ordering::Relaxed);
                self.apply(Event::Bytes);
                // SeqCst, paired with `close_if_idle`: either it sees us `Active` and keeps
                // the socket, or we see `closing` and drop the request unread.
                return !self.closing.load(Ordering::SeqCst);
            }
            // Already closed by the drain (`Tracker::closed_by_drain`): bytes that were in the
            // socket before it was shut are not a request to serve either.
            ConnState::Closed => return false,
            _ => {}
        }
        true
    }

    /// Whether the drain or a force is shutting this connection's socket (Acquire: pairs
    /// with the store made before the shutdown, so an end of stream it caused sees it).
    #[inline]
    pub(crate) fn shut_by_drain(&self) -> bool {
        self.shut_by_drain.load(Ordering::Acquire)
    }

    /// Shuts an idle HTTP/1 connection, unless a request has begun on it meanwhile. A
    /// request whose first bytes race with this is either served in full (we back off) or
    /// never read at all (its bytes are dropped, see `on_read`): never processed without
    /// a way to answer it.
    ///
    /// With `null` (an open `/dev/null`, see `Tracker::close_idle`) the socket is closed where
    /// it stands, not only shut down (see `SocketSlot::close_in_place`).
    pub(crate) fn close_if_idle(&self, null: Option<BorrowedFd<'_>>) -> bool {
        self.closing.store(true, Ordering::SeqCst);
        if ConnState::from_u8(self.state.load(Ordering::SeqCst)) == ConnState::Idle {
            return match null {
                Some(null) => self.socket.close_in_place(null),
                None => self.socket.shutdown(),
            };
        }
        self.closing.store(false, Ordering::SeqCst);
        false
    }

    /// Shuts a connection that has sent nothing (`New`, nothing read, nothing waiting in
    /// its socket), unless its first bytes arrive meanwhile: they are then dropped unread
    /// (see `on_read`), never served on a socket being shut.
    pub(super) fn close_if_silent(&self) -> bool {
        self.closing.store(true, Ordering::SeqCst);
        if ConnState::from_u8(self.state.load(Ordering::SeqCst)) == ConnState::New
            && !self.socket.has_unread()
        {
            return self.socket.shutdown();
        }
        self.closing.store(false, Ordering::SeqCst);
        false
    }

    /// The socket delivered bytes to the acceptor (see `heard`).
    #[inline]
    pub(crate) fn heard(&self) {
        // Relaxed: a hint for shedding only. Read first: one write per connection, not
        // one per read.
        if !self.heard.load(Ordering::Relaxed) {
            self.heard.store(true, Ordering::Relaxed);
        }
    }

    /// Resolves once the connection has left `New` (at once if it already has).
    pub(crate) async fn left_new(&self) {
        if self.state() != ConnState::New {
            return;
        }
        self.left_new.notified().await;
    }

    /// A request (or stream) began. With `recorded_at` (see `Tracker::records`), its
    /// method and URI are kept, with that start time, for the report of a forced connection
    /// and for snapshots.
    #[inline(always)]
    pub(crate) fn request_started<B: http_body::Body>(
        &self,
        req: &http::Request<B>,
        recorded_at: Option<Instant>,
    ) {
        self.head_since.store(0, Ordering::Relaxed);
        // Release, paired with `hand_over`: set before the request is in flight.
        self.body_open
            .store(!req.body().is_end_stream(), Ordering::Release);
        self.inflight.fetch_add(1, Ordering::AcqRel);
        if req.version() == http::Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        if let Some(started) = recorded_at {
            let target = Target::of(req.uri());
            *lock(&self.request) = Some(RequestRecord {
                method: req.method().clone(),
                target,
                started,
            });
        }
        self.apply(Event::RequestStarted);
    }

    #[inline]
    pub(crate) fn request_finished(&self) {
        self.tracker.stats.completed.fetch_add(1, Ordering::Relaxed);
        if self.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            if self.tracker.records() {
                *lock(&self.request) = None;
            }
            if self.http2.load(Ordering::Relaxed) {
                self.apply(Event::ResponseDone);
                // A draining HTTP/2 connection may be waiting to close once idle.
                if self.tracker.is_draining() {
                    self.drain_waker.wake();
                }
            } else {
                self.idle_on_flush.store(true, Ordering::Release);
            }
        }
    }

    /// Whether this connection's task has the drain to act on: the tracker is draining, or
    /// the drain has closed this connection already (before waking the others), or an
    /// upgrade hands connections over.
    #[inline]
    pub(super) fn drain_reached(&self) -> bool {
        self.drain_started() || self.tracker.is_handing_over()
    }

    /// The drain itself (not a hand-over) has reached this connection.
    #[inline]
    pub(crate) fn drain_started(&self) -> bool {
        self.tracker.is_draining() || self.shut_by_drain()
    }

    /// Ready once the drain has started, or the hand-over this connection was woken for
    /// and is not part of has ended: no hand-over under way, or every connection woken
    /// again since `seen` (see [`Tracker::wake_count`]; the next hand-over may have started
    /// already).
    pub(crate) fn poll_hand_over_ended(
        &self,
        cx: &mut std::task::Context<'_>,
        seen: u64,
    ) -> std::task::Poll<()> {
        self.poll_until(cx, || {
            self.drain_started()
                || !self.tracker.is_handing_over()
                || self.tracker.wake_count() != seen
        })
    }

    /// Ready once the tracker is draining, or the drain has closed this connection already
    /// (before waking the others); otherwise registers the task to be woken by
    /// [`Tracker::start_draining`].
    #[inline]
    pub(crate) fn poll_draining(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.poll_until(cx, || self.drain_reached())
    }

    /// Ready once the drain itself has started (a hand-over does not count).
    pub(crate) fn poll_drain_started(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.poll_until(cx, || self.drain_started())
    }

    /// [`poll_draining`](Self::poll_draining) for a task that polls it on every wake-up:
    /// `registered` remembers the waker last registered, which is not registered again
    /// while no wake-up of every connection happened since (see [`Tracker::wake_all`]: the
    /// end of a hand-over wakes, and so empties, the drain wakers of connections that then
    /// have nothing to do).
    #[inline]
    pub(crate) fn poll_draining_cached(
        &self,
        cx: &mut std::task::Context<'_>,
        registered: &mut Option<(std::task::Waker, u64)>,
    ) -> std::task::Poll<()> {
        if self.drain_reached() {
            return std::task::Poll::Ready(());
        }
        // Read before registering: a wake-up of all that takes the waker registered below
        // counts itself after it wakes, so the next poll sees a new count and registers
        // again.
        let wakes = self.tracker.wake_count();
        if registered
            .as_ref()
            .is_some_and(|(w, n)| *n == wakes && w.will_wake(cx.waker()))
        {
            return std::task::Poll::Pending;
        }
        *registered = Some((cx.waker().clone(), wakes));
        self.poll_draining(cx)
    }

    /// Ready once the connection is `Idle` (an HTTP/2 connection with no open stream, during
    /// a drain: see `Conn::request_finished`).
    pub(crate) fn poll_idle(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.poll_until(cx, || self.state() == ConnState::Idle)
    }

    #[inline]
    pub(super) fn poll_until(
        &self,
        cx: &mut std::task::Context<'_>,
        done: impl Fn() -> bool,
    ) -> std::task::Poll<()> {
        if done() {
            return std::task::Poll::Ready(());
        }
        self.drain_waker.register(cx.waker());
        // Checked again: the event may have come (and woken no one) in between.
        if done() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// The request's body was read to its end (see `body_open`).
    pub(crate) fn body_ended(&self) {
        // Release: the body may be read on another task than the connection's.
        self.body_open.store(false, Ordering::Release);
    }

    /// Whether the connection can go to the next generation as it is, now. Meaningful only
    /// from the connection's own task, with hyper not being polled (nothing moves then).
    ///
    /// - `Now`: between requests — no request in flight, the last response fully written,
    ///   its request body read to the end, nothing of the next request parsed (at most part
    ///   of its head read, which goes along).
    /// - `Later`: a request is being served, or its response written.
    /// - `Never`: HTTP/2, TLS (whose session could not travel), upgraded, closed, or idle
    ///   with its last request's body left unread (hyper drains it or closes).
    #[cfg(unix)]
    pub(crate) fn hand_over(&self) -> HandOver {
        if self.http2.load(Ordering::Relaxed) || self.closes_itself.load(Ordering::Relaxed) {
            return HandOver::Never;
        }
        let busy = self.inflight.load(Ordering::Acquire) != 0;
        let body_open = self.body_open.load(Ordering::Acquire);
        match self.state() {
            ConnState::Hijacked | ConnState::Closed => HandOver::Never,
            _ if busy => HandOver::Later,
            // Answered, its body left unread: what hyper reads now is that body, not a head.
            _ if body_open => HandOver::Never,
            ConnState::New | ConnState::Idle => HandOver::Now,
            // A head arriving: its bytes go along.
            ConnState::Active if self.head_pending() => HandOver::Now,
            // Answered, the response not flushed yet.
            ConnState::Active => HandOver::Later,
        }
    }

    /// Waiting for a request head to complete (see `head_since`).
    pub(crate) fn head_pending(&self) -> bool {
        self.head_since.load(Ordering::Relaxed) != 0
    }

    pub(crate) fn is_http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }

    /// Its task closes it at a drain, not `Tracker::close_idle` (see `closes_itself`).
    pub(crate) fn set_closes_itself(&self) {
        self.closes_itself.store(true, Ordering::Relaxed);
    }

    /// Shuts the socket down now and stops the drain from waiting for it.
    pub(crate) fn close_now(&self) {
        self.socket.shutdown();
        self.release();
    }

    /// The socket was flushed: a finished HTTP/1 response is now fully written.
    #[inline]
    pub(crate) fn on_flush(&self) {
        if self.idle_on_flush.load(Ordering::Relaxed)
            && self.idle_on_flush.swap(false, Ordering::AcqRel)
            && self.inflight.load(Ordering::Acquire) == 0
        {
            self.apply(Event::ResponseDone);
        }
    }

    /// Takes the connection out of what the drain waits for (once).
    pub(super) fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            // Relaxed: a count read for the report, after the drain's wait.
            self.tracker.stats.ended.fetch_add(1, Ordering::Relaxed);
            self.tracker.awaited.sub();
        }
    }

    /// What the connection is doing at `now` (for a snapshot, or the report of a force).
    pub(super) fn snapshot(&self, now: Instant) -> ConnSnapshot {
        let request = lock(&self.request).as_ref().map(|r| ActiveRequest {
            method: r.method.to_string(),
            path: r.target.to_string(),
            age: now.saturating_duration_since(r.started),
        });
        ConnSnapshot {
            id: self.info.id,
            peer: self.info.peer.clone(),
            state: self.state(),
            age: now.saturating_duration_since(self.info.accepted_at),
            request,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_target_is_kept_whole_or_cut_with_a_mark() {
        let show = |uri: &str| Target::of(&uri.parse::<http::Uri>().unwrap()).to_string();
        assert_eq!(show("/sleep/3000?x=1"), "/sleep/3000?x=1");
        let exact = format!("/{}", "a".repeat(TARGET_MAX - 1));
        assert_eq!(show(&exact), exact);
        let long = format!("/{}", "b".repeat(100));
        assert_eq!(show(&long), format!("{}…", &long[..TARGET_MAX]));
        // CONNECT host:port has no path: its authority is shown.
        assert_eq!(show("example.com:443"), "example.com:443");
    }
}
