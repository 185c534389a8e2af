//! Listening sockets: bind, adopt, accept, and the accepted stream type.
//!
//! The server owns its listeners explicitly: it closes them the moment a drain starts (new
//! connections are refused), or hands their descriptors to a new process on a restart.
//!
//! A Unix-domain listener also has a file, which outlives the socket unless someone removes
//! it: a [`SocketFile`] is the server's claim on it (see [`Listener`]'s docs for the rules).
//!
//! Unix-domain sockets, and adopting a socket by its descriptor, are Unix only: on Windows a
//! listener is TCP (and a `SocketFile` cannot exist).

use std::io;
use std::net::SocketAddr;
#[cfg(unix)]
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
#[cfg(unix)]
use std::os::unix::fs::{FileTypeExt, MetadataExt};
#[cfg(windows)]
use std::os::windows::io::{AsRawSocket, RawSocket};
#[cfg(unix)]
use std::path::{Path, PathBuf};
use std::pin::Pin;
#[cfg(unix)]
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
#[cfg(unix)]
use tokio::net::{UnixListener, UnixStream};

use crate::base::conn::Addr;
#[cfg(unix)]
use crate::error::InheritedFdError;

/// The kernel's accept queue length we ask for (Linux caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// A TCP or Unix-domain listening socket (Unix-domain on Unix only).
///
/// ```no_run
/// # async fn doc() -> std::io::Result<()> {
/// let tcp = grace_http::Listener::bind("127.0.0.1:8080".parse().unwrap())?;
/// let unix = grace_http::Listener::bind_unix("/tmp/grace.sock")?;
/// let private = grace_http::Listener::bind_unix_with_mode("/run/app/app.sock", 0o660)?;
/// let adopted: grace_http::Listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?.into();
/// # Ok(()) }
/// ```
///
/// # The file of a Unix-domain socket
///
/// [`bind_unix`](Self::bind_unix) takes the place of a *stale* socket file (one nobody
/// accepts on: its process died), but fails, leaving the file alone, if another process
/// accepts on it or if the path is not a socket. A server that bound the file itself
/// ([`Server::bind`](crate::Server::bind) with `"unix:PATH"`) removes it when it stops for good, or
/// when it is dropped without serving (a failed start); it keeps it when it hands the
/// socket to a new generation ([`Serve::with_restart`](crate::Serve::with_restart)), which
/// removes it in turn when it stops for good (not if it fails to start: the old one still
/// serves). Files of sockets passed by systemd's socket activation are systemd's, and a
/// listener bound with `Listener::bind_unix` and handed to [`Server::from_listener`](crate::Server::from_listener)
/// is the caller's: neither is removed. Before removing a file, grace checks that it is still
/// the one it bound (same device, inode and change time): a socket someone else put at the
/// path meanwhile stays (so does ours if its mode or owner was changed after the start; the
/// next start then replaces it as stale).
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix-domain stream listener.
    #[cfg(unix)]
    Unix(UnixListener),
}

impl Listener {
    /// Binds a TCP listener with `SO_REUSEADDR` and a deep accept queue.
    /// Must be called within a tokio runtime.
    pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        Ok(Listener::Tcp(TcpListener::from_std(socket.into())?))
    }

    /// Binds a Unix-domain listener at `path`, with the permissions the umask leaves. A stale
    /// socket file there is replaced; a live one, or a file that is not a socket, is an
    /// [`AddrInUse`](io::ErrorKind::AddrInUse) error (see the type's docs for when the file
    /// is removed). Must be called within a tokio runtime.
    #[cfg(unix)]
    pub fn bind_unix(path: impl AsRef<Path>) -> io::Result<Listener> {
        let (listener, file) = bind_unix(path.as_ref(), None)?;
        file.disarm();
        Ok(listener)
    }

    /// Like [`bind_unix`](Self::bind_unix), with the socket file's permissions set to `mode`
    /// (`0o660`: owner and group may connect) whatever the umask. The mode is applied before
    /// the socket listens, so no connection is ever accepted under looser permissions.
    /// Fails with [`InvalidInput`](io::ErrorKind::InvalidInput) if `mode` has bits beyond
    /// `0o777`.
    ///
    /// ```no_run
    /// # async fn doc() -> std::io::Result<()> {
    /// let listener = grace_http::Listener::bind_unix_with_mode("/run/app/app.sock", 0o660)?;
    /// let server = grace_http::Server::from_listener(listener);
    /// # let _ = server; Ok(()) }
    /// ```
    #[cfg(unix)]
    pub fn bind_unix_with_mode(path: impl AsRef<Path>, mode: u32) -> io::Result<Listener> {
        let (listener, file) = bind_unix(path.as_ref(), Some(mode))?;
        file.disarm();
        Ok(listener)
    }

    /// Adopts a listening socket from its descriptor (inherited from systemd or a previous
    /// generation of this process). Fails if it is not a listening stream socket, TCP or
    /// Unix-domain (then `fd` is closed, as it is yours to give).
    #[cfg(unix)]
    pub fn from_fd(fd: OwnedFd) -> io::Result<Listener> {
        let family = check_listening(fd.as_fd(), false).map_err(|e| match e {
            InheritedFdError::Inspect(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidInput, format!("descriptor: {other}")),
        })?;
        Listener::from_checked(fd, family)
    }

    /// A listener from a descriptor [`check_listening`] accepted as `family`. Must be called
    /// within a tokio runtime.
    #[cfg(unix)]
    pub(crate) fn from_checked(fd: OwnedFd, family: Family) -> io::Result<Listener> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        match family {
            Family::Unix => Ok(Listener::Unix(UnixListener::from_std(
                std::os::unix::net::UnixListener::from(fd),
            )?)),
            Family::Tcp => Ok(Listener::Tcp(TcpListener::from_std(
                std::net::TcpListener::from(fd),
            )?)),
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<Addr> {
        Ok(match self {
            Listener::Tcp(l) => Addr::Tcp(l.local_addr()?),
            #[cfg(unix)]
            Listener::Unix(l) => Addr::Unix(l.local_addr()?.as_pathname().map(Path::to_path_buf)),
        })
    }

    pub(crate) async fn accept(&self) -> io::Result<(Stream, Addr)> {
        let (io, peer) = match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                // Small responses must not wait for Nagle's algorithm.
                let _ = s.set_nodelay(true);
                (StreamIo::Tcp(s), Addr::Tcp(peer))
            }
            #[cfg(unix)]
            Listener::Unix(l) => {
                let (s, peer) = l.accept().await?;
                let peer = Addr::Unix(peer.as_pathname().map(Path::to_path_buf));
                (StreamIo::Unix(s), peer)
            }
        };
        Ok((Stream { io, slot: None }, peer))
    }
}

#[cfg(unix)]
impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}

#[cfg(windows)]
impl AsRawSocket for Listener {
    fn as_raw_socket(&self) -> RawSocket {
        match self {
            Listener::Tcp(l) => l.as_raw_socket(),
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

#[cfg(unix)]
impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Listener::Unix(l)
    }
}

impl TryFrom<std::net::TcpListener> for Listener {
    type Error = io::Error;
    /// Adopts a std listener (made non-blocking). Must be called within a tokio runtime.
    fn try_from(l: std::net::TcpListener) -> io::Result<Self> {
        l.set_nonblocking(true)?;
        Ok(Listener::Tcp(TcpListener::from_std(l)?))
    }
}

#[cfg(unix)]
impl TryFrom<std::os::unix::net::UnixListener> for Listener {
    type Error = io::Error;
    /// Adopts a std listener (made non-blocking). Must be called within a tokio runtime.
    fn try_from(l: std::os::unix::net::UnixListener) -> io::Result<Self> {
        l.set_nonblocking(true)?;
        Ok(Listener::Unix(UnixListener::from_std(l)?))
    }
}

/// The kinds of listening socket a [`Listener`] can be.
#[cfg(unix)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    /// TCP, over IPv4 or IPv6.
    Tcp,
    /// Unix-domain, stream.
    Unix,
}

/// Checks, without taking it, that `fd` is a listening socket a [`Listener`] can be: a
/// stream socket that listens (`SO_ACCEPTCONN`), TCP over IPv4 or IPv6, or Unix-domain;
/// Unix-domain only if `unix_only`.
#[cfg(unix)]
pub(crate) fn check_listening(
    fd: BorrowedFd<'_>,
    unix_only: bool,
) -> Result<Family, InheritedFdError> {
    use rustix::net::AddressFamily;
    let expected = match unix_only {
        true => "a listening Unix-domain stream socket",
        false => "a listening TCP or Unix-domain stream socket",
    };
    check_socket(fd, rustix::net::SocketType::STREAM, expected)?;
    if !accepts_connections(fd).map_err(inspect)? {
        return Err(InheritedFdError::NotListening);
    }
    let domain = address_family(fd).map_err(inspect)?;
    match domain {
        AddressFamily::UNIX => Ok(Family::Unix),
        AddressFamily::INET | AddressFamily::INET6 if !unix_only => {
            match ip_protocol(fd).map_err(inspect)? {
                Some(p) if p == rustix::net::ipproto::TCP => Ok(Family::Tcp),
                p => Err(InheritedFdError::WrongKind {
                    found: format!(
                        "an IP stream socket of protocol {}",
                        p.map_or(0, |p| p.as_raw().get())
                    ),
                    expected,
                }),
            }
        }
        AddressFamily::INET | AddressFamily::INET6 => Err(InheritedFdError::WrongKind {
            found: "an IP socket".to_owned(),
            expected,
        }),
        other => Err(InheritedFdError::WrongKind {
            found: format!("a socket of address family {}", other.as_raw()),
            expected,
        }),
    }
}

/// Checks, without taking it, that `fd` is a socket of type `ty` (`expected` names what is
/// wanted, for the error).
#[cfg(unix)]
pub(crate) fn check_socket(
    fd: BorrowedFd<'_>,
    ty: rustix::net::SocketType,
    expected: &'static str,
) -> Result<(), InheritedFdError> {
    match file_type(fd)? {
        rustix::fs::FileType::Socket => {}
        other => {
            return Err(InheritedFdError::NotASocket {
                found: describe(other),
            });
        }
    }
    let actual = rustix::net::sockopt::socket_type(fd).map_err(inspect)?;
    if actual != ty {
        let found = match actual {
            rustix::net::SocketType::STREAM => "a stream socket".to_owned(),
            rustix::net::SocketType::DGRAM => "a datagram socket".to_owned(),
            rustix::net::SocketType::SEQPACKET => "a seqpacket socket".to_owned(),
            rustix::net::SocketType::RAW => "a raw socket".to_owned(),
            other => format!("a socket of type {}", other.as_raw()),
        };
        return Err(InheritedFdError::WrongKind { found, expected });
    }
    Ok(())
}

/// What kind of file `fd` is.
#[cfg(unix)]
pub(crate) fn file_type(fd: BorrowedFd<'_>) -> Result<rustix::fs::FileType, InheritedFdError> {
    let stat = rustix::fs::fstat(fd).map_err(inspect)?;
    Ok(rustix::fs::FileType::from_raw_mode(stat.st_mode))
}

/// A kind of file, in words.
#[cfg(unix)]
pub(crate) fn describe(file_type: rustix::fs::FileType) -> &'static str {
    use rustix::fs::FileType;
    match file_type {
        FileType::Socket => "a socket",
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Fifo => "a pipe",
        FileType::CharacterDevice => "a character device (a terminal, /dev/null…)",
        FileType::BlockDevice => "a block device",
        FileType::Symlink => "a symbolic link",
        FileType::Unknown => "an anonymous descriptor (epoll, eventfd, timerfd…)",
    }
}

#[cfg(unix)]
fn inspect(e: rustix::io::Errno) -> InheritedFdError {
    InheritedFdError::Inspect(e.into())
}

/// Whether `fd` is a listening socket (`SO_ACCEPTCONN`).
#[cfg(all(unix, not(target_vendor = "apple")))]
fn accepts_connections(fd: BorrowedFd<'_>) -> rustix::io::Result<bool> {
    rustix::net::sockopt::socket_acceptconn(fd)
}

#[cfg(target_vendor = "apple")]
use self::accepts_connections_without_acceptconn as accepts_connections;

/// Whether `fd`, a stream socket, is a listening one, where `SO_ACCEPTCONN` cannot tell:
/// macOS declares it but does not implement it. One without a peer is taken for a listening
/// one (a socket bound but not listening yet passes too, and fails at its first accept).
/// (Built elsewhere too for its test.)
#[cfg(all(unix, any(test, target_vendor = "apple")))]
fn accepts_connections_without_acceptconn(fd: BorrowedFd<'_>) -> rustix::io::Result<bool> {
    if rustix::net::sockopt::socket_type(fd)? != rustix::net::SocketType::STREAM {
        return Ok(false);
    }
    match rustix::net::getpeername(fd) {
        Ok(_) => Ok(false),
        Err(rustix::io::Errno::NOTCONN) => Ok(true),
        Err(e) => Err(e),
    }
}

/// The address family of the socket `fd` (`SO_DOMAIN`).
#[cfg(target_os = "linux")]
pub(crate) fn address_family(fd: BorrowedFd<'_>) -> rustix::io::Result<rustix::net::AddressFamily> {
    rustix::net::sockopt::socket_domain(fd)
}

#[cfg(all(unix, not(target_os = "linux")))]
pub(crate) use self::address_family_by_address as address_family;

/// The address family of the socket `fd`, from its own address (`SO_DOMAIN` is Linux's).
/// (Built on Linux too for its test.)
#[cfg(all(unix, any(test, not(target_os = "linux"))))]
pub(crate) fn address_family_by_address(
    fd: BorrowedFd<'_>,
) -> rustix::io::Result<rustix::net::AddressFamily> {
    Ok(rustix::net::getsockname(fd)?.address_family())
}

/// The protocol of `fd`, an IP stream socket (`SO_PROTOCOL`).
#[cfg(any(target_os = "linux", target_os = "freebsd", target_os = "openbsd"))]
fn ip_protocol(fd: BorrowedFd<'_>) -> rustix::io::Result<Option<rustix::net::Protocol>> {
    rustix::net::sockopt::socket_protocol(fd)
}

/// The protocol of `fd`, an IP stream socket: TCP, where `SO_PROTOCOL` is missing (macOS,
/// where no other protocol makes IP stream sockets).
#[cfg(all(
    unix,
    not(any(target_os = "linux", target_os = "freebsd", target_os = "openbsd"))
))]
fn ip_protocol(_fd: BorrowedFd<'_>) -> rustix::io::Result<Option<rustix::net::Protocol>> {
    Ok(Some(rustix::net::ipproto::TCP))
}

/// Binds a Unix-domain listener at `path` (see [`Listener::bind_unix`]), with the claim on
/// its file (armed: dropping it removes the file).
#[cfg(unix)]
pub(crate) fn bind_unix(path: &Path, mode: Option<u32>) -> io::Result<(Listener, SocketFile)> {
    if let Some(mode) = mode.filter(|m| m & !0o777 != 0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket mode {mode:o} is not a permission mode (at most 777)"),
        ));
    }
    let addr = socket2::SockAddr::unix(path)?;
    make_way(path)?;
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    if let Some(mode) = mode {
        // `bind` creates the file with the socket's own mode less the umask: never looser
        // than `mode`, even before the exact mode is set below.
        let mode = rustix::fs::Mode::from_raw_mode(mode as rustix::fs::RawMode);
        let _ = rustix::fs::fchmod(&socket, mode);
    }
    socket.bind(&addr).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => in_use(path),
        _ => e,
    })?;
    // The file exists from here: if anything below fails, it goes again. Nobody can connect
    // before `listen`, so the mode is in place before the first connection.
    let file = SocketFile::new(absolute(path), claim_file(path, mode)?, true);
    socket.listen(BACKLOG)?;
    let listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(OwnedFd::from(
        socket,
    )))?;
    Ok((Listener::Unix(listener), file))
}

#[cfg(unix)]
fn in_use(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "{} is in use: another process accepts connections on it",
            path.display()
        ),
    )
}

/// Makes way for binding at `path`: fine if nothing is there; a socket file nobody accepts
/// on (its process died without removing it) is removed. A socket someone accepts on, any
/// other kind of file, or a socket that cannot be checked, is left as it is: an error.
#[cfg(unix)]
fn make_way(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    if meta.file_type().is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is a symbolic link, not a socket: not followed, not removed",
                path.display()
            ),
        ));
    }
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} exists and is not a socket: not removed", path.display()),
        ));
    }
    // Non-blocking, so that a live server with a full accept queue cannot stall us.
    let probe = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    probe.set_nonblocking(true)?;
    match probe.connect(&socket2::SockAddr::unix(path)?) {
        Ok(()) => return Err(in_use(path)),
        // Its accept queue is full: very much alive.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(in_use(path)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "{} exists and cannot be checked for a listener ({e}): not removed",
                    path.display()
                ),
            ));
        }
    }
    drop(probe);
    // Stale. Removed only if it is still the file we probed: another process starting now
    // may have replaced it with its own (then our bind fails: in use).
    if FileId::socket_at(path) == Some(FileId::of(&meta)) {
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(path = %path.display(), "replaced a stale socket file"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The identity of the socket file `bind` just made at `path`, with `mode` applied if given.
/// Both go through a descriptor of the file itself (`O_PATH`, not following a symlink), so
/// a file swapped in at the path meanwhile is neither changed nor taken for ours. (Linux
/// only: elsewhere there is no `O_PATH`, so both go through the path, as on a Linux without
/// `/proc`.)
#[cfg(unix)]
fn claim_file(path: &Path, mode: Option<u32>) -> io::Result<FileId> {
    use std::os::unix::fs::PermissionsExt;
    #[cfg(target_os = "linux")]
    let fd = {
        use rustix::fs::{Mode, OFlags};
        rustix::fs::open(
            path,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?
    };
    #[cfg(target_os = "linux")]
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    // Without /proc: the path itself, still not following a symlink for the check.
    #[cfg(target_os = "linux")]
    let via_proc = std::fs::metadata(&by_fd).is_ok();
    // Elsewhere there is no `O_PATH` (and a socket file cannot be opened): the path itself.
    #[cfg(not(target_os = "linux"))]
    let (by_fd, via_proc) = (PathBuf::new(), false);
    let stat = || match via_proc {
        true => std::fs::metadata(&by_fd),
        false => std::fs::symlink_metadata(path),
    };
    let meta = stat()?;
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} was replaced while binding", path.display()),
        ));
    }
    let Some(mode) = mode else {
        return Ok(FileId::of(&meta));
    };
    let target = if via_proc { by_fd.as_path() } else { path };
    let set = std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode));
    // Changing the mode changes the file's ctime: its identity is taken afterwards.
    match set.and_then(|()| stat()) {
        Ok(meta) => Ok(FileId::of(&meta)),
        Err(e) => {
            remove_if_ours(path, FileId::of(&meta), "its mode could not be set");
            Err(e)
        }
    }
}

#[cfg(unix)]
fn absolute(path: &Path) -> PathBuf {
    match std::env::current_dir() {
        Ok(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

/// A file's identity: device and inode, and the time of its last change, since a file
/// made after ours was removed may get the same inode number.
#[cfg(unix)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

#[cfg(unix)]
impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The socket file at `path` (a symlink is not followed), if that is what is there.
    fn socket_at(path: &Path) -> Option<FileId> {
        std::fs::symlink_metadata(path)
            .ok()
            .filter(|m| m.file_type().is_socket())
            .map(|m| FileId::of(&m))
    }
}

/// A server's claim on the file of a Unix-domain socket: while armed, dropping it removes
/// the file, if the path still leads to the very file that was bound.
#[cfg(unix)]
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    file: FileId,
    /// Acquire/Release would add nothing: it is read only by `Drop`, after every writer.
    armed: AtomicBool,
}

#[cfg(unix)]
impl SocketFile {
    fn new(path: PathBuf, file: FileId, armed: bool) -> SocketFile {
        SocketFile {
            path,
            file,
            armed: AtomicBool::new(armed),
        }
    }

    /// The claim on the file of a socket that a previous generation handed over, as the
    /// path is now (unarmed: the server arms it once it serves).
    pub(crate) fn handed_over(listener: &Listener) -> Option<SocketFile> {
        let Listener::Unix(l) = listener else {
            return None;
        };
        let path = absolute(l.local_addr().ok()?.as_pathname()?);
        let file = FileId::socket_at(&path)?;
        Some(SocketFile::new(path, file, false))
    }

    /// True if `listener` is the socket this file belongs to.
    pub(crate) fn is_of(&self, listener: &Listener) -> bool {
        let Listener::Unix(l) = listener else {
            return false;
        };
        let path = l.local_addr().ok();
        path.as_ref()
            .and_then(|a| a.as_pathname())
            .is_some_and(|p| absolute(p) == self.path)
    }

    pub(crate) fn arm(&self) {
        self.armed.store(true, Ordering::Relaxed);
    }

    /// Keeps the file (it was handed on, or is someone else's to remove).
    pub(crate) fn disarm(&self) {
        self.armed.store(false, Ordering::Relaxed);
    }
}

#[cfg(unix)]
impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.armed.load(Ordering::Relaxed) {
            remove_if_ours(&self.path, self.file, "its server stopped");
        }
    }
}

/// Windows has no Unix-domain sockets, so no socket files: no value of this type exists, and
/// a server's list of them is always empty.
#[cfg(windows)]
#[derive(Debug)]
pub(crate) enum SocketFile {}

#[cfg(windows)]
impl SocketFile {
    pub(crate) fn is_of(&self, _listener: &Listener) -> bool {
        match *self {}
    }

    pub(crate) fn arm(&self) {
        match *self {}
    }

    pub(crate) fn disarm(&self) {
        match *self {}
    }
}

/// Removes the socket file at `path` if it is still `file`.
#[cfg(unix)]
fn remove_if_ours(path: &Path, file: FileId, why: &str) {
    if FileId::socket_at(path) != Some(file) {
        tracing::debug!(path = %path.display(), why, "socket file replaced or gone: left as it is");
        return;
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(path = %path.display(), why, "socket file removed"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), why, error = %e, "cannot remove the socket file")
        }
    }
}

/// An accepted connection's socket, with its place under the server's connection limit
/// (given back when the socket closes, whoever holds it then: hyper or an upgrade handler).
pub(crate) struct Stream {
    io: StreamIo,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

enum StreamIo {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(UnixStream),
}

impl Stream {
    /// A connected socket that the previous generation handed over (see `crate::handover`),
    /// with its peer's address.
    #[cfg(unix)]
    pub(crate) fn from_handed(fd: OwnedFd) -> io::Result<(Stream, Addr)> {
        if rustix::net::sockopt::socket_type(&fd)? != rustix::net::SocketType::STREAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "descriptor is not a stream socket",
            ));
        }
        rustix::io::ioctl_fionbio(&fd, true)?;
        let (io, peer) = match address_family(fd.as_fd())? {
            rustix::net::AddressFamily::UNIX => {
                let s = UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))?;
                let peer = s.peer_addr()?;
                let peer = Addr::Unix(peer.as_pathname().map(Path::to_path_buf));
                (StreamIo::Unix(s), peer)
            }
            _ => {
                let s = TcpStream::from_std(std::net::TcpStream::from(fd))?;
                let peer = Addr::Tcp(s.peer_addr()?);
                (StreamIo::Tcp(s), peer)
            }
        };
        Ok((Stream { io, slot: None }, peer))
    }

    /// The address of our end (`getsockname`): for TCP the server's address the client
    /// reached (the listener's port, and its IP unless it listens on a wildcard), for a
    /// Unix-domain socket the listener's path.
    pub(crate) fn local_addr(&self) -> io::Result<Addr> {
        Ok(match &self.io {
            StreamIo::Tcp(s) => Addr::Tcp(s.local_addr()?),
            #[cfg(unix)]
            StreamIo::Unix(s) => Addr::Unix(s.local_addr()?.as_pathname().map(Path::to_path_buf)),
        })
    }

    /// Holds `slot` (see `Limits::max_connections`) until the socket closes.
    pub(crate) fn hold(&mut self, slot: Option<tokio::sync::OwnedSemaphorePermit>) {
        self.slot = slot;
    }
}

#[cfg(unix)]
impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match &self.io {
            StreamIo::Tcp(s) => s.as_raw_fd(),
            StreamIo::Unix(s) => s.as_raw_fd(),
        }
    }
}

#[cfg(windows)]
impl AsRawSocket for Stream {
    fn as_raw_socket(&self) -> RawSocket {
        match &self.io {
            StreamIo::Tcp(s) => s.as_raw_socket(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().io {
            StreamIo::Tcp($s) => $e,
            #[cfg(unix)]
            StreamIo::Unix($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    #[inline]
    fn is_write_vectored(&self) -> bool {
        true
    }
    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Accept errors that concern one connection only: skip it and accept the next at once.
pub(crate) fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}
#[cfg(test)]
impl Stream {
    pub(crate) fn from_tcp(s: TcpStream) -> Stream {
        Stream {
            io: StreamIo::Tcp(s),
            slot: None,
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::fd::{AsFd, BorrowedFd};

    use rustix::net::AddressFamily;

    /// The checks used where `SO_DOMAIN` and `SO_ACCEPTCONN` are missing (macOS), run here
    /// beside the ones that use them.
    #[test]
    fn the_portable_socket_checks_agree_with_the_socket_options() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let (accepted, _) = tcp.accept().unwrap();
        let tcp6 = std::net::TcpListener::bind("[::1]:0").ok(); // no IPv6: skipped
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let path = std::env::temp_dir().join(format!("grace-portable-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (pair, _other) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut cases: Vec<(BorrowedFd<'_>, AddressFamily, bool)> = vec![
            (tcp.as_fd(), AddressFamily::INET, true),
            (client.as_fd(), AddressFamily::INET, false),
            (accepted.as_fd(), AddressFamily::INET, false),
            (udp.as_fd(), AddressFamily::INET, false),
            (unix.as_fd(), AddressFamily::UNIX, true),
            (pair.as_fd(), AddressFamily::UNIX, false),
        ];
        cases.extend(
            tcp6.as_ref()
                .map(|l| (l.as_fd(), AddressFamily::INET6, true)),
        );
        for (fd, family, listening) in cases {
            assert_eq!(super::address_family_by_address(fd).unwrap(), family);
            assert_eq!(super::address_family(fd).unwrap(), family);
            assert_eq!(
                super::accepts_connections_without_acceptconn(fd).unwrap(),
                listening,
                "{family:?}"
            );
            assert_eq!(
                super::accepts_connections(fd).unwrap(),
                listening,
                "{family:?}"
            );
        }
        let _ = std::fs::remove_file(&path);
    }
}
