//! The channel on which one generation passes its HTTP/1 connections to the next at an
//! upgrade: a `SOCK_SEQPACKET` Unix socket pair, one message per connection, carrying the
//! connection's socket (`SCM_RIGHTS`), what it is known to be, and the bytes already read
//! from it but not yet parsed; the new generation answers each with an acknowledgement.
//!
//! ```text
//!  old generation                                        new generation
//!  Outbox::send(socket, kind, buffered) ── message ──►  Inbox::recv() → Handed
//!      [TAG][kind][id: u64][buffered bytes…] + SCM_RIGHTS(socket)
//!  Outbox::acks() (counts it handed over) ◄── [ACK][id] ──  (before it is served)
//! ```
//!
//! A message is atomic (`SEQPACKET`): the socket and its bytes arrive together or not at all.
//! A connection counts as handed over only once the new generation acknowledged it: until
//! then the old one keeps a copy of its socket (a second descriptor, never shut down: a
//! shutdown would reach the new generation's copy too), so that if the new generation dies
//! or hangs up first, the old one takes the connection back ([`Outbox::take_back`]) and
//! serves it itself. The new generation serves a connection only once its acknowledgement
//! was sent, or once the old generation closed its end (then the old one keeps no copy):
//! exactly one of the two serves it.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::base::count::Count;
use crate::base::latch::Latch;
use crate::base::lock;

/// The most bytes a connection may carry along (a request head still arriving, pipelined
/// requests). A connection with more stays with the old generation.
pub(crate) const MAX_BUFFERED: usize = 64 * 1024;

/// The first byte of every message: a message is never empty, so an empty read is the end.
const TAG: u8 = b'C';
/// The first byte of an acknowledgement.
const ACK: u8 = b'A';
/// Tag, kind and id.
const HEADER: usize = 1 + 1 + 8;

/// What a connection handed over is known to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// HTTP/1, between two requests.
    Http1,
    /// Nothing told yet: no byte, or the first bytes of HTTP/2's preface (`P`, `PRI`…),
    /// which could still be either. The receiver tells it from what comes.
    Unknown,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Http1 => b'1',
            Kind::Unknown => b'?',
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            b'1' => Some(Kind::Http1),
            b'?' => Some(Kind::Unknown),
            _ => None,
        }
    }
}

/// A connection on its way: its socket, what it is, the bytes read from it but not parsed.
#[derive(Debug)]
pub(crate) struct Handed {
    pub(crate) socket: OwnedFd,
    pub(crate) kind: Kind,
    pub(crate) buffered: Bytes,
    pub(crate) origin: Origin,
}

impl Handed {
    /// A copy of `socket` (a second descriptor), with its bytes joined.
    pub(crate) fn copy_of(
        socket: BorrowedFd<'_>,
        kind: Kind,
        buffered: &[&[u8]],
        origin: Origin,
    ) -> io::Result<Handed> {
        Ok(Handed {
            socket: socket.try_clone_to_owned()?,
            kind,
            buffered: Bytes::from(buffered.concat()),
            origin,
        })
    }
}

/// Where a connection served from a hand-over comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The previous generation (counted as received).
    Previous,
    /// Back from a hand-over of this process's own that did not take it (the window ended,
    /// or the next generation went): offered again at the next hand-over.
    Back,
    /// Back because it cannot go (more bytes than a hand-over carries): it stays here, never
    /// offered again.
    Stays,
}

/// A connected pair: (ours, the new generation's). Both close-on-exec (the child's copy is
/// passed explicitly) and ours non-blocking.
pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::io::ioctl_fionbio(&ours, true)?;
    Ok((ours, theirs))
}

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
    /// Acknowledged, and read from by a receiver that then went: what it read is lost with
    /// it, so they are shut down (their clients see the end, as without a hand-over).
    pub(crate) lost: usize,
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
        })
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
        if !self.is_open() {
            return Err(ended());
        }
        let len: usize = buffered.iter().map(|b| b.len()).sum();
        if len > MAX_BUFFERED {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} buffered bytes: more than a hand-over carries"),
            ));
        }
        // Our copy, in place before the message can be acknowledged.
        let handed = Handed::copy_of(socket, kind, buffered, Origin::Back)?;
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
        let mut iov = Vec::with_capacity(buffered.len() + 1);
        iov.push(IoSlice::new(&header));
        iov.extend(buffered.iter().map(|b| IoSlice::new(b)));
        let fds = [socket];
        let sending = async {
            loop {
                let sent = self.fd.async_io(Interest::WRITABLE, |fd| {
                    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                    let mut control = SendAncillaryBuffer::new(&mut space);
                    control.push(SendAncillaryMessage::ScmRights(&fds));
                    // NOSIGNAL: a receiver gone is an error here (EPIPE), not a SIGPIPE.
                    rustix::net::sendmsg(fd, &iov, &mut control, SendFlags::NOSIGNAL)
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
    /// has, until the receiver hangs up: then resolves, with the error if the channel
    /// failed. Our copies stay until the hand-over is complete (the outbox dropped), or are
    /// taken back ([`take_back`](Self::take_back)).
    pub(crate) async fn acks(&self, acked: impl Fn()) -> io::Result<()> {
        let mut buf = [0u8; 64];
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
            if n != HEADER - 1 || buf[0] != ACK {
                tracing::warn!(len = n, "malformed hand-over acknowledgement: ignored");
                continue;
            }
            let id = u64::from_le_bytes(buf[1..9].try_into().unwrap_or_default());
            let first = match lock(&self.pending).get_mut(&id) {
                Some(p) if !p.acknowledged => {
                    p.acknowledged = true;
                    true
                }
                _ => false,
            };
            if first {
                self.unacknowledged.sub();
                acked();
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

/// The new generation's end.
pub(crate) struct Inbox {
    fd: AsyncFd<OwnedFd>,
    buf: Box<[u8]>,
}

impl Inbox {
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Inbox> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        Ok(Inbox {
            fd: crate::sys::async_fd(fd, Interest::READABLE | Interest::WRITABLE)?,
            buf: vec![0; MAX_BUFFERED + HEADER + 1].into_boxed_slice(),
        })
    }

    /// The next connection handed over, acknowledged (it is ours to serve); `None` once the
    /// old generation has closed its end.
    pub(crate) async fn recv(&mut self) -> io::Result<Option<Handed>> {
        loop {
            let Inbox { fd, buf } = self;
            let (n, flags, socket) = fd
                .async_io(Interest::READABLE, |fd| receive(fd.as_fd(), buf))
                .await?;
            if n == 0 {
                return Ok(None);
            }
            let Some(socket) = socket else {
                tracing::warn!("hand-over message without a socket: ignored");
                continue;
            };
            let kind = buf.get(1).copied().and_then(Kind::from_byte);
            let (Some(kind), false, true) = (
                kind,
                flags.contains(ReturnFlags::TRUNC),
                n >= HEADER && buf[0] == TAG,
            ) else {
                // Never sent by a sender of this version: drop the connection (it closes).
                tracing::warn!(len = n, "malformed hand-over message: connection closed");
                continue;
            };
            let mut ack = [0u8; HEADER - 1];
            ack[0] = ACK;
            ack[1..].copy_from_slice(&buf[2..HEADER]);
            let buffered = Bytes::copy_from_slice(&buf[HEADER..n]);
            match self.acknowledge(&ack).await {
                Ok(()) => {}
                // The old generation closed its end: it kept no copy, the connection is ours.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                Err(e) => {
                    // Unacknowledged, the old generation takes it back: not ours to serve.
                    tracing::warn!(error = %e, "cannot acknowledge a connection handed over: left to the old generation");
                    continue;
                }
            }
            return Ok(Some(Handed {
                socket,
                kind,
                buffered,
                origin: Origin::Previous,
            }));
        }
    }

    async fn acknowledge(&self, ack: &[u8]) -> io::Result<()> {
        self.fd
            .async_io(Interest::WRITABLE, |fd| {
                rustix::net::send(fd, ack, SendFlags::NOSIGNAL).map_err(io::Error::from)
            })
            .await
            .map(|_| ())
    }
}

/// One `recvmsg`: the bytes, the flags, and the socket that came with them, if any.
fn receive(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, ReturnFlags, Option<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    // CMSG_CLOEXEC: a received socket never leaks into a process this one starts.
    let msg = rustix::net::recvmsg(fd, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut socket = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            // One socket per message; any extra descriptor is dropped (closed).
            for fd in fds {
                socket.get_or_insert(fd);
            }
        }
    }
    Ok((msg.bytes, msg.flags, socket))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn a_socket_its_kind_and_its_bytes_arrive_together_and_are_acknowledged() {
        let (ours, theirs) = pair().unwrap();
        let outbox = Outbox::new(ours, Duration::from_secs(5)).unwrap();
        let mut inbox = Inbox::new(theirs).unwrap();
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        outbox
            .send(b.as_fd(), Kind::Http1, &[b"GET / HT", b"TP/1.1\r\n"])
            .await
            .unwrap();
        assert_eq!(outbox.unacknowledged(), 1, "kept until acknowledged");
        drop(b); // our copy: the one in flight keeps the socket open
        let handed = inbox.recv().await.unwrap().unwrap();
        assert_eq!(&handed.buffered[..], b"GET / HTTP/1.1\r\n");
        assert_eq!(handed.kind, Kind::Http1);
        let mut b = std::os::unix::net::UnixStream::from(handed.socket);
        a.write_all(b"ping").unwrap();
        let mut got = [0; 4];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        // An empty buffer still makes a message; a connection not told yet says so.
        outbox.send(a.as_fd(), Kind::Unknown, &[]).await.unwrap();
        let handed = inbox.recv().await.unwrap().unwrap();
        assert!(handed.buffered.is_empty());
        assert_eq!(handed.kind, Kind::Unknown);
        // Both acknowledged: counted, copies gone; then the receiver hangs up.
        let acked = AtomicUsize::new(0);
        drop(inbox);
        outbox
            .acks(|| {
                acked.fetch_add(1, Ordering::Relaxed);
            })
            .await
            .unwrap();
        assert_eq!(acked.load(Ordering::Relaxed), 2);
        assert_eq!(outbox.unacknowledged(), 0);
        // Kept until the hand-over is complete; a receiver gone that never read from them
        // gives them back (Unix sockets: read counts cannot be told, so only unacknowledged
        // ones would come back).
        let taken = outbox.take_back();
        assert_eq!((taken.back.len(), taken.lost), (0, 2));
    }

    #[tokio::test]
    async fn what_the_receiver_did_not_acknowledge_is_taken_back_with_its_bytes() {
        let (ours, theirs) = pair().unwrap();
        let outbox = Outbox::new(ours, Duration::from_secs(5)).unwrap();
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        outbox
            .send(b.as_fd(), Kind::Unknown, &[b"PR"])
            .await
            .unwrap();
        drop(b);
        // The receiver dies without reading: the kernel closes what was queued to it.
        drop(theirs);
        // The hang-up ends the acknowledgements (ECONNRESET: it left messages unread).
        let acks = outbox.acks(|| panic!("nothing was acknowledged"));
        let _ = tokio::time::timeout(Duration::from_secs(10), acks)
            .await
            .expect("the hang-up ends the acknowledgements");
        let mut taken = outbox.take_back();
        assert_eq!(taken.back.len(), 1);
        let h = taken.back.pop().unwrap();
        assert_eq!((h.kind, &h.buffered[..]), (Kind::Unknown, &b"PR"[..]));
        assert!(!outbox.is_open(), "taking back ends the window");
        // The connection is alive through our copy.
        let mut b = std::os::unix::net::UnixStream::from(h.socket);
        a.write_all(b"I").unwrap();
        let mut got = [0; 1];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"I");
    }

    #[tokio::test]
    async fn settled_waits_for_the_hand_overs_under_way() {
        let (ours, _theirs) = pair().unwrap();
        let outbox = Outbox::new(ours, Duration::from_secs(5)).unwrap();
        outbox.settled().await; // none under way
        let one = outbox.sending();
        let two = outbox.sending();
        assert!(!outbox.is_idle());
        let mut settled = tokio_test::task::spawn(outbox.settled());
        assert!(settled.poll().is_pending());
        drop(one);
        assert!(settled.poll().is_pending(), "one is still under way");
        drop(two);
        assert!(settled.is_woken());
        assert!(settled.poll().is_ready());
        assert!(outbox.is_idle());
    }

    #[tokio::test]
    async fn too_many_bytes_are_refused_and_a_closed_window_stops_a_blocked_send() {
        let (ours, theirs) = pair().unwrap();
        let outbox = Outbox::new(ours, Duration::from_secs(5)).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let big = vec![b'x'; MAX_BUFFERED + 1];
        let err = outbox
            .send(a.as_fd(), Kind::Http1, &[&big])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(outbox.unacknowledged(), 0, "not sent: no copy kept");
        // Nobody reads: the channel fills, and a send waits until the window ends.
        let chunk = vec![b'y'; MAX_BUFFERED];
        let chunks: [&[u8]; 1] = [&chunk];
        let mut sent = 0;
        loop {
            let send = outbox.send(a.as_fd(), Kind::Http1, &chunks);
            match tokio::time::timeout(Duration::from_millis(50), send).await {
                Ok(r) => {
                    r.unwrap();
                    sent += 1;
                    assert!(sent < 10_000, "the channel never filled");
                }
                Err(_) => break,
            }
        }
        assert_eq!(
            outbox.unacknowledged(),
            sent,
            "the send cut by the timeout left no copy"
        );
        outbox.close();
        assert!(!outbox.is_open());
        let err = outbox
            .send(a.as_fd(), Kind::Http1, &chunks)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(theirs);
    }
}
