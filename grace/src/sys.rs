//! The one module with `unsafe`: raw file descriptors that syscalls hand us.
//!
//! Everything here wraps a syscall that takes or returns a bare descriptor: shutting down or
//! closing in place a tracked connection's socket from outside its owner, adopting an
//! inherited listening socket, and laying out descriptors for a child process.
//!
//! The rest of the crate names a socket's handle with Unix's words, imported from here:
//! [`RawFd`], [`AsRawFd`], [`BorrowedFd`], [`AsFd`] are std's on Unix. On Windows they
//! stand for a socket's `SOCKET` ([`RawFd`], and [`AsRawFd`] for any `AsRawSocket`) and
//! for a file's handle ([`BorrowedFd`], [`AsFd`]: the null device `Tracker::close_idle`
//! may open, which Windows cannot put in a socket's place: see
//! [`SocketSlot::close_in_place`]). There only [`SocketSlot`] and
//! [`has_pending_connection`] exist: the rest serves the Unix-only parts (inherited
//! sockets, restarts, the hand-over of connections).

#[cfg(unix)]
pub(crate) use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
#[cfg(unix)]
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Mutex;

#[cfg(unix)]
use crate::error::InheritedFdError;

/// A socket's raw handle (see the module docs).
#[cfg(windows)]
pub(crate) type RawFd = std::os::windows::io::RawSocket;

/// Has a socket's raw handle: any `AsRawSocket` (see the module docs).
#[cfg(windows)]
pub(crate) trait AsRawFd {
    fn as_raw_fd(&self) -> RawFd;
}

#[cfg(windows)]
impl<T: std::os::windows::io::AsRawSocket> AsRawFd for T {
    fn as_raw_fd(&self) -> RawFd {
        self.as_raw_socket()
    }
}

/// A borrowed file handle (see the module docs).
#[cfg(windows)]
pub(crate) type BorrowedFd<'a> = std::os::windows::io::BorrowedHandle<'a>;

/// Has a file handle: any `AsHandle` (see the module docs).
#[cfg(windows)]
pub(crate) trait AsFd {
    fn as_fd(&self) -> BorrowedFd<'_>;
}

#[cfg(windows)]
impl<T: std::os::windows::io::AsHandle> AsFd for T {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.as_handle()
    }
}

/// The descriptor of a live connection's socket, reachable from outside the task that owns
/// the socket, so a drain can force the connection closed whatever hyper or an upgraded
/// handler is doing with it.
///
/// Invariant: the slot holds `Some(fd)` only while the socket that owns `fd` is open. The
/// owner calls [`SocketSlot::release`] before it closes the socket, under the same lock that
/// [`SocketSlot::shutdown`] takes, so a shutdown never reaches a reused descriptor number.
#[derive(Debug)]
pub(crate) struct SocketSlot(Mutex<Option<RawFd>>);

impl SocketSlot {
    pub(crate) fn new(fd: &impl AsRawFd) -> Self {
        SocketSlot(Mutex::new(Some(fd.as_raw_fd())))
    }

    /// Called by the owner right before the socket is closed.
    pub(crate) fn release(&self) {
        *crate::base::lock(&self.0) = None;
    }

    /// Takes the descriptor out of the slot for a hand-over to the next generation: from
    /// now on no shutdown from outside (a force, the idle timeout) reaches the socket, which
    /// the next generation is about to share. Lends the descriptor for as long as `owner`
    /// is borrowed; `owner` must be the stream that owns it (the one whose drop releases
    /// this slot). `None` if the slot was already released.
    #[cfg(unix)]
    pub(crate) fn take_lent<'a, T: ?Sized>(&self, owner: &'a T) -> Option<BorrowedFd<'a>> {
        let fd = crate::base::lock(&self.0).take()?;
        let _ = owner;
        // SAFETY: the slot held `fd`, so the socket owning it was open (the invariant above);
        // its owner is `owner` (this function's contract), borrowed for 'a, so it cannot be
        // dropped, and the descriptor closed, while the borrowed descriptor lives.
        Some(unsafe { BorrowedFd::borrow_raw(fd) })
    }

    /// Puts back a descriptor [`take_lent`](Self::take_lent) took, its hand-over having
    /// failed: `owner`, the open socket that owns it, is served on here.
    #[cfg(unix)]
    pub(crate) fn lend_back(&self, owner: &impl AsRawFd) {
        *crate::base::lock(&self.0) = Some(owner.as_raw_fd());
    }

    /// Shuts the socket down in both directions: the peer sees FIN, and every pending or
    /// future read on our side returns end-of-file, every write fails. Returns false if the
    /// socket was already closed.
    #[cfg(unix)]
    pub(crate) fn shutdown(&self) -> bool {
        let guard = crate::base::lock(&self.0);
        let Some(fd) = *guard else { return false };
        // SAFETY: `fd` is open: the owner releases the slot (under this lock, which we hold)
        // before it closes the descriptor, so the number cannot have been reused.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
        true
    }

    /// Whether bytes wait unread in the socket (`FIONREAD`): a client's first bytes that
    /// its task has not read yet. False once the socket is closed, or if the kernel cannot
    /// say.
    #[cfg(unix)]
    pub(crate) fn has_unread(&self) -> bool {
        let guard = crate::base::lock(&self.0);
        let Some(fd) = *guard else { return false };
        // SAFETY: as in `shutdown`: the lock is held, so the number is still the socket's.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        rustix::io::ioctl_fionread(fd).is_ok_and(|n| n > 0)
    }

    /// Closes the socket where it stands: its descriptor is made a copy of `null` (an open
    /// `/dev/null`), which releases the socket at once (the peer sees FIN, as after
    /// [`shutdown`](Self::shutdown), and the kernel frees it now, not at exit), while the
    /// number stays its owner's: socket calls on it fail (`ENOTSOCK`; its task parks on
    /// that error as on an end of stream, see `TrackedIo`), nothing is ever read from it,
    /// and the owner's close closes the copy. The slot is emptied: nothing is left to shut. Returns false if the socket
    /// was already closed, or could not be replaced (then it is shut down instead).
    #[cfg(unix)]
    pub(crate) fn close_in_place(&self, null: BorrowedFd<'_>) -> bool {
        let mut guard = crate::base::lock(&self.0);
        let Some(fd) = guard.take() else { return false };
        // SAFETY: `fd` is open (see `shutdown`), and stays its owner's: the `OwnedFd` made
        // here is never dropped (`ManuallyDrop`), so it closes nothing; `dup3` replaces what
        // the number refers to in one step, so the number is never free for reuse.
        let mut target = std::mem::ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(fd) });
        if replace_cloexec(null, &mut target).is_err() {
            // SAFETY: as in `shutdown`: the lock is held and the number is still the socket's.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
        }
        true
    }
}

/// Windows: the same operations on the socket's `SOCKET`, through Winsock.
#[cfg(windows)]
impl SocketSlot {
    /// Shuts the socket down in both directions (`shutdown(SD_BOTH)`): the peer sees FIN,
    /// and every pending or future read on our side ends, every write fails. Returns false if
    /// the socket was already closed.
    pub(crate) fn shutdown(&self) -> bool {
        use windows_sys::Win32::Networking::WinSock::{SD_BOTH, SOCKET, shutdown};
        let guard = crate::base::lock(&self.0);
        let Some(socket) = *guard else { return false };
        // SAFETY: `socket` is open: the owner releases the slot (under this lock, which we
        // hold) before it closes the socket, so the handle cannot have been reused; the call
        // takes a plain handle and touches no memory of ours.
        let _ = unsafe { shutdown(socket as SOCKET, SD_BOTH) };
        true
    }

    /// Whether bytes wait unread in the socket (`ioctlsocket(FIONREAD)`): a client's first
    /// bytes that its task has not read yet. False once the socket is closed, or if Winsock
    /// cannot say.
    pub(crate) fn has_unread(&self) -> bool {
        use windows_sys::Win32::Networking::WinSock::{FIONREAD, SOCKET, ioctlsocket};
        let guard = crate::base::lock(&self.0);
        let Some(socket) = *guard else { return false };
        let mut unread: u32 = 0;
        // SAFETY: as in `shutdown`: the lock is held, so the handle is still the socket's;
        // `unread` is a live u32 for the call to write, and FIONREAD writes one u32.
        let rc = unsafe { ioctlsocket(socket as SOCKET, FIONREAD, &mut unread) };
        rc == 0 && unread > 0
    }

    /// Windows cannot make a socket's handle another file's in place (Unix's `dup2` over
    /// it): the socket is shut down instead (see [`shutdown`](Self::shutdown)), and closes
    /// when its owner drops it. The slot is emptied as on Unix: nothing is left to shut.
    pub(crate) fn close_in_place(&self, _null: BorrowedFd<'_>) -> bool {
        let shut = self.shutdown();
        *crate::base::lock(&self.0) = None;
        shut
    }
}

/// Whether a connection waits in the accept queue of `listener`, a listening socket:
/// `WSAPoll` without waiting. False if Winsock cannot say.
#[cfg(windows)]
pub(crate) fn has_pending_connection(listener: &impl AsRawFd) -> bool {
    use windows_sys::Win32::Networking::WinSock::{POLLRDNORM, SOCKET, WSAPOLLFD, WSAPoll};
    let mut fds = [WSAPOLLFD {
        fd: listener.as_raw_fd() as SOCKET,
        events: POLLRDNORM,
        revents: 0,
    }];
    // SAFETY: `listener` is borrowed for this call, so its socket stays open during it;
    // `fds` is one live, initialised WSAPOLLFD, and its length is the count passed.
    let n = unsafe { WSAPoll(fds.as_mut_ptr(), 1, 0) };
    n > 0 && fds[0].revents & POLLRDNORM != 0
}

/// Makes `target` a copy of `src`, in one step, close-on-exec (`dup3(O_CLOEXEC)`).
#[cfg(target_os = "linux")]
fn replace_cloexec(src: BorrowedFd<'_>, target: &mut OwnedFd) -> rustix::io::Result<()> {
    rustix::io::dup3(src, target, rustix::io::DupFlags::CLOEXEC)
}

#[cfg(all(unix, not(target_os = "linux")))]
use self::replace_then_cloexec as replace_cloexec;

/// Makes `target` a copy of `src`, in one step (`dup2`), then close-on-exec: `dup3` and its
/// flag are Linux's. A process spawned by another thread in between may inherit the copy
/// (of `/dev/null`: harmless). (Built on Linux too for its test.)
#[cfg(all(unix, any(test, not(target_os = "linux"))))]
fn replace_then_cloexec(src: BorrowedFd<'_>, target: &mut OwnedFd) -> rustix::io::Result<()> {
    rustix::io::dup2(src, target)?;
    // The number is the copy's from here whatever happens: not an error of the replace.
    let _ = rustix::io::fcntl_setfd(&*target, rustix::io::FdFlags::CLOEXEC);
    Ok(())
}

/// Marks descriptors this process just made close-on-exec, where the call that made them
/// could not do it atomically (Linux's `O_CLOEXEC`-style flags are missing elsewhere, on
/// macOS in particular): a process spawned by another thread in between may inherit them,
/// as with std's own pipes there.
#[cfg(all(unix, any(test, not(target_os = "linux"))))]
pub(crate) fn set_cloexec(fds: &[&OwnedFd]) -> std::io::Result<()> {
    for fd in fds {
        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
    }
    Ok(())
}

/// A pipe, both ends close-on-exec (`pipe2(O_CLOEXEC)`).
#[cfg(target_os = "linux")]
pub(crate) fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

#[cfg(all(unix, not(target_os = "linux")))]
pub(crate) use self::pipe_then_cloexec as cloexec_pipe;

/// A pipe, both ends close-on-exec: `pipe`, then [`set_cloexec`] (macOS has no `pipe2`).
/// (Built on Linux too for its test.)
#[cfg(all(unix, any(test, not(target_os = "linux"))))]
pub(crate) fn pipe_then_cloexec() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (rx, tx) = rustix::pipe::pipe()?;
    set_cloexec(&[&rx, &tx])?;
    Ok((rx, tx))
}

/// Whether a connection waits in the accept queue of `listener`, a listening socket:
/// `poll(2)` without waiting. False if the kernel cannot say.
#[cfg(unix)]
pub(crate) fn has_pending_connection(listener: &impl AsRawFd) -> bool {
    // SAFETY: `listener` is borrowed for this call, so its descriptor stays open while the
    // borrowed one (used only by the poll below) lives.
    let fd = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) };
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(n) if n > 0)
        && fds[0].revents().contains(rustix::event::PollFlags::IN)
}

/// Takes ownership of a descriptor this process inherited (systemd's `LISTEN_FDS` protocol,
/// `systemfd`, or a grace restart) once `check` has accepted it, and marks it close-on-exec,
/// so it does not leak into processes we spawn later (a restart hands listeners on
/// explicitly, see [`pass_fds`]).
///
/// Nothing is taken before the checks pass: `check` sees the descriptor only borrowed, and
/// a descriptor refused (not open, this process's own, or not what `check` wants) is left
/// exactly as it is, so whoever does own it (a runtime's epoll, a file the application
/// opened) keeps it intact. A descriptor that is close-on-exec is refused before `check`
/// runs: one inherited across `exec` never is (those are closed by the `exec`), so this
/// process made or took it itself.
///
/// The caller must adopt each inherited number once: `restart::inherit` adopts them behind
/// a process-wide flag.
#[cfg(unix)]
pub(crate) fn adopt_inherited<T>(
    fd: RawFd,
    check: impl FnOnce(BorrowedFd<'_>) -> Result<T, InheritedFdError>,
) -> Result<(OwnedFd, T), InheritedFdError> {
    if fd < 3 {
        // Never stdin, stdout or stderr: the protocols start at 3.
        return Err(InheritedFdError::WrongKind {
            found: format!("descriptor {fd} (standard input, output or error)"),
            expected: "a descriptor from 3 on",
        });
    }
    if !is_open(fd) {
        return Err(InheritedFdError::NotOpen);
    }
    // SAFETY: `fd` is open (just checked) and stays open while borrowed, for this call: the
    // inheritance protocol names the number to this process alone, and the caller adopts
    // each inherited number once, so no code of ours closes it meanwhile. Should the number
    // be another owner's after all (which the close-on-exec test below tells), the borrow
    // has only read its flags and socket options, and is gone before we return.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let flags =
        rustix::io::fcntl_getfd(borrowed).map_err(|e| InheritedFdError::Inspect(e.into()))?;
    if flags.contains(rustix::io::FdFlags::CLOEXEC) {
        return Err(InheritedFdError::NotInherited);
    }
    let checked = check(borrowed)?;
    // SAFETY: open, inherited across `exec` (not close-on-exec) and of the kind the caller
    // wants (`check`); nothing else in the process knows the number (it came from the
    // environment) and the caller adopts each inherited number once (see above). From here
    // the `OwnedFd` is its one owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| InheritedFdError::Inspect(e.into()))?;
    Ok((owned, checked))
}

/// True if `fd` is an open descriptor of this process.
#[cfg(unix)]
pub(crate) fn is_open(fd: RawFd) -> bool {
    // SAFETY: the borrow lives only for this fcntl(F_GETFD) call, which is harmless on any
    // integer: it fails with EBADF if the number is not open.
    fd >= 0 && rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) }).is_ok()
}

/// The most descriptors [`pass_fds`] lays out.
#[cfg(unix)]
pub(crate) const MAX_PASSED_FDS: usize = 64;

/// Lays out `fds` as descriptors 3, 4, … in a child process, inheritable, before `exec`.
///
/// The caller keeps every descriptor in `fds` open until `spawn` has returned.
/// Fails (before any fork) if there are more than [`MAX_PASSED_FDS`].
///
/// Caveat: `std` reports a failed `exec` over a close-on-exec pipe that may sit at a number
/// in 3..3+n and be replaced here; the child then just exits (status 127 semantics are
/// lost), which a restart sees as a child that exited before it was ready.
#[cfg(unix)]
pub(crate) fn pass_fds(cmd: &mut std::process::Command, fds: Vec<RawFd>) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    if fds.len() > MAX_PASSED_FDS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("cannot pass more than {MAX_PASSED_FDS} descriptors"),
        ));
    }
    let n = fds.len() as RawFd;
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed; fcntl(F_DUPFD_CLOEXEC) and dup2 are such
    // syscalls, and it allocates nothing (the Vec was built before the fork, `moved` is on
    // the stack, and rustix turns an errno into io::Error without allocating). Every number
    // it borrows is open in the child: the sources because the parent keeps them open
    // across spawn (see above) and fork copies them, the copies because F_DUPFD made them.
    unsafe {
        cmd.pre_exec(move || {
            // First move every source out of the target range 3..3+n, so that laying out
            // one descriptor never overwrites another that is still to be copied. The
            // copies are close-on-exec: they vanish at exec.
            let mut moved = [0 as RawFd; MAX_PASSED_FDS];
            for (slot, &fd) in moved.iter_mut().zip(&fds) {
                let src = BorrowedFd::borrow_raw(fd);
                let copy = rustix::io::fcntl_dupfd_cloexec(src, 3 + n)?;
                *slot = copy.into_raw_fd();
            }
            for (i, &fd) in moved.iter().enumerate().take(fds.len()) {
                let src = BorrowedFd::borrow_raw(fd);
                // The target number may not be open yet; dup2 opens it. It is never closed
                // through this OwnedFd (it is forgotten), so the only use is as dup2's
                // target, which takes any number.
                let mut target = std::mem::ManuallyDrop::new(OwnedFd::from_raw_fd(3 + i as RawFd));
                // dup2 clears FD_CLOEXEC on the target, so it survives exec.
                rustix::io::dup2(src, &mut target)?;
            }
            Ok(())
        });
    }
    Ok(())
}

/// Registers a socket we own with tokio's reactor (the hand-over channel: a socket type
/// tokio has no wrapper for).
#[cfg(unix)]
pub(crate) fn async_fd(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: tokio asks that the descriptor stay open, and the same, for as long as the
    // `AsyncFd` holds it: the `AsyncFd` owns the `OwnedFd`, whose number never changes and
    // which is closed only when dropped, with the `AsyncFd` (after deregistration).
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(|e| e.into_parts().1)
}

/// How many bytes the application has read from a TCP socket so far (bytes received, less
/// those still waiting in its receive queue): a connection handed over whose count has not
/// moved was not read by the process it went to. `None` where this cannot be told (not TCP,
/// or not Linux).
#[cfg(target_os = "linux")]
pub(crate) fn bytes_consumed(fd: BorrowedFd<'_>) -> Option<u64> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is an open descriptor (borrowed for the call); `info` is a writable
    // buffer of `len` bytes, zeroed, so a kernel that fills fewer bytes leaves valid zeros
    // (every field is an integer); getsockopt writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // tcpi_bytes_received needs a kernel that fills the structure that far (4.1+).
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    if rc != 0 || (len as usize) < needed {
        return None;
    }
    // SAFETY: zero-initialised, then (partly) written by the kernel: every bit pattern of
    // its integer fields is valid.
    let info = unsafe { info.assume_init() };
    let unread = rustix::io::ioctl_fionread(fd).ok()?;
    Some(info.tcpi_bytes_received.saturating_sub(unread))
}

/// See the Linux version: elsewhere it cannot be told.
#[cfg(all(unix, not(target_os = "linux")))]
pub(crate) fn bytes_consumed(_fd: BorrowedFd<'_>) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_socket_closed_in_place_is_gone_for_its_peer_and_its_number_stays_its_owners() {
        let (mut ours, mut peer) = UnixStream::pair().expect("socketpair");
        let slot = SocketSlot::new(&ours);
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        assert!(slot.close_in_place(null.as_fd()));
        // The peer sees the end at once: the socket itself is closed, not only shut down.
        let mut buf = [0u8; 8];
        assert_eq!(peer.read(&mut buf).expect("read"), 0);
        assert!(
            peer.write_all(b"late").is_err() || peer.write_all(b"late").is_err(),
            "the socket was still there to write to"
        );
        // The number is still open, ours, and now /dev/null: end of file, close on exec.
        let fd = ours.as_fd();
        assert!(rustix::fs::fstat(fd).is_ok_and(|st| st.st_rdev != 0));
        assert!(
            rustix::io::fcntl_getfd(fd).is_ok_and(|f| f.contains(rustix::io::FdFlags::CLOEXEC))
        );
        assert_eq!(rustix::io::read(fd, &mut buf).expect("read(2)"), 0);
        // A socket call on it fails: hyper sees an error, not a request.
        assert!(ours.read(&mut buf).is_err());
        // Nothing is left to shut or close from outside; the owner's close closes the copy.
        assert!(!slot.shutdown());
        assert!(!slot.close_in_place(null.as_fd()));
        drop(ours);
    }

    /// The spellings used where Linux's atomic close-on-exec flags are missing (macOS), run
    /// here: each descriptor ends up close-on-exec all the same.
    #[test]
    fn the_portable_spellings_leave_descriptors_close_on_exec() {
        let cloexec = |fd: BorrowedFd<'_>| {
            rustix::io::fcntl_getfd(fd).is_ok_and(|f| f.contains(rustix::io::FdFlags::CLOEXEC))
        };
        // A pipe: both ends, and it works.
        let (rx, tx) = super::pipe_then_cloexec().expect("pipe");
        assert!(cloexec(rx.as_fd()) && cloexec(tx.as_fd()));
        rustix::io::write(&tx, b"x").expect("write");
        let mut buf = [0u8; 1];
        assert_eq!(rustix::io::read(&rx, &mut buf).expect("read"), 1);
        // A copy over a descriptor (as a socket closed in place): `dup2` alone would leave
        // the copy inheritable.
        let (mut ours, peer) = UnixStream::pair().expect("socketpair");
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let mut target = OwnedFd::from(ours.try_clone().expect("dup"));
        super::replace_then_cloexec(null.as_fd(), &mut target).expect("replace");
        assert!(cloexec(target.as_fd()));
        assert!(
            rustix::fs::fstat(&target).is_ok_and(|st| st.st_rdev != 0),
            "now /dev/null"
        );
        // Only the copy was replaced: the socket itself is still there.
        drop(peer);
        assert_eq!(ours.read(&mut buf).expect("read"), 0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn bytes_consumed_counts_what_was_read_not_what_waits() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        assert_eq!(super::bytes_consumed(server.as_fd()), Some(0));
        client.write_all(b"hello").unwrap();
        // Waits in the receive queue: not read yet.
        let t = std::time::Instant::now();
        while rustix::io::ioctl_fionread(server.as_fd()).unwrap() < 5 {
            assert!(t.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(super::bytes_consumed(server.as_fd()), Some(0));
        let mut buf = [0; 3];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(super::bytes_consumed(server.as_fd()), Some(3));
        // Not TCP: cannot be told.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(super::bytes_consumed(a.as_fd()), None);
    }
}
