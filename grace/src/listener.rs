//! Listening sockets: bind, adopt, accept, and the accepted stream type.
//!
//! The server owns its listeners explicitly: it closes them the moment a drain starts (new
//! connections are refused), or hands their descriptors to a new process on a restart.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::pin::Pin;
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
/// let adopted: grace::Listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?.into();
/// # Ok(()) }
/// ```
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

    /// Binds a Unix-domain listener at `path`. Must be called within a tokio runtime.
    pub fn bind_unix(path: impl AsRef<Path>) -> io::Result<Listener> {
        Ok(Listener::Unix(UnixListener::bind(path)?))
    }

    /// Adopts a listening socket from its descriptor (inherited from systemd or a previous
    /// generation of this process). Fails if it is not a listening stream socket.
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
            rustix::net::AddressFamily::UNIX => Ok(Listener::Unix(UnixListener::from_std(
                std::os::unix::net::UnixListener::from(fd),
            )?)),
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
