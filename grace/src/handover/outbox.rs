//! [`Outbox`]: the old generation's end of the hand-over channel.

use std::collections::{HashMap, HashSet};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use rustix::net::{RecvFlags, SendAncillaryBuffer, SendAncillaryMessage};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{ACK, HEADER, Handed, KINDS, Kind, MAX_BUFFERED, Origin, TAG, Upgraded};
use crate::base::count::Count;
use crate::base::latch::Latch;
use crate::base::lock;

/// The old generation's end, shared by the connection tasks that hand over, and the window
/// in which they may.
pub(crate) struct Outbox {
    fd: AsyncFd<OwnedFd>,
    /// How long connections may be handed over.
    window: Duration,
    /// Set when the window ends: no connection is sent from then on.
    closed: Latch<()>,
    /// Hand-overs under way (see [`Outbox::sending`]).
    sending: Count,
    next_id: AtomicU64,
    /// Every connection sent while the hand-over lasts: our copy of each, to take back if
    /// the receiver goes before the hand-over is complete.
    pending: Mutex<HashMap<u64, Pending>>,
    /// Sent and not acknowledged yet.
    unacknowledged: Count,
    /// The kinds of upgraded connections the receiver resumes, once it said (its first
    /// message): only those are asked to move.
    kinds: OnceLock<Vec<String>>,
    /// Upgraded connections (by id) that tried to move and could not: not asked again in
    /// this hand-over.
    declined: Mutex<HashSet<u64>>,
}

/// A connection sent: our copy, and what tells whether the receiver read from it.
struct Pending {
    handed: Handed,
    /// Bytes read from the socket when it was sent (see `sys::bytes_consumed`).
    consumed: Option<u64>,
    acknowledged: bool,
}

/// What [`Outbox::take_back`] found.
#[derive(Debug, Default)]
pub(crate) struct TakenBack {
    /// Connections to serve here again: never acknowledged, or acknowledged by a receiver
    /// that never read from them.
    pub(crate) back: Vec<Handed>,
    /// Of those, how many had been acknowledged (and counted as handed over).
    pub(crate) were_acknowledged: usize,
    /// Of those, how many were upgraded connections.
    pub(crate) were_acknowledged_upgraded: usize,
    /// Acknowledged, and read from by a receiver that then went: what it read is lost with
    /// it, so they are shut down (their clients see the end, as without a hand-over).
    pub(crate) lost: usize,
}

/// What the receiver takes, read under one lock (see [`Outbox::taker`]).
pub(crate) struct Taker<'a> {
    kinds: &'a [String],
    declined: std::sync::MutexGuard<'a, HashSet<u64>>,
}

impl Taker<'_> {
    pub(crate) fn takes(&self, name: &str, conn: u64) -> bool {
        self.kinds.iter().any(|n| n == name) && !self.declined.contains(&conn)
    }
}

/// A hand-over under way: the drain counts what was handed over only once none is.
pub(crate) struct Sending<'a>(&'a Outbox);

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        // The count made under it (handed over or not) is seen by whoever sees none left.
        self.0.sending.sub();
    }
}

impl Outbox {
    pub(crate) fn new(fd: OwnedFd, window: Duration) -> io::Result<Outbox> {
        Ok(Outbox {
            fd: crate::sys::async_fd(fd, Interest::WRITABLE | Interest::READABLE)?,
            window,
            closed: Latch::new(),
            sending: Count::default(),
            next_id: AtomicU64::new(0),
            pending: Mutex::default(),
            unacknowledged: Count::default(),
            kinds: OnceLock::new(),
            declined: Mutex::default(),
        })
    }

    /// Reads the receiver's list of kinds if it has come (it sends it before it says it is
    /// ready, so by the hand-over it has): without one, no upgraded connection is asked to
    /// move.
    pub(crate) fn read_kinds(&self) {
        // The list: names of up to 255 bytes, one per line.
        let mut buf = vec![0u8; 64 * 1024];
        // Nothing was sent yet, so nothing else can be waiting (no acknowledgement).
        let got = rustix::net::recv(self.fd.get_ref(), &mut buf, RecvFlags::DONTWAIT);
        let list = match got {
            Ok((n, _)) if n > 0 && buf[0] == KINDS => &buf[1..n],
            _ => &[][..],
        };
        let names = String::from_utf8_lossy(list)
            .split('\n')
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        let _ = self.kinds.set(names);
    }

    /// Whether the receiver resumes upgraded connections of kind `name`, and the one with
    /// id `conn` has not already tried to move in this hand-over.
    pub(crate) fn takes(&self, name: &str, conn: u64) -> bool {
        self.taker().takes(name, conn)
    }

    /// [`takes`](Self::takes) for many connections in a row, under one lock.
    pub(crate) fn taker(&self) -> Taker<'_> {
        Taker {
            kinds: self.kinds.get().map_or(&[], Vec::as_slice),
            declined: lock(&self.declined),
        }
    }

    /// The upgraded connection `conn` could not move: not asked again in this hand-over.
    pub(crate) fn decline(&self, conn: u64) {
        lock(&self.declined).insert(conn);
    }

    /// How long connections may be handed over.
    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// The window is open: connections may still be handed over.
    pub(crate) fn is_open(&self) -> bool {
        !self.closed.is_set()
    }

    /// Ends the window (once; later calls do nothing): a send waiting for room gives up.
    pub(crate) fn close(&self) {
        self.closed.set(());
    }

    /// Resolves when the window ends.
    pub(crate) async fn closed(&self) {
        self.closed.wait().await;
    }

    /// Marks a hand-over under way until the guard drops: take it before the connection is
    /// taken apart, count the outcome under it.
    pub(crate) fn sending(&self) -> Sending<'_> {
        self.sending.add();
        Sending(self)
    }

    /// No hand-over is under way.
    pub(crate) fn is_idle(&self) -> bool {
        self.sending.is_zero()
    }

    /// Once the window has ended: resolves when no hand-over is under way any more (each
    /// ends promptly then: a send waiting for room gives up).
    pub(crate) async fn settled(&self) {
        self.sending.zero().await;
    }

    /// Connections sent and not acknowledged yet.
    pub(crate) fn unacknowledged(&self) -> usize {
        self.unacknowledged.get()
    }

    /// Resolves once every connection sent was acknowledged (or taken back).
    pub(crate) async fn acknowledged(&self) {
        self.unacknowledged.zero().await;
    }

    /// Takes back, once the receiver is gone (dead, so nothing it received is served any
    /// more), every connection sent that it had not read from: those it never acknowledged,
    /// and those it did but had not read a byte of yet (a TCP socket's count of bytes read
    /// tells; elsewhere only the unacknowledged ones come back). Closes the window.
    pub(crate) fn take_back(&self) -> TakenBack {
        self.close();
        let mut taken = TakenBack::default();
        for (_, p) in lock(&self.pending).drain() {
            if !p.acknowledged {
                self.unacknowledged.sub();
                taken.back.push(p.handed);
                continue;
            }
            let unread = p.consumed.is_some()
                && crate::sys::bytes_consumed(p.handed.socket.as_fd()) == p.consumed;
            if unread {
                taken.were_acknowledged += 1;
                taken.were_acknowledged_upgraded += usize::from(p.handed.kind == Kind::Upgraded);
                taken.back.push(p.handed);
            } else {
                taken.lost += 1;
                let _ = rustix::net::shutdown(&p.handed.socket, rustix::net::Shutdown::Both);
            }
        }
        taken
    }

    /// Passes `socket` on, with what it is and the bytes already read from it (in order),
    /// keeping a copy until it is acknowledged. Waits while the channel is full, until the
    /// window ends. On failure the connection is still the caller's.
    pub(crate) async fn send(
        &self,
        socket: BorrowedFd<'_>,
        kind: Kind,
        buffered: &[&[u8]],
    ) -> io::Result<()> {
        // Boxed: a connection's task holds this future inline, and hand-overs are rare.
        Box::pin(self.send_with(socket, kind, None, buffered)).await
    }

    /// [`send`](Self::send) for an upgraded connection: `upgraded` says what resumes it.
    pub(crate) async fn send_upgraded(
        &self,
        socket: BorrowedFd<'_>,
        upgraded: Upgraded,
        buffered: &[&[u8]],
    ) -> io::Result<()> {
        Box::pin(self.send_with(socket, Kind::Upgraded, Some(upgraded), buffered)).await
    }

    async fn send_with(
        &self,
        socket: BorrowedFd<'_>,
        kind: Kind,
        upgraded: Option<Upgraded>,
        buffered: &[&[u8]],
    ) -> io::Result<()> {
        if !self.is_open() {
            return Err(ended());
        }
        let meta = upgraded.as_ref().map(Upgraded::encode).transpose()?;
        let len: usize = buffered.iter().map(|b| b.len()).sum();
        if len > MAX_BUFFERED {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} buffered bytes: more than a hand-over carries"),
            ));
        }
        // Our copy, in place before the message can be acknowledged.
        let mut handed = Handed::copy_of(socket, kind, buffered, Origin::Back)?;
        handed.upgraded = upgraded;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut header = [0u8; HEADER];
        header[0] = TAG;
        header[1] = kind.byte();
        header[2..].copy_from_slice(&id.to_le_bytes());
        let consumed = crate::sys::bytes_consumed(handed.socket.as_fd());
        lock(&self.pending).insert(
            id,
            Pending {
                handed,
                consumed,
                acknowledged: false,
            },
        );
        self.unacknowledged.add();
        let mut iov = Vec::with_capacity(buffered.len() + 2);
        iov.push(IoSlice::new(&header));
        iov.extend(meta.as_deref().map(IoSlice::new));
        iov.extend(buffered.iter().map(|b| IoSlice::new(b)));
        let fds = [socket];
        let sending = async {
            loop {
                let sent = self.fd.async_io(Interest::WRITABLE, |fd| {
                    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                    let mut control = SendAncillaryBuffer::new(&mut space);
                    control.push(SendAncillaryMessage::ScmRights(&fds));
                    // NOSIGNAL: a receiver gone is an error here (EPIPE), not a SIGPIPE.
                    rustix::net::sendmsg(fd, &iov, &mut control, super::SEND_FLAGS)
                        .map_err(io::Error::from)
                });
                match sent.await {
                    // ETOOMANYREFS: more descriptors in flight than our RLIMIT_NOFILE allows
                    // (the receiver has not caught up): not an error of this connection, and
                    // the socket stays writable, so readiness would not wake us. Try again
                    // shortly (the window bounds it).
                    Err(e)
                        if e.raw_os_error()
                            == Some(rustix::io::Errno::TOOMANYREFS.raw_os_error()) =>
                    {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    other => return other.map(|_| ()),
                }
            }
        };
        // Until sent, the copy goes if the send fails or is dropped (the caller still has the
        // connection).
        let unsent = Unsent(self, Some(id));
        let result = tokio::select! {
            sent = sending => sent,
            _ = self.closed() => Err(ended()),
        };
        if result.is_ok() {
            unsent.disarm();
        }
        result
    }

    /// Reads the receiver's acknowledgements, calling `acked` for each connection it now
    /// has (`true` for an upgraded one), until the receiver hangs up: then resolves, with
    /// the error if the channel failed. Our copies stay until the hand-over is complete (the
    /// outbox dropped), or are taken back ([`take_back`](Self::take_back)).
    pub(crate) async fn acks(&self, acked: impl Fn(bool)) -> io::Result<()> {
        // An acknowledgement of up to a batch's ids.
        let mut buf = [0u8; 1 + 8 * super::inbox::BATCH];
        loop {
            let n = self
                .fd
                .async_io(Interest::READABLE, |fd| {
                    rustix::net::recv(fd, &mut buf, RecvFlags::empty())
                        .map(|(n, _)| n)
                        .map_err(io::Error::from)
                })
                .await?;
            if n == 0 {
                return Ok(());
            }
            if buf[0] == KINDS {
                // A list that came after the hand-over started: `read_kinds` decided
                // without it (no upgraded connection moves this time).
                continue;
            }
            // One acknowledgement per batch the receiver read: the ids, 8 bytes each.
            let ids = &buf[1..n];
            if buf[0] != ACK || ids.is_empty() || ids.len() % 8 != 0 {
                tracing::warn!(len = n, "malformed hand-over acknowledgement: ignored");
                continue;
            }
            let mut pending = lock(&self.pending);
            let firsts: Vec<bool> = ids
                .chunks_exact(8)
                .filter_map(|id| {
                    let id = u64::from_le_bytes(id.try_into().unwrap_or_default());
                    match pending.get_mut(&id) {
                        Some(p) if !p.acknowledged => {
                            p.acknowledged = true;
                            Some(p.handed.kind == Kind::Upgraded)
                        }
                        _ => None,
                    }
                })
                .collect();
            drop(pending);
            for upgraded in firsts {
                self.unacknowledged.sub();
                acked(upgraded);
            }
        }
    }
}

/// A copy kept for a message not sent yet: removed on drop unless the message went.
struct Unsent<'a>(&'a Outbox, Option<u64>);

impl Unsent<'_> {
    fn disarm(mut self) {
        self.1 = None;
    }
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.1
            && lock(&self.0.pending).remove(&id).is_some()
        {
            self.0.unacknowledged.sub();
        }
    }
}

fn ended() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the hand-over window ended")
}
