//! The one module with `unsafe`: raw file descriptors that syscalls hand us.
//!
//! Everything here wraps a syscall that takes or returns a bare descriptor: shutting down a
//! tracked connection's socket from outside its owner, adopting an inherited listening socket,
//! and laying out descriptors for a child process.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

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
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Shuts the socket down in both directions: the peer sees FIN, and every pending or
    /// future read on our side returns end-of-file, every write fails. Returns false if the
    /// socket was already closed.
    pub(crate) fn shutdown(&self) -> bool {
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fd) = *guard else { return false };
        // SAFETY: `fd` is open: the owner releases the slot (under this lock, which we hold)
        // before it closes the descriptor, so the number cannot have been reused.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
        true
    }
}

/// Takes ownership of a descriptor this process inherited (systemd's `LISTEN_FDS` protocol,
/// or a grace restart). Returns `None` if `fd` is not open.
pub(crate) fn adopt_inherited(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: fcntl(F_GETFD) on any integer is harmless; it fails with EBADF if not open.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed).ok()?;
    // SAFETY: the descriptor is open, and the inheritance protocol hands it to this process
    // alone: the caller adopts each inherited number once (see `restart::inherited`).
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Lays out `fds` as descriptors 3, 4, … in a child process, inheritable, before `exec`.
pub(crate) fn pass_fds(cmd: &mut std::process::Command, fds: Vec<RawFd>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed; dup2/dup/fcntl are such syscalls and it allocates
    // nothing (the Vec was built before the fork).
    unsafe {
        cmd.pre_exec(move || {
            // First move every source out of the target range 3..3+n, so that laying out
            // one descriptor never overwrites another that is still to be copied.
            let n = fds.len() as RawFd;
            let mut moved = [0 as RawFd; 64];
            for (i, &fd) in fds.iter().enumerate().take(64) {
                let src = BorrowedFd::borrow_raw(fd);
                let copy = rustix::io::fcntl_dupfd_cloexec(src, 3 + n)?;
                moved[i] = copy.as_raw_fd();
                std::mem::forget(copy);
            }
            for (i, &fd) in moved.iter().enumerate().take(fds.len()) {
                let src = BorrowedFd::borrow_raw(fd);
                let mut target = OwnedFd::from_raw_fd(3 + i as RawFd);
                // dup2 clears FD_CLOEXEC on the target, so it survives exec.
                rustix::io::dup2(src, &mut target)?;
                std::mem::forget(target);
            }
            Ok(())
        });
    }
}
