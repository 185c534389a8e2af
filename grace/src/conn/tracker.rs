//! The tracker: the registry of every live connection (one owner), with its counters and
//! settings. Connections register when accepted and unregister when their socket closes.
//! State changes go through [`Conn::apply`], which moves the counts and calls the user's
//! hook. Waiting for the tracker to empty is an event ([`Tracker::wait_empty`]), never a
//! poll. The connection record is `record`, the counters `stats`, the sweeps over all
//! connections `sweep`, an upgrade's hand-over state `handing`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::handing::HandOverMark;
#[cfg(unix)]
use super::handing::LocalServe;
use super::record::Conn;
use super::state::Event;
use super::stats::Stats;
use super::sweep::Parked;
use super::{Addr, ConnInfo, ConnState};
use crate::base::count::Count;
use crate::base::latch::Latch;
use crate::base::lock;
use crate::base::report::{ConnSnapshot, Trigger};
use crate::sys::{AsRawFd, SocketSlot};

/// The user's observer of state changes.
pub(crate) type Hook = Box<dyn Fn(&ConnInfo, ConnState) + Send + Sync + 'static>;

/// Shards of the registry: connections closing at once on several threads rarely meet.
const SHARDS: usize = 16;

/// What a server sets once, as serving starts: the user's state hook, the window of the
/// goodbye spread, and whether each connection's request is recorded.
#[derive(Default)]
pub(crate) struct Settings {
    pub(crate) hook: Option<Hook>,
    pub(crate) goodbye_spread: Duration,
    pub(crate) records: bool,
}

/// Every live connection of a server: the registry (sharded by id), its counters
/// ([`Stats`]), the drain's facts as connections see them, and the hand-over state
/// (`handing`). The sweeps over all connections are in `sweep`.
#[derive(Default)]
pub(crate) struct Tracker {
    pub(super) shards: [Mutex<HashMap<u64, Arc<Conn>>>; SHARDS],
    /// Live connections the drain still waits for (see `Conn::released`).
    pub(super) awaited: Count,
    pub(crate) stats: Stats,
    /// Set once, when serving starts (see [`Tracker::configure`]); read on every state
    /// change (the hook) and request (whether it is recorded).
    settings: OnceLock<Settings>,
    /// A coarse clock for the header-read and idle timeouts, advanced by [`Tracker::tick`].
    pub(super) tick: AtomicU32,
    /// Wake-ups of every connection's task so far (see `Conn::poll_draining_cached`).
    wakes: AtomicU64,
    /// The drain started: responses carry `Connection: close` from then on, and every
    /// connection task is woken. (A latch reads with Acquire: a task that sees it set sees
    /// what the drain did before, the listeners closed.)
    pub(crate) draining: Latch<()>,
    /// A drain was asked for, and by what: the one latch of that fact, shared with the
    /// server (`Shared::drain`), read here for the notices handlers get and for the soft
    /// drain of the pre-stop delay.
    pub(crate) drain_asked: Arc<Latch<Trigger>>,
    /// The tasks of connections the drain shut, waiting for the stop to be over.
    pub(super) parked: Mutex<Parked>,
    /// The previous generation has handed over all it will (set at once when it hands
    /// nothing: see `server::accepting`).
    pub(crate) previous_done: Latch<()>,
    /// The channel to the next generation, while an upgrade hands connections over (see
    /// `handover::upgrade`); replaced at each upgrade.
    #[cfg(unix)]
    pub(super) outbox: Mutex<Option<Arc<crate::handover::outbox::Outbox>>>,
    /// An upgrade is handing connections over: every HTTP/1 connection goes at its next
    /// moment between requests. Reversible (a new generation that dies ends it).
    pub(super) handing: AtomicBool,
    /// The last hand-over, for the report of the drain that follows.
    pub(super) hand_over_mark: Mutex<HandOverMark>,
    /// Notified when a hand-over ends (see `Tracker::hand_over_ended`).
    pub(super) hand_over_end: Notify,
    /// Serves a connection taken back from an interrupted hand-over in this process (set
    /// once, when serving starts).
    #[cfg(unix)]
    pub(crate) local: OnceLock<LocalServe>,
    /// The upgraded connections whose handlers opted in to move (see `movable`), by id.
    #[cfg(unix)]
    pub(super) movables: Mutex<HashMap<u64, Arc<super::movable::Shared>>>,
    /// The turns of the upgraded connections in the hand-over under way. Locked after
    /// `movables`, never before.
    #[cfg(unix)]
    pub(super) turns: Mutex<super::turns::Turns<Arc<super::movable::Shared>>>,
}

impl Tracker {
    /// A notice of the drain, placed in the goodbye spread by `seed`.
    pub(crate) fn notice(self: &Arc<Self>, seed: u64) -> super::notice::ShutdownNotice {
        super::notice::ShutdownNotice {
            tracker: Arc::clone(self),
            seed,
        }
    }

    /// Set once, as serving starts (later calls change nothing).
    pub(crate) fn configure(&self, settings: Settings) {
        let _ = self.settings.set(settings);
    }

    /// Whether each connection's request is recorded (see `Server::record_requests`).
    #[inline]
    pub(crate) fn records(&self) -> bool {
        self.settings.get().is_some_and(|s| s.records)
    }

    pub(crate) fn goodbye_spread(&self) -> Duration {
        self.settings
            .get()
            .map_or(Duration::ZERO, |s| s.goodbye_spread)
    }

    /// Registers a freshly accepted connection, in state `New`.
    pub(crate) fn register(self: &Arc<Self>, peer: Addr, socket: &impl AsRawFd) -> Arc<Conn> {
        self.register_in(peer, socket, ConnState::New)
    }

    /// Registers a connection the previous generation handed over, between two requests:
    /// `Idle`, its idle time counted from now.
    /// `New` instead if it had not told its protocol yet; not counted as received if it
    /// comes back from an interrupted hand-over of this process's own.
    #[cfg(unix)]
    pub(crate) fn register_handed(
        self: &Arc<Self>,
        peer: Addr,
        socket: &impl AsRawFd,
        kind: crate::handover::Kind,
        from_previous: bool,
    ) -> Arc<Conn> {
        if from_previous {
            self.stats.received.fetch_add(1, Ordering::Relaxed);
        }
        let state = match kind {
            crate::handover::Kind::Http1 => ConnState::Idle,
            crate::handover::Kind::Unknown => ConnState::New,
            crate::handover::Kind::Upgraded => {
                if from_previous {
                    self.stats.upgraded_received.fetch_add(1, Ordering::Relaxed);
                }
                ConnState::Hijacked
            }
        };
        self.register_in(peer, socket, state)
    }

    fn register_in(
        self: &Arc<Self>,
        peer: Addr,
        socket: &impl AsRawFd,
        state: ConnState,
    ) -> Arc<Conn> {
        let info = ConnInfo {
            id: self.stats.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            accepted_at: Instant::now(),
        };
        let conn = Arc::new(Conn {
            info,
            state: AtomicU8::new(state as u8),
            inflight: AtomicU32::new(0),
            http2: AtomicBool::new(false),
            request: Mutex::new(None),
            // A new connection waits for its first head from now; an idle one does not.
            head_since: AtomicU32::new(if state == ConnState::New {
                self.now()
            } else {
                0
            }),
            idle_since: AtomicU32::new(self.now()),
            closing: AtomicBool::new(false),
            body_open: AtomicBool::new(false),
            idle_on_flush: AtomicBool::new(false),
            released: AtomicBool::new(false),
            shut_by_drain: AtomicBool::new(false),
            drain_waker: atomic_waker::AtomicWaker::new(),
            socket: SocketSlot::new(socket),
            closes_itself: AtomicBool::new(false),
            heard: AtomicBool::new(false),
            left_new: Notify::new(),
            tracker: Arc::clone(self),
        });
        self.awaited.add();
        lock(self.shard(conn.info.id)).insert(conn.info.id, Arc::clone(&conn));
        self.stats.counts[state as usize].fetch_add(1, Ordering::Relaxed);
        self.call_hook(&conn.info, state);
        conn
    }

    /// Called by the socket's owner right before the socket closes.
    pub(crate) fn unregister(&self, conn: &Conn) {
        conn.socket.release();
        conn.apply(Event::Close);
        lock(self.shard(conn.info.id)).remove(&conn.info.id);
        conn.release();
    }

    pub(super) fn shard(&self, id: u64) -> &Mutex<HashMap<u64, Arc<Conn>>> {
        &self.shards[id as usize % SHARDS]
    }

    /// Every live connection (a snapshot).
    pub(super) fn all(&self) -> Vec<Arc<Conn>> {
        let mut all = Vec::with_capacity(self.stats.len());
        for shard in &self.shards {
            all.extend(lock(shard).values().cloned());
        }
        all
    }

    /// The coarse clock's current tick (never 0, which means "not waiting").
    #[inline]
    pub(super) fn now(&self) -> u32 {
        self.tick.load(Ordering::Relaxed) | 1
    }

    /// Wake-ups of every connection's task so far (see [`Tracker::wake_all`]).
    #[inline]
    pub(crate) fn wake_count(&self) -> u64 {
        // Acquire, paired with the Release in `wake_all`.
        self.wakes.load(Ordering::Acquire)
    }

    pub(super) fn wake_all(&self) {
        for conn in self.all() {
            conn.drain_waker.wake();
        }
        // After the wakes, Release: a task that registered before one of them took its
        // waker reads a new count at its next poll (see `Conn::poll_draining_cached`).
        self.wakes.fetch_add(1, Ordering::Release);
    }

    /// True once the drain has started.
    #[inline]
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.is_set()
    }

    /// Starts draining (once), then wakes every connection's task (each waits on its own
    /// waker rather than on the latch: thousands of them are woken by this one loop).
    pub(crate) fn start_draining(&self) -> bool {
        let first = self.draining.set(());
        if first {
            self.wake_all();
        }
        first
    }

    #[inline]
    pub(super) fn moved(&self, from: ConnState, to: ConnState, info: &ConnInfo) {
        if from != ConnState::Closed {
            self.stats.counts[from as usize].fetch_sub(1, Ordering::Relaxed);
        }
        if to != ConnState::Closed {
            self.stats.counts[to as usize].fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.closed.fetch_add(1, Ordering::Relaxed);
        }
        self.call_hook(info, to);
    }

    #[inline]
    fn call_hook(&self, info: &ConnInfo, state: ConnState) {
        if let Some(hook) = self.settings.get().and_then(|s| s.hook.as_ref()) {
            hook(info, state);
        }
    }

    /// What every live connection is doing now, by id (see `Handle::connection_snapshots`).
    pub(crate) fn snapshot(&self) -> Vec<ConnSnapshot> {
        let now = Instant::now();
        let mut all: Vec<_> = self.all().iter().map(|c| c.snapshot(now)).collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// Resolves when the drain waits for no connection any more: woken by the last
    /// unregister (or release), not by a timer.
    pub(crate) async fn wait_empty(&self) {
        self.awaited.zero().await;
    }
}

#[cfg(test)]
mod tests {
    //! Step-by-step polling (no runtime, no timing): the drain's wait is an event.
    use super::*;
    use crate::base::conn::StateCounts;
    use crate::conn::record::HandOver;

    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use tokio_test::{assert_pending, assert_ready, task};

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().expect("socketpair")
    }

    /// The end of a hand-over wakes every task (and so empties its drain waker) though most
    /// have nothing to do: a task that polled its cached registration then, without
    /// registering again, was never woken by the next hand-over (seen: one connection of
    /// 200 cut at the good upgrade after a failed one, 1 run in 3).
    #[tokio::test]
    async fn a_waiter_woken_by_the_end_of_a_hand_over_is_woken_by_the_next() {
        let tracker = Arc::new(Tracker::default());
        let (a, _pa) = pair();
        let c = tracker.register(Addr::Unix(None), &a);
        let mut registered = None;
        let mut waiter = task::spawn(std::future::poll_fn(|cx| {
            c.poll_draining_cached(cx, &mut registered)
        }));
        assert_pending!(waiter.poll());
        // A hand-over that ends (the next generation went) wakes it; it has nothing to do.
        let outbox = || {
            let (ours, _theirs) = crate::handover::pair().unwrap();
            Arc::new(crate::handover::outbox::Outbox::new(ours, Duration::from_secs(5)).unwrap())
        };
        tracker.start_hand_over(outbox());
        assert!(waiter.is_woken());
        assert_ready!(waiter.poll());
        tracker.end_hand_over(None);
        let mut registered = None;
        let mut waiter = task::spawn(std::future::poll_fn(|cx| {
            c.poll_draining_cached(cx, &mut registered)
        }));
        assert_pending!(waiter.poll());
        tracker.end_hand_over(None); // wakes all again: the waker is taken
        assert!(waiter.is_woken());
        assert_pending!(waiter.poll(), "nothing to do: it must register again");
        tracker.start_hand_over(outbox());
        assert!(waiter.is_woken(), "the next hand-over must wake it");
        assert_ready!(waiter.poll());
        tracker.end_hand_over(None);
    }

    #[test]
    fn wait_empty_wakes_on_the_last_close_and_not_before() {
        let tracker = Arc::new(Tracker::default());
        let (a, _pa) = pair();
        let (b, _pb) = pair();
        let c1 = tracker.register(Addr::Unix(None), &a);
        let c2 = tracker.register(Addr::Unix(None), &b);
        let mut wait = task::spawn(tracker.wait_empty());
        assert_pending!(wait.poll());
        tracker.unregister(&c1);
        assert!(!wait.is_woken(), "woken while a connection is still live");
        assert_pending!(wait.poll());
        tracker.unregister(&c2);
        assert!(wait.is_woken(), "the last close must wake the drain");
        assert_ready!(wait.poll());
    }

    #[test]
    fn counts_follow_transitions_and_hijacked_is_left_only_for_closed() {
        let tracker = Arc::new(Tracker::default());
        let (a, _pa) = pair();
        let c = tracker.register(Addr::Unix(None), &a);
        assert_eq!(tracker.stats.counts().new, 1);
        assert!(c.on_read(b"GET / HTTP/1.1\r\n"));
        assert_eq!(tracker.stats.counts().active, 1);
        c.apply(Event::Upgraded);
        c.apply(Event::ResponseDone);
        c.apply(Event::Bytes);
        assert_eq!(c.state(), ConnState::Hijacked);
        assert_eq!(tracker.stats.counts().hijacked, 1);
        assert_eq!(tracker.stats.counts().total(), 1);
        tracker.unregister(&c);
        assert_eq!(tracker.stats.counts(), StateCounts::default());
        assert_eq!(c.state(), ConnState::Closed);
    }

    #[test]
    fn http2_preface_makes_a_connection_idle_and_control_frames_do_not_wake_it() {
        let tracker = Arc::new(Tracker::default());
        let (a, _pa) = pair();
        let c = tracker.register(Addr::Unix(None), &a);
        c.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(c.state(), ConnState::Idle);
        c.on_read(b"\x00\x00\x08\x06"); // a PING frame while idle
        assert_eq!(c.state(), ConnState::Idle);
    }

    #[test]
    fn force_all_shuts_the_socket_whoever_holds_it() {
        let tracker = Arc::new(Tracker::default());
        let (ours, mut peer) = pair();
        let c = tracker.register(Addr::Unix(None), &ours);
        c.on_read(b"G");
        let forced = tracker.force_all();
        assert_eq!(forced.len(), 1);
        assert_eq!(forced[0].state, ConnState::Active);
        let mut buf = [0u8; 1];
        assert_eq!(
            peer.read(&mut buf).unwrap(),
            0,
            "the peer must see the connection end"
        );
        // Once released, a forced shutdown never reaches the (possibly reused) descriptor.
        tracker.unregister(&c);
        assert!(tracker.force_all().is_empty());
        drop(ours);
    }

    /// A connection that went idle, served one request and flushed its response.
    /// When a connection may go to the next generation: between requests only, with its
    /// last body read; never for HTTP/2, TLS or upgraded connections.
    #[test]
    fn a_connection_is_handed_over_only_between_requests() {
        use http_body_util::{Empty, Full};
        let tracker = Arc::new(Tracker::default());
        let (a, _b) = pair();
        let c = tracker.register(Addr::Unix(None), &a);
        assert_eq!(c.hand_over(), HandOver::Now, "new, silent");
        assert!(c.on_read(b"GET / HT"));
        assert_eq!(c.hand_over(), HandOver::Now, "a head arriving goes along");
        c.request_started(&http::Request::new(Empty::<bytes::Bytes>::new()), None);
        assert_eq!(c.hand_over(), HandOver::Later, "a request in flight");
        c.request_finished();
        assert_eq!(
            c.hand_over(),
            HandOver::Later,
            "its response not flushed yet"
        );
        c.on_flush();
        assert_eq!(c.hand_over(), HandOver::Now, "idle");

        // A request with a body: not before the body is read to its end.
        assert!(c.on_read(b"POST / HTTP/1.1\r\n"));
        let body = Full::new(bytes::Bytes::from_static(b"x"));
        c.request_started(&http::Request::new(body), None);
        c.request_finished();
        c.on_flush();
        assert_eq!(c.hand_over(), HandOver::Never, "idle, its body left unread");
        assert!(c.on_read(b"rest of the body"));
        assert_eq!(
            c.hand_over(),
            HandOver::Never,
            "hyper draining the unread body"
        );
        c.body_ended();
        assert_eq!(
            c.hand_over(),
            HandOver::Now,
            "its body read, a head arriving"
        );
        // The next request without a body clears what the last one left.
        assert!(c.on_read(b"POST / HTTP/1.1\r\n"));
        c.request_started(
            &http::Request::new(Full::new(bytes::Bytes::from_static(b"y"))),
            None,
        );
        c.request_finished();
        c.on_flush();
        assert!(c.on_read(b"GET / HTTP/1.1\r\n"));
        c.request_started(&http::Request::new(Empty::<bytes::Bytes>::new()), None);
        c.request_finished();
        c.on_flush();
        assert_eq!(
            c.hand_over(),
            HandOver::Now,
            "a stale unread body was forgotten"
        );

        let h2 = tracker.register(Addr::Unix(None), &a);
        assert!(h2.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert_eq!(h2.hand_over(), HandOver::Never, "HTTP/2");
        let tls = tracker.register(Addr::Unix(None), &a);
        tls.set_closes_itself();
        assert_eq!(tls.hand_over(), HandOver::Never, "TLS");
        let ws = idle_conn(&tracker, &a);
        ws.apply(Event::Upgraded);
        assert_eq!(ws.hand_over(), HandOver::Never, "upgraded");
    }

    fn idle_conn(tracker: &Arc<Tracker>, socket: &UnixStream) -> Arc<Conn> {
        let c = tracker.register(Addr::Unix(None), socket);
        assert!(c.on_read(b"GET / HTTP/1.1\r\n\r\n"));
        c.request_started(
            &http::Request::new(http_body_util::Empty::<bytes::Bytes>::new()),
            None,
        );
        c.request_finished();
        c.on_flush();
        assert_eq!(c.state(), ConnState::Idle);
        c
    }

    #[test]
    fn a_request_racing_an_idle_close_is_either_served_or_never_read() {
        let tracker = Arc::new(Tracker::default());
        // The close comes first: the request's bytes are dropped, nothing is served.
        let (a, _pa) = pair();
        let c = idle_conn(&tracker, &a);
        assert!(c.close_if_idle(None));
        assert!(
            !c.on_read(b"POST /transfers"),
            "a request was read on a closed connection"
        );
        // The request comes first: the close backs off, the request is served.
        let (b, _pb) = pair();
        let c = idle_conn(&tracker, &b);
        assert!(c.on_read(b"POST /transfers"));
        assert!(
            !c.close_if_idle(None),
            "an active connection was closed as idle"
        );
        assert_eq!(c.state(), ConnState::Active);
        assert!(
            c.on_read(b" HTTP/1.1\r\n"),
            "the rest of the request must be read"
        );
        // The drain's close, which makes the connection `Closed` at once: its bytes are
        // dropped too (they were served, unanswerable, before `Closed` was handled).
        let tracker = Arc::new(Tracker::default());
        let (d, _pd) = pair();
        let c = idle_conn(&tracker, &d);
        assert_eq!(tracker.close_idle(), 1);
        assert_eq!(c.state(), ConnState::Closed);
        assert!(
            !c.on_read(b"POST /transfers"),
            "a request was read on a connection the drain closed"
        );
    }

    #[test]
    fn slow_heads_are_cut_after_the_timeout_and_complete_heads_never() {
        let tracker = Arc::new(Tracker::default());
        let (silent, mut silent_peer) = pair();
        let (served, _served_peer) = pair();
        let _s = tracker.register(Addr::Unix(None), &silent);
        let c = tracker.register(Addr::Unix(None), &served);
        c.on_read(b"GET / HTTP/1.1\r\n\r\n");
        c.request_started(
            &http::Request::new(http_body_util::Empty::<bytes::Bytes>::new()),
            None,
        );
        // Four ticks per timeout: not cut within the timeout…
        for _ in 0..4 {
            assert_eq!(tracker.tick(Some(4), None), 0);
        }
        // …cut after it; the request whose head was complete is left alone.
        assert_eq!(tracker.tick(Some(4), None), 1);
        let mut buf = [0u8; 1];
        assert_eq!(silent_peer.read(&mut buf).unwrap(), 0);
        // The next request's first byte starts its own clock (HTTP/1 keep-alive).
        c.request_finished();
        assert_eq!(
            c.state(),
            ConnState::Active,
            "idle only once the response is flushed"
        );
        c.on_flush();
        assert_eq!(c.state(), ConnState::Idle);
        assert_eq!(
            tracker.tick(Some(4), None),
            0,
            "idle connections are not cut"
        );
        c.on_read(b"G");
        for _ in 0..4 {
            assert_eq!(tracker.tick(Some(4), None), 0);
        }
        assert_eq!(tracker.tick(Some(4), None), 1);
    }
}
