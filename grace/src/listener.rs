//! Listening sockets: bind, adopt, accept, and the accepted stream type.
//!
//! The server owns its listeners explicitly: it closes them the moment a drain starts (new
//! connections are refused), or hands their descriptors to a new process on a restart.
//!
//! A Unix-domain listener also has a file, which outlives the socket unless someone removes
//! it. The files this process is responsible for are kept here (see [`stopped`]): a file it
//! bound itself goes when its server stops for good, or when the process gives up before
//! serving; a file handed over by an upgrade goes when the last generation stops; a file
//! handed to a new generation stays.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::conn::Addr;

/// The kernel's accept queue length we ask for (Linux caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// A TCP or Unix-domain listening socket.
///
/// ```no_run
/// # async fn doc() -> std::io::Result<()> {
/// let tcp = grace::Listener::bind("127.0.0.1:8080".parse().unwrap())?;
/// let unix = grace::Listener::bind_unix("/tmp/grace.sock")?;
/// let private = grace::Listener::bind_unix_with_mode("/run/app/app.sock", 0o660)?;
/// let adopted: grace::Listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?.into();
/// # Ok(()) }
/// ```
///
/// # The file of a Unix-domain socket
///
/// [`bind_unix`](Self::bind_unix) takes the place of a *stale* socket file (one nobody
/// accepts on: its process died), but fails, leaving the file alone, if another process
/// accepts on it or if the path is not a socket. The file it creates is removed when the
/// server serving on it stops for good, or, if the process never got to serve (a failed
/// start), when the tokio runtime it was bound in shuts down. It is kept when the server
/// hands it to a new generation ([`Serve::with_restart`](crate::Serve::with_restart)); that
/// generation, adopting it with [`inherited_listeners`](crate::inherited_listeners), removes
/// it when it stops for good, but not if it fails to start (the old one still serves). A
/// file systemd's socket activation passed is systemd's and is never removed, nor is the
/// file of a listener made elsewhere (`From`/`TryFrom`). Before removing a file, grace checks
/// that it is still the one it bound (same device, inode and change time): a socket someone
/// else put at the path meanwhile stays (so does ours if its mode or owner was changed after
/// the start; the next start then replaces it as stale).
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix-domain stream listener.
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
    pub fn bind_unix(path: impl AsRef<Path>) -> io::Result<Listener> {
        bind_unix(path.as_ref(), None)
    }

    /// Like [`bind_unix`](Self::bind_unix), with the socket file's permissions set to `mode`
    /// (`0o660`: owner and group may connect) whatever the umask. The mode is applied before
    /// the socket listens, so no connection is ever accepted under looser permissions.
    /// Fails with [`InvalidInput`](io::ErrorKind::InvalidInput) if `mode` has bits beyond
    /// `0o777`.
    ///
    /// ```no_run
    /// # async fn doc() -> std::io::Result<()> {
    /// let listener = grace::Listener::bind_unix_with_mode("/run/app/app.sock", 0o660)?;
    /// let server = grace::Server::from_listener(listener);
    /// # let _ = server; Ok(()) }
    /// ```
    pub fn bind_unix_with_mode(path: impl AsRef<Path>, mode: u32) -> io::Result<Listener> {
        bind_unix(path.as_ref(), Some(mode))
    }

    /// Adopts a listening socket from its descriptor (inherited from systemd or a previous
    /// generation of this process). Fails if it is not a listening stream socket.
    ///
    /// The file of a Unix-domain socket that a grace upgrade handed over is removed when this
    /// process's server stops for good (not if it fails to start); any other adopted
    /// socket's file is left alone (see the type's docs).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Listener> {
        use rustix::net::sockopt;
        if !sockopt::socket_acceptconn(&fd)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "descriptor is not a listening socket",
            ));
        }
        rustix::io::ioctl_fionbio(&fd, true)?;
        match sockopt::socket_domain(&fd)? {
            rustix::net::AddressFamily::UNIX => {
                let handed_over = handed_over_by_grace(fd.as_raw_fd());
                let listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))?;
                if handed_over {
                    adopt_file(&listener);
                }
                Ok(Listener::Unix(listener))
            }
            _ => Ok(Listener::Tcp(TcpListener::from_std(
                std::net::TcpListener::from(fd),
            )?)),
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<Addr> {
        Ok(match self {
            Listener::Tcp(l) => Addr::Tcp(l.local_addr()?),
            Listener::Unix(l) => Addr::Unix(l.local_addr()?.as_pathname().map(Path::to_path_buf)),
        })
    }

    pub(crate) async fn accept(&self) -> io::Result<(Stream, Addr)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                // Small responses must not wait for Nagle's algorithm.
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), Addr::Tcp(peer)))
            }
            Listener::Unix(l) => {
                let (s, peer) = l.accept().await?;
                let peer = Addr::Unix(peer.as_pathname().map(Path::to_path_buf));
                Ok((Stream::Unix(s), peer))
            }
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

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

impl TryFrom<std::os::unix::net::UnixListener> for Listener {
    type Error = io::Error;
    /// Adopts a std listener (made non-blocking). Must be called within a tokio runtime.
    fn try_from(l: std::os::unix::net::UnixListener) -> io::Result<Self> {
        l.set_nonblocking(true)?;
        Ok(Listener::Unix(UnixListener::from_std(l)?))
    }
}

/// Binds a Unix-domain listener at `path` (see [`Listener::bind_unix`]).
fn bind_unix(path: &Path, mode: Option<u32>) -> io::Result<Listener> {
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
        let _ = rustix::fs::fchmod(&socket, rustix::fs::Mode::from_raw_mode(mode));
    }
    socket.bind(&addr).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => in_use(path),
        _ => e,
    })?;
    // The file exists from here: if anything below fails, it goes again. Nobody can connect
    // before `listen`, so the mode is in place before the first connection.
    let file = claim_file(path, mode)?;
    if let Err(e) = socket.listen(BACKLOG) {
        remove_if_ours(path, file, "the socket could not listen");
        return Err(e);
    }
    let listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(OwnedFd::from(
        socket,
    )))?;
    register(&listener, absolute(path), file, true);
    Ok(Listener::Unix(listener))
}

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
fn make_way(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
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
            ))
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
/// a file swapped in at the path meanwhile is neither changed nor taken for ours.
fn claim_file(path: &Path, mode: Option<u32>) -> io::Result<FileId> {
    use rustix::fs::{Mode, OFlags};
    use std::os::unix::fs::PermissionsExt;
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    // Without /proc: the path itself, still not following a symlink for the check.
    let via_proc = std::fs::metadata(&by_fd).is_ok();
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

/// Whether the inherited socket at descriptor `fd` was handed over by a grace upgrade, from
/// a generation that bound it (or was handed it the same way): then its file is ours to
/// remove once we stop for good. A socket systemd passed (`LISTEN_PID`) is systemd's, and
/// keeps systemd's name (`LISTEN_FDNAMES`) through later upgrades, whereas one grace bound
/// travels under grace's default name. The variables are read as the process was started
/// with them.
fn handed_over_by_grace(fd: RawFd) -> bool {
    let var = |k: &str| std::env::var(k).ok();
    if var("LISTEN_PID").is_some() {
        return false;
    }
    let parent = rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32);
    let from = var("GRACE_LISTEN_PPID").and_then(|p| p.trim().parse::<u32>().ok());
    if from.is_none() || from != parent {
        return false;
    }
    let Ok(index) = usize::try_from(fd - 3) else {
        return false;
    };
    var("LISTEN_FDNAMES")
        .is_some_and(|names| names.split(':').nth(index) == Some(crate::restart::DEFAULT_NAME))
}

/// Takes on the file of a socket a previous generation handed over.
fn adopt_file(listener: &UnixListener) {
    let Some(path) = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(absolute))
    else {
        return;
    };
    if let Some(file) = FileId::socket_at(&path) {
        register(listener, path, file, false);
    }
}

fn absolute(path: &Path) -> PathBuf {
    match std::env::current_dir() {
        Ok(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

/// A file's identity: device and inode, and the time of its last change, since a file
/// made after ours was removed may get the same inode number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
}

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

    /// What this process's descriptor `fd` is open on (a socket's own inode).
    fn of_fd(fd: RawFd) -> io::Result<FileId> {
        std::fs::metadata(format!("/proc/self/fd/{fd}")).map(|m| FileId::of(&m))
    }
}

/// A socket file this process removes once the socket is closed for good.
struct SocketFile {
    path: PathBuf,
    /// The file as bound or adopted: removed only while the path still leads to it.
    file: FileId,
    /// The listening socket (descriptor and identity), to tell when it has been closed.
    fd: RawFd,
    socket: FileId,
    /// For a file this process bound: dropping it ends the task that removes the file after
    /// a failed start (see [`FailedStart`]).
    _failed_start: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SocketFile {
    /// Whether the socket is closed in this process; `None` if that cannot be told.
    fn is_closed(&self) -> Option<bool> {
        match FileId::of_fd(self.fd) {
            Ok(now) => Some(now != self.socket),
            Err(_) if Path::new("/proc/self/fd").is_dir() => Some(true),
            Err(_) => None,
        }
    }
}

/// The socket files this process is responsible for.
static FILES: Mutex<Vec<SocketFile>> = Mutex::new(Vec::new());

fn register(listener: &UnixListener, path: PathBuf, file: FileId, bound_here: bool) {
    let fd = listener.as_fd().as_raw_fd();
    let Ok(socket) = FileId::of_fd(fd) else {
        tracing::debug!(path = %path.display(), "no /proc: the socket file will not be removed");
        return;
    };
    let failed_start = if bound_here {
        FailedStart::watch(socket)
    } else {
        None
    };
    crate::lock(&FILES).push(SocketFile {
        path,
        file,
        fd,
        socket,
        _failed_start: failed_start,
    });
}

/// Called when a server's `serve` has finished its drain, its listeners closed. On a hand
/// over (`Trigger::Restart`) the new generation serves on the sockets and will remove their
/// files: this process forgets them all (it is on its way out). Otherwise the files of
/// every socket this process has closed are removed, if they are still ours.
pub(crate) fn stopped(handed_over: bool) {
    let mut files = crate::lock(&FILES);
    if handed_over {
        files.clear();
        return;
    }
    files.retain(|f| {
        if f.is_closed() != Some(true) {
            return true;
        }
        remove_if_ours(&f.path, f.file, "its server stopped");
        false
    });
}

/// Removes the socket file at `path` if it is still `file`.
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

/// Removes the file of a socket this process bound if the process gives up before its
/// server stops: the server dropped without serving, or `serve` failing to start. It lives
/// in a task that ends when [`stopped`] takes the file off the list, or else is dropped
/// when the runtime shuts down: then, if the socket has been closed, the file goes.
struct FailedStart(FileId);

impl FailedStart {
    fn watch(socket: FileId) -> Option<tokio::sync::oneshot::Sender<()>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(async move {
            let _guard = FailedStart(socket);
            let _ = rx.await;
        });
        Some(tx)
    }
}

impl Drop for FailedStart {
    fn drop(&mut self) {
        let mut files = crate::lock(&FILES);
        let closed = files
            .iter()
            .position(|f| f.socket == self.0 && f.is_closed() == Some(true));
        if let Some(i) = closed {
            let f = files.swap_remove(i);
            remove_if_ours(&f.path, f.file, "the process did not get to serve on it");
        }
    }
}

/// An accepted connection's socket.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => $e,
            Stream::Unix($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
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
