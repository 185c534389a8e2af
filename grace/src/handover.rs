//! The channel on which one generation passes its idle HTTP/1 connections to the next at an
//! upgrade: a `SOCK_SEQPACKET` Unix socket pair, one message per connection, carrying the
//! connection's socket (`SCM_RIGHTS`) and the bytes already read from it but not yet parsed.
//!
//! ```text
//!  old generation                                  new generation
//!  Outbox::send(socket, buffered)  ── message ──►  Inbox::recv() → (socket, buffered)
//!      [TAG][buffered bytes…] + SCM_RIGHTS(socket)
//! ```
//!
//! A message is atomic (`SEQPACKET`): the socket and its bytes arrive together or not at all.
//! Once `sendmsg` returns, the kernel holds a reference to the socket in the receiver's
//! queue: the sender closes its own copy without shutting the socket down (a shutdown would
//! reach the new generation's copy too). If the receiver dies before reading, the kernel
//! closes what was queued: its clients see the connection close, as they would have without
//! a hand-over.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use bytes::Bytes;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::count::Count;
use crate::latch::Latch;

/// The most bytes a connection may carry along (a request head still arriving, pipelined
/// requests). A connection with more is not handed over: it is closed as without a hand-over.
pub(crate) const MAX_BUFFERED: usize = 64 * 1024;

/// The first byte of every message: a message is never empty, so an empty read is the end.
const TAG: u8 = b'C';

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
    /// How long the drain hands connections over before it closes those left.
    window: Duration,
    /// Set when the hand-over window ends: the connections left close as without one.
    closed: Latch<()>,
    /// Hand-overs under way (see [`Outbox::sending`]).
    sending: Count,
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
            fd: crate::sys::async_fd(fd, Interest::WRITABLE)?,
            window,
            closed: Latch::new(),
            sending: Count::default(),
        })
    }

    /// How long connections may be handed over, from the start of the drain.
    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// The window is open: connections may still be handed over.
    pub(crate) fn is_open(&self) -> bool {
        !self.closed.is_set()
    }

    /// Ends the window (once; later calls do nothing).
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

    /// Once the window has ended: resolves when no hand-over is under way any more (each
    /// ends promptly then: a send waiting for room gives up), so that what was handed over
    /// is counted in full.
    pub(crate) async fn settled(&self) {
        self.sending.zero().await;
    }

    /// Passes `socket` on, with the bytes already read from it (in order). Waits while the
    /// channel is full, until the window ends.
    pub(crate) async fn send(&self, socket: BorrowedFd<'_>, buffered: &[&[u8]]) -> io::Result<()> {
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
        let tag = [TAG];
        let mut iov = Vec::with_capacity(buffered.len() + 1);
        iov.push(IoSlice::new(&tag));
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
        tokio::select! {
            sent = sending => sent,
            _ = self.closed() => Err(ended()),
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
            fd: crate::sys::async_fd(fd, Interest::READABLE)?,
            buf: vec![0; MAX_BUFFERED + 1].into_boxed_slice(),
        })
    }

    /// The next connection handed over, with its buffered bytes; `None` once the old
    /// generation has closed its end.
    pub(crate) async fn recv(&mut self) -> io::Result<Option<(OwnedFd, Bytes)>> {
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
            if flags.contains(ReturnFlags::TRUNC) || buf[0] != TAG {
                // Never sent by a sender of this version: drop the connection (it closes).
                tracing::warn!(len = n, "malformed hand-over message: connection closed");
                continue;
            }
            return Ok(Some((socket, Bytes::copy_from_slice(&buf[1..n]))));
        }
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

    #[tokio::test]
    async fn a_socket_and_its_bytes_arrive_together_and_the_end_is_seen() {
        let (ours, theirs) = pair().unwrap();
        let outbox = Outbox::new(ours, Duration::from_secs(5)).unwrap();
        let mut inbox = Inbox::new(theirs).unwrap();
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        outbox
            .send(b.as_fd(), &[b"GET / HT", b"TP/1.1\r\n"])
            .await
            .unwrap();
        drop(b); // our copy: the one in flight keeps the socket open
        let (socket, buffered) = inbox.recv().await.unwrap().unwrap();
        assert_eq!(&buffered[..], b"GET / HTTP/1.1\r\n");
        let mut b = std::os::unix::net::UnixStream::from(socket);
        a.write_all(b"ping").unwrap();
        let mut got = [0; 4];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        // An empty buffer still makes a message.
        outbox.send(a.as_fd(), &[]).await.unwrap();
        let (_, buffered) = inbox.recv().await.unwrap().unwrap();
        assert!(buffered.is_empty());
        drop(outbox);
        assert!(inbox.recv().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn settled_waits_for_the_hand_overs_under_way() {
        let (ours, _theirs) = pair().unwrap();
        let outbox = Outbox::new(ours, Duration::from_secs(5)).unwrap();
        outbox.settled().await; // none under way
        let one = outbox.sending();
        let two = outbox.sending();
        let mut settled = tokio_test::task::spawn(outbox.settled());
        assert!(settled.poll().is_pending());
        drop(one);
        assert!(settled.poll().is_pending(), "one is still under way");
        drop(two);
        assert!(settled.is_woken());
        assert!(settled.poll().is_ready());
    }

    #[tokio::test]
    async fn too_many_bytes_are_refused_and_a_closed_window_stops_a_blocked_send() {
        let (ours, theirs) = pair().unwrap();
        let outbox = Outbox::new(ours, Duration::from_secs(5)).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let big = vec![b'x'; MAX_BUFFERED + 1];
        let err = outbox.send(a.as_fd(), &[&big]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // Nobody reads: the channel fills, and a send waits until the window ends.
        let chunk = vec![b'y'; MAX_BUFFERED];
        let chunks: [&[u8]; 1] = [&chunk];
        let mut sent = 0;
        loop {
            let send = outbox.send(a.as_fd(), &chunks);
            match tokio::time::timeout(Duration::from_millis(50), send).await {
                Ok(r) => {
                    r.unwrap();
                    sent += 1;
                    assert!(sent < 10_000, "the channel never filled");
                }
                Err(_) => break,
            }
        }
        outbox.close();
        assert!(!outbox.is_open());
        let err = outbox.send(a.as_fd(), &chunks).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(theirs);
    }
}
