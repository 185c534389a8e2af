//! [`Inbox`]: the new generation's end of the hand-over channel.

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
}

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
            let (upgraded, body) = match kind {
                Kind::Upgraded => match super::Upgraded::decode(&buf[HEADER..n]) {
                    Some((u, used)) => (Some(u), HEADER + used),
                    None => {
                        tracing::warn!(len = n, "malformed upgraded connection: closed");
                        continue;
                    }
                },
                _ => (None, HEADER),
            };
            let buffered = Bytes::copy_from_slice(&buf[body..n]);
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
                upgraded,
            }));
        }
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
