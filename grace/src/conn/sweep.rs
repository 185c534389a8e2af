//! The tracker's sweeps over every live connection: the drain's close of idle connections and
//! its force, the coarse clock's timeouts, the shedding that makes room at the limits, and
//! the parking of the tasks the drain shut until the stop is over.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::ConnState;
use super::fanout::across_threads;
use super::record::Conn;
use super::state::Event;
use super::tracker::Tracker;
use crate::base::lock;
use crate::base::report::ConnSnapshot;
use crate::sys::AsFd;

/// What [`Tracker::shed_for_new`] did.
#[derive(Debug, Default)]
pub(crate) struct Shed {
    /// Connections closed to make room.
    pub(crate) closed: usize,
    /// How long until the next silent connection passes its grace, if one is younger.
    pub(crate) next: Option<Duration>,
}

/// See [`Tracker::park`].
#[derive(Default)]
pub(super) struct Parked {
    wakers: Vec<std::task::Waker>,
    over: bool,
}

impl Tracker {
    /// Closes every idle HTTP/1 connection now, from here: its last response is fully
    /// written (see `Conn::on_flush`), so shutting its socket down is exactly what its own
    /// task would do, and the drain need not wait for that task to unwind. The peer sees
    /// FIN at once, for 10,000 connections in a tight loop (split across cores, see
    /// `fanout`).
    pub(crate) fn close_idle(&self) -> usize {
        // The sockets are closed where they stand (freed now, in parallel, rather than one
        // by one as the process exits); without `/dev/null`, shut down.
        let null = std::fs::File::open("/dev/null").ok();
        let null = null.as_ref().map(|f| f.as_fd());
        let close = |conns: &[Arc<Conn>]| {
            let mut closed = 0;
            let mut wakers = Vec::new();
            for conn in conns {
                if conn.state() == ConnState::Idle
                    && !conn.http2.load(Ordering::Relaxed)
                    && !conn.closes_itself.load(Ordering::Relaxed)
                {
                    // Before the close: a task woken from now on parks (see `poll_draining`).
                    conn.shut_by_drain.store(true, Ordering::Release);
                    if conn.close_if_idle(null) {
                        self.closed_by_drain(conn);
                        // A socket closed where it stands wakes no one (it left epoll): its
                        // task's drain waker goes straight to the parked ones, to run once
                        // the stop is over, not now. (Taken while its task registers, the
                        // task is woken by `register` itself, and parks.)
                        wakers.extend(conn.drain_waker.take());
                        closed += 1;
                    } else {
                        conn.shut_by_drain.store(false, Ordering::Release);
                    }
                }
            }
            self.park_all(wakers);
            closed
        };
        across_threads(&self.all(), close).into_iter().sum()
    }

    /// Advances the coarse clock by one tick, then shuts every connection that has waited
    /// for a request head longer than `head` ticks (a slow or silent client; on HTTP/2, until
    /// its first request's HEADERS are complete), or has been idle longer than `idle` ticks.
    /// Called every tick by the server, so a timeout of `n` ticks cuts between `n` and
    /// `n + 1` ticks late: one timer per server, none per request. Returns how many it cut.
    pub(crate) fn tick(&self, head: Option<u32>, idle: Option<u32>) -> usize {
        let now = self.tick.fetch_add(2, Ordering::Relaxed).wrapping_add(2) | 1;
        let past = |since: u32, limit: Option<u32>| {
            since != 0 && limit.is_some_and(|l| now.wrapping_sub(since) / 2 > l)
        };
        let mut cut = 0;
        for conn in self.all() {
            let slow_head = past(conn.head_since.load(Ordering::Relaxed), head);
            let idle_long = conn.state() == ConnState::Idle
                && past(conn.idle_since.load(Ordering::Relaxed), idle);
            let shut = if idle_long && !conn.is_http2() {
                conn.close_if_idle(None)
            } else {
                (slow_head || idle_long) && conn.socket.shutdown()
            };
            if shut {
                conn.head_since.store(0, Ordering::Relaxed);
                let why = if slow_head {
                    "header read timeout"
                } else {
                    "idle timeout"
                };
                tracing::debug!(conn = conn.info.id, peer = %conn.info.peer, why);
                cut += 1;
            }
        }
        cut
    }

    /// Closes up to `n` idle connections, the longest idle first: when the process runs out
    /// of descriptors, keep-alive connections that nobody uses give way to new ones.
    pub(crate) fn shed_idle(&self, n: usize) -> usize {
        let now = self.now();
        let mut idle: Vec<_> = self
            .all()
            .into_iter()
            .filter(|c| c.state() == ConnState::Idle)
            .collect();
        idle.sort_by_key(|c| {
            std::cmp::Reverse(now.wrapping_sub(c.idle_since.load(Ordering::Relaxed)))
        });
        idle.iter()
            .take(n)
            .filter(|c| match c.is_http2() {
                true => c.socket.shutdown(),
                false => c.close_if_idle(None),
            })
            .count()
    }

    /// At the connection limit, with a client waiting in the accept queue: makes room by
    /// closing the connection idle longest (the oldest first among equals) or, with none
    /// idle, every connection that has sent nothing since it was accepted more than `grace`
    /// ago (no byte read, none waiting in its socket). Never one with a request in flight
    /// (`Active`) or upgraded (`Hijacked`). Each closed socket's task ends, and its place
    /// under the limit comes free.
    pub(crate) fn shed_for_new(&self, grace: Duration) -> Shed {
        let tick = self.now();
        let now = Instant::now();
        let mut longest: Option<(u32, u64, Arc<Conn>)> = None;
        let mut silent = Vec::new();
        let mut next: Option<Duration> = None;
        for conn in self.all() {
            // Relaxed: a hint (set once a shed has begun closing it); a stale `false` only
            // means another attempt, which `close_if_*` makes harmless.
            if conn.closing.load(Ordering::Relaxed) {
                continue;
            }
            match conn.state() {
                ConnState::Idle => {
                    // Relaxed: the coarse clock's tick, compared within a tick's error.
                    let idle = tick.wrapping_sub(conn.idle_since.load(Ordering::Relaxed));
                    let id = conn.info.id;
                    if longest.as_ref().is_none_or(|(i, first, _)| {
                        (idle, std::cmp::Reverse(id)) > (*i, std::cmp::Reverse(*first))
                    }) {
                        longest = Some((idle, id, conn));
                    }
                }
                // Relaxed: see `heard`.
                ConnState::New if !conn.heard.load(Ordering::Relaxed) => {
                    let age = now.saturating_duration_since(conn.info.accepted_at);
                    match grace.checked_sub(age).filter(|left| !left.is_zero()) {
                        Some(left) => next = Some(next.map_or(left, |n| n.min(left))),
                        None => silent.push(conn),
                    }
                }
                _ => {}
            }
        }
        if let Some((_, _, conn)) = longest {
            let closed = if conn.is_http2() {
                // Relaxed: read only as the hint above, by later sheds.
                conn.closing.store(true, Ordering::Relaxed);
                conn.socket.shutdown()
            } else {
                conn.close_if_idle(None)
            };
            if closed {
                tracing::debug!(conn = conn.info.id, peer = %conn.info.peer, "closed the connection idle longest to make room");
                return Shed { closed: 1, next };
            }
        }
        let mut closed = 0;
        for conn in silent {
            if conn.close_if_silent() {
                tracing::debug!(conn = conn.info.id, peer = %conn.info.peer, "closed a silent connection to make room");
                closed += 1;
            }
        }
        Shed { closed, next }
    }

    /// A connection whose socket the drain (or a force) has just shut: `Closed` as far as
    /// anyone can see (its state, the counts, the hook, the snapshots) and no longer waited
    /// for. Its task unwinds later (see [`Tracker::park`]); its own unregister then finds
    /// nothing left to do (`Closed` is final, the registry entry gone).
    fn closed_by_drain(&self, conn: &Conn) {
        conn.apply(Event::Close);
        lock(self.shard(conn.info.id)).remove(&conn.info.id);
        conn.release();
    }

    /// Parks the task of a connection the drain shut, which has just read its end of
    /// stream: it unwinds (hyper's connection, the socket's close, the buffers freed) only
    /// once the stop is over ([`Tracker::unpark_all`]), instead of competing for the CPU
    /// with the rest of the stop: with 10,000 connections those unwinding tasks kept both
    /// cores busy while the jobs and resources closed, and a process that exits right
    /// after the report never pays for them (the kernel closes what they hold). False
    /// once the stop is over: then the task goes on at once.
    pub(crate) fn park(&self, waker: &std::task::Waker) -> bool {
        let mut parked = lock(&self.parked);
        if parked.over {
            return false;
        }
        parked.wakers.push(waker.clone());
        true
    }

    /// Parks tasks by their wakers (see [`Tracker::park`]); once the stop is over, wakes them.
    fn park_all(&self, wakers: Vec<std::task::Waker>) {
        let mut parked = lock(&self.parked);
        if parked.over {
            drop(parked);
            wakers.into_iter().for_each(std::task::Waker::wake);
            return;
        }
        parked.wakers.extend(wakers);
    }

    /// Resolves once the stop is over: for the task of a connection the drain shut (see
    /// [`Tracker::park`]).
    pub(crate) async fn stop_over(&self) {
        std::future::poll_fn(|cx| match self.park(cx.waker()) {
            true => std::task::Poll::Pending,
            false => std::task::Poll::Ready(()),
        })
        .await
    }

    /// The stop is over (or was abandoned): every parked task goes on, and none parks again.
    pub(crate) fn unpark_all(&self) {
        let wakers = {
            let mut parked = lock(&self.parked);
            parked.over = true;
            std::mem::take(&mut parked.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// Shuts down the socket of every live connection, whatever its state, and says which.
    pub(crate) fn force_all(&self) -> Vec<ConnSnapshot> {
        let now = Instant::now();
        let force = |conns: &[Arc<Conn>]| -> Vec<ConnSnapshot> {
            conns
                .iter()
                .filter(|c| !c.released.load(Ordering::Acquire))
                .filter_map(|c| {
                    // Read what it was doing first: once shut down, it is `Closed`.
                    let forced = c.snapshot(now);
                    c.shut_by_drain.store(true, Ordering::Release);
                    let shut = c.socket.shutdown();
                    self.closed_by_drain(c);
                    shut.then_some(forced)
                })
                .collect()
        };
        let mut forced = across_threads(&self.all(), force).concat();
        forced.sort_by_key(|f| f.id);
        forced
    }
}
