//! The channel on which one generation passes its connections to the next at an upgrade
//! (HTTP/1 between requests, and upgraded connections whose handler opted in: see
//! [`Movable`](crate::Movable)): a `SOCK_SEQPACKET` Unix socket pair, one message per
//! connection, carrying the connection's socket (`SCM_RIGHTS`), what it is known to be, and
//! the bytes already read from it but not yet processed; the new generation answers each
//! with an acknowledgement.
//!
//! ```text
//!  old generation                                        new generation
//!  Outbox::kinds() (what it resumes)     ◄── [KINDS][name\nname…] ──  Inbox::new(names)
//!  Outbox::send(socket, kind, buffered) ── message ──►  Inbox::recv() → Handed
//!      [TAG][kind][id: u64][upgraded: flags, name, state]?[buffered bytes…] + SCM_RIGHTS(socket)
//!  Outbox::acks() (counts it handed over) ◄── [ACK][id][id…] ──  (one per batch read, before they are served)
//! ```
//!
//! An upgraded connection carries, after the header, `[flags: u8][name length: u8][name]
//! [state length: u32 LE][state]`: the kind name its handler gave, the handler's own state
//! (at most [`MAX_STATE`] bytes), and whether it is read as WebSocket frames.
//!
//! A message is atomic (`SEQPACKET`): the socket and its bytes arrive together or not at all.
//! A connection counts as handed over only once the new generation acknowledged it: until
//! then the old one keeps a copy of its socket (a second descriptor, never shut down: a
//! shutdown would reach the new generation's copy too), so that if the new generation dies
//! or hangs up first, the old one takes the connection back ([`Outbox::take_back`]) and
//! serves it itself. The new generation serves a connection only once its acknowledgement
//! was sent, or once the old generation closed its end (then the old one keeps no copy):
//! exactly one of the two serves it.

//!
//! - `outbox`: the old generation's end (send, acknowledgements, taking back).
//! - `inbox`: the new generation's end (receive, acknowledge).
//! - `upgrade`: the one loop that owns an upgrade's hand-over, from the new generation's
//!   readiness until every connection is acknowledged or taken back.
//!
//! Where it runs: Unix, except macOS, which has no `SOCK_SEQPACKET` for Unix-domain sockets
//! (see [`SUPPORTED`]: there an upgrade hands over the listeners, and the old generation's
//! connections drain). On Windows only the kinds and origins below, which a connection's
//! task reads, are compiled.

#[cfg(unix)]
use std::io;
#[cfg(unix)]
use std::os::fd::{BorrowedFd, OwnedFd};

#[cfg(unix)]
use bytes::Bytes;
#[cfg(unix)]
use rustix::net::{AddressFamily, SocketFlags, SocketType};

#[cfg(unix)]
pub(crate) mod inbox;
#[cfg(unix)]
pub(crate) mod outbox;
#[cfg(unix)]
pub(crate) mod upgrade;

/// The most bytes a connection may carry along (a request head still arriving, pipelined
/// requests). A connection with more stays with the old generation.
#[cfg(unix)]
pub(crate) const MAX_BUFFERED: usize = 64 * 1024;

/// The most bytes of its own state an upgraded connection's handler may pass along.
#[cfg(unix)]
pub(crate) const MAX_STATE: usize = 64 * 1024;

/// The longest kind name of an upgraded connection (its length travels in one byte).
#[cfg(unix)]
pub(crate) const MAX_NAME: usize = 255;

/// The first byte of every message: a message is never empty, so an empty read is the end.
#[cfg(unix)]
pub(super) const TAG: u8 = b'C';
/// The first byte of the new generation's first message: the kinds of upgraded connections
/// it resumes.
#[cfg(unix)]
pub(super) const KINDS: u8 = b'K';
/// The first byte of an acknowledgement.
#[cfg(unix)]
pub(super) const ACK: u8 = b'A';
/// Tag, kind and id.
#[cfg(unix)]
pub(super) const HEADER: usize = 1 + 1 + 8;

/// What a connection handed over is known to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(unix), allow(dead_code))] // read by a connection's task, never made there
pub(crate) enum Kind {
    /// HTTP/1, between two requests.
    Http1,
    /// Nothing told yet: no byte, or the first bytes of HTTP/2's preface (`P`, `PRI`…),
    /// which could still be either. The receiver tells it from what comes.
    Unknown,
    /// Upgraded (a WebSocket…), resumed by the handler registered for its name (see
    /// [`Upgraded`]).
    Upgraded,
}

#[cfg(unix)]
impl Kind {
    pub(super) fn byte(self) -> u8 {
        match self {
            Kind::Http1 => b'1',
            Kind::Unknown => b'?',
            Kind::Upgraded => b'U',
        }
    }

    pub(super) fn from_byte(b: u8) -> Option<Kind> {
        match b {
            b'1' => Some(Kind::Http1),
            b'?' => Some(Kind::Unknown),
            b'U' => Some(Kind::Upgraded),
            _ => None,
        }
    }
}

/// A connection on its way: its socket, what it is, the bytes read from it but not parsed.
#[cfg(unix)]
#[derive(Debug)]
pub(crate) struct Handed {
    pub(crate) socket: OwnedFd,
    pub(crate) kind: Kind,
    pub(crate) buffered: Bytes,
    pub(crate) origin: Origin,
    /// For [`Kind::Upgraded`]: what its handler passes along.
    pub(crate) upgraded: Option<Upgraded>,
}

/// What an upgraded connection's handler passes along with its socket.
#[cfg(unix)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Upgraded {
    /// The kind name, which picks the handler that resumes it.
    pub(crate) name: String,
    /// Read as WebSocket frames (see `conn::frames`).
    pub(crate) websocket: bool,
    /// The handler's own state (at most [`MAX_STATE`] bytes).
    pub(crate) state: Bytes,
}

#[cfg(unix)]
impl Upgraded {
    /// Its bytes on the wire (after the header): flags, name, state.
    pub(super) fn encode(&self) -> io::Result<Vec<u8>> {
        if self.name.len() > MAX_NAME || self.state.len() > MAX_STATE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "kind name of {} bytes, state of {}: more than a hand-over carries",
                    self.name.len(),
                    self.state.len()
                ),
            ));
        }
        let mut out = Vec::with_capacity(2 + self.name.len() + 4 + self.state.len());
        out.push(u8::from(self.websocket));
        out.push(self.name.len() as u8);
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(self.state.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.state);
        Ok(out)
    }

    /// Reads one from the start of `bytes`: it, and where the bytes after it begin. `None`
    /// if they do not make one.
    pub(super) fn decode(bytes: &[u8]) -> Option<(Upgraded, usize)> {
        let (&flags, rest) = bytes.split_first()?;
        let (&len, rest) = rest.split_first()?;
        let name = std::str::from_utf8(rest.get(..usize::from(len))?).ok()?;
        let rest = &rest[usize::from(len)..];
        let state_len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let state = rest.get(4..4usize.checked_add(state_len)?)?;
        if state_len > MAX_STATE || flags > 1 {
            return None;
        }
        let used = 2 + usize::from(len) + 4 + state_len;
        let upgraded = Upgraded {
            name: name.to_owned(),
            websocket: flags == 1,
            state: Bytes::copy_from_slice(state),
        };
        Some((upgraded, used))
    }
}

#[cfg(unix)]
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
            upgraded: None,
        })
    }
}

/// Where a connection served from a hand-over comes from.
#[cfg(unix)]
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

/// Whether connections can be handed over here: not on macOS (or iOS), which has no
/// `SOCK_SEQPACKET` for Unix-domain sockets; an upgrade there hands over the listeners only,
/// and the old generation's connections drain.
#[cfg(unix)]
pub(crate) const SUPPORTED: bool = cfg!(not(target_vendor = "apple"));

/// A connected pair: (ours, the new generation's). Both close-on-exec (the child's copy is
/// passed explicitly) and ours non-blocking.
#[cfg(unix)]
pub(crate) fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    #[cfg(target_os = "linux")]
    let flags = SocketFlags::CLOEXEC;
    // Elsewhere the flag may be missing: set after the call (see `sys::set_cloexec`).
    #[cfg(not(target_os = "linux"))]
    let flags = SocketFlags::empty();
    let (ours, theirs) =
        rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, flags, None)?;
    #[cfg(not(target_os = "linux"))]
    crate::sys::set_cloexec(&[&ours, &theirs])?;
    no_sigpipe(&ours)?;
    rustix::io::ioctl_fionbio(&ours, true)?;
    Ok((ours, theirs))
}

/// Flags for every send on the channel: a receiver gone is an error (`EPIPE`), never a
/// `SIGPIPE` (`MSG_NOSIGNAL`; on macOS, which lacks it, the socket's `SO_NOSIGPIPE` instead,
/// see [`no_sigpipe`]).
#[cfg(all(unix, not(target_vendor = "apple")))]
pub(super) const SEND_FLAGS: rustix::net::SendFlags = rustix::net::SendFlags::NOSIGNAL;
#[cfg(target_vendor = "apple")]
pub(super) const SEND_FLAGS: rustix::net::SendFlags = rustix::net::SendFlags::empty();

/// On macOS, sets `SO_NOSIGPIPE` on our end of the channel (see [`SEND_FLAGS`]); elsewhere
/// each send says so itself.
#[cfg(unix)]
pub(super) fn no_sigpipe(fd: &OwnedFd) -> io::Result<()> {
    #[cfg(target_vendor = "apple")]
    rustix::net::sockopt::set_socket_nosigpipe(fd, true)?;
    let _ = fd;
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::inbox::Inbox;
    use super::outbox::Outbox;
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    #[tokio::test]
    async fn a_socket_its_kind_and_its_bytes_arrive_together_and_are_acknowledged() {
        let (ours, theirs) = pair().unwrap();
        let outbox = Outbox::new(ours, Duration::from_secs(5)).unwrap();
        let mut inbox = Inbox::new(theirs, &[]).unwrap();
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
            .acks(|_| {
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
    async fn an_upgraded_connection_travels_with_its_kind_state_and_unread_bytes() {
        let (ours, theirs) = pair().unwrap();
        let outbox = Outbox::new(ours, Duration::from_secs(5)).unwrap();
        // The receiver says what it resumes before anything is sent.
        let mut inbox = Inbox::new(theirs, &["ws-echo".into(), "chat".into()]).unwrap();
        outbox.read_kinds();
        assert!(outbox.takes("chat", 1) && outbox.takes("ws-echo", 1));
        assert!(!outbox.takes("other", 1), "a kind it does not resume");
        outbox.decline(1);
        assert!(
            !outbox.takes("chat", 1) && outbox.takes("chat", 2),
            "declined once"
        );
        let (_a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let state = Bytes::from(vec![7u8; MAX_STATE]);
        let upgraded = Upgraded {
            name: "chat".into(),
            websocket: true,
            state: state.clone(),
        };
        // The most of both: a full state and a full buffer.
        let unread = vec![b'u'; MAX_BUFFERED];
        outbox
            .send_upgraded(b.as_fd(), upgraded.clone(), &[&unread])
            .await
            .unwrap();
        let handed = inbox.recv().await.unwrap().unwrap();
        assert_eq!(handed.kind, Kind::Upgraded);
        assert_eq!(handed.upgraded.as_ref(), Some(&upgraded));
        assert_eq!(handed.buffered.len(), MAX_BUFFERED);
        // Acknowledged as upgraded.
        drop(inbox);
        let upgraded_acks = AtomicUsize::new(0);
        outbox
            .acks(|u| {
                assert!(u);
                upgraded_acks.fetch_add(1, Ordering::Relaxed);
            })
            .await
            .unwrap();
        assert_eq!(upgraded_acks.load(Ordering::Relaxed), 1);
        // A state beyond the bound is refused, and nothing is kept.
        let too_big = Upgraded {
            state: Bytes::from(vec![0u8; MAX_STATE + 1]),
            ..upgraded
        };
        let err = outbox
            .send_upgraded(b.as_fd(), too_big, &[])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(outbox.unacknowledged(), 0);
    }

    #[tokio::test]
    async fn connections_queued_together_arrive_in_order_and_are_all_acknowledged() {
        let (ours, theirs) = pair().unwrap();
        let outbox = Outbox::new(ours, Duration::from_secs(5)).unwrap();
        let mut inbox = Inbox::new(theirs, &[]).unwrap();
        outbox.read_kinds();
        // More than one batch, all queued before the receiver reads.
        let n = inbox::BATCH * 2 + 5;
        let (_a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        for i in 0..n {
            let bytes = i.to_string();
            outbox
                .send(b.as_fd(), Kind::Http1, &[bytes.as_bytes()])
                .await
                .unwrap();
        }
        for i in 0..n {
            let handed = inbox.recv().await.unwrap().unwrap();
            assert_eq!(&handed.buffered[..], i.to_string().as_bytes(), "in order");
        }
        drop(inbox);
        let acked = AtomicUsize::new(0);
        outbox
            .acks(|_| {
                acked.fetch_add(1, Ordering::Relaxed);
            })
            .await
            .unwrap();
        assert_eq!(acked.load(Ordering::Relaxed), n);
        assert_eq!(outbox.unacknowledged(), 0);
    }

    #[test]
    fn an_upgraded_header_that_does_not_add_up_is_refused() {
        let good = Upgraded {
            name: "n".into(),
            websocket: false,
            state: Bytes::from_static(b"st"),
        };
        let wire = good.encode().unwrap();
        assert_eq!(Upgraded::decode(&wire), Some((good, wire.len())));
        // Cut anywhere: not one.
        for cut in 0..wire.len() {
            assert_eq!(Upgraded::decode(&wire[..cut]), None, "cut at {cut}");
        }
        // A state length at the limit of arithmetic, an unknown flag, a name not UTF-8.
        let mut huge = wire.clone();
        huge[3..7].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Upgraded::decode(&huge), None);
        let mut flag = wire.clone();
        flag[0] = 2;
        assert_eq!(Upgraded::decode(&flag), None);
        let mut name = wire;
        name[2] = 0xff;
        assert_eq!(Upgraded::decode(&name), None);
    }

    #[tokio::test]
    async fn without_a_list_of_kinds_no_upgraded_connection_is_wanted() {
        let (ours, _theirs) = pair().unwrap();
        let outbox = Outbox::new(ours, Duration::from_secs(5)).unwrap();
        outbox.read_kinds(); // an older receiver: it sent none
        assert!(!outbox.takes("ws-echo", 0));
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
        let acks = outbox.acks(|_| panic!("nothing was acknowledged"));
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
