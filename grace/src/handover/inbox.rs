//! [`Inbox`]: the new generation's end of the hand-over channel.

use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use bytes::Bytes;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{ACK, HEADER, Handed, KINDS, Kind, MAX_BUFFERED, MAX_NAME, MAX_STATE, Origin, TAG};

/// The new generation's end.
pub(crate) struct Inbox {
    fd: AsyncFd<OwnedFd>,
    buf: Box<[u8]>,
    /// Received and acknowledged, not returned yet.
    ready: VecDeque<Handed>,
    /// The old generation closed its end.
    closed: bool,
}

/// The most connections read (and acknowledged in one message) at a time.
pub(crate) const BATCH: usize = 64;

/// The largest message: the header, an upgraded connection's kind name and state, its
/// bytes, and one more to tell a message cut short.
const MAX_MESSAGE: usize = HEADER + 2 + MAX_NAME + 4 + MAX_STATE + MAX_BUFFERED + 1;

impl Inbox {
    /// The new generation's end; tells the old generation first which kinds of upgraded
    /// connections it resumes (`kinds`: names, none with a line feed).
    pub(crate) fn new(fd: OwnedFd, kinds: &[String]) -> io::Result<Inbox> {
        super::no_sigpipe(&fd)?;
        let mut list = vec![KINDS];
        list.extend_from_slice(kinds.join("\n").as_bytes());
        // Blocking, once, into an empty channel: it cannot wait.
        rustix::net::send(&fd, &list, super::SEND_FLAGS)?;
        rustix::io::ioctl_fionbio(&fd, true)?;
        Ok(Inbox {
            fd: crate::sys::async_fd(fd, Interest::READABLE | Interest::WRITABLE)?,
            buf: vec![0; MAX_MESSAGE].into_boxed_slice(),
            ready: VecDeque::new(),
            closed: false,
        })
    }

    /// The next connection handed over, acknowledged (it is ours to serve); `None` once the
    /// old generation has closed its end.
    ///
    /// Connections come in batches: once one message is read, every message already queued
    /// (up to [`BATCH`]) is read too, and all of them are acknowledged in one message, so
    /// the channel costs two system calls per batch rather than per connection.
    pub(crate) async fn recv(&mut self) -> io::Result<Option<Handed>> {
        loop {
            if let Some(handed) = self.ready.pop_front() {
                return Ok(Some(handed));
            }
            if self.closed {
                return Ok(None);
            }
            self.recv_batch().await?;
        }
    }

    /// Reads what is queued (waiting for the first message), acknowledges it all at once.
    async fn recv_batch(&mut self) -> io::Result<()> {
        let mut ack = vec![ACK];
        let mut batch = Vec::new();
        let mut first = true;
        while batch.len() < BATCH {
            let Inbox { fd, buf, .. } = self;
            let got = match first {
                true => {
                    fd.async_io(Interest::READABLE, |fd| receive(fd.as_fd(), buf))
                        .await
                }
                // The descriptor is non-blocking: what is not queued yet is for next time.
                false => receive(fd.get_ref().as_fd(), buf),
            };
            let (n, flags, socket) = match got {
                Ok(got) => got,
                Err(e) if !first && e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if !first => {
                    // Reported at the next read, once what came is acknowledged.
                    tracing::debug!(error = %e, "hand-over channel: read failed");
                    break;
                }
                Err(e) => return Err(e),
            };
            first = false;
            if n == 0 {
                self.closed = true;
                break;
            }
            if let Some((handed, id)) = parse(&self.buf[..n], flags, socket) {
                ack.extend_from_slice(&id);
                batch.push(handed);
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        match self.acknowledge(&ack).await {
            Ok(()) => {}
            // The old generation closed its end: it kept no copies, the connections are ours.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
            Err(e) => {
                // Unacknowledged, the old generation takes them back: not ours to serve.
                tracing::warn!(error = %e, connections = batch.len(), "cannot acknowledge connections handed over: left to the old generation");
                return Ok(());
            }
        }
        self.ready.extend(batch);
        Ok(())
    }

    async fn acknowledge(&self, ack: &[u8]) -> io::Result<()> {
        self.fd
            .async_io(Interest::WRITABLE, |fd| {
                rustix::net::send(fd, ack, super::SEND_FLAGS).map_err(io::Error::from)
            })
            .await
            .map(|_| ())
    }
}

/// A message read: the connection it carries and its id (to acknowledge), or `None` if it
/// does not make one (its socket, if any, closes).
fn parse(
    msg: &[u8],
    flags: ReturnFlags,
    socket: Option<OwnedFd>,
) -> Option<(Handed, [u8; HEADER - 2])> {
    let n = msg.len();
    let Some(socket) = socket else {
        tracing::warn!("hand-over message without a socket: ignored");
        return None;
    };
    let kind = msg.get(1).copied().and_then(Kind::from_byte);
    let (Some(kind), false, true) = (
        kind,
        flags.contains(ReturnFlags::TRUNC),
        n >= HEADER && msg[0] == TAG,
    ) else {
        // Never sent by a sender of this version: drop the connection (it closes).
        tracing::warn!(len = n, "malformed hand-over message: connection closed");
        return None;
    };
    let mut id = [0u8; HEADER - 2];
    id.copy_from_slice(&msg[2..HEADER]);
    let (upgraded, body) = match kind {
        Kind::Upgraded => match super::Upgraded::decode(&msg[HEADER..]) {
            Some((u, used)) => (Some(u), HEADER + used),
            None => {
                tracing::warn!(len = n, "malformed upgraded connection: closed");
                return None;
            }
        },
        _ => (None, HEADER),
    };
    let handed = Handed {
        socket,
        kind,
        buffered: Bytes::copy_from_slice(&msg[body..]),
        origin: Origin::Previous,
        upgraded,
    };
    Some((handed, id))
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
    #[cfg(target_os = "linux")]
    let flags = RecvFlags::CMSG_CLOEXEC;
    // Elsewhere the flag may be missing: set on the socket once received (see below).
    #[cfg(not(target_os = "linux"))]
    let flags = RecvFlags::empty();
    let msg = rustix::net::recvmsg(fd, &mut iov, &mut control, flags)?;
    let mut socket = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            // One socket per message; any extra descriptor is dropped (closed).
            for fd in fds {
                socket.get_or_insert(fd);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    if let Some(socket) = &socket {
        crate::sys::set_cloexec(&[socket])?;
    }
    Ok((msg.bytes, msg.flags, socket))
}
